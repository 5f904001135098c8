"""Register a user's own NIfTI pairs: listing them, the dataset the inference config loads, and their checks
(:mod:`custom.outputs` writes the results).

Outputs per pair, named ``<moving>__to__<fixed>`` after the two files (``<subject>_aligned_norm`` for the
neurite-OASIS names every subject shares; ``__<pair index>`` is appended when two pairs would share a name):
``<name>_warped.nii.gz`` (the moving image in its own intensity scale, warped), ``<name>_ddf.nii.gz`` (the
displacement field: ITK/ANTs layout by default, ``.mha`` for single slices, see :mod:`custom.interop`), with a
moving label ``<name>_warped_label.nii.gz`` (nearest neighbour) and optionally ``<name>_jacobian.nii.gz``. Each
carries the fixed image's affine; a pair's files are written to temporary names and renamed together;
``pairs_out.csv`` maps each input pair to its outputs.

Every input of every pair (existence, headers, dimensionality, shapes, geometry, values) is checked before the
first file is written.
"""

import csv
import os
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import nibabel as nib
import numpy as np
import torch
from nibabel.filebasedimages import ImageFileError

from custom.affine import align_affine, grid_coordinates, plane_affine, plane_frame, voxel_map, world_transform
from custom.data.oasis import IMAGE_FILES
from custom.data.transforms import drop_trailing_axes, pair_transforms
from custom.errors import as_bool
from custom.interop import check_itk_affine
from custom.spatial import check_spatial_dims
from custom.warp import sample_at

__all__ = ["RegistrationPairs", "estimate_memory_gib", "infer_spatial_dims", "list_pairs", "output_names"]

NIFTI = (".nii.gz", ".nii")
KEYS = ("moving", "fixed", "moving_label")
LABEL_NAME = re.compile(r"(?:^|[_.+-])(?:a?seg\d*|aparc|labels?|mask|parc)(?:$|[_.+-])", re.IGNORECASE)
"""File names of label maps (``slice_seg24``, ``seg35``, ``aparc+aseg``, ``mask``...), which a folder of moving
images skips; ``brainmask`` (a skull-stripped image) is not one."""
MAX_LABELS = 64
"""An integer-valued image with at most this many distinct values is taken for a label map, not an image."""
MIN_SIZE = 16
"""Images need at least this many voxels along each registered axis (the network's coarsest level and the LNCC
window of 9 need room)."""
MIN_FOREGROUND = (1e-3, 16)
"""Images whose voxels differ from their background (most common value) in less than this fraction of the voxels, or
in fewer than this many voxels, are refused: nothing to register."""
BASE_GIB = 0.6
BYTES_PER_VOXEL = 220
"""Peak resident memory of registering one pair: about ``BASE_GIB`` (Python, torch, MONAI) plus
``BYTES_PER_VOXEL`` per voxel of the fixed grid (measured for 3D pairs with the default refinement: 1.75 GiB for
160x192x224; the refinement's slabs bound the rest). With 8 GiB a pair of up to about 36 million voxels (e.g.
320x320x352) fits."""


def label_count(data: np.ndarray) -> Optional[int]:
    """The number of distinct values of an integer-valued array (``None`` when it has fractional values)."""
    if data.size == 0 or not np.array_equal(data, np.round(data)):
        return None
    low, high = float(data.min()), float(data.max())
    if high - low > 1e6:
        return int(np.unique(data).size)
    return int(np.count_nonzero(np.bincount((data.ravel() - low).astype(np.int64))))


def looks_like_labels(data: np.ndarray) -> bool:
    """Whether an array is a label map (integer values, at most :data:`MAX_LABELS` distinct ones)."""
    count = label_count(data)
    return count is not None and count <= MAX_LABELS


def _is_label_file(path: Path) -> bool:
    """A label map by its name (:data:`LABEL_NAME`, the release's label files) or, for integer-typed files, by its
    content (:func:`looks_like_labels`)."""
    if LABEL_NAME.search(path.name.split(".nii")[0]):
        return True
    try:
        image = nib.load(str(path))
        return np.issubdtype(image.get_data_dtype(), np.integer) and looks_like_labels(np.asarray(image.dataobj))
    except Exception:  # unreadable: reported with its name when the pairs are checked
        return False


