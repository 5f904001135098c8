"""Test-time refinement: a known displacement is recovered, the loss decreases, 2D and 3D, CPU and GPU."""

import pytest
import torch
import torch.nn.functional as F

from custom import RegistrationNet, SpatialTransformer
from custom.refine import RegistrationInferer, refine
from custom.workflow import PairLoss

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def blobs(shape, seed=0):
    """A smooth random image in [0, 1] with structure at several scales, ``(1, 1, *shape)``."""
    gen = torch.Generator().manual_seed(seed)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    image = sum(
        F.interpolate(torch.rand(1, 1, *[max(2, n // k) for n in shape], generator=gen), size=shape, mode=mode)
        for k in (4, 8)
    )
    return (image - image.min()) / (image.max() - image.min())


def shifted_pair(shape, shift, device):
    """``(moving, fixed, true_ddf)`` with ``fixed = moving`` warped by a constant shift."""
    nd = len(shape)
    moving = blobs(shape).to(device)
    true = torch.zeros(1, nd, *shape, device=device)
    for axis, s in enumerate(shift):
        true[:, axis] = s
    fixed = SpatialTransformer()(moving, true)
    return moving, fixed, true


def interior_error(ddf, true, margin):
    inner = [slice(None), slice(None)] + [slice(margin, -margin)] * (ddf.dim() - 2)
    return float((ddf - true)[tuple(inner)].norm(dim=1).mean())


CASES = [
    # (shape, shift in voxels, integration_steps, downsample)
    ((48, 56), (1.5, -1.0), 0, 1),  # 2D displacement
    ((48, 56), (1.5, -1.0), 7, 1),  # 2D velocity (the default)
    ((24, 28, 20), (1.0, -0.8, 0.6), 7, None),  # 3D velocity at half resolution (the 3D default)
    ((24, 28, 20), (1.0, -0.8, 0.6), 0, 1),  # 3D displacement at full resolution
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,shift,integration_steps,downsample", CASES)
def test_known_shift_recovered_and_loss_decreases(device, shape, shift, integration_steps, downsample):
    moving, fixed, true = shifted_pair(shape, shift, device)
    start = 0.3 * true  # a network that found a third of the way
    refined = refine(
        moving, fixed, start, steps=60, lr=0.1, smooth_weight=1.0, integration_steps=integration_steps,
        downsample=downsample,
    )
    assert refined.shape == true.shape and refined.device.type == device and not refined.requires_grad
    assert interior_error(refined, true, 6) < 0.5 * interior_error(start, true, 6)
    loss = PairLoss(len(shape), "lncc", 1.0)
    pair = torch.cat([moving, fixed], 1)
    assert float(loss(refined, pair)) < float(loss(start, pair)) - 0.05


def test_zero_steps_return_the_start():
    moving, fixed, true = shifted_pair((16, 20), (1.0, 0.0), "cpu")
    torch.testing.assert_close(refine(moving, fixed, true, steps=0, integration_steps=0), true)
    assert torch.equal(refine(moving, fixed, None, steps=0), torch.zeros_like(true))


def test_more_steps_from_the_network_beat_zero_start():
    moving, fixed, true = shifted_pair((48, 56), (2.0, -1.5), "cpu")
    from_network = refine(moving, fixed, 0.5 * true, steps=10, lr=0.1, integration_steps=0)
    from_zero = refine(moving, fixed, None, steps=10, lr=0.1, integration_steps=0)
    assert interior_error(from_network, true, 6) < interior_error(from_zero, true, 6)


class ShiftNet(torch.nn.Module):
    """A "network" predicting a fixed field, optionally as a diffeomorphic network's velocity."""

    def __init__(self, field, integration_steps=0):
        super().__init__()
        self.field = field
        self.integration_steps = integration_steps
        self.velocity_calls = 0

    def forward(self, x):
        return self.field.expand(x.shape[0], *self.field.shape[1:])

    def velocity(self, x):
        self.velocity_calls += 1
        return self.forward(x)


def test_inferer_without_steps_is_the_network():
    net = RegistrationNet(2, "both").eval()
    x = torch.rand(2, 2, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(RegistrationInferer(0)(x, net), net(x))


@pytest.mark.parametrize("network_steps,velocity_calls", [(0, 0), (7, 1)])
def test_inferer_starts_from_the_networks_velocity(network_steps, velocity_calls):
    moving, fixed, true = shifted_pair((32, 40), (1.0, 1.0), "cpu")
    net = ShiftNet(0.5 * true, network_steps)
    with torch.no_grad():  # as inside MONAI's evaluator
        ddf = RegistrationInferer(20, 0.1)(torch.cat([moving, fixed], 1), net)
    assert net.velocity_calls == velocity_calls
    assert interior_error(ddf, true, 6) < interior_error(0.5 * true, true, 6)


BAD_OPTIONS = [
    # (keyword arguments, message)
    ({"steps": -1}, "refine_steps must be an integer >= 0"),  # negative steps
    ({"steps": 2.5}, "refine_steps must be an integer >= 0"),  # fractional steps
    ({"lr": 0.0}, "refine_lr must be > 0"),  # zero learning rate
    ({"lr": -0.1}, "refine_lr must be > 0"),  # negative learning rate
    ({"smooth_weight": -1.0}, "refine_smooth_weight must be >= 0"),  # negative weight
    ({"downsample": 3}, "refine_downsample must be 1, 2, 4 or null"),  # unsupported factor
    ({"integration_steps": -2}, "refine_integration_steps must be an integer >= 0"),  # negative integration
    ({"similarity": "ssim"}, "loss must be 'lncc' or 'mse'"),  # unknown similarity
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS)
def test_bad_refine_options(options, message):
    x = torch.rand(1, 2, 16, 16)
    with pytest.raises(ValueError, match=message):
        RegistrationInferer(**{"steps": 1, **options})(x, ShiftNet(torch.zeros(1, 2, 16, 16)))


BAD_SHAPES = [
    # (moving shape, fixed shape, init shape, message)
    ((1, 1, 16, 16), (1, 1, 16, 18), None, "expected moving and fixed of one shape"),  # mismatch
    ((1, 2, 16, 16), (1, 2, 16, 16), None, "expected moving and fixed of one shape"),  # two channels
    ((1, 1, 16, 16), (1, 1, 16, 16), (1, 3, 16, 16), r"init must have shape \[1, 2, 16, 16\]"),  # 3 components
]


@pytest.mark.parametrize("moving,fixed,init,message", BAD_SHAPES)
def test_bad_refine_shapes(moving, fixed, init, message):
    with pytest.raises(ValueError, match=message):
        refine(torch.rand(moving), torch.rand(fixed), None if init is None else torch.zeros(init), steps=1)
