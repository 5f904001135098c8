"""The affine stage: align a pair's images (any grids, orientations, voxel sizes and fields of view) before the
deformable one, and the ITK transform file ITK, ANTs and SimpleITK read it from.

The transform ``T`` maps a point of the fixed image's world (RAS millimetres, the NIfTI convention) to the moving
image's world: moving-from-fixed, as ITK and ANTs resample. It is found in three steps (:func:`align_affine`):

1. the intensity-weighted centres of mass are matched (a translation);
2. rigid (rotation and translation) and then affine (all ``spatial_dims * (spatial_dims + 1)`` parameters)
   optimisation of the similarity (LNCC, or MSE) over a coarse-to-fine pyramid of both images, in torch, sampling
   the moving image with :func:`custom.warp.sample_at`;
3. the result is checked: a transform that flips or collapses the image (a non-positive determinant or a scale
   outside :data:`SCALE_LIMITS`) is refused.

For a single slice, the transform acts in the slice's plane: coordinates along the fixed slice's first two voxel
axes (orthonormalised, :func:`plane_frame`), whatever world axes they lie along; the transform file holds it as the
3D transform that leaves the slice normal untouched (:func:`world_transform`).
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from custom.atomic import SIGNATURE, atomic_path
from custom.losses import LocalNCCLoss, MSELoss, check_similarity
from custom.spatial import check_spatial_dims
from custom.warp import sample_at

__all__ = [
    "SCALE_LIMITS",
    "AffineResult",
    "align_affine",
    "check_plausible",
    "grid_coordinates",
    "plane_affine",
    "plane_frame",
    "plane_transform",
    "world_transform",
    "grid_record",
    "read_itk_affine",
    "transform_grids",
    "voxel_map",
    "write_itk_affine",
]

SCALE_LIMITS = (0.5, 2.0)
"""The singular values of a plausible linear part: outside them the transform collapses or blows up the image."""
LEVELS = (8, 4)
"""Resolution divisors of the pyramid, coarse to fine; smaller for small images, whose coarsest level keeps at least
:data:`MIN_LEVEL_SIZE` voxels along its shortest axis."""
MIN_LEVEL_SIZE = 16
STEPS = {"rigid": (60, 0), "affine": (60, 30)}
"""Optimisation steps of each stage at each level of :data:`LEVELS`."""
WINDOW = 5
"""The LNCC window at the pyramid's levels (40 and 20 mm for 1 mm images)."""
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


_PLANE = np.ix_([0, 1, 3], [0, 1, 3])


def plane_frame(affine: np.ndarray) -> np.ndarray:
    """The 4x4 matrix from slice-plane coordinates ``(u, v, normal, 1)`` (mm) to world (RAS): axes along the slice's
    first two voxel axes (orthonormalised), the normal, origin at its first voxel."""
    affine = np.asarray(affine, dtype=np.float64)
    first = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    second = affine[:3, 1] - first * (first @ affine[:3, 1])
    second /= np.linalg.norm(second)
    frame = np.eye(4)
    frame[:3, :3] = np.stack([first, second, np.cross(first, second)], axis=1)
    frame[:3, 3] = affine[:3, 3]
    return frame


def plane_affine(affine: np.ndarray, spatial_dims: int, frame: Optional[np.ndarray] = None) -> np.ndarray:
    """The voxel-to-world matrix of an image in ``spatial_dims`` dimensions: the 4x4 NIfTI affine for volumes; for
    single slices the 3x3 one from its first two voxel axes to the coordinates of ``frame`` (:func:`plane_frame` of
    the fixed slice)."""
    affine = np.asarray(affine, dtype=np.float64)
    return affine if spatial_dims == 3 else (np.linalg.inv(frame) @ affine)[_PLANE]


def world_transform(transform: np.ndarray, frame: Optional[np.ndarray] = None) -> np.ndarray:
    """A transform as the 4x4 world (RAS) one: a volume's as it is, a slice's in-plane one (in ``frame``'s
    coordinates) as the 3D transform that leaves the slice normal untouched."""
    if transform.shape == (4, 4):
        return transform
    inplane = np.eye(4)
    inplane[_PLANE] = transform
    return frame @ inplane @ np.linalg.inv(frame)


