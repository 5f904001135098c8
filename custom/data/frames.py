"""Subjects' frames, decoded by MONAI's loading chain and cached in memory, on disk or not at all.

A subject is decoded once by :func:`~custom.data.transforms.load_transforms` into its frames: the volume
``(C, H, W, D)`` in 3D, its slices stacked first ``(N, C, H, W)`` in 2D. Where they are kept is the ``cache``
option, each a MONAI dataset over the subjects:

- ``"memory"``: ``CacheDataset``: ``cache_rate`` of the subjects decoded at start-up and held in RAM (the rest
  decoded whenever used).
- ``"disk"``: ``PersistentDataset``: decoded once into ``cache_dir`` (shared by runs, processes and ranks; a
  subject's file name hashes its paths, their size and modification time, and the slicing), then read back
  memory-mapped, so a 2-D frame reads only its own slice from the page cache.
- ``"none"``: ``Dataset``: decoded whenever used (no memory or disk, the slowest; a 2-D frame decodes its volume).

Only a light index of the frames (subject, slice index, shape) is built up front, so pair strategies never need
frames in RAM. It is built by one pass over the subjects (``num_workers`` processes), which also checks every
file before training starts.
"""

import os
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset

from custom.data.transforms import load_transforms
from custom.errors import user_error

__all__ = ["CACHE_MODES", "MappedPersistentDataset", "SubjectFrames", "check_cache_options"]

CACHE_MODES = ("memory", "disk", "none")
CACHE_LAYOUT = "frames-v1"  # bump when the loading chain changes: older disk caches are then ignored


