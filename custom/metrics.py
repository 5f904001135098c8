"""Registration accuracy and regularity: Dice per label, Jacobian determinant statistics.

``monai.metrics.DiceMetric`` scores only label 1 when given single-channel label maps without ``num_classes``;
here the label set is taken from the data (or given), and every label is scored. MONAI has no Jacobian metric.
"""

from typing import Dict, Optional, Sequence

import torch

__all__ = ["dice_per_label", "jacobian_determinant", "jacobian_stats"]


def dice_per_label(
    pred: torch.Tensor, target: torch.Tensor, labels: Optional[Sequence[int]] = None
) -> Dict[int, float]:
    """Dice overlap of each label between two label maps.

    Args:
        pred: integer label map, e.g. the warped moving labels, any shape.
        target: integer label map of the same shape, e.g. the fixed labels.
        labels: labels to score; default every non-zero label present in either map.

    Returns:
        ``{label: dice}``; a label absent from both maps scores ``nan``.

    Raises:
        ValueError: when the shapes differ.
    """
    if pred.shape != target.shape:
        raise ValueError(f"label maps must have the same shape, got {list(pred.shape)} and {list(target.shape)}.")
    if labels is None:
        labels = sorted((set(torch.unique(pred).tolist()) | set(torch.unique(target).tolist())) - {0})
    scores = {}
    for label in labels:
        p, t = pred == label, target == label
        total = int(p.sum()) + int(t.sum())
        scores[int(label)] = 2.0 * int((p & t).sum()) / total if total else float("nan")
    return scores


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Jacobian determinant of the map ``x -> x + ddf(x)``, by central differences (one-sided at the borders).

    Args:
        ddf: ``(B, spatial_dims, H, W[, D])`` in voxels.

    Returns:
        ``(B, H, W[, D])``; 1 for the identity, ``< = 0`` where the map folds.

    Raises:
        ValueError: unless ``ddf`` is a 2-D/3-D field with one component per axis and every size >= 2.
    """
    nd = ddf.dim() - 2
    if nd not in (2, 3) or ddf.shape[1] != nd:
        raise ValueError(f"expected ddf of shape (B, spatial_dims, *spatial) with 2 or 3 dims, got {list(ddf.shape)}.")
    if min(ddf.shape[2:]) < 2:
        raise ValueError(f"every spatial size must be >= 2, got {list(ddf.shape[2:])}.")
    grads = torch.gradient(ddf.double(), dim=list(range(2, 2 + nd)))  # d ddf_i / d x_j, for each j
    jac = torch.stack(grads, dim=2)  # (B, i, j, *S)
    jac = jac + torch.eye(nd, dtype=jac.dtype, device=jac.device).view(1, nd, nd, *([1] * nd))
    return torch.linalg.det(jac.movedim(1, -1).movedim(1, -1)).to(ddf.dtype)


def jacobian_stats(ddf: torch.Tensor) -> Dict[str, float]:
    """Folding and regularity of a displacement field.

    Returns:
        ``nonpositive_percent``: % of voxels with Jacobian determinant ``<= 0``; ``log_jacobian_std``: standard
        deviation of ``log(J)`` over voxels with ``J > 0``.
    """
    det = jacobian_determinant(ddf)
    positive = det[det > 0]
    return {
        "nonpositive_percent": 100.0 * float((det <= 0).double().mean()),
        "log_jacobian_std": float(positive.log().std()) if positive.numel() > 1 else float("nan"),
    }