def estimate_memory_gib(shape) -> float:
    """The estimated peak memory (GiB) of registering a pair on a grid of ``shape``."""
    return BASE_GIB + BYTES_PER_VOXEL * float(np.prod(shape)) / 2**30


def _available_gib() -> float:
    """Memory available to a new allocation (``MemAvailable``; the physical memory where it is not reported)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


def _stem(path: str) -> str:
    """A file's name without extension, prefixed by its folder (the subject) for the neurite-OASIS file names,
    which every subject shares."""
    name = Path(path).name
    for ext in NIFTI:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return f"{Path(path).parent.name}_{name}" if name in IMAGE_FILES else name


def output_names(pairs: List[Dict[str, str]]) -> List[str]:
    """Unique, predictable output names: ``<moving>__to__<fixed>``, with ``__<pair index>`` on collision."""
    names = [f"{_stem(p['moving'])}__to__{_stem(p['fixed'])}" for p in pairs]
    return [f"{n}__{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def list_pairs(
    moving: Optional[str] = None,
    fixed: Optional[str] = None,
    moving_label: Optional[str] = None,
    pairs: Optional[str] = None,
    dataset_dir: Union[str, Path] = ".",
    report: bool = True,
) -> List[Dict[str, str]]:
    """The pairs to register, from one of three forms; relative paths are taken from ``dataset_dir``.

    - ``moving`` and ``fixed`` files (and optionally ``moving_label``): one pair;
    - ``moving`` a folder and ``fixed`` a file: every NIfTI image in the folder to that fixed image (no labels;
      label maps, by name or content, are skipped and, with ``report``, named on stderr);
    - ``pairs`` a CSV file with columns ``moving,fixed[,moving_label]`` (paths relative to the CSV).

    Raises:
        ValueError: when neither or both forms are given, a label goes with a folder, or the CSV lacks columns
            or cells.
        FileNotFoundError: for a missing file or folder.
    """
    if pairs and (moving or fixed or moving_label):
        raise ValueError("give either --pairs pairs.csv or --moving/--fixed, not both.")
    moving, fixed, moving_label, pairs = (
        str(Path(dataset_dir, p)) if p else p for p in (moving, fixed, moving_label, pairs)
    )
    if pairs:
        table = Path(pairs)
        if not table.is_file():
            raise FileNotFoundError(f"pairs CSV {pairs!r} does not exist.")
        with table.open(newline="", encoding="utf-8-sig") as f:  # a byte-order mark is not part of the header
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
        if not {"moving", "fixed"} <= {h.strip() for h in header}:
            raise ValueError(
                f"pairs CSV {pairs!r} needs a header with columns moving,fixed[,moving_label], got {header[:4]}."
            )
        if not rows:
            raise ValueError(f"pairs CSV {pairs!r} has its header but no rows: no pairs to register.")
        out = []
        for line, r in enumerate(rows, start=2):
            empty = [k for k in ("moving", "fixed") if not (r.get(k) or "").strip()]
            if empty:
                raise ValueError(f"pairs CSV {pairs!r} line {line}: empty {' and '.join(empty)} cell.")
            pair = {k: str((table.parent / r[k].strip()).resolve()) for k in KEYS if (r.get(k) or "").strip()}
            if pair in out:
                raise ValueError(
                    f"pairs CSV {pairs!r} line {line} repeats line {out.index(pair) + 2}; list each pair once."
                )
            out.append(pair)
    elif moving and fixed:
        if Path(moving).is_dir():
            if moving_label:
                raise ValueError(
                    "--moving_label goes with one moving file, not a folder; give labels per pair with --pairs "
                    "pairs.csv (columns moving,fixed,moving_label)."
                )
            found = sorted(p for p in Path(moving).iterdir() if p.name.endswith(NIFTI) and p.is_file())
            skipped = [p.name for p in found if _is_label_file(p)]
            files = [str(p) for p in found if p.name not in skipped]
            if skipped and report:
                print(f"skipped {len(skipped)} label map(s) in {moving!r}: {', '.join(skipped)}", file=sys.stderr)
            if not files:
                raise FileNotFoundError(
                    f"moving folder {moving!r} holds no .nii/.nii.gz images"
                    + (f" (only label maps: {', '.join(skipped[:3])})." if skipped else ".")
                )
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


def _dims(shape) -> int:
    """2 for a single slice (at most two axes longer than 1), else the number of axes."""
    return len(drop_trailing_axes(shape, 2))


def infer_spatial_dims(
    moving: Optional[str] = None,
    fixed: Optional[str] = None,
    pairs: Optional[str] = None,
    dataset_dir: Union[str, Path] = ".",
) -> int:
    """2 when the (first) fixed image is a single slice, 3 when it is a volume; 2 when there is no readable input
    yet (the errors about missing inputs come from :func:`list_pairs`)."""
    try:
        first = list_pairs(moving, fixed, None, pairs, dataset_dir, report=False)[0]["fixed"]
        return 3 if _dims(nib.load(first).shape) >= 3 else 2
    except (ValueError, OSError, ImageFileError):  # reported with the file's name when the pairs are loaded
        return 2


def _spatial(shape, spatial_dims: int, path: str, key: str) -> List[int]:
    """The model-space shape of a file's array: trailing singleton axes dropped down to ``spatial_dims``."""
    shape = drop_trailing_axes(shape, spatial_dims)
    if len(shape) > 3:
        raise ValueError(f"{key} {path!r} has shape {shape}: a {len(shape)}-D image; give one 2D or 3D image per file.")
    if len(shape) != spatial_dims or (spatial_dims == 3 and 1 in shape):
        dims = _dims(shape)
        raise ValueError(
            f"{key} {path!r} has shape {list(shape)}, a {dims}-D image, but the model registers {spatial_dims}-D "
            f"images (set spatial_dims to {dims} with a matching checkpoint, or give {spatial_dims}-D images)."
        )
    return shape


