"""MONAI dictionary transforms for loading subjects, slicing volumes into 2D training frames and augmenting
training pairs."""

import math
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    CastToTyped,
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    ResampleToMatchd,
)

__all__ = [
    "CheckVolumed",
    "DropTrailingAxesd",
    "drop_trailing_axes",
    "StackSlicesd",
    "ScaleForegroundd",
    "load_transforms",
    "pair_augmentation",
    "pair_transforms",
    "foreground_slices",
    "scale_foreground",
]


def scale_foreground(image: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """Scale intensities to [0, 1]: the minimum to 0 and the ``percentile`` of the foreground (voxels above the
    minimum) to 1, clipped.

    Unlike min-max scaling, this barely depends on the field of view: on the neurite-OASIS T1 slices of one
    brain the maximum varies 2x from slice to slice while the foreground 99th percentile (white matter)
    varies by a few percent, so a slice is scaled alike whether it is cut from a volume or read from a file.

    Args:
        image: any shape, float.
        percentile: in ``(0, 100]``.

    Returns:
        The scaled image (float32); zeros for a constant image.
    """
    x = image.float()
    lo = x.min()
    foreground = x[x > lo]
    if foreground.numel() == 0:
        return torch.zeros_like(x)
    k = max(1, min(foreground.numel(), int(round(percentile / 100.0 * foreground.numel()))))
    hi = foreground.kthvalue(k).values
    del foreground
    return (x - lo).div_(hi - lo).clamp_(0.0, 1.0)  # one new tensor: volumes are large


class ScaleForegroundd(MapTransform):
    """Dictionary form of :func:`scale_foreground`: the one intensity normalisation of training, evaluation and
    inference, applied to each frame the network sees (each 2-D slice in 2D, each volume in 3D).

    Args:
        keys: image keys.
        percentile: foreground percentile mapped to 1.
        frames_first: the images are stacks of frames ``(N, C, ...)`` (see :class:`StackSlicesd`): scale each
            frame on its own.

    Raises:
        ValueError: for a percentile outside ``(0, 100]``.
    """

    def __init__(self, keys: KeysCollection, percentile: float = 99.0, frames_first: bool = False) -> None:
        super().__init__(keys)
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}.")
        self.percentile = float(percentile)
        self.frames_first = frames_first

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> Dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            frames = x.unbind(0) if self.frames_first else [x]
            scaled = [scale_foreground(f, self.percentile) for f in frames]
            d[key] = torch.stack(scaled) if self.frames_first else scaled[0]
        return d


