import gzip
import json
import os
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset
from warm_python import python_env, run_python

from custom.data import (
    PAIR_STRATEGIES,
    MixedPairs,
    StackSlicesd,
    SubjectFrames,
    build_pair_dataset,
    ensure_dataset,
    find_subjects,
    foreground_slices,
    load_transforms,
    make_demo,
    make_pairs,
    pair_augmentation,
    split_subjects,
)

TINY = (24, 28, 20)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("d") / "demo", num_subjects=6, shape=TINY, seed=3)


def _copy_subjects(src, dst, names):
    for n in names:
        (dst / n).mkdir(parents=True)
        for f in (src / n).iterdir():
            (dst / n / f.name).write_bytes(f.read_bytes())


# --- demo generator ---------------------------------------------------------------------------------------


def test_demo_layout_and_determinism(demo, tmp_path):
    names = (demo / "subjects.txt").read_text().split()
    assert names[0] == "OASIS_OAS1_0001_MR1" and len(names) == 6
    files = sorted(p.name for p in (demo / names[0]).iterdir())
    assert files == [
        "aligned_norm.nii.gz",
        "aligned_orig.nii.gz",
        "aligned_seg4.nii.gz",
        "slice_norm.nii.gz",
        "slice_seg4.nii.gz",
    ]
    img = nib.load(demo / names[0] / "aligned_norm.nii.gz").get_fdata()
    seg = np.asarray(nib.load(demo / names[0] / "aligned_seg4.nii.gz").dataobj)
    assert img.shape == TINY and 0 <= img.min() and img.max() <= 1
    assert set(np.unique(seg)) <= {0, 1, 2, 3, 4} and len(np.unique(seg)) >= 4
    sl = nib.load(demo / names[0] / "slice_norm.nii.gz").get_fdata()
    np.testing.assert_array_equal(sl[..., 0], img[:, :, TINY[2] // 2])
    again = make_demo(tmp_path / "again", num_subjects=6, shape=TINY, seed=3)
    other = nib.load(again / names[0] / "aligned_norm.nii.gz").get_fdata()
    np.testing.assert_array_equal(other, img)
    assert json.loads((demo / "demo.json").read_text())["seed"] == 3
    # subjects differ from each other (random deformations and intensities)
    second = nib.load(demo / names[1] / "aligned_norm.nii.gz").get_fdata()
    assert np.abs(second - img).mean() > 0.01


def test_demo_never_overwrites(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        make_demo(tmp_path / "mine", num_subjects=2, shape=(8, 8, 8))
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"
    assert ensure_dataset(tmp_path / "mine") == str(tmp_path / "mine")  # existing: left alone
    assert ensure_dataset(tmp_path / "new", True, num_subjects=2, shape=(8, 8, 8)) == str(tmp_path / "new")
    assert len(find_subjects(tmp_path / "new")) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_no_silent_fallback_to_synthetic_data(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="dataset folder '.*typo' does not exist"):
        ensure_dataset(tmp_path / "typo")  # a mistyped path is an error, not synthetic data
    assert not (tmp_path / "typo").exists()
    monkeypatch.chdir(tmp_path)
    assert ensure_dataset("data/demo", num_subjects=2, shape=(8, 8, 8)) == "data/demo"  # the default path only
    assert len(find_subjects(tmp_path / "data" / "demo")) == 2


def test_concurrent_demo_generation_is_safe(tmp_path):
    """torchrun ranks may generate the demo data at once: every process ends with the one complete folder."""
    import functools
    import multiprocessing as mp

    generate = functools.partial(ensure_dataset, generate=True, num_subjects=3, shape=(24, 24, 24))
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.map(generate, [str(tmp_path / "demo")] * 3)
    assert results == [str(tmp_path / "demo")] * 3
    assert len(find_subjects(tmp_path / "demo")) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temp folder left


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_subjects": 1}, "num_subjects must be at least 2"),  # too few subjects
        ({"shape": (8, 8)}, "shape must be 3 sizes"),  # 2-D shape
        ({"shape": (4, 8, 8)}, "of at least 8"),  # too small
    ],
)
def test_demo_bad_options(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_demo(tmp_path / "x", **kwargs)


def test_make_demo_cli(tmp_path):
    import sys

    out = tmp_path / "cli_demo"
    cmd = [sys.executable, "-m", "custom", "make-demo", str(out), "--num_subjects", "2", "--shape", "[8,8,8]"]
    assert run_python(cmd, tmp_path, python_env()).returncode == 0
    assert len(find_subjects(out)) == 2


# --- discovery and splits ---------------------------------------------------------------------------------


def test_find_subjects_auto_label(demo, real_data, tmp_path):
    subjects = find_subjects(demo)
    assert len(subjects) == 6 and subjects[0]["label"].endswith("aligned_seg4.nii.gz")
    # "auto" prefers the finest map every subject has: seg35 over seg4
    _copy_subjects(demo, tmp_path, ["OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1"])
    for name in ("OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1"):
        (tmp_path / name / "aligned_seg35.nii.gz").write_bytes((tmp_path / name / "aligned_seg4.nii.gz").read_bytes())
    assert find_subjects(tmp_path)[0]["label"].endswith("aligned_seg35.nii.gz")
    assert "label" not in find_subjects(demo, label=None)[0]
    assert find_subjects(demo, image="slice_norm")[0]["label"].endswith("slice_seg4.nii.gz")
    # real samples: only subject_c has a segmentation, so "auto" finds none common to all
    real = find_subjects(real_data)
    assert [s["subject"] for s in real] == ["subject_a", "subject_b", "subject_c"] and "label" not in real[0]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_is_by_subject_and_deterministic(demo, seed):
    subjects = find_subjects(demo)
    split = split_subjects(subjects, num_val=2, num_test=1, seed=seed)
    names = {k: {s["subject"] for s in v} for k, v in split.items()}
    assert len(names["val"]) == 2 and len(names["test"]) == 1 and len(names["train"]) == 3
    assert not (names["train"] & names["val"]) and not (names["train"] & names["test"])
    assert not (names["val"] & names["test"])
    assert split == split_subjects(subjects, num_val=2, num_test=1, seed=seed)


def test_split_from_lists_and_fractions(demo):
    subjects = find_subjects(demo)
    split = split_subjects(subjects, val_subjects=["OASIS_OAS1_0002_MR1"], test_subjects=[])
    assert [s["subject"] for s in split["val"]] == ["OASIS_OAS1_0002_MR1"] and len(split["train"]) == 5
    assert len(split_subjects(subjects, num_val=0.5, num_test=0.0)["val"]) == 3


SPLIT_SIZES = [
    # (subjects, num_val, num_test, minimum, (train, val, test))
    (4, 0.2, 0.2, 2, (2, 2, 0)),  # 4 subjects train with the defaults: the test split gives way
    (6, 0.2, 0.2, 2, (2, 2, 2)),  # the six labelled subjects: every split can be paired
    (12, 0.2, 0.2, 2, (8, 2, 2)),  # the demo: unchanged
    (3, 0.2, 0.2, 1, (1, 1, 1)),  # one subject per split is enough for slice pairs
    (5, 0.2, 0.2, 2, (3, 2, 0)),  # rounding up to what pairing needs
    (20, 0.2, 0.2, 2, (12, 4, 4)),  # large enough: plain rounding
    (6, 1, 0.0, 2, (5, 1, 0)),  # counts are taken as given
    (2, 0.2, 0.2, 2, (2, 0, 0)),  # two subjects: all for training
]


@pytest.mark.parametrize("n,num_val,num_test,minimum,sizes", SPLIT_SIZES)
def test_splits_round_to_what_pairing_needs(n, num_val, num_test, minimum, sizes):
    subjects = [{"subject": f"s{i}"} for i in range(n)]
    split = split_subjects(subjects, num_val, num_test, minimum=minimum)
    assert tuple(len(split[k]) for k in ("train", "val", "test")) == sizes


@pytest.mark.parametrize(
    "n,num_val,num_test,message",
    [
        (4, 2, 1, r"--num_val 2 and --num_test 1 ask for 2 validation \+ 1 test subjects of the 4 found, leaving 1"),
        (3, 0.2, 2, r"--num_val 0.2 and --num_test 2 ask for 0 validation \+ 2 test"),  # a count wins over a fraction
    ],
)  # counts that leave training too few subjects name the options and the counts
def test_splits_that_cannot_train_name_the_options(n, num_val, num_test, message):
    subjects = [{"subject": f"s{i}"} for i in range(n)]
    with pytest.raises(ValueError, match=message):
        split_subjects(subjects, num_val, num_test, minimum=2)


def test_an_empty_split_names_the_options(tmp_path):
    make_demo(tmp_path / "d", num_subjects=4, shape=(24, 28, 20))
    with pytest.raises(ValueError, match=r"the test split is empty or too small to pair: 4 subjects found.*--num_val"):
        build_pair_dataset(tmp_path / "d", split="test", spatial_dims=2)


# --- loading and slicing ----------------------------------------------------------------------------------


def test_slice_norm_equals_slicing_aligned_norm(real_data):
    """subject_a's slice_norm is exactly z = 109 of aligned_norm; our slicing transform must reproduce it."""
    item = {"image": str(real_data / "subject_a" / "aligned_norm.nii.gz")}
    frames = load_transforms(["image"], None, 2, slice_axis=2, slice_range=(109, 110), scale_intensity=False)(item)
    assert len(frames["image"]) == 1 and frames["first"] == 109
    expected = nib.load(real_data / "subject_a" / "slice_norm.nii.gz").get_fdata(dtype=np.float32)[..., 0]
    assert frames["image"][0].shape == (1, 160, 192)
    np.testing.assert_array_equal(frames["image"][0, 0].numpy(), expected)


def _inference_tensors(moving, fixed, spatial_dims):
    from custom.inference import RegistrationPairs

    return RegistrationPairs(lambda: [{"moving": str(moving), "fixed": str(fixed)}], spatial_dims)[0]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_training_and_inference_see_identical_tensors(demo, spatial_dims):
    """One normalisation: a frame cut from a training volume equals the same frame read by inference from a file."""
    s1, s2 = demo / "OASIS_OAS1_0001_MR1", demo / "OASIS_OAS1_0002_MR1"
    z = TINY[2] // 2  # the demo's slice_norm is z of aligned_norm
    item = {"image": str(s1 / "aligned_norm.nii.gz")}
    frames = load_transforms(["image"], None, spatial_dims, slice_range=(z, z + 1))(item)
    frame = frames["image"][0] if spatial_dims == 2 else frames["image"]
    name = "slice_norm.nii.gz" if spatial_dims == 2 else "aligned_norm.nii.gz"
    inference = _inference_tensors(s1 / name, s2 / name, spatial_dims)
    assert inference["moving"].shape == frame.shape and frame.max() == 1.0 and frame.min() == 0.0
    assert torch.equal(inference["moving"], frame)
    raw = nib.load(s1 / name).get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(inference["moving_raw"].numpy().reshape(raw.shape), raw)  # the writer's copy


def test_real_training_and_inference_tensors_identical(real_data):
    item = {"image": str(real_data / "subject_a" / "aligned_norm.nii.gz")}
    frame = load_transforms(["image"], None, 2, slice_range=(109, 110))(item)["image"][0]
    slice_file = real_data / "subject_a" / "slice_norm.nii.gz"
    assert torch.equal(_inference_tensors(slice_file, slice_file, 2)["fixed"], frame)


def test_scale_foreground_hand_computed():
    from custom.data.transforms import scale_foreground

    x = torch.arange(101.0)  # background 0, foreground 1..100: the 99th percentile is 99
    torch.testing.assert_close(scale_foreground(x), (x / 99).clamp(max=1))
    assert scale_foreground(x, 50.0)[50] == 1.0 and scale_foreground(x, 50.0)[25] == 0.5
    shifted = torch.tensor([-2.0, -1.0, 0.0, 2.0])  # minimum -2 to 0; the foreground is above the minimum
    torch.testing.assert_close(scale_foreground(shifted, 100.0), torch.tensor([0.0, 0.25, 0.5, 1.0]))
    assert torch.equal(scale_foreground(torch.full((4, 4), 3.0)), torch.zeros(4, 4))  # constant: zeros


def test_scale_foreground_barely_depends_on_the_field_of_view(real_data):
    """Why not min-max: a real slice scaled on its own matches the same slice scaled with its whole volume."""
    from custom.data.transforms import scale_foreground

    volume = torch.from_numpy(nib.load(real_data / "subject_c" / "aligned_norm.nii.gz").get_fdata(dtype=np.float32))
    ours, minmax = [], []
    for z in (60, 109, 150):  # low, middle, high slices
        image = volume[:, :, z]
        in_volume = scale_foreground(volume)[:, :, z]
        ours.append(float((scale_foreground(image) - in_volume).abs().mean() / in_volume.mean()))
        minmax.append(float((image / image.max() - image / volume.max()).abs().mean() / (image / volume.max()).mean()))
    assert max(ours) < 0.05  # relative difference of a few percent at most
    assert sum(minmax) > 5 * sum(ours)  # min-max scaling differs by up to ~100%


def test_bad_normalisation_percentile():
    from custom.data.transforms import ScaleForegroundd

    with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\], got 0"):
        ScaleForegroundd(["image"], 0)


def test_max_pairs_bounds_the_pairs_evenly(demo):
    every = build_pair_dataset(demo, "all", 2, "intra_volume", label=None)
    bounded = build_pair_dataset(demo, "all", 2, "intra_volume", label=None, max_pairs=5)
    assert len(bounded) == 5 < len(every)
    step = len(every) / 5
    assert bounded.pairs == [every.pairs[int(i * step)] for i in range(5)]  # spread over all of them
    with pytest.raises(ValueError, match="max_pairs must be >= 1 or null, got 0"):
        build_pair_dataset(demo, "all", 2, "intra_volume", label=None, max_pairs=0)


def test_real_labels_survive_slicing(real_data):
    subjects = [
        {
            "subject": "subject_c",
            "image": str(real_data / "subject_c" / "aligned_norm.nii.gz"),
            "label": str(real_data / "subject_c" / "aligned_aseg.nii.gz"),
        }
    ]
    frames = SubjectFrames(subjects, 2, slice_range=(100, 112))
    units = [frames[i] for i in range(len(frames))]
    volume_labels = set(np.unique(np.asarray(nib.load(subjects[0]["label"]).dataobj)).tolist())
    assert len(units) == 12
    for u in units:
        assert u["label"].dtype == torch.int32 and u["image"].dtype == torch.float32
        assert set(u["label"].unique().tolist()) <= volume_labels
        assert u["image"].shape == u["label"].shape == (1, 160, 192)


def test_real_3d_pairs(real_data):
    ds = build_pair_dataset(real_data, "all", spatial_dims=3, label=None)
    assert len(ds) == 3
    item = ds[0]
    assert item["moving"].shape == item["fixed"].shape == (1, 160, 192, 224)
    assert item["moving_id"] != item["fixed_id"]


def test_real_slice_files_in_2d(real_data):
    ds = build_pair_dataset(real_data, "all", spatial_dims=2, image="slice_norm", label=None)
    assert len(ds) == 3 and ds[0]["moving"].shape == (1, 160, 192)


def test_foreground_slices():
    vol = torch.zeros(1, 4, 4, 10)
    vol[..., 3:7] = 1.0
    assert foreground_slices(vol, 2) == (3, 7)
    assert foreground_slices(torch.zeros(1, 4, 4, 5), 2) == (0, 5)


# --- pair strategies --------------------------------------------------------------------------------------


def _units(subjects=("a", "b", "c"), indices=(0, 1, 2)):
    return [{"subject": s, "index": i, "image": torch.zeros(1, 4, 4)} for s in subjects for i in indices]


STRATEGY_CASES = [
    # (strategy, kwargs, check on (moving unit, fixed unit))
    ("inter_subject", {}, lambda m, f: m["subject"] != f["subject"] and m["index"] == f["index"]),  # default
    ("atlas", {"atlas": "b"}, lambda m, f: f["subject"] == "b" and m["subject"] != "b" and m["index"] == f["index"]),
    ("intra_volume", {"offset": 2}, lambda m, f: m["subject"] == f["subject"] and m["index"] == f["index"] + 2),
]


@pytest.mark.parametrize("strategy,kwargs,check", STRATEGY_CASES)
def test_pair_strategies(strategy, kwargs, check):
    units = _units()
    pairs = make_pairs(units, strategy, random.Random(0), **kwargs)
    assert pairs and all(check(units[m], units[f]) for m, f, _ in pairs)


def test_orig_to_norm_pairs(demo):
    ds = build_pair_dataset(demo, "val", 2, "orig_to_norm", num_val=1, num_test=0)
    item = ds[0]
    assert item["moving_id"] == item["fixed_id"]
    assert not torch.equal(item["moving"], item["fixed"])  # orig (bias field, skull) vs norm


# every strategy in 2D and 3D, except intra_volume in 3D (an error, tested below)
BUILD_CASES = [(s, nd) for s in PAIR_STRATEGIES for nd in (2, 3) if (s, nd) != ("intra_volume", 3)]


@pytest.mark.parametrize("strategy,nd", BUILD_CASES)
def test_every_strategy_builds_on_demo(demo, strategy, nd):
    synth = {"synth_shape": (32,) * nd, "synth_pairs": 8} if strategy == "synthetic" else {}
    num_val = 2 if strategy != "orig_to_norm" else 1
    ds = build_pair_dataset(demo, "val", nd, strategy, num_val=num_val, num_test=1, **synth)
    item = ds[0]
    assert item["moving"].shape == item["fixed"].shape and item["moving"].dim() == nd + 1
    assert item["moving_label"].dtype == torch.int32
    train = build_pair_dataset(demo, "train", nd, strategy, num_val=1, num_test=1, **synth)
    assert train[0]["moving"].shape == item["moving"].shape
    assert strategy == "synthetic" or "moving_label" not in train[0]  # real training pairs load no labels


def test_train_pairs_redrawn_each_epoch_validation_fixed(demo):
    train = build_pair_dataset(demo, "train", 2, num_val=1, num_test=1)
    first = list(train.pairs)
    train.set_epoch(1)
    assert train.pairs != first
    train.set_epoch(0)
    assert train.pairs == first  # deterministic per epoch
    val = build_pair_dataset(demo, "val", 2, num_val=2, num_test=1)
    before = list(val.pairs)
    val.set_epoch(3)
    assert val.pairs == before


# --- bad input --------------------------------------------------------------------------------------------


def _write(path, array, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), np.eye(4)), str(path))


