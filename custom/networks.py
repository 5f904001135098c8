"""VoxelMorph-2 registration UNet and its reduced-parameter variants.

``baseline`` is the VoxelMorph-2 UNet (Balakrishnan et al., CVPR 2018): an encoder of stride-2 3x3 convs
(16, 32, 32, 32), a decoder of 3x3 convs (32, 32, 32, 32) each followed by nearest x2 upsampling and
concatenation of the encoder skip (the input pair at full resolution), three full-resolution convs
(32, 16, 16) and a 3x3 flow conv initialised from N(0, 1e-5). Each upsample-concatenate-conv step runs as
:class:`~custom.blocks.UpsampleConcatConv` (same parameters, a fraction of the work). Every conv but the
flow conv is followed by LeakyReLU(0.2). The other variants change only where the UNet runs:

- ``maxpool``: the pair is max-pooled by 2 first, the UNet runs at half resolution per axis, and the flow is
  upsampled back (linear interpolation, no conv) and multiplied by 2 so it stays in full-resolution voxels.
- ``reduced``: the two deepest encoder convs and the two deepest decoder convs are removed.
- ``both``: ``maxpool`` and ``reduced`` together.
"""

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers import Conv
from torch import nn

from custom.blocks import UpsampleConcatConv
from custom.spatial import check_spatial_dims
from custom.warp import SpatialTransformer, VelocityIntegration

__all__ = [
    "VARIANTS",
    "VXM2_DEC_CHANNELS",
    "VXM2_ENC_CHANNELS",
    "RegistrationNet",
    "VxmDense",
    "count_parameters",
    "describe_arch",
]

VARIANTS = ("baseline", "maxpool", "reduced", "both")
VXM2_ENC_CHANNELS = (16, 32, 32, 32)
VXM2_DEC_CHANNELS = (32, 32, 32, 32, 32, 16, 16)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _conv(spatial_dims: int, in_channels: int, out_channels: int, strides: int = 1) -> Convolution:
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        strides=strides,
        kernel_size=3,
        act=("leakyrelu", {"negative_slope": 0.2, "inplace": True}),
        norm=None,
        bias=True,
    )