class CheckVolumed(MapTransform):
    """Check loaded ``(C, H, W, D)`` images: finite values, the expected dimensionality, equal shapes.

    Args:
        keys: the image and label keys to check.
        spatial_dims: 3 requires true volumes (no spatial size of 1); 2 accepts volumes and single slices.

    Raises:
        ValueError: naming the file, for NaN/inf values, a 2-D file where a volume is needed, or a shape
            different from the first key's.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int) -> None:
        super().__init__(keys)
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> Dict[Hashable, torch.Tensor]:
        d = dict(data)
        reference: Optional[Tuple[Hashable, Tuple[int, ...]]] = None
        for key in self.key_iterator(d):
            img = d[key]
            name = _source(img, key)
            spatial = tuple(img.shape[1:])
            if len(spatial) != 3 or (self.spatial_dims == 3 and min(spatial) == 1):
                raise ValueError(
                    f"{name}: spatial_dims={self.spatial_dims} needs a 3-D volume"
                    f"{'' if self.spatial_dims == 3 else ' or a single slice'}, got spatial shape {list(spatial)}."
                )
            if img.is_floating_point() and not torch.isfinite(img).all():
                raise ValueError(f"{name}: contains NaN or infinite intensities.")
            if reference is None:
                reference = (key, spatial)
            elif spatial != reference[1]:
                raise ValueError(
                    f"{name}: shape {list(spatial)} differs from {reference[0]!s} shape {list(reference[1])}."
                )
        return d


def _source(img, key) -> str:
    meta = getattr(img, "meta", {}) or {}
    return str(meta.get("filename_or_obj", key))


def foreground_slices(volume: torch.Tensor, axis: int, min_fraction: float = 0.05) -> Tuple[int, int]:
    """The ``[start, stop)`` range of slices along ``axis`` whose foreground (``> 0``) covers at least
    ``min_fraction`` of the slice. Falls back to all slices for an empty volume.

    Args:
        volume: ``(C, H, W, D)``.
        axis: spatial axis, 0, 1 or 2.
        min_fraction: the smallest foreground fraction of a kept slice.
    """
    fg = (volume > 0).any(0).float()
    other = [a for a in range(3) if a != axis]
    frac = fg.mean(dim=other)
    idx = torch.nonzero(frac >= min_fraction).flatten()
    if idx.numel() == 0:
        return 0, int(volume.shape[1 + axis])
    return int(idx[0]), int(idx[-1]) + 1


class StackSlicesd(MapTransform):
    """Cut a subject's volumes into 2-D slices along one axis, stacked first: the subject's 2-D frames.

    Images and labels are cut alike (labels keep their integer dtype): ``(C, H, W, D)`` becomes ``(N, C, ., .)``,
    the slices ``first`` to ``first + N - 1``, contiguous so that one frame is one contiguous block (a
    memory-mapped disk cache reads only that block). ``"first"`` is set to the first slice index. Outputs are
    plain tensors (no metadata).

    Args:
        keys: image and label keys to slice.
        axis: spatial axis to slice along (0, 1 or 2; neurite-OASIS slices are along 2).
        index_range: ``(start, stop)`` slice indices; ``None`` takes the foreground slices of ``ref_key``
            (see :func:`foreground_slices`).
        ref_key: the image whose foreground picks the default range.
        min_fraction: foreground fraction for the default range.

    Raises:
        ValueError: for a bad axis or a range outside the volume.
    """

    def __init__(
        self,
        keys: KeysCollection,
        axis: int = 2,
        index_range: Optional[Sequence[int]] = None,
        ref_key: str = "image",
        min_fraction: float = 0.05,
    ) -> None:
        super().__init__(keys)
        if axis not in (0, 1, 2):
            raise ValueError(f"slice axis must be 0, 1 or 2, got {axis!r}.")
        if index_range is not None and (len(index_range) != 2 or index_range[0] >= index_range[1]):
            raise ValueError(f"slice index_range must be (start, stop) with start < stop, got {index_range!r}.")
        self.axis = axis
        self.index_range = None if index_range is None else (int(index_range[0]), int(index_range[1]))
        self.ref_key = ref_key
        self.min_fraction = min_fraction

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> Dict[Hashable, torch.Tensor]:
        d = dict(data)
        ref = d[self.ref_key]
        size = int(ref.shape[1 + self.axis])
        if size == 1:  # a single-slice file (e.g. slice_norm): its one slice
            start, stop = 0, 1
        elif self.index_range is None:
            start, stop = foreground_slices(ref, self.axis, self.min_fraction)
        else:
            start, stop = self.index_range
            if start < 0 or stop > size:
                raise ValueError(
                    f"{_source(ref, self.ref_key)}: slice range [{start}, {stop}) is outside the volume, "
                    f"which has {size} slices along axis {self.axis}."
                )
        for key in self.key_iterator(d):
            vol = torch.as_tensor(d[key]).as_subclass(torch.Tensor).narrow(1 + self.axis, start, stop - start)
            d[key] = vol.movedim(1 + self.axis, 0).contiguous()
        d["first"] = start
        return d


def load_transforms(
    image_keys: Sequence[str],
    label_key: Optional[str],
    spatial_dims: int,
    slice_axis: int = 2,
    slice_range: Optional[Sequence[int]] = None,
    scale_intensity: bool = True,
) -> Compose:
    """The deterministic loading chain of one subject (cached by MONAI's ``CacheDataset`` / ``PersistentDataset``).

    ``LoadImaged`` -> ``EnsureChannelFirstd`` -> :class:`CheckVolumed` -> plain tensors, then
    :class:`StackSlicesd` for ``spatial_dims=2`` (each key becomes ``(N, C, H, W)``, ``"first"`` the first slice
    index), then :class:`ScaleForegroundd` on each frame (slice or volume), the same normalisation as
    inference's (:class:`custom.inference.RegistrationPairs`).

    Args:
        image_keys: keys of intensity images (e.g. ``["image"]`` or ``["image", "orig"]``).
        label_key: key of the label map, or ``None``.
        spatial_dims: 2 (slices) or 3 (volumes).
        slice_axis: axis to slice along in 2D.
        slice_range: ``(start, stop)`` slice indices in 2D; default the foreground slices.
        scale_intensity: normalise the images with :class:`ScaleForegroundd`.
    """
    image_keys = list(image_keys)
    all_keys = image_keys + ([label_key] if label_key else [])
    chain = _reading(image_keys, label_key) + [CheckVolumed(all_keys, spatial_dims)]
    if spatial_dims == 2:
        chain.append(StackSlicesd(all_keys, slice_axis, slice_range, ref_key=image_keys[0]))
    else:
        chain.append(EnsureTyped(all_keys, track_meta=False))
    if scale_intensity:
        chain.append(ScaleForegroundd(image_keys, frames_first=spatial_dims == 2))
    return Compose(chain)


def _reading(image_keys: Sequence[str], label_key: Optional[str]) -> list:
    """The one way a NIfTI file is read, in training and inference: ``LoadImaged`` (nibabel; images as float32,
    labels as int32) and ``EnsureChannelFirstd``."""
    chain = [LoadImaged(list(image_keys), reader="NibabelReader", dtype=np.float32, image_only=True)]
    if label_key:
        chain.append(LoadImaged(label_key, reader="NibabelReader", dtype=np.int32, image_only=True))
    keys = list(image_keys) + ([label_key] if label_key else [])
    return chain + [EnsureChannelFirstd(keys, channel_dim="no_channel")]


def drop_trailing_axes(shape: Sequence[int], axes: int) -> List[int]:
    """``shape`` with trailing sizes of 1 dropped while it has more than ``axes`` entries: ``(160, 192, 1)`` ->
    ``[160, 192]`` for ``axes=2``; a slice stored as a volume and a true 2-D image look alike."""
    shape = list(shape)
    while len(shape) > axes and shape[-1] == 1:
        shape.pop()
    return shape


class DropTrailingAxesd(MapTransform):
    """Channel-first images ``(C, *S)`` with trailing spatial axes of size 1 dropped down to ``spatial_dims`` axes:
    a single slice stored as ``(H, W, 1)`` becomes ``(C, H, W)`` for a 2-D model; other shapes pass unchanged.

    Args:
        keys: the images to reshape.
        spatial_dims: 2 or 3.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int) -> None:
        super().__init__(keys)
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> Dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key].reshape(drop_trailing_axes(d[key].shape, self.spatial_dims + 1))
        return d


