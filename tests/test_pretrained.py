"""Synthetic pairs, the shipped pretrained weights and their manifest, and registering with no training."""

import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from warm_python import python_env, run_python

from custom import LocalNCCLoss, RegistrationNet
from custom.data import SyntheticPairs, build_pair_dataset, make_demo
from custom.pretrain import pretrain
from custom.pretrained import load_pretrained, pretrained_path, read_manifest, sha256, trained_subjects

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
SHIPPED = [(2, "both"), (3, "both")]


# --- the synthetic generator ------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims,shape", [(2, (48, 56)), (3, (24, 28, 32))])
def test_synthetic_pairs_are_seeded_and_redrawn(spatial_dims, shape):
    train = SyntheticPairs(spatial_dims, shape, length=3, seed=1)
    a, b = train[0], train[0]
    assert torch.equal(a["moving"], b["moving"]) and torch.equal(a["fixed_label"], b["fixed_label"])  # seeded
    assert a["moving"].shape == (1, *shape) and a["moving_label"].dtype == torch.int32
    assert a["moving"].min() == 0 and a["moving"].max() == 1  # the training normalisation
    assert (a["moving"][a["moving_label"] == 0] == 0).all()  # empty background, as skull-stripped scans
    assert not torch.equal(a["moving_label"], a["fixed_label"])  # two deformations of one label map
    overlap = (a["moving_label"] == a["fixed_label"]).float().mean()
    assert overlap > 0.3
    assert not torch.equal(train[1]["moving"], a["moving"])  # another index, another pair
    train.set_epoch(2)
    assert not torch.equal(train[0]["moving"], a["moving"])  # re-drawn every epoch
    fixed = SyntheticPairs(spatial_dims, shape, length=3, seed=1, redraw=False)
    first = fixed[0]["moving"]
    fixed.set_epoch(5)
    assert torch.equal(fixed[0]["moving"], first)  # validation pairs stay


def test_synthetic_strategy_uses_the_demo_label_maps(tmp_path):
    demo = make_demo(tmp_path / "demo", num_subjects=3, shape=(24, 28, 20))
    train = build_pair_dataset(demo, "train", 2, "synthetic", synth_shape=(32, 40), synth_pairs=16)
    val = build_pair_dataset(demo, "val", 2, "synthetic", synth_shape=(32, 40), synth_pairs=16)
    assert isinstance(train, SyntheticPairs) and len(train) == 16 and len(val) == 8 and not val.redraw
    assert train.label_maps and all(m.shape == (1, 32, 40) for m in train.label_maps)
    maxima = {int(train[i]["moving_label"].max()) for i in range(16)}
    assert any(m <= 4 for m in maxima) and any(m > 4 for m in maxima)  # seg4 maps and "shapes" maps


BAD_SYNTH = [
    # (arguments, message)
    ({"spatial_dims": 2, "shape": (8, 8)}, "synthetic shape must be 2 sizes of at least 16"),  # too small
    ({"spatial_dims": 3, "shape": (32, 32)}, "synthetic shape must be 3 sizes"),  # 2 sizes for 3D
    ({"spatial_dims": 2, "length": 0}, "need length >= 1"),  # empty
]


@pytest.mark.parametrize("kwargs,message", BAD_SYNTH)
def test_bad_synthetic_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticPairs(**kwargs)


# --- the shipped weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims,variant", SHIPPED)
def test_shipped_weights_match_manifest_and_architecture(spatial_dims, variant):
    entries = {e["path"]: e for e in read_manifest(BUNDLE)}
    relative = f"models/pretrained_{spatial_dims}d_{variant}.pt"
    entry = entries[relative]
    path = BUNDLE / relative
    assert sha256(path) == entry["hash_val"] and entry["hash_type"] == "sha256"
    assert path.stat().st_size < 2 * 1024 * 1024
    assert entry["command"].startswith("python -m custom pretrain") and entry["steps"] > 0 and entry["wall_time_s"] > 0
    net = RegistrationNet(spatial_dims, variant)
    assert load_pretrained(net, BUNDLE, spatial_dims, variant) == pretrained_path(BUNDLE, spatial_dims, variant)
    assert net.flow.weight.abs().max() > 1e-3  # trained, not the initial N(0, 1e-5)


def copy_bundle(tmp_path):
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    shutil.copy(BUNDLE / "large_files.yml", root / "large_files.yml")
    for spatial_dims, variant in SHIPPED:
        name = f"pretrained_{spatial_dims}d_{variant}.pt"
        shutil.copy(BUNDLE / "models" / name, root / "models" / name)
    return root


