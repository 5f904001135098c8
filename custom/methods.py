"""The registration methods the accuracy benchmarks compare, each a function ``(moving, fixed, moving_label) ->
(warped label, Jacobian determinant, seconds)``: our network with or without refinement (:func:`network_method`,
:class:`ZeroField` for refinement alone), and the peers our users would otherwise run, MONAI's ``VoxelMorph`` as a
bundle network and ANTs SyN through ``antspyx`` (``pip install -e ".[peers]"``).
"""

import importlib.util
import os
import time
from pathlib import Path
from typing import Callable, Dict, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from custom.metrics import jacobian_determinant
from custom.spatial import check_spatial_dims
from custom.warp import SpatialTransformer

__all__ = ["MonaiVoxelMorph", "ZeroField", "ants_available", "ants_register", "ants_register_files", "network_method"]


class MonaiVoxelMorph(nn.Module):
    """MONAI's ``VoxelMorph`` (default backbone, ``integration_steps=7``) as a bundle ``network_def``: one
    ``(B, 2, *S)`` tensor in, the displacement out, so the bundle's trainer and inferer run it unchanged.

    Args:
        spatial_dims: 2 or 3.
        integration_steps: MONAI's default 7.
    """

    def __init__(self, spatial_dims: int, integration_steps: int = 7) -> None:
        super().__init__()
        from monai.networks.nets import VoxelMorph

        self.model = VoxelMorph(spatial_dims=check_spatial_dims(spatial_dims), integration_steps=integration_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, 2, H, W[, D])`` (moving, fixed), any size (zero-padded to MONAI's multiple of 16 and
        cropped back); returns ``(B, spatial_dims, H, W[, D])``."""
        sizes = x.shape[2:]
        pads = [p for n in reversed(sizes) for p in (0, -n % 16)]
        padded = F.pad(x, pads)
        ddf = self.model(padded[:, :1], padded[:, 1:])[1]
        return ddf[(slice(None), slice(None)) + tuple(slice(0, n) for n in sizes)]


def ants_available() -> bool:
    """Whether ``antspyx`` is installed."""
    return importlib.util.find_spec("ants") is not None


def _ants(fixed, moving, moving_label, transform: str, seed: int):
    """ANTs registration of ``antspyx`` images: ``(warped label map, Jacobian determinant image of the deformable
    warp, seconds of the registration)`` on the fixed grid; ANTs' transform files are removed."""
    import ants

    start = time.perf_counter()
    reg = ants.registration(fixed=fixed, moving=moving, type_of_transform=transform, random_seed=int(seed))
    seconds = time.perf_counter() - start
    warped = ants.apply_transforms(fixed, moving_label, reg["fwdtransforms"], interpolator="genericLabel")
    jac = ants.create_jacobian_determinant_image(fixed, reg["fwdtransforms"][0])
    for path in set(reg["fwdtransforms"] + reg["invtransforms"]):
        if os.path.exists(path):
            os.remove(path)
    return warped, jac, seconds


def ants_register(moving: torch.Tensor, fixed: torch.Tensor, moving_label: torch.Tensor, transform: str, seed: int):
    """ANTs registration of a pair ``(1, *S)`` each: ``(warped label, Jacobian determinant of its deformable warp,
    seconds of the registration)``."""
    import ants

    f, m, label = (ants.from_numpy(t[0].cpu().numpy().astype(np.float32)) for t in (fixed, moving, moving_label))
    warped, jac, seconds = _ants(f, m, label, transform, seed)
    return torch.from_numpy(warped.numpy()).round().to(moving_label.dtype), torch.from_numpy(jac.numpy()), seconds


def ants_register_files(
    moving: str, fixed: str, moving_label: str, out_dir: Union[str, Path], transform: str = "SyN", seed: int = 0
) -> Dict[str, Path]:
    """ANTs registration of two image files, as a user runs it (``antspyx``; ``"SyN"``: its own affine stage, then
    SyN): the moving label map warped onto the fixed grid and the Jacobian determinant of the deformable warp,
    written into ``out_dir``.

    Returns:
        ``{"label": warped label map, "det": determinant map}`` (NIfTI paths).
    """
    import ants

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    warped, jac, _ = _ants(*(ants.image_read(p) for p in (fixed, moving, moving_label)), transform, seed)
    paths = {"label": out / "warped_label.nii.gz", "det": out / "jacobian.nii.gz"}
    warped.to_file(str(paths["label"]))
    jac.to_file(str(paths["det"]))
    return paths


def network_method(net: nn.Module, inferer: Callable, device: torch.device) -> Callable:
    """A network (through ``inferer``, e.g. a :class:`custom.refine.RefiningInferer`) as a method: the pair
    ``(1, *S)`` each on ``device``, the field's labels and determinant back on the CPU, seconds of the inference."""
    warp_labels = SpatialTransformer("nearest")

    def run(moving: torch.Tensor, fixed: torch.Tensor, moving_label: torch.Tensor):
        pair = torch.cat([moving, fixed])[None].to(device)
        start = time.perf_counter()
        with torch.no_grad():
            ddf = inferer(pair, net)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        ddf = ddf.float().cpu()
        return warp_labels(moving_label[None], ddf)[0, 0], jacobian_determinant(ddf)[0], seconds

    return run


class ZeroField(nn.Module):
    """A "network" that predicts no displacement: refinement from zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], x.dim() - 2, *x.shape[2:])
