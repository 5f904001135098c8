"""Register a user's own NIfTI pairs: listing them and the dataset the inference config loads (the checks of their
files are :mod:`custom.input_checks`, the results :mod:`custom.outputs`).

Outputs per pair, named ``<moving>__to__<fixed>`` after the two files (``<subject>_aligned_norm`` for the
neurite-OASIS names every subject shares; ``__<pair index>`` is appended when two pairs would share a name):
``<name>_warped.nii.gz`` (the moving image in its own intensity scale, warped), ``<name>_ddf.nii.gz`` (the
displacement field: ITK/ANTs layout by default, ``.mha`` for single slices, see :mod:`custom.interop`), with a
moving label ``<name>_warped_label.nii.gz`` (nearest neighbour) and optionally ``<name>_jacobian.nii.gz``. Each
carries the fixed image's affine; a pair's files are written to temporary names and renamed together;
``pairs_out.csv`` maps each input pair to its outputs.

Every input of every pair (existence, headers, dimensionality, shapes, geometry, values) is checked before the
first file is written.
"""

import csv
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import nibabel as nib
import numpy as np
import torch
from nibabel.filebasedimages import ImageFileError

from custom.affine import align_affine, grid_coordinates, plane_affine, plane_frame, voxel_map, world_transform
from custom.cohort import CohortShare
from custom.data.oasis import IMAGE_FILES
from custom.data.transforms import pair_transforms
from custom.errors import as_bool
from custom.input_checks import check_pair, dims_of, looks_like_labels
from custom.spatial import check_spatial_dims
from custom.warp import sample_at

__all__ = ["RegistrationPairs", "infer_spatial_dims", "list_pairs", "output_names"]

NIFTI = (".nii.gz", ".nii")
KEYS = ("moving", "fixed", "moving_label")
LABEL_NAME = re.compile(r"(?:^|[_.+-])(?:a?seg\d*|aparc|labels?|mask|parc)(?:$|[_.+-])", re.IGNORECASE)
"""File names of label maps (``slice_seg24``, ``seg35``, ``aparc+aseg``, ``mask``...), which a folder of moving
images skips; ``brainmask`` (a skull-stripped image) is not one."""


def _is_label_file(path: Path) -> bool:
    """A label map by its name (:data:`LABEL_NAME`, the release's label files) or, for integer-typed files, by its
    content (:func:`looks_like_labels`)."""
    if LABEL_NAME.search(path.name.split(".nii")[0]):
        return True
    try:
        image = nib.load(str(path))
        return np.issubdtype(image.get_data_dtype(), np.integer) and looks_like_labels(np.asarray(image.dataobj))
    except Exception:  # unreadable: reported with its name when the pairs are checked
        return False


def _stem(path: str) -> str:
    """A file's name without extension, prefixed by its folder (the subject) for the neurite-OASIS file names,
    which every subject shares."""
    name = Path(path).name
    for ext in NIFTI:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return f"{Path(path).parent.name}_{name}" if name in IMAGE_FILES else name


