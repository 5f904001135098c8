"""Displacement fields that ITK, ANTs, SimpleITK and 3D Slicer read as transforms.

Our fields are in voxels on the fixed grid, component ``i`` along array axis ``i``, in the pull-back convention
(the fixed-space point ``x`` samples the moving image at ``x + u(x)``). ITK's displacement-field transform uses the
same pull-back convention but wants physical millimetres in LPS coordinates, stored as a 5-D NIfTI
``(X, Y, Z, 1, 3)`` with intent code 1007 (vector): ITK reads ``dim[5]`` as vector components only for intents
1006/1007, and converts no RAS/LPS for 1007. So per voxel ``u_ras = M @ u_vox`` (``M`` the 3x3 part of the fixed
image's RAS affine) and ``u_lps = (-u_ras_x, -u_ras_y, u_ras_z)``. This is what ``antsApplyTransforms -i moving
-r fixed -t ddf.nii.gz`` and SimpleITK's ``DisplacementFieldTransform`` expect (no inversion).

2-D fields (single-slice images) are the 3-D field of that one slice, with a zero component along the slice axis.
Files that are 2-D themselves (two axes) are read by ITK as 2-D images in the world x-y plane: their field is a 2-D
MetaImage (two components) and their affine an ``AffineTransform_double_2_2``, as ANTs writes for 2-D images.
ITK reads a NIfTI field ``(X, Y, 1, 1, 3)`` as a 2-D image and keeps only the top-left 2x2 block of the direction
matrix, which is singular for slices whose second axis points superior-inferior (the neurite-OASIS slices): so
:func:`write_itk_field` writes single-slice fields as a MetaImage (``.mha``, ITK's own format) of the 3-D grid
``(X, Y, 1)`` with the slice's full geometry, which ANTs, SimpleITK and Slicer read as they read the slice itself.
:func:`read_field` reads back every field written here (ITK NIfTI, MetaImage, voxel layout) as voxels.
"""

import zlib
from pathlib import Path
from typing import Tuple, Union

import nibabel as nib
import numpy as np
import torch

from custom.affine import (
    check_plausible,
    grid_coordinates,
    grid_record,
    plane_affine,
    plane_frame,
    plane_transform,
    read_itk_affine,
    transform_grids,
    voxel_map,
)
from custom.atomic import SIGNATURE, atomic_path, check_replaceable
from custom.errors import as_bool
from custom.warp import sample_at

__all__ = [
    "APPLY_MODES",
    "DDF_FORMATS",
    "apply_field",
    "check_itk_affine",
    "ddf_to_itk",
    "ddf_to_voxel_image",
    "field_suffix",
    "read_field",
    "write_field",
]

DDF_FORMATS = ("itk", "voxel")
_LPS = np.array([-1.0, -1.0, 1.0])


def check_itk_affine(
    affine: np.ndarray, name: str = "the fixed image", atol: float = 1e-4, planar: bool = False
) -> None:
    """Refuse an affine that ITK cannot hold: ITK keeps origin, spacing and an orthonormal direction only; of a 2-D
    file (``planar``) only the world x-y plane, so its two axes must lie in it.

    Raises:
        ValueError: when the affine's columns are not orthogonal (shear), it is singular, or (``planar``) its axes
            leave the x-y plane.
    """
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    if planar and np.abs(m[2, :2]).max() > atol:
        raise ValueError(
            f"{name} is a 2-D image whose axes leave the world x-y plane ({np.round(m[:, :2], 4).tolist()}), and ITK "
            "reads a 2-D file in that plane only; store it as a 3-D file with one slice, or use --ddf_format voxel."
        )
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
    header["descrip"] = SIGNATURE.encode()
    return header