def _checked_channels(variant: str, enc_channels, dec_channels, integration_steps: int) -> Tuple[List[int], List[int]]:
    """The encoder and decoder channels ``variant`` keeps of the baseline's (see the module docstring).

    Raises:
        ValueError: for an unknown variant, bad channel lists or negative ``integration_steps``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    enc, dec = list(enc_channels), list(dec_channels)
    if len(enc) < 1 or len(dec) < len(enc) + 1 or min(enc + dec) < 1:
        raise ValueError(
            "expected positive enc_channels and dec_channels with len(dec_channels) > len(enc_channels), "
            f"got enc_channels={enc}, dec_channels={dec}."
        )
    if variant in ("reduced", "both"):
        if len(enc) < 3:
            raise ValueError(f"variant {variant!r} removes two levels and needs >= 3 enc_channels, got {enc}.")
        enc, dec = enc[:-2], dec[2:]
    if integration_steps < 0:
        raise ValueError(f"integration_steps must be >= 0, got {integration_steps}.")
    return enc, dec


def describe_arch(arch: torch.Tensor) -> str:
    """Human-readable form of a :class:`RegistrationNet` ``arch`` buffer (dimensionality, variant, steps)."""
    nd, variant, steps = (int(v) for v in arch.tolist())
    name = VARIANTS[variant] if 0 <= variant < len(VARIANTS) else f"variant #{variant}"
    return f"{nd}D {name!r} with integration_steps={steps}"


class _UNetLayers(nn.Module):
    """The layers of :class:`RegistrationNet`'s UNet and the pass through them (its base class, so the weights keep
    their names): stride-2 encoder convs, a bottom conv, one upsample-concatenate-conv per level (the last one
    concatenates the input pair), full-resolution convs and the flow conv (initialised from N(0, 1e-5)); at half
    resolution (``half_res``) behind a max-pool, with the flow brought back to full size."""

    def __init__(self, spatial_dims: int, enc: List[int], dec: List[int], half_res: bool) -> None:
        super().__init__()
        self.spatial_dims, self.half_res = spatial_dims, half_res
        self.stride = 2 ** len(enc) * (2 if half_res else 1)
        self.linear_mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.pool = (nn.MaxPool2d(2) if spatial_dims == 2 else nn.MaxPool3d(2)) if half_res else nn.Identity()
        self.encoder = nn.ModuleList()
        skip_channels = [2] + enc
        for before, c in zip(skip_channels, enc):
            self.encoder.append(_conv(spatial_dims, before, c, strides=2))
        self.bottom = _conv(spatial_dims, enc[-1], dec[0])
        self.decoder = nn.ModuleList()
        for level in range(1, len(enc) + 1):
            skip = skip_channels[len(enc) - level]
            self.decoder.append(UpsampleConcatConv(spatial_dims, dec[level - 1], skip, dec[level]))
        self.full_res = nn.ModuleList()
        prev = dec[len(enc)]
        for c in dec[len(enc) + 1 :]:
            self.full_res.append(_conv(spatial_dims, prev, c))
            prev = c
        self.flow = Conv[Conv.CONV, spatial_dims](prev, spatial_dims, kernel_size=3, padding=1)
        nn.init.normal_(self.flow.weight, 0.0, 1e-5)
        nn.init.zeros_(self.flow.bias)

    def _unet(self, h: torch.Tensor) -> torch.Tensor:
        """The flow conv's output for the (padded, pooled) pair ``h``, at ``h``'s resolution."""
        skips: List[torch.Tensor] = [h]
        for conv in self.encoder:
            h = conv(h)
            skips.append(h)
        h = self.bottom(h)
        for level, block in enumerate(self.decoder):
            h = block(h, skips[-(level + 2)])
        for conv in self.full_res:
            h = conv(h)
        return self.flow(h)

    def _flow(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """The flow at the UNet's resolution (input zero-padded to a multiple of ``stride``) and the input's sizes."""
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"expected input of shape (B, 2, *spatial) with {self.spatial_dims} spatial dims, "
                f"got shape {list(x.shape)}."
            )
        if x.shape[1] != 2:
            raise ValueError(f"expected 2 input channels (moving, fixed), got {x.shape[1]} in shape {list(x.shape)}.")
        sizes = [int(n) for n in x.shape[2:]]
        pads: List[int] = []
        for n in sizes:
            pads = [0, (self.stride - n % self.stride) % self.stride] + pads
        return self._unet(self.pool(F.pad(x, pads) if max(pads) > 0 else x)), sizes

    def _full_size(self, field: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        """A field at the UNet's resolution brought to the input's: upsampled (and doubled) when half-res, cropped."""
        if self.half_res:
            field = 2.0 * F.interpolate(field, scale_factor=2.0, mode=self.linear_mode, align_corners=False)
        if self.spatial_dims == 2:
            return field[:, :, : sizes[0], : sizes[1]]
        return field[:, :, : sizes[0], : sizes[1], : sizes[2]]


class RegistrationNet(_UNetLayers):
    """The registration UNet: a (moving, fixed) pair in, a displacement field out.

    One tensor in and one tensor out, so it can be a MONAI bundle ``network_def`` and is scriptable with
    ``torch.jit.script``. Spatial sizes that the network's total stride (``2**len(enc_channels)``, times 2
    for the max-pool variants) does not divide are zero-padded internally and the field is cropped back,
    so any size works, e.g. 160x192x224.

    Args:
        spatial_dims: 2 or 3.
        variant: one of ``"baseline"``, ``"maxpool"``, ``"reduced"``, ``"both"``.
        enc_channels: encoder channels of the baseline, one stride-2 conv each.
        dec_channels: decoder channels of the baseline: the first ``len(enc_channels)`` are the
            upsampling levels, the rest are full-resolution convs before the flow conv.
        integration_steps: ``0`` predicts the displacement directly; ``> 0`` predicts a stationary velocity
            field and integrates it by scaling and squaring (diffeomorphic variant).

    Raises:
        ValueError: for a bad ``spatial_dims``, ``variant``, channel list or ``integration_steps``.
    """

    def __init__(
        self,
        spatial_dims: int,
        variant: str = "baseline",
        enc_channels: Sequence[int] = VXM2_ENC_CHANNELS,
        dec_channels: Sequence[int] = VXM2_DEC_CHANNELS,
        integration_steps: int = 0,
    ) -> None:
        enc, dec = _checked_channels(variant, enc_channels, dec_channels, integration_steps)
        super().__init__(check_spatial_dims(spatial_dims), enc, dec, half_res=variant in ("maxpool", "both"))
        self.variant, self.integration_steps = variant, integration_steps
        self.integrate = VelocityIntegration(integration_steps) if integration_steps > 0 else nn.Identity()
        # saved with the weights, so loading a checkpoint of another variant fails clearly (maxpool and
        # baseline weights have identical shapes)
        self.register_buffer("arch", torch.tensor([spatial_dims, VARIANTS.index(variant), integration_steps]))

    describe = staticmethod(describe_arch)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "arch"
        if key in state_dict and not torch.equal(state_dict[key].cpu().long(), self.arch.cpu().long()):
            raise ValueError(
                f"the checkpoint is for a {describe_arch(state_dict[key])} network, "
                f"but this network is {describe_arch(self.arch)}: set spatial_dims/variant to match."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict the displacement that warps moving onto fixed.

        Args:
            x: ``(B, 2, H, W[, D])``; channel 0 the moving image, channel 1 the fixed image.

        Returns:
            ddf: ``(B, spatial_dims, H, W[, D])`` in voxels, for ``SpatialTransformer(moving, ddf)``.

        Raises:
            ValueError: for a wrong number of dimensions or channels.
        """
        flow, sizes = self._flow(x)
        return self._full_size(self.integrate(flow), sizes)

    @torch.jit.unused
    def velocity(self, x: torch.Tensor) -> torch.Tensor:
        """The stationary velocity field ``(B, spatial_dims, H, W[, D])`` (voxels) before integration, at full size:
        ``VelocityIntegration(integration_steps)(velocity(x))`` approximates ``forward(x)`` (exactly at full
        resolution; the half-resolution variants integrate before upsampling). ``x``: ``(B, 2, H, W[, D])``.

        Raises:
            ValueError: when the network predicts displacements (``integration_steps == 0``), or for bad input.
        """
        if self.integration_steps == 0:
            raise ValueError("velocity() needs a diffeomorphic network (integration_steps > 0).")
        flow, sizes = self._flow(x)
        return self._full_size(flow, sizes)


