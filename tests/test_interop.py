"""Our displacement fields, applied by the real ITK (SimpleITK), give our own warped image."""

import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from custom import SpatialTransformer
from custom.interop import check_itk_affine, ddf_to_itk, ddf_to_voxel_image

sitk = pytest.importorskip("SimpleITK", reason='SimpleITK is not installed (pip install -e ".[interop]")')

SHAPE = (20, 24, 18)


def rotation(axis, degrees):
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def oblique_affine():
    """Rotated about two axes, anisotropic spacing, one flipped axis, a non-zero origin: what an identity hides."""
    m = rotation(0, 20) @ rotation(2, -35) @ np.diag([1.2, -0.9, 2.0])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = m, [-31.0, 12.5, 7.25]
    return affine


def smooth(shape, channels, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(1, channels, *[max(2, n // 5) for n in shape], generator=gen)
    return scale * F.interpolate(low, size=shape, mode="trilinear", align_corners=True)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("itk")
    affine = oblique_affine()
    moving = smooth(SHAPE, 1, 1.0, 0).abs()
    ddf = smooth(SHAPE, 3, 2.5, 1)  # all three components non-zero, up to a few voxels
    assert (ddf.abs().flatten(2).amax(2) > 1.0).all()
    warped = SpatialTransformer("bilinear", "zeros")(moving, ddf)[0, 0].numpy()
    fixed_img = nib.Nifti1Image(np.zeros(SHAPE, np.float32), affine)
    nib.save(nib.Nifti1Image(moving[0, 0].numpy(), affine), str(root / "moving.nii.gz"))
    nib.save(fixed_img, str(root / "fixed.nii.gz"))
    return root, fixed_img, ddf[0], warped


def sitk_warp(root, field_path):
    field = sitk.ReadImage(str(field_path))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    out = sitk.Resample(sitk.ReadImage(str(root / "moving.nii.gz")), sitk.ReadImage(str(root / "fixed.nii.gz")),
                        transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)


def interior_error(a, b, margin=4):
    inner = (slice(margin, -margin),) * 3
    return float(np.abs(a[inner] - b[inner]).max())


def test_itk_field_layout(case):
    root, fixed_img, ddf, _ = case
    image = ddf_to_itk(ddf, fixed_img)
    assert image.shape == SHAPE + (1, 3) and image.get_data_dtype() == np.float32
    assert image.header.get_intent()[0] == "vector" and int(image.header["intent_code"]) == 1007
    np.testing.assert_allclose(image.get_sform(), fixed_img.affine, atol=1e-5)
    np.testing.assert_allclose(image.get_qform(), fixed_img.affine, atol=1e-5)
    assert image.header.get_xyzt_units()[0] == "mm"


def test_simpleitk_applies_our_field_as_we_do(case):
    root, fixed_img, ddf, warped = case
    nib.save(ddf_to_itk(ddf, fixed_img), str(root / "ddf.nii.gz"))
    theirs = sitk_warp(root, root / "ddf.nii.gz")
    assert interior_error(theirs, warped) < 1e-3 * np.abs(warped).max()


def without_lps_flip(ddf, fixed_img):
    image = ddf_to_itk(ddf, fixed_img)
    data = np.asarray(image.dataobj).copy()
    data[..., :2] *= -1  # back to RAS
    return nib.Nifti1Image(data, image.affine, image.header)


def with_intent_1006(ddf, fixed_img):
    image = ddf_to_itk(ddf, fixed_img)
    image.header.set_intent(1006)  # NIFTI_INTENT_DISPVECT
    return image


@pytest.mark.parametrize("broken", [without_lps_flip, with_intent_1006])
def test_negative_controls_do_not_match(case, broken):
    """Writing RAS components, or intent 1006 (which ITK >= 5.4 converts from RAS), must break the match."""
    root, fixed_img, ddf, warped = case
    path = root / f"{broken.__name__}.nii.gz"
    nib.save(broken(ddf, fixed_img), str(path))
    try:
        theirs = sitk_warp(root, path)
    except RuntimeError:  # read as something that is not a displacement field at all
        return
    assert interior_error(theirs, warped) > 0.05 * np.abs(warped).max()


def test_2d_field_is_the_field_of_one_slice(tmp_path):
    affine = np.diag([-1.0, 1.5, 1.0, 1.0])
    fixed_img = nib.Nifti1Image(np.zeros((12, 10, 1), np.float32), affine)
    ddf = torch.randn(2, 12, 10)
    image = ddf_to_itk(ddf, fixed_img)
    data = np.asarray(image.dataobj)
    assert image.shape == (12, 10, 1, 1, 3)
    # RAS = M @ u: x = -u0, y = 1.5 u1; LPS negates x and y
    np.testing.assert_allclose(data[:, :, 0, 0, 0], ddf[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(data[:, :, 0, 0, 1], -1.5 * ddf[1].numpy(), rtol=1e-6)
    assert (data[..., 2] == 0).all()
    voxel = ddf_to_voxel_image(ddf, fixed_img)
    assert voxel.shape == (12, 10, 1, 2) and int(voxel.header["intent_code"]) == 0


BAD_AFFINES = [
    # (affine, message)
    (np.array([[1.0, 0.3, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]]), "affine with shear"),  # shear
    (np.diag([1.0, 0.0, 1.0, 1.0]), "singular affine"),  # zero spacing
]


@pytest.mark.parametrize("affine,message", BAD_AFFINES)
def test_affines_itk_cannot_hold_are_refused(affine, message):
    with pytest.raises(ValueError, match=message):
        check_itk_affine(affine)


def test_field_export_refuses_shear():
    affine = BAD_AFFINES[0][0]
    with pytest.raises(ValueError, match="affine with shear"):
        ddf_to_itk(torch.zeros(3, 4, 4, 4), nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), affine))


def test_oblique_affine_is_accepted():
    check_itk_affine(oblique_affine())


@pytest.mark.slow
def test_register_writes_a_field_simpleitk_applies(tmp_path):
    """`python -m custom register` on 3D inputs with another grid than the identity: SimpleITK, given the written
    field, resamples the moving image into our warped image."""
    import subprocess
    import sys

    from custom.data import make_demo

    demo = make_demo(tmp_path / "demo", num_subjects=2, shape=(32, 40, 28))
    affine = oblique_affine()
    for name in ("moving", "fixed"):
        src = demo / f"OASIS_OAS1_000{1 if name == 'fixed' else 2}_MR1" / "aligned_norm.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(nib.load(src).dataobj), affine), str(tmp_path / f"{name}.nii.gz"))
    cmd = [sys.executable, "-m", "custom", "register", "--moving", "moving.nii.gz", "--fixed", "fixed.nii.gz",
           "--spatial_dims", "3", "--refine_steps", "20", "--output_dir", "out"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddf_path = next((tmp_path / "out").glob("*_ddf.nii.gz"))
    field = np.asarray(nib.load(ddf_path).dataobj)
    assert np.abs(field).max() > 0.3  # the refinement moved things: not a trivial identity
    ours = nib.load(next((tmp_path / "out").glob("*_warped.nii.gz"))).get_fdata()
    theirs = sitk_warp(tmp_path, ddf_path)
    assert interior_error(theirs, ours) < 1e-3 * np.abs(ours).max()
