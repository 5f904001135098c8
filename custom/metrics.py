"""Registration accuracy and regularity, as papers report them: Dice per label, the mean Dice of the worst 30%
of labels, HD95 per label, % folding and SDlogJ.

``monai.metrics.DiceMetric`` scores only label 1 when given single-channel label maps without ``num_classes``;
here the label set is taken from the data (or given), and every label is scored. HD95 is MONAI's
``compute_hausdorff_distance`` per label. MONAI has no Jacobian metric: the determinant is computed here in
closed form.
"""

import math
import statistics
from typing import Dict, Optional, Sequence

import torch

from custom.spatial import slabs

__all__ = [
    "dice_per_label",
    "folding_stats",
    "format_mean",
    "hd95_per_label",
    "jacobian_determinant",
    "jacobian_stats",
    "label_scores",
    "pair_metrics",
    "summarize",
    "worst_mean",
]

Labels = Optional[Sequence[int]]
"""Labels to score; ``None``: every non-zero label of either map."""
Spacing = Optional[Sequence[float]]
"""Voxel size per axis; ``None``: distances in voxels."""
Scores = Dict[int, float]
"""A score per label."""


def _labels(pred: torch.Tensor, target: torch.Tensor, labels: Labels) -> Sequence[int]:
    if pred.shape != target.shape:
        raise ValueError(f"label maps must have the same shape, got {list(pred.shape)} and {list(target.shape)}.")
    if labels is None:
        labels = sorted((set(torch.unique(pred).tolist()) | set(torch.unique(target).tolist())) - {0})
    return labels


def dice_per_label(pred: torch.Tensor, target: torch.Tensor, labels: Labels = None) -> Scores:
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
    labels = _labels(pred, target, labels)
    # three histograms instead of three full-volume masks per label: one pass over a volume for ~45 labels
    pred, target = pred.flatten().long(), target.flatten().long()
    low = min(int(pred.min()), int(target.min()), *[int(v) for v in labels]) if pred.numel() else 0
    pred, target = pred - low, target - low
    size = max(int(pred.max()), int(target.max()), *[int(v) - low for v in labels]) + 1 if pred.numel() else 1
    inter = torch.bincount(pred[pred == target], minlength=size)
    sums = torch.bincount(pred, minlength=size) + torch.bincount(target, minlength=size)
    scores = {}
    for label in labels:
        total = int(sums[int(label) - low])
        scores[int(label)] = 2.0 * int(inter[int(label) - low]) / total if total else float("nan")
    return scores


def _crop_to_union(p: torch.Tensor, t: torch.Tensor):
    """Two masks cropped to the bounding box of either, with one voxel of background around it: their surfaces
    and distances are unchanged, and a small structure of a large volume is scored in milliseconds."""
    nonzero = (p | t).nonzero()
    lo = (nonzero.min(0).values - 1).clamp(min=0)
    hi = nonzero.max(0).values + 2
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return p[box], t[box]


def hd95_per_label(pred: torch.Tensor, target: torch.Tensor, labels: Labels = None, spacing: Spacing = None) -> Scores:
    """Symmetric 95th-percentile Hausdorff distance between the surfaces of each label (MONAI's
    ``compute_hausdorff_distance(percentile=95)``).

    Args:
        pred: integer label map ``(H, W[, D])``.
        target: integer label map of the same shape.
        labels: labels to score; default every non-zero label present in either map.
        spacing: voxel size per axis (default 1: distances in voxels).

    Returns:
        ``{label: hd95}``; ``nan`` for a label missing from either map.

    Raises:
        ValueError: when the shapes differ.
    """
    from monai.metrics import compute_hausdorff_distance

    scores = {}
    for label in _labels(pred, target, labels):
        p, t = pred == label, target == label
        if not (p.any() and t.any()):
            scores[int(label)] = float("nan")
            continue
        p, t = _crop_to_union(p, t)
        hd = compute_hausdorff_distance(
            p[None, None], t[None, None], include_background=True, percentile=95, spacing=spacing
        )
        scores[int(label)] = float(hd)
    return scores


