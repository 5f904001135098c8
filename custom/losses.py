"""Registration losses: local NCC, MSE, displacement smoothness and the training loss that combines them.

All are ``nn.Module``s with MONAI's sign convention (lower is better) and a ``reduction`` argument
(``"mean"``, ``"sum"`` or ``"none"``).
"""

import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from custom.spatial import check_spatial_dims
from custom.warp import SpatialTransformer

__all__ = [
    "SIMILARITIES",
    "LocalNCCLoss",
    "MSELoss",
    "GradLoss",
    "LabelDiceLoss",
    "PairLoss",
    "soft_one_hot",
    "box_sum",
    "check_similarity",
    "similarity_name",
]

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    return reduction


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    return x


def _check_pair(pred: torch.Tensor, target: torch.Tensor, spatial_dims: int) -> None:
    if pred.dim() != spatial_dims + 2:
        raise ValueError(
            f"expected pred of shape (B, C, *spatial) with {spatial_dims} spatial dims, got {list(pred.shape)}."
        )
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {list(pred.shape)} and {list(target.shape)}.")


def box_sum(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable, zero-padded ('same' size) filtering of every channel with the 1-D ``kernel`` on each axis.

    With ``kernel = torch.ones(k)`` this is the sum over the ``k``-wide box around every voxel. One depthwise
    conv per axis over all channels at once (faster on CPU than per-map filtering or pooling).

    Args:
        x: ``(B, C, H, W[, D])``.
        kernel: ``(k,)`` with ``k`` odd.

    Returns:
        ``(B, C, H, W[, D])``.
    """
    nd = x.dim() - 2
    conv = F.conv2d if nd == 2 else F.conv3d
    c, k = x.shape[1], kernel.shape[0]
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = k
        padding = [0] * nd
        padding[axis] = k // 2
        weight = kernel.to(x).view([1, 1] + shape).expand([c, 1] + shape)
        x = conv(x, weight, padding=padding, groups=c)
    return x


class LocalNCCLoss(nn.Module):
    """Negative squared local normalised cross-correlation with a rectangular window.

    Equal to ``monai.losses.LocalNormalizedCrossCorrelationLoss(kernel_type="rectangular")`` (and VoxelMorph's
    NCC): in ``[-1, 0]``, ``-1`` for identical images. Faster because the five local sums are taken by one
    separable box filter over stacked channels (:func:`box_sum`).

    Args:
        spatial_dims: 2 or 3.
        kernel_size: odd window width (VoxelMorph uses 9).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the voxel-wise map ``(B, C, H, W[, D])``).
        smooth_nr: added to the numerator.
        smooth_dr: lower bound of the local variances.

    Raises:
        ValueError: for a bad ``spatial_dims``, an even or non-positive ``kernel_size`` or a bad ``reduction``.
    """

    def __init__(
        self,
        spatial_dims: int,
        kernel_size: int = 9,
        reduction: str = "mean",
        smooth_nr: float = 0.0,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}.")
        self.kernel_size = kernel_size
        self.register_buffer("kernel", torch.ones(kernel_size), persistent=False)
        self.reduction = _check_reduction(reduction)
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            pred: ``(B, C, H, W[, D])``, e.g. the warped moving image.
            target: ``(B, C, H, W[, D])``, e.g. the fixed image.

        Returns:
            A scalar, or ``(B, C, H, W[, D])`` for ``reduction="none"``.
        """
        _check_pair(pred, target, self.spatial_dims)
        c = pred.shape[1]
        stacked = torch.cat([target, pred, target * target, pred * pred, target * pred], dim=1)
        sums = box_sum(stacked, self.kernel)
        t_sum, p_sum, t2_sum, p2_sum, tp_sum = torch.split(sums, c, dim=1)
        n = float(self.kernel_size**self.spatial_dims)
        t_avg, p_avg = t_sum / n, p_sum / n
        cross = tp_sum - p_avg * t_sum
        t_var = torch.clamp(t2_sum - t_avg * t_sum, min=self.smooth_dr)
        p_var = torch.clamp(p2_sum - p_avg * p_sum, min=self.smooth_dr)
        ncc = (cross * cross + self.smooth_nr) / (t_var * p_var)
        return _reduce(ncc, self.reduction).neg()


