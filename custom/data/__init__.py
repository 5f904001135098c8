"""The data layer: neurite-OASIS discovery and splits, MONAI loading/slicing transforms, pair strategies,
and the synthetic demo dataset."""

from custom.data.demo import DEMO_SHAPE, ensure_dataset, make_demo
from custom.data.frames import CACHE_MODES, SubjectFrames
from custom.data.oasis import IMAGE_FILES, LABEL_FILES, find_subjects, split_subjects
from custom.data.pairs import (
    PAIR_STRATEGIES,
    MixedPairs,
    PairDataset,
    PairRedrawer,
    PairResampler,
    build_pair_dataset,
    make_pairs,
)
from custom.data.synth import SYNTH_SHAPES, SyntheticPairs, known_deformation_pairs, random_ddf
from custom.data.transforms import CheckVolumed, StackSlicesd, foreground_slices, load_transforms, pair_augmentation

__all__ = [
    "CACHE_MODES",
    "DEMO_SHAPE",
    "IMAGE_FILES",
    "LABEL_FILES",
    "PAIR_STRATEGIES",
    "CheckVolumed",
    "MixedPairs",
    "PairDataset",
    "PairRedrawer",
    "PairResampler",
    "SYNTH_SHAPES",
    "StackSlicesd",
    "SubjectFrames",
    "SyntheticPairs",
    "build_pair_dataset",
    "ensure_dataset",
    "find_subjects",
    "foreground_slices",
    "known_deformation_pairs",
    "load_transforms",
    "make_demo",
    "make_pairs",
    "pair_augmentation",
    "random_ddf",
    "split_subjects",
]
