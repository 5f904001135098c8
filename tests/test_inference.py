"""Listing and checking a user's pairs: what is not an image, CSV mistakes (the bad-input tables of
test_bundle and test_cli run the same cases end to end)."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom.inference import LABEL_NAME, RegistrationPairs, list_pairs


@pytest.mark.parametrize("value", [0, -1.0, "8"])
def test_bad_memory_limit(value):
    with pytest.raises(ValueError, match="max_memory_gb must be a number > 0 or null"):
        RegistrationPairs(lambda: [], 3, max_memory_gb=value)


def _save(path, array, dtype=np.float32, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _translation(x_mm):
    affine = np.eye(4)
    affine[0, 3] = x_mm
    return affine


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    brain = np.zeros((32, 36, 1), np.float32)
    brain[6:26, 8:30] = rng.random((20, 22, 1))
    seg = (brain * 5).round().astype(np.uint8)
    nearly_empty = np.zeros_like(brain)
    nearly_empty[10, 10, 0] = 1.0
    return {
        "image": _save(tmp_path / "slice_norm.nii.gz", brain),
        "image2": _save(tmp_path / "other_norm.nii.gz", np.roll(brain, 2, 0)),
        "seg": _save(tmp_path / "slice_seg24.nii.gz", seg, np.uint8),
        "unnamed_seg": _save(tmp_path / "parcels.nii.gz", seg, np.int16),  # a label map by content alone
        "float_seg": _save(tmp_path / "float_parcels.nii.gz", seg, np.float32),  # integer values stored as float
        "empty": _save(tmp_path / "empty.nii.gz", nearly_empty),
        "small": _save(tmp_path / "small.nii.gz", rng.random((8, 8, 1))),
        "volume": _save(tmp_path / "volume.nii.gz", rng.random((20, 20, 20))),
        "far": _save(tmp_path / "far_norm.nii.gz", brain, affine=_translation(1000.0)),  # 1 m away in the world
    }


@pytest.mark.parametrize(
    "moving,fixed,message",
    [
        ("seg", "image", r"looks like a label map \(6 distinct integer values\).*pass it as --moving_label"),  # seg
        ("float_seg", "image", "looks like a label map"),  # a label map stored as float
        ("image", "seg", "looks like a label map.*give the fixed image, not its label map"),  # as the fixed
        ("empty", "image", r"is nearly empty: 0\.\d+% of its voxels"),  # one voxel
        ("small", "image", "8x8 grid: too small to register"),  # smaller than the network's coarsest grid
        ("image", "volume", "is a 2-D image but fixed .* is 3-D; give a moving and a fixed image of one"),  # 2D/3D
        (
            "far",
            "image",
            r"world mm \[999\.5, 1031\.5\].*do not overlap at all.*drop --affine False",
        ),  # resampled to nothing
    ],
)  # each refused before any work, naming the file and the cause (resampling by world coordinates, no affine stage)
def test_what_is_not_a_registrable_image_is_refused(images, moving, fixed, message):
    dims = 3 if fixed == "volume" else 2
    pairs = RegistrationPairs(lambda: list_pairs(images[moving], images[fixed]), dims, resample=True)
    with pytest.raises(ValueError, match=message):
        pairs.validate()


def test_a_folder_skips_label_maps_and_names_them(images, capsys):
    folder = str(Path(images["image"]).parent)
    listed = [Path(p["moving"]).name for p in list_pairs(folder, images["image2"])]
    assert "slice_seg24.nii.gz" not in listed and "parcels.nii.gz" not in listed  # by name, by content
    assert {"slice_norm.nii.gz", "other_norm.nii.gz", "volume.nii.gz"} <= set(listed)
    assert "skipped 2 label map(s)" in capsys.readouterr().err
    list_pairs(folder, images["image2"], report=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "rows,message",
    [
        ("moving,fixed\n", "has its header but no rows"),  # header only
        ("a,b\nx,y\n", r"needs a header with columns moving,fixed\[,moving_label\], got \['a', 'b'\]"),  # no header
        ("moving,fixed\n{m},{f}\n{m},{f}\n", "line 3 repeats line 2; list each pair once"),  # duplicate rows
    ],
)
def test_pairs_csv_mistakes(images, tmp_path, rows, message):
    table = tmp_path / "pairs.csv"
    table.write_text(rows.format(m=images["image"], f=images["image2"]))
    with pytest.raises(ValueError, match=message):
        list_pairs(pairs=str(table))


@pytest.mark.parametrize(
    "label,expected",
    [
        ("slice_seg24", True),
        ("seg35", True),
        ("aparc+aseg", True),
        ("brainmask", False),
        ("aligned_norm", False),
        ("segment_t1", False),
    ],
)
def test_label_file_names(label, expected):
    assert bool(LABEL_NAME.search(label)) is expected
