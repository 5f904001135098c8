"""The decoder block of the VoxelMorph UNet, computed without materialising the upsampled features."""

import itertools
from typing import List

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv
from torch import nn

__all__ = ["UpsampleConcatConv"]


class UpsampleConcatConv(nn.Module):
    """``LeakyReLU(conv3x3(cat([upsample_nearest_x2(low), skip])))`` with the parameters of that one conv.

    A 3x3 conv of a nearest-x2-upsampled map is, for each output parity along each axis, a 2-tap conv of the
    low-resolution map (the taps that read the same low-resolution voxel are summed). So the upsampled part
    is one conv at low resolution whose ``2**spatial_dims`` output groups hold 2-tap kernels folded from the
    3x3 weight, added into the strided parity slices of the skip conv's output: 4/9 of the multiply-adds in 2D,
    8/27 in 3D, and neither an upsampled nor a concatenated tensor. The result equals the textbook form up to
    float rounding (tested against it), and ``self.conv`` holds exactly its weights.

    Args:
        spatial_dims: 2 or 3.
        low_channels: channels of the low-resolution input.
        skip_channels: channels of the skip connection (at twice the resolution).
        out_channels: output channels.
    """

    def __init__(self, spatial_dims: int, low_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.low_channels = low_channels
        self.conv = Conv[Conv.CONV, spatial_dims](low_channels + skip_channels, out_channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        # fold[p] maps the 3 taps of the kernel to the 2 low-resolution taps read by output parity p
        fold = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
        self.register_buffer("fold", fold, persistent=False)
        self.parities: List[List[int]] = [list(p) for p in itertools.product((0, 1), repeat=spatial_dims)]

    def _folded_kernel(self) -> torch.Tensor:
        """The 2-tap kernels of all output parities stacked on the output axis: ``(2**nd * out, low, 2, ..)``."""
        w_low = self.conv.weight[:, : self.low_channels]
        kernels: List[torch.Tensor] = []
        for parity in self.parities:
            k = w_low
            for axis, p in enumerate(parity):
                k = torch.matmul(k.movedim(2 + axis, -1), self.fold[p].t()).movedim(-1, 2 + axis)
            kernels.append(k)
        return torch.cat(kernels, dim=0)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Upsample ``low``, concatenate ``skip``, convolve.

        Args:
            low: ``(B, low_channels, H, W[, D])``.
            skip: ``(B, skip_channels, 2H, 2W[, 2D])``.

        Returns:
            ``(B, out_channels, 2H, 2W[, 2D])``.
        """
        w_skip = self.conv.weight[:, self.low_channels :]
        # one conv for all parities over the low-resolution map padded by one voxel: output voxel j of parity
        # 0 reads low voxels (j - 1, j), of parity 1 voxels (j, j + 1), i.e. padded window start p + j
        padded = F.pad(low, [1, 1] * self.spatial_dims)
        c = w_skip.shape[0]
        s = low.shape[2:]
        if self.spatial_dims == 2:
            y = F.conv2d(skip, w_skip, self.conv.bias, padding=1)
            parts = F.conv2d(padded, self._folded_kernel())
            for i, p in enumerate(self.parities):
                part = parts[:, i * c : (i + 1) * c, p[0] : p[0] + s[0], p[1] : p[1] + s[1]]
                y[:, :, p[0] :: 2, p[1] :: 2].add_(part)
        else:
            y = F.conv3d(skip, w_skip, self.conv.bias, padding=1)
            parts = F.conv3d(padded, self._folded_kernel())
            for i, p in enumerate(self.parities):
                part = parts[:, i * c : (i + 1) * c, p[0] : p[0] + s[0], p[1] : p[1] + s[1], p[2] : p[2] + s[2]]
                y[:, :, p[0] :: 2, p[1] :: 2, p[2] :: 2].add_(part)
        return self.act(y)
