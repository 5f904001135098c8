"""The small Ignite glue the bundle configs call: batch preparation, the pair loss, a validation metric,
crash-safe checkpoints and the per-pair evaluation writer.

A batch of pairs is fed to MONAI's stock ``SupervisedTrainer`` / ``SupervisedEvaluator``: ``inputs`` and
``targets`` are both the ``(B, 2, *S)`` (moving, fixed) stack, the network maps it to the displacement field,
and :class:`PairLoss` warps and scores it.
"""

import csv
import io
import json
import math
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.data import decollate_batch
from monai.handlers import from_engine
from torch import nn

from custom.io import atomic_write_text
from custom.losses import GradLoss, LocalNCCLoss, MSELoss
from custom.metrics import dice_per_label, jacobian_stats
from custom.networks import check_spatial_dims
from custom.warp import SpatialTransformer

__all__ = [
    "AtomicCheckpointSaver",
    "enable_resume",
    "PairLoss",
    "PairMetricsWriter",
    "WarpedNCC",
    "decollated",
    "latest_checkpoint",
    "prepare_pair_batch",
]


def prepare_pair_batch(batchdata: dict, device: Optional[Union[str, torch.device]] = None, non_blocking=False, **_):
    """``prepare_batch`` for MONAI engines: ``(pair, pair)`` with ``pair = cat([moving, fixed])``, ``(B, 2, *S)``."""
    pair = torch.cat([batchdata["moving"], batchdata["fixed"]], dim=1)
    pair = torch.as_tensor(pair).to(device=device, non_blocking=non_blocking)
    return pair, pair