def check_cache_options(cache: str, cache_rate: float, cache_dir: Optional[Union[str, Path]]) -> None:
    """Validate the caching options.

    Raises:
        ValueError: an unknown ``cache`` mode, a ``cache_rate`` outside ``[0, 1]``, or ``"disk"`` without a
            ``cache_dir``.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}.")
    if not 0.0 <= float(cache_rate) <= 1.0:
        raise ValueError(f"cache_rate must be in [0, 1], got {cache_rate!r}.")
    if cache == "disk" and not cache_dir:
        raise ValueError("cache 'disk' needs a cache_dir (a folder for the decoded subjects), got none.")


class MappedPersistentDataset(PersistentDataset):
    """MONAI's ``PersistentDataset`` whose cache hits are memory-mapped (``torch.load(mmap=True,
    weights_only=True)``): reading one frame of a subject touches only that frame's pages. Misses and corrupt
    files are handled by ``PersistentDataset`` (computed, written to a temporary file and renamed)."""

    def _cachecheck(self, item_transformed):
        if self.cache_dir is not None:
            name = self.hash_func(item_transformed).decode("utf-8") + self.transform_hash
            hashfile = self.cache_dir / f"{name}.pt"
            if hashfile.is_file():
                try:
                    return torch.load(hashfile, mmap=True, weights_only=True)
                except (pickle.UnpicklingError, RuntimeError):
                    pass  # unreadable: PersistentDataset deletes and recomputes it
        return super()._cachecheck(item_transformed)


class _Summary(torch.utils.data.Dataset):
    """``(first slice, frame count, frame shape)`` of each subject, or the user error its files raise (returned,
    not raised, so that a DataLoader worker's error reaches the user as one clear message)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            d = self.dataset[i]
        except Exception as error:
            return _clear(error, self.dataset.data[i])
        image = d["image"]
        if "first" in d:
            return int(d["first"]), int(image.shape[0]), tuple(image.shape[1:])
        return -1, 1, tuple(image.shape)


class SubjectFrames:
    """The frames of a list of subjects, cached as asked, with a light index for pairing.

    Args:
        subjects: from :func:`~custom.data.oasis.find_subjects`: ``subject``, ``image`` and optional ``label`` /
            ``orig`` file paths.
        spatial_dims: 2 (slices) or 3 (volumes).
        cache: ``"memory"``, ``"disk"`` or ``"none"`` (see the module docstring).
        cache_rate: fraction of the subjects held in memory (``"memory"`` only).
        cache_dir: folder of the disk cache (``"disk"`` only; created when missing).
        num_workers: processes (threads for ``"memory"``) decoding the subjects at start-up.
        slice_axis: slicing axis in 2D.
        slice_range: ``(start, stop)`` slice indices in 2D; default the foreground slices.

    Attributes:
        units: one dict per frame: ``subject``, ``index`` (slice index, -1 for a volume) and ``item`` (the
            subject's position).
        keys: the frame keys (``image``, then ``orig`` and ``label`` when the subjects have them).

    Raises:
        ValueError: bad options, or an unreadable (corrupt, truncated) file or bad content, naming the file.
    """

    def __init__(
        self,
        subjects: Sequence[Dict[str, str]],
        spatial_dims: int,
        cache: str = "memory",
        cache_rate: float = 1.0,
        cache_dir: Optional[Union[str, Path]] = None,
        num_workers: int = 0,
        slice_axis: int = 2,
        slice_range: Optional[Sequence[int]] = None,
    ) -> None:
        check_cache_options(cache, cache_rate, cache_dir)
        self.spatial_dims = spatial_dims
        self.cache = cache
        image_keys = ["image"] + (["orig"] if subjects and "orig" in subjects[0] else [])
        label_key = "label" if subjects and "label" in subjects[0] else None
        self.keys: Tuple[str, ...] = tuple(image_keys + ([label_key] if label_key else []))
        transform = load_transforms(image_keys, label_key, spatial_dims, slice_axis, slice_range)
        span = None if slice_range is None else [int(i) for i in slice_range]
        layout = f"{CACHE_LAYOUT}:{spatial_dims}d:axis={slice_axis}:range={span}"
        data = [dict(s, layout=layout, stamp=_stamp(s, self.keys)) for s in subjects]
        if cache == "memory":
            try:
                self.dataset: Dataset = _cached(data, transform, cache_rate, num_workers)
            except Exception as error:
                raise _clear(error, data[0]) from None
        elif cache == "disk":
            self.dataset = MappedPersistentDataset(data, transform, cache_dir=cache_dir)
        else:
            self.dataset = Dataset(data, transform)
        self.units: List[dict] = []
        self.shapes: List[Tuple[int, ...]] = []
        for item, (first, count, shape) in enumerate(self._summaries(num_workers)):
            subject = data[item]["subject"]
            self.units += [
                {"subject": subject, "index": first + i if first >= 0 else -1, "item": item} for i in range(count)
            ]
            self.shapes.append(shape)

    def _summaries(self, num_workers: int) -> List[Tuple[int, int, tuple]]:
        summary = _Summary(self.dataset)
        if self.cache == "memory" or num_workers == 0 or len(summary) < 2:
            results = [summary[i] for i in range(len(summary))]
        else:
            loader = torch.utils.data.DataLoader(summary, batch_size=None, num_workers=num_workers)
            results = list(loader)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    def __len__(self) -> int:
        return len(self.units)

    def shape(self, i: int) -> Tuple[int, ...]:
        """The spatial shape ``(C, *S)`` of frame ``i`` (no decoding)."""
        return self.shapes[self.units[i]["item"]]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        """Frame ``i``: ``{key: (C, *S) tensor}`` for each of :attr:`keys` (images float32, labels int32)."""
        return self.read([i])[0]

    def read(self, indices: Sequence[int]) -> List[Dict[str, torch.Tensor]]:
        """Frames ``indices`` (as :meth:`__getitem__`), reading each subject once (e.g. the two slices of an
        ``intra_volume`` pair: one decoding with ``cache="none"``)."""
        subjects: Dict[int, dict] = {}
        frames = []
        for i in indices:
            unit = self.units[i]
            if unit["item"] not in subjects:
                subjects[unit["item"]] = self.dataset[unit["item"]]
            d = subjects[unit["item"]]
            if self.spatial_dims == 3:
                frames.append({k: d[k] for k in self.keys})
            else:  # a copy: not a view into the subject's stack or file
                frames.append({k: d[k][unit["index"] - int(d["first"])].clone() for k in self.keys})
        return frames


def _clear(error: Exception, subject: Dict[str, str]) -> BaseException:
    """The user error inside MONAI's wrapping (``RuntimeError: applying transform``), else a ``ValueError`` naming
    the subject's image (a corrupt or truncated file)."""
    cause = user_error(error)
    return (
        ValueError(f"could not read the subject's files ({subject['image']}, ...): {error}") if cause is None else cause
    )


def _cached(data: Sequence[dict], transform, cache_rate: float, num_workers: int) -> CacheDataset:
    # copy_cache=False: frames are read, never changed, and a deep copy per access would copy the subject
    return CacheDataset(
        data, transform, cache_rate=cache_rate, num_workers=max(1, num_workers), progress=False, copy_cache=False
    )


def _stamp(subject: Dict[str, str], keys: Sequence[str]) -> List[int]:
    """Size and modification time of the subject's files: a changed file gets a new disk-cache entry."""
    stamp = []
    for key in keys:
        try:
            st = os.stat(subject[key])
        except OSError:
            continue  # reported by the loading chain, naming the file
        stamp += [st.st_size, st.st_mtime_ns]
    return stamp