class MSELoss(nn.Module):
    """Mean squared intensity difference.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the voxel-wise map).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            pred: ``(B, C, H, W[, D])``.
            target: same shape as ``pred``.

        Returns:
            A scalar, or ``(B, C, H, W[, D])`` for ``reduction="none"``.
        """
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got {list(pred.shape)} and {list(target.shape)}."
            )
        return _reduce((pred - target) ** 2, self.reduction)


class GradLoss(nn.Module):
    """Finite-difference smoothness penalty of a displacement field, with VoxelMorph's meaning.

    ``mean_d mean(|D_d u|^p)``: the mean over the spatial axes ``d`` of the mean over batch, components and
    voxels, exactly VoxelMorph's ``Grad`` loss, so VoxelMorph's weights (1.0 with NCC, 0.01 with MSE) mean the
    same here.

    - ``differences="forward"`` (default): ``D_d u = u[i+1] - u[i]`` as in VoxelMorph.
    - ``differences="central"``, ``penalty="l2"``: ``D_d u = (u[i+1] - u[i-1]) / 2`` on the interior.
      ``monai.losses.DiffusionLoss`` sums the axes instead of averaging them: its ``mean`` is this value times
      ``spatial_dims``; ``reduction="sum"`` (the sum over every axis and voxel) equals its ``sum``.

    Args:
        penalty: ``"l2"`` (squared differences) or ``"l1"`` (absolute differences).
        differences: ``"forward"`` or ``"central"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``. ``"none"`` gives one value per batch item, ``(B,)``,
            whose mean is the ``"mean"`` reduction (forward differences along different axes have different
            shapes, so there is no common voxel-wise map).

    Raises:
        ValueError: for an unknown ``penalty``, ``differences`` or ``reduction``.
    """

    def __init__(self, penalty: str = "l2", differences: str = "forward", reduction: str = "mean") -> None:
        super().__init__()
        if penalty not in ("l1", "l2"):
            raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}.")
        if differences not in ("forward", "central"):
            raise ValueError(f"differences must be 'forward' or 'central', got {differences!r}.")
        self.penalty = penalty
        self.differences = differences
        self.reduction = _check_reduction(reduction)

    def _diffs(self, ddf: torch.Tensor) -> List[torch.Tensor]:
        nd = ddf.dim() - 2
        out: List[torch.Tensor] = []
        for axis in range(2, ddf.dim()):
            if self.differences == "forward":
                out.append(ddf.narrow(axis, 1, ddf.shape[axis] - 1) - ddf.narrow(axis, 0, ddf.shape[axis] - 1))
            else:
                inner = ddf
                for other in range(2, 2 + nd):
                    if other != axis:
                        inner = inner.narrow(other, 1, ddf.shape[other] - 2)
                n = ddf.shape[axis] - 2
                out.append((inner.narrow(axis, 2, n) - inner.narrow(axis, 0, n)) / 2.0)
        return out

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        """Compute the penalty.

        Args:
            ddf: ``(B, spatial_dims, H, W[, D])``.

        Returns:
            A scalar, or ``(B,)`` for ``reduction="none"``.

        Raises:
            ValueError: when ``ddf`` is not a 2-D/3-D field with one component per axis, or is too small.
        """
        if ddf.dim() not in (4, 5) or ddf.shape[1] != ddf.dim() - 2:
            raise ValueError(
                f"expected ddf of shape (B, spatial_dims, *spatial) with spatial_dims 2 or 3, got {list(ddf.shape)}."
            )
        least = 2 if self.differences == "forward" else 3
        if min(ddf.shape[2:]) < least:
            raise ValueError(
                f"{self.differences} differences need every spatial size >= {least}, got {list(ddf.shape[2:])}."
            )
        terms = [d * d if self.penalty == "l2" else d.abs() for d in self._diffs(ddf)]
        if self.reduction == "sum":
            return torch.stack([t.sum() for t in terms]).sum()
        per_item = torch.stack([t.flatten(1).mean(1) for t in terms]).mean(0)
        return per_item.mean() if self.reduction == "mean" else per_item