def test_pretrained_path_checks_hash_and_presence(tmp_path):
    root = copy_bundle(tmp_path)
    with pytest.raises(FileNotFoundError, match="no pretrained 2D 'baseline' model"):
        pretrained_path(root, 2, "baseline")
    weights = root / "models" / "pretrained_2d_both.pt"
    weights.write_bytes(weights.read_bytes() + b"tampered")
    with pytest.raises(ValueError, match="has sha256 .* but large_files.yml lists"):
        pretrained_path(root, 2, "both")
    state = torch.load(BUNDLE / "models" / "pretrained_2d_both.pt", weights_only=True)
    with pytest.raises(ValueError, match="checkpoint is for a 2D 'both'"):  # the arch buffer
        RegistrationNet(2, "maxpool").load_state_dict(state)


@pytest.fixture
def tiny_pretraining(tmp_path, monkeypatch):
    """A copy of the bundle, a tiny demo dataset and the options of a few-step 2D pretraining into that copy."""
    monkeypatch.chdir(tmp_path)
    make_demo(tmp_path / "demo", num_subjects=3, shape=(24, 28, 20))
    root = copy_bundle(tmp_path)
    return root, dict(minutes=5, shape=(32, 32), dataset_dir="demo", output_dir="pre", bundle_root=str(root))


def test_pretrain_reproduces_a_file_and_its_manifest_entry(tiny_pretraining, tmp_path):
    root, options = tiny_pretraining
    options.update(max_steps=3, synth_pairs=8, batch_size=4)
    path = pretrain(2, **options)
    assert path == str(root / "models" / "pretrained_2d_both.pt")
    entries = {e["path"]: e for e in read_manifest(root)}
    assert set(entries) == {"models/pretrained_2d_both.pt", "models/pretrained_3d_both.pt"}  # the other kept
    entry = entries["models/pretrained_2d_both.pt"]
    assert entry["hash_val"] == sha256(path) and entry["steps"] == 3 and "--max_steps 3" in entry["reproduce"]
    assert pretrained_path(root, 2, "both") == path
    shutil.rmtree(tmp_path / "pre")
    assert pretrain(2, **options) == path and sha256(path) == entry["hash_val"]  # the same seed, the same file
    assert "started_from" not in entry


def test_pretrain_fine_tunes_the_shipped_file_with_a_loader_process(tiny_pretraining):
    """``from_shipped`` starts from the shipped weights and records their hash; ``num_workers`` generates pairs."""
    root, options = tiny_pretraining
    before = sha256(root / "models" / "pretrained_2d_both.pt")
    options.update(max_steps=2, synth_pairs=4, batch_size=2, learning_rate=1e-5, from_shipped=True, num_workers=1)
    path = pretrain(2, **options)
    entry = {e["path"]: e for e in read_manifest(root)}["models/pretrained_2d_both.pt"]
    assert entry["started_from"] == before != entry["hash_val"]
    shipped = torch.load(REPO / "bundle" / "models" / "pretrained_2d_both.pt", weights_only=True)
    tuned = torch.load(path, weights_only=True)
    change = max(float((tuned[k].float() - shipped[k].float()).abs().max()) for k in shipped)
    assert 0 < change < 0.01  # two small steps from the shipped weights, not a new initialisation


