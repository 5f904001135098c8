"""Synthetic training pairs, generated on the fly (after SynthMorph, Hoffmann et al., IEEE TMI 2022).

Each pair comes from one random label map: the argmax of smoothed noise images (SynthMorph's "shapes"), inside a
smooth head-like mask whose outside is background (0, as in skull-stripped scans), or a label map of the demo
subjects when given. Two random smooth diffeomorphic deformations (integrated stationary velocity fields) of that
map give the moving and the fixed label maps. Every pair gets its own random intensity per label (so the network
cannot rely on one contrast; both images of a pair share it, as the image-similarity training loss needs), then
each image gets MONAI's random blur, bias field, gamma and noise, and the training normalisation
(:func:`~custom.data.transforms.scale_foreground`). Nothing is written to disk; the same seed, epoch
and index give the same pair.
"""

import math
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, RandAdjustContrast, RandBiasField, RandGaussianNoise, RandGaussianSmooth

from custom.data.transforms import scale_foreground
from custom.spatial import check_spatial_dims
from custom.warp import SpatialTransformer, VelocityIntegration

__all__ = [
    "SYNTH_SHAPES",
    "SyntheticPairs",
    "intensity_augmentation",
    "known_deformation_pairs",
    "random_ddf",
    "shapes_label_map",
    "smooth_noise",
]

SYNTH_SHAPES = {2: (160, 192), 3: (96, 112, 128)}


def smooth_noise(
    gen: torch.Generator, channels: int, shape: Sequence[int], cells: Union[int, Sequence[int]]
) -> torch.Tensor:
    """``(1, channels, *shape)`` noise, smooth: Gaussian values on a coarse grid, linearly upsampled.

    Args:
        gen: the random generator.
        channels: noise channels.
        shape: spatial shape.
        cells: random values along the largest axis (the other axes in proportion), or the coarse grid's shape.
    """
    if isinstance(cells, int):
        coarse = [max(2, math.ceil(cells * n / max(shape))) for n in shape]
    else:
        coarse = list(cells)
    low = torch.randn(1, channels, *coarse, generator=gen)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(low, size=tuple(shape), mode=mode, align_corners=True)