class PairLoss(nn.Module):
    """Unsupervised registration loss ``similarity(warp(moving, ddf), fixed) + smooth_weight * Grad(ddf)``.

    Args:
        spatial_dims: 2 or 3.
        similarity: ``"lncc"`` (local NCC, window ``kernel_size``) or ``"mse"``.
        smooth_weight: weight of the smoothness penalty (VoxelMorph: 1.0 for NCC, 0.01 for MSE).
        kernel_size: LNCC window.

    Raises:
        ValueError: for an unknown similarity.
    """

    def __init__(self, spatial_dims: int, similarity: str = "lncc", smooth_weight: float = 1.0, kernel_size: int = 9):
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        if similarity not in ("lncc", "mse"):
            raise ValueError(f"loss must be 'lncc' or 'mse', got {similarity!r}.")
        self.similarity = LocalNCCLoss(spatial_dims, kernel_size) if similarity == "lncc" else MSELoss()
        self.smoothness = GradLoss("l2")
        self.smooth_weight = float(smooth_weight)
        self.transformer = SpatialTransformer()

    def forward(self, ddf: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            ddf: ``(B, spatial_dims, *S)`` predicted displacement.
            pair: ``(B, 2, *S)``; channel 0 moving, channel 1 fixed.

        Returns:
            The scalar loss.
        """
        warped = self.transformer(pair[:, :1], ddf.float())
        return self.similarity(warped, pair[:, 1:]) + self.smooth_weight * self.smoothness(ddf.float())


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


class WarpedNCC(Metric):
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
        super().__init__(output_transform=output_transform or from_engine(["pred", "label"]))

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64)
        self._count = 0

    @reinit__is_reduced
    def update(self, output) -> None:
        ddf, pair = (_stack(v) for v in output)
        ncc = -self.loss(self.transformer(pair[:, :1], ddf), pair[:, 1:]).flatten(1).mean(1)
        self._sum += ncc.sum().double().cpu()
        self._count += ncc.numel()

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        return float(self._sum) / max(int(self._count), 1)


class _FixedNameSaver(DiskSaver):
    """Ignite's atomic ``DiskSaver`` (temporary file + rename), optionally under one fixed file name."""

    def __init__(self, dirname: str, filename: Optional[str] = None) -> None:
        super().__init__(dirname, require_empty=False, atomic=True, create_dir=True)
        self.filename = filename

    def __call__(self, checkpoint, filename, metadata=None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        if not self.filename:  # with a fixed name, the "old" file is the new one: keep it
            super().remove(filename)


class AtomicCheckpointSaver:
    """Save ``save_dict`` with Ignite's ``Checkpoint`` and an atomic ``DiskSaver``: a killed run never leaves a
    corrupt file (MONAI's ``CheckpointSaver`` writes in place). Only rank 0 writes under ``torch.distributed``.

    Args:
        save_dir: folder of the checkpoint files.
        save_dict: objects with ``state_dict`` (network, optimizer, trainer); one object is saved bare.
        event: Ignite event name, e.g. ``"EPOCH_COMPLETED"`` (resume checkpoints) or ``"COMPLETED"``.
        filename: a fixed file name (e.g. ``"model.pt"``); default ``checkpoint_<epoch>.pt`` for several objects
            (Ignite's naming).
        key_metric: save only when this metric of the attached engine improves (best model).
        n_saved: how many files to keep.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Dict[str, object],
        event: str = "EPOCH_COMPLETED",
        filename: Optional[str] = None,
        key_metric: Optional[str] = None,
        n_saved: int = 1,
    ) -> None:
        self.save_dir = save_dir
        self.save_dict = save_dict
        self.event = Events[event]
        self.filename = filename
        self.key_metric = key_metric
        self.n_saved = n_saved

    def attach(self, engine: Engine) -> None:
        """Attach to an Ignite engine."""
        key = self.key_metric
        checkpoint = Checkpoint(
            self.save_dict,
            _FixedNameSaver(self.save_dir, self.filename),
            filename_prefix="",
            score_function=(lambda e: e.state.metrics[key]) if key else None,
            score_name=key,
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.epoch,
        )
        engine.add_event_handler(self.event, checkpoint)


def enable_resume(trainer, checkpoint_dir: str, resume: bool = False) -> Optional[str]:
    """Save a resume checkpoint (network, optimizer, trainer state) atomically after every epoch and, with
    ``resume``, load the latest one when the run starts (MONAI's ``CheckpointLoader``, ``weights_only=True``).

    A run killed mid-epoch and resumed repeats at most that epoch.

    Args:
        trainer: MONAI ``SupervisedTrainer`` (its ``network`` and ``optimizer`` are saved with it).
        checkpoint_dir: folder of ``checkpoint_<epoch>.pt``.
        resume: load the latest checkpoint, if there is one.

    Returns:
        The checkpoint resumed from, or ``None``.
    """
    from monai.handlers import CheckpointLoader

    state = {"network": trainer.network, "optimizer": trainer.optimizer, "trainer": trainer}
    AtomicCheckpointSaver(checkpoint_dir, state, "EPOCH_COMPLETED").attach(trainer)
    path = latest_checkpoint(checkpoint_dir) if resume else None
    if path:
        CheckpointLoader(path, state, map_location=trainer.state.device).attach(trainer)
    return path


def latest_checkpoint(save_dir: Union[str, Path]) -> Optional[str]:
    """The resume checkpoint with the highest epoch in ``save_dir`` (``checkpoint_<epoch>.pt``), or ``None``."""
    files = list(Path(save_dir).glob("checkpoint_*.pt"))
    if not files:
        return None

    def epoch(p: Path) -> int:
        digits = "".join(ch for ch in p.stem.split("_")[-1] if ch.isdigit())
        return int(digits or 0)

    return str(max(files, key=epoch))


class PairMetricsWriter:
    """Evaluator handler: per-pair metrics to ``metrics.csv`` and a summary to ``summary.json`` / ``summary.md``.

    Per pair: LNCC (positive), MSE, Dice per label and mean Dice (labels from the data unless given), % voxels
    with non-positive Jacobian determinant, std of log-Jacobian, and the network time per pair.

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
                row = {
                    "moving": item["moving_id"],
                    "fixed": item["fixed_id"],
                    "lncc": float(-self.lncc(warped, pair[:, 1:]).mean()),
                    "mse": float(((warped - pair[:, 1:]) ** 2).mean()),
                    **jacobian_stats(ddf),
                    "seconds": seconds / len(items),
                }
                if "moving_label" in item:
                    moving_label = torch.as_tensor(item["moving_label"]).to(ddf.device)[None]
                    warped_label = self.warp_labels(moving_label, ddf)[0]
                    fixed_label = torch.as_tensor(item["fixed_label"]).to(ddf.device)
                    dice = dice_per_label(warped_label, fixed_label, self.labels)
                    row.update({f"dice_{k}": v for k, v in dice.items()})
                    valid = [v for v in dice.values() if not math.isnan(v)]
                    row["dice_mean"] = statistics.fmean(valid) if valid else float("nan")
            self.rows.append(row)

    def summary(self) -> Dict[str, Dict[str, float]]:
        """Mean and standard deviation of every metric over the pairs."""
        keys = [k for k in self.rows[0] if k not in ("moving", "fixed")] if self.rows else []
        out = {}
        for k in keys:
            values = [r[k] for r in self.rows if k in r and not math.isnan(r[k])]
            if values:
                out[k] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "n": len(values)}
        return out

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
        atomic_write_text(self.output_dir / "summary.md", "\n".join(lines) + "\n")
