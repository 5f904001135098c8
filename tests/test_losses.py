import itertools

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss

from custom import RegistrationNet
from custom.losses import GradLoss, LabelDiceLoss, LocalNCCLoss, MSELoss, PairLoss, box_sum, soft_one_hot


def slow_box_sum(x, k):
    """Reference: sum every k-wide window of the zero-padded input, one voxel at a time."""
    r = k // 2
    nd = x.dim() - 2
    padded = F.pad(x, [r, r] * nd)
    out = torch.zeros_like(x)
    for idx in itertools.product(*[range(n) for n in x.shape[2:]]):
        window = padded[(slice(None), slice(None)) + tuple(slice(i, i + k) for i in idx)]
        out[(slice(None), slice(None)) + idx] = window.flatten(2).sum(-1)
    return out


@pytest.mark.parametrize("shape,k", [((2, 3, 7, 9), 3), ((1, 2, 5, 6, 7), 5), ((1, 1, 6, 5), 9)])
def test_box_sum_against_slow_reference(shape, k):
    x = torch.rand(shape)
    torch.testing.assert_close(box_sum(x, torch.ones(k)), slow_box_sum(x, k), atol=1e-5, rtol=1e-5)


LNCC_CASES = [
    # (spatial_dims, kernel_size, shape, reduction)
    (2, 3, (2, 1, 24, 28), "mean"),  # 2D, small window
    (2, 5, (2, 1, 24, 28), "sum"),  # 2D, sum reduction
    (2, 9, (3, 1, 32, 30), "mean"),  # 2D, VoxelMorph window
    (2, 9, (2, 2, 20, 20), "none"),  # 2D multi-channel, voxel-wise map
    (3, 3, (2, 1, 12, 14, 10), "mean"),  # 3D small window
    (3, 5, (1, 1, 12, 14, 10), "sum"),  # 3D sum
    (3, 9, (1, 1, 16, 14, 12), "mean"),  # 3D VoxelMorph window
]


@pytest.mark.parametrize("nd,k,shape,reduction", LNCC_CASES)
def test_lncc_matches_monai(nd, k, shape, reduction):
    pred, target = torch.rand(shape), torch.rand(shape)
    expected = LocalNormalizedCrossCorrelationLoss(nd, k, "rectangular", reduction)(pred, target)
    got = LocalNCCLoss(nd, k, reduction)(pred, target)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nd", [2, 3])
def test_lncc_identical_images_is_minus_one(nd):
    x = torch.rand((2, 1) + (12,) * nd)
    torch.testing.assert_close(LocalNCCLoss(nd, 5)(x, x), torch.tensor(-1.0), atol=1e-4, rtol=0)
    # a positive intensity scaling keeps the correlation perfect (an offset would not: windows are zero padded)
    torch.testing.assert_close(LocalNCCLoss(nd, 5)(3 * x, x), torch.tensor(-1.0), atol=1e-4, rtol=0)


def test_lncc_gradient_flows():
    pred = torch.rand(1, 1, 16, 16, requires_grad=True)
    LocalNCCLoss(2, 9)(pred, torch.rand(1, 1, 16, 16)).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_mse():
    a, b = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 2.0], [3.0, 0.0]]]])
    assert MSELoss()(a, b).item() == pytest.approx(14 / 4)
    assert MSELoss("sum")(a, b).item() == pytest.approx(14)
    assert MSELoss("none")(a, b).shape == a.shape


