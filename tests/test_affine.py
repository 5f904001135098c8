"""The affine stage (custom/affine.py): known affines recovered on oblique, anisotropic grids in 2D and 3D, the ITK
transform file as SimpleITK reads it, implausible transforms refused, and on a real native scan: register's affine
file and field applied by SimpleITK and ANTs reproduce register's own outputs."""

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from warm_python import python_env, run_python

from custom.affine import (
    align_affine,
    check_plausible,
    grid_coordinates,
    grid_record,
    plane_frame,
    plane_transform,
    read_itk_affine,
    voxel_map,
    world_transform,
    write_itk_affine,
)
from custom.atomic import written_by_us
from custom.interop import apply_field, read_field, write_field
from custom.warp import sample_at

REPO = Path(__file__).resolve().parents[1]
LABELLED = REPO.parent / "shared" / "data" / "oasis_labelled"
_RNG = np.random.default_rng(3)
BLOBS = [(_RNG.uniform(-22, 22, 3), _RNG.uniform(2.5, 6.0), _RNG.uniform(0.3, 1.0)) for _ in range(40)]
"""Gaussian blobs (centre mm, width mm, weight): structure at several scales, as LNCC needs."""


def _image(affine: np.ndarray, shape, world_to_content: np.ndarray) -> torch.Tensor:
    """Gaussian blobs (an asymmetric 'head'), sampled at ``world_to_content @ affine @ voxel`` of a grid."""
    nd = len(shape)
    points = grid_coordinates(torch.as_tensor(world_to_content @ affine), shape)[0].double()
    out = torch.zeros(shape, dtype=torch.float64)
    for centre, width, weight in BLOBS:
        d2 = sum((points[i] - centre[i]) ** 2 for i in range(nd))
        out += weight * torch.exp(-d2 / (2 * width**2))
    return out[None, None].float()


def _grid(nd: int, spacing, angle_deg: float, origin) -> np.ndarray:
    rotation = Rotation.from_euler("z", angle_deg, degrees=True).as_matrix()[:nd, :nd]  # in the first two axes
    affine = np.eye(nd + 1)
    affine[:nd, :nd] = rotation @ np.diag(spacing)
    affine[:nd, nd] = origin
    return affine


def _known(nd: int) -> np.ndarray:
    """A moving-from-fixed transform: a rotation, a scale and a translation."""
    t = np.eye(nd + 1)
    angles = ("xyz", [6, -4, 9]) if nd == 3 else ("z", 9)
    rotation = Rotation.from_euler(*angles, degrees=True).as_matrix()[:nd, :nd]
    t[:nd, :nd] = rotation @ np.diag([1.06, 0.95, 1.0][:nd])
    t[:nd, nd] = [5.0, -4.0, 3.0][:nd]
    return t


