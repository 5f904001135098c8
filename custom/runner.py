"""The bundle runner: every tool and command runs the bundle's configs through these functions.

``bundle_workflow`` builds a MONAI ``ConfigWorkflow`` of the bundle's configs with overrides, ``run_workflow`` runs
one, ``train_run`` trains one run under a wall-clock or step budget (the study, accuracy and pretraining tools), and
``run_or_exit`` is what the evaluation and inference configs call to run their evaluator with every input checked
first and user errors reported as one line.
"""

import ast
import json
import logging
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import yaml
from ignite.engine import Engine, Events
from ignite.handlers import TimeLimit

from custom.errors import as_bool, closest, exit_on_user_error
from custom.workflow import iteration_loss

__all__ = [
    "as_list",
    "bundle_dir",
    "bundle_workflow",
    "check_bundle_arguments",
    "check_checkpoint",
    "run_or_exit",
    "run_workflow",
    "train_run",
]

MONAI_RUN_ARGS = (
    "run_id",
    "init_id",
    "final_id",
    "meta_file",
    "config_file",
    "logging_file",
    "tracking",
    "args_file",
    "workflow_type",
    "workflow_name",
    "properties_path",
)
"""The options of ``python -m monai.bundle run`` itself; every other ``--key`` overrides a config key."""


class _WithoutLoggingNotice(logging.Filter):
    """Drops MONAI's "Logging file is set to False, skipping logging." that every tool's workflow would print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "skipping logging" not in record.getMessage()


logging.getLogger("monai.bundle.workflows").addFilter(_WithoutLoggingNotice())


def bundle_dir() -> Path:
    """The bundle folder next to the ``custom`` package (an editable install or a source checkout)."""
    return Path(__file__).resolve().parents[1] / "bundle"


def as_list(value: Union[str, int, float, Sequence]) -> list:
    """A command-line list: ``"a,b"`` (split on commas), a single number, or a sequence as it is."""
    if isinstance(value, (int, float)):
        return [value]
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)


def bundle_workflow(configs: Sequence[str], run_id: str, overrides: dict):
    """A MONAI ``ConfigWorkflow`` of the bundle's ``configs`` (merged in order) with ``overrides``."""
    from monai.bundle import ConfigWorkflow

    paths = [str(bundle_dir() / "configs" / c) for c in configs]
    meta = str(bundle_dir() / "configs" / "metadata.json")
    return ConfigWorkflow(paths, meta_file=meta, logging_file=False, run_id=run_id, **overrides)


def train_run(
    overrides: dict, max_minutes: Optional[float], max_steps: Optional[int] = None, validate_ends: bool = False
) -> dict:
    """Train one run, for at most ``max_minutes`` of wall clock and ``max_steps`` iterations.

    Args:
        overrides: ``train.json`` overrides.
        max_minutes: wall-clock budget.
        max_steps: iteration budget.
        validate_ends: validate the starting weights before the first step, and the last weights after the last
            step when it came after the last validation (the learning curve's ends; the best model is chosen
            among them too).

    Returns:
        ``train_s`` (the run's wall time), ``step_s`` (mean seconds per iteration after the first), ``curve`` (the
        mean loss of each epoch), ``epochs``, ``iterations``, per epoch ``epoch_s`` (wall seconds, the
        validation that ends it included) and ``epoch_step_s`` (the seconds of its training iterations), and
        ``validation``: ``(hours since the start, metrics)`` of each validation.
    """
    workflow = bundle_workflow(["train.json"], "training", overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    validator = workflow.parser.get_parsed_content("validate#evaluator")
    record = {"step_s": [], "losses": [], "curve": [], "epoch_s": [], "epoch_step_s": [], "validation": []}
    begin, validated = time.perf_counter(), {"iteration": -1}

    def _validated(engine):
        record["validation"].append(((time.perf_counter() - begin) / 3600, dict(engine.state.metrics)))
        validated["iteration"] = trainer.state.iteration

    validator.add_event_handler(Events.COMPLETED, _validated)
    if validate_ends:
        trainer.add_event_handler(Events.STARTED, lambda e: validator.run(e.state.epoch + 1))
        trainer.add_event_handler(
            Events.COMPLETED, lambda e: validated["iteration"] == e.state.iteration or validator.run(e.state.epoch + 1)
        )
    started = {"step": 0.0, "epoch": 0.0, "steps": 0}
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: started.update(step=time.perf_counter()))
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: started.update(epoch=time.perf_counter(), steps=0))

    def _done(engine):
        record["step_s"].append(time.perf_counter() - started["step"])
        record["losses"].append(iteration_loss(engine))
        started["steps"] += 1

    def _epoch(engine):  # attached after the configs' handlers: runs after the epoch's validation
        record["curve"].append(sum(record["losses"]) / max(len(record["losses"]), 1))
        record["losses"].clear()
        record["epoch_s"].append(time.perf_counter() - started["epoch"])
        record["epoch_step_s"].append(sum(record["step_s"][-started["steps"] :]) if started["steps"] else 0.0)

    trainer.add_event_handler(Events.ITERATION_COMPLETED, _done)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, _epoch)
    if max_minutes:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, TimeLimit(max(1, int(max_minutes * 60))))
    if max_steps:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=max_steps), lambda engine: engine.terminate())
    start = time.perf_counter()
    workflow.run()
    wall = time.perf_counter() - start
    workflow.finalize()
    steps = record["step_s"][1:] or record["step_s"]  # the first step includes warm-up
    return {
        "train_s": wall,
        "step_s": sum(steps) / max(len(steps), 1),
        "curve": record["curve"],
        "epochs": len(record["curve"]),
        "iterations": trainer.state.iteration,
        "epoch_s": record["epoch_s"],
        "epoch_step_s": record["epoch_step_s"],
        "validation": record["validation"],
    }


