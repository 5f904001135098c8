"""Spatial transformer and velocity-field integration (scaling and squaring).

Both are written for TorchScript: ``torch.jit.script(SpatialTransformer())`` works, unlike
``monai.networks.blocks.Warp``.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SpatialTransformer", "VelocityIntegration", "sample_at"]

_MODES = ("bilinear", "nearest")
_PADDING_MODES = ("zeros", "border", "reflection")


def sample_at(image: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``image`` at voxel coordinates of its own grid (zero outside), for grids other than the image's.

    Args:
        image: ``(B, C, *S_in)``; integer images (labels) need ``mode="nearest"`` and keep their dtype.
        coords: ``(B, spatial_dims, *S_out)``, channel ``i`` the position along axis ``i`` of ``image``, in voxels.
        mode: ``"bilinear"`` or ``"nearest"``.

    Returns:
        ``(B, C, *S_out)``.
    """
    nd = image.dim() - 2
    if coords.shape[1] != nd or coords.dim() != image.dim():
        raise ValueError(f"coords must be (B, {nd}, *S_out) for image {list(image.shape)}, got {list(coords.shape)}.")
    is_label = not image.is_floating_point()
    grid = torch.stack([coords[:, i] * 2 / max(image.shape[2 + i] - 1, 1) - 1 for i in reversed(range(nd))], dim=-1).to(
        torch.float32
    )
    src = image.float() if is_label else image.to(grid.dtype)
    out = F.grid_sample(src, grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out.round().to(image.dtype) if is_label else out.to(image.dtype)


class SpatialTransformer(nn.Module):
    """Warp an image with a dense displacement field given in voxels.

    ``warped[x] = image[x + ddf[x]]``, sampled with ``grid_sample(align_corners=True)``; this is the
    convention of ``monai.networks.blocks.Warp`` (native path) and of VoxelMorph. The sampling grid is
    built from 1-D coordinate ramps on the fly, so no full-size identity grid is stored or cached.

    Integer images (label maps) are sampled as float and rounded back to their dtype; they need
    ``mode="nearest"``.

    Args:
        mode: ``"bilinear"`` (linear in 2D and 3D) or ``"nearest"``.
        padding_mode: ``"zeros"`` (VoxelMorph's choice), ``"border"`` (MONAI ``Warp``'s default)
            or ``"reflection"``.

    Raises:
        ValueError: for an unknown ``mode`` or ``padding_mode``.
    """

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros") -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}.")
        self.mode = mode
        self.padding_mode = padding_mode

    def forward(self, image: torch.Tensor, ddf: torch.Tensor, start: Optional[int] = None) -> torch.Tensor:
        """Warp ``image`` by ``ddf``.

        Args:
            image: ``(B, C, H, W[, D])``, any number of channels.
            ddf: ``(B, spatial_dims, H, W[, D])``, displacement in voxels; channel ``i`` moves along
                spatial axis ``i``. Or, with ``start``, the displacement of a slab of the output: the part of the
                last axis from ``start`` to ``start + ddf.shape[-1]`` (the whole image is sampled).
            start: the slab's first index along the last axis (``None``: ``ddf`` covers the whole image).

        Returns:
            The warped image ``(B, C, H, W[, D])`` (or its slab), same dtype as ``image``.

        Raises:
            ValueError: when the image is not 4-D/5-D or ``ddf`` does not match it.
        """
        if image.dim() not in (4, 5):
            raise ValueError(
                f"image must have shape (B, C, H, W) or (B, C, H, W, D), got {image.dim()}-D shape {list(image.shape)}."
            )
        nd = image.dim() - 2
        expected = [image.shape[0], nd] + list(image.shape[2:])
        first = 0
        if start is not None:
            first = start
            expected[-1] = min(ddf.shape[-1], image.shape[-1] - start) if 0 <= start < image.shape[-1] else 0
        if list(ddf.shape) != expected or expected[-1] < 1:
            where = "" if start is None else f" (a slab from index {start} of its last axis)"
            raise ValueError(
                f"ddf must have shape {expected} to match image {list(image.shape)}{where}, got {list(ddf.shape)}."
            )
        is_label = not image.is_floating_point()
        if is_label and self.mode != "nearest":
            raise ValueError(f"integer images (labels) need mode='nearest', got mode='{self.mode}'.")
        src = image.to(ddf.dtype) if is_label or image.dtype != ddf.dtype else image
        coords: List[torch.Tensor] = []
        for i in range(nd):
            n = image.shape[2 + i]
            offset = first if i == nd - 1 else 0
            view = [1] * (nd + 1)
            view[i + 1] = ddf.shape[2 + i]
            ramp = torch.arange(offset, offset + ddf.shape[2 + i], dtype=ddf.dtype, device=ddf.device).view(view)
            # same operation order as monai's Warp, so the two agree to the last bit
            coords.insert(0, (ramp + ddf[:, i]) * 2 / max(n - 1, 1) - 1)
        grid = torch.stack(coords, dim=-1)
        out = F.grid_sample(src, grid, mode=self.mode, padding_mode=self.padding_mode, align_corners=True)
        if is_label:
            return out.round().to(image.dtype)
        return out.to(image.dtype)


class VelocityIntegration(nn.Module):
    """Integrate a stationary velocity field by scaling and squaring (diffeomorphic VoxelMorph).

    ``ddf = v / 2**steps``, then ``steps`` times ``ddf = ddf + warp(ddf, ddf)``. Equal to
    ``monai.networks.blocks.DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="zeros")``.

    Args:
        steps: number of squaring steps, ``>= 1``.

    Raises:
        ValueError: when ``steps < 1``.
    """

    def __init__(self, steps: int = 7) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        self.steps = steps
        self.transformer = SpatialTransformer("bilinear", "zeros")

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        """Turn a velocity field into a displacement field.

        Args:
            velocity: ``(B, spatial_dims, H, W[, D])`` in voxels.

        Returns:
            The displacement field, ``(B, spatial_dims, H, W[, D])`` in voxels.
        """
        ddf = velocity / (2.0**self.steps)
        for _ in range(self.steps):
            ddf = ddf + self.transformer(ddf, ddf)
        return ddf
