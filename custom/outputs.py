"""What ``register`` (the inference config) writes for each pair: the warped image, the field, the warped label, the
Jacobian map and ``pairs_out.csv`` (the file names are described in :mod:`custom.inference`)."""

import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events

from custom.affine import grid_coordinates, grid_record, write_itk_affine
from custom.atomic import SIGNATURE, atomic_paths, check_replaceable, check_writable
from custom.cohort import FILE_COLUMNS, barrier, conclude, finished_rows, rank_and_size, save_row, start_rows
from custom.errors import as_bool
from custom.inference import RegistrationPairs
from custom.interop import DDF_FORMATS, field_suffix, write_field
from custom.losses import LocalNCCLoss
from custom.metrics import jacobian_determinant
from custom.refine import SLAB_VOXELS
from custom.spatial import slabs
from custom.warp import SpatialTransformer, sample_at
from custom.workflow import decollated

__all__ = ["AFFINE_MIN_LNCC", "IMPROVEMENT", "RegistrationWriter", "check_outputs", "output_paths", "write_pair"]

AFFINE_MIN_LNCC = 0.15
"""Below this LNCC (window 5 at 1/4 resolution, :mod:`custom.affine`) after the affine stage a pair is flagged: real
brains of different subjects reach 0.25-0.3 there, unrelated images stay near 0."""

_WARP = SpatialTransformer("bilinear")

IMPROVEMENT = 1e-3
"""A pair whose LNCC rises by no more than this is flagged (a warning line and ``pairs_out.csv``'s ``warning``)."""


def _image(array: torch.Tensor, reference: nib.Nifti1Image, dtype) -> nib.Nifti1Image:
    """``array`` as a NIfTI image of ``reference``'s grid and header, with our signature."""
    header = reference.header.copy()
    header["descrip"] = SIGNATURE.encode()
    header.set_data_dtype(dtype)
    return nib.Nifti1Image(array.numpy().astype(dtype).reshape(reference.shape), reference.affine, header)


def _warped_image(key: str, item: dict, ddf: torch.Tensor, coords: torch.Tensor, fixed: nib.Nifti1Image):
    """One image output of a pair on the fixed grid: ``warped`` (the moving image in its own intensities) or
    ``warped_label``, sampled once, on the moving grid, at ``coords`` (the composed transform: the affine stage's map,
    the identity without it, after the field); or ``jacobian``, the field's determinant."""
    with torch.no_grad():
        if key == "jacobian":
            return _image(jacobian_determinant(ddf)[0], fixed, np.float32)
        if key == "warped_label":
            return _image(
                sample_at(torch.as_tensor(item["moving_label"])[None], coords, "nearest")[0, 0], fixed, np.int32
            )
        return _image(sample_at(torch.as_tensor(item["moving_raw"])[None].float(), coords)[0, 0], fixed, np.float32)