def output_names(pairs: List[Dict[str, str]]) -> List[str]:
    """Unique, predictable output names: ``<moving>__to__<fixed>``, with ``__<pair index>`` on collision."""
    names = [f"{_stem(p['moving'])}__to__{_stem(p['fixed'])}" for p in pairs]
    return [f"{n}__{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def list_pairs(
    moving: Optional[str] = None,
    fixed: Optional[str] = None,
    moving_label: Optional[str] = None,
    pairs: Optional[str] = None,
    dataset_dir: Union[str, Path] = ".",
    report: bool = True,
) -> List[Dict[str, str]]:
    """The pairs to register, from one of three forms; relative paths are taken from ``dataset_dir``.

    - ``moving`` and ``fixed`` files (and optionally ``moving_label``): one pair;
    - ``moving`` a folder and ``fixed`` a file: every NIfTI image in the folder to that fixed image (no labels;
      label maps, by name or content, are skipped and, with ``report``, named on stderr);
    - ``pairs`` a CSV file with columns ``moving,fixed[,moving_label]`` (paths relative to the CSV).

    Raises:
        ValueError: when neither or both forms are given, a label goes with a folder, or the CSV lacks columns
            or cells.
        FileNotFoundError: for a missing file or folder.
    """
    if pairs and (moving or fixed or moving_label):
        raise ValueError("give either --pairs pairs.csv or --moving/--fixed, not both.")
    moving, fixed, moving_label, pairs = (
        str(Path(dataset_dir, p)) if p else p for p in (moving, fixed, moving_label, pairs)
    )
    if pairs:
        table = Path(pairs)
        if not table.is_file():
            raise FileNotFoundError(f"pairs CSV {pairs!r} does not exist.")
        with table.open(newline="", encoding="utf-8-sig") as f:  # a byte-order mark is not part of the header
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
        if not {"moving", "fixed"} <= {h.strip() for h in header}:
            raise ValueError(
                f"pairs CSV {pairs!r} needs a header with columns moving,fixed[,moving_label], got {header[:4]}."
            )
        if not rows:
            raise ValueError(f"pairs CSV {pairs!r} has its header but no rows: no pairs to register.")
        out = []
        for line, r in enumerate(rows, start=2):
            empty = [k for k in ("moving", "fixed") if not (r.get(k) or "").strip()]
            if empty:
                raise ValueError(f"pairs CSV {pairs!r} line {line}: empty {' and '.join(empty)} cell.")
            pair = {k: str((table.parent / r[k].strip()).resolve()) for k in KEYS if (r.get(k) or "").strip()}
            if pair in out:
                raise ValueError(
                    f"pairs CSV {pairs!r} line {line} repeats line {out.index(pair) + 2}; list each pair once."
                )
            out.append(pair)
    elif moving and fixed:
        if Path(moving).is_dir():
            if moving_label:
                raise ValueError(
                    "--moving_label goes with one moving file, not a folder; give labels per pair with --pairs "
                    "pairs.csv (columns moving,fixed,moving_label)."
                )
            found = sorted(p for p in Path(moving).iterdir() if p.name.endswith(NIFTI) and p.is_file())
            skipped = [p.name for p in found if _is_label_file(p)]
            files = [str(p) for p in found if p.name not in skipped]
            if skipped and report:
                print(f"skipped {len(skipped)} label map(s) in {moving!r}: {', '.join(skipped)}", file=sys.stderr)
            if not files:
                raise FileNotFoundError(
                    f"moving folder {moving!r} holds no .nii/.nii.gz images"
                    + (f" (only label maps: {', '.join(skipped[:3])})." if skipped else ".")
                )
            out = [{"moving": m, "fixed": fixed} for m in files]
        else:
            out = [{"moving": moving, "fixed": fixed, **({"moving_label": moving_label} if moving_label else {})}]
    else:
        raise ValueError("give --moving and --fixed (files, or a folder of moving images), or --pairs pairs.csv.")
    for item in out:
        for key, path in item.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"{key} file {path!r} does not exist.")
    return out


def infer_spatial_dims(
    moving: Optional[str] = None,
    fixed: Optional[str] = None,
    pairs: Optional[str] = None,
    dataset_dir: Union[str, Path] = ".",
) -> int:
    """2 when the (first) fixed image is a single slice, 3 when it is a volume; 2 when there is no readable input
    yet (the errors about missing inputs come from :func:`list_pairs`)."""
    try:
        first = list_pairs(moving, fixed, None, pairs, dataset_dir, report=False)[0]["fixed"]
        return 3 if dims_of(nib.load(first).shape) >= 3 else 2
    except (ValueError, OSError, ImageFileError):  # reported with the file's name when the pairs are loaded
        return 2


def align_pair(out: dict, item: Dict[str, str], spatial_dims: int, similarity: str) -> dict:
    """The affine stage of one pair (``out``: its normalised images, ``item``: its files): its transform, the moving
    image resampled through it onto the fixed grid, the map from fixed to moving voxels and the similarities (see
    :class:`RegistrationPairs`)."""
    world = [nib.load(item[k]).affine for k in KEYS[:2]]
    frame = plane_frame(world[1]) if spatial_dims == 2 else None
    moving_affine, fixed_affine = (plane_affine(a, spatial_dims, frame) for a in world)
    moving, fixed = torch.as_tensor(out["moving"])[None].float(), torch.as_tensor(out["fixed"])[None].float()
    result = align_affine(moving, fixed, moving_affine, fixed_affine, similarity)
    matrix = torch.as_tensor(voxel_map(result.transform, moving_affine, fixed_affine))
    resampled = sample_at(moving, grid_coordinates(matrix, fixed.shape[2:]))[0]
    scores = torch.tensor([result.initial, result.centred, result.aligned], dtype=torch.float64)
    return {
        "moving": resampled,
        "moving_map": matrix,
        "affine": torch.as_tensor(world_transform(result.transform, frame)),
        "affine_lncc": scores,
    }


