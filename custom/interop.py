"""Displacement fields that ITK, ANTs, SimpleITK and 3D Slicer read as transforms.

Our fields are in voxels on the fixed grid, component ``i`` along array axis ``i``, in the pull-back convention
(the fixed-space point ``x`` samples the moving image at ``x + u(x)``). ITK's displacement-field transform uses the
same pull-back convention but wants physical millimetres in LPS coordinates, stored as a 5-D NIfTI
``(X, Y, Z, 1, 3)`` with intent code 1007 (vector): ITK reads ``dim[5]`` as vector components only for intents
1006/1007, and converts no RAS/LPS for 1007. So per voxel ``u_ras = M @ u_vox`` (``M`` the 3x3 part of the fixed
image's RAS affine) and ``u_lps = (-u_ras_x, -u_ras_y, u_ras_z)``. This is what ``antsApplyTransforms -i moving
-r fixed -t ddf.nii.gz`` and SimpleITK's ``DisplacementFieldTransform`` expect (no inversion).

2-D fields (single-slice images) are written as the 3-D field of that one slice, ``(X, Y, 1, 1, 3)``, with a zero
component along the slice axis.
"""

import nibabel as nib
import numpy as np
import torch

__all__ = ["DDF_FORMATS", "check_itk_affine", "ddf_to_itk", "ddf_to_voxel_image"]

DDF_FORMATS = ("itk", "voxel")
_LPS = np.array([-1.0, -1.0, 1.0])


def check_itk_affine(affine: np.ndarray, name: str = "the fixed image", atol: float = 1e-4) -> None:
    """Refuse an affine that ITK cannot hold: ITK keeps origin, spacing and an orthonormal direction only.

    Raises:
        ValueError: when the affine's columns are not orthogonal (shear) or it is singular.
    """
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    gram = m.T @ m
    spacing = np.sqrt(np.diag(gram))
    if np.any(spacing <= 0):
        raise ValueError(f"{name} has a singular affine (zero spacing): {np.round(affine, 4).tolist()}.")
    cosines = gram / np.outer(spacing, spacing)
    if np.abs(cosines - np.eye(3)).max() > atol:
        raise ValueError(
            f"{name} has an affine with shear, which ITK/ANTs/Slicer cannot represent (axes are not orthogonal: "
            f"{np.round(affine[:3, :3], 4).tolist()}); resample it to an orthogonal grid, or use --ddf_format voxel."
        )


def _header() -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    return header


def _with_geometry(data: np.ndarray, reference: nib.Nifti1Image, header: nib.Nifti1Header) -> nib.Nifti1Image:
    image = nib.Nifti1Image(data, reference.affine, header)
    sform_code = int(reference.header["sform_code"]) or 1
    qform_code = int(reference.header["qform_code"]) or sform_code
    image.set_sform(reference.affine, code=sform_code)
    image.set_qform(reference.affine, code=qform_code)
    return image


def ddf_to_itk(ddf: torch.Tensor, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """An ITK/ANTs displacement-field image of a voxel field on the fixed grid.

    Args:
        ddf: ``(spatial_dims, X, Y[, Z])`` in voxels (our convention), on the grid of ``reference``.
        reference: the fixed image (its affine and shape define the grid).

    Returns:
        A float32 NIfTI ``(X, Y, Z, 1, 3)``, intent vector (1007), LPS millimetres, the reference affine as sform
        and qform.

    Raises:
        ValueError: for an affine with shear, or a field that does not match the reference grid.
    """
    check_itk_affine(reference.affine)
    nd = ddf.shape[0]
    grid = tuple(int(n) for n in reference.shape[:3]) + (1,) * max(0, 3 - len(reference.shape))
    if tuple(ddf.shape[1:]) != grid[:nd] or any(n != 1 for n in grid[nd:]):
        raise ValueError(f"the field {list(ddf.shape)} does not match the fixed grid {list(reference.shape)}.")
    u = ddf.detach().cpu().float().numpy().reshape((nd,) + grid)
    if nd == 2:
        u = np.concatenate([u, np.zeros((1,) + grid, dtype=np.float32)], axis=0)
    # in float32 (sub-micrometre error on millimetre displacements): no float64 copies of a 3D field
    m = (np.asarray(reference.affine, dtype=np.float64)[:3, :3] * _LPS[:, None]).astype(np.float32)
    u_lps = np.einsum("ij,j...->...i", m, u)  # (X, Y, Z, 3)
    header = _header()
    header.set_intent("vector")
    header.set_data_dtype(np.float32)
    return _with_geometry(u_lps[:, :, :, None, :], reference, header)


def ddf_to_voxel_image(ddf: torch.Tensor, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """Our own layout: ``(*fixed shape, spatial_dims)`` float32 in voxels along the array axes (no intent: not a
    transform to ITK), the reference affine as sform and qform.

    Args:
        ddf: ``(spatial_dims, X, Y[, Z])`` in voxels.
        reference: the fixed image.
    """
    vector = ddf.detach().cpu().float().movedim(0, -1).numpy()
    header = _header()
    header.set_data_dtype(np.float32)
    return _with_geometry(vector.reshape(tuple(reference.shape) + (ddf.shape[0],)), reference, header)
