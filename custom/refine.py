"""Test-time refinement (instance optimisation): the network's field is a starting point, optimised for each pair.

Learn2Reg's strongest entries refine the predicted field on every test pair. Here a stationary velocity field
(``integration_steps > 0``, the default: integrated by scaling and squaring, so the result barely folds) or the
displacement itself (``integration_steps=0``) is a free tensor started from the network's prediction and
optimised with Adam on the training loss (similarity of the warped moving image to the fixed image +
``smooth_weight`` times VoxelMorph's gradient penalty). A diffeomorphic network gives its own velocity; a
displacement network's field ``u`` starts the velocity as ``v = u`` (``exp(v) = id + v`` to first order).

Each step's gradient is smoothed by a Gaussian (``grad_sigma`` voxels of the optimised grid) before Adam uses it,
as FireANTs and ANTs' SyN smooth their updates: Adam scales every voxel's step by that voxel's own gradient
history, so an unsmoothed gradient lets single voxels run ahead of their neighbours, and the field folds. On real
OASIS pairs a sigma of 1.5 (the 3D default) took the folding voxels from 0.06-0.09% to about 0.0001% at the same
or a higher Dice; the smoother field also stops earlier. In 2D (inter-subject OASIS slices) a sigma of 2 keeps
every pair under 0.01% folding voxels (0.013% without) at the same Dice.

Coarse to fine: the optimisation runs on a pyramid of ``levels`` (resolution divisors, coarse first): at each
level the images are area-downsampled, the LNCC window shrinks with the level (9 voxels at full resolution, 5 at
half, 3 at a quarter: the same physical size), the field starts from the coarser level's (upsampled) and at most
``steps`` Adam steps are taken. A level stops early when its loss has improved by less than ``tolerance``
(relative) over ``patience`` steps. The result is upsampled to full resolution.

Defaults, chosen per dimensionality from ``python -m custom accuracy`` (:data:`DEFAULTS`): in 2D one
full-resolution level of 10 steps (Dice stops improving after about 10 steps at learning rate 0.2 on real
slices); in 3D a quarter- then a half-resolution level (a full-resolution step costs 8 times a half-resolution
one and about 3.5 s on 2 CPU threads for a 160x192x224 pair, while the half-resolution field, upsampled,
reaches the same Dice).

:class:`RefineOptions` holds the options, their defaults and their checks, for the configs, the command line
and :class:`RefiningInferer`, which puts this behind MONAI's ``Inferer`` interface, so the bundle's evaluator and
inference configs call it in place of ``SimpleInferer``.
"""

import math
import sys
import warnings
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from monai.networks.layers.convutils import gaussian_1d
from monai.networks.layers.simplelayers import separable_filtering
from torch import nn

from custom.affine import after_affine
from custom.errors import as_bool, check_integer, check_number
from custom.losses import GradLoss, LocalNCCLoss, MSELoss, check_similarity
from custom.spatial import check_spatial_dims, slabs
from custom.warp import SpatialTransformer, VelocityIntegration

__all__ = [
    "DEFAULTS",
    "RefineOptions",
    "RefiningInferer",
    "RegistrationInferer",
    "grid_sigma",
    "refine",
    "resize_field",
]

DEFAULTS = {
    2: {"steps": (10,), "levels": (1,), "downsample": 1, "integration_steps": 7, "grad_sigma": 2.0},
    3: {"steps": (60, 10, 5), "levels": (4, 2, 1), "downsample": 2, "integration_steps": 3, "grad_sigma": 1.5},
}
"""The per-dimensionality defaults of the options left ``None``: steps per level, the pyramid, the optimised
field's resolution, the scaling-and-squaring steps and the gradient's smoothing."""

LEVELS = (1, 2, 4, 8)
_DIMS_DEFAULTS = ("downsample", "integration_steps", "grad_sigma")

FULL_SMOOTHING_SIZE = 40
"""``grad_sigma`` holds on grids of at least this many voxels along every axis (a quarter-resolution OASIS volume
has 40 to 56); a smaller grid gets a proportionally smaller sigma, so that the smoothing spans the same share of
the image instead of averaging a small image's whole gradient into one translation."""


