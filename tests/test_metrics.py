import math

import pytest
import torch

from custom.metrics import dice_per_label, hd95_per_label, jacobian_determinant, jacobian_stats, worst_mean


def test_identical_label_maps_dice_one():
    labels = torch.randint(0, 5, (16, 16, 8))
    labels[0, 0, 0] = 4
    scores = dice_per_label(labels, labels)
    assert set(scores) <= {1, 2, 3, 4} and 0 not in scores
    assert all(v == 1.0 for v in scores.values())


def test_dice_hand_computed():
    a = torch.tensor([[1, 1, 0, 2], [0, 0, 2, 2]])
    b = torch.tensor([[1, 0, 0, 2], [0, 3, 2, 0]])
    scores = dice_per_label(a, b)
    assert scores[1] == pytest.approx(2 * 1 / 3)  # |A|=2, |B|=1, overlap 1
    assert scores[2] == pytest.approx(2 * 2 / 5)  # |A|=3, |B|=2, overlap 2
    assert scores[3] == 0.0  # only in b
    assert math.isnan(dice_per_label(a, b, labels=[7])[7])  # absent from both
    assert list(dice_per_label(a, b, labels=[2])) == [2]


@pytest.mark.parametrize("shape", [(1, 2, 9, 10), (2, 3, 6, 7, 8)])
def test_identity_field_jacobian_one(shape):
    det = jacobian_determinant(torch.zeros(shape))
    assert det.shape == (shape[0],) + shape[2:]
    torch.testing.assert_close(det, torch.ones_like(det))
    assert jacobian_stats(torch.zeros(shape))["nonpositive_percent"] == 0.0


AFFINE_CASES = [
    # (matrix A with ddf = (A - I) x, expected det = det(A))
    (torch.tensor([[2.0, 0.0], [0.0, 0.5]]), 1.0),  # stretch and squeeze
    (torch.tensor([[1.5, 0.3], [0.2, 1.0]]), 1.5 - 0.06),  # shear
    (torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), -1.0),  # a reflection folds everything
    (torch.tensor([[1.2, 0.0, 0.1], [0.0, 0.9, 0.0], [0.0, 0.3, 1.1]]), 1.2 * 0.9 * 1.1),  # 3D, cofactor of 0.1 is 0
]


@pytest.mark.parametrize("matrix,expected", AFFINE_CASES)
def test_affine_field_known_jacobian(matrix, expected):
    nd = matrix.shape[0]
    grid = torch.stack(torch.meshgrid(*[torch.arange(7.0)] * nd, indexing="ij"))  # (nd, *S)
    ddf = torch.einsum("ij,j...->i...", matrix - torch.eye(nd), grid)[None]
    det = jacobian_determinant(ddf)
    torch.testing.assert_close(det, torch.full_like(det, expected), atol=1e-5, rtol=1e-5)
    stats = jacobian_stats(ddf)
    assert stats["nonpositive_percent"] == (100.0 if expected <= 0 else 0.0)
    if expected > 0:
        assert stats["log_jacobian_std"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    "args,message",
    [
        ((torch.zeros(1, 3, 4, 4),), "expected ddf of shape"),  # 3 components in 2D
        ((torch.zeros(1, 2, 1, 4),), "every spatial size must be >= 2"),  # too small
    ],
)
def test_bad_jacobian_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        jacobian_determinant(*args)


def slow_jacobian_determinant(ddf):
    """Reference: the float64 Jacobian matrix of every voxel, and torch.linalg.det of it."""
    nd = ddf.dim() - 2
    grads = torch.gradient(ddf.double(), dim=list(range(2, 2 + nd)))
    jac = torch.stack(grads, dim=2) + torch.eye(nd, dtype=torch.float64).view(1, nd, nd, *([1] * nd))
    return torch.linalg.det(jac.movedim(1, -1).movedim(1, -1))


@pytest.mark.parametrize(
    "shape,slab_voxels",
    [
        ((2, 2, 9, 11), 2**21),  # 2D, whole
        ((1, 3, 6, 7, 8), 2**21),  # 3D, whole
        ((1, 3, 9, 7, 8), 100),  # 3D in slabs of 1 to 2 planes (the last one alone)
        ((2, 2, 10, 11), 30),  # 2D in slabs of 2 rows
    ],
)
def test_jacobian_closed_form_equals_reference(shape, slab_voxels, monkeypatch):
    monkeypatch.setattr("custom.metrics.SLAB_VOXELS", slab_voxels)
    ddf = 1.5 * torch.randn(shape)  # rough enough to fold in places
    det = jacobian_determinant(ddf)
    assert det.dtype == torch.float32
    torch.testing.assert_close(det.double(), slow_jacobian_determinant(ddf), atol=1e-4, rtol=1e-4)
    assert (det <= 0).any() and (det > 0).any()


