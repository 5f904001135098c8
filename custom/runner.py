"""The bundle runner: every tool and command runs the bundle's configs through these functions.

``bundle_workflow`` builds a MONAI ``ConfigWorkflow`` of the bundle's configs with overrides, ``run_workflow`` runs
one, ``train_run`` trains one run under a wall-clock or step budget (the study, accuracy and pretraining tools), and
``run_or_exit`` is what the evaluation and inference configs call to run their evaluator with every input checked
first and user errors reported as one line.
"""

import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from ignite.engine import Engine, Events
from ignite.handlers import TimeLimit

from custom.errors import exit_on_user_error
from custom.workflow import iteration_loss

__all__ = ["as_list", "bundle_dir", "bundle_workflow", "run_or_exit", "run_workflow", "train_run"]


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


def train_run(overrides: dict, max_minutes: Optional[float], max_steps: Optional[int] = None) -> dict:
    """Train one run, for at most ``max_minutes`` of wall clock and ``max_steps`` iterations; returns wall time,
    mean seconds per iteration, iterations and the per-epoch loss curve."""
    workflow = bundle_workflow(["train.json"], "training", overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    record = {"step_s": [], "losses": [], "curve": []}
    started = [0.0]
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: started.__setitem__(0, time.perf_counter()))

    def _done(engine):
        record["step_s"].append(time.perf_counter() - started[0])
        record["losses"].append(iteration_loss(engine))

    def _epoch(engine):
        record["curve"].append(sum(record["losses"]) / max(len(record["losses"]), 1))
        record["losses"].clear()

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
    }


def run_workflow(configs: Sequence[str], run_id: str, overrides: dict) -> None:
    """Initialise, run and finalise the workflow of the bundle's ``configs`` with ``overrides``."""
    workflow = bundle_workflow(configs, run_id, overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def run_or_exit(evaluator: Union[Engine, Callable[[], Engine]]) -> None:
    """Build (when given a factory) and run an evaluator, after validating its inferer's options and its
    dataset's inputs; a user error becomes one line on stderr and exit code 2.

    Nothing is written before every part has passed its ``validate``. The inference config passes a factory
    (``"_mode_": "callable"``) so that the pair listing, which the evaluator's constructor triggers, is inside
    this guard too.
    """
    with exit_on_user_error():
        engine = evaluator if isinstance(evaluator, Engine) else evaluator()
        for part in (getattr(engine, "inferer", None), engine.data_loader.dataset):
            if hasattr(part, "validate"):
                part.validate()
        engine.run()
