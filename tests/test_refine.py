"""Test-time refinement: a known displacement is recovered, the loss decreases, coarse to fine, early stopping, the
slab-wise loss against the plain one, 2D and 3D, CPU and GPU."""

import pytest
import torch
import torch.nn.functional as F

import custom.refine
from custom import RegistrationNet, SpatialTransformer
from custom.data import known_deformation_pairs
from custom.losses import PairLoss
from custom.metrics import dice_per_label, jacobian_determinant
from custom.refine import (
    DEFAULTS,
    FULL_SMOOTHING_SIZE,
    RefineOptions,
    RefiningInferer,
    RegistrationInferer,
    _LevelLoss,
    grid_sigma,
    refine,
)

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
    # (shape, shift in voxels, integration_steps, levels, downsample)
    ((48, 56), (1.5, -1.0), 0, (1,), 1),  # 2D displacement
    ((48, 56), (1.5, -1.0), 7, None, None),  # 2D velocity (the 2D default)
    ((48, 56), (1.5, -1.0), 7, (2, 1), 1),  # 2D coarse to fine
    ((24, 28, 20), (1.0, -0.8, 0.6), None, None, None),  # 3D default: 1/4, 1/2 then full resolution
    ((24, 28, 20), (1.0, -0.8, 0.6), 0, (1,), 1),  # 3D displacement at full resolution
    ((24, 28, 20), (1.0, -0.8, 0.6), 7, (2, 1), 2),  # 3D velocity at half resolution, loss at half then full
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,shift,integration_steps,levels,downsample", CASES)
def test_known_shift_recovered_and_loss_decreases(device, shape, shift, integration_steps, levels, downsample):
    moving, fixed, true = shifted_pair(shape, shift, device)
    start = 0.3 * true  # a network that found a third of the way
    options = RefineOptions(60, 0.1, 1.0, "lncc", integration_steps, levels, downsample, tolerance=0.0)
    history = []
    refined = refine(moving, fixed, start, options, history=history)
    expected_levels = levels or DEFAULTS[len(shape)]["levels"]
    assert [h["level"] for h in history] == list(expected_levels) and all(h["steps"] == 60 for h in history)
    assert refined.shape == true.shape and refined.device.type == device and not refined.requires_grad
    assert interior_error(refined, true, 6) < 0.5 * interior_error(start, true, 6)
    loss = PairLoss(len(shape), "lncc", 1.0)
    pair = torch.cat([moving, fixed], 1)
    assert float(loss(refined, pair)) < float(loss(start, pair)) - 0.05


def test_zero_steps_return_the_start():
    moving, fixed, true = shifted_pair((16, 20), (1.0, 0.0), "cpu")
    torch.testing.assert_close(refine(moving, fixed, true, RefineOptions(steps=0, integration_steps=0)), true)
    assert torch.equal(refine(moving, fixed, None, RefineOptions(steps=0)), torch.zeros_like(true))


def test_more_steps_from_the_network_beat_zero_start():
    moving, fixed, true = shifted_pair((48, 56), (2.0, -1.5), "cpu")
    options = RefineOptions(steps=10, lr=0.1, integration_steps=0)
    from_network = refine(moving, fixed, 0.5 * true, options)
    from_zero = refine(moving, fixed, None, options)
    assert interior_error(from_network, true, 6) < interior_error(from_zero, true, 6)


@pytest.mark.parametrize("shape", [(48, 56), (24, 28, 20)])
def test_early_stop_on_a_plateau(shape):
    """A level stops once its loss improves by less than ``tolerance`` over ``patience`` steps; 0 never stops."""
    moving, fixed, true = shifted_pair(shape, (1.0,) * len(shape), "cpu")
    stopped, full = [], []
    refine(moving, fixed, None, RefineOptions(200, 0.1, levels=(2, 1), tolerance=0.01, patience=3), history=stopped)
    refine(moving, fixed, None, RefineOptions(30, 0.1, levels=(2, 1), tolerance=0.0), history=full)
    assert [h["steps"] for h in full] == [30, 30]
    assert all(3 <= h["steps"] < 200 for h in stopped), stopped


