"""``python -m custom pretrain``: train the shipped pretrained weights (:mod:`custom.pretrained`) and record each
file in the manifest (``bundle/large_files.yml``) with its sha256, data (the subjects trained on and held out), exact
command, steps, hours, held-out score and learning curve.

Two kinds of training: synthetic pairs only (the default), or real inter-subject pairs of a neurite-OASIS-style
folder (``--real True``) with synthetic pairs mixed in, augmentation, an optional label Dice loss and validation by
Dice on held-out subjects."""

import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
import yaml

from custom.atomic import atomic_path, atomic_write_text
from custom.data.oasis import find_subjects, split_subjects
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
    real: bool = False,
    val_subjects: Union[str, Sequence[str], None] = None,
    label_weight: float = 0.0,
    augment: bool = True,
    val_interval: int = 1,
) -> str:
    """Train for a wall-clock budget and ship the best model in the bundle: writes
    ``bundle/models/pretrained_<N>d_<variant>.pt`` and its manifest entry (sha256, data, command, seed, steps, hours,
    and on real data the held-out Dice and the learning curve).

    Args:
        spatial_dims: 2 or 3.
        variant: the network variant.
        minutes: wall-clock budget of the training (validation included).
        max_steps: stop after this many training iterations (to reproduce a shipped file: its ``steps``).
        seed: generator, initialisation, split and pair seed.
        shape: synthetic pair shape (default 160x192 in 2D, 96x112x128 in 3D); with ``real`` the frames' shape.
        synth_pairs: synthetic pairs per epoch (with ``real``: mixed in beside the real pairs; 0 for none).
        batch_size: training batch size.
        learning_rate: Adam learning rate.
        from_shipped: start from the shipped weights of ``spatial_dims`` and ``variant`` (fine-tuning, or continuing
            an earlier run: the manifest entry records their sha256 as ``started_from`` and adds up the hours and
            the learning curve) instead of a random initialisation.
        num_workers: data-loader processes preparing the pairs beside the training.
        dataset_dir: synthetic training: a dataset whose label maps are deformed half of the time (the synthetic demo
            data, generated at the default ``data/demo`` when missing); with ``real``: the neurite-OASIS-style
            folder of the real subjects (``aligned_norm`` with a label map; 2D trains on its slices along axis 2).
        output_dir: training logs and checkpoints.
        bundle_root: the bundle folder (default the one next to the package).
        real: train on real inter-subject pairs of ``dataset_dir`` instead of synthetic pairs only.
        val_subjects: with ``real``: the subjects held out for validation (by Dice of their label maps); default two
            drawn with ``seed``. They are never trained on.
        label_weight: with ``real``: weight of the Dice loss of the warped moving labels (VoxelMorph's
            semi-supervised training; labels are never an input of the network); 0 for unsupervised training.
        augment: with ``real``: flip, affine and gamma augmentation of the training pairs.
        val_interval: validate every this many epochs.

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
        "val_interval": val_interval,
        "seed": seed,
        "pretrained": bool(from_shipped),
        "bundle_root": str(root),
        "num_workers": num_workers,
        "output_dir": str(out / "train"),
        "ckpt_dir": str(out / "models"),
    }
    data = "synthetic pairs only (custom.data.synth, with the synthetic demo label maps)"
    if real:
        trains, vals, label = real_split(dataset_dir, val_subjects, seed)
        overrides.update(real_overrides(vals, synth_pairs, label_weight, augment))
        data = real_data_note(trains, vals, label, synth_pairs, label_weight, augment)
    started_from = sha256(pretrained_path(root, spatial_dims, variant)) if from_shipped else None
    torch.manual_seed(seed)
    start = time.perf_counter()
    record = train_run(overrides, minutes, max_steps, validate_ends=bool(real))
    wall = time.perf_counter() - start
    subjects = {"trained_on": trains, "held_out": vals} if real else None
    relative = weights_file(spatial_dims, variant)
    return ship(root, relative, out / "models", record, wall, seed, started_from, data, subjects)


def real_split(dataset_dir: str, val_subjects: Union[str, Sequence[str], None], seed: int):
    """``(training subjects, validation subjects, label file)`` of a real dataset's labelled subjects, by name; the
    label file is the finest all subjects have (``aligned_seg35`` in neurite-OASIS).

    Raises:
        ValueError: with fewer than 4 labelled subjects (two to train on, two to validate on), or unknown names.
    """
    from custom.runner import as_list

    subjects = find_subjects(dataset_dir, "aligned_norm", "auto")
    if len(subjects) < 4 or "label" not in subjects[0]:
        raise ValueError(
            f"--real True needs at least 4 subjects with aligned_norm and a label map in {dataset_dir!r} (2 to train "
            f"on, 2 held out), found {len(subjects)}{'' if not subjects or 'label' in subjects[0] else ' unlabelled'}."
        )
    named = as_list(val_subjects) if val_subjects is not None else None
    splits = split_subjects(subjects, 2, 0, seed, named, [] if named else None, minimum=2)
    trains, vals = ([s["subject"] for s in splits[k]] for k in ("train", "val"))
    if len(trains) < 2 or len(vals) < 2:
        raise ValueError(f"need 2 or more training and 2 or more validation subjects, got {trains} and {vals}.")
    return trains, vals, Path(subjects[0]["label"]).name.split(".")[0]


def real_overrides(vals: List[str], synth_pairs: int, label_weight: float, augment: bool) -> Dict[str, object]:
    """The ``train.json`` overrides of training on real inter-subject pairs, validated by Dice on ``vals``."""
    return {
        "pair_strategy": "inter_subject",
        "image": "aligned_norm",
        "label": "auto",
        "val_subjects": vals,
        "num_test": 0,
        "synth_mix": synth_pairs,
        "label_weight": label_weight,
        "augment": bool(augment),
        "val_metric": "dice",
    }


def real_data_note(
    trains: List[str], vals: List[str], label: str, synth_pairs: int, label_weight: float, augment: bool
) -> str:
    """The manifest's ``data`` of a real-pair training: what was trained on and what was held out."""
    labels = f"label Dice loss weight {label_weight} ({label})" if label_weight > 0 else "no labels"
    return "; ".join(
        [
            f"neurite-OASIS (OASIS-1, Marcus et al. 2007) subjects {', '.join(trains)}: inter-subject aligned_norm "
            "pairs (2D: their slices along axis 2)",
            labels,
            "augmented (flip, affine, gamma)" if augment else "not augmented",
            f"plus {synth_pairs} synthetic pairs per epoch" if synth_pairs else "no synthetic pairs",
            f"held out (validation Dice over the {label} labels): {', '.join(vals)}",
        ]
    )


