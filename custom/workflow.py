"""The small Ignite glue the bundle configs call: batch preparation, a validation metric,
crash-safe checkpoints and the per-pair evaluation writer.

A batch of pairs is fed to MONAI's stock ``SupervisedTrainer`` / ``SupervisedEvaluator``: ``inputs`` and
``targets`` are both the ``(B, 2, *S)`` (moving, fixed) stack, the network maps it to the displacement field,
and :class:`custom.losses.PairLoss` warps and scores it.
"""

import csv
import io
import json
import logging
import math
import os
import re
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.data import decollate_batch
from monai.handlers import from_engine

from custom.atomic import atomic_write_text
from custom.errors import as_bool, check_integer, check_number
from custom.losses import LocalNCCLoss
from custom.metrics import dice_per_label, jacobian_determinant, pair_metrics, summarize
from custom.spatial import check_spatial_dims
from custom.warp import SpatialTransformer

__all__ = [
    "AtomicCheckpointSaver",
    "EpochSummary",
    "check_training_options",
    "enable_resume",
    "iteration_loss",
    "PairMetricsWriter",
    "WarpedDice",
    "WarpedNCC",
    "decollated",
    "latest_checkpoint",
    "prepare_labelled_pair_batch",
    "prepare_pair_batch",
    "validation_metric",
]


def prepare_pair_batch(batchdata: dict, device: Optional[Union[str, torch.device]] = None, non_blocking=False, **_):
    """``prepare_batch`` for MONAI engines: ``(pair, pair)`` with ``pair = cat([moving, fixed])``, ``(B, 2, *S)``."""
    pair = torch.cat([batchdata["moving"], batchdata["fixed"]], dim=1)
    pair = torch.as_tensor(pair).to(device=device, non_blocking=non_blocking)
    return pair, pair


def prepare_labelled_pair_batch(
    batchdata: dict, device: Optional[Union[str, torch.device]] = None, non_blocking=False, **_
):
    """``prepare_batch`` for pairs with label maps: ``(pair, target)``, ``pair = cat([moving, fixed])``
    ``(B, 2, *S)`` (the network's input: never the labels), ``target = cat([moving, fixed, moving_label,
    fixed_label])`` ``(B, 4, *S)`` for :class:`custom.losses.PairLoss` with ``label_weight`` and :class:`WarpedDice`.

    Raises:
        ValueError: when the batch has no label maps.
    """
    if "moving_label" not in batchdata or "fixed_label" not in batchdata:
        raise ValueError(
            f"the pairs carry no label maps (keys {sorted(batchdata)}): give the dataset a label file (--label) "
            "or set label_weight 0 and val_metric 'ncc'."
        )
    pair, _ = prepare_pair_batch(batchdata, device, non_blocking)
    labels = torch.cat([batchdata["moving_label"], batchdata["fixed_label"]], dim=1)
    labels = torch.as_tensor(labels).to(device=device, dtype=pair.dtype, non_blocking=non_blocking)
    return pair, torch.cat([pair, labels], dim=1)


def iteration_loss(engine: Engine) -> float:
    """The loss of a MONAI trainer's last iteration (its output is a dict, or a list of dicts once decollated)."""
    output = engine.state.output
    return float((output[0] if isinstance(output, list) else output)["loss"])


class EpochSummary:
    """Trainer handler: one log line per epoch (mean loss, seconds, iterations per second) instead of a line per
    iteration; the progress bar shows the iterations and TensorBoard keeps the per-iteration loss.

    Args:
        name: the logger's name.
    """

    def __init__(self, name: str = "vxm-lite") -> None:
        self.logger = logging.getLogger(name)
        self._losses: List[float] = []
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        """Attach to an Ignite engine."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self._losses.clear()
        self._start = time.perf_counter()

    def _iteration(self, engine: Engine) -> None:
        self._losses.append(iteration_loss(engine))

    def _completed(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self._start
        loss = statistics.fmean(self._losses) if self._losses else float("nan")
        self.logger.info(
            "epoch %d/%d: train_loss %.4f, %.1f s, %.1f it/s",
            engine.state.epoch,
            engine.state.max_epochs,
            loss,
            seconds,
            len(self._losses) / max(seconds, 1e-9),
        )


def decollated(engine: Engine):
    """``(items, outputs)``: the engine's current batch and output as per-item lists (MONAI engines decollate)."""
    batch, output = engine.state.batch, engine.state.output
    items = batch if isinstance(batch, list) else decollate_batch(batch)
    outputs = output if isinstance(output, list) else decollate_batch(output)
    return items, outputs


