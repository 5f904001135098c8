import math

import pytest
import torch

from custom.metrics import dice_per_label, jacobian_determinant, jacobian_stats


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


def test_bad_dice_inputs():
    with pytest.raises(ValueError, match="same shape"):
        dice_per_label(torch.zeros(2, 2), torch.zeros(2, 3))
