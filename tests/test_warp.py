import pytest
import torch
from monai.networks.blocks import DVF2DDF, Warp

from custom.warp import SpatialTransformer, VelocityIntegration

PARITY_CASES = [
    # (image shape, mode, padding)
    ((2, 1, 17, 23), "bilinear", "zeros"),  # 2D single channel, VoxelMorph padding
    ((2, 3, 17, 23), "bilinear", "border"),  # 2D multi-channel, MONAI default padding
    ((1, 2, 9, 11, 13), "bilinear", "zeros"),  # 3D multi-channel
    ((2, 1, 9, 11, 13), "bilinear", "border"),  # 3D border padding
    ((2, 1, 17, 23), "nearest", "zeros"),  # 2D nearest
    ((1, 1, 9, 11, 13), "nearest", "border"),  # 3D nearest
]


@pytest.mark.parametrize("shape,mode,padding", PARITY_CASES)
def test_parity_with_monai_warp(shape, mode, padding):
    nd = len(shape) - 2
    image = torch.rand(shape)
    ddf = torch.randn(shape[0], nd, *shape[2:]) * 3
    expected = Warp(mode, padding)(image, ddf)
    torch.testing.assert_close(SpatialTransformer(mode, padding)(image, ddf), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("nd", [2, 3])
def test_label_warping_keeps_integer_labels(nd):
    labels = torch.randint(0, 5, (1, 1) + (8,) * nd)
    ddf = torch.randn(1, nd, *(8,) * nd) * 2
    out = SpatialTransformer("nearest")(labels, ddf)
    assert out.dtype == labels.dtype
    expected = Warp("nearest", "zeros")(labels.float(), ddf).to(labels.dtype)
    assert torch.equal(out, expected)
    assert set(out.unique().tolist()) <= set(labels.unique().tolist()) | {0}


def test_integer_shift_is_exact():
    image = torch.arange(5 * 6, dtype=torch.float32).view(1, 1, 5, 6)
    ddf = torch.zeros(1, 2, 5, 6)
    ddf[:, 1] = 1.0  # sample one voxel to the right along the last axis
    out = SpatialTransformer()(image, ddf)
    torch.testing.assert_close(out[..., :-1], image[..., 1:])
    assert torch.all(out[..., -1] == 0)  # zeros padding outside


def test_zero_field_is_identity_and_scriptable():
    image = torch.rand(2, 2, 7, 8, 9)
    ddf = torch.zeros(2, 3, 7, 8, 9)
    scripted = torch.jit.script(SpatialTransformer())
    torch.testing.assert_close(scripted(image, ddf), image)


@pytest.mark.parametrize("shape", [(2, 2, 16, 20), (1, 3, 8, 10, 12)])
def test_velocity_integration_matches_monai(shape):
    v = torch.randn(shape) * 2
    torch.testing.assert_close(VelocityIntegration(7)(v), DVF2DDF(7, "bilinear", "zeros")(v), atol=1e-5, rtol=0)
    assert torch.equal(VelocityIntegration(3)(torch.zeros(shape)), torch.zeros(shape))


BAD_CALLS = [
    # (image shape, ddf shape, dtype, mode, message)
    ((1, 1, 8), (1, 1, 8), torch.float32, "bilinear", "image must have shape"),  # 1D image
    ((1, 1, 8, 8), (1, 3, 8, 8), torch.float32, "bilinear", r"ddf must have shape \[1, 2, 8, 8\]"),  # wrong components
    ((1, 1, 8, 8), (1, 2, 8, 9), torch.float32, "bilinear", "got \\[1, 2, 8, 9\\]"),  # spatial mismatch
    ((2, 1, 8, 8), (1, 2, 8, 8), torch.float32, "bilinear", "to match image"),  # batch mismatch
    ((1, 1, 8, 8), (1, 2, 8, 8), torch.int64, "bilinear", "need mode='nearest'"),  # labels with bilinear
]


@pytest.mark.parametrize("image_shape,ddf_shape,dtype,mode,message", BAD_CALLS)
def test_bad_inputs(image_shape, ddf_shape, dtype, mode, message):
    image = torch.zeros(image_shape, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        SpatialTransformer(mode)(image, torch.zeros(ddf_shape))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mode": "bicubic"}, "mode must be one of"),  # unsupported interpolation
        ({"padding_mode": "wrap"}, "padding_mode must be one of"),  # unsupported padding
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpatialTransformer(**kwargs)


def test_bad_steps():
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        VelocityIntegration(0)