def _read(path: str, key: str) -> nib.Nifti1Image:
    try:
        return nib.load(path)
    except Exception as error:
        raise ValueError(f"cannot read {key} {path!r} as NIfTI: {error}") from None


def _data(image: nib.Nifti1Image, path: str, key: str, dtype=np.float32) -> np.ndarray:
    try:
        return np.asarray(image.dataobj, dtype=dtype)
    except Exception as error:  # a truncated .nii.gz (EOFError), a corrupt stream (zlib.error), a short file
        raise ValueError(f"cannot read the data of {key} {path!r} (truncated or corrupt file?): {error!r}") from None


def _same_geometry(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=0, atol=1e-3))


class RegistrationPairs(torch.utils.data.Dataset):
    """NIfTI pairs for inference: each item has ``moving`` and ``fixed`` ``(1, *S)`` read and normalised exactly as
    in training (:func:`~custom.data.transforms.pair_transforms`), the raw moving intensities ``moving_raw``,
    optional ``moving_label``, the file paths and the output ``name``.

    Construction does no I/O (errors surface when the run starts); :meth:`validate` checks every input.

    Args:
        pairs: a callable returning the pairs (e.g. ``lambda: list_pairs(...)``), called on first use.
        spatial_dims: the model's.
        resample: resample the moving image (linear) and label (nearest) onto the fixed image's grid with MONAI's
            ``ResampleToMatch`` when their geometry differs; otherwise a difference is an error.
        itk_geometry: require fixed affines that ITK can hold (no shear), for ITK-format fields.
        affine: run the affine stage (:func:`custom.affine.align_affine`) first: the moving image may be on any grid
            (no ``resample`` needed); ``moving`` is then the normalised moving image resampled through the affine
            onto the fixed grid, while ``moving_raw`` and ``moving_label`` stay on the moving grid, and
            ``moving_map`` (fixed voxels -> moving voxels), ``affine`` (fixed world -> moving world, RAS) and
            ``affine_lncc`` (similarity by world coordinates, after the centres of mass, after the stage) are added.
            Without it ``moving_map`` is the identity.
        similarity: the affine stage's similarity (``"lncc"`` or ``"mse"``).
        max_memory_gb: refuse a pair whose estimated peak memory (:func:`estimate_memory_gib`) exceeds this;
            default the memory available now.
    """

    def __init__(
        self,
        pairs: Callable[[], List[Dict[str, str]]],
        spatial_dims: int,
        resample: bool = False,
        itk_geometry: bool = False,
        max_memory_gb: Optional[float] = None,
        affine: bool = False,
        similarity: str = "lncc",
    ) -> None:
        if max_memory_gb is not None and not (isinstance(max_memory_gb, (int, float)) and max_memory_gb > 0):
            raise ValueError(f"max_memory_gb must be a number > 0 or null, got {max_memory_gb!r}.")
        self.max_memory_gb = max_memory_gb
        self._pairs_fn = pairs
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.resample = as_bool("resample", resample)
        self.itk_geometry = as_bool("itk_geometry", itk_geometry)
        self.affine = as_bool("affine", affine)
        self.similarity = similarity
        self._pairs: Optional[List[Dict[str, str]]] = None
        resample = self.resample and not self.affine  # the affine stage resamples through its transform
        self._transforms = {label: pair_transforms(self.spatial_dims, label, resample) for label in (False, True)}

    @property
    def pairs(self) -> List[Dict[str, str]]:
        if self._pairs is None:
            self._pairs = self._pairs_fn()
        return self._pairs

    @property
    def names(self) -> List[str]:
        """The output name of each pair (:func:`output_names`)."""
        return output_names(self.pairs)

    def validate(self) -> None:
        """Check every input of every pair: readable NIfTI, dimensionality, equal grids (shape and affine) or
        ``resample``, an ITK-representable fixed affine when required, finite intensities.

        Raises:
            ValueError: naming the file and what is wrong.
        """
        for item in self.pairs:
            images = {key: _read(path, key) for key, path in item.items()}
            fixed = images["fixed"]
            dims = {key: _dims(images[key].shape) for key in ("moving", "fixed")}
            if dims["moving"] != dims["fixed"] and max(dims.values()) <= 3:  # a 4-D file is reported by _spatial
                raise ValueError(
                    f"moving {item['moving']!r} is a {dims['moving']}-D image but fixed "
                    f"{item['fixed']!r} is {dims['fixed']}-D; give a moving and a fixed image of one "
                    "dimensionality (both single slices, or both volumes)."
                )
            shapes = {key: _spatial(img.shape, self.spatial_dims, item[key], key) for key, img in images.items()}
            for key in ("moving", "fixed"):
                if min(shapes[key]) < MIN_SIZE:
                    raise ValueError(
                        f"{key} {item[key]!r} has a {'x'.join(map(str, shapes[key]))} grid: too small to register (at "
                        f"least {MIN_SIZE} voxels along each of its {self.spatial_dims} axes)."
                    )
            self._check_memory(shapes["fixed"], item["fixed"])
            if self.itk_geometry:
                check_itk_affine(fixed.affine, f"fixed {item['fixed']!r}")
            for key, img in images.items():
                same = shapes[key] == shapes["fixed"] and _same_geometry(img.affine, fixed.affine)
                if key != "fixed" and not same and not self.resample and not self.affine:
                    raise ValueError(
                        f"{key} {item[key]!r} (shape {shapes[key]}, affine {np.round(img.affine, 3).tolist()}) is not "
                        f"on the grid of fixed {item['fixed']!r} (shape {shapes['fixed']}, affine "
                        f"{np.round(fixed.affine, 3).tolist()}); pass --resample True to resample it onto the "
                        "fixed grid, or resample it yourself."
                    )
            if "moving_label" in images and not _same_geometry(images["moving_label"].affine, images["moving"].affine):
                raise ValueError(
                    f"moving_label {item['moving_label']!r} and moving {item['moving']!r} have different affines; "
                    "a label map must share its image's grid."
                )
            for key in images:
                self._check_values(_data(images[key], item[key], key), item[key], key)

    @staticmethod
    def _check_values(data: np.ndarray, path: str, key: str) -> None:
        if not np.isfinite(data).all():
            raise ValueError(f"{key} {path!r} contains NaN or infinite values.")
        if key == "moving_label":
            fractional = data[data != np.round(data)]
            if fractional.size:
                raise ValueError(
                    f"moving_label {path!r} has non-integer values (e.g. {fractional.flat[0]:g}): a label map holds "
                    "integer label ids; round or convert it yourself if it is one."
                )
        elif data.min() == data.max():
            raise ValueError(f"{key} {path!r} is constant (every voxel {data.flat[0]:g}): nothing to register.")
        else:
            values, counts = np.unique(data.ravel()[:: max(1, data.size // 1_000_000)], return_counts=True)
            foreground = 1.0 - counts.max() / counts.sum()
            if foreground < MIN_FOREGROUND[0] or foreground * data.size < MIN_FOREGROUND[1]:
                raise ValueError(
                    f"{key} {path!r} is nearly empty: {100 * foreground:.3f}% of its voxels "
                    f"({foreground * data.size:.0f}) differ from its background value {values[counts.argmax()]:g} (at "
                    f"least {100 * MIN_FOREGROUND[0]:g}% and {MIN_FOREGROUND[1]} voxels needed): nothing to register."
                )
            count = label_count(data)
            if count is not None and count <= MAX_LABELS:
                hint = "pass it as --moving_label" if key == "moving" else "give the fixed image, not its label map"
                raise ValueError(
                    f"{key} {path!r} looks like a label map ({count} distinct integer values), not an "
                    f"image: {hint} (label maps are warped by nearest neighbour, never registered as images)."
                )

    def _check_memory(self, shape: List[int], path: str) -> None:
        need = estimate_memory_gib(shape)
        limit = self.max_memory_gb or _available_gib()
        if self.max_memory_gb is not None and self.max_memory_gb < BASE_GIB:
            raise ValueError(
                f"max_memory_gb {self.max_memory_gb:g} is below the {BASE_GIB} GiB that any registration needs "
                f"(Python, torch and MONAI); give at least {estimate_memory_gib(shape):.1f} for this "
                f"{'x'.join(map(str, shape))} grid, or leave it unset (the memory available)."
            )
        if need > limit:
            fits = int((limit - BASE_GIB) * 2**30 / BYTES_PER_VOXEL) if limit > BASE_GIB else 0
            raise ValueError(
                f"fixed {path!r} has a {'x'.join(map(str, shape))} grid: registering it needs about {need:.1f} GiB, "
                f"more than the {limit:.1f} GiB {'allowed (max_memory_gb)' if self.max_memory_gb else 'available'}; "
                f"{limit:.1f} GiB fits grids of up to {fits / 1e6:.1f} million voxels: crop or downsample the images."
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        item = self.pairs[i]
        out = self._transforms["moving_label" in item](dict(item))
        out.update(moving_path=item["moving"], fixed_path=item["fixed"], label_path=item.get("moving_label", ""))
        out["moving_map"] = torch.eye(self.spatial_dims + 1, dtype=torch.float64)
        if self.affine:
            out.update(self._align(out, item))
        return {**out, "name": self.names[i]}

    def _align(self, out: dict, item: Dict[str, str]) -> dict:
        """The affine stage of one pair: its transform, the moving image resampled through it onto the fixed grid,
        the map from fixed to moving voxels and the similarities (see the class docstring)."""
        world = [nib.load(item[k]).affine for k in KEYS[:2]]
        frame = plane_frame(world[1]) if self.spatial_dims == 2 else None
        moving_affine, fixed_affine = (plane_affine(a, self.spatial_dims, frame) for a in world)
        moving, fixed = torch.as_tensor(out["moving"])[None].float(), torch.as_tensor(out["fixed"])[None].float()
        result = align_affine(moving, fixed, moving_affine, fixed_affine, self.similarity)
        matrix = torch.as_tensor(voxel_map(result.transform, moving_affine, fixed_affine))
        resampled = sample_at(moving, grid_coordinates(matrix, fixed.shape[2:]))[0]
        scores = torch.tensor([result.initial, result.centred, result.aligned], dtype=torch.float64)
        return {
            "moving": resampled,
            "moving_map": matrix,
            "affine": torch.as_tensor(world_transform(result.transform, frame)),
            "affine_lncc": scores,
        }
