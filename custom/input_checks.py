"""The checks of the files a user gives ``register``, before any work: readable NIfTI, one dimensionality, grids
large enough and (without the affine stage) shared or overlapping, geometry ITK can hold, finite values, images that
are images (not label maps, not nearly empty), and memory enough (:func:`check_pair`). Each refusal is a
``ValueError`` naming the file and the cause.
"""

import itertools
import os
from typing import Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np

from custom.data.transforms import drop_trailing_axes
from custom.interop import check_itk_affine

__all__ = ["MAX_LABELS", "MIN_SIZE", "check_pair", "dims_of", "estimate_memory_gib", "label_count", "looks_like_labels"]

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


def dims_of(shape) -> int:
    """2 for a single slice (at most two axes longer than 1), else the number of axes."""
    return len(drop_trailing_axes(shape, 2))


def _spatial(shape, spatial_dims: int, path: str, key: str) -> List[int]:
    """The model-space shape of a file's array: trailing singleton axes dropped down to ``spatial_dims``."""
    shape = drop_trailing_axes(shape, spatial_dims)
    if len(shape) > 3:
        raise ValueError(f"{key} {path!r} has shape {shape}: a {len(shape)}-D image; give one 2D or 3D image per file.")
    if len(shape) != spatial_dims or (spatial_dims == 3 and 1 in shape):
        dims = dims_of(shape)
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


def _world_box(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """The world-coordinate bounding box ``(2, 3)`` (min, max) of a grid's voxels (their outer faces)."""
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in list(shape[:3]) + [1] * (3 - len(shape))])))
    world = corners @ np.asarray(affine, dtype=np.float64)[:3, :3].T + np.asarray(affine, dtype=np.float64)[:3, 3]
    return np.stack([world.min(axis=0), world.max(axis=0)])


def _same_geometry(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=0, atol=1e-3))


def check_pair(
    item: Dict[str, str],
    spatial_dims: int,
    resample: bool = False,
    affine: bool = False,
    itk_geometry: bool = False,
    max_memory_gb: Optional[float] = None,
) -> None:
    """Check every file of a pair (``moving``, ``fixed``, optional ``moving_label`` paths).

    Args:
        item: the pair.
        spatial_dims: the model's.
        resample, affine, itk_geometry, max_memory_gb: as :class:`custom.inference.RegistrationPairs`: without
            ``resample`` or ``affine`` the moving files must be on the fixed grid; without ``affine`` they must at
            least overlap it in the world.

    Raises:
        ValueError: naming the file and what is wrong.
    """
    images = {key: _read(path, key) for key, path in item.items()}
    fixed = images["fixed"]
    found = {key: dims_of(images[key].shape) for key in ("moving", "fixed")}
    if found["moving"] != found["fixed"] and max(found.values()) <= 3:  # a 4-D file is reported by _spatial
        raise ValueError(
            f"moving {item['moving']!r} is a {found['moving']}-D image but fixed "
            f"{item['fixed']!r} is {found['fixed']}-D; give a moving and a fixed image of one "
            "dimensionality (both single slices, or both volumes)."
        )
    shapes = {key: _spatial(img.shape, spatial_dims, item[key], key) for key, img in images.items()}
    for key in ("moving", "fixed"):
        if min(shapes[key]) < MIN_SIZE:
            raise ValueError(
                f"{key} {item[key]!r} has a {'x'.join(map(str, shapes[key]))} grid: too small to register (at "
                f"least {MIN_SIZE} voxels along each of its {spatial_dims} axes)."
            )
    _check_memory(shapes["fixed"], item["fixed"], max_memory_gb)
    if itk_geometry:
        check_itk_affine(fixed.affine, f"fixed {item['fixed']!r}", planar=len(fixed.shape) == 2)
    for key, img in images.items():
        same = shapes[key] == shapes["fixed"] and _same_geometry(img.affine, fixed.affine)
        if key != "fixed" and not same and not resample and not affine:
            raise ValueError(
                f"{key} {item[key]!r} (shape {shapes[key]}, affine {np.round(img.affine, 3).tolist()}) is not "
                f"on the grid of fixed {item['fixed']!r} (shape {shapes['fixed']}, affine "
                f"{np.round(fixed.affine, 3).tolist()}); pass --resample True to resample it onto the "
                "fixed grid, or resample it yourself."
            )
        if key == "moving" and not same and not affine:
            _check_overlap(img, fixed, item)
    if "moving_label" in images and not _same_geometry(images["moving_label"].affine, images["moving"].affine):
        raise ValueError(
            f"moving_label {item['moving_label']!r} and moving {item['moving']!r} have different affines; "
            "a label map must share its image's grid."
        )
    for key in images:
        _check_values(_data(images[key], item[key], key), item[key], key)


def _check_overlap(moving: nib.Nifti1Image, fixed: nib.Nifti1Image, item: Dict[str, str]) -> None:
    """Resampling by world coordinates (no affine stage) needs grids that overlap in the world."""
    boxes = [_world_box(img.shape, img.affine) for img in (moving, fixed)]
    if (np.minimum(boxes[0][1], boxes[1][1]) <= np.maximum(boxes[0][0], boxes[1][0])).any():
        spans = [" x ".join(f"[{lo:.1f}, {hi:.1f}]" for lo, hi in box.T) for box in boxes]
        raise ValueError(
            f"moving {item['moving']!r} (world mm {spans[0]}) and fixed {item['fixed']!r} (world mm {spans[1]}) "
            "do not overlap at all, so resampling by world coordinates leaves nothing to register; drop "
            "--affine False (the affine stage aligns their centres first)."
        )


def _check_values(data: np.ndarray, path: str, key: str) -> None:
    """Finite values; integer ids in a label map; an image neither constant, nor nearly empty, nor a label map."""
    if not np.isfinite(data).all():
        raise ValueError(f"{key} {path!r} contains NaN or infinite values.")
    if key == "moving_label":
        fractional = data[data != np.round(data)]
        if fractional.size:
            raise ValueError(
                f"moving_label {path!r} has non-integer values (e.g. {fractional.flat[0]:g}): a label map holds "
                "integer label ids; round or convert it yourself if it is one."
            )
        return
    if data.min() == data.max():
        raise ValueError(f"{key} {path!r} is constant (every voxel {data.flat[0]:g}): nothing to register.")
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


def _check_memory(shape: List[int], path: str, max_memory_gb: Optional[float]) -> None:
    """The estimated peak memory of the pair (:func:`estimate_memory_gib`) within ``max_memory_gb`` (default the
    memory available)."""
    need = estimate_memory_gib(shape)
    limit = max_memory_gb or _available_gib()
    if max_memory_gb is not None and max_memory_gb < BASE_GIB:
        raise ValueError(
            f"max_memory_gb {max_memory_gb:g} is below the {BASE_GIB} GiB that any registration needs "
            f"(Python, torch and MONAI); give at least {estimate_memory_gib(shape):.1f} for this "
            f"{'x'.join(map(str, shape))} grid, or leave it unset (the memory available)."
        )
    if need > limit:
        fits = int((limit - BASE_GIB) * 2**30 / BYTES_PER_VOXEL) if limit > BASE_GIB else 0
        raise ValueError(
            f"fixed {path!r} has a {'x'.join(map(str, shape))} grid: registering it needs about {need:.1f} GiB, "
            f"more than the {limit:.1f} GiB {'allowed (max_memory_gb)' if max_memory_gb else 'available'}; "
            f"{limit:.1f} GiB fits grids of up to {fits / 1e6:.1f} million voxels: crop or downsample the images."
        )
