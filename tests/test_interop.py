"""Our displacement fields, applied by the real ITK (SimpleITK), give our own warped image."""

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from warm_python import python_env, run_python

from custom import SpatialTransformer
from custom.interop import apply_field, check_itk_affine, ddf_to_itk, ddf_to_voxel_image, read_field, write_field

sitk = pytest.importorskip("SimpleITK", reason='SimpleITK is not installed (pip install -e ".[interop]")')

SHAPE = (20, 24, 18)
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "oasis_real"


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
    out = sitk.Resample(
        sitk.ReadImage(str(root / "moving.nii.gz")),
        sitk.ReadImage(str(root / "fixed.nii.gz")),
        transform,
        sitk.sitkLinear,
        0.0,
    )
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
    import sys

    from custom.data import make_demo

    demo = make_demo(tmp_path / "demo", num_subjects=2, shape=(32, 40, 28))
    affine = oblique_affine()
    for name in ("moving", "fixed"):
        src = demo / f"OASIS_OAS1_000{1 if name == 'fixed' else 2}_MR1" / "aligned_norm.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(nib.load(src).dataobj), affine), str(tmp_path / f"{name}.nii.gz"))
    cmd = [
        sys.executable,
        "-m",
        "custom",
        "register",
        "--moving",
        "moving.nii.gz",
        "--fixed",
        "fixed.nii.gz",
        "--spatial_dims",
        "3",
        "--refine_steps",
        "20",
        "--affine",
        "False",  # the field alone (tests/test_affine.py applies field and affine together)
        "--output_dir",
        "out",
    ]
    proc = run_python(cmd, tmp_path, python_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddf_path = next((tmp_path / "out").glob("*_ddf.nii.gz"))
    field = np.asarray(nib.load(ddf_path).dataobj)
    assert np.abs(field).max() > 0.3  # the refinement moved things: not a trivial identity
    ours = nib.load(next((tmp_path / "out").glob("*_warped.nii.gz"))).get_fdata()
    theirs = sitk_warp(tmp_path, ddf_path)
    assert interior_error(theirs, ours) < 1e-3 * np.abs(ours).max()


def slice_affine():
    """A single slice whose second array axis points superior-inferior (as the neurite-OASIS slices), rotated,
    anisotropic and off the origin: its top-left 2x2 direction block is singular."""
    m = rotation(2, 25) @ np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]) @ np.diag([0.9, 1.3, 2.0])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = m, [40.0, -3.5, 61.0]
    return affine


def synthetic_pair(root: Path, spatial_dims: int):
    """Moving and fixed images on one oblique grid (a volume, or one slice), and a smooth field of a few voxels."""
    shape, affine = (SHAPE, oblique_affine()) if spatial_dims == 3 else (SHAPE[:2] + (1,), slice_affine())
    moving = smooth(shape, 1, 1.0, 0).abs()[0, 0].numpy()
    for name in ("moving", "fixed"):
        nib.save(nib.Nifti1Image(moving if name == "moving" else 0 * moving, affine), str(root / f"{name}.nii.gz"))
    ddf = smooth(SHAPE[:spatial_dims], spatial_dims, 2.5, 1)[0] if spatial_dims == 3 else None
    if spatial_dims == 2:
        gen = torch.Generator().manual_seed(1)
        low = torch.randn(1, 2, 4, 5, generator=gen)
        ddf = 2.5 * F.interpolate(low, size=SHAPE[:2], mode="bilinear", align_corners=True)[0]
    return root / "moving.nii.gz", root / "fixed.nii.gz", ddf


