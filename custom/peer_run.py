"""One registration by a peer tool, run in that tool's own environment (:mod:`custom.peers`).

A standalone script: it imports numpy, nibabel and the tool, never the ``custom`` package, whose dependencies the
peer environments lack. :mod:`custom.accuracy_subjects` runs it as::

    <peer env>/bin/python -P custom/peer_run.py <tool> <moving> <fixed> <output folder> '<settings as JSON>'

and it writes ``<output folder>/displacement.nii.gz``: the tool's displacement on the fixed grid, ``(X, Y, Z, 3)``
in voxels, as Learn2Reg takes it (the moving image sampled at ``x + d(x)`` matches the fixed image at ``x``). The
caller warps the labels and takes the Jacobian determinant itself, the same way for every tool. Both images must
share one grid (the release's ``aligned_norm``): the tools' own affine stages are not run.

Tools (each with the settings its authors recommend for brain MRI, as :mod:`custom.peers` states them):

- ``fireants``: FireANTs' ``GreedyRegistration`` (compositive, Adam, local NCC) at scales 4, 2, 1;
- ``convexadam``: ConvexAdam's ``convex_adam_pt`` (MIND features, coupled convex optimisation, Adam);
- ``elastix``: itk-elastix with its default B-spline parameter map.
"""

import json
import os
import sys

import nibabel as nib
import numpy as np


def _check_same_grid(moving: str, fixed: str) -> None:
    """Raise ``ValueError`` unless the two images share shape and affine."""
    m, f = nib.load(moving), nib.load(fixed)
    if m.shape[:3] != f.shape[:3] or not np.allclose(m.affine, f.affine, atol=1e-3):
        raise ValueError(
            f"the peers register images on one grid: {moving} is {m.shape[:3]} and {fixed} is {f.shape[:3]}, or "
            "their affines differ (use the release's aligned_norm scans)."
        )


def normalized_to_displacement(coords: np.ndarray) -> np.ndarray:
    """Sampling coordinates as ``torch.nn.functional.grid_sample`` takes them (``align_corners=True``) over an array
    in SimpleITK's order, ``(Z, Y, X, 3)`` with components ``(x, y, z)`` in ``[-1, 1]``, as a displacement
    ``(X, Y, Z, 3)`` in voxels with components ``(x, y, z)`` (nibabel's order)."""
    sizes = np.array(coords.shape[2::-1], dtype=np.float64)  # X, Y, Z
    voxels = (coords.astype(np.float64) + 1) / 2 * (sizes - 1)
    voxels = voxels.transpose(2, 1, 0, 3)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in voxels.shape[:3]), indexing="ij"), axis=-1)
    return (voxels - grid).astype(np.float32)


def physical_to_displacement(field: np.ndarray, direction: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """An ITK displacement field, ``(Z, Y, X, 3)`` in physical units with components ``(x, y, z)``, as a
    displacement ``(X, Y, Z, 3)`` in voxels: each vector times the inverse of ``direction @ diag(spacing)``."""
    to_voxels = np.linalg.inv(np.asarray(direction, dtype=np.float64) @ np.diag(spacing))
    return (field.astype(np.float64) @ to_voxels.T).transpose(2, 1, 0, 3).astype(np.float32)


def fireants(moving: str, fixed: str, iterations=(250, 200, 100), scales=(4, 2, 1), **options) -> np.ndarray:
    """FireANTs ``GreedyRegistration`` on the CPU; ``options`` go to it (``optimizer_lr``, ``cc_kernel_size``,
    ``smooth_grad_sigma``, ``smooth_warp_sigma``, ``optimizer_params``)."""
    import torch
    from fireants.io.image import BatchedImages, Image
    from fireants.registration.greedy import GreedyRegistration

    torch.backends.mkldnn.enabled = False  # oneDNN's 3D convolutions are 2-3x slower on CPU for the same result
    images = [BatchedImages([Image.load_file(path, device="cpu")]) for path in (fixed, moving)]
    registration = GreedyRegistration(list(scales), list(iterations), *images, **options)
    registration.optimize()
    with torch.no_grad():
        coords = registration.get_warped_coordinates(*images)
    return normalized_to_displacement(coords[0].cpu().numpy())


def convexadam(moving: str, fixed: str, **options) -> np.ndarray:
    """ConvexAdam's ``convex_adam_pt`` on the CPU; ``options`` go to it."""
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    images = [torch.from_numpy(np.asarray(nib.load(path).dataobj, dtype=np.float32)) for path in (fixed, moving)]
    field = convex_adam_pt(*images, device=torch.device("cpu"), **options)
    return np.asarray(field, dtype=np.float32)


def elastix(moving: str, fixed: str, transform: str = "bspline", resolutions: int = 4) -> np.ndarray:
    """itk-elastix with its default parameter map of ``transform``, the displacement from transformix."""
    import itk

    images = [itk.imread(path, itk.F) for path in (fixed, moving)]
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap(transform, resolutions))
    _, result = itk.elastix_registration_method(*images, parameter_object=parameters, log_to_console=False)
    field = itk.transformix_deformation_field(images[1], result)
    direction, spacing = itk.array_from_matrix(images[0].GetDirection()), np.array(images[0].GetSpacing())
    return physical_to_displacement(itk.array_from_image(field), direction, spacing)


TOOLS = {"fireants": fireants, "convexadam": convexadam, "elastix": elastix}


def main(argv) -> None:
    """``<tool> <moving> <fixed> <output folder> [settings JSON]``: write ``displacement.nii.gz`` (atomically)."""
    if len(argv) not in (4, 5) or argv[0] not in TOOLS:
        raise SystemExit(
            f"usage: peer_run.py {{{'|'.join(TOOLS)}}} MOVING FIXED OUTPUT_DIR [SETTINGS_JSON]; got {argv}"
        )
    tool, moving, fixed, out = argv[:4]
    for path in (moving, fixed):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"expected an image file, got {path!r}.")
    _check_same_grid(moving, fixed)
    field = TOOLS[tool](moving, fixed, **(json.loads(argv[4]) if len(argv) == 5 else {}))
    os.makedirs(out, exist_ok=True)
    target, tmp = os.path.join(out, "displacement.nii.gz"), os.path.join(out, ".displacement.tmp.nii.gz")
    nib.save(nib.Nifti1Image(field, nib.load(fixed).affine), tmp)
    os.replace(tmp, target)


if __name__ == "__main__":
    main(sys.argv[1:])