def ship(
    root: Path,
    relative: str,
    models: Path,
    record: dict,
    wall: float,
    seed: int,
    started_from: Optional[str],
    data: str = "synthetic pairs only (custom.data.synth, with the synthetic demo label maps)",
    subjects: Optional[Dict[str, List[str]]] = None,
) -> str:
    """Copy a training run's model into the bundle (atomically) and record it in the manifest: the sha256, the
    command that made it and how to reproduce it, the seed, steps, epochs, wall time and hours (added up over the
    runs it continues), the data, and where the run validated by Dice the best held-out Dice and the learning curve;
    the file's path.

    Args:
        root: the bundle folder.
        relative: the file's path in the bundle (``models/pretrained_<N>d_<variant>.pt``).
        models: the run's checkpoint folder: its best model (``model.pt``), or the last state (``model_final.pt``)
            when no validation ran.
        record: the run's :func:`custom.runner.train_run` record.
        wall: the run's seconds.
        seed: the run's seed.
        started_from: the sha256 of the weights it was fine-tuned from, if any.
        data: what it was trained on.
        subjects: ``trained_on`` and ``held_out`` subject names of a real-data run: recorded as the entry's
            ``trained_on`` (with those of the run it continues) and ``held_out`` (those never trained on).
    """
    previous = next((e for e in read_manifest(root) if e.get("path") == relative), {})
    continued = bool(started_from) and previous.get("hash_val") == started_from
    hours = (previous.get("hours", previous.get("wall_time_s", 0.0) / 3600) if continued else 0.0) + wall / 3600
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
        "hours": round(hours, 4),
        **({"started_from": started_from} if started_from else {}),
        "data": data,
    }
    if subjects or (continued and "trained_on" in previous):
        trained = sorted(
            set(previous.get("trained_on", []) if continued else []) | set((subjects or {}).get("trained_on", []))
        )
        held = [s for s in (subjects or {}).get("held_out", previous.get("held_out", [])) if s not in trained]
        entry.update(trained_on=trained, held_out=held)
    dice = [(h, v["val_dice"]) for h, v in record.get("validation", []) if "val_dice" in v]
    if dice:
        before = previous.get("learning_curve", []) if continued and "learning_curve" in previous else []
        offset = hours - wall / 3600
        curve = before + [[round(offset + h, 4), round(d, 4)] for h, d in dice]
        entry.update(held_out_dice=round(max(d for _, d in dice), 4), learning_curve=curve)
    entries = [e for e in read_manifest(root) if e.get("path") != relative] + [entry]
    entries.sort(key=lambda e: e["path"])
    atomic_write_text(root / MANIFEST, yaml.safe_dump({"large_files": entries}, sort_keys=False))
    print(f"wrote {target} ({target.stat().st_size / 1024:.0f} KB, {record['iterations']} steps, {wall:.0f} s)")
    return str(target)