def real_pair(root: Path, spatial_dims: int):
    """Two real subjects of ../shared (slices or volumes: one grid), and a smooth field of a few voxels."""
    name = "slice_norm.nii.gz" if spatial_dims == 2 else "aligned_norm.nii.gz"
    moving, fixed = REAL / "subject_b" / name, REAL / "subject_a" / name
    shape = nib.load(fixed).shape[:spatial_dims]
    gen = torch.Generator().manual_seed(2)
    low = torch.randn(1, spatial_dims, *[max(2, n // 20) for n in shape], generator=gen)
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    return moving, fixed, 3.0 * F.interpolate(low, size=shape, mode=mode, align_corners=True)[0]


def ours(moving: Path, ddf: torch.Tensor) -> np.ndarray:
    image = torch.from_numpy(np.asarray(nib.load(moving).dataobj, dtype=np.float32).reshape(ddf.shape[1:]))
    return SpatialTransformer("bilinear", "zeros")(image[None, None], ddf[None])[0, 0].numpy()


def simpleitk_apply(moving: Path, fixed: Path, field: Path) -> np.ndarray:
    transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(field)), sitk.sitkVectorFloat64))
    out = sitk.Resample(sitk.ReadImage(str(moving)), sitk.ReadImage(str(fixed)), transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def ants_apply(moving: Path, fixed: Path, field: Path) -> np.ndarray:
    ants = pytest.importorskip("ants", reason='antspyx is not installed (pip install -e ".[peers]")')
    fixed_image, moving_image = ants.image_read(str(fixed)), ants.image_read(str(moving))
    return ants.apply_transforms(fixed_image, moving_image, [str(field)], interpolator="linear").numpy()


PAIRS = [
    # (source of the pair, spatial_dims)
    ("synthetic", 3),  # oblique, anisotropic, flipped volume
    ("synthetic", 2),  # one oblique slice whose 2x2 direction block is singular
    ("real", 3),  # two real OASIS volumes of ../shared
    ("real", 2),  # two real OASIS slices of ../shared (second axis superior-inferior)
]


@pytest.mark.parametrize("tool", [simpleitk_apply, ants_apply])
@pytest.mark.parametrize("source,spatial_dims", PAIRS)
def test_itk_tools_apply_our_fields_as_we_do(tmp_path, source, spatial_dims, tool):
    """SimpleITK and ANTs, given the field we write (NIfTI in 3D, MetaImage for single slices), resample the moving
    image into our own warp to within 1e-3 of its range."""
    if source == "real" and not REAL.is_dir():
        pytest.skip(f"the real OASIS subjects are not at {REAL}")
    moving, fixed, ddf = (
        synthetic_pair(tmp_path, spatial_dims) if source == "synthetic" else real_pair(tmp_path, spatial_dims)
    )
    field = write_field(ddf, nib.load(fixed), tmp_path / ("ddf.mha" if spatial_dims == 2 else "ddf.nii.gz"), "itk")
    expected = ours(moving, ddf).reshape(nib.load(fixed).shape)
    theirs = tool(moving, fixed, field).reshape(expected.shape)
    inner = tuple(slice(4, -4) if n > 1 else slice(None) for n in expected.shape)
    assert np.abs(theirs[inner] - expected[inner]).max() < 1e-3 * np.abs(expected).max()


FORMATS = [
    # (spatial_dims, ddf_format, file name)
    (3, "itk", "ddf.nii.gz"),  # ITK NIfTI field
    (2, "itk", "ddf.mha"),  # single-slice ITK field as MetaImage
    (3, "voxel", "ddf.nii.gz"),  # our voxel layout
    (2, "voxel", "ddf.nii.gz"),  # our voxel layout of a slice
]


@pytest.mark.parametrize("spatial_dims,ddf_format,name", FORMATS)
def test_read_field_gives_back_the_voxel_field(tmp_path, spatial_dims, ddf_format, name):
    _, fixed, ddf = synthetic_pair(tmp_path, spatial_dims)
    reference = nib.load(fixed)
    ddf_back, affine, grid = read_field(write_field(ddf, reference, tmp_path / name, ddf_format))
    torch.testing.assert_close(ddf_back, ddf.float(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(affine, reference.affine, atol=1e-5)
    assert grid == tuple(reference.shape[:3])


def test_write_field_refuses_the_wrong_suffix(tmp_path):
    _, fixed, ddf = synthetic_pair(tmp_path, 2)
    with pytest.raises(ValueError, match=r"a 2D itk field goes in a .mha file, got 'ddf.nii.gz'"):
        write_field(ddf, nib.load(fixed), tmp_path / "ddf.nii.gz", "itk")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_apply_warps_images_linearly_and_labels_by_nearest(tmp_path, spatial_dims):
    moving, fixed, ddf = synthetic_pair(tmp_path, spatial_dims)
    field = write_field(ddf, nib.load(fixed), tmp_path / ("ddf.mha" if spatial_dims == 2 else "ddf.nii.gz"), "itk")
    image = nib.load(moving)
    labels = (np.asarray(image.dataobj) * 5).astype(np.int16)
    nib.save(nib.Nifti1Image(labels, image.affine), str(tmp_path / "labels.nii.gz"))
    written = apply_field(moving, field, tmp_path / "warped.nii.gz", jacobian=True)
    assert written == [str(tmp_path / "warped.nii.gz"), str(tmp_path / "warped_jacobian.nii.gz")]
    warped = nib.load(tmp_path / "warped.nii.gz")
    expected = ours(moving, ddf).reshape(image.shape)
    np.testing.assert_allclose(warped.get_fdata(), expected, atol=1e-4)
    np.testing.assert_allclose(warped.affine, image.affine, atol=1e-5)
    det = nib.load(tmp_path / "warped_jacobian.nii.gz").get_fdata()
    assert det.shape == image.shape and 0.2 < np.median(det) < 5
    apply_field(tmp_path / "labels.nii.gz", field, tmp_path / "warped_labels.nii.gz")  # auto: nearest for integers
    warped_labels = nib.load(tmp_path / "warped_labels.nii.gz")
    assert warped_labels.get_data_dtype() == np.int16
    assert set(np.unique(np.asarray(warped_labels.dataobj))) <= set(np.unique(labels)) | {0}


def four_d(tmp_path, moving, field):
    image = nib.load(moving)
    nib.save(nib.Nifti1Image(np.stack([np.asarray(image.dataobj)] * 2, -1), image.affine), str(tmp_path / "4d.nii.gz"))
    return tmp_path / "4d.nii.gz", field


def other_grid(tmp_path, moving, field):
    image = nib.load(moving)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), np.eye(4)), str(tmp_path / "other.nii.gz"))
    return tmp_path / "other.nii.gz", field


