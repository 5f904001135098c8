"""Pretrained weights shipped with the bundle: trained only on synthetic pairs (:mod:`custom.data.synth`), so a
fresh checkout registers a pair with no training and nothing derived from real scans is distributed.

Each file ``bundle/models/pretrained_<N>d_<variant>.pt`` is listed in ``bundle/large_files.yml`` (the model
zoo's manifest: path, sha256 hash, plus the exact command, seed, steps and wall time that produced it) and is
checked against that hash before use; loading also checks the ``arch`` buffer (dimensionality, variant,
integration steps). ``python -m custom pretrain`` reproduces a file and its manifest entry.
"""

import hashlib
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
import yaml

from custom.atomic import atomic_path, atomic_write_text
from custom.networks import VARIANTS
from custom.spatial import check_spatial_dims

__all__ = ["MANIFEST", "load_pretrained", "pretrain", "pretrained_path", "read_manifest", "sha256", "ship"]

MANIFEST = "large_files.yml"
PathLike = Union[str, Path]


def sha256(path: PathLike) -> str:
    """The hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle_root: PathLike) -> List[dict]:
    """The entries of ``<bundle_root>/large_files.yml`` (``[]`` when there is none)."""
    path = Path(bundle_root) / MANIFEST
    if not path.is_file():
        return []
    return list((yaml.safe_load(path.read_text()) or {}).get("large_files") or [])


def _relative(spatial_dims: int, variant: str) -> str:
    return f"models/pretrained_{check_spatial_dims(spatial_dims)}d_{variant}.pt"


def pretrained_path(bundle_root: PathLike, spatial_dims: int, variant: str = "both") -> str:
    """The shipped pretrained model for ``spatial_dims`` and ``variant``, after checking its sha256 against
    the manifest.

    Raises:
        FileNotFoundError: when no such model is shipped (or its file is missing).
        ValueError: when the file's hash differs from the manifest's (a corrupt or replaced file).
    """
    relative = _relative(spatial_dims, variant)
    entry = next((e for e in read_manifest(bundle_root) if e.get("path") == relative), None)
    path = Path(bundle_root) / relative
    if entry is None or not path.is_file():
        shipped = [e.get("path") for e in read_manifest(bundle_root)]
        where = str(Path(bundle_root).resolve())
        hint = "" if shipped else " (no large_files.yml there: run from the repository root or pass --bundle_root)"
        raise FileNotFoundError(
            f"no pretrained {spatial_dims}D {variant!r} model in the bundle root {where!r}{hint}; shipped: {shipped}; "
            "pass --model_path with your own weights."
        )
    actual = sha256(path)
    if actual != entry.get("hash_val"):
        raise ValueError(
            f"{str(path)!r} has sha256 {actual}, but {MANIFEST} lists {entry.get('hash_val')}: the file is corrupt "
            "or was replaced; restore it (git checkout) or pass --model_path."
        )
    return str(path)


def load_pretrained(network: torch.nn.Module, bundle_root: PathLike, spatial_dims: int, variant: str) -> str:
    """Load the shipped pretrained weights into ``network`` (for fine-tuning); returns their path.

    Raises:
        FileNotFoundError / ValueError: as :func:`pretrained_path`, or for a network of another architecture.
    """
    path = pretrained_path(bundle_root, spatial_dims, variant)
    target = getattr(network, "module", network)  # DistributedDataParallel
    device = next(target.parameters()).device
    target.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    return path


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
    return ship(root, _relative(spatial_dims, variant), out / "models", record, wall, seed, started_from)


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
