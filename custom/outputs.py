"""What ``register`` (the inference config) writes for each pair: the warped image, the field, the warped label, the
Jacobian map and ``pairs_out.csv`` (the file names are described in :mod:`custom.inference`)."""

import csv
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Union

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events

from custom.affine import grid_coordinates, grid_record, write_itk_affine
from custom.atomic import SIGNATURE, atomic_write_text, check_replaceable
from custom.errors import as_bool
from custom.inference import KEYS, RegistrationPairs
from custom.interop import DDF_FORMATS, field_suffix, write_field
from custom.losses import LocalNCCLoss
from custom.metrics import jacobian_determinant
from custom.warp import SpatialTransformer, sample_at
from custom.workflow import decollated

__all__ = ["AFFINE_MIN_LNCC", "IMPROVEMENT", "RegistrationWriter"]

AFFINE_MIN_LNCC = 0.15
"""Below this LNCC (window 5 at 1/4 resolution, :mod:`custom.affine`) after the affine stage a pair is flagged: real
brains of different subjects reach 0.25-0.3 there, unrelated images stay near 0."""

IMPROVEMENT = 1e-3
"""A pair whose LNCC rises by no more than this is flagged (a warning line and ``pairs_out.csv``'s ``warning``)."""


def _warn(name: str, problem: str) -> None:
    """One warning line on stderr for a pair that registered poorly."""
    print(f"warning: {name}: {problem}: check that the two images show the same anatomy and overlap.", file=sys.stderr)


