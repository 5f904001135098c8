"""A deterministic synthetic dataset in the neurite-OASIS layout, so everything runs with no download.

After SynthMorph (Hoffmann et al., 2022): one brain-like template label map (an ellipsoidal head with folded
cortex, white matter, ventricles and deep grey matter, the four ``seg4`` classes) is deformed by a random
smooth field per subject; each subject gets its own label intensities, noise and bias field. Subjects are
therefore related by smooth deformations, which is exactly what registration should recover, and their
label maps give Dice scores. Nothing here is derived from real scans.
"""

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import nibabel as nib
import numpy as np
import torch
from monai.networks.layers import GaussianFilter

from custom.data.synth import smooth_noise
from custom.warp import SpatialTransformer

__all__ = ["DEMO_SHAPE", "SEG4_LABELS", "make_demo", "ensure_dataset"]

DEMO_SHAPE = (80, 96, 112)
SEG4_LABELS = {1: "cortex", 2: "subcortical grey matter", 3: "white matter", 4: "CSF"}
_MARKER = "demo.json"
DEMO_DIR = "data/demo"
logger = logging.getLogger(__name__)
_AFFINE = np.diag([-1.0, 1.0, 1.0, 1.0])


def _template(gen: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
    """The template label map ``(1, 1, *shape)`` with labels 0-4."""
    axes = [torch.linspace(-1, 1, n) for n in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    r = torch.sqrt((x / 0.82) ** 2 + (y / 0.88) ** 2 + (z / 0.8) ** 2)[None, None]
    r = r + 0.04 * smooth_noise(gen, 1, shape, [4] * len(shape))
    folds = 0.07 * smooth_noise(gen, 1, shape, [10] * len(shape))  # gyri: a wavy grey/white boundary
    labels = torch.zeros_like(r, dtype=torch.int64)
    labels[r < 0.9] = 1
    labels[r + folds < 0.72] = 3

    def blob(cx, cy, cz, ax, ay, az):
        return (((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2)[None, None] < 1

    for side in (-1, 1):
        labels[blob(0.27 * side, 0.05, -0.1, 0.12, 0.14, 0.12)] = 2
        labels[blob(0.12 * side, 0.0, 0.08, 0.07, 0.25, 0.12)] = 4
    return labels


def _subject(gen: torch.Generator, template: torch.Tensor, smooth: GaussianFilter):
    shape = template.shape[2:]
    scale = torch.tensor(shape, dtype=torch.float32).view(1, 3, 1, 1, 1)
    ddf = 0.03 * scale * smooth_noise(gen, 3, shape, [5] * len(shape))
    labels = SpatialTransformer("nearest")(template, ddf)
    means = torch.tensor([0.0, 0.55, 0.68, 0.88, 0.22]) + 0.04 * torch.randn(5, generator=gen)
    means[0] = 0.0
    image = means[labels] + 0.02 * torch.randn(labels.shape, generator=gen)
    image = smooth(image) * (labels > 0)
    image = (image / image.max()).clamp(0, 1)
    bias = torch.exp(0.15 * smooth_noise(gen, 1, shape, [3] * len(shape)))
    skull = (smooth((labels > 0).float()) > 0.02) & (labels == 0)
    orig = image * 110 * bias + skull * (35 + 5 * torch.randn(labels.shape, generator=gen))
    return image[0, 0], orig[0, 0].clamp(min=0), labels[0, 0]


def _save(array: torch.Tensor, path: Path, dtype) -> None:
    nib.save(nib.Nifti1Image(array.numpy().astype(dtype), _AFFINE), str(path))


def make_demo(
    directory: Union[str, Path], num_subjects: int = 12, shape: Sequence[int] = DEMO_SHAPE, seed: int = 0
) -> Path:
    """Write the synthetic dataset: ``OASIS_OAS1_0001_MR1/`` ... with ``aligned_norm``, ``aligned_orig``,
    ``aligned_seg4``, ``slice_norm`` and ``slice_seg4`` (``.nii.gz``; slices at the middle of the last axis),
    plus ``subjects.txt``, ``seg4_labels.txt`` and ``demo.json``.

    The folder appears complete or not at all: everything is written to a temporary folder that is renamed
    at the end.

    Args:
        directory: the folder to create; must not exist or be empty.
        num_subjects: how many subjects (at least 2).
        shape: volume shape (3 sizes, each at least 8).
        seed: the generator seed; the same seed gives the same files.

    Returns:
        The dataset folder.

    Raises:
        ValueError: for bad sizes.
        FileExistsError: when ``directory`` exists and is not empty (nothing is overwritten).
    """
    target = Path(directory)
    shape = tuple(int(s) for s in shape)
    if num_subjects < 2:
        raise ValueError(f"num_subjects must be at least 2, got {num_subjects}.")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes of at least 8, got {list(shape)}.")
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{str(target)!r} exists and is not empty; choose a new folder for the demo data.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        gen = torch.Generator().manual_seed(seed)
        smooth = GaussianFilter(3, sigma=0.7)
        template = _template(gen, shape)
        names = []
        with torch.no_grad():
            for i in range(1, num_subjects + 1):
                name = f"OASIS_OAS1_{i:04d}_MR1"
                folder = tmp / name
                folder.mkdir()
                image, orig, labels = _subject(gen, template, smooth)
                z = shape[2] // 2
                _save(image, folder / "aligned_norm.nii.gz", np.float32)
                _save(orig, folder / "aligned_orig.nii.gz", np.float32)
                _save(labels, folder / "aligned_seg4.nii.gz", np.int16)
                _save(image[:, :, z : z + 1], folder / "slice_norm.nii.gz", np.float32)
                _save(labels[:, :, z : z + 1], folder / "slice_seg4.nii.gz", np.int16)
                names.append(name)
        (tmp / "subjects.txt").write_text("\n".join(names) + "\n")
        (tmp / "seg4_labels.txt").write_text("".join(f"{k} {v}\n" for k, v in SEG4_LABELS.items()))
        meta = {"generator": "custom.data.demo", "num_subjects": num_subjects, "shape": list(shape), "seed": seed}
        (tmp / _MARKER).write_text(json.dumps(meta, indent=4) + "\n")
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def ensure_dataset(dataset_dir: Union[str, Path], generate: Optional[bool] = None, **demo_options) -> str:
    """Return ``dataset_dir``, generating the demo data there first when it is missing and that is asked for.

    A mistyped path must not silently train on synthetic data: a missing folder is generated only when
    ``generate`` is true (the configs' ``make_demo``), or when it is ``None`` (the default) and ``dataset_dir`` is
    the default ``data/demo``.
    Several processes (``torchrun`` ranks) may call this at once: the first to finish writes the folder, the
    others use it.

    Args:
        dataset_dir: a dataset root.
        generate: generate the demo data when ``dataset_dir`` is missing (``None``: only for ``data/demo``).
        demo_options: passed to :func:`make_demo`.

    Raises:
        FileNotFoundError: when ``dataset_dir`` is missing and is not to be generated.
    """
    path = Path(dataset_dir)
    if path.exists():
        return str(path)
    if not (generate or (generate is None and path == Path(DEMO_DIR))):
        raise FileNotFoundError(
            f"dataset folder {str(path)!r} does not exist (the synthetic demo data is generated only at "
            f"{DEMO_DIR!r}, or anywhere with --make_demo True)."
        )
    logger.warning("dataset_dir %r does not exist: writing the synthetic demo dataset there.", str(path))
    try:
        make_demo(path, **demo_options)
    except (OSError, FileExistsError):
        if not (path / _MARKER).is_file():  # not another process's finished copy: a real failure
            raise
    return str(path)
