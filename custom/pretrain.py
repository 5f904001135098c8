"""``python -m custom pretrain``: train the shipped pretrained weights (:mod:`custom.pretrained`) and record each
file in the manifest (``bundle/large_files.yml``) with its sha256, data, exact command, steps and wall time."""

import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import yaml

from custom.atomic import atomic_path, atomic_write_text
from custom.networks import VARIANTS
from custom.pretrained import MANIFEST, pretrained_path, read_manifest, sha256, weights_file
from custom.spatial import check_spatial_dims

__all__ = ["pretrain", "ship"]


def _command() -> str:
    return " ".join(["python -m custom"] + [shlex.quote(a) for a in sys.argv[1:]])


def pretrain(
    spatial_dims: int = 2,
    variant: str = "both",
    minutes: float = 15.0,
    max_steps: Optional[int] = None,
    seed: int = 0,
    shape: Optional[Sequence[int]] = None,
    synth_pairs: int = 256,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    from_shipped: bool = False,
    num_workers: int = 0,
    dataset_dir: str = "data/demo",
    output_dir: str = "runs/pretrain",
    bundle_root: Optional[str] = None,
) -> str:
    """Train on synthetic pairs only for a wall-clock budget and ship the best model in the bundle: writes
    ``bundle/models/pretrained_<N>d_<variant>.pt`` and its manifest entry (sha256, command, seed, steps, time).

    Args:
        spatial_dims: 2 or 3.
        variant: the network variant.
        minutes: wall-clock budget of the training (validation on fixed synthetic pairs included).
        max_steps: stop after this many training iterations (to reproduce a shipped file: its ``steps``).
        seed: generator, initialisation and pair seed.
        shape: synthetic pair shape (default 160x192 in 2D, 96x112x128 in 3D).
        synth_pairs: synthetic pairs per epoch.
        batch_size: training batch size.
        learning_rate: Adam learning rate.
        from_shipped: start from the shipped weights of ``spatial_dims`` and ``variant`` (fine-tuning; the
            manifest entry records their sha256 as ``started_from``) instead of a random initialisation.
        num_workers: data-loader processes generating the synthetic pairs beside the training.
        dataset_dir: a dataset whose label maps are deformed half of the time (the synthetic demo data; generated
            at the default ``data/demo`` when missing). Never real scans for shipped weights.
        output_dir: training logs and checkpoints.
        bundle_root: the bundle folder (default the one next to the package).

    Returns:
        The path of the written weights.
    """
    from custom.runner import bundle_dir, train_run

    spatial_dims = check_spatial_dims(spatial_dims)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    if minutes <= 0 or (max_steps is not None and max_steps < 1):
        raise ValueError(f"minutes must be > 0 and max_steps >= 1, got {minutes} and {max_steps}.")
    root = Path(bundle_root) if bundle_root else bundle_dir()
    out = Path(output_dir)
    overrides: Dict[str, object] = {
        "dataset_dir": dataset_dir,
        "spatial_dims": spatial_dims,
        "variant": variant,
        "pair_strategy": "synthetic",
        "synth_shape": list(shape) if shape else None,
        "synth_pairs": synth_pairs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "epochs": 1_000_000,  # the wall-clock budget ends the run
        "seed": seed,
        "pretrained": bool(from_shipped),
        "bundle_root": str(root),
        "num_workers": num_workers,
        "output_dir": str(out / "train"),
        "ckpt_dir": str(out / "models"),
    }
    started_from = sha256(pretrained_path(root, spatial_dims, variant)) if from_shipped else None
    torch.manual_seed(seed)
    start = time.perf_counter()
    record = train_run(overrides, minutes, max_steps)
    wall = time.perf_counter() - start
    return ship(root, weights_file(spatial_dims, variant), out / "models", record, wall, seed, started_from)


def ship(
    root: Path, relative: str, models: Path, record: dict, wall: float, seed: int, started_from: Optional[str]
) -> str:
    """Copy a training run's model into the bundle (atomically) and record it in the manifest: the sha256, the
    command that made it and how to reproduce it, the seed, steps, epochs and wall time; the file's path.

    Args:
        root: the bundle folder.
        relative: the file's path in the bundle (``models/pretrained_<N>d_<variant>.pt``).
        models: the run's checkpoint folder: its best model (``model.pt``), or the last state (``model_final.pt``)
            when no validation ran.
        record: the run's :func:`custom.runner.train_run` record.
        wall: the run's seconds.
        seed: the run's seed.
        started_from: the sha256 of the weights it was fine-tuned from, if any.
    """
    target, best = root / relative, models / "model.pt"
    with atomic_path(target, suffix=".pt") as tmp:
        shutil.copyfile(best if best.is_file() else models / "model_final.pt", tmp)
    entry = {
        "path": relative,
        "url": "",
        "hash_val": sha256(target),
        "hash_type": "sha256",
        "command": _command(),
        "reproduce": f"{_command()} --max_steps {record['iterations']} --minutes 1000",
        "seed": seed,
        "steps": record["iterations"],
        "epochs": record["epochs"],
        "wall_time_s": round(wall, 1),
        **({"started_from": started_from} if started_from else {}),
        "data": "synthetic pairs only (custom.data.synth, with the synthetic demo label maps)",
    }
    entries = [e for e in read_manifest(root) if e.get("path") != relative] + [entry]
    entries.sort(key=lambda e: e["path"])
    atomic_write_text(root / MANIFEST, yaml.safe_dump({"large_files": entries}, sort_keys=False))
    print(f"wrote {target} ({target.stat().st_size / 1024:.0f} KB, {record['iterations']} steps, {wall:.0f} s)")
    return str(target)
