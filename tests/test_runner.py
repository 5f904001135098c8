"""The bundle runner: the command-line check of `python -m monai.bundle run` options and the checkpoint check."""

import json
from pathlib import Path

import pytest
import torch

from custom.runner import check_bundle_arguments, check_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "bundle" / "configs" / "train.json")
MERGED = f"['{TRAIN}','{REPO / 'bundle' / 'configs' / 'evaluate.json'}']"

ACCEPTED = [
    # (argv after the program name)
    ["run", "training", "--config_file", TRAIN, "--epochs", "1"],  # a top-level key
    ["run", "training", "--config_file", TRAIN, "--train#trainer#max_epochs", "2"],  # a nested path of a key
    ["run", "evaluating", "--config_file", MERGED, "--eval_split", "all"],  # a key of the second file
    ["run", "--config_file=" + TRAIN, "--meta_file", "m.json", "--logging_file", "l.conf"],  # run's own options
    ["ckpt_export", "network_def", "--filepath", "model.ts", "--config_file", TRAIN],  # another verb
    ["run", "training", "--config_file", TRAIN, "--resume", "no", "--amp", "FALSE"],  # boolean words
    ["run", "training", "--config_file", TRAIN, "--pretrained", "--epochs", "1"],  # a bare boolean flag
]


@pytest.mark.parametrize("argv", ACCEPTED)
def test_valid_bundle_arguments_pass(argv):
    check_bundle_arguments(argv)


REFUSED = [
    # (argv, message)
    (["run", "training", "--config_file", TRAIN, "--epoch", "1"], "unknown option --epoch: .*did you mean --epochs"),
    (["run", "evaluating", "--config_file", MERGED, "--eval_splt", "all"], "did you mean --eval_split"),  # 2 files
    (["run", "--config_file", "nothing.json"], "config file 'nothing.json' does not exist"),  # missing config
]
CONFIGS = {
    name: str(REPO / "bundle" / "configs" / name)
    for name in ("train.json", "inference.json", "evaluate.json", "multi_gpu_train.json", "multi_gpu_inference.json")
}
BOOLEAN_KEYS = [
    (name, key)
    for name, path in CONFIGS.items()
    for key, value in json.loads(Path(path).read_text()).items()
    if isinstance(value, bool)
]
REFUSED += [
    (["run", "x", "--config_file", CONFIGS[name], f"--{key}", "maybe"], f"{key} must be true or false")
    for name, key in BOOLEAN_KEYS
]  # every boolean key of every config refuses a non-boolean word


@pytest.mark.parametrize("argv,message", REFUSED)
def test_unknown_bundle_arguments_are_refused(argv, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        check_bundle_arguments(argv)


def test_every_boolean_key_is_checked():
    assert {key for _, key in BOOLEAN_KEYS} == {
        "amp",
        "augment",
        "resume",
        "pretrained",
        "resample",
        "affine",
        "deformable",
        "jacobian",
        "overwrite",
        "stop_on_error",
    }


def test_check_checkpoint(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "ok.pt")
    check_checkpoint(tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:40])
    torch.save([1, 2], tmp_path / "list.pt")
    cases = [("cut.pt", "is not a weights-only PyTorch checkpoint"), ("list.pt", "holds a list, not a state dict")]
    for name, message in cases + [("none.pt", "does not exist"), (".", "is a folder; give the .pt file")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            check_checkpoint(tmp_path / name)