def _with_geometry(data: np.ndarray, reference: nib.Nifti1Image, header: nib.Nifti1Header) -> nib.Nifti1Image:
    image = nib.Nifti1Image(data, reference.affine, header)
    sform_code = int(reference.header["sform_code"]) or 1
    qform_code = int(reference.header["qform_code"]) or sform_code
    image.set_sform(reference.affine, code=sform_code)
    image.set_qform(reference.affine, code=qform_code)
    return image


def _lps_vectors(ddf: torch.Tensor, reference: nib.Nifti1Image) -> np.ndarray:
    """``(X, Y, Z, 3)`` float32 LPS millimetres of a voxel field on the grid of ``reference``."""
    check_itk_affine(reference.affine, planar=len(reference.shape) == 2)
    nd = ddf.shape[0]
    grid = tuple(int(n) for n in reference.shape[:3]) + (1,) * max(0, 3 - len(reference.shape))
    if tuple(ddf.shape[1:]) != grid[:nd] or any(n != 1 for n in grid[nd:]):
        raise ValueError(f"the field {list(ddf.shape)} does not match the fixed grid {list(reference.shape)}.")
    u = ddf.detach().cpu().float().numpy().reshape((nd,) + grid)
    if nd == 2:
        u = np.concatenate([u, np.zeros((1,) + grid, dtype=np.float32)], axis=0)
    # in float32 (sub-micrometre error on millimetre displacements): no float64 copies of a 3D field
    m = (np.asarray(reference.affine, dtype=np.float64)[:3, :3] * _LPS[:, None]).astype(np.float32)
    return np.einsum("ij,j...->...i", m, u)


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
    u_lps = _lps_vectors(ddf, reference)
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


def field_suffix(spatial_dims: int, ddf_format: str) -> str:
    """The file suffix of a field: ``.mha`` for single-slice ITK fields (see the module docstring), else ``.nii.gz``."""
    return ".mha" if ddf_format == "itk" and spatial_dims == 2 else ".nii.gz"


