"""Register a user's own NIfTI pairs: the dataset the inference config loads and the writer of its outputs.

Outputs per pair, named after the moving file (``<subject>_aligned_norm`` for neurite-OASIS names):
``<name>_warped.nii.gz`` (the moving image in its own intensity
scale, warped), ``<name>_ddf.nii.gz`` (the displacement field in voxels, the vector last), and with a moving
label ``<name>_warped_label.nii.gz`` (nearest neighbour). Each carries the fixed image's affine and header and
is written to a temporary name and renamed.
"""

import csv
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events

from custom.data.oasis import IMAGE_FILES
from custom.io import atomic_path
from custom.networks import check_spatial_dims
from custom.workflow import decollated
from custom.warp import SpatialTransformer

__all__ = ["RegistrationPairs", "RegistrationWriter", "list_pairs", "run_or_exit"]

NIFTI = (".nii.gz", ".nii")


def _stem(path: str) -> str:
    """Output name of a moving file: its name without extension, prefixed by its folder (the subject) for the
    neurite-OASIS file names, which every subject shares."""
    name = Path(path).name
    for ext in NIFTI:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return f"{Path(path).parent.name}_{name}" if name in IMAGE_FILES else name


def list_pairs(
    moving: Optional[str] = None,
    fixed: Optional[str] = None,
    moving_label: Optional[str] = None,
    pairs: Optional[str] = None,
) -> List[Dict[str, str]]:
    """The pairs to register, from one of three forms.

    - ``moving`` and ``fixed`` files (and optionally ``moving_label``): one pair;
    - ``moving`` a folder and ``fixed`` a file: every NIfTI in the folder to that fixed image;
    - ``pairs`` a CSV file with columns ``moving,fixed[,moving_label]`` (paths relative to the CSV).

    Raises:
        ValueError: when neither or both forms are given, or the CSV lacks the columns.
        FileNotFoundError: for a missing file or folder.
    """
    if pairs:
        table = Path(pairs)
        if not table.is_file():
            raise FileNotFoundError(f"pairs CSV {pairs!r} does not exist.")
        with table.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"moving", "fixed"} <= set(rows[0]):
            raise ValueError(f"pairs CSV {pairs!r} needs a header with columns moving,fixed[,moving_label].")
        out = []
        for r in rows:
            item = {k: str((table.parent / r[k]).resolve()) for k in ("moving", "fixed", "moving_label") if r.get(k)}
            out.append(item)
    elif moving and fixed:
        if Path(moving).is_dir():
            files = sorted(str(p) for p in Path(moving).iterdir() if p.name.endswith(NIFTI))
            if not files:
                raise FileNotFoundError(f"moving folder {moving!r} holds no .nii/.nii.gz files.")
            out = [{"moving": m, "fixed": fixed} for m in files]
        else:
            out = [{"moving": moving, "fixed": fixed, **({"moving_label": moving_label} if moving_label else {})}]
    else:
        raise ValueError("give --moving and --fixed (files, or a folder of moving images), or --pairs pairs.csv.")
    for item in out:
        for key, path in item.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"{key} file {path!r} does not exist.")
    return out


def _spatial(shape, spatial_dims: int, path: str, key: str):
    """The model-space shape of a file's array: trailing singleton axes dropped down to ``spatial_dims``."""
    shape = list(shape)
    while len(shape) > spatial_dims and shape[-1] == 1:
        shape.pop()
    if len(shape) != spatial_dims:
        raise ValueError(
            f"{key} {path!r} has shape {list(shape)}, but the model registers {spatial_dims}-D images "
            f"(set spatial_dims to {len(shape)} with a matching checkpoint, or give {spatial_dims}-D images)."
        )
    return shape