SIMILARITIES = ("lncc", "mse")


def check_similarity(similarity: str) -> str:
    """``similarity`` when it is one of :data:`SIMILARITIES` (the training loss's, the refinement's and the affine
    stage's).

    Raises:
        ValueError: ``"similarity must be 'lncc' or 'mse', got <value>."``
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be 'lncc' or 'mse', got {similarity!r}.")
    return similarity


def soft_one_hot(labels: torch.Tensor, classes: int, factor: int = 1) -> torch.Tensor:
    """The fraction of each ``factor``-sized block of voxels that holds each label: a one-hot encoding for
    ``factor`` 1, and its block average (``avg_pool`` of the one-hot) for ``factor`` > 1, computed without the
    full-size one-hot (35 labels of a 160x192x224 volume would take 1 GB).

    Args:
        labels: ``(B, 1, *S)`` integer labels in ``[0, classes)`` (any dtype holding integers).
        classes: the number of labels.
        factor: the block size along each axis; ``S`` is padded with background to a multiple of it.

    Returns:
        ``(B, classes, *ceil(S / factor))`` float32.
    """
    x = labels.round().long()[:, 0]
    x = F.pad(x, [p for n in reversed(x.shape[1:]) for p in (0, -n % factor)])
    coarse = [n // factor for n in x.shape[1:]]
    nd = len(coarse)
    blocks = x.reshape(x.shape[0], *[k for c in coarse for k in (c, factor)])
    blocks = blocks.permute(0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2)).reshape(x.shape[0], -1, factor**nd)
    out = torch.zeros(x.shape[0], blocks.shape[1], classes, device=labels.device)
    out.scatter_add_(2, blocks, torch.full(blocks.shape, 1.0 / factor**nd, device=labels.device))
    return out.transpose(1, 2).reshape(x.shape[0], classes, *coarse)


class LabelDiceLoss(nn.Module):
    """Soft Dice loss of the moving label map warped by a displacement against the fixed label map: VoxelMorph's
    semi-supervised (auxiliary) loss. Each map is one-hot encoded over the labels ``0..max`` of the pair
    (:func:`soft_one_hot`), the moving one is warped linearly (so the loss has a gradient), and MONAI's
    ``DiceLoss`` scores every non-background channel; a label absent from both maps scores 0 loss.

    Args:
        downsample: score on a grid this many times coarser along each axis (block-averaged one-hot maps, the
            displacement averaged and scaled alike): 2 makes a 3D volume's 35-label loss 8 times cheaper.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per item and label).

    Raises:
        ValueError: for an unknown reduction or a downsampling factor below 1.
    """

    def __init__(self, downsample: int = 1, reduction: str = "mean") -> None:
        super().__init__()
        if int(downsample) != downsample or downsample < 1:
            raise ValueError(f"downsample must be an integer >= 1, got {downsample!r}.")
        self.downsample = int(downsample)
        self.dice = DiceLoss(include_background=False, reduction=_check_reduction(reduction))
        self.transformer = SpatialTransformer()

    def forward(self, ddf: torch.Tensor, moving_label: torch.Tensor, fixed_label: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            ddf: ``(B, spatial_dims, *S)`` displacement, in voxels.
            moving_label: ``(B, 1, *S)`` integer labels (any dtype holding integers).
            fixed_label: ``(B, 1, *S)`` integer labels.

        Returns:
            The loss (in ``[0, 1]``; 0 for identical maps and an identity displacement).

        Raises:
            ValueError: when the label maps' shapes differ from each other or from the displacement's.
        """
        if moving_label.shape != fixed_label.shape or moving_label.shape[2:] != ddf.shape[2:]:
            raise ValueError(
                f"label maps must be (B, 1, *S) like the displacement {list(ddf.shape)}, got "
                f"{list(moving_label.shape)} and {list(fixed_label.shape)}."
            )
        f = self.downsample
        classes = int(torch.maximum(moving_label.max(), fixed_label.max()).round()) + 1
        moving, fixed = (soft_one_hot(x, classes, f) for x in (moving_label, fixed_label))
        if f > 1:
            pool = F.avg_pool2d if ddf.ndim == 4 else F.avg_pool3d
            ddf = pool(ddf, f, ceil_mode=True) / f
        return self.dice(self.transformer(moving, ddf.to(moving.dtype)), fixed)