def _write_metaimage(path: Path, vectors: np.ndarray, affine: np.ndarray, planar: bool = False) -> None:
    """A zlib-compressed MetaImage of ``(X, Y, Z, C)`` float32 vectors on the grid of the RAS ``affine``; ``planar``:
    a 2-D one ``(X, Y)`` of the first two components, in the world x-y plane (as ITK reads a 2-D file)."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.sqrt((m**2).sum(axis=0))
    direction = _LPS[:, None] * m / spacing  # ITK's LPS direction, one column per array axis
    origin = _LPS * np.asarray(affine, dtype=np.float64)[:3, 3]
    nd = 2 if planar else 3
    direction, origin, spacing = direction[:nd, :nd], origin[:nd], spacing[:nd]
    vectors = vectors[:, :, :1, :2] if planar else vectors
    data = zlib.compress(np.ascontiguousarray(vectors.transpose(2, 1, 0, 3), dtype="<f4").tobytes())
    header = {
        "ObjectType": "Image",
        "NDims": nd,
        "Comment": SIGNATURE,
        "BinaryData": "True",
        "BinaryDataByteOrderMSB": "False",
        "CompressedData": "True",
        "CompressedDataSize": len(data),
        "TransformMatrix": " ".join(f"{v:.12g}" for v in direction.T.ravel()),
        "Offset": " ".join(f"{v:.12g}" for v in origin),
        "ElementSpacing": " ".join(f"{v:.12g}" for v in spacing),
        "DimSize": " ".join(str(n) for n in vectors.shape[:nd]),
        "ElementNumberOfChannels": vectors.shape[3],
        "ElementType": "MET_FLOAT",
        "ElementDataFile": "LOCAL",
    }
    path.write_bytes("".join(f"{k} = {v}\n" for k, v in header.items()).encode() + data)


def write_field(ddf: torch.Tensor, reference: nib.Nifti1Image, path: Union[str, Path], ddf_format: str) -> Path:
    """Write a voxel field on the grid of ``reference`` atomically, in ``ddf_format``; returns the path.

    Args:
        ddf: ``(spatial_dims, X, Y[, Z])`` in voxels.
        reference: the fixed image.
        path: the file; its suffix must be :func:`field_suffix`'s for the field.
        ddf_format: ``"itk"`` or ``"voxel"``.
    """
    path = Path(path)
    suffix = field_suffix(ddf.shape[0], ddf_format)
    if not path.name.endswith(suffix):
        raise ValueError(f"a {ddf.shape[0]}D {ddf_format} field goes in a {suffix} file, got {path.name!r}.")
    with atomic_path(path, suffix=suffix) as tmp:
        if suffix == ".mha":
            _write_metaimage(tmp, _lps_vectors(ddf, reference), reference.affine, planar=len(reference.shape) == 2)
        else:
            image = ddf_to_itk(ddf, reference) if ddf_format == "itk" else ddf_to_voxel_image(ddf, reference)
            nib.save(image, str(tmp))
    return path


def _read_metaimage(path: Path) -> Tuple[np.ndarray, np.ndarray, bool]:
    """The ``(X, Y, Z, 3)`` vectors and RAS affine of a MetaImage as :func:`_write_metaimage` writes it, and whether
    it is a 2-D one (then ``Z`` is 1, the third component 0, and the affine's third axis the world z axis)."""
    raw = path.read_bytes()
    header, offset = {}, 0
    while "ElementDataFile" not in header:
        end = raw.find(b"\n", offset)
        if end < 0:
            raise ValueError(f"{str(path)!r} is not a MetaImage field (no ElementDataFile line).")
        key, _, value = raw[offset:end].decode("latin-1").partition("=")
        header[key.strip()] = value.strip()
        offset = end + 1
    if header.get("ElementDataFile") != "LOCAL" or header.get("ElementType") != "MET_FLOAT":
        raise ValueError(f"{str(path)!r}: expected a MetaImage with LOCAL float data, got {header}.")
    nd = int(header.get("NDims", 3))
    shape = [int(n) for n in header["DimSize"].split()] + [1] * (3 - nd)
    channels = int(header.get("ElementNumberOfChannels", 1))
    data = raw[offset:]
    data = zlib.decompress(data) if header.get("CompressedData") == "True" else data
    vectors = np.frombuffer(data, dtype="<f4").reshape(shape[::-1] + [channels]).transpose(2, 1, 0, 3)
    vectors = np.concatenate([vectors, np.zeros(vectors.shape[:3] + (3 - channels,), np.float32)], axis=3)
    direction, spacing, origin = np.eye(3), np.ones(3), np.zeros(3)
    direction[:nd, :nd] = np.array([float(v) for v in header["TransformMatrix"].split()]).reshape(nd, nd).T
    spacing[:nd] = [float(v) for v in header["ElementSpacing"].split()]
    origin[:nd] = [float(v) for v in header["Offset"].split()]
    affine = np.eye(4)
    affine[:3, :3] = _LPS[:, None] * direction * spacing
    affine[:3, 3] = _LPS * origin
    return vectors, affine, nd == 2


def read_field(path: Union[str, Path]) -> Tuple[torch.Tensor, np.ndarray, Tuple[int, ...]]:
    """Read a field written by :func:`write_field` (ITK NIfTI, MetaImage or voxel layout) back as voxels.

    Args:
        path: the field file.

    Returns:
        ``(ddf, affine, grid)``: the voxel field ``(spatial_dims, X, Y[, Z])`` (float32), the RAS affine of its
        grid, and the grid's shape ``(X, Y, Z)`` (``Z`` is 1 for a single slice; ``(X, Y)`` for the 2-D MetaImage
        field of a 2-D file, whose affine is then that of the world x-y plane).

    Raises:
        FileNotFoundError: for a missing file.
        ValueError: for a file that is not one of our displacement fields.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"field file {str(path)!r} does not exist.")
    planar = False
    if path.name.endswith(".mha"):
        vectors, affine, planar = _read_metaimage(path)
        itk = True
    else:
        image = nib.load(str(path))
        shape, itk = image.shape, int(image.header["intent_code"]) == 1007
        if itk and not (len(shape) == 5 and shape[3:] == (1, 3)):
            raise ValueError(f"{str(path)!r}: an ITK field has shape (X, Y, Z, 1, 3), got {list(shape)}.")
        if not itk and not (len(shape) == 4 and shape[3] in (2, 3) and (shape[3] == 3 or shape[2] == 1)):
            raise ValueError(
                f"{str(path)!r} is not a displacement field: expected an ITK field (X, Y, Z, 1, 3) with intent "
                f"vector, or our voxel layout (X, Y, Z, 3) / (X, Y, 1, 2), got shape {list(shape)}."
            )
        vectors, affine = np.asarray(image.dataobj, dtype=np.float32).reshape(shape[:3] + (-1,)), image.affine
    grid = tuple(int(n) for n in vectors.shape[:3])
    if itk:
        m = np.asarray(affine, dtype=np.float64)[:3, :3] * _LPS[:, None]  # voxel -> LPS millimetres
        vectors = np.einsum("ij,...j->...i", np.linalg.inv(m).astype(np.float32), vectors)
    nd = 2 if grid[2] == 1 else 3
    ddf = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vectors[..., :nd], -1, 0)))
    return ddf.reshape((nd,) + grid[:nd]).float(), np.asarray(affine, dtype=np.float64), grid[:2] if planar else grid


APPLY_MODES = ("auto", "linear", "nearest")


def _check_output(output: Path, inputs, overwrite: bool) -> None:
    if not output.name.endswith((".nii.gz", ".nii")):
        raise ValueError(f"the output must be a .nii.gz or .nii file, got {output.name!r}.")
    if any(output.resolve() == Path(p).resolve() for p in inputs):
        raise ValueError(f"the output {str(output)!r} is one of the inputs; inputs are never overwritten.")
    check_replaceable([output])
    if output.exists() and not overwrite:
        raise FileExistsError(f"{str(output)!r} exists; pass --overwrite True to replace it.")


def _affine_map(
    path: Union[str, Path], image: nib.Nifti1Image, field_affine: np.ndarray, grid, nd: int
) -> torch.Tensor:
    """The map from the field's voxels to ``image``'s voxels through the transform file ``path`` (checked to be the
    one of this image's grid and this field's grid, and plausible)."""
    frame = plane_frame(field_affine) if nd == 2 else None
    transform = read_itk_affine(path)
    transform = transform if nd == 3 else plane_transform(transform, frame)
    check_plausible(transform)
    recorded = transform_grids(path)
    found = {"moving": grid_record(image.shape, image.affine), "fixed": grid_record(grid, field_affine)}
    for key, what in (("moving", "the image"), ("fixed", "the field")):
        if key in recorded and recorded[key] != found[key]:
            raise ValueError(
                f"transform file {str(path)!r} was computed for another pair: its {key} grid ({recorded[key]}) is not "
                f"the grid of {what} ({found[key]}); give the _affine.txt that register wrote with this field."
            )
    matrix = voxel_map(transform, plane_affine(image.affine, nd, frame), plane_affine(field_affine, nd, frame))
    return torch.as_tensor(matrix)


def apply_field(
    image: Union[str, Path],
    field: Union[str, Path],
    output: Union[str, Path],
    mode: str = "auto",
    jacobian: bool = False,
    overwrite: bool = False,
    affine: Union[str, Path, None] = None,
) -> list:
    """Warp an image or label map with a field written by :func:`write_field` (after the affine ``register``
    wrote, if given), onto the field's (fixed) grid.

    Args:
        image: a NIfTI image or label map on the field's grid (the grid the pair was registered on), or, with
            ``affine``, on the moving image's grid.
        field: the field (ITK ``.nii.gz`` / ``.mha`` or voxel layout).
        output: the warped image (``.nii.gz``/``.nii``), with the field's geometry.
        mode: ``"linear"`` for images, ``"nearest"`` for label maps, or ``"auto"``: nearest for integer data.
        jacobian: also write ``<output>_jacobian.nii.gz``, the field's Jacobian determinant.
        overwrite: replace existing outputs (only files this project wrote, see
            :func:`~custom.atomic.check_replaceable`).
        affine: the pair's ``<name>_affine.txt``: the image is sampled once through the composed transform.

    Returns:
        The files written.

    Raises:
        FileNotFoundError: for a missing image or field.
        ValueError: for a 4-D image, a file that is not a field, another grid, an unknown mode, a bad output, or a
            transform file of another pair (its recorded grids differ from the image's or the field's).
        FileExistsError: when an output exists and ``overwrite`` is false.
    """
    from custom.metrics import jacobian_determinant

    if mode not in APPLY_MODES:
        raise ValueError(f"mode must be one of {APPLY_MODES}, got {mode!r}.")
    jacobian, overwrite, output = as_bool("jacobian", jacobian), as_bool("overwrite", overwrite), Path(output)
    stem = output.name[: -len(".nii.gz")] if output.name.endswith(".nii.gz") else output.stem
    outputs = [output] + ([output.with_name(f"{stem}_jacobian.nii.gz")] if jacobian else [])
    for path in outputs:
        _check_output(path, [p for p in (image, field, affine) if p], overwrite)
    if not Path(image).is_file():
        raise FileNotFoundError(f"image file {str(image)!r} does not exist.")
    ddf, field_affine, grid = read_field(field)
    moving = nib.load(str(image))
    if len(moving.shape) > 3 and any(n != 1 for n in moving.shape[3:]):
        raise ValueError(f"{str(image)!r} is a {len(moving.shape)}-D image {list(moving.shape)}; give one 2D/3D image.")
    shape = tuple(int(n) for n in moving.shape[:3]) + (1,) * max(0, 3 - len(moving.shape))
    nd = ddf.shape[0]
    if affine is None:
        if grid_record(moving.shape[: len(grid)], moving.affine) != grid_record(grid, field_affine):
            raise ValueError(
                f"{str(image)!r} is not on the field's grid (image {list(shape)}, field {list(grid)}, or another "
                "affine); the field warps images on the grid of the pair it was computed for: resample the image onto "
                "it first, or give the pair's --affine file when register ran the affine stage."
            )
        matrix = torch.eye(nd + 1, dtype=torch.float64)
    else:
        matrix = _affine_map(affine, moving, field_affine, grid, nd)
    integer = moving.get_data_dtype().kind in "iub"
    nearest = mode == "nearest" or (mode == "auto" and integer)
    data = torch.from_numpy(np.asarray(moving.dataobj, dtype=np.float32).reshape(shape[:nd]))[None, None]
    with torch.no_grad():
        coords = grid_coordinates(matrix, grid[:nd], ddf[None])
        warped = sample_at(data, coords, "nearest" if nearest else "bilinear")[0, 0].numpy()
    header = moving.header.copy()
    header["descrip"] = SIGNATURE.encode()
    header.set_data_dtype(moving.get_data_dtype() if nearest else np.float32)
    out_shape = moving.shape if affine is None else grid
    results = [nib.Nifti1Image(warped.reshape(out_shape).astype(header.get_data_dtype()), field_affine, header)]
    if jacobian:
        det = jacobian_determinant(ddf[None])[0].numpy().reshape(grid)
        results.append(nib.Nifti1Image(det.astype(np.float32), field_affine))
    for image_out, path in zip(results, outputs):
        with atomic_path(path, suffix=".nii.gz" if path.name.endswith(".gz") else ".nii") as tmp:
            nib.save(image_out, str(tmp))
    return [str(p) for p in outputs]