class RegistrationPairs(torch.utils.data.Dataset):
    """NIfTI pairs for inference: each item has ``moving`` and ``fixed`` ``(1, *S)`` scaled to [0, 1], the raw
    moving intensities ``moving_raw``, optional ``moving_label``, and the file paths.

    Construction does no I/O (errors surface when the run starts); :meth:`validate` checks every file's
    header: existence, dimensionality against ``spatial_dims``, equal moving/fixed/label shapes.

    Args:
        pairs: a callable returning the pairs (e.g. ``lambda: list_pairs(...)``), called on first use.
        spatial_dims: the model's.
    """

    def __init__(self, pairs: Callable[[], List[Dict[str, str]]], spatial_dims: int) -> None:
        self._pairs_fn = pairs
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self._pairs: Optional[List[Dict[str, str]]] = None

    @property
    def pairs(self) -> List[Dict[str, str]]:
        if self._pairs is None:
            self._pairs = self._pairs_fn()
        return self._pairs

    def validate(self) -> None:
        """Check every pair from the headers alone; raises ``ValueError`` / ``FileNotFoundError``."""
        for item in self.pairs:
            shapes = {}
            for key, path in item.items():
                try:
                    header_shape = nib.load(path).shape
                except Exception as error:
                    raise ValueError(f"cannot read {key} {path!r} as NIfTI: {error}") from None
                shapes[key] = _spatial(header_shape, self.spatial_dims, path, key)
            for key, shape in shapes.items():
                if shape != shapes["fixed"]:
                    raise ValueError(
                        f"{key} {item[key]!r} has shape {shape} but fixed {item['fixed']!r} has shape "
                        f"{shapes['fixed']}; resample them to one grid first."
                    )

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, path: str, dtype) -> torch.Tensor:
        data = np.asarray(nib.load(path).dataobj, dtype=dtype)
        data = data.reshape(_spatial(data.shape, self.spatial_dims, path, "image"))
        if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
            raise ValueError(f"{path!r} contains NaN or infinite intensities.")
        return torch.from_numpy(np.ascontiguousarray(data))[None]

    @staticmethod
    def _scale(x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)

    def __getitem__(self, i: int) -> dict:
        item = self.pairs[i]
        moving = self._load(item["moving"], np.float32)
        out = {
            "moving": self._scale(moving),
            "fixed": self._scale(self._load(item["fixed"], np.float32)),
            "moving_raw": moving,
            "moving_path": item["moving"],
            "fixed_path": item["fixed"],
        }
        if "moving_label" in item:
            out["moving_label"] = self._load(item["moving_label"], np.int32)
        return out


class RegistrationWriter:
    """Evaluator handler writing the warped image, the field and the warped label of each pair (see module doc).

    Args:
        output_dir: output folder (created).
    """

    def __init__(self, output_dir: Union[str, Path]) -> None:
        self.output_dir = Path(output_dir)
        self.warp = SpatialTransformer("bilinear")
        self.warp_labels = SpatialTransformer("nearest")
        self.written: List[str] = []

    def attach(self, engine: Engine) -> None:
        """Attach to an Ignite engine."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _save(self, array: np.ndarray, reference: nib.Nifti1Image, path: Path, dtype) -> None:
        header = reference.header.copy()
        header.set_data_dtype(dtype)
        image = nib.Nifti1Image(array.astype(dtype), reference.affine, header)
        with atomic_path(path, suffix=".nii.gz") as tmp:
            nib.save(image, str(tmp))
        self.written.append(str(path))

    def __call__(self, engine: Engine) -> None:
        items, outputs = decollated(engine)
        for item, output in zip(items, outputs):
            ddf = torch.as_tensor(output["pred"]).float()[None].cpu()
            fixed = nib.load(item["fixed_path"])
            shape = tuple(fixed.shape)
            name = _stem(item["moving_path"])
            with torch.no_grad():
                warped = self.warp(torch.as_tensor(item["moving_raw"])[None].float(), ddf)[0, 0]
                vector = ddf[0].movedim(0, -1)
                warped_label = None
                if "moving_label" in item:
                    warped_label = self.warp_labels(torch.as_tensor(item["moving_label"])[None], ddf)[0, 0]
            self._save(warped.numpy().reshape(shape), fixed, self.output_dir / f"{name}_warped.nii.gz", np.float32)
            self._save(
                vector.numpy().reshape(shape + (ddf.shape[1],)),
                fixed,
                self.output_dir / f"{name}_ddf.nii.gz",
                np.float32,
            )
            if warped_label is not None:
                self._save(
                    warped_label.numpy().reshape(shape),
                    fixed,
                    self.output_dir / f"{name}_warped_label.nii.gz",
                    np.int32,
                )


def run_or_exit(evaluator: Union[Engine, Callable[[], Engine]]) -> None:
    """Build (when given a factory) and run the evaluator, turning input errors into one line on stderr and
    exit code 2.

    Nothing is written before every pair has passed :meth:`RegistrationPairs.validate`. The inference config
    passes a factory (``"_mode_": "callable"``) so that the pair listing, which the evaluator's constructor
    triggers, is inside this guard too.
    """
    try:
        engine = evaluator if isinstance(evaluator, Engine) else evaluator()
        dataset = engine.data_loader.dataset
        if hasattr(dataset, "validate"):
            dataset.validate()
        engine.run()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