class VxmDense(nn.Module):
    """VoxelMorph's composite model: :class:`RegistrationNet` followed by :class:`SpatialTransformer`.

    Args:
        spatial_dims: 2 or 3.
        variant: one of ``"baseline"``, ``"maxpool"``, ``"reduced"``, ``"both"``.
        padding_mode: padding of the spatial transformer, ``"zeros"`` (VoxelMorph) or ``"border"``.
        network_options: the other options of :class:`RegistrationNet` (``enc_channels``, ``dec_channels``,
            ``integration_steps``), by name.
    """

    def __init__(
        self, spatial_dims: int, variant: str = "baseline", padding_mode: str = "zeros", **network_options
    ) -> None:
        super().__init__()
        self.net = RegistrationNet(spatial_dims, variant, **network_options)
        self.transformer = SpatialTransformer("bilinear", padding_mode)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Register ``moving`` to ``fixed``.

        Args:
            moving: ``(B, 1, H, W[, D])``.
            fixed: ``(B, 1, H, W[, D])``, same shape as ``moving``.

        Returns:
            ``(warped, ddf)``: the warped moving image ``(B, 1, H, W[, D])`` and the displacement field
            ``(B, spatial_dims, H, W[, D])`` in voxels.

        Raises:
            ValueError: when the shapes of ``moving`` and ``fixed`` differ.
        """
        if moving.shape != fixed.shape:
            raise ValueError(
                f"moving and fixed must have the same shape, got {list(moving.shape)} and {list(fixed.shape)}."
            )
        ddf = self.net(torch.cat([moving, fixed], dim=1))
        return self.transformer(moving, ddf), ddf
