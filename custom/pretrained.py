"""Pretrained weights shipped with the bundle: trained only on synthetic pairs (:mod:`custom.data.synth`), so a
fresh checkout registers a pair with no training and nothing derived from real scans is distributed.

Each file ``bundle/models/pretrained_<N>d_<variant>.pt`` is listed in ``bundle/large_files.yml`` (the model
zoo's manifest: path, sha256 hash, plus the exact command, seed, steps and wall time that produced it) and is
checked against that hash before use; loading also checks the ``arch`` buffer (dimensionality, variant,
integration steps). ``python -m custom pretrain`` (:mod:`custom.pretrain`) reproduces a file and its manifest entry.
"""

import hashlib
from pathlib import Path
from typing import List, Union

import torch
import yaml

from custom.spatial import check_spatial_dims

__all__ = [
    "MANIFEST",
    "load_pretrained",
    "pretrained_path",
    "read_manifest",
    "sha256",
    "trained_subjects",
    "weights_file",
]

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


def trained_subjects(bundle_root: PathLike, spatial_dims: int, variant: str) -> List[str]:
    """The real subjects the shipped weights of ``spatial_dims`` and ``variant`` were trained on (their manifest
    entry's ``trained_on``; ``[]`` for weights trained on synthetic data only)."""
    relative = weights_file(spatial_dims, variant)
    entry = next((e for e in read_manifest(bundle_root) if e.get("path") == relative), {})
    return list(entry.get("trained_on", []))


def weights_file(spatial_dims: int, variant: str) -> str:
    """The shipped weights' path relative to the bundle: ``models/pretrained_<N>d_<variant>.pt``."""
    return f"models/pretrained_{check_spatial_dims(spatial_dims)}d_{variant}.pt"


def pretrained_path(bundle_root: PathLike, spatial_dims: int, variant: str = "both") -> str:
    """The shipped pretrained model for ``spatial_dims`` and ``variant``, after checking its sha256 against
    the manifest.

    Raises:
        FileNotFoundError: when no such model is shipped (or its file is missing).
        ValueError: when the file's hash differs from the manifest's (a corrupt or replaced file).
    """
    relative = weights_file(spatial_dims, variant)
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