def _stack(values) -> torch.Tensor:
    """A batch tensor from a batch tensor or from a decollated list of item tensors."""
    if isinstance(values, (list, tuple)):
        return torch.stack([torch.as_tensor(v) for v in values]).float()
    return torch.as_tensor(values).float()


class _PairMean(Metric):
    """Ignite metric: the mean over an epoch's pairs of a per-pair score of the predicted field (:meth:`scores`);
    sums are all-reduced across processes under ``torch.distributed``.

    Args:
        output_transform: maps the engine output to ``(ddf, target)``.
    """

    def __init__(self, output_transform=None):
        super().__init__(output_transform=output_transform or from_engine(["pred", "label"]))

    def scores(self, ddf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The ``(B,)`` scores of a batch."""
        raise NotImplementedError

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64)
        self._count = 0

    @reinit__is_reduced
    def update(self, output) -> None:
        scores = self.scores(*(_stack(v) for v in output))
        self._sum += scores.sum().double().cpu()
        self._count += scores.numel()

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        return float(self._sum) / max(int(self._count), 1)


class WarpedNCC(_PairMean):
    """Ignite metric: mean local NCC (positive, higher is better) of warped moving vs fixed over an epoch.

    Works under ``torch.distributed``: sums are all-reduced across processes.

    Args:
        spatial_dims: 2 or 3.
        kernel_size: LNCC window.
        output_transform: maps the engine output to ``(ddf, pair)``.
    """

    def __init__(self, spatial_dims: int, kernel_size: int = 9, output_transform=None):
        self.loss = LocalNCCLoss(spatial_dims, kernel_size, reduction="none")
        self.transformer = SpatialTransformer()
        super().__init__(output_transform)

    def scores(self, ddf: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        return -self.loss(self.transformer(pair[:, :1], ddf), pair[:, 1:2]).flatten(1).mean(1)


class WarpedDice(_PairMean):
    """Ignite metric: mean Dice (higher is better) of the moving label map warped (nearest) by the predicted field
    against the fixed label map, over every non-zero label of each pair, averaged over the pairs of an epoch: the
    validation score of training on labelled subjects (batches from :func:`prepare_labelled_pair_batch`).

    Works under ``torch.distributed``: sums are all-reduced across processes.

    Args:
        output_transform: maps the engine output to ``(ddf, target)`` with ``target`` ``(B, 4, *S)``.
    """

    def __init__(self, output_transform=None):
        self.transformer = SpatialTransformer("nearest")
        super().__init__(output_transform)

    def scores(self, ddf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape[1] != 4:
            raise ValueError(f"WarpedDice needs (moving, fixed, moving_label, fixed_label), got {target.shape[1]}.")
        warped = self.transformer(target[:, 2:3], ddf)
        means = []
        for pred, fixed in zip(warped, target[:, 3:4]):
            dice = [v for v in dice_per_label(pred, fixed).values() if not math.isnan(v)]
            means.append(statistics.fmean(dice) if dice else 0.0)
        return torch.tensor(means, dtype=torch.float64)


VALIDATION_METRICS = ("dice", "ncc")


def validation_metric(name: str, spatial_dims: int) -> Dict[str, Metric]:
    """The validation's key metric for the configs: ``{"val_ncc": WarpedNCC}`` or ``{"val_dice": WarpedDice}``.

    Args:
        name: ``"ncc"`` (no labels needed) or ``"dice"`` (the validation pairs need label maps).
        spatial_dims: 2 or 3.

    Raises:
        ValueError: for another name.
    """
    if name not in VALIDATION_METRICS:
        raise ValueError(f"val_metric must be one of {list(VALIDATION_METRICS)}, got {name!r}.")
    return {f"val_{name}": WarpedNCC(spatial_dims) if name == "ncc" else WarpedDice()}


class _FixedNameSaver(DiskSaver):
    """Ignite's atomic ``DiskSaver``, optionally under one fixed name; a replaced file is removed once the new one is
    in place (Ignite's ``Checkpoint`` removes it first), so a run killed in between keeps its last checkpoint."""

    def __init__(self, dirname: str, filename: Optional[str] = None) -> None:
        super().__init__(dirname, require_empty=False, atomic=True, create_dir=True)
        self.filename = filename
        self._replaced: List[str] = []

    def __call__(self, checkpoint, filename, metadata=None) -> None:
        saved = self.filename or filename
        super().__call__(checkpoint, saved, metadata)
        for old in set(self._replaced) - {saved}:
            super().remove(old)
        self._replaced.clear()

    def remove(self, filename: str) -> None:
        if not self.filename:  # with a fixed name, the "old" file is the new one: keep it
            self._replaced.append(filename)


class AtomicCheckpointSaver:
    """Save ``save_dict`` with Ignite's ``Checkpoint`` and an atomic ``DiskSaver``: a killed run never leaves a
    corrupt file (MONAI's ``CheckpointSaver`` writes in place). Only rank 0 writes under ``torch.distributed``.

    After :meth:`attach`, ``checkpoint`` is the Ignite ``Checkpoint``; its ``state_dict`` holds the best score so
    far, which resume checkpoints carry (see :func:`enable_resume`).

    Args:
        save_dir: folder of the checkpoint files.
        save_dict: objects with ``state_dict`` (network, optimizer, trainer); one object is saved bare.
        event: Ignite event name, e.g. ``"EPOCH_COMPLETED"`` (resume checkpoints) or ``"COMPLETED"``.
        filename: a fixed file name (e.g. ``"model.pt"``); default ``<prefix>checkpoint_<epoch>.pt`` for several
            objects (Ignite's naming).
        key_metric: save only when this metric of the attached engine improves (best model).
        n_saved: how many files to keep.
        prefix: file name prefix of the default naming (e.g. a run id).
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Dict[str, object],
        event: str = "EPOCH_COMPLETED",
        filename: Optional[str] = None,
        key_metric: Optional[str] = None,
        n_saved: int = 1,
        prefix: str = "",
    ) -> None:
        self.save_dir = save_dir
        self.save_dict = save_dict
        self.event = Events[event]
        self.filename = filename
        self.key_metric = key_metric
        self.n_saved = n_saved
        self.prefix = prefix
        self.checkpoint: Optional[Checkpoint] = None

    def attach(self, engine: Engine) -> None:
        """Attach to an Ignite engine."""
        key = self.key_metric
        self.checkpoint = Checkpoint(
            self.save_dict,
            _FixedNameSaver(self.save_dir, self.filename),
            filename_prefix=self.prefix,
            score_function=(lambda e: e.state.metrics[key]) if key else None,
            score_name=key,
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.epoch,
        )
        engine.add_event_handler(self.event, self.checkpoint)


RUN_FILE = "run.json"


def check_training_options(epochs, batch_size, learning_rate, val_interval) -> None:
    """The training config's first step: refuse numbers that cannot train before anything is built or written (so a
    mistaken ``--epochs 0`` cannot replace the run a later ``--resume True`` continues).

    Raises:
        ValueError: unless ``epochs``, ``batch_size`` and ``val_interval`` are integers >= 1 and ``learning_rate`` a
            finite number > 0.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("val_interval", val_interval)):
        check_integer(name, value, 1)
    check_number("learning_rate", learning_rate, positive=True)