def grid_sigma(grad_sigma: float, shape: Sequence[int]) -> float:
    """The gradient smoothing's sigma on an optimised grid of spatial ``shape``: ``grad_sigma``, scaled down in
    proportion on grids smaller than :data:`FULL_SMOOTHING_SIZE` voxels along some axis."""
    return grad_sigma * min(1.0, min(shape) / FULL_SMOOTHING_SIZE)


SLAB_VOXELS = 1 << 20
"""A level's similarity is computed and back-propagated in slabs of about this many voxels along the last axis.
Exact (the local NCC looks only ``kernel_size // 2`` voxels beyond a slab, MSE none), and the memory of a
step no longer grows with the image: about 0.6 GiB at full resolution for a 160x192x224 pair instead of 2.4."""


@dataclass(frozen=True)
class RefineOptions:
    """The refinement's options, checked on construction (names as the configs' ``refine_*`` keys).

    Args:
        steps: at most this many Adam steps at each level, or one count per level (e.g. ``(40, 40, 5)``); 0: the
            starting field as it is; ``None``: the dimensionality's default (:data:`DEFAULTS`).
        lr: Adam learning rate, in voxels (of the level's grid) per step.
        smooth_weight: weight of the smoothness penalty (VoxelMorph's meaning).
        similarity: ``"lncc"`` or ``"mse"``, as in training.
        integration_steps: ``> 0`` optimises a stationary velocity integrated by scaling and squaring with this
            many steps; 0 optimises the displacement; ``None``: the dimensionality's default.
        levels: resolution divisors of the images the loss compares, coarse to fine, each of 1, 2, 4, 8 (e.g.
            ``(4, 2, 1)``: a quarter, half, then full resolution); ``None``: the dimensionality's default.
        downsample: the optimised field is never finer than this divisor of the image (1, 2, 4 or 8): at finer
            levels it is upsampled (linear) for the loss, which bounds memory and keeps the field smooth;
            ``None``: the dimensionality's default.
        tolerance: a level stops when its loss improved by less than this fraction over ``patience`` steps (0:
            never early).
        patience: steps over which the improvement is measured.
        grad_sigma: the Gaussian (sigma in voxels of the optimised grid) that smooths each step's gradient before
            Adam uses it (0: none); ``None``: the dimensionality's default.

    Raises:
        ValueError: for an option of the wrong type or out of range (one message naming the option).
    """

    steps: Union[int, Tuple[int, ...], None] = None
    lr: float = 0.2
    smooth_weight: float = 1.0
    similarity: str = "lncc"
    integration_steps: Optional[int] = None
    levels: Optional[Tuple[int, ...]] = None
    downsample: Optional[int] = None
    tolerance: float = 1e-3
    patience: int = 5
    grad_sigma: Optional[float] = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, (list, tuple)):
            if not self.steps:
                raise ValueError("refine_steps must be an integer >= 0 or one per level, got [].")
            object.__setattr__(self, "steps", tuple(check_integer("refine_steps", n, 0) for n in self.steps))
        elif self.steps is not None:
            check_integer("refine_steps", self.steps, 0)
        check_number("refine_lr", self.lr, positive=True)
        check_number("refine_smooth_weight", self.smooth_weight, positive=False)
        check_similarity(self.similarity)
        if self.integration_steps is not None:
            check_integer("refine_integration_steps", self.integration_steps, 0)
        if self.levels is not None:
            levels = self.levels if isinstance(self.levels, (list, tuple)) else [self.levels]
            if not levels or any(isinstance(n, bool) or n not in LEVELS for n in levels):
                raise ValueError(f"refine_levels must be a list of divisors among {list(LEVELS)}, got {self.levels!r}.")
            if list(levels) != sorted(levels, reverse=True) or len(set(levels)) != len(levels):
                raise ValueError(f"refine_levels must go from coarse to fine (e.g. [4, 2]), got {list(levels)}.")
            object.__setattr__(self, "levels", tuple(int(n) for n in levels))
        if self.downsample is not None and (isinstance(self.downsample, bool) or self.downsample not in LEVELS):
            raise ValueError(f"refine_downsample must be one of {list(LEVELS)} or null, got {self.downsample!r}.")
        check_number("refine_tolerance", self.tolerance, positive=False)
        check_integer("refine_patience", self.patience, 1)
        if self.grad_sigma is not None:
            check_number("refine_grad_sigma", self.grad_sigma, positive=False)

    def for_dims(self, spatial_dims: int) -> "RefineOptions":
        """These options with the ``None`` ones set to the defaults of ``spatial_dims`` and ``steps`` one count per
        level.

        Raises:
            ValueError: when ``steps`` has not one count per level.
        """
        defaults = DEFAULTS[check_spatial_dims(spatial_dims)]
        levels = defaults["levels"] if self.levels is None else self.levels
        steps = defaults["steps"] if self.steps is None else self.steps
        steps = steps if isinstance(steps, tuple) else (steps,) * len(levels)
        if len(steps) != len(levels):
            raise ValueError(
                f"refine_steps must be one integer or one per level of refine_levels {list(levels)}, got {list(steps)}."
            )
        chosen = {k: defaults[k] if getattr(self, k) is None else getattr(self, k) for k in _DIMS_DEFAULTS}
        return replace(self, steps=steps, levels=levels, **chosen)