class RegistrationWriter:
    """Evaluator handler writing the warped image, the field and the warped label of each pair, and
    ``pairs_out.csv`` at the end (see the module docstring); prints each pair's files and its LNCC (window 9, on the
    normalised images) before and after registration.

    A pair's files are written to temporary names and renamed together once all are written, so an interrupted run
    leaves complete pairs only. :meth:`validate` (called by :func:`custom.runner.run_or_exit` before any work)
    checks that the folder is writable and holds none of this run's outputs unless ``overwrite``.

    Args:
        output_dir: output folder (created).
        ddf_format: ``"itk"`` (ITK/ANTs/Slicer displacement field, LPS mm, see :mod:`custom.interop`) or
            ``"voxel"`` (our own ``(*S, spatial_dims)`` voxel layout).
        jacobian: also write ``<name>_jacobian.nii.gz``, the field's Jacobian determinant (``<= 0`` where it folds).
        overwrite: replace outputs of an earlier run of the same pairs in ``output_dir``.

    Raises:
        ValueError: for an unknown ``ddf_format``.
    """

    def __init__(
        self, output_dir: Union[str, Path], ddf_format: str = "itk", jacobian: bool = False, overwrite: bool = False
    ) -> None:
        if ddf_format not in DDF_FORMATS:
            raise ValueError(f"ddf_format must be one of {DDF_FORMATS}, got {ddf_format!r}.")
        self.output_dir = Path(output_dir)
        self.ddf_format = ddf_format
        self.jacobian = as_bool("jacobian", jacobian)
        self.overwrite = as_bool("overwrite", overwrite)
        self.warp = SpatialTransformer("bilinear")
        self.written: List[str] = []
        self._lncc: Dict[int, LocalNCCLoss] = {}  # per spatial_dims, built once
        self.rows: List[Dict[str, str]] = []

    def attach(self, engine: Engine) -> None:
        """Attach to an Ignite engine."""
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._write_table)

    def _outputs(self, name: str, spatial_dims: int, label: bool, affine: bool = False) -> Dict[str, Path]:
        suffixes = {"warped": "_warped.nii.gz", "ddf": f"_ddf{field_suffix(spatial_dims, self.ddf_format)}"}
        suffixes.update({"warped_label": "_warped_label.nii.gz"} if label else {})
        suffixes.update({"jacobian": "_jacobian.nii.gz"} if self.jacobian else {})
        suffixes.update({"affine": "_affine.txt"} if affine else {})
        return {key: self.output_dir / f"{name}{suffix}" for key, suffix in suffixes.items()}

    def validate(self, dataset: RegistrationPairs) -> None:
        """Before any work: the output folder can be written, and holds none of the outputs of ``dataset``'s pairs
        (nor ``pairs_out.csv``) unless ``overwrite``.

        Raises:
            ValueError: for a folder that cannot be created or written, or an existing file of an output's name that
                we did not write (never replaced, :func:`~custom.atomic.check_replaceable`).
            FileExistsError: for outputs of an earlier run.
        """
        folder = next((p for p in [self.output_dir, *self.output_dir.parents] if p.exists()), Path("."))
        try:  # a real write: permission bits say nothing for root, a read-only mount or a full disk
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise ValueError(
                f"cannot write to the output folder {str(self.output_dir)!r}: {str(folder)!r} is not a writable "
                f"folder ({error.strerror or error})."
            ) from None
        paths = [self.output_dir / "pairs_out.csv"]
        for item, name in zip(dataset.pairs, dataset.names):
            paths += self._outputs(name, dataset.spatial_dims, "moving_label" in item, dataset.affine).values()
        check_replaceable(paths)
        existing = [p.name for p in paths if p.exists()]
        if existing and not self.overwrite:
            raise FileExistsError(
                f"{str(self.output_dir)!r} already holds outputs of these pairs ({', '.join(existing[:3])}"
                f"{', ...' if len(existing) > 3 else ''}); pass --overwrite True to replace them, or give another "
                "--output_dir."
            )

    def _image(self, array: torch.Tensor, reference: nib.Nifti1Image, dtype) -> nib.Nifti1Image:
        header = reference.header.copy()
        header["descrip"] = SIGNATURE.encode()
        header.set_data_dtype(dtype)
        return nib.Nifti1Image(array.numpy().astype(dtype).reshape(reference.shape), reference.affine, header)

    def _write_pair(self, item: dict, ddf: torch.Tensor) -> Dict[str, str]:
        """Write one pair's files under temporary names, then rename them all; returns its ``pairs_out.csv`` row.

        The moving image (in its own intensities) and label map are sampled once, on their own grid, through the
        composed transform: the affine stage's map (the identity without it) after the field."""
        fixed = nib.load(item["fixed_path"])
        paths = self._outputs(item["name"], ddf.shape[1], "moving_label" in item, "affine" in item)
        with torch.no_grad():
            coords = grid_coordinates(torch.as_tensor(item["moving_map"]), ddf.shape[2:], ddf)
            raw = torch.as_tensor(item["moving_raw"])[None].float()
            images = {"warped": self._image(sample_at(raw, coords)[0, 0], fixed, np.float32)}
            if "moving_label" in item:
                label = sample_at(torch.as_tensor(item["moving_label"])[None], coords, "nearest")[0, 0]
                images["warped_label"] = self._image(label, fixed, np.int32)
            if self.jacobian:
                images["jacobian"] = self._image(jacobian_determinant(ddf)[0], fixed, np.float32)
        staged = {}
        try:
            for key, path in paths.items():
                suffix = next(x for x in (".mha", ".txt", ".nii.gz") if path.name.endswith(x))
                staged[key] = self.output_dir / f".{path.name}.{os.getpid()}.part{suffix}"
                if key == "ddf":
                    write_field(ddf[0], fixed, staged[key], self.ddf_format)
                elif key == "affine":
                    moving = nib.load(item["moving_path"])
                    grids = (grid_record(img.shape, img.affine) for img in (moving, fixed))
                    write_itk_affine(staged[key], np.asarray(item["affine"]), *grids)
                else:
                    nib.save(images[key], str(staged[key]))
            for key, path in paths.items():
                os.replace(staged[key], path)
        finally:
            for tmp in staged.values():
                if tmp.exists():
                    tmp.unlink()
        self.written += [str(p) for p in paths.values()]
        row = {"moving": item["moving_path"], "fixed": item["fixed_path"], "moving_label": item["label_path"]}
        return {
            **row,
            **{key: paths[key].name if key in paths else "" for key in ("warped", "ddf", "warped_label", "affine")},
            **({"jacobian": paths["jacobian"].name} if self.jacobian else {}),
        }

    def __call__(self, engine: Engine) -> None:
        items, outputs = decollated(engine)
        for item, output in zip(items, outputs):
            ddf = torch.as_tensor(output["pred"]).float()[None].cpu()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            scores, warnings, summary = self._scores(item, ddf)
            row = {**self._write_pair(item, ddf), **scores, "warning": "; ".join(warnings)}
            files = ", ".join(row[k] for k in ("warped", "ddf", "warped_label", "affine", "jacobian") if row.get(k))
            print(f"{item['name']}: {summary}; wrote {files} in {self.output_dir}", flush=True)
            for warning in warnings:
                _warn(item["name"], f"{warning}; the outputs are written but are likely no registration")
            self.rows.append(row)

    def _scores(self, item: dict, ddf: torch.Tensor):
        """A pair's ``pairs_out.csv`` similarity columns, its warnings and the summary printed: the affine stage's
        LNCC (window 5 at the pyramid's finest level) before and after it, and the LNCC (window 9, normalised images
        on the fixed grid, after the affine stage) before and after the deformable stage."""
        moving, fixed = (torch.as_tensor(item[k])[None].float().cpu() for k in ("moving", "fixed"))
        with torch.no_grad():
            if ddf.shape[1] not in self._lncc:
                self._lncc[ddf.shape[1]] = LocalNCCLoss(ddf.shape[1])
            lncc = self._lncc[ddf.shape[1]]
            before, after = -float(lncc(moving, fixed)), -float(lncc(self.warp(moving, ddf), fixed))
        scores, warnings, summary = {}, [], f"LNCC {before:.3f} -> {after:.3f}"
        if "affine_lncc" in item:
            initial, _, aligned = (float(v) for v in item["affine_lncc"])
            scores.update(affine_lncc_initial=f"{initial:.4f}", affine_lncc_after=f"{aligned:.4f}")
            summary = f"affine stage LNCC {initial:.3f} -> {aligned:.3f}; {summary}"
            if aligned < AFFINE_MIN_LNCC:
                warnings.append(
                    f"after the affine stage the images barely match (LNCC {aligned:.3f} < {AFFINE_MIN_LNCC})"
                )
        scores.update(lncc_before=f"{before:.4f}", lncc_after=f"{after:.4f}")
        if after <= before + IMPROVEMENT:
            warnings.append(f"LNCC did not improve ({before:.3f} -> {after:.3f})")
        return scores, warnings, summary

    def _write_table(self, engine: Engine) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(self.rows[0]) if self.rows else KEYS)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.output_dir / "pairs_out.csv", buffer.getvalue())
