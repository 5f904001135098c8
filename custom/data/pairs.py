"""Pair strategies: which frame is fixed and which is moving (the seed's static/moving allocation).

A *unit* is one frame of :class:`~custom.data.frames.SubjectFrames`: a 2-D slice (``index`` = slice index) or a
3-D volume (``index`` = -1) of a ``subject``; strategies only read these two fields, never the pixels. A
strategy turns units into ``(moving unit, fixed unit, moving key)`` triples:

- ``inter_subject``: fixed and moving from different subjects, same slice index (or whole volumes).
- ``atlas``: one fixed subject for all; moving from the rest, same slice index.
- ``intra_volume``: fixed = slice z, moving = slice z + offset of the same volume (2-D only).
- ``orig_to_norm``: the subject's ``aligned_orig`` (moving) to its ``aligned_norm`` (fixed).
- ``synthetic``: no frames: pairs generated on the fly from random label maps (:mod:`custom.data.synth`), plus
  the dataset's label maps when it has them.

Training on real pairs may mix in synthetic ones (:class:`MixedPairs`) and augment them
(:func:`custom.data.transforms.pair_augmentation`).
"""

import logging
import random
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from monai.data import partition_dataset
from monai.utils import convert_to_tensor

from custom.data.frames import SubjectFrames
from custom.data.oasis import find_subjects, split_subjects
from custom.data.synth import SyntheticPairs
from custom.data.transforms import PAIR_KEYS, pair_augmentation
from custom.spatial import check_spatial_dims

__all__ = [
    "PAIR_STRATEGIES",
    "MixedPairs",
    "PairDataset",
    "PairRedrawer",
    "PairResampler",
    "make_pairs",
    "build_pair_dataset",
]

PAIR_STRATEGIES = ("inter_subject", "atlas", "intra_volume", "orig_to_norm", "synthetic")
Pair = Tuple[int, int, str]
logger = logging.getLogger(__name__)


def make_pairs(
    units: Sequence[dict], strategy: str, rng: random.Random, offset: int = 1, atlas: Optional[str] = None
) -> List[Pair]:
    """Allocate fixed and moving frames.

    Args:
        units: frames with ``subject`` and ``index`` (see the module docstring).
        strategy: one of :data:`PAIR_STRATEGIES`.
        rng: draws the partner subject for ``inter_subject``.
        offset: slice distance for ``intra_volume``.
        atlas: the fixed subject for ``atlas`` (default: the first subject).

    Returns:
        ``(moving unit index, fixed unit index, moving image key)`` triples.

    Raises:
        ValueError: an unknown strategy or data the strategy cannot pair.
    """
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"pair_strategy must be one of {PAIR_STRATEGIES}, got {strategy!r}.")
    if strategy == "synthetic":
        raise ValueError(
            "pair_strategy 'synthetic' generates its pairs (custom.data.SyntheticPairs); it pairs no frames."
        )
    subjects = sorted({u["subject"] for u in units})
    at: Dict[Tuple[str, int], int] = {(u["subject"], u["index"]): i for i, u in enumerate(units)}
    by_index: Dict[int, List[int]] = defaultdict(list)
    for i, u in enumerate(units):
        by_index[u["index"]].append(i)
    pairs: List[Pair] = []
    if strategy == "inter_subject":
        if len(subjects) < 2:
            raise ValueError(f"pair_strategy 'inter_subject' needs at least two subjects, got {len(subjects)}.")
        for f, u in enumerate(units):
            others = [m for m in by_index[u["index"]] if units[m]["subject"] != u["subject"]]
            if others:
                pairs.append((rng.choice(others), f, "image"))
    elif strategy == "atlas":
        name = atlas or subjects[0]
        if name not in subjects:
            raise ValueError(f"atlas subject {name!r} is not among the subjects {subjects[:5]}.")
        if len(subjects) < 2:
            raise ValueError("pair_strategy 'atlas' needs the atlas and at least one other subject.")
        for m, u in enumerate(units):
            f = at.get((name, u["index"]))
            if u["subject"] != name and f is not None:
                pairs.append((m, f, "image"))
    elif strategy == "intra_volume":
        if units and units[0]["index"] < 0:
            raise ValueError("pair_strategy 'intra_volume' pairs slices of one volume and needs spatial_dims=2.")
        if offset == 0:
            raise ValueError("intra_volume offset must be non-zero, got 0.")
        for f, u in enumerate(units):
            m = at.get((u["subject"], u["index"] + offset))
            if m is not None:
                pairs.append((m, f, "image"))
    else:
        pairs = [(i, i, "orig") for i in range(len(units))]
    if not pairs:
        raise ValueError(f"pair_strategy {strategy!r} found no pairs among {len(units)} frames of {subjects[:5]}.")
    return pairs