def plane_transform(transform: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """The in-plane part (``frame``'s coordinates, 3x3) of a 4x4 world transform: :func:`world_transform` undone."""
    return (np.linalg.inv(frame) @ transform @ frame)[_PLANE]


def voxel_map(transform: np.ndarray, moving_affine: np.ndarray, fixed_affine: np.ndarray) -> np.ndarray:
    """The homogeneous matrix from fixed voxels to moving voxels: ``inv(moving_affine) @ transform @ fixed_affine``."""
    return np.linalg.inv(moving_affine) @ transform @ fixed_affine


def grid_coordinates(matrix: torch.Tensor, shape: Sequence[int], ddf: Union[torch.Tensor, None] = None) -> torch.Tensor:
    """The moving voxel coordinates ``(1, nd, *shape)`` of every voxel ``v`` of a fixed grid of ``shape``:
    ``matrix @ (v + ddf[v])`` (``ddf``: ``(1, nd, *shape)`` in fixed voxels, or ``None`` for none)."""
    nd = len(shape)
    matrix = matrix.to(dtype=torch.float32)
    ramps = [torch.arange(n, dtype=torch.float32, device=matrix.device) for n in shape]
    points = torch.stack(torch.meshgrid(*ramps, indexing="ij"))[None]
    if ddf is not None:
        points = points + ddf.to(points)
    return torch.einsum("ij,bj...->bi...", matrix[:nd, :nd], points) + matrix[:nd, nd].view(1, nd, *([1] * nd))


def _centre_of_mass(image: torch.Tensor, affine: np.ndarray) -> np.ndarray:
    """The intensity-weighted centre of mass (world) of ``image`` ``(1, 1, *S)`` (negative values count as 0)."""
    weights = image[0, 0].clamp(min=0).double()
    total = float(weights.sum()) or 1.0
    nd = weights.dim()
    centre = [
        float((weights.sum(dim=[d for d in range(nd) if d != axis]) * torch.arange(weights.shape[axis])).sum()) / total
        for axis in range(nd)
    ]
    return (affine @ np.array(centre + [1.0]))[:nd]


def _rotation(angles: torch.Tensor, nd: int) -> torch.Tensor:
    """The rotation matrix of ``angles`` (one in 2D; an axis-angle vector in 3D) by the matrix exponential."""
    skew = torch.zeros(nd, nd, dtype=angles.dtype)
    if nd == 2:
        skew = skew + torch.stack([torch.stack([0 * angles[0], -angles[0]]), torch.stack([angles[0], 0 * angles[0]])])
    else:
        a, b, c = angles
        zero = 0 * a
        skew = torch.stack([torch.stack([zero, -c, b]), torch.stack([c, zero, -a]), torch.stack([-b, a, zero])])
    return torch.linalg.matrix_exp(skew)


def _pyramid(image: torch.Tensor, factor: int) -> Tuple[torch.Tensor, np.ndarray]:
    """``image`` averaged down by ``factor`` per axis, and the matrix from its voxels to the full-resolution ones
    (a coarse voxel's centre is the mean of the fine voxels it averages)."""
    nd = image.dim() - 2
    size = [max(2, n // factor) for n in image.shape[2:]]
    small = F.interpolate(image, size=size, mode="area") if factor > 1 else image
    scale = np.array([n / m for n, m in zip(image.shape[2:], size)])
    to_full = np.eye(nd + 1)
    to_full[:nd, :nd] = np.diag(scale)
    to_full[:nd, nd] = (scale - 1) / 2
    return small, to_full


@dataclass
class AffineResult:
    """What :func:`align_affine` found: ``transform`` (homogeneous, fixed world -> moving world, RAS mm), the
    similarity (LNCC, higher is better; ``-MSE`` for MSE) of the pair as given (``initial``: by world
    coordinates), after matching the centres of mass (``centred``) and after the affine stage (``aligned``), and
    the linear part's singular values (``scales``)."""

    transform: np.ndarray
    initial: float
    centred: float
    aligned: float
    scales: List[float]


class _Stage(torch.nn.Module):
    """One optimisation stage's parameters: ``T(x) = R (I + D) (x - c) + c + t`` (``D`` only when affine)."""

    def __init__(self, nd: int, centre: np.ndarray, start: np.ndarray, affine: bool) -> None:
        super().__init__()
        self.nd, self.affine = nd, affine
        self.register_buffer("centre", torch.as_tensor(centre, dtype=torch.float64))
        self.register_buffer("start", torch.as_tensor(start, dtype=torch.float64))
        self.angles = torch.nn.Parameter(torch.zeros(1 if nd == 2 else 3, dtype=torch.float64))
        self.shift = torch.nn.Parameter(torch.zeros(nd, dtype=torch.float64))
        self.linear = torch.nn.Parameter(torch.zeros(nd, nd, dtype=torch.float64), requires_grad=affine)

    def forward(self) -> torch.Tensor:
        nd = self.nd
        linear = _rotation(self.angles, nd) @ (torch.eye(nd, dtype=torch.float64) + self.linear)
        top = torch.cat([linear, (self.centre - linear @ self.centre + self.shift)[:, None]], dim=1)
        return self.start @ torch.cat([top, torch.eye(nd + 1, dtype=torch.float64)[nd:]], dim=0)

    def groups(self) -> list:
        groups = [{"params": [self.angles], "lr": 0.01}, {"params": [self.shift], "lr": 0.5}]
        return groups + ([{"params": [self.linear], "lr": 0.005}] if self.affine else [])


def align_affine(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    moving_affine: np.ndarray,
    fixed_affine: np.ndarray,
    similarity: str = "lncc",
    steps_scale: float = 1.0,
) -> AffineResult:
    """Find the affine transform that aligns ``moving`` to ``fixed`` (see the module docstring).

    Args:
        moving: ``(1, 1, *S_moving)``, intensities normalised as for the network.
        fixed: ``(1, 1, *S_fixed)``, likewise.
        moving_affine: the moving image's voxel-to-world matrix (:func:`plane_affine`).
        fixed_affine: the fixed image's.
        similarity: ``"lncc"`` or ``"mse"``.
        steps_scale: multiplies every stage's steps (``0``: the centres of mass only).

    Returns:
        An :class:`AffineResult`.

    Raises:
        ValueError: for mismatched dimensionality, an unknown similarity, or a result that flips or collapses the
            image (a non-positive determinant, or a scale outside :data:`SCALE_LIMITS`).
    """
    nd = check_spatial_dims(moving.dim() - 2)
    if fixed.dim() != moving.dim() or moving.shape[:2] != (1, 1) or fixed.shape[:2] != (1, 1):
        raise ValueError(
            f"moving and fixed must be (1, 1, *S) of one dimensionality, got {moving.shape}, {fixed.shape}."
        )
    check_similarity(similarity)
    if not (isinstance(steps_scale, (int, float)) and steps_scale >= 0):
        raise ValueError(f"steps_scale must be a number >= 0, got {steps_scale!r}.")
    moving, fixed = moving.float(), fixed.float()
    score = LocalNCCLoss(nd, WINDOW) if similarity == "lncc" else MSELoss()
    centre_f, centre_m = _centre_of_mass(fixed, fixed_affine), _centre_of_mass(moving, moving_affine)
    start = np.eye(nd + 1)
    start[:nd, nd] = centre_m - centre_f
    cap = 2 ** int(math.log2(max(1, min(fixed.shape[2:]) // MIN_LEVEL_SIZE)))
    levels = [min(f, cap) for f in LEVELS]
    pyramid = {}  # per level: both images and the matrices from world to its moving voxels, from its fixed voxels
    for factor in levels:
        (fixed_l, to_fixed), (moving_l, to_moving) = _pyramid(fixed, factor), _pyramid(moving, factor)
        to_voxels, from_voxels = np.linalg.inv(moving_affine @ to_moving), fixed_affine @ to_fixed
        pyramid[factor] = (fixed_l, moving_l, torch.as_tensor(to_voxels), torch.as_tensor(from_voxels))

    def level_loss(transform: torch.Tensor, factor: int) -> torch.Tensor:
        fixed_l, moving_l, to_voxels, from_voxels = pyramid[factor]
        warped = sample_at(moving_l, grid_coordinates(to_voxels @ transform @ from_voxels, fixed_l.shape[2:]))
        return score(warped, fixed_l)

    with torch.no_grad():
        initial = -float(level_loss(torch.eye(nd + 1, dtype=torch.float64), levels[-1]))
        centred = -float(level_loss(torch.as_tensor(start), levels[-1]))
    transform = torch.as_tensor(start)
    for stage, counts in STEPS.items():
        params = _Stage(nd, centre_f, transform.detach().numpy(), affine=stage == "affine")
        optimiser = torch.optim.Adam(params.groups())
        with torch.enable_grad():  # also inside an evaluator's no_grad
            for factor, count in zip(levels, counts):
                for _ in range(int(round(count * steps_scale))):
                    optimiser.zero_grad()
                    loss = level_loss(params(), factor)
                    loss.backward()
                    optimiser.step()
        transform = params().detach()
    with torch.no_grad():
        aligned = -float(level_loss(transform, levels[-1]))
    result = transform.numpy()
    scales = check_plausible(result)
    return AffineResult(result, initial, centred, aligned, scales)


def after_affine(
    inputs: torch.Tensor, deformable: Callable[[torch.Tensor], torch.Tensor], similarity: str = "lncc"
) -> torch.Tensor:
    """Register pairs that share one grid (an evaluation split's) with the affine stage first: each moving image is
    aligned (:func:`align_affine`, voxels as world coordinates), resampled through the affine, registered by
    ``deformable``, and the two composed into one displacement.

    Args:
        inputs: ``(B, 2, H, W[, D])``; channel 0 moving, channel 1 fixed.
        deformable: maps ``(1, 2, H, W[, D])`` (the resampled moving image, the fixed image) to its displacement
            ``(1, spatial_dims, H, W[, D])`` in voxels.
        similarity: the affine stage's (``"lncc"`` or ``"mse"``).

    Returns:
        ``(B, spatial_dims, H, W[, D])``: the voxel displacement ``u`` with ``x + u(x) = A (x + v(x))``, ``A`` the
        affine (fixed voxels -> moving voxels) and ``v`` the deformable field.
    """
    shape, identity = inputs.shape[2:], np.eye(inputs.dim() - 1)
    grid = grid_coordinates(torch.as_tensor(identity, device=inputs.device), shape)
    fields = []
    for pair in inputs:
        moving, fixed = pair[None, :1], pair[None, 1:]
        result = align_affine(moving.detach().cpu(), fixed.detach().cpu(), identity, identity, similarity)
        matrix = torch.as_tensor(result.transform, device=inputs.device)
        resampled = sample_at(moving, grid_coordinates(matrix, shape))
        field = deformable(torch.cat([resampled, fixed], dim=1))
        fields.append(grid_coordinates(matrix, shape, field) - grid)
    return torch.cat(fields)


def check_plausible(transform: np.ndarray) -> List[float]:
    """The singular values of ``transform``'s linear part, refused when it flips (determinant <= 0) or collapses or
    blows up the image (a scale outside :data:`SCALE_LIMITS`).

    Raises:
        ValueError: naming the scales and determinant found.
    """
    nd = transform.shape[0] - 1
    scales = np.linalg.svd(transform[:nd, :nd], compute_uv=False).tolist()
    det = float(np.linalg.det(transform[:nd, :nd]))
    if det <= 0 or not SCALE_LIMITS[0] <= min(scales) <= max(scales) <= SCALE_LIMITS[1]:
        raise ValueError(
            f"the affine stage found a transform that flips or collapses the image (scales "
            f"{', '.join(f'{v:.2f}' for v in scales)}, determinant {det:.2f}; plausible scales lie in "
            f"{list(SCALE_LIMITS)}): the images do not show the same anatomy, or barely overlap."
        )
    return scales


def grid_record(shape: Sequence[int], affine: np.ndarray) -> str:
    """A grid as one line of text: its shape and its NIfTI affine (rounded to 1e-3 mm), to compare grids by; a 2-D
    file's (two axes) as ITK sees it, in the world x-y plane: the in-plane rows and columns only."""
    affine = np.asarray(affine, dtype=np.float64)
    rows = affine[np.ix_([0, 1], [0, 1, 3])] if len(shape) == 2 else affine[:3]
    values = " ".join(f"{v:.3f}" for v in rows.ravel()).replace("-0.000", "0.000")
    shape = [int(n) for n in shape[:3]]
    return f"{'x'.join(map(str, shape))} {values}"


def write_itk_affine(
    path: Union[str, Path], transform: np.ndarray, moving_grid: str = "", fixed_grid: str = "", planar: bool = False
) -> Path:
    """Write ``transform`` (fixed world -> moving world, RAS, :class:`AffineResult`'s) as the ITK text transform
    ``AffineTransform_double_3_3`` (LPS, moving-from-fixed, centre 0) that ANTs and SimpleITK read (a slice's
    as :func:`world_transform` gives it); ``planar``: as ``AffineTransform_double_2_2``, for 2-D files, which ITK
    reads in the world x-y plane (the transform must act in that plane). The grids it was computed for
    (:func:`grid_record`) go into comment lines, which ITK skips and :func:`transform_grids` reads.

    Returns:
        The path written (atomically).

    Raises:
        ValueError: for a transform that is not 4x4, or (``planar``) that leaves the x-y plane.
    """
    transform = np.asarray(transform, dtype=np.float64)
    if transform.shape != (4, 4):
        raise ValueError(f"expected a 4x4 world transform, got shape {list(transform.shape)}.")
    lps = _LPS @ transform @ _LPS
    if planar and np.abs(transform[2] - [0, 0, 1, 0]).max() + np.abs(transform[:2, 2]).max() > 1e-6:
        raise ValueError(f"a 2-D transform acts in the world x-y plane; this one leaves it: {transform.tolist()}.")
    kept = np.ix_([0, 1], [0, 1, 3]) if planar else np.ix_([0, 1, 2], [0, 1, 2, 3])
    nd = 2 if planar else 3
    parameters = list(lps[kept][:, :nd].ravel()) + list(lps[kept][:, nd])
    grids = "".join(
        f"#{SIGNATURE} {key} grid: {grid}\n" for key, grid in (("moving", moving_grid), ("fixed", fixed_grid))
    )
    values = " ".join(repr(float(v)) for v in parameters)
    text = (
        f"#Insight Transform File V1.0\n#{SIGNATURE}\n{grids}#Transform 0\n"
        f"Transform: AffineTransform_double_{nd}_{nd}\nParameters: {values}\nFixedParameters: {' '.join(['0'] * nd)}\n"
    )
    with atomic_path(path, suffix=".txt") as tmp:
        tmp.write_text(text)
    return Path(path)


def read_itk_affine(path: Union[str, Path]) -> np.ndarray:
    """Read an ITK text ``AffineTransform_double_3_3`` or ``_2_2`` (as :func:`write_itk_affine` writes, or ANTs'
    text form) back into the 4x4 RAS matrix (fixed world -> moving world; a 2-D one in the x-y plane).

    Raises:
        FileNotFoundError: for a missing file.
        ValueError: for a file that is not an ITK affine transform.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"transform file {str(path)!r} does not exist.")
    fields = {}
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    kind = fields.get("Transform", "")
    if not kind.startswith(("AffineTransform_double_", "MatrixOffsetTransformBase_double_")) or kind[-3:] not in (
        "3_3",
        "2_2",
    ):
        raise ValueError(f"{str(path)!r} is not an ITK AffineTransform_double_3_3 (or _2_2) text file.")
    nd = int(kind[-1])
    try:
        parameters = [float(v) for v in fields["Parameters"].split()]
        centre = np.array([float(v) for v in fields.get("FixedParameters", " ".join(["0"] * nd)).split()])
        if len(parameters) != nd * (nd + 1) or centre.shape != (nd,) or not all(math.isfinite(v) for v in parameters):
            raise ValueError
    except (KeyError, ValueError):
        raise ValueError(
            f"{str(path)!r} does not hold the {nd * (nd + 1)} parameters of a {nd}D affine transform."
        ) from None
    matrix = np.reshape(parameters[: nd * nd], (nd, nd))  # ITK: x -> A (x - c) + c + t
    lps = np.eye(4)
    kept = [0, 1, 2][:nd]
    lps[np.ix_(kept, kept)] = matrix
    lps[kept, 3] = np.array(parameters[nd * nd :]) + centre - matrix @ centre
    return _LPS @ lps @ _LPS


def transform_grids(path: Union[str, Path]) -> dict:
    """The ``moving`` and ``fixed`` grids (:func:`grid_record`) that :func:`write_itk_affine` recorded in a transform
    file (empty for a file written elsewhere)."""
    grids = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        for key in ("moving", "fixed"):
            prefix = f"#{SIGNATURE} {key} grid: "
            if line.startswith(prefix) and line[len(prefix) :].strip():
                grids[key] = line[len(prefix) :].strip()
    return grids