def check_outputs(output_dir: Path, paths: List[Path], overwrite: bool) -> None:
    """Before any work: ``output_dir`` can be written, and none of ``paths`` exists unless ``overwrite`` (and then
    only files we wrote, :func:`~custom.atomic.check_replaceable`).

    Raises:
        ValueError: for a folder that cannot be written, or an existing file we did not write.
        FileExistsError: for outputs of an earlier run.
    """
    check_writable(output_dir)
    check_replaceable(paths)
    existing = [p.name for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{str(output_dir)!r} already holds outputs of these pairs ({', '.join(existing[:3])}"
            f"{', ...' if len(existing) > 3 else ''}); pass --overwrite True to replace them, or give another "
            "--output_dir."
        )


def output_paths(
    output_dir: Path, ddf_format: str, jacobian: bool, name: str, spatial_dims: int, label: bool, affine: bool
) -> Dict[str, Path]:
    """The output files of the pair ``name`` (see :mod:`custom.inference`), by their ``pairs_out.csv`` column."""
    suffixes = {"warped": "_warped.nii.gz", "ddf": f"_ddf{field_suffix(spatial_dims, ddf_format)}"}
    suffixes.update({"warped_label": "_warped_label.nii.gz"} if label else {})
    suffixes.update({"jacobian": "_jacobian.nii.gz"} if jacobian else {})
    suffixes.update({"affine": "_affine.txt"} if affine else {})
    return {key: Path(output_dir) / f"{name}{suffix}" for key, suffix in suffixes.items()}


def write_pair(item: dict, ddf: torch.Tensor, paths: Dict[str, Path], ddf_format: str) -> None:
    """Write one pair's files (:func:`_warped_image`, the field, the affine) to ``paths`` under temporary names, then
    rename them all (:func:`~custom.atomic.atomic_paths`)."""
    fixed = nib.load(item["fixed_path"])
    with torch.no_grad():
        coords = grid_coordinates(torch.as_tensor(item["moving_map"]), ddf.shape[2:], ddf)
    with atomic_paths(paths) as staged:
        for key in paths:
            if key == "ddf":
                write_field(ddf[0], fixed, staged[key], ddf_format)
            elif key == "affine":
                moving = nib.load(item["moving_path"])
                grids = (grid_record(img.shape, img.affine) for img in (moving, fixed))
                planar = len(fixed.shape) == 2  # a 2-D file, which ITK reads in the world x-y plane
                write_itk_affine(staged[key], np.asarray(item["affine"]), *grids, planar=planar)
            else:  # one image at a time: a 3D pair's outputs are never all in memory at once
                nib.save(_warped_image(key, item, ddf, coords, fixed), str(staged[key]))


def _warn(name: str, problem: str) -> None:
    """One warning line on stderr for a pair that registered poorly."""
    print(f"warning: {name}: {problem}: check that the two images show the same anatomy and overlap.", file=sys.stderr)


def _mean_lncc(moving: torch.Tensor, fixed: torch.Tensor, ddf: Optional[torch.Tensor], lncc: LocalNCCLoss) -> float:
    """The mean LNCC of ``moving`` warped by ``ddf`` (``None``: as it is) and ``fixed``, slab by slab along the last
    axis (exact, since LNCC is local; ``lncc`` has ``reduction="none"``), so a 3D pair's score needs little memory."""
    depth, total = fixed.shape[-1], 0.0
    with torch.no_grad():
        for first, last, low, high in slabs(depth, SLAB_VOXELS * depth // fixed.numel(), lncc.kernel_size // 2):
            warped = moving[..., low:high] if ddf is None else _WARP(moving, ddf[..., low:high], low)
            total += float(lncc(warped, fixed[..., low:high])[..., first - low : last - low].sum())
    return -total / fixed.numel()


def _scores(item: dict, ddf: torch.Tensor, lncc: LocalNCCLoss):
    """A pair's ``pairs_out.csv`` similarity columns, its warnings and the summary printed: the affine stage's
    LNCC (window 5 at the pyramid's finest level) before and after it, and ``lncc`` (window 9, normalised images
    on the fixed grid, after the affine stage) before and after the deformable stage."""
    moving, fixed = (torch.as_tensor(item[k])[None].float().cpu() for k in ("moving", "fixed"))
    before, after = _mean_lncc(moving, fixed, None, lncc), _mean_lncc(moving, fixed, ddf, lncc)
    scores, warnings, summary = {}, [], f"LNCC {before:.3f} -> {after:.3f}"
    if "affine_lncc" in item:
        initial, _, aligned = (float(v) for v in item["affine_lncc"])
        scores.update(affine_lncc_initial=f"{initial:.4f}", affine_lncc_after=f"{aligned:.4f}")
        summary = f"affine stage LNCC {initial:.3f} -> {aligned:.3f}; {summary}"
        if aligned < AFFINE_MIN_LNCC:
            warnings.append(f"after the affine stage the images barely match (LNCC {aligned:.3f} < {AFFINE_MIN_LNCC})")
    scores.update(lncc_before=f"{before:.4f}", lncc_after=f"{after:.4f}")
    if after <= before + IMPROVEMENT:
        warnings.append(f"LNCC did not improve ({before:.3f} -> {after:.3f})")
    return scores, warnings, summary


class RegistrationWriter:
    """Evaluator handler writing the warped image, the field and the warped label of each pair, and
    ``pairs_out.csv`` at the end (see the module docstring); prints a progress line per pair (its number, seconds,
    files and LNCC, window 9 on the normalised images, before and after registration) and a summary at the end.

    A pair's files are written to temporary names and renamed together once all are written, then its row is saved
    (:mod:`custom.cohort`), so an interrupted run leaves complete pairs only, and ``resume`` skips them. A pair that
    fails (its inputs, its affine stage) is reported and the others go on. :meth:`validate` (called by
    :func:`custom.runner.run_or_exit` before any work) checks that the folder is writable and holds none of this
    run's outputs unless ``overwrite`` (or ``resume``, for pairs that are not finished).

    Args:
        output_dir: output folder (created).
        ddf_format: ``"itk"`` (ITK/ANTs/Slicer displacement field, LPS mm, see :mod:`custom.interop`) or
            ``"voxel"`` (our own ``(*S, spatial_dims)`` voxel layout).
        jacobian: also write ``<name>_jacobian.nii.gz``, the field's Jacobian determinant (``<= 0`` where it folds).
        overwrite: replace outputs of an earlier run of the same pairs in ``output_dir``.
        resume: continue an interrupted run in ``output_dir``: pairs it finished (:func:`~custom.cohort.finished_rows`)
            are skipped, the others done (their leftover files replaced).

    Raises:
        ValueError: for an unknown ``ddf_format``.
    """

    def __init__(
        self,
        output_dir: Union[str, Path],
        ddf_format: str = "itk",
        jacobian: bool = False,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        if ddf_format not in DDF_FORMATS:
            raise ValueError(f"ddf_format must be one of {DDF_FORMATS}, got {ddf_format!r}.")
        self.output_dir = Path(output_dir)
        self.ddf_format = ddf_format
        self.jacobian = as_bool("jacobian", jacobian)
        self.overwrite, self.resume = as_bool("overwrite", overwrite), as_bool("resume", resume)
        self._lncc: Dict[int, LocalNCCLoss] = {}  # per spatial_dims, built once
        self.dataset: Optional[RegistrationPairs] = None
        self.failures: Dict[str, str] = {}
        self._clock = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        """Attach to an Ignite engine."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.finish())

    def _paths(self, name: str, spatial_dims: int, label: bool, affine: bool) -> Dict[str, Path]:
        return output_paths(self.output_dir, self.ddf_format, self.jacobian, name, spatial_dims, label, affine)

    def validate(self, dataset: RegistrationPairs) -> None:
        """Before any work: with ``resume``, leave out (and record as skipped) the pairs an earlier run finished;
        :func:`check_outputs` of every output of the other pairs and ``pairs_out.csv``; then record the pairs whose
        inputs were refused (:attr:`RegistrationPairs.failures`)."""
        self.dataset, self.failures = dataset, dict(dataset.failures)
        finished = finished_rows(self.output_dir, dataset.names) if self.resume else {}
        dataset.drop(list(finished))
        paths = [self.output_dir / "pairs_out.csv"]
        for item, name in zip(dataset.pairs, dataset.names):
            paths += self._paths(name, dataset.spatial_dims, "moving_label" in item, dataset.affine).values()
        check_outputs(self.output_dir, paths, self.overwrite or self.resume)
        start_rows(self.output_dir, dataset, finished, self.resume)
        self._clock = time.perf_counter()

    def __call__(self, engine: Engine) -> None:
        items, outputs = decollated(engine)
        rank, size = rank_and_size()
        for item, output in zip(items, outputs):
            ddf = torch.as_tensor(output["pred"]).float()[None].cpu()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            row = self.dataset.pair_row(item["name"]) if self.dataset else {"name": item["name"]}
            if item.get("failed"):
                self.failures[item["name"]] = item["failed"]
                save_row(self.output_dir, item["name"], {**row, "status": "failed", "warning": item["failed"]})
                print(f"warning: {item['name']}: failed: {item['failed']}", file=sys.stderr)
                continue
            dims = ddf.shape[1]
            self._lncc[dims] = self._lncc.get(dims) or LocalNCCLoss(dims, reduction="none")
            scores, warnings, summary = _scores(item, ddf, self._lncc[dims])
            paths = self._paths(item["name"], ddf.shape[1], "moving_label" in item, "affine" in item)
            write_pair(item, ddf, paths, self.ddf_format)
            row.update({key: paths[key].name if key in paths else "" for key in FILE_COLUMNS if key != "jacobian"})
            row.update(**({"jacobian": paths["jacobian"].name} if self.jacobian else {}), **scores)
            row.update(status="registered", warning="; ".join(warnings))
            save_row(self.output_dir, item["name"], row)
            files = ", ".join(row[k] for k in FILE_COLUMNS if row.get(k))
            seconds, self._clock = time.perf_counter() - self._clock, time.perf_counter()
            count = f"{engine.state.iteration}/{engine.state.epoch_length}" + (f" on rank {rank}" if size > 1 else "")
            print(
                f"[{count}] {item['name']}: {seconds:.1f} s, {summary}; wrote {files} in {self.output_dir}", flush=True
            )
            for warning in warnings:
                _warn(item["name"], f"{warning}; the outputs are written but are likely no registration")

    def finish(self) -> None:
        """After every rank's last pair: rank 0 writes ``pairs_out.csv`` and prints the summary
        (:func:`~custom.cohort.conclude`)."""
        barrier()
        if rank_and_size()[0] == 0 and self.dataset is not None:
            self.failures.update(conclude(self.output_dir, self.dataset.all_names))
        barrier()