@pytest.mark.parametrize(
    "nd,fixed_grid,moving_grid,shape_f,shape_m",
    [
        (3, ((1.5, 1.5, 1.5), 0, (-36, -36, -36)), ((2.0, 1.2, 1.6), 20, (-30, -40, -35)), (48,) * 3, (40, 64, 48)),
        (2, ((1.0, 1.0), 0, (-48, -48)), ((1.4, 0.8), -25, (-40, -20)), (96, 96), (72, 120)),
    ],
)  # oblique and anisotropic moving grids, other fields of view
def test_known_affines_are_recovered(nd, fixed_grid, moving_grid, shape_f, shape_m):
    truth = _known(nd)
    fixed_affine, moving_affine = _grid(nd, *fixed_grid), _grid(nd, *moving_grid)
    fixed = _image(fixed_affine, shape_f, np.eye(nd + 1))
    moving = _image(moving_affine, shape_m, np.linalg.inv(truth))  # moving(T x) = fixed(x)
    result = align_affine(moving, fixed, moving_affine, fixed_affine)
    corners = np.array(np.meshgrid(*[[-20.0, 20.0]] * nd, indexing="ij")).reshape(nd, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    error = np.abs(result.transform @ corners - truth @ corners)[:nd].max()
    assert error < 3.0, (error, result.transform, truth)  # mm, over a 40 mm box around the content
    assert result.aligned > result.centred + 0.1  # the stage raises the similarity
    scales = np.linalg.svd(result.transform[:nd, :nd], compute_uv=False)
    assert np.allclose(sorted(scales), sorted(np.linalg.svd(truth[:nd, :nd], compute_uv=False)), atol=0.07)


@pytest.mark.parametrize("nd,shape", [(2, (64, 64)), (3, (40, 40, 40))])  # an evaluation split's slices, volumes
def test_pairs_on_one_grid_are_registered_after_the_affine_stage(nd, shape):
    """evaluate.json's inferer: the affine stage on voxel coordinates, then the deformable stage, composed into one
    displacement that pulls the moving image onto the fixed one (inside an evaluator's no_grad)."""
    from custom.refine import RefiningInferer

    grid = np.eye(nd + 1)
    grid[:nd, :nd] *= 1.5
    grid[:nd, nd] = -0.75 * (np.array(shape) - 1)  # 1.5 mm voxels around the blobs
    fixed = _image(grid, shape, np.eye(nd + 1))
    moving = _image(grid, shape, np.linalg.inv(_known(nd)))
    zero = torch.nn.Module()
    zero.forward = lambda x: x.new_zeros(x.shape[0], nd, *x.shape[2:])  # a network predicting nothing
    with torch.no_grad():
        ddf = RefiningInferer(0, affine=True)(torch.cat([moving, fixed], 1), zero)
        warped = sample_at(moving, grid_coordinates(torch.eye(nd + 1), shape, ddf))
    before, after = (float((image - fixed).abs().mean() / fixed.abs().mean()) for image in (moving, warped))
    assert ddf.shape == (1, nd, *shape) and after < 0.25 * before, (before, after)


@pytest.mark.parametrize(
    "linear,message",
    [
        (np.diag([-1.0, 1.0, 1.0]), "flips or collapses"),  # a mirror
        (np.diag([0.3, 1.0, 1.0]), "flips or collapses"),  # a collapse
        (np.diag([1.0, 2.5, 1.0]), r"scales 2\.50, 1\.00, 1\.00"),  # a blow-up, with the scales named
    ],
)  # implausible transforms are refused, naming what was found
def test_implausible_transforms_are_refused(linear, message):
    transform = np.eye(4)
    transform[:3, :3] = linear
    with pytest.raises(ValueError, match=message):
        check_plausible(transform)
    assert check_plausible(np.eye(4)) == [1.0, 1.0, 1.0]


def test_itk_file_is_what_simpleitk_reads(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    truth = _known(3)
    path = write_itk_affine(tmp_path / "a.txt", truth)
    transform = sitk.ReadTransform(str(path))
    flip = np.array([-1.0, -1.0, 1.0])
    for point in ([0.0, 0.0, 0.0], [10.0, -20.0, 30.0]):  # RAS
        expected = (truth @ np.array(point + [1.0]))[:3] * flip
        assert np.allclose(transform.TransformPoint(tuple(np.array(point) * flip)), expected, atol=1e-9)
    assert np.allclose(read_itk_affine(path), truth, atol=1e-12)
    assert written_by_us(path)  # a rerun with --overwrite may replace it
    frame = plane_frame(np.array([[0.0, 0.0, 1.2, 5.0], [-1.0, 0.0, 0.0, 3.0], [0.0, 0.9, 0.0, -7.0], [0, 0, 0, 1]]))
    plane = write_itk_affine(tmp_path / "b.txt", world_transform(_known(2), frame))  # a slice across world axes
    assert np.allclose(plane_transform(read_itk_affine(plane), frame), _known(2), atol=1e-12)
    flat = world_transform(_known(2), plane_frame(np.diag([1.0, 1.2, 1.0, 1.0])))  # a 2-D file's, in the x-y plane
    planar = sitk.ReadTransform(str(write_itk_affine(tmp_path / "c.txt", flat, planar=True)))
    assert planar.GetDimension() == 2 and np.allclose(read_itk_affine(tmp_path / "c.txt"), flat, atol=1e-12)
    expected = (flat @ np.array([10.0, -20.0, 0.0, 1.0]))[:2] * flip[:2]
    assert np.allclose(planar.TransformPoint((-10.0, 20.0)), expected, atol=1e-9)
    with pytest.raises(ValueError, match="a 2-D transform acts in the world x-y plane"):
        write_itk_affine(tmp_path / "d.txt", truth, planar=True)


@pytest.mark.parametrize(
    "text,message",
    [
        ("#Insight Transform File V1.0\nTransform: Euler3DTransform_double_3_3\n", "is not an ITK AffineTransform"),
        ("Transform: AffineTransform_double_3_3\nParameters: 1 0 0\n", "does not hold the 12 parameters"),
        ("Transform: AffineTransform_double_3_3\nParameters: " + "nan " * 12 + "\n", "does not hold the 12"),
        ("Transform: AffineTransform_double_2_2\nParameters: 1 0 0 1\n", "does not hold the 6 parameters of a 2D"),
        ("Transform: AffineTransform_double_4_4\nParameters: 1\n", r"not an ITK AffineTransform_double_3_3 \(or _2_2"),
    ],
)  # files that are not our transform
def test_bad_transform_files(tmp_path, text, message):
    (tmp_path / "t.txt").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_itk_affine(tmp_path / "t.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_itk_affine(tmp_path / "none.txt")


def test_apply_takes_the_pairs_transform_and_refuses_another_pairs(tmp_path):
    """apply --affine samples the moving image once through field and affine, exactly as register's writer does
    (the same composed sampling); a transform file recorded for other grids is refused before anything is written."""
    truth = _known(3)
    fixed_affine, moving_affine = _grid(3, (1.5, 1.5, 1.5), 0, (-36, -36, -36)), _grid(
        3, (2.0, 1.2, 1.6), 20, (-30, -40, -35)
    )
    fixed = nib.Nifti1Image(_image(fixed_affine, (48,) * 3, np.eye(4))[0, 0].numpy(), fixed_affine)
    moving_data = _image(moving_affine, (40, 64, 48), np.linalg.inv(truth))[0, 0].numpy()
    nib.save(nib.Nifti1Image(moving_data, moving_affine), str(tmp_path / "moving.nii.gz"))
    ddf = 0.5 * torch.randn(3, 48, 48, 48)
    write_field(ddf, fixed, tmp_path / "ddf.nii.gz", "itk")
    grids = (grid_record((40, 64, 48), moving_affine), grid_record((48,) * 3, fixed_affine))
    write_itk_affine(tmp_path / "affine.txt", truth, *grids)
    apply_field(
        tmp_path / "moving.nii.gz", tmp_path / "ddf.nii.gz", tmp_path / "out.nii.gz", affine=tmp_path / "affine.txt"
    )
    field, field_affine, grid = read_field(tmp_path / "ddf.nii.gz")
    matrix = torch.as_tensor(voxel_map(truth, moving_affine, field_affine))
    expected = sample_at(torch.as_tensor(moving_data)[None, None], grid_coordinates(matrix, grid, field[None]))[0, 0]
    out = nib.load(str(tmp_path / "out.nii.gz"))
    assert np.allclose(out.get_fdata(), expected.numpy(), atol=1e-5) and np.allclose(out.affine, fixed_affine)
    assert np.corrcoef(out.get_fdata().ravel(), fixed.get_fdata().ravel())[0, 1] > 0.5  # the content came along
    other = nib.Nifti1Image(moving_data[:, :, :40], moving_affine)  # another subject's grid
    nib.save(other, str(tmp_path / "other.nii.gz"))
    with pytest.raises(ValueError, match="was computed for another pair: its moving grid"):
        apply_field(
            tmp_path / "other.nii.gz", tmp_path / "ddf.nii.gz", tmp_path / "x.nii.gz", affine=tmp_path / "affine.txt"
        )
    assert not (tmp_path / "x.nii.gz").exists()


@pytest.mark.slow
@pytest.mark.skipif(not LABELLED.is_dir(), reason="../shared/data/oasis_labelled is not here")
def test_native_scan_registered_and_applied_by_itk_and_ants(tmp_path):
    """OASIS 0001 in its native space (256^3, LIA) to 0002 aligned: the affine file and field that register writes,
    applied by SimpleITK (CompositeTransform) and ANTs (transformlist=[ddf, affine]), give register's outputs."""
    sitk = pytest.importorskip("SimpleITK")
    ants = pytest.importorskip("ants")
    moving, fixed = LABELLED / "OASIS_OAS1_0001_MR1", LABELLED / "OASIS_OAS1_0002_MR1"
    cmd = [sys.executable, "-m", "custom", "register", "--moving", str(moving / "norm.nii.gz"), "--fixed"]
    cmd += [str(fixed / "aligned_norm.nii.gz"), "--moving_label", str(moving / "seg35.nii.gz"), "--affine", "true"]
    cmd += ["--refine_steps", "[10,0,0]", "--output_dir", str(tmp_path)]
    proc = run_python(cmd, REPO, python_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = tmp_path / "norm__to__OASIS_OAS1_0002_MR1_aligned_norm"
    ours = nib.load(f"{name}_warped.nii.gz").get_fdata()
    label = np.asarray(nib.load(f"{name}_warped_label.nii.gz").dataobj)
    truth = np.asarray(nib.load(str(fixed / "aligned_seg35.nii.gz")).dataobj)
    dice = np.mean(
        [2 * ((label == k) & (truth == k)).sum() / ((label == k).sum() + (truth == k).sum()) for k in range(1, 36)]
    )
    assert dice > 0.6  # the native scan found the common space (by world coordinates alone: 0.15)
    reference = sitk.ReadImage(str(fixed / "aligned_norm.nii.gz"))
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.ReadTransform(f"{name}_affine.txt"))  # applied last
    composite.AddTransform(
        sitk.DisplacementFieldTransform(sitk.ReadImage(f"{name}_ddf.nii.gz", sitk.sitkVectorFloat64))
    )
    image = sitk.ReadImage(str(moving / "norm.nii.gz"), sitk.sitkFloat32)
    theirs = sitk.GetArrayFromImage(sitk.Resample(image, reference, composite, sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
    scale = ours.max() - ours.min()
    assert np.abs(theirs - ours).max() <= 1e-3 * scale
    labels = sitk.Resample(sitk.ReadImage(str(moving / "seg35.nii.gz")), reference, composite, sitk.sitkNearestNeighbor)
    assert (sitk.GetArrayFromImage(labels).transpose(2, 1, 0) == label).mean() >= 0.999
    warped = ants.apply_transforms(
        ants.image_read(str(fixed / "aligned_norm.nii.gz")),
        ants.image_read(str(moving / "norm.nii.gz")),
        transformlist=[f"{name}_ddf.nii.gz", f"{name}_affine.txt"],
    )
    assert np.abs(warped.numpy() - ours).max() <= 1e-3 * scale
    applied = [sys.executable, "-m", "custom", "apply", "--image", str(moving / "seg35.nii.gz"), "--field"]
    applied += [f"{name}_ddf.nii.gz", "--affine", f"{name}_affine.txt", "--output", str(tmp_path / "applied.nii.gz")]
    proc = run_python(applied, REPO, python_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "applied.nii.gz")).dataobj), label)  # register's own


def _planar_nifti(path, data: torch.Tensor, affine_2d: np.ndarray, z_mm: float = 5.0):
    """A 2-D NIfTI file (two axes) of ``data`` ``(1, 1, X, Y)`` on the in-plane grid ``affine_2d`` (3x3), at height
    ``z_mm`` (which ITK drops for 2-D files)."""
    affine = np.eye(4)
    affine[:2, :2], affine[:2, 3], affine[2, 3] = affine_2d[:2, :2], affine_2d[:2, 2], z_mm
    nib.save(nib.Nifti1Image(data[0, 0].numpy().astype(np.float32), affine), str(path))
    return str(path)


@pytest.mark.slow
def test_2d_files_are_registered_and_applied_by_simpleitk(tmp_path):
    """Two 2-D NIfTI files (two axes; the moving one on a rotated, anisotropic grid with another field of view): the
    field is a 2-D MetaImage and the affine an AffineTransform_double_2_2, which SimpleITK composes into register's
    own warped image; apply with the pair's affine gives it too. (The moving image is blank along its edges, where
    ITK and we sample outside the image differently.)"""
    sitk = pytest.importorskip("SimpleITK")
    fixed_grid, moving_grid = _grid(2, (1.0, 1.0), 0, (-32, -32)), _grid(2, (1.2, 0.9), 15, (-30, -28))
    fixed = _planar_nifti(tmp_path / "fixed.nii.gz", _image(fixed_grid, (64, 64), np.eye(3)), fixed_grid)
    moving_image = _image(moving_grid, (56, 72), np.linalg.inv(_known(2)))
    moving_image[..., :2, :], moving_image[..., -2:, :], moving_image[..., :2], moving_image[..., -2:] = 0, 0, 0, 0
    moving = _planar_nifti(tmp_path / "moving.nii.gz", moving_image, moving_grid, z_mm=-3.0)
    cmd = [sys.executable, "-m", "custom", "register", "--moving", moving, "--fixed", fixed, "--refine_steps", "5"]
    proc = run_python(cmd + ["--output_dir", str(tmp_path / "out")], REPO, python_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = tmp_path / "out" / "moving__to__fixed"
    assert "Transform: AffineTransform_double_2_2" in Path(f"{name}_affine.txt").read_text()
    ours = nib.load(f"{name}_warped.nii.gz").get_fdata()
    composite = sitk.CompositeTransform(2)
    composite.AddTransform(sitk.ReadTransform(f"{name}_affine.txt"))  # applied last
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.ReadImage(f"{name}_ddf.mha", sitk.sitkVectorFloat64)))
    reference, image = sitk.ReadImage(fixed), sitk.ReadImage(moving, sitk.sitkFloat32)
    assert reference.GetDimension() == 2 and ours.shape == (64, 64)
    theirs = sitk.GetArrayFromImage(sitk.Resample(image, reference, composite, sitk.sitkLinear, 0.0)).T
    assert np.abs(theirs - ours).max() <= 1e-3 * (ours.max() - ours.min())
    assert np.corrcoef(ours.ravel(), nib.load(fixed).get_fdata().ravel())[0, 1] > 0.8  # registered
    applied = apply_field(moving, f"{name}_ddf.mha", tmp_path / "applied.nii.gz", affine=f"{name}_affine.txt")
    assert np.allclose(nib.load(applied[0]).get_fdata(), ours, atol=1e-5)