class RegistrationPairs(CohortShare, torch.utils.data.Dataset):
    """NIfTI pairs for inference: each item has ``moving`` and ``fixed`` ``(1, *S)`` read and normalised exactly as
    in training (:func:`~custom.data.transforms.pair_transforms`), the raw moving intensities ``moving_raw``,
    optional ``moving_label``, the file paths and the output ``name``.

    Construction does no I/O (errors surface when the run starts); :meth:`validate` checks every input.

    Args:
        pairs: a callable returning the pairs (e.g. ``lambda: list_pairs(...)``), called on first use.
        spatial_dims: the model's.
        resample: resample the moving image (linear) and label (nearest) onto the fixed image's grid with MONAI's
            ``ResampleToMatch`` when their geometry differs; otherwise a difference is an error.
        itk_geometry: require fixed affines that ITK can hold (no shear), for ITK-format fields.
        affine: run the affine stage (:func:`custom.affine.align_affine`) first: the moving image may be on any grid
            (no ``resample`` needed); ``moving`` is then the normalised moving image resampled through the affine
            onto the fixed grid, while ``moving_raw`` and ``moving_label`` stay on the moving grid, and
            ``moving_map`` (fixed voxels -> moving voxels), ``affine`` (fixed world -> moving world, RAS) and
            ``affine_lncc`` (similarity by world coordinates, after the centres of mass, after the stage) are added.
            Without it ``moving_map`` is the identity.
        similarity: the affine stage's similarity (``"lncc"`` or ``"mse"``).
        max_memory_gb: refuse a pair whose estimated peak memory (:func:`estimate_memory_gib`) exceeds this;
            default the memory available now.
        shard: ``[rank, size]``: register only this rank's share of the pairs (:func:`custom.cohort.shard`).
        stop_on_error: stop at the first pair that fails (its inputs, or its affine stage); otherwise it is reported
            (:attr:`failures`, the item's ``failed``) and the others go on.
    """

    def __init__(
        self,
        pairs: Callable[[], List[Dict[str, str]]],
        spatial_dims: int,
        resample: bool = False,
        itk_geometry: bool = False,
        max_memory_gb: Optional[float] = None,
        affine: bool = False,
        similarity: str = "lncc",
        shard: Optional[Sequence[int]] = None,
        stop_on_error: bool = False,
    ) -> None:
        if max_memory_gb is not None and not (isinstance(max_memory_gb, (int, float)) and max_memory_gb > 0):
            raise ValueError(f"max_memory_gb must be a number > 0 or null, got {max_memory_gb!r}.")
        super().__init__(pairs, output_names, shard, stop_on_error)
        self.max_memory_gb = max_memory_gb
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.resample = as_bool("resample", resample)
        self.itk_geometry = as_bool("itk_geometry", itk_geometry)
        self.affine = as_bool("affine", affine)
        self.similarity = similarity
        resample = self.resample and not self.affine  # the affine stage resamples through its transform
        self._transforms = {label: pair_transforms(self.spatial_dims, label, resample) for label in (False, True)}

    def validate(self) -> None:
        """Check every input of every pair of this process's share (:func:`custom.input_checks.check_pair`; see
        :meth:`custom.cohort.CohortShare.check`)."""
        self.check(
            lambda item: check_pair(
                item, self.spatial_dims, self.resample, self.affine, self.itk_geometry, self.max_memory_gb
            )
        )

    def __getitem__(self, i: int) -> dict:
        item, name = self.item(i)
        out = self._transforms["moving_label" in item](dict(item))
        out.update(moving_path=item["moving"], fixed_path=item["fixed"], label_path=item.get("moving_label", ""))
        out.update(moving_map=torch.eye(self.spatial_dims + 1, dtype=torch.float64), failed="")
        if self.affine:
            try:
                out.update(align_pair(out, item, self.spatial_dims, self.similarity))
            except ValueError as error:  # e.g. an implausible transform: this pair fails, the others go on
                if self.stop_on_error:
                    raise
                out["failed"] = str(error)
        return {**out, "name": name}