class PairLoss(nn.Module):
    """Registration loss ``similarity(warp(moving, ddf), fixed) + smooth_weight * Grad(ddf)`` (unsupervised), plus
    ``label_weight * LabelDiceLoss`` when the pairs carry label maps (semi-supervised; the labels are never an input
    of the network), computed in float32 also under mixed precision (autocast is disabled inside).

    Args:
        spatial_dims: 2 or 3.
        similarity: ``"lncc"`` (local NCC, window ``kernel_size``) or ``"mse"``.
        smooth_weight: weight of the smoothness penalty (VoxelMorph: 1.0 for NCC, 0.01 for MSE).
        kernel_size: LNCC window.
        label_weight: weight of the Dice loss of the warped moving labels (VoxelMorph's semi-supervised setting
            used 0.01 with MSE; with LNCC about 1); 0 ignores any labels.
        label_downsample: the grid of the label loss (:class:`LabelDiceLoss`); default 2 in 3D, 1 in 2D.

    Raises:
        ValueError: for an unknown similarity or a negative label weight.
    """

    def __init__(
        self,
        spatial_dims: int,
        similarity: str = "lncc",
        smooth_weight: float = 1.0,
        kernel_size: int = 9,
        label_weight: float = 0.0,
        label_downsample: Optional[int] = None,
    ):
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        check_similarity(similarity)
        if not label_weight >= 0:
            raise ValueError(f"label_weight must be >= 0, got {label_weight!r}.")
        self.similarity = LocalNCCLoss(spatial_dims, kernel_size) if similarity == "lncc" else MSELoss()
        self.smoothness = GradLoss("l2")
        self.smooth_weight = float(smooth_weight)
        self.label_weight = float(label_weight)
        self.labels = LabelDiceLoss(label_downsample or (2 if spatial_dims == 3 else 1))
        self.transformer = SpatialTransformer()

    def forward(self, ddf: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            ddf: ``(B, spatial_dims, *S)`` predicted displacement.
            pair: ``(B, 2, *S)``: channel 0 moving, channel 1 fixed; or ``(B, 4, *S)`` with the moving and fixed
                label maps in channels 2 and 3 (:func:`custom.workflow.prepare_labelled_pair_batch`).

        Returns:
            The scalar loss.

        Raises:
            ValueError: when ``label_weight`` > 0 and ``pair`` carries no label maps.
        """
        if self.label_weight > 0 and pair.shape[1] != 4:
            raise ValueError(
                f"label_weight {self.label_weight} needs (moving, fixed, moving_label, fixed_label) channels, got "
                f"{pair.shape[1]} channels: train with labels (prepare_labelled_pair_batch)."
            )
        # in float32 even inside autocast (amp): half-precision box sums make LNCC 0/0 in zero backgrounds
        with torch.autocast(device_type=ddf.device.type, enabled=False):
            ddf, pair = ddf.float(), pair.float()
            warped = self.transformer(pair[:, :1], ddf)
            loss = self.similarity(warped, pair[:, 1:2]) + self.smooth_weight * self.smoothness(ddf)
            if self.label_weight > 0:
                loss = loss + self.label_weight * self.labels(ddf, pair[:, 2:3], pair[:, 3:4])
            return loss


def similarity_name(similarity: str, loss: Optional[str] = None) -> str:
    """The configs' similarity (``"lncc"`` or ``"mse"``), honouring the deprecated key ``loss`` that named it before.

    Args:
        similarity: the ``similarity`` key.
        loss: the deprecated ``loss`` key; when given it wins, with a ``FutureWarning``.
    """
    if loss is None:
        return check_similarity(similarity)
    warnings.warn(
        f"the config key 'loss' is deprecated (it names the similarity): use --similarity {loss} instead.",
        FutureWarning,
        stacklevel=2,
    )
    return loss