class PairDataset(torch.utils.data.Dataset):
    """Pairs of frames, re-drawn every epoch or fixed; frames are read when an item is asked for.

    Items are dicts with ``moving``, ``fixed`` (``(1, *S)`` float tensors), ``moving_label`` and ``fixed_label``
    when the frames have labels, and ``moving_id`` / ``fixed_id`` (``"subject:index"``).

    Args:
        frames: the frames (cached as their :class:`~custom.data.frames.SubjectFrames` says).
        strategy: one of :data:`PAIR_STRATEGIES`.
        seed: seed of the pair draw.
        redraw: draw new random pairs at each :meth:`set_epoch` (training); otherwise the pairs stay fixed.
        offset: slice distance for ``intra_volume``.
        atlas: fixed subject for ``atlas``.
        max_pairs: keep at most this many pairs, evenly spread over all of them (bounds validation work).
        transform: applied to each item (e.g. :func:`~custom.data.transforms.pair_augmentation`), seeded by
            ``seed``.

    Raises:
        ValueError: for bad options, frames the strategy cannot pair, or pairs of unequal shapes.
    """

    def __init__(
        self,
        frames: SubjectFrames,
        strategy: str = "inter_subject",
        seed: int = 0,
        redraw: bool = False,
        offset: int = 1,
        atlas: Optional[str] = None,
        max_pairs: Optional[int] = None,
        transform: Optional[Callable[[dict], dict]] = None,
    ) -> None:
        if max_pairs is not None and max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1 or null, got {max_pairs!r}.")
        if strategy == "orig_to_norm" and "orig" not in frames.keys:
            raise ValueError("pair_strategy 'orig_to_norm' needs the aligned_orig images (load them as 'orig').")
        self.frames = frames
        self.strategy = strategy
        self.seed = seed
        self.redraw = redraw
        self.offset = offset
        self.atlas = atlas
        self.max_pairs = max_pairs
        self.transform = transform
        if transform is not None and hasattr(transform, "set_random_state"):
            transform.set_random_state(seed)
        self.pairs = self._draw(seed)
        for m, f, _ in self.pairs:
            ms, fs = frames.shape(m), frames.shape(f)
            if ms != fs:
                raise ValueError(
                    f"moving {self._id(m)} has shape {list(ms)} but fixed {self._id(f)} has shape {list(fs)}; "
                    "pairs need equal shapes (resample the data to one grid)."
                )

    def _id(self, i: int) -> str:
        u = self.frames.units[i]
        return f"{u['subject']}:{u['index']}" if u["index"] >= 0 else u["subject"]

    def _draw(self, seed: int) -> List[Pair]:
        pairs = make_pairs(self.frames.units, self.strategy, random.Random(seed), self.offset, self.atlas)
        if self.max_pairs is None or len(pairs) <= self.max_pairs:
            return pairs
        step = len(pairs) / self.max_pairs
        return [pairs[int(i * step)] for i in range(self.max_pairs)]

    def set_epoch(self, epoch: int) -> None:
        """Re-draw the random pairs for ``epoch`` (only when ``redraw``); deterministic given the seed."""
        if self.redraw:
            self.pairs = self._draw(self.seed + epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        m, f, key = self.pairs[i]
        mu, fu = self.frames.read([m, f])
        item = {"moving": mu[key], "fixed": fu["image"], "moving_id": self._id(m), "fixed_id": self._id(f)}
        if "label" in mu:
            item["moving_label"], item["fixed_label"] = mu["label"], fu["label"]
        return self.transform(item) if self.transform is not None else item


class MixedPairs(torch.utils.data.ConcatDataset):
    """Real pairs and synthetic pairs in one training dataset: each epoch has the items of every part (shuffled
    together by the data loader) and re-draws them all (:meth:`set_epoch`).

    Args:
        parts: datasets with ``set_epoch`` (:class:`PairDataset`, :class:`~custom.data.synth.SyntheticPairs`) whose
            items have equal shapes.
        labels: keep the label maps (every part must have them); otherwise they are dropped, so items of parts
            with and without labels batch together.
    """

    def __init__(self, parts: Sequence[torch.utils.data.Dataset], labels: bool = False) -> None:
        super().__init__(parts)
        self.keys = set(PAIR_KEYS if labels else PAIR_KEYS[:2]) | {"moving_id", "fixed_id"}

    def set_epoch(self, epoch: int) -> None:
        """Re-draw every part's pairs for ``epoch``."""
        for part in self.datasets:
            part.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        missing = self.keys - set(item)
        if missing:
            raise ValueError(f"pair {item.get('moving_id')} has no {sorted(missing)}: every part needs label maps.")
        # plain tensors: MetaTensors and tensors of the two parts would not batch together
        return {k: convert_to_tensor(v, track_meta=False) for k, v in item.items() if k in self.keys}


class PairRedrawer:
    """Ignite handler: calls ``dataset.set_epoch(epoch)`` when each epoch starts, so pairs are re-drawn."""

    def __init__(self, dataset: PairDataset) -> None:
        self.dataset = dataset

    def attach(self, engine) -> None:
        """Attach to an Ignite engine."""
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.dataset.set_epoch(e.state.epoch))


