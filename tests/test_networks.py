import pytest
import torch
import torch.nn.functional as F

from custom import VARIANTS, RegistrationNet, VxmDense, count_parameters
from custom.blocks import UpsampleConcatConv

PARAM_COUNTS = [
    # (spatial_dims, variant, VoxelMorph-2 parameter count)
    (2, "baseline", 100_530),  # VoxelMorph-2, 2D
    (2, "maxpool", 100_530),  # same layers, half resolution
    (2, "reduced", 45_106),  # two levels fewer
    (2, "both", 45_106),
    (3, "baseline", 301_411),  # VoxelMorph-2, 3D
    (3, "maxpool", 301_411),
    (3, "reduced", 135_395),
    (3, "both", 135_395),
]


@pytest.mark.parametrize("nd,variant,expected", PARAM_COUNTS)
def test_parameter_counts(nd, variant, expected):
    assert count_parameters(RegistrationNet(nd, variant)) == expected


SHAPE_CASES = [
    # (spatial shape, variant, integration_steps)
    ((32, 48), "baseline", 0),  # divisible by the stride 16
    ((37, 50), "baseline", 0),  # padded internally, cropped back
    ((37, 50), "maxpool", 0),  # stride 32
    ((20, 21), "reduced", 0),  # stride 4
    ((33, 17), "both", 5),  # diffeomorphic, odd sizes
    ((16, 20, 24), "baseline", 0),  # 3D
    ((17, 18, 19), "maxpool", 3),  # 3D, odd sizes, diffeomorphic
    ((12, 13, 14), "both", 0),  # 3D, odd sizes
]


@pytest.mark.parametrize("spatial,variant,steps", SHAPE_CASES)
def test_output_shape_and_scripting(spatial, variant, steps):
    nd = len(spatial)
    net = RegistrationNet(nd, variant, integration_steps=steps).eval()
    with torch.no_grad():
        for p in net.flow.parameters():  # a non-trivial field, so the comparison means something
            p.normal_(0, 0.1)
    x = torch.rand(2, 2, *spatial)
    with torch.no_grad():
        ddf = net(x)
        assert ddf.shape == (2, nd) + spatial
        torch.testing.assert_close(torch.jit.script(net)(x), ddf, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_oasis_volume_3d(variant):
    net = RegistrationNet(3, variant).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 2, 160, 192, 224)).shape == (1, 3, 160, 192, 224)


def test_flow_initialisation_is_near_zero():
    ddf = RegistrationNet(2)(torch.rand(1, 2, 32, 32))
    assert ddf.abs().max() < 1e-2
    assert RegistrationNet(2).flow.weight.std() < 1e-4


def test_maxpool_field_is_upsampled_and_rescaled():
    net = RegistrationNet(2, "maxpool")
    with torch.no_grad():
        net.flow.weight.zero_()
        net.flow.bias.copy_(torch.tensor([1.5, -0.5]))  # constant field of (1.5, -0.5) half-resolution voxels
    ddf = net(torch.rand(1, 2, 32, 32))
    torch.testing.assert_close(ddf[:, 0], torch.full((1, 32, 32), 3.0))
    torch.testing.assert_close(ddf[:, 1], torch.full((1, 32, 32), -1.0))


def test_reduced_has_two_levels_fewer():
    assert len(RegistrationNet(2, "reduced").encoder) == len(RegistrationNet(2).encoder) - 2
    assert RegistrationNet(3, "both").stride == 8 and RegistrationNet(3).stride == 16


def test_vxmdense_warps_with_its_field():
    model = VxmDense(2, "both")
    moving, fixed = torch.rand(2, 1, 24, 24), torch.rand(2, 1, 24, 24)
    warped, ddf = model(moving, fixed)
    assert warped.shape == moving.shape and ddf.shape == (2, 2, 24, 24)
    torch.testing.assert_close(warped, model.transformer(moving, ddf))
    diffeomorphic = VxmDense(2, "both", padding_mode="border", integration_steps=7, enc_channels=(8, 16, 16, 16))
    assert diffeomorphic.net.integration_steps == 7 and diffeomorphic.transformer.padding_mode == "border"
    assert next(diffeomorphic.net.encoder[0].parameters()).shape[0] == 8