def random_ddf(
    gen: torch.Generator,
    shape: Sequence[int],
    max_displacement: float,
    integrate: Optional[VelocityIntegration] = None,
    cells: int = 10,
) -> torch.Tensor:
    """A random smooth diffeomorphic displacement: a stationary velocity of smooth noise (:func:`smooth_noise`,
    ``cells`` random values along the largest axis, standard deviation ``max_displacement`` voxels) integrated by
    scaling and squaring on a grid 4x coarser and upsampled (linear). The displacements reach about twice
    ``max_displacement``.

    Args:
        gen: the random generator.
        shape: spatial shape ``(H, W[, D])``.
        max_displacement: standard deviation of the velocity, in voxels of ``shape``.
        integrate: the integration (default 5 scaling-and-squaring steps).
        cells: smoothness: random values along the largest axis.

    Returns:
        ``(1, len(shape), *shape)`` in voxels.
    """
    nd = len(shape)
    coarse = [max(4, n // 4) for n in shape]
    velocity = (max_displacement / 4) * smooth_noise(gen, nd, coarse, cells)
    mode = "bilinear" if nd == 2 else "trilinear"
    field = (integrate or VelocityIntegration(5))(velocity)
    return 4 * F.interpolate(field, size=tuple(shape), mode=mode, align_corners=True)


def known_deformation_pairs(
    image: torch.Tensor,
    label: torch.Tensor,
    count: int,
    max_displacement: float = 4.0,
    seed: int = 0,
    name: str = "subject",
) -> List[dict]:
    """Pairs with a known answer: ``image`` and ``label`` pulled into another space by random smooth
    diffeomorphisms (:func:`random_ddf`); registering each ``moving`` back to ``fixed = image`` should recover the
    deformation, and the warped ``moving_label`` should match ``label``.

    With ``max_displacement=4`` on a 160x192x224 brain the displacements average about 3.4 voxels and reach about
    12, and the labels of the deformed and original scans overlap as much as those of two affinely aligned
    subjects (mean Dice about 0.55).

    Args:
        image: ``(1, *S)`` float image (normalised as in training).
        label: ``(1, *S)`` integer label map of ``image``.
        count: number of pairs.
        max_displacement: standard deviation of the velocity, in voxels.
        seed: the deformations' seed (pair ``i`` uses ``seed + i``).
        name: the subject's name, for the ids.

    Returns:
        ``count`` dicts with ``moving``, ``fixed``, ``moving_label``, ``fixed_label`` ``(1, *S)``, ``true_ddf``
        ``(len(S), *S)`` (the displacement that pulled ``image`` to ``moving``), ``moving_id`` and ``fixed_id``.

    Raises:
        ValueError: when the shapes differ or ``count < 1``.
    """
    if image.shape != label.shape or image.dim() not in (3, 4) or image.shape[0] != 1:
        raise ValueError(
            f"expected image and label of one shape (1, *spatial) with 2 or 3 spatial dims, got "
            f"{list(image.shape)} and {list(label.shape)}."
        )
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    pairs = []
    for i in range(count):
        gen = torch.Generator().manual_seed(seed + i)
        ddf = random_ddf(gen, image.shape[1:], max_displacement)
        with torch.no_grad():
            moving = SpatialTransformer()(image[None].float(), ddf)[0]
            moving_label = SpatialTransformer("nearest")(label[None].float(), ddf)[0].to(label.dtype)
        pairs.append(
            {
                "moving": moving,
                "fixed": image,
                "moving_label": moving_label,
                "fixed_label": label,
                "true_ddf": ddf[0],
                "moving_id": f"{name}:deformed:{seed + i}",
                "fixed_id": name,
            }
        )
    return pairs


def shapes_label_map(gen: torch.Generator, num_labels: int, shape: Sequence[int]) -> torch.Tensor:
    """A random "shapes" label map ``(1, 1, *shape)``: ``num_labels`` smooth random regions in a head-like mask."""
    cells = int(torch.randint(6, 24, (1,), generator=gen))
    labels = smooth_noise(gen, num_labels, shape, cells).argmax(1, keepdim=True) + 1
    axes = [torch.linspace(-1, 1, n) for n in shape]
    radius = torch.sqrt(sum(g**2 for g in torch.meshgrid(*axes, indexing="ij")))[None, None]
    outside = radius + 0.1 * smooth_noise(gen, 1, shape, 5) > 0.85
    return labels.masked_fill(outside, 0).int()


def intensity_augmentation() -> Compose:
    """The synthetic images' appearance: blur, bias field, gamma and noise (MONAI transforms)."""
    return Compose(
        [
            RandGaussianSmooth((0.3, 1.2), (0.3, 1.2), (0.3, 1.2), prob=1.0),
            RandBiasField(degree=3, coeff_range=(0.0, 0.3), prob=1.0),
            RandAdjustContrast(prob=1.0, gamma=(0.7, 1.5)),
            RandGaussianNoise(prob=1.0, std=0.03),
        ]
    )


class SyntheticPairs(torch.utils.data.Dataset):
    """A dataset of synthetic (moving, fixed) pairs with their label maps, re-drawn every epoch or fixed.

    Items: ``moving``, ``fixed`` ``(1, *shape)`` float in [0, 1]; ``moving_label``, ``fixed_label`` ``(1, *shape)``
    int32; ``moving_id``, ``fixed_id``.

    Args:
        spatial_dims: 2 or 3.
        shape: spatial shape of the pairs; default :data:`SYNTH_SHAPES`.
        length: pairs per epoch.
        seed: the generator seed.
        redraw: new pairs at each :meth:`set_epoch` (training); otherwise always the same (validation).
        num_labels: labels of a "shapes" label map.
        max_displacement: standard deviation of the velocity field, in voxels (the deformations reach about
            twice that).
        label_maps: optional label maps ``(1, *S)`` to deform instead of "shapes" half of the time (e.g. the demo
            subjects' ``seg4``); resized to ``shape`` (nearest).

    Raises:
        ValueError: for bad sizes.
    """

    def __init__(
        self,
        spatial_dims: int,
        shape: Optional[Sequence[int]] = None,
        length: int = 256,
        seed: int = 0,
        redraw: bool = True,
        num_labels: int = 16,
        max_displacement: float = 3.0,
        label_maps: Optional[List[torch.Tensor]] = None,
    ) -> None:
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.shape = tuple(int(n) for n in (shape or SYNTH_SHAPES[self.spatial_dims]))
        if len(self.shape) != self.spatial_dims or min(self.shape) < 16:
            raise ValueError(f"synthetic shape must be {spatial_dims} sizes of at least 16, got {list(self.shape)}.")
        if length < 1 or num_labels < 2:
            raise ValueError(f"need length >= 1 and num_labels >= 2, got {length} and {num_labels}.")
        self.length = length
        self.seed = seed
        self.redraw = redraw
        self.epoch = 0
        self.num_labels = num_labels
        self.max_displacement = float(max_displacement)
        self.label_maps = [
            F.interpolate(m[None].float(), size=self.shape, mode="nearest")[0].int() for m in (label_maps or [])
        ]
        self.warp_labels = SpatialTransformer("nearest")
        self.integrate = VelocityIntegration(5)
        self.intensity = intensity_augmentation()

    def set_epoch(self, epoch: int) -> None:
        """New random pairs for ``epoch`` (only when ``redraw``)."""
        if self.redraw:
            self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _labels(self, gen: torch.Generator) -> torch.Tensor:
        """A base label map ``(1, 1, *shape)``: "shapes" in a head-like mask, or a given label map."""
        if self.label_maps and torch.rand(1, generator=gen) < 0.5:
            return self.label_maps[int(torch.randint(len(self.label_maps), (1,), generator=gen))][None]
        return shapes_label_map(gen, self.num_labels, self.shape)

    def _deform(self, gen: torch.Generator, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` warped by a random smooth diffeomorphism (:func:`random_ddf`)."""
        return self.warp_labels(labels, random_ddf(gen, self.shape, self.max_displacement, self.integrate))

    def _image(self, means: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
        image = means[labels.long()][0]  # (1, *shape)
        self.intensity.set_random_state(seed)
        image = torch.as_tensor(self.intensity(image)).float() * (labels[0] > 0)
        return scale_foreground(image.clamp(min=0))

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} synthetic pairs.")
        seed = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0])
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            base = self._labels(gen)
            moving_label, fixed_label = self._deform(gen, base), self._deform(gen, base)
            means = torch.rand(int(base.max()) + 1, generator=gen)  # a new contrast for every pair
            means[0] = 0.0  # background stays empty, as in skull-stripped scans
            moving = self._image(means, moving_label, seed)
            fixed = self._image(means, fixed_label, seed + 1)
        name = f"synthetic:{self.epoch}:{i}"
        return {
            "moving": moving,
            "fixed": fixed,
            "moving_label": moving_label[0],
            "fixed_label": fixed_label[0],
            "moving_id": f"{name}:moving",
            "fixed_id": f"{name}:fixed",
        }