class PairResampler(PairRedrawer):
    """Deprecated name of :class:`PairRedrawer` ("resample" means spatial resampling elsewhere)."""

    def __init__(self, dataset: PairDataset) -> None:
        warnings.warn(
            "custom.data.PairResampler is deprecated: use custom.data.PairRedrawer (same arguments).",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(dataset)


def build_pair_dataset(
    dataset_dir: Union[str, Path],
    split: str = "train",
    spatial_dims: int = 2,
    pair_strategy: str = "inter_subject",
    image: str = "aligned_norm",
    label: Optional[str] = "auto",
    num_val: Union[int, float] = 0.2,
    num_test: Union[int, float] = 0.2,
    seed: int = 0,
    slice_axis: int = 2,
    slice_range: Optional[Sequence[int]] = None,
    offset: int = 1,
    atlas: Optional[str] = None,
    cache: str = "memory",
    cache_rate: float = 1.0,
    cache_dir: Optional[Union[str, Path]] = None,
    num_workers: int = 0,
    shard: Optional[Sequence[int]] = None,
    synth_shape: Optional[Sequence[int]] = None,
    synth_pairs: int = 256,
    max_pairs: Optional[int] = None,
    val_subjects: Optional[Sequence[str]] = None,
    train_labels: bool = False,
    augment: bool = False,
    synth_mix: int = 0,
) -> Union[PairDataset, SyntheticPairs, MixedPairs]:
    """Discover, split, load and pair a neurite-OASIS-style dataset: what the bundle configs call.

    Args:
        dataset_dir: the dataset root.
        split: ``"train"`` (pairs re-drawn every epoch), ``"val"``, ``"test"`` (fixed pairs) or ``"all"``.
        spatial_dims: 2 (slices) or 3 (volumes).
        pair_strategy: one of :data:`PAIR_STRATEGIES`.
        image: the image file (``aligned_norm``; ``slice_norm`` for the release's 2-D slices).
        label: label file, ``None``, or ``"auto"`` (the ``"train"`` split loads it only with ``train_labels``).
        num_val: validation subjects (fraction or count).
        num_test: test subjects (fraction or count).
        seed: split and pair seed.
        slice_axis: slicing axis in 2D.
        slice_range: ``(start, stop)`` slice indices in 2D; default the foreground slices.
        offset: slice distance for ``intra_volume``.
        atlas: fixed subject for ``atlas`` (it is added to the split's frames when it belongs to another split).
        cache: ``"memory"``, ``"disk"`` or ``"none"`` (:mod:`custom.data.frames`).
        cache_rate: fraction of the subjects held in memory (``"memory"``).
        cache_dir: folder of the disk cache (``"disk"``).
        num_workers: processes (threads for ``"memory"``) decoding the subjects at start-up.
        shard: ``(rank, world_size)`` under ``torch.distributed``: this rank loads and pairs only its share of
            the split's subjects (MONAI ``partition_dataset``; when each share gets at least two), so no rank holds
            the whole split; every rank of a training split gets the same number of pairs per epoch (the smallest
            share's).
        synth_shape: spatial shape of ``synthetic`` pairs (default :data:`~custom.data.synth.SYNTH_SHAPES`).
        synth_pairs: ``synthetic`` pairs per training epoch (validation and test: an eighth, at least 8, fixed).
        max_pairs: at most this many pairs, evenly spread (e.g. ``val_max_pairs`` for validation).
        val_subjects: the validation subjects by name (held out from training) instead of drawing ``num_val``;
            the test split is then empty.
        train_labels: the ``"train"`` split keeps its label maps (for a semi-supervised ``label_weight``).
        augment: the ``"train"`` split's pairs are augmented (:func:`~custom.data.transforms.pair_augmentation`).
        synth_mix: the ``"train"`` split of a real-pair strategy adds this many synthetic pairs of its frames' shape
            per epoch (:class:`MixedPairs`).

    Raises:
        ValueError / FileNotFoundError: for bad data or options, naming the file or subject.
    """
    spatial_dims = check_spatial_dims(spatial_dims)
    if pair_strategy not in PAIR_STRATEGIES:
        raise ValueError(f"pair_strategy must be one of {PAIR_STRATEGIES}, got {pair_strategy!r}.")
    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"split must be 'train', 'val', 'test' or 'all', got {split!r}.")
    rank, world = _check_shard(shard)
    if pair_strategy == "synthetic":
        seed += 7919 * rank  # ranks draw different synthetic pairs
        return _synthetic(dataset_dir, split, spatial_dims, image, slice_axis, seed, synth_shape, synth_pairs)
    if synth_mix < 0:
        raise ValueError(f"synth_mix must be >= 0, got {synth_mix!r}.")
    training = split == "train"
    if training and not train_labels:
        label = None  # unsupervised training: labels would only take cache memory
    chosen, atlas = _chosen_subjects(
        dataset_dir, split, pair_strategy, image, label, num_val, num_test, seed, shard, atlas, val_subjects
    )
    frames = SubjectFrames(chosen, spatial_dims, cache, cache_rate, cache_dir, num_workers, slice_axis, slice_range)
    logger.info("%s split: %d subjects, %d frames", split, len(chosen), len(frames))
    transform = pair_augmentation(spatial_dims) if training and augment else None
    dataset = PairDataset(frames, pair_strategy, seed, training, offset, atlas, max_pairs, transform)
    if world > 1 and training:
        common = _smallest_across_ranks(len(dataset))
        if common < len(dataset):  # equal iterations per epoch on every rank, or DDP waits forever
            dataset = PairDataset(frames, pair_strategy, seed, True, offset, atlas, common, transform)
    if training and synth_mix:
        synthetic = SyntheticPairs(spatial_dims, frames.shape(0)[1:], synth_mix, seed + 7919 * (rank + 1))
        return MixedPairs([dataset, synthetic], labels=label is not None)
    return dataset