def test_missing_and_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_subjects(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no subject folders"):
        find_subjects(tmp_path / "empty")


def test_subject_without_image(demo, tmp_path):
    _copy_subjects(demo, tmp_path, ["OASIS_OAS1_0001_MR1"])
    (tmp_path / "OASIS_OAS1_0002_MR1").mkdir()
    with pytest.raises(FileNotFoundError, match="subject 'OASIS_OAS1_0002_MR1' has no aligned_norm.nii.gz"):
        find_subjects(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no aligned_seg35.nii.gz"):
        find_subjects(demo, label="aligned_seg35")


def _one(tmp_path, image, label=None, name="s1"):
    _write(tmp_path / name / "aligned_norm.nii.gz", image)
    item = {"subject": name, "image": str(tmp_path / name / "aligned_norm.nii.gz")}
    if label is not None:
        _write(tmp_path / name / "aligned_seg4.nii.gz", label, np.int16)
        item["label"] = str(tmp_path / name / "aligned_seg4.nii.gz")
    return item


BAD_FILES = [
    # (image, label, spatial_dims, slice_range, message)
    (np.ones((8, 8, 8)), np.zeros((8, 8, 6)), 2, None, r"aligned_seg4.nii.gz: shape \[8, 8, 6\] differs"),  # label
    (np.ones((8, 8, 1)), None, 3, None, r"spatial_dims=3 needs a 3-D volume, got spatial shape \[8, 8, 1\]"),  # 2D
    (np.ones((8, 8)), None, 3, None, "spatial_dims=3 needs a 3-D volume"),  # a 2-D file
    (np.full((8, 8, 8), np.nan), None, 2, None, "contains NaN or infinite intensities"),  # NaN
    (np.full((8, 8, 8), np.inf), None, 3, None, "contains NaN or infinite intensities"),  # inf
    (np.ones((8, 8, 8)), None, 2, (4, 12), r"slice range \[4, 12\) is outside the volume"),  # range
]


@pytest.mark.parametrize("image,label,nd,slice_range,message", BAD_FILES)
def test_bad_files(tmp_path, image, label, nd, slice_range, message):
    item = _one(tmp_path, image, label)
    with pytest.raises(ValueError, match=message) as info:
        SubjectFrames([item], nd, slice_range=slice_range)
    assert "s1" in str(info.value) or "aligned" in str(info.value)


def test_corrupt_and_truncated_files(tmp_path):
    item = _one(tmp_path, np.ones((8, 8, 8)))
    data = (tmp_path / "s1" / "aligned_norm.nii.gz").read_bytes()
    (tmp_path / "s1" / "aligned_norm.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not read .*s1/aligned_norm.nii.gz"):
        SubjectFrames([item], 2)
    (tmp_path / "s1" / "aligned_norm.nii.gz").write_bytes(gzip.compress(b"not a nifti file"))
    with pytest.raises(ValueError, match="could not read"):
        SubjectFrames([item], 2)


def test_moving_fixed_shape_mismatch(tmp_path):
    _one(tmp_path, np.ones((8, 8, 8)), name="s1")
    _one(tmp_path, np.ones((8, 10, 8)), name="s2")
    with pytest.raises(ValueError, match="has shape .* but fixed .* has shape"):
        build_pair_dataset(tmp_path, "all", 3)


BAD_OPTIONS = [
    # (kwargs, message)
    ({"pair_strategy": "random"}, "pair_strategy must be one of"),  # unknown strategy
    ({"split": "dev"}, "split must be"),  # unknown split
    ({"num_val": 3, "num_test": 3}, "ask for 3 validation \\+ 3 test subjects of the 6 found"),  # too big
    ({"spatial_dims": 3, "pair_strategy": "intra_volume"}, "needs spatial_dims=2"),  # intra_volume in 3D
    ({"pair_strategy": "atlas", "atlas": "nobody"}, "atlas subject 'nobody' is not among"),  # unknown atlas
    ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),  # 4D
    ({"cache": "ram"}, "cache must be one of \\('memory', 'disk', 'none'\\), got 'ram'"),  # unknown cache mode
    ({"cache_rate": 1.5}, "cache_rate must be in \\[0, 1\\], got 1.5"),  # a rate above 1
    ({"cache": "disk", "cache_dir": None}, "cache 'disk' needs a cache_dir"),  # disk without a folder
    ({"shard": [2, 2]}, "shard must be \\(rank, world_size\\) with 0 <= rank < world_size, got \\[2, 2\\]"),  # rank
    ({"synth_mix": -1}, "synth_mix must be >= 0, got -1"),  # negative mix
    ({"val_subjects": ["nobody"]}, "unknown subjects in the split lists: \\['nobody'\\]"),  # unknown held-out subject
]


@pytest.mark.parametrize("kwargs,message", BAD_OPTIONS)
def test_bad_options(demo, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_pair_dataset(demo, **kwargs)


def test_inter_subject_needs_two_subjects(demo):
    with pytest.raises(ValueError, match="the val split is empty or too small to pair"):
        build_pair_dataset(demo, "val", 2, num_val=1, num_test=0)


def test_bad_slicing_options():
    with pytest.raises(ValueError, match="slice axis must be 0, 1 or 2, got 3"):
        StackSlicesd("image", axis=3)
    with pytest.raises(ValueError, match="start < stop"):
        StackSlicesd("image", index_range=(5, 5))


# --- caching: memory, disk, none ---------------------------------------------------------------------------


CACHE_CASES = [
    # (spatial_dims, cache, cache_rate, num_workers)
    (2, "memory", 1.0, 0),  # every subject decoded at start-up, in RAM
    (2, "memory", 0.5, 2),  # half in RAM, the rest decoded when used; two loader threads
    (2, "disk", 1.0, 2),  # decoded once into cache_dir by two worker processes, read back memory-mapped
    (2, "none", 1.0, 0),  # decoded whenever used
    (3, "disk", 1.0, 0),  # volumes on disk
    (3, "none", 1.0, 2),  # volumes decoded when used, index built by two worker processes
]


@pytest.mark.parametrize("spatial_dims,cache,cache_rate,num_workers", CACHE_CASES)
def test_cache_modes_give_identical_pairs(demo, tmp_path, spatial_dims, cache, cache_rate, num_workers):
    common = {"spatial_dims": spatial_dims, "label": "auto", "num_val": 2, "num_test": 0}
    reference = build_pair_dataset(demo, "val", **common)
    options = {"cache": cache, "cache_rate": cache_rate, "cache_dir": tmp_path / "c", "num_workers": num_workers}
    other = build_pair_dataset(demo, "val", **common, **options)
    assert other.pairs == reference.pairs and len(other) > 0
    for i in range(len(other)):
        a, b = reference[i], other[i]
        assert a.keys() == b.keys()
        for key in ("moving", "fixed", "moving_label", "fixed_label"):
            assert torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype
    cached = sorted((tmp_path / "c").glob("*.pt")) if (tmp_path / "c").exists() else []
    assert len(cached) == (2 if cache == "disk" else 0)  # one file per subject, only for the disk cache


def test_frames_are_read_on_demand_from_the_disk_cache(demo, tmp_path):
    """The disk cache holds the frames: once written, items come from it (not from the NIfTI files), memory-mapped,
    and a changed source file gets a new entry."""
    subjects = find_subjects(demo, label=None)[:2]
    frames = SubjectFrames(subjects, 2, cache="disk", cache_dir=tmp_path)
    assert not isinstance(frames.dataset, CacheDataset)  # nothing held in RAM
    (first,) = [p for p in tmp_path.glob("*.pt") if torch.load(p, weights_only=True)["first"] >= 0][:1]
    stored = torch.load(first, weights_only=True)
    stored["image"] = torch.full_like(stored["image"], 0.25)  # a marker only the cache holds
    torch.save(stored, first)
    again = SubjectFrames(subjects, 2, cache="disk", cache_dir=tmp_path)
    marked = [i for i in range(len(again)) if torch.all(again[i]["image"] == 0.25)]
    assert len(marked) == stored["image"].shape[0]  # every frame of that subject came from the cache file
    assert again[marked[0]]["image"].shape == frames.shape(marked[0])
    held = again.dataset[again.units[marked[0]]["item"]]  # the subject's stack, as read from the cache
    assert str(first) in Path("/proc/self/maps").read_text()  # memory-mapped, not read into RAM
    del held
    image = Path(subjects[0]["image"])
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # "edited"
    SubjectFrames(subjects, 2, cache="disk", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_shards_split_subjects_between_ranks(demo):
    """Under torchrun each rank loads only its share of the subjects; the shares cover the split."""
    shares = [build_pair_dataset(demo, "all", 2, label=None, shard=(r, 3)) for r in range(3)]
    subjects = [{u["subject"] for u in s.frames.units} for s in shares]
    assert all(len(s) == 2 for s in subjects)
    assert set().union(*subjects) == {s["subject"] for s in find_subjects(demo)}
    for share in shares:  # inter-subject pairs are drawn within the share
        assert all(
            {share.frames.units[m]["subject"], share.frames.units[f]["subject"]} <= subjects[shares.index(share)]
            for m, f, _ in share.pairs
        )


def test_two_frames_of_one_subject_read_it_once(demo):
    """An intra_volume pair decodes its volume once, not twice, when nothing is cached."""
    frames = SubjectFrames(find_subjects(demo, label=None)[:1], 2, cache="none")
    reads, dataset = [], frames.dataset

    class Counted(torch.utils.data.Dataset):  # the real MONAI dataset, with its reads recorded
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            reads.append(i)
            return dataset[i]

    frames.dataset = Counted()
    first, second = frames.read([0, 1])
    assert reads == [0] and not torch.equal(first["image"], second["image"])
    assert torch.equal(first["image"], frames[0]["image"]) and reads == [0, 0]


def test_pair_resampler_is_a_deprecated_name_of_pair_redrawer():
    from custom.data import PairRedrawer, PairResampler

    with pytest.warns(DeprecationWarning, match="use custom.data.PairRedrawer"):
        handler = PairResampler(dataset=None)
    assert isinstance(handler, PairRedrawer)


DROP_AXES = [
    # (channel-first shape, spatial_dims, expected)
    ((1, 20, 24, 1), 2, (1, 20, 24)),  # a single slice stored as a volume
    ((1, 20, 24, 1, 1), 2, (1, 20, 24)),  # two trailing singleton axes
    ((1, 20, 24), 2, (1, 20, 24)),  # a true 2-D image
    ((1, 20, 24, 18), 3, (1, 20, 24, 18)),  # a volume
    ((1, 20, 24, 1), 3, (1, 20, 24, 1)),  # left to the checks: a 3-D model never drops an axis it needs
    ((1, 20, 1, 18), 2, (1, 20, 1, 18)),  # only trailing axes are dropped
]


@pytest.mark.parametrize("shape, spatial_dims, expected", DROP_AXES)
def test_drop_trailing_axes(shape, spatial_dims, expected):
    from custom.data.transforms import DropTrailingAxesd

    assert tuple(DropTrailingAxesd("x", spatial_dims)({"x": torch.zeros(shape)})["x"].shape) == expected


@pytest.mark.parametrize("resample", [False, True])
def test_pair_transforms_read_as_training_reads(tmp_path, resample):
    """A user's pair is read by the training's loading (nibabel through MONAI, float32 images, int32 labels),
    resampled onto the fixed grid when asked, normalised by ScaleForegroundd, with the raw moving image kept."""
    from custom.data.transforms import load_transforms, pair_transforms, scale_foreground

    rng = np.random.default_rng(0)
    moving = (100 * rng.random((20, 24, 1))).astype(np.float32)
    labels = rng.integers(0, 4, (20, 24, 1)).astype(np.int16)
    shifted = np.eye(4)
    shifted[0, 3] = 2.0  # the moving grid two voxels along x from the fixed one
    paths = {}
    for key, data, affine in (("moving", moving, shifted), ("fixed", moving, np.eye(4)), ("label", labels, shifted)):
        paths[key] = str(tmp_path / f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(data, affine if resample else np.eye(4)), paths[key])
    out = pair_transforms(2, True, resample)(
        {"moving": paths["moving"], "fixed": paths["fixed"], "moving_label": paths["label"]}
    )
    assert all(type(out[k]) is torch.Tensor for k in ("moving", "fixed", "moving_raw", "moving_label"))
    assert out["moving"].shape == out["moving_label"].shape == (1, 20, 24) and out["moving_label"].dtype == torch.int32
    raw = torch.from_numpy(moving[..., 0])[None]
    if resample:  # fixed voxel x reads moving voxel x - 2 (zeros outside)
        raw = torch.nn.functional.pad(raw[:, :-2], (0, 0, 2, 0))
        assert torch.equal(out["moving_label"][0, 2:], torch.from_numpy(labels[:-2, :, 0]).int())
    torch.testing.assert_close(out["moving_raw"], raw, rtol=1e-4, atol=1e-2)  # resampling's float rounding
    torch.testing.assert_close(out["moving"], scale_foreground(out["moving_raw"]))
    training = load_transforms(["image"], None, 2)({"image": paths["fixed"]})["image"][0]
    torch.testing.assert_close(out["fixed"], training)  # the same reading and normalisation as training's


@pytest.mark.parametrize(
    "shape, axes, expected",
    [
        ((160, 192, 1), 2, [160, 192]),  # a slice stored as a volume
        ((160, 192, 1, 1), 3, [160, 192, 1]),  # never fewer than the axes asked for
        ((160, 1, 224), 2, [160, 1, 224]),  # only trailing sizes of 1
        ((160, 192, 224), 2, [160, 192, 224]),  # a volume stays a volume
    ],
)
def test_drop_trailing_axes_of_a_shape(shape, axes, expected):
    from custom.data.transforms import drop_trailing_axes

    assert drop_trailing_axes(shape, axes) == expected


# --- training on real pairs: held-out subjects, labels, augmentation, synthetic pairs mixed in --------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_held_out_subjects_labels_augmentation_and_synthetic_mix(demo, spatial_dims):
    names = sorted(s["subject"] for s in find_subjects(demo))
    held = names[-2:]
    options = dict(spatial_dims=spatial_dims, val_subjects=held, num_test=0, label="auto")
    train = build_pair_dataset(demo, "train", train_labels=True, augment=True, synth_mix=3, **options)
    val = build_pair_dataset(demo, "val", **options)
    assert isinstance(train, MixedPairs) and len(train) == len(train.datasets[0]) + 3
    real, synthetic = train.datasets
    trained = {u["subject"] for u in real.frames.units}
    assert trained == set(names[:-2]) and {u["subject"] for u in val.frames.units} == set(held)
    for item in (train[0], train[len(train) - 1]):  # a real pair and a synthetic one, alike
        assert set(item) == {"moving", "fixed", "moving_label", "fixed_label", "moving_id", "fixed_id"}
        assert all(
            type(item[k]) is torch.Tensor and item[k].shape[1:] == TINY[:spatial_dims] for k in item if "_id" not in k
        )
    assert train[len(train) - 1]["moving_id"].startswith("synthetic:")
    unlabelled = build_pair_dataset(demo, "train", synth_mix=2, **options)
    assert set(unlabelled[len(unlabelled) - 1]) == {"moving", "fixed", "moving_id", "fixed_id"}  # labels dropped
    plain = build_pair_dataset(demo, "train", **options)
    assert "moving_label" not in plain[0] and plain.transform is None  # the defaults: unsupervised, as before
    first = [train[i]["moving_id"] for i in range(len(real))]
    train.set_epoch(5)  # both parts re-drawn
    assert synthetic.epoch == 5 and real.pairs == real._draw(real.seed + 5)
    assert spatial_dims == 3 or [train[i]["moving_id"] for i in range(len(real))] != first


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pair_augmentation_moves_labels_with_their_images(spatial_dims):
    """Labels stay labels (nearest), follow their image (the moving label where the moving image is bright), the
    fixed side is only flipped, and the same seed gives the same pair."""
    shape = (1,) + (20,) * spatial_dims
    image = torch.zeros(shape)
    image[(0,) + (slice(5, 15),) * spatial_dims] = 1.0
    labels = (image * 3).int()
    item = {"moving": image.clone(), "fixed": image.clone(), "moving_label": labels, "fixed_label": labels}
    results = []
    for seed in range(6):
        augment = pair_augmentation(spatial_dims)
        augment.set_random_state(seed)
        out = augment(dict(item))
        assert set(torch.unique(out["moving_label"]).tolist()) <= {0.0, 3.0}
        a, b = out["moving_label"] > 0, out["moving"] > 0.5  # equal but for interpolated edge voxels
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9
        assert torch.equal(out["fixed_label"] > 0, out["fixed"] > 0)
        results.append(out["moving"])
    assert any(not torch.equal(r, image) for r in results)  # it does augment
    again = pair_augmentation(spatial_dims)
    again.set_random_state(0)
    assert torch.equal(again(dict(item))["moving"], results[0])


def test_mixed_pairs_need_labels_in_every_part(demo):
    labelled = build_pair_dataset(demo, "train", 2, train_labels=True, label="auto", num_val=2, num_test=0)
    unlabelled = build_pair_dataset(demo, "train", 2, num_val=2, num_test=0)
    mixed = MixedPairs([labelled, unlabelled], labels=True)
    with pytest.raises(ValueError, match="has no \\['fixed_label', 'moving_label'\\]: every part needs label maps"):
        mixed[len(mixed) - 1]
