"""The options the docs name exist, and the command line's options are the configs' keys."""

import inspect
import json
import re
from pathlib import Path

import pytest

from custom.cli import Commands

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
DOCS = [REPO / "README.md", REPO / "bundle" / "docs" / "README.md"]
OTHER_TOOLS = {
    # options of other programs the docs show, with the program
    "config_file": "monai.bundle",
    "meta_file": "monai.bundle",
    "filepath": "monai.bundle",
    "ckpt_file": "monai.bundle",
    "hash_val": "monai.bundle",
    "nproc_per_node": "torchrun",
    "skip": "black (--skip-magic-trailing-comma)",
    "help": "every command",
    "durations": "pytest (the test command prints the slowest tests)",
    "key": "the override syntax --key value",
    "refine_step": "the mistyped option the docs show being refused",
}
# the command-line names of config keys (as `python -m custom evaluate` passes them)
RENAMED = {"evaluate": {"split": "eval_split", "output_dir": "eval_dir"}}


def cli_options(command: str) -> list:
    return [p for p in inspect.signature(getattr(Commands, command)).parameters if p != "self"]


def config_keys() -> set:
    keys = set()
    for path in CONFIGS.glob("*.json"):
        keys |= {k.lstrip("+").split("#")[0] for k in json.loads(path.read_text())}
    return keys


def test_every_option_the_docs_name_exists():
    valid = config_keys() | set(OTHER_TOOLS)
    for name in dir(Commands):
        if not name.startswith("_"):
            valid |= set(cli_options(name))
    for doc in DOCS:
        named = set(re.findall(r"(?<![\w-])--([a-z][a-z_]*)", doc.read_text()))
        unknown = sorted(named - valid)
        assert not unknown, f"{doc.relative_to(REPO)} names options no command or config has: {unknown}"


@pytest.mark.parametrize(
    "command,configs", [("register", ["inference.json"]), ("evaluate", ["train.json", "evaluate.json"])]
)
def test_bundle_commands_options_are_config_keys(command, configs):
    keys = set()
    for config in configs:
        keys |= set(json.loads((CONFIGS / config).read_text()))
    renamed = RENAMED.get(command, {})
    missing = [o for o in cli_options(command) if renamed.get(o, o) not in keys]
    assert not missing, f"`{command}` options that are no key of {configs}: {missing}"