def test_training_reduces_loss():
    from custom.losses import GradLoss, MSELoss

    torch.manual_seed(1)
    fixed = F.avg_pool2d(torch.rand(1, 1, 32, 32), 5, 1, 2)
    moving = torch.roll(fixed, 2, dims=-1)
    model = VxmDense(2, "both")
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    losses = []
    for _ in range(40):
        warped, ddf = model(moving, fixed)
        loss = MSELoss()(warped, fixed) + 0.01 * GradLoss()(ddf)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def reference_upsample_concat_conv(block, low, skip):
    """The textbook form: upsample, concatenate, 3x3 conv, LeakyReLU."""
    conv = F.conv2d if low.dim() == 4 else F.conv3d
    up = F.interpolate(low, scale_factor=2.0, mode="nearest")
    return F.leaky_relu(conv(torch.cat([up, skip], 1), block.conv.weight, block.conv.bias, padding=1), 0.2)


@pytest.mark.parametrize("low_shape,skip_channels", [((2, 5, 6, 7), 3), ((1, 4, 3, 4, 5), 2), ((1, 32, 5, 6), 16)])
def test_upsample_concat_conv_matches_reference(low_shape, skip_channels):
    nd = len(low_shape) - 2
    block = UpsampleConcatConv(nd, low_shape[1], skip_channels, 6)
    low = torch.randn(low_shape, requires_grad=True)
    skip = torch.randn(low_shape[0], skip_channels, *[2 * s for s in low_shape[2:]], requires_grad=True)
    got = block(low, skip)
    expected = reference_upsample_concat_conv(block, low, skip)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [low, skip, block.conv.weight], g)
    expected_grads = torch.autograd.grad(expected, [low, skip, block.conv.weight], g)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.jit.script(block)


BAD_NETS = [
    # (kwargs, message)
    ({"spatial_dims": 4}, "spatial_dims must be 2 or 3, got 4"),  # 4D
    ({"spatial_dims": 2, "variant": "tiny"}, "variant must be one of"),  # unknown variant
    ({"spatial_dims": 2, "integration_steps": -1}, "integration_steps must be >= 0, got -1"),  # negative steps
    ({"spatial_dims": 2, "enc_channels": (16, 32), "variant": "reduced"}, "needs >= 3 enc_channels"),  # too shallow
    ({"spatial_dims": 2, "enc_channels": (16,), "dec_channels": (16,)}, "len\\(dec_channels\\) > len"),  # no full-res
]


@pytest.mark.parametrize("kwargs,message", BAD_NETS)
def test_bad_network_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RegistrationNet(**kwargs)


BAD_NET_INPUTS = [
    # (spatial_dims, input shape, message)
    (2, (1, 2, 16, 16, 16), "with 2 spatial dims, got shape \\[1, 2, 16, 16, 16\\]"),  # 3D into 2D net
    (3, (1, 2, 16, 16), "with 3 spatial dims"),  # 2D into 3D net
    (2, (1, 3, 16, 16), "expected 2 input channels \\(moving, fixed\\), got 3"),  # three channels
    (2, (1, 1, 16, 16), "expected 2 input channels"),  # one channel
]


@pytest.mark.parametrize("nd,shape,message", BAD_NET_INPUTS)
def test_bad_network_inputs(nd, shape, message):
    with pytest.raises(ValueError, match=message):
        RegistrationNet(nd)(torch.zeros(shape))


def test_vxmdense_shape_mismatch():
    with pytest.raises(ValueError, match="moving and fixed must have the same shape"):
        VxmDense(2)(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 20))