def not_a_field(tmp_path, moving, field):
    return moving, moving


def missing_field(tmp_path, moving, field):
    return moving, tmp_path / "nothing.nii.gz"


BAD_APPLY = [
    # (inputs, output name, error, message)
    (four_d, "out.nii.gz", ValueError, "is a 4-D image"),  # a 4-D image
    (other_grid, "out.nii.gz", ValueError, "is not on the field's grid"),  # an image of another grid
    (not_a_field, "out.nii.gz", ValueError, "is not a displacement field"),  # a plain image as the field
    (missing_field, "out.nii.gz", FileNotFoundError, "field file .* does not exist"),  # a missing field
    (missing_field, "out.png", ValueError, "must be a .nii.gz or .nii file"),  # an output of another format
    (not_a_field, "moving.nii.gz", ValueError, "is one of the inputs"),  # the output would overwrite an input
]


@pytest.mark.parametrize("inputs,name,error,message", BAD_APPLY)
def test_apply_refuses_bad_input_and_writes_nothing(tmp_path, inputs, name, error, message):
    moving, fixed, ddf = synthetic_pair(tmp_path, 3)
    field = write_field(ddf, nib.load(fixed), tmp_path / "ddf.nii.gz", "itk")
    image, field = inputs(tmp_path, moving, field)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(error, match=message):
        apply_field(image, field, tmp_path / name)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_apply_refuses_to_overwrite_unless_told(tmp_path):
    moving, fixed, ddf = synthetic_pair(tmp_path, 3)
    field = write_field(ddf, nib.load(fixed), tmp_path / "ddf.nii.gz", "itk")
    apply_field(moving, field, tmp_path / "out.nii.gz")
    with pytest.raises(FileExistsError, match="exists; pass --overwrite True"):
        apply_field(moving, field, tmp_path / "out.nii.gz")
    apply_field(moving, field, tmp_path / "out.nii.gz", overwrite=True)