def run_workflow(configs: Sequence[str], run_id: str, overrides: dict) -> None:
    """Initialise, run and finalise the workflow of the bundle's ``configs`` with ``overrides``."""
    workflow = bundle_workflow(configs, run_id, overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def check_checkpoint(path: Union[str, Path]) -> None:
    """Refuse a model file that is missing or is not a state dict ``torch.load(..., weights_only=True)`` can read.

    Raises:
        FileNotFoundError: for a missing file.
        ValueError: for a corrupt, truncated or foreign file (a pickle of arbitrary objects is never loaded).
    """
    if Path(path).is_dir():
        raise ValueError(f"model file {str(path)!r} is a folder; give the .pt file (e.g. {str(path)!r}/model.pt).")
    if not Path(path).is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist; train first or pass --model_path.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"model file {str(path)!r} is not a weights-only PyTorch checkpoint ({type(error).__name__}): it is "
            "corrupt or truncated, or holds Python objects other than tensors, which are never loaded."
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"model file {str(path)!r} holds a {type(state).__name__}, not a state dict.")


def run_or_exit(
    evaluator: Union[Engine, Callable[[], Engine]], handlers: Sequence = (), checkpoint: Optional[str] = None
) -> None:
    """Build (when given a factory) and run an evaluator, after checking the checkpoint and validating its
    inferer's options, its dataset's inputs and its handlers' outputs; a user error becomes one line on stderr
    and exit code 2.

    Nothing is written before every part has passed its ``validate``. The inference config passes a factory
    (``"_mode_": "callable"``) so that the pair listing, which the evaluator's constructor triggers, is inside
    this guard too.

    Args:
        evaluator: the engine, or a factory of it.
        handlers: its handlers; those with ``validate(dataset)`` check their outputs (e.g. the output folder), those
            with ``finish()`` conclude when nothing is left to run, and pairs in their ``failures`` make the exit
            code 2 once the others are done.
        checkpoint: the model file the evaluator loads, checked first (:func:`check_checkpoint`).
    """
    with exit_on_user_error():
        if checkpoint is not None:
            check_checkpoint(checkpoint)
        engine = evaluator if isinstance(evaluator, Engine) else evaluator()
        dataset = engine.data_loader.dataset
        for part in (getattr(engine, "inferer", None), dataset):
            if hasattr(part, "validate"):
                part.validate()
        for handler in handlers or ():
            if hasattr(handler, "validate"):
                handler.validate(dataset)
        if len(dataset):
            engine.run()
        else:  # nothing left to do (all finished earlier): the handlers still conclude
            for handler in handlers or ():
                getattr(handler, "finish", lambda: None)()
        failed = {name for handler in handlers or () for name in getattr(handler, "failures", {})}
        if failed:
            raise ValueError(
                f"{len(failed)} pair(s) failed ({', '.join(sorted(failed)[:3])}{', ...' if len(failed) > 3 else ''}): "
                "see the warnings above and pairs_out.csv; the others are written."
            )


def _options(argv: Sequence[str]) -> Dict[str, str]:
    """The ``--key value`` / ``--key=value`` pairs of a command line."""
    options, args = {}, list(argv)
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            key, has_value, value = arg[2:].partition("=")
            options[key] = value if has_value else (args[i + 1] if i + 1 < len(args) else "")
    return options


def _config_keys(path: str) -> Dict[str, object]:
    """The top-level keys of a config file (``+key`` and ``key#path`` by their first part) with their values."""
    text = Path(path).read_text()
    config = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    return {key.lstrip("+").split("#")[0]: value for key, value in (config or {}).items()}


def check_bundle_arguments(argv: Sequence[str]) -> None:
    """Check the ``--key`` options of a ``python -m monai.bundle run ...`` command line before any work: MONAI
    accepts any key as an override and silently adds a mistyped one as a new, unused key.

    Args:
        argv: the arguments after the program name; only the ``run`` verb is checked.

    Raises:
        ValueError: for a key that is neither an option of ``run`` nor a key (or the first part of a ``#`` path) of
            the merged config files, naming the closest valid key, or a value of a boolean key (one whose config
            value is ``true``/``false``) that :func:`~custom.errors.as_bool` does not take.
    """
    if not argv or argv[0] != "run":  # the other verbs (ckpt_export, verify_net_in_out, ...) have their own options
        return
    options = _options(argv)
    files = options.get("config_file", "").strip()
    if not files:
        return
    paths = ast.literal_eval(files) if files.startswith("[") else [files]
    valid, defaults = set(MONAI_RUN_ARGS), {}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {path!r} does not exist.")
        defaults.update(_config_keys(path))
    valid |= set(defaults)
    for key in options:
        root = key.split("#")[0]
        if root not in valid:
            match = closest(root, sorted(valid))
            hint = f"; did you mean --{match}?" if match else "; see the config files for the valid keys."
            raise ValueError(f"unknown option --{key}: not a key of {', '.join(paths)}{hint}")
        if isinstance(defaults.get(key), bool) and options[key] and not options[key].startswith("--"):
            as_bool(key, options[key])  # a bare --flag is true