def test_pretrain_on_real_pairs_records_subjects_held_out_dice_and_the_learning_curve(tmp_path, monkeypatch):
    """``real``: trains on some subjects, validates by Dice on the others (before the first step and after the
    last), and a continued run adds its hours and curve to the entry's."""
    monkeypatch.chdir(tmp_path)
    make_demo(tmp_path / "demo", num_subjects=5, shape=(24, 28, 20))
    root = copy_bundle(tmp_path)
    options = dict(real=True, dataset_dir="demo", label_weight=1.0, synth_pairs=2, batch_size=4, minutes=5)
    options.update(
        max_steps=2, output_dir="pre", bundle_root=str(root), val_subjects="OASIS_OAS1_0004_MR1,OASIS_OAS1_0005_MR1"
    )
    pretrain(2, **options)
    entry = {e["path"]: e for e in read_manifest(root)}["models/pretrained_2d_both.pt"]
    trained = ", ".join(f"OASIS_OAS1_000{i}_MR1" for i in (1, 2, 3))
    assert f"subjects {trained}: inter-subject" in entry["data"]
    held = "OASIS_OAS1_0004_MR1, OASIS_OAS1_0005_MR1"
    assert entry["data"].endswith(f"held out (validation Dice over the aligned_seg4 labels): {held}")
    assert "label Dice loss weight 1.0 (aligned_seg4)" in entry["data"] and "plus 2 synthetic pairs" in entry["data"]
    curve = entry["learning_curve"]
    assert len(curve) == 2 and 0 < curve[0][1] <= 1 and entry["held_out_dice"] == max(d for _, d in curve)
    assert curve[0][0] <= curve[1][0] <= entry["hours"] and "started_from" not in entry
    assert entry["trained_on"] == [f"OASIS_OAS1_000{i}_MR1" for i in (1, 2, 3)]
    assert entry["held_out"] == ["OASIS_OAS1_0004_MR1", "OASIS_OAS1_0005_MR1"]
    assert trained_subjects(root, 2, "both") == entry["trained_on"]
    assert trained_subjects(root, 3, "both") == trained_subjects(BUNDLE, 3, "both")  # the other entry kept
    shutil.rmtree(tmp_path / "pre")
    pretrain(2, **options, from_shipped=True)
    again = {e["path"]: e for e in read_manifest(root)}["models/pretrained_2d_both.pt"]
    assert again["started_from"] == entry["hash_val"] and again["learning_curve"][:2] == curve
    assert len(again["learning_curve"]) == 4  # hours add up (to the manifest's 4 decimals: a tiny run adds < 0.0001)
    assert abs(again["hours"] - (entry["hours"] + again["wall_time_s"] / 3600)) <= 1e-4
    assert again["trained_on"] == entry["trained_on"] and again["held_out"] == entry["held_out"]


@pytest.mark.parametrize(
    "subjects,kwargs,message",
    [
        (3, {}, "--real True needs at least 4 subjects with aligned_norm and a label map in 'demo'"),  # too few
        (4, {"val_subjects": "OASIS_OAS1_0001_MR1"}, "need 2 or more training and 2 or more validation"),  # one held
        (4, {"val_subjects": "nobody,OASIS_OAS1_0001_MR1"}, "unknown subjects in the split lists: \\['nobody'\\]"),
    ],
)
def test_pretrain_on_real_pairs_refuses_too_few_subjects(tmp_path, monkeypatch, subjects, kwargs, message):
    monkeypatch.chdir(tmp_path)
    make_demo(tmp_path / "demo", num_subjects=subjects, shape=(24, 28, 20))
    with pytest.raises(ValueError, match=message):
        pretrain(2, real=True, dataset_dir="demo", bundle_root=str(tmp_path / "none"), **kwargs)


# --- registering out of the box ---------------------------------------------------------------------------


def register(args, cwd):
    cmd = [sys.executable, "-m", "custom", "register"] + args
    proc = run_python(cmd, cwd, python_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def lncc(a, b):
    return float(-LocalNCCLoss(2, 9)(torch.as_tensor(a)[None, None], torch.as_tensor(b)[None, None]))


def test_fresh_checkout_registers_demo_pair_without_training(tmp_path):
    demo = make_demo(tmp_path / "demo", num_subjects=2, shape=(80, 96, 112))
    moving, fixed = (
        demo / "OASIS_OAS1_0002_MR1" / "slice_norm.nii.gz",
        demo / "OASIS_OAS1_0001_MR1" / "slice_norm.nii.gz",
    )
    register(["--moving", str(moving), "--fixed", str(fixed), "--output_dir", str(tmp_path / "out")], REPO)
    warped = nib.load(next((tmp_path / "out").glob("*_warped.nii.gz"))).get_fdata()[..., 0]
    m, f = (nib.load(p).get_fdata()[..., 0] for p in (moving, fixed))
    assert lncc(warped, f) > lncc(m, f) + 0.05


def test_registers_real_pair_without_training(real_data, tmp_path):
    moving, fixed = real_data / "subject_b" / "slice_norm.nii.gz", real_data / "subject_a" / "slice_norm.nii.gz"
    register(
        ["--moving", str(moving), "--fixed", str(fixed), "--output_dir", str(tmp_path / "out"), "--refine_steps", "0"],
        REPO,
    )
    warped = nib.load(next((tmp_path / "out").glob("*_warped.nii.gz"))).get_fdata()[..., 0]
    m, f = (nib.load(p).get_fdata()[..., 0] for p in (moving, fixed))
    assert lncc(warped, f) > lncc(m, f) + 0.02  # the network alone, trained on synthetic pairs only
    assert np.isfinite(warped).all()