def resize_field(field: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A voxel-unit field ``(B, nd, *S)`` resampled (linear) to ``size``, each component scaled by its axis' ratio
    of sizes so that it stays in voxels of the new grid."""
    if list(field.shape[2:]) == list(size):
        return field
    mode = "bilinear" if field.dim() == 4 else "trilinear"
    out = F.interpolate(field, size=tuple(size), mode=mode, align_corners=False)
    ratios = torch.tensor([n / o for n, o in zip(size, field.shape[2:])], dtype=out.dtype, device=out.device)
    return out * ratios.view(1, -1, *[1] * len(size))


def _kernel_size(factor: int) -> int:
    """The LNCC window at a resolution divisor: 9 voxels at full resolution, the same physical size below."""
    return max(3, 2 * round(4.5 / factor) + 1)


class _LevelLoss:
    """The training loss (:class:`custom.losses.PairLoss`) of one level, ``similarity(warp(moving, ddf), fixed) +
    smooth_weight * Grad(field)``, ``ddf`` being the optimised ``field`` resampled to the level's images; the
    similarity is back-propagated slab by slab (:data:`SLAB_VOXELS`)."""

    def __init__(self, spatial_dims: int, options: RefineOptions, factor: int) -> None:
        kernel = _kernel_size(factor)
        lncc = options.similarity == "lncc"
        self.similarity = LocalNCCLoss(spatial_dims, kernel, reduction="none") if lncc else MSELoss("none")
        self.halo = kernel // 2 if lncc else 0
        self.smoothness = GradLoss("l2")
        self.smooth_weight = options.smooth_weight
        self.transformer = SpatialTransformer()

    def backward(self, field: torch.Tensor, pair: torch.Tensor) -> float:
        """Back-propagate the loss of the displacement ``field`` ``(B, nd, *s)`` (the end of an autograd graph, at
        the optimised resolution) for ``pair`` ``(B, 2, *S)``: the similarity after resampling ``field`` to ``S``,
        the smoothness of ``field`` itself. Returns the loss."""
        ddf = resize_field(field, pair.shape[2:])
        leaf = ddf.detach().requires_grad_()
        depth, count = leaf.shape[-1], pair[:, :1].numel()
        total = 0.0
        for first, last, low, high in slabs(depth, SLAB_VOXELS * depth // count, self.halo):
            warped = self.transformer(pair[:, :1], leaf[..., low:high], low)
            values = self.similarity(warped, pair[:, 1:, ..., low:high])
            part = values[..., first - low : last - low].sum() / count
            part.backward()
            total += part.item()
        penalty = self.smooth_weight * self.smoothness(field)
        torch.autograd.backward([ddf, penalty], [leaf.grad, torch.ones_like(penalty)])
        return total + penalty.item()


def _optimise(param: nn.Parameter, loss_of, steps: int, options: RefineOptions, bar) -> Tuple[int, float]:
    """Adam on the smoothed gradient for at most ``steps`` steps, stopping on a plateau; ``loss_of(param)``
    back-propagates and returns the loss. Returns (steps taken, last loss)."""
    optimizer = torch.optim.Adam([param], lr=options.lr)
    sigma = grid_sigma(options.grad_sigma, param.shape[2:])
    kernel = gaussian_1d(torch.tensor(sigma), truncated=3.0).to(param) if sigma > 0 else None
    best, since, loss_value = math.inf, 0, math.nan
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss_of(param)
        if kernel is not None:  # edges replicated: a coarse level's small grid keeps its gradient's size
            param.grad = separable_filtering(param.grad, [kernel] * (param.dim() - 2), mode="replicate")
        optimizer.step()
        if bar is not None:
            bar.update(1)
        if loss_value < best - options.tolerance * abs(best if math.isfinite(best) else loss_value):
            best, since = loss_value, 0
        else:
            since += 1
        if options.tolerance > 0 and since >= options.patience:
            return step, loss_value
    return steps, loss_value


def refine(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    init: Optional[torch.Tensor] = None,
    options: Optional[RefineOptions] = None,
    progress: bool = False,
    history: Optional[List[dict]] = None,
) -> torch.Tensor:
    """Optimise the field of each pair with Adam on ``similarity(warp(moving), fixed) + smooth_weight * Grad``,
    coarse to fine (see the module's description).

    Args:
        moving: ``(B, 1, H, W[, D])``, normalised as in training.
        fixed: ``(B, 1, H, W[, D])``.
        init: the starting field ``(B, spatial_dims, H, W[, D])`` in voxels: a velocity when
            ``integration_steps > 0`` (a displacement is a first-order approximation of it), else a displacement;
            ``None`` starts from zero (no network).
        options: the refinement options (default :class:`RefineOptions()`: the dimensionality's defaults).
        progress: show a progress bar (with the time left) over the steps.
        history: when given, one ``{"level", "steps", "loss"}`` dict per level is appended to it.

    Returns:
        The refined displacement ``(B, spatial_dims, H, W[, D])`` in voxels (no gradient).

    Raises:
        ValueError: for shapes that do not match.
    """
    spatial_dims = check_spatial_dims(moving.dim() - 2)
    options = (options or RefineOptions()).for_dims(spatial_dims)
    if moving.shape != fixed.shape or moving.shape[1] != 1:
        raise ValueError(
            f"expected moving and fixed of one shape (B, 1, *spatial), got {list(moving.shape)} and "
            f"{list(fixed.shape)}."
        )
    size = list(moving.shape[2:])
    field_shape = [moving.shape[0], spatial_dims, *size]
    if init is not None and list(init.shape) != field_shape:
        raise ValueError(f"init must have shape {field_shape}, got {list(init.shape)}.")
    field = torch.zeros(field_shape, device=moving.device) if init is None else init.detach().float()
    integrate = VelocityIntegration(options.integration_steps) if options.integration_steps > 0 else None
    pair = torch.cat([moving, fixed], dim=1).float().detach()
    bar = None
    if progress and sum(options.steps):
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(options.steps), desc="refine", leave=False, unit="step", disable=None)  # terminals only
        if bar.disable:  # a log file gets one line, not a bar's frames
            levels = ", ".join(f"{n} at 1/{f}" for f, n in zip(options.levels, options.steps))
            print(f"refine: up to {sum(options.steps)} steps ({levels})", file=sys.stderr, flush=True)
    with torch.enable_grad():
        for factor, steps in zip(options.levels, options.steps):
            if steps == 0:
                continue
            small = [max(2, n // factor) for n in size]
            level_pair = F.interpolate(pair, size=small, mode="area") if small != size else pair
            level_loss = _LevelLoss(spatial_dims, options, factor)
            grid = [max(2, n // max(factor, options.downsample)) for n in size]
            param = nn.Parameter(resize_field(field, grid).clone())  # never the caller's tensor

            def loss_of(p: torch.Tensor) -> float:
                return level_loss.backward(integrate(p) if integrate is not None else p, level_pair)

            if bar is not None:
                bar.set_description(f"refine 1/{factor}" if factor > 1 else "refine")
            taken, loss = _optimise(param, loss_of, steps, options, bar)
            if bar is not None:
                bar.update(steps - taken)
            if history is not None:
                history.append({"level": factor, "steps": taken, "loss": loss})
            field = param.detach()
    if bar is not None:
        bar.close()
    with torch.no_grad():
        return resize_field(integrate(field) if integrate is not None else field, size)


class RefiningInferer(Inferer):
    """MONAI ``Inferer``: the network's field, refined per pair with :func:`refine` (an optimiser, not only a
    forward pass) unless ``steps`` is 0.

    Args:
        steps, lr, smooth_weight, similarity, integration_steps, levels, downsample, tolerance, patience,
            grad_sigma: the :class:`RefineOptions` (``integration_steps > 0`` starts from a diffeomorphic network's
            own velocity, ``network.velocity``, otherwise from the network's displacement).
        progress: show a progress bar per pair.
        deformable: False: no deformable stage, a zero field (``register --deformable False``: the affine stage
            alone).
        affine: run the affine stage first on pairs that share a grid (:func:`custom.affine.after_affine`, as
            ``evaluate.json`` does; ``register`` runs it on the files' world coordinates instead) and return the
            composed displacement.

    The options are checked on construction, when the bundle's config is parsed, before anything runs, so a bad
    option in a config or on the command line is one clear error line.
    """

    def __init__(
        self,
        steps: Union[int, Sequence[int], None] = None,
        lr: float = 0.2,
        smooth_weight: float = 1.0,
        similarity: str = "lncc",
        integration_steps: Optional[int] = None,
        levels: Optional[Sequence[int]] = None,
        downsample: Optional[int] = None,
        tolerance: float = 1e-3,
        patience: int = 5,
        grad_sigma: Optional[float] = None,
        progress: bool = False,
        deformable: bool = True,
        affine: bool = False,
    ) -> None:
        super().__init__()
        self.deformable, self.affine = as_bool("deformable", deformable), as_bool("affine", affine)
        levels = tuple(levels) if isinstance(levels, (list, tuple)) else levels
        steps = tuple(steps) if isinstance(steps, (list, tuple)) else steps
        self.options = RefineOptions(
            steps, lr, smooth_weight, similarity, integration_steps, levels, downsample, tolerance, patience, grad_sigma
        )
        self.progress = progress
        self.history: List[dict] = []

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        """Register each pair (after the affine stage when ``affine``).

        Args:
            inputs: ``(B, 2, H, W[, D])``; channel 0 moving, channel 1 fixed.
            network: maps ``inputs`` to the displacement ``(B, spatial_dims, H, W[, D])``.

        Returns:
            The displacement ``(B, spatial_dims, H, W[, D])`` in voxels; :attr:`history` holds the last pair's
            steps and loss per level.
        """
        if self.affine:
            return after_affine(
                inputs, lambda pair: self._deformable(pair, network, *args, **kwargs), self.options.similarity
            )
        return self._deformable(inputs, network, *args, **kwargs)

    def _deformable(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        """The deformable stage: the network's field, refined."""
        options = self.options.for_dims(inputs.dim() - 2)
        self.history = []
        if not self.deformable:
            return inputs.new_zeros(inputs.shape[0], inputs.dim() - 2, *inputs.shape[2:])
        if sum(options.steps) == 0:
            return network(inputs, *args, **kwargs)
        velocity = options.integration_steps > 0 and getattr(network, "integration_steps", 0) > 0
        with torch.no_grad():
            init = network.velocity(inputs) if velocity else network(inputs, *args, **kwargs)
        return refine(inputs[:, :1], inputs[:, 1:], init.float(), options, self.progress, self.history)


class RegistrationInferer(RefiningInferer):
    """Deprecated name of :class:`RefiningInferer` (configs written for 0.2)."""

    def __init__(self, *args, **kwargs) -> None:
        warnings.warn(
            "custom.refine.RegistrationInferer is deprecated: use custom.refine.RefiningInferer.",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(*args, **kwargs)