def enable_resume(
    trainer, checkpoint_dir: str, resume: bool = False, best: Optional[AtomicCheckpointSaver] = None
) -> Optional[str]:
    """Save a resume checkpoint (network, optimizer, trainer state and the best-model saver's best score)
    atomically after every epoch and, with ``resume``, load the latest one of the current run when the run
    starts (MONAI's ``CheckpointLoader``, ``weights_only=True``).

    Each fresh run gets a run id (``checkpoint_dir/run.json``) that prefixes its files, so a resumed run never
    picks up a stale checkpoint of an earlier run in the same folder; the best score is restored, so the first
    validation after resuming replaces ``model.pt`` only when it is better. A run killed mid-epoch and resumed
    repeats at most that epoch.

    Args:
        trainer: MONAI ``SupervisedTrainer`` (its ``network`` and ``optimizer`` are saved with it).
        checkpoint_dir: folder of ``<run id>_checkpoint_<epoch>.pt`` and ``run.json``.
        resume: continue the current run from its latest checkpoint, if there is one.
        best: the best-model saver (already attached to the evaluator), whose best score is kept.

    Returns:
        The checkpoint resumed from, or ``None``.
    """
    from monai.handlers import CheckpointLoader

    folder, resume = Path(checkpoint_dir), as_bool("resume", resume)
    run_id = _run_id(folder) if resume else None
    if run_id is None:
        run_id = datetime.now().strftime("%Y%m%d-%H%M%S-") + f"{os.getpid()}"
        if _rank() == 0:
            atomic_write_text(folder / RUN_FILE, json.dumps({"run_id": run_id}) + "\n")
    state = {"network": trainer.network, "optimizer": trainer.optimizer, "trainer": trainer}
    if best is not None and best.checkpoint is not None:
        state["best"] = best.checkpoint
    # on every rank (Ignite's Checkpoint takes part in collectives); its DiskSaver writes on rank 0 only
    AtomicCheckpointSaver(checkpoint_dir, state, "EPOCH_COMPLETED", prefix=run_id).attach(trainer)
    path = latest_checkpoint(folder) if resume else None
    if resume and _rank() == 0:
        done = re.search(r"checkpoint_(\d+)\.pt$", path or "")
        print(
            (
                f"resuming run {run_id} after epoch {done.group(1)} ({path})"
                if done
                else f"nothing to resume in {str(folder)!r}: starting run {run_id} at epoch 1"
            ),
            flush=True,
        )
    if path:
        stored = set(torch.load(path, map_location="cpu", weights_only=True))
        CheckpointLoader(
            path, {k: v for k, v in state.items() if k in stored}, map_location=trainer.state.device
        ).attach(trainer)
    return path