def _chosen_subjects(dataset_dir, split, pair_strategy, image, label, num_val, num_test, seed, shard, atlas, held):
    """``(subjects, atlas)``: the split's subjects (this rank's share of them under ``shard``); for the ``atlas``
    strategy the atlas first (``atlas`` default: the first subject of the dataset) and its name."""
    rank, world = _check_shard(shard)
    subjects = find_subjects(dataset_dir, image, label, ("aligned_orig",) if pair_strategy == "orig_to_norm" else ())
    for s in subjects:
        if "aligned_orig" in s:
            s["orig"] = s.pop("aligned_orig")
    minimum = 2 if pair_strategy == "inter_subject" else 1
    splits = split_subjects(subjects, num_val, num_test, seed, held, [] if held else None, minimum)
    chosen = subjects if split == "all" else splits[split]
    if len(chosen) < minimum:
        raise ValueError(
            f"the {split} split is empty or too small to pair: {len(subjects)} subjects found, with --num_val "
            f"{num_val} and --num_test {num_test} it holds {len(chosen)} (pair_strategy {pair_strategy!r} needs "
            f"{minimum}); use another --split (val, all) or pass --num_val/--num_test counts that give it {minimum}."
        )
    if world > 1 and len(chosen) >= 2 * world:  # a share pairs its own subjects: at least two each
        chosen = partition_dataset(chosen, num_partitions=world, shuffle=True, seed=seed, even_divisible=True)[rank]
    if pair_strategy != "atlas":
        return chosen, atlas
    atlas = atlas or subjects[0]["subject"]
    return [s for s in subjects if s["subject"] == atlas][:1] + [s for s in chosen if s["subject"] != atlas], atlas


def _check_shard(shard: Optional[Sequence[int]]) -> Tuple[int, int]:
    if shard is None:
        return 0, 1
    if len(shard) != 2 or not 0 <= int(shard[0]) < int(shard[1]):
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard!r}.")
    return int(shard[0]), int(shard[1])


def _smallest_across_ranks(n: int) -> int:
    """The smallest ``n`` over the processes of the default ``torch.distributed`` group (``n`` without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n
    counts: List[Optional[int]] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, n)
    return min(int(c) for c in counts)


def _synthetic(dataset_dir, split, spatial_dims, image, slice_axis, seed, shape, pairs) -> SyntheticPairs:
    """Synthetic pairs, deforming the dataset's label maps (when every subject has one) half of the time."""
    subjects = find_subjects(dataset_dir, image, "auto")
    label_maps = []
    if subjects and "label" in subjects[0]:
        frames = SubjectFrames(subjects, spatial_dims, slice_axis=slice_axis)
        label_maps = [frames[i]["label"] for i in range(len(frames))]
    if split == "train":
        return SyntheticPairs(spatial_dims, shape, pairs, seed, redraw=True, label_maps=label_maps)
    offset = ("val", "test", "all").index(split) + 1
    return SyntheticPairs(spatial_dims, shape, max(8, pairs // 8), seed + 1000 * offset, False, label_maps=label_maps)