@pytest.mark.parametrize("shape,kernel_factor", [((20, 24), 1), ((12, 14, 18), 1), ((12, 14, 18), 2)])
def test_slab_loss_equals_the_training_loss(monkeypatch, shape, kernel_factor):
    """Reference: the slab-wise loss and gradient equal PairLoss on the whole image (LNCC is local)."""
    monkeypatch.setattr(custom.refine, "SLAB_VOXELS", 3 * shape[0] * shape[1])  # 3-voxel slabs: many borders
    torch.manual_seed(0)
    pair = torch.rand(2, 2, *shape)
    options = RefineOptions(smooth_weight=0.7).for_dims(len(shape))
    ddf = (2 * torch.randn(2, len(shape), *shape)).requires_grad_()
    value = _LevelLoss(len(shape), options, kernel_factor).backward(ddf * 1.0, pair)
    kernel = 9 if kernel_factor == 1 else 5
    reference = ddf.detach().clone().requires_grad_()
    expected = PairLoss(len(shape), "lncc", 0.7, kernel)(reference, pair)
    expected.backward()
    assert value == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(ddf.grad, reference.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", [(64, 72), (32, 36, 28)])
def test_known_deformation_recovered(shape):
    """A random smooth deformation of a labelled image is undone: labels overlap again, the field is recovered."""
    image = blobs(shape)[0]
    label = (image * 4).int().clamp(max=3)
    item = known_deformation_pairs(image, label, 1, max_displacement=3.0, seed=3, name="blobs")[0]
    assert item["fixed"] is image and item["true_ddf"].shape == (len(shape), *shape)
    torch.testing.assert_close(item["moving"], SpatialTransformer()(image[None], item["true_ddf"][None])[0])
    ddf = refine(item["moving"][None], item["fixed"][None], None, RefineOptions(steps=80, lr=0.2, tolerance=0.0))

    def dice(warped_label):
        scores = dice_per_label(warped_label.reshape(label[0].shape), label[0])
        return sum(scores.values()) / len(scores)

    warped = SpatialTransformer("nearest")(item["moving_label"][None], ddf)[0]
    assert dice(warped) > dice(item["moving_label"]) + 0.05
    # ``moving(x) = image(x + true(x))``: registering moving back needs the inverse, about ``-true`` for a small field
    margin = [slice(None)] + [slice(6, -6)] * len(shape)
    error = (ddf[0] + item["true_ddf"])[tuple(margin)].norm(dim=0).mean()
    assert error < 0.5 * item["true_ddf"][tuple(margin)].norm(dim=0).mean()


def test_smoothed_gradient_steps_keep_the_field_from_folding():
    """Adam on the raw gradient moves each voxel by about ``lr`` whatever its neighbours do, and the field recovering
    a known deformation folds in places; the smoothed gradient (the default ``grad_sigma``) moves neighbours
    together: no fold, and the deformation recovered as well."""
    image = blobs((96, 96), seed=0)[0]
    item = known_deformation_pairs(image, image.int(), 1, max_displacement=4.0, seed=3, name="blobs")[0]
    fields, margin = {}, [slice(None)] + [slice(6, -6)] * 2
    for sigma in (0.0, 1.5):
        options = RefineOptions(steps=80, lr=0.2, tolerance=0.0, grad_sigma=sigma)
        fields[sigma] = refine(item["moving"][None], item["fixed"][None], None, options)
    raw, smoothed = (jacobian_determinant(fields[s])[0] for s in (0.0, 1.5))
    assert (raw <= 0).sum() > 0 and smoothed.min() > 0.05
    error = {s: float((f[0] + item["true_ddf"])[tuple(margin)].norm(dim=0).mean()) for s, f in fields.items()}
    assert error[1.5] < 1.1 * error[0.0], error


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
        torch.testing.assert_close(RefiningInferer(0)(x, net), net(x))


@pytest.mark.parametrize("shape", [(2, 2, 32, 40), (1, 2, 16, 16, 20)])  # 2D batch, 3D
def test_inferer_without_the_deformable_stage_gives_a_zero_field(shape):
    net = ShiftNet(torch.ones(1, len(shape) - 2, *shape[2:]))
    ddf = RefiningInferer(deformable="false")(torch.rand(shape), net)  # the affine stage alone (register's option)
    assert ddf.shape == (shape[0], len(shape) - 2, *shape[2:]) and not ddf.any()


def test_deprecated_inferer_name_still_works():
    with pytest.warns(DeprecationWarning, match="use custom.refine.RefiningInferer"):
        inferer = RegistrationInferer(steps=0)
    assert isinstance(inferer, RefiningInferer)


@pytest.mark.parametrize("network_steps,velocity_calls", [(0, 0), (7, 1)])
def test_inferer_starts_from_the_networks_velocity(network_steps, velocity_calls):
    moving, fixed, true = shifted_pair((32, 40), (1.0, 1.0), "cpu")
    net = ShiftNet(0.5 * true, network_steps)
    with torch.no_grad():  # as inside MONAI's evaluator
        ddf = RefiningInferer(20, 0.1)(torch.cat([moving, fixed], 1), net)
    assert net.velocity_calls == velocity_calls
    assert interior_error(ddf, true, 6) < interior_error(0.5 * true, true, 6)


BAD_OPTIONS = [
    # (keyword arguments, message)
    ({"steps": -1}, "refine_steps must be an integer >= 0"),  # negative steps
    ({"steps": 2.5}, "refine_steps must be an integer >= 0"),  # fractional steps
    ({"steps": [5, -1]}, "refine_steps must be an integer >= 0"),  # a negative count of a level
    ({"steps": [5, 5, 5], "levels": [2, 1]}, r"one per level of refine_levels \[2, 1\], got \[5, 5, 5\]"),  # counts
    ({"lr": 0.0}, "refine_lr must be a finite number > 0"),  # zero learning rate
    ({"lr": -0.1}, "refine_lr must be a finite number > 0"),  # negative learning rate
    ({"lr": float("nan")}, "refine_lr must be a finite number > 0, got nan"),  # not a number
    ({"lr": 1e999}, "refine_lr must be a finite number > 0, got inf"),  # overflowed to infinity
    ({"lr": "0.1"}, "refine_lr must be a finite number > 0, got '0.1'"),  # a string (fire passes "nan" as one)
    ({"smooth_weight": -1.0}, "refine_smooth_weight must be a finite number >= 0"),  # negative weight
    ({"levels": [3]}, r"refine_levels must be a list of divisors among \[1, 2, 4, 8\]"),  # unsupported factor
    ({"levels": [1, 2]}, "refine_levels must go from coarse to fine"),  # fine to coarse
    ({"downsample": 3}, r"refine_downsample must be one of \[1, 2, 4, 8\] or null"),  # unsupported factor
    ({"integration_steps": -2}, "refine_integration_steps must be an integer >= 0"),  # negative integration
    ({"similarity": "ssim"}, "similarity must be 'lncc' or 'mse'"),  # unknown similarity
    ({"tolerance": -1e-3}, "refine_tolerance must be a finite number >= 0"),  # negative tolerance
    ({"patience": 0}, "refine_patience must be an integer >= 1"),  # no patience
    ({"grad_sigma": -0.5}, "refine_grad_sigma must be a finite number >= 0"),  # negative sigma
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS)
def test_bad_refine_options(options, message):
    x = torch.rand(1, 2, 16, 16)
    with pytest.raises(ValueError, match=message):
        RefiningInferer(**{"steps": 1, **options})(x, ShiftNet(torch.zeros(1, 2, 16, 16)))


BAD_SHAPES = [
    # (moving shape, fixed shape, init shape, message)
    ((1, 1, 16, 16), (1, 1, 16, 18), None, "expected moving and fixed of one shape"),  # mismatch
    ((1, 2, 16, 16), (1, 2, 16, 16), None, "expected moving and fixed of one shape"),  # two channels
    ((1, 1, 16, 16), (1, 1, 16, 16), (1, 3, 16, 16), r"init must have shape \[1, 2, 16, 16\]"),  # 3 components
]


@pytest.mark.parametrize("moving,fixed,init,message", BAD_SHAPES)
def test_bad_refine_shapes(moving, fixed, init, message):
    with pytest.raises(ValueError, match=message):
        refine(torch.rand(moving), torch.rand(fixed), None if init is None else torch.zeros(init), RefineOptions(1))


def test_refinement_defaults_are_stated_alike_everywhere():
    """RefineOptions holds the refinement's defaults; the inferer, the configs' refine_* keys and the command line
    state the same ones (None: the dimensionality's default, DEFAULTS)."""
    import dataclasses
    import inspect
    import json
    from pathlib import Path

    from custom.cli import Commands

    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    defaults = {f.name: f.default for f in dataclasses.fields(RefineOptions)}
    inferer = inspect.signature(RefiningInferer).parameters
    command_lines = [inspect.signature(c).parameters for c in (Commands.register, Commands.evaluate)]
    for name, value in defaults.items():
        assert inferer[name].default == value, name
        for config in ("inference.json", "evaluate.json"):
            stated = json.loads((configs / config).read_text()).get(f"refine_{name}", value)
            assert stated == value, f"{config}: refine_{name} is {stated!r}, RefineOptions says {value!r}"
        for parameters in command_lines:
            option = parameters.get("similarity" if name == "similarity" else f"refine_{name}")
            assert option is None or option.default == value, f"--refine_{name}"


@pytest.mark.parametrize(
    "grad_sigma,shape,expected",
    [
        (1.5, (40, 48, 56), 1.5),  # a quarter-resolution OASIS volume: the full sigma
        (1.5, (80, 96, 112), 1.5),  # larger grids: the full sigma
        (2.0, (160, 192), 2.0),  # a 2D slice at full resolution
        (1.5, (20, 48, 56), 0.75),  # one axis half the size: half the sigma
        (1.5, (24, 28, 20), 0.75),  # the tests' demo volumes: the smallest axis counts
        (0.0, (10, 10), 0.0),  # no smoothing stays none
    ],
)
def test_grid_sigma_scales_down_on_small_grids(grad_sigma, shape, expected):
    assert FULL_SMOOTHING_SIZE == 40
    assert grid_sigma(grad_sigma, shape) == pytest.approx(expected)