def pair_transforms(spatial_dims: int, label: bool, resample: bool) -> Compose:
    """Loading one of a user's pairs (keys ``moving``, ``fixed`` and optionally ``moving_label``: file paths) for
    inference, read as training reads its subjects.

    The reading of :func:`load_transforms`; with ``resample``, MONAI's ``ResampleToMatchd`` of the moving image
    (bilinear) and label (nearest) onto the fixed grid; :class:`DropTrailingAxesd`; the raw moving intensities
    copied to ``moving_raw``; :class:`ScaleForegroundd` on ``moving`` and ``fixed``; plain tensors ``(1, *S)``.

    Args:
        spatial_dims: the model's.
        label: the pair has a ``moving_label``.
        resample: resample onto the fixed grid (when the grids are equal this changes nothing).
    """
    keys = ["moving", "fixed"] + (["moving_label"] if label else [])
    chain = _reading(["moving", "fixed"], "moving_label" if label else None)
    if resample:
        moved, modes = ["moving"] + keys[2:], ["bilinear"] + ["nearest"] * len(keys[2:])
        chain.append(ResampleToMatchd(moved, "fixed", mode=modes, padding_mode="zeros"))
    chain += [DropTrailingAxesd(keys, spatial_dims), EnsureTyped(keys, track_meta=False)]
    if label:
        chain.append(CastToTyped("moving_label", dtype=torch.int32))
    chain += [CopyItemsd("moving", names="moving_raw"), ScaleForegroundd(["moving", "fixed"])]
    return Compose(chain)


PAIR_KEYS = ("moving", "fixed", "moving_label", "fixed_label")


def pair_augmentation(spatial_dims: int, flip_axis: Optional[int] = 0) -> Compose:
    """Training augmentation of a pair (MONAI transforms; the label maps follow their images when present):

    - a left-right flip of both images together (half of the pairs), which anatomy allows; ``flip_axis`` 0 is
      left-right in neurite-OASIS's aligned space and in its slices along axis 2; ``None``: no flip;
    - a small random affine of the moving image (rotations up to 5 degrees, scaling up to 5%, shifts up to 4
      voxels; 80% of the pairs), the residual misalignment an affine stage leaves;
    - a random gamma of each image on its own (half of the pairs each), as scanners differ.

    Args:
        spatial_dims: 2 or 3.
        flip_axis: the spatial axis flipped, or ``None``.

    Returns:
        A ``Compose`` of dictionary transforms on :data:`PAIR_KEYS` ``(1, *S)`` tensors, returning plain tensors.
    """
    angles = 1 if spatial_dims == 2 else 3
    steps = [] if flip_axis is None else [RandFlipd(PAIR_KEYS, 0.5, flip_axis, allow_missing_keys=True)]
    steps += [
        RandAffined(
            ("moving", "moving_label"),
            prob=0.8,
            rotate_range=(math.radians(5),) * angles,
            scale_range=(0.05,) * spatial_dims,
            translate_range=(4,) * spatial_dims,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
            allow_missing_keys=True,
        ),
        RandAdjustContrastd("moving", prob=0.5, gamma=(0.8, 1.25)),
        RandAdjustContrastd("fixed", prob=0.5, gamma=(0.8, 1.25)),
        EnsureTyped(PAIR_KEYS, track_meta=False, allow_missing_keys=True),
    ]
    return Compose(steps)