def worst_mean(scores: Dict[int, float], fraction: float = 0.3) -> float:
    """Mean of the lowest ``fraction`` of the (non-nan) scores, at least one: "Dice of the worst 30% labels".

    Raises:
        ValueError: for a fraction outside ``(0, 1]``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
    values = sorted(v for v in scores.values() if not math.isnan(v))
    if not values:
        return float("nan")
    worst = values[: max(1, math.ceil(fraction * len(values)))]
    return sum(worst) / len(worst)


def label_scores(pred: torch.Tensor, target: torch.Tensor, labels: Labels = None, spacing: Spacing = None) -> dict:
    """The label metrics papers report for one pair.

    Args:
        pred: integer label map ``(H, W[, D])``, e.g. the warped moving labels.
        target: integer label map of the same shape, e.g. the fixed labels.
        labels: labels to score; default every non-zero label present in either map.
        spacing: voxel size per axis, for HD95.

    Returns:
        ``dice_<label>`` per label, ``dice_mean`` (over the scored labels), ``dice_worst30`` (mean of the lowest
        30%) and ``hd95_mean`` (mean over the labels present in both maps).
    """
    dice = dice_per_label(pred, target, labels)
    valid = [v for v in dice.values() if not math.isnan(v)]
    hd = [v for v in hd95_per_label(pred, target, labels, spacing).values() if not math.isnan(v)]
    return {
        **{f"dice_{k}": v for k, v in dice.items()},
        "dice_mean": statistics.fmean(valid) if valid else float("nan"),
        "dice_worst30": worst_mean(dice, 0.3),
        "hd95_mean": statistics.fmean(hd) if hd else float("nan"),
    }


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Jacobian determinant of the map ``x -> x + ddf(x)``, by central differences (one-sided at the borders),
    in closed form (cofactors) in float32: a 160x192x224 field takes well under a second and no float64 copies.

    Args:
        ddf: ``(B, spatial_dims, H, W[, D])`` in voxels.

    Returns:
        ``(B, H, W[, D])``; 1 for the identity, ``<= 0`` where the map folds.

    Raises:
        ValueError: unless ``ddf`` is a 2-D/3-D field with one component per axis and every size >= 2.
    """
    nd = ddf.dim() - 2
    if nd not in (2, 3) or ddf.shape[1] != nd:
        raise ValueError(f"expected ddf of shape (B, spatial_dims, *spatial) with 2 or 3 dims, got {list(ddf.shape)}.")
    if min(ddf.shape[2:]) < 2:
        raise ValueError(f"every spatial size must be >= 2, got {list(ddf.shape[2:])}.")
    size, step = ddf.shape[2], SLAB_VOXELS // ddf[0, 0, 0].numel()
    if step >= size:
        return _determinant(ddf, nd)
    parts = [  # slabs along the first axis, each with a one-voxel halo for the central differences
        _determinant(ddf[:, :, low:high], nd)[:, first - low : last - low]
        for first, last, low, high in slabs(size, step, 1)
    ]
    return torch.cat(parts, dim=1)


SLAB_VOXELS = 2**21
""":func:`jacobian_determinant` works on slabs of about this many voxels, so its temporaries stay small."""


def _determinant(ddf: torch.Tensor, nd: int) -> torch.Tensor:
    # j[i][k] = d x'_i / d x_k = delta_ik + d ddf_i / d x_k
    grads = torch.gradient(ddf.float(), dim=list(range(2, 2 + nd)))
    j = [[grads[k][:, i] + (1.0 if i == k else 0.0) for k in range(nd)] for i in range(nd)]
    if nd == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def jacobian_stats(ddf: torch.Tensor) -> Dict[str, float]:
    """Folding and regularity of a displacement field ``(B, spatial_dims, H, W[, D])``: :func:`folding_stats`
    of its :func:`jacobian_determinant`."""
    return folding_stats(jacobian_determinant(ddf))


def folding_stats(det: torch.Tensor) -> Dict[str, float]:
    """Folding and regularity from a Jacobian-determinant map (ours, or another tool's).

    Returns:
        ``nonpositive_percent``: % of voxels with Jacobian determinant ``<= 0`` (% folding);
        ``jacobian_min``: the smallest determinant;
        ``log_jacobian_std``: SDlogJ, the standard deviation of ``log(J)`` over voxels with ``J > 0``.
    """
    positive = det[det > 0]
    return {
        "nonpositive_percent": 100.0 * float((det <= 0).float().mean()),
        "jacobian_min": float(det.min()),
        "log_jacobian_std": float(positive.log().std()) if positive.numel() > 1 else float("nan"),
    }


def pair_metrics(
    det: torch.Tensor,
    warped_label: Optional[torch.Tensor] = None,
    fixed_label: Optional[torch.Tensor] = None,
    labels: Optional[Sequence[int]] = None,
) -> Dict[str, float]:
    """The one per-pair metrics row of evaluation (``metrics.csv``), ``accuracy`` and ``study``: the
    :func:`folding_stats` of the transform and, given label maps, their :func:`label_scores`.

    Args:
        det: the Jacobian determinant of the transform, any shape.
        warped_label: the integer labels of the moving image after registration, reshaped to ``fixed_label``'s
            shape (a tool may return them with other singleton axes).
        fixed_label: ``(H, W[, D])`` integer labels of the fixed image.
        labels: labels to score; default every non-zero label of either map.

    Raises:
        ValueError: when only one label map is given, or their sizes differ.
    """
    row = folding_stats(det)
    if (warped_label is None) != (fixed_label is None):
        raise ValueError("pair_metrics needs both label maps (warped moving and fixed) or neither.")
    if warped_label is not None:
        if warped_label.numel() != fixed_label.numel():
            raise ValueError(
                f"label maps must have the same size, got {list(warped_label.shape)} and {list(fixed_label.shape)}."
            )
        row.update(label_scores(warped_label.reshape(fixed_label.shape), fixed_label, labels))
    return row


def summarize(rows: Sequence[Dict[str, float]], keys: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    """The one summary of per-pair metric rows (evaluation, ``accuracy``, ``study``): mean, standard deviation and
    number of pairs of every numeric column (or of ``keys``), NaNs left out.

    Args:
        rows: one dict per pair.
        keys: the columns to summarise; default every numeric column, in first-seen order.
    """
    if keys is None:
        keys = []
        for row in rows:
            keys += [k for k, v in row.items() if isinstance(v, (int, float)) and k not in keys]
    out = {}
    for key in keys:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        if values:
            out[key] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "n": len(values)}
    return out


def format_mean(summary: Dict[str, Dict[str, float]], key: str, digits: int = 3, sd: bool = False) -> str:
    """A summary's mean of ``key`` (``± std`` with ``sd``) for a markdown table; ``n/a`` when it has none."""
    if key not in summary:
        return "n/a"
    entry = summary[key]
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}" if sd else f"{entry['mean']:.{digits}f}"