@pytest.mark.parametrize("shape", [(2, 2, 9, 11), (1, 3, 6, 7, 8)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_central_equals_monai_diffusion(shape, reduction):
    ddf = torch.randn(shape)
    expected = DiffusionLoss(reduction=reduction)(ddf)
    axes = len(shape) - 2 if reduction == "mean" else 1  # MONAI sums the per-axis means; we average them
    torch.testing.assert_close(GradLoss("l2", "central", reduction)(ddf) * axes, expected, atol=1e-5, rtol=1e-5)


def slow_forward_grad(ddf, penalty):
    """Reference: VoxelMorph's Grad (the mean over axes of each axis' mean), written out per axis."""
    total = 0.0
    for axis in range(2, ddf.dim()):
        d = torch.diff(ddf, dim=axis)
        total = total + (d.pow(2) if penalty == "l2" else d.abs()).mean()
    return total / (ddf.dim() - 2)


@pytest.mark.parametrize("penalty", ["l1", "l2"])
@pytest.mark.parametrize("shape", [(2, 2, 9, 11), (2, 3, 5, 6, 7)])
def test_grad_forward_against_reference(penalty, shape):
    ddf = torch.randn(shape)
    torch.testing.assert_close(GradLoss(penalty)(ddf), slow_forward_grad(ddf, penalty))
    per_item = GradLoss(penalty, reduction="none")(ddf)
    assert per_item.shape == (shape[0],)
    torch.testing.assert_close(per_item.mean(), GradLoss(penalty)(ddf))


@pytest.mark.parametrize("differences", ["forward", "central"])
def test_constant_field_has_zero_penalty(differences):
    ddf = torch.full((1, 3, 6, 6, 6), 2.5)
    assert GradLoss("l2", differences)(ddf).item() == 0.0


def test_linear_field_known_value():
    # u_0 = 2 * x along axis 0, u_1 = 0: along axis 0 the mean over 2 components is 4 / 2 = 2, along axis 1
    # it is 0; VoxelMorph averages the two axes -> 1
    x = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 1, 8, 8)
    ddf = torch.cat([2 * x, torch.zeros_like(x)], 1)
    assert GradLoss("l2")(ddf).item() == pytest.approx(1.0)
    assert GradLoss("l2", "central")(ddf).item() == pytest.approx(1.0)


BAD_LOSSES = [
    # (factory, message)
    (lambda: LocalNCCLoss(2, 4), "kernel_size must be a positive odd integer, got 4"),  # even kernel
    (lambda: LocalNCCLoss(4), "spatial_dims must be 2 or 3, got 4"),  # bad dims
    (lambda: LocalNCCLoss(2, reduction="max"), "reduction must be one of"),  # bad reduction
    (lambda: GradLoss("l3"), "penalty must be 'l1' or 'l2'"),  # bad penalty
    (lambda: GradLoss(differences="backward"), "differences must be 'forward' or 'central'"),  # bad scheme
    (lambda: LabelDiceLoss(0), "downsample must be an integer >= 1, got 0"),  # no grid
    (lambda: LabelDiceLoss(1.5), "downsample must be an integer >= 1, got 1.5"),  # fractional grid
    (lambda: PairLoss(2, label_weight=-1.0), "label_weight must be >= 0, got -1.0"),  # negative weight
]


@pytest.mark.parametrize("factory,message", BAD_LOSSES)
def test_bad_loss_options(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


BAD_LOSS_INPUTS = [
    # (loss, args, message)
    (LocalNCCLoss(2), (torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8)), "with 2 spatial dims"),  # 3D to 2D
    (LocalNCCLoss(2), (torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9)), "same shape"),  # mismatch
    (MSELoss(), (torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9)), "same shape"),  # mismatch
    (GradLoss(), (torch.zeros(1, 3, 8, 8),), "expected ddf of shape"),  # 3 components in 2D
    (GradLoss(differences="central"), (torch.zeros(1, 2, 2, 8),), "need every spatial size >= 3"),  # too small
    (LabelDiceLoss(), (torch.zeros(1, 2, 8, 8), torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9)), "like the"),  # sizes
    (PairLoss(2, label_weight=1.0), (torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8)), "got 2 channels"),  # no labels
]


@pytest.mark.parametrize("loss,args,message", BAD_LOSS_INPUTS)
def test_bad_loss_inputs(loss, args, message):
    with pytest.raises(ValueError, match=message):
        loss(*args)


@pytest.mark.parametrize(
    "similarity,weight,expected",
    [
        ("lncc", 1.0, -1.0),  # identical images, zero field: LNCC -1, no smoothness penalty
        ("mse", 0.01, 0.0),  # identical images: MSE 0
    ],
)
def test_pair_loss_analytic(similarity, weight, expected):
    image = torch.rand(2, 1, 16, 16)
    loss = PairLoss(2, similarity, weight)(torch.zeros(2, 2, 16, 16), torch.cat([image, image], 1))
    assert loss.item() == pytest.approx(expected, abs=1e-4)


AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_pair_loss_finite_under_autocast(dtype):
    """amp: the loss of a real network on pairs with zero background stays finite with finite gradients."""
    torch.manual_seed(0)
    pair = torch.zeros(2, 2, 48, 56)
    pair[:, :, 8:40, 10:46] = torch.rand(2, 2, 32, 36)  # brain-like: a foreground inside zeros
    net = RegistrationNet(2, "both")
    try:
        with torch.autocast("cpu", dtype=dtype):
            ddf = net(pair)
            loss = PairLoss(2, "lncc", 1.0)(ddf, pair)
    except RuntimeError as error:  # a torch build without this CPU autocast dtype
        pytest.skip(f"CPU autocast with {dtype} is not available: {error}")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_pair_loss_adds_weighted_smoothness():
    image = torch.rand(1, 1, 16, 16)
    ddf = torch.randn(1, 2, 16, 16)
    pair = torch.cat([image, image], 1)
    difference = PairLoss(2, "mse", 2.0)(ddf, pair) - PairLoss(2, "mse", 0.0)(ddf, pair)
    assert difference.item() == pytest.approx(2.0 * GradLoss()(ddf).item(), rel=1e-5)


def test_pair_loss_bad_similarity():
    with pytest.raises(ValueError, match="similarity must be 'lncc' or 'mse', got 'ssim'"):
        PairLoss(2, "ssim")


def test_similarity_name_takes_the_deprecated_loss_key_with_a_warning():
    from custom.losses import similarity_name

    assert similarity_name("lncc") == "lncc" and similarity_name("mse", None) == "mse"
    with pytest.warns(FutureWarning, match="'loss' is deprecated .* use --similarity mse"):
        assert similarity_name("lncc", "mse") == "mse"


def slow_soft_one_hot(labels, classes, factor):
    """Reference: the full one-hot map, padded with background and block-averaged by MONAI-free pooling."""
    x = labels.long()[:, 0]
    pad = [p for n in reversed(x.shape[1:]) for p in (0, -n % factor)]
    onehot = F.one_hot(F.pad(x, pad), classes).movedim(-1, 1).float()
    pool = F.avg_pool2d if x.dim() == 3 else F.avg_pool3d
    return pool(onehot, factor)


@pytest.mark.parametrize(
    "shape,classes,factor",
    [
        ((2, 1, 8, 6), 4, 1),  # 2D one-hot
        ((2, 1, 8, 6), 4, 2),  # 2D blocks
        ((1, 1, 7, 5), 3, 2),  # 2D, sizes not divisible: padded with background
        ((1, 1, 6, 4, 8), 5, 2),  # 3D blocks
        ((1, 1, 5, 7, 3), 6, 3),  # 3D, odd sizes and blocks of 3
    ],
)
def test_soft_one_hot_against_full_one_hot(shape, classes, factor):
    labels = torch.randint(0, classes, shape).float()
    assert torch.allclose(soft_one_hot(labels, classes, factor), slow_soft_one_hot(labels, classes, factor))


@pytest.mark.parametrize("nd,downsample", [(2, 1), (2, 2), (3, 1), (3, 2)])
def test_label_dice_loss_analytic(nd, downsample):
    """Identical maps and a zero field: 0; maps shifted by 2 voxels: the field that shifts them back scores 0,
    the zero field does not, and the loss has a gradient with respect to the field."""
    shape = (1, 1) + (16,) * nd
    fixed = torch.zeros(shape)
    fixed[(slice(None), slice(None)) + (slice(4, 10),) * nd] = 1
    fixed[(slice(None), slice(None)) + (slice(10, 14),) * nd] = 2
    loss = LabelDiceLoss(downsample)
    zero = torch.zeros((1, nd) + (16,) * nd, requires_grad=True)
    assert loss(zero, fixed, fixed).item() == pytest.approx(0.0, abs=1e-5)
    moving = torch.roll(fixed, 2, dims=2)  # moving(x) = fixed(x - 2) along the first axis
    shift = torch.zeros_like(zero)
    shift[:, 0] = 2.0  # warped(x) = moving(x + 2) = fixed(x)
    assert loss(shift, moving, fixed).item() == pytest.approx(0.0, abs=1e-5)
    value = loss(zero, moving, fixed)
    assert value.item() > 0.2
    value.backward()
    assert zero.grad.abs().sum() > 0


def test_pair_loss_adds_the_weighted_label_dice():
    image, labels = torch.rand(1, 1, 16, 16), torch.randint(0, 3, (1, 1, 16, 16)).float()
    other = torch.roll(labels, 3, dims=3)
    ddf = torch.zeros(1, 2, 16, 16)
    pair = torch.cat([image, image, labels, other], 1)
    unsupervised = PairLoss(2)(ddf, pair)  # label channels ignored
    semi = PairLoss(2, label_weight=0.5)(ddf, pair)
    assert semi.item() == pytest.approx(unsupervised.item() + 0.5 * LabelDiceLoss()(ddf, labels, other).item())