def test_jacobian_stats_hand_computed():
    # 2D field whose first component is 0.5 * x0**2: J = 1 + x0 along axis 0 (central differences are exact
    # for a quadratic inside; one-sided at the borders)
    x0 = torch.arange(-3.0, 4.0).view(1, 1, 7, 1).expand(1, 1, 7, 5)
    ddf = torch.cat([0.5 * x0**2, torch.zeros_like(x0)], 1)
    det = jacobian_determinant(ddf)[0, :, 0]
    torch.testing.assert_close(det, torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, 3.0, 3.5]))
    stats = jacobian_stats(ddf)
    assert stats["nonpositive_percent"] == pytest.approx(100 * 3 / 7)  # -1.5, -1 and 0 fold
    expected = torch.tensor([1.0, 2.0, 3.0, 3.5]).log().repeat(5).std()
    assert stats["log_jacobian_std"] == pytest.approx(float(expected), rel=1e-5)


def test_hd95_hand_computed():
    # two squares 4 px apart along axis 0: every surface point is 4 px (or more, for the far side) away
    a = torch.zeros(20, 20, dtype=torch.int32)
    b = torch.zeros(20, 20, dtype=torch.int32)
    a[2:6, 2:6] = 1
    b[6:10, 2:6] = 1
    b[15:17, 15:17] = 2  # only in one map: no distance
    scores = hd95_per_label(a, b)
    assert scores[1] == pytest.approx(4.0) and math.isnan(scores[2])
    assert hd95_per_label(a, a)[1] == 0.0
    # spacing scales distances along its axis
    assert hd95_per_label(a, b, labels=[1], spacing=[0.5, 1.0])[1] == pytest.approx(2.0)


WORST_CASES = [
    # (scores, fraction, expected)
    ({1: 0.9, 2: 0.5, 3: 0.7}, 0.3, 0.5),  # ceil(0.9) = 1 worst label
    ({i: i / 10 for i in range(1, 11)}, 0.3, 0.2),  # 3 worst of 10: 0.1, 0.2, 0.3
    ({1: 0.8, 2: float("nan")}, 0.3, 0.8),  # nan ignored
    ({1: float("nan")}, 0.3, float("nan")),  # nothing scored
]


@pytest.mark.parametrize("scores,fraction,expected", WORST_CASES)
def test_worst_mean(scores, fraction, expected):
    value = worst_mean(scores, fraction)
    assert (math.isnan(value) and math.isnan(expected)) or value == pytest.approx(expected)


def test_bad_metric_inputs():
    with pytest.raises(ValueError, match="fraction must be in"):
        worst_mean({1: 0.5}, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        hd95_per_label(torch.zeros(2, 2), torch.zeros(2, 3))


def test_bad_dice_inputs():
    with pytest.raises(ValueError, match="same shape"):
        dice_per_label(torch.zeros(2, 2), torch.zeros(2, 3))


SUMMARIES = [
    # (rows, keys, expected summary)
    ([{"dice": 0.5}, {"dice": 1.0}], None, {"dice": {"mean": 0.75, "std": 0.25, "n": 2}}),  # mean, population sd
    ([{"dice": 0.5, "name": "a"}, {"dice": float("nan")}], None, {"dice": {"mean": 0.5, "std": 0.0, "n": 1}}),  # NaN
    ([{"a": 1.0, "b": 2.0}], ["b"], {"b": {"mean": 2.0, "std": 0.0, "n": 1}}),  # only the keys asked for
    ([], None, {}),  # no pairs
]


@pytest.mark.parametrize("rows,keys,expected", SUMMARIES)
def test_summarize(rows, keys, expected):
    from custom.metrics import summarize

    assert summarize(rows, keys) == expected


def test_format_mean():
    from custom.metrics import format_mean

    summary = {"dice": {"mean": 0.81234, "std": 0.1, "n": 3}}
    assert format_mean(summary, "dice") == "0.812" and format_mean(summary, "dice", 2, sd=True) == "0.81 ± 0.10"
    assert format_mean(summary, "hd95") == "n/a"


def test_pair_metrics_of_a_perfect_registration():
    from custom.metrics import pair_metrics

    labels = torch.zeros(12, 10, dtype=torch.int64)
    labels[2:6, 2:6], labels[7:11, 3:9] = 1, 2
    row = pair_metrics(torch.ones(12, 10), labels[None].clone(), labels)  # a tool's extra singleton axis is fine
    assert row["dice_mean"] == 1.0 and row["dice_worst30"] == 1.0 and row["hd95_mean"] == 0.0
    assert row["dice_1"] == 1.0 and row["dice_2"] == 1.0
    assert row["nonpositive_percent"] == 0.0 and row["jacobian_min"] == 1.0 and row["log_jacobian_std"] == 0.0
    assert set(pair_metrics(torch.ones(4, 4))) == {"nonpositive_percent", "jacobian_min", "log_jacobian_std"}


@pytest.mark.parametrize(
    "warped, fixed, message",
    [
        (torch.zeros(4, 4), None, "both label maps"),  # only the warped labels
        (None, torch.zeros(4, 4), "both label maps"),  # only the fixed labels
        (torch.zeros(4, 5), torch.zeros(4, 4), r"same size, got \[4, 5\] and \[4, 4\]"),  # sizes differ
    ],
)
def test_pair_metrics_rejects(warped, fixed, message):
    from custom.metrics import pair_metrics

    with pytest.raises(ValueError, match=message):
        pair_metrics(torch.ones(4, 4), warped, fixed)