def _rank() -> int:
    return (
        torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    )


def _run_id(folder: Path) -> Optional[str]:
    try:
        return str(json.loads((folder / RUN_FILE).read_text())["run_id"])
    except (OSError, ValueError, KeyError):
        return None


def latest_checkpoint(save_dir: Union[str, Path]) -> Optional[str]:
    """The resume checkpoint with the highest epoch of the current run in ``save_dir`` (the run id in
    ``run.json`` prefixes its files; without ``run.json``, any ``checkpoint_<epoch>.pt``), or ``None``."""
    folder = Path(save_dir)
    run_id = _run_id(folder)
    files = list(folder.glob(f"{run_id}_checkpoint_*.pt" if run_id else "*checkpoint_*.pt"))
    if not files:
        return None

    def epoch(p: Path) -> int:
        digits = "".join(ch for ch in p.stem.split("_")[-1] if ch.isdigit())
        return int(digits or 0)

    return str(max(files, key=epoch))


class PairMetricsWriter:
    """Evaluator handler: per-pair metrics to ``metrics.csv`` and a summary to ``summary.json`` / ``summary.md``.

    Per pair: LNCC (positive), MSE, Dice per label, mean Dice and the mean Dice of the worst 30% of labels
    (labels from the data unless given), the mean HD95 over labels (voxels), % voxels with non-positive Jacobian
    determinant (% folding), the smallest determinant, std of log-Jacobian (SDlogJ), and the time per pair (network
    and refinement): :func:`custom.metrics.pair_metrics` and the image similarities.

    Args:
        output_dir: where the files go (written atomically at the end of the run).
        spatial_dims: 2 or 3.
        labels: labels to score; default the non-zero labels present in each pair.
    """

    def __init__(self, output_dir: str, spatial_dims: int, labels: Optional[Sequence[int]] = None) -> None:
        self.output_dir = Path(output_dir)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.labels = labels
        self.lncc = LocalNCCLoss(self.spatial_dims, 9, reduction="none")
        self.warp = SpatialTransformer()
        self.warp_labels = SpatialTransformer("nearest")
        self.rows: List[dict] = []
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        """Attach to an Ignite engine."""
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_STARTED, self._tic)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _tic(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def _update(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self._start
        items, outputs = decollated(engine)
        for item, output in zip(items, outputs):
            ddf = torch.as_tensor(output["pred"]).float()[None]
            pair = torch.as_tensor(output["label"]).float()[None]
            with torch.no_grad():
                warped = self.warp(pair[:, :1], ddf)
                labels = {}
                if "moving_label" in item:
                    moving_label = torch.as_tensor(item["moving_label"]).to(ddf.device)[None]
                    labels["warped_label"] = self.warp_labels(moving_label, ddf)[0]
                    labels["fixed_label"] = torch.as_tensor(item["fixed_label"]).to(ddf.device)
                row = {
                    "moving": item["moving_id"],
                    "fixed": item["fixed_id"],
                    "lncc": float(-self.lncc(warped, pair[:, 1:2]).mean()),
                    "mse": float(((warped - pair[:, 1:2]) ** 2).mean()),
                    **pair_metrics(jacobian_determinant(ddf), labels=self.labels, **labels),
                    "seconds": seconds / len(items),
                }
            self.rows.append(row)

    def summary(self) -> Dict[str, Dict[str, float]]:
        """Mean and standard deviation of every metric over the pairs (:func:`custom.metrics.summarize`)."""
        return summarize(self.rows)

    def _write(self, engine: Engine) -> None:
        if not self.rows:
            return
        columns: List[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.output_dir / "metrics.csv", buffer.getvalue())
        summary = self.summary()
        atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=4) + "\n")
        lines = ["| metric | mean | std | pairs |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['mean']:.4f} | {v['std']:.4f} | {v['n']} |" for k, v in summary.items()]
        if "dice_mean" not in summary:
            note = "no label maps: Dice, worst-30% Dice and HD95 are not measured (give --label, e.g. aligned_seg35)"
            lines.append(f"\n{note}.")
            print(f"note: {note}.", flush=True)
        atomic_write_text(self.output_dir / "summary.md", "\n".join(lines) + "\n")
