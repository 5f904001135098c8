"""3D registration of real, different subjects from their files, each tool run whole, as a user runs it.

Part of ``python -m custom accuracy --spatial_dims 3`` (:mod:`custom.accuracy_3d`). Pairs of different subjects of
a neurite-OASIS-style folder (``--subject_pairs``, disjoint where the subjects allow: 1 -> 2, 3 -> 4, ...), each
moving scan registered to the next subject's ``aligned_norm``, in two sections:

- ``aligned -> aligned``: the moving ``aligned_norm`` (both scans in the release's common space);
- ``native -> aligned``: the moving ``norm``, the scan in its own (native) space: its own grid, orientation and
  field of view, as users have their scans.

Rows: no registration (the moving labels resampled by world coordinates), our affine stage alone
(``register --deformable False``), the network alone after it (``register --refine_steps 0``), ``register``'s
defaults and its accurate setting (:data:`ACCURATE`), ANTs SyN (``antspyx`` defaults: its own affine stage,
then SyN) when it is installed, and in the aligned section the peer tools of :mod:`custom.peers` (FireANTs,
ConvexAdam, elastix) whose environments exist; then the targets (:func:`targets`), each met or not. Every
registration runs in a fresh process from the files: CPU seconds are the whole process's (imports, reading and
writing included), wall seconds from its start to its end, and its peak resident memory (RSS). The warped label
map each tool wrote (``<label>`` of the moving subject: ``seg35``, ``aligned_seg35``), or the moving labels warped
here by the displacement a peer tool wrote, is scored against the fixed subject's ``aligned_<label>`` with the
Jacobian determinant of the tool's deformable transform.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch

from custom.accuracy_report import aggregate, pair_row
from custom.affine import grid_coordinates, voxel_map
from custom.methods import ants_available
from custom.metrics import jacobian_determinant
from custom.peers import PEER_ROWS, PEER_TOOLS, RUNNER, peer_python
from custom.pretrained import trained_subjects
from custom.runner import bundle_dir
from custom.warp import SpatialTransformer, sample_at

__all__ = ["ROW_KEYS", "SECTIONS", "find_subject_pairs", "run_subject_pairs", "targets"]

ALIGNED = "aligned -> aligned"
SECTIONS = {ALIGNED: ("aligned_norm", "aligned_{}"), "native -> aligned": ("norm", "{}")}
"""Each section's moving image and label file (``{}``: the label, e.g. ``seg35``); the fixed ones are always
``aligned_norm`` and ``aligned_<label>``."""
LABELS = ("seg35", "seg4")
"""``label="auto"``: the finest of these that both subjects of every pair have."""
ACCURATE = ["--refine_steps", "[100,40,20]", "--refine_downsample", "1", "--refine_smooth_weight", "0.5"]
"""The accurate setting: more steps, a full-resolution field, half the smoothness penalty."""
DEFAULTS_ROW, ACCURATE_ROW = "ours, register defaults", f"ours, accurate ({' '.join(ACCURATE)})"
NO_REGISTRATION_ROW, ANTS_ROW = "no registration (world coordinates)", "ANTs SyN (antspyx defaults)"
OURS = {
    "ours, affine stage alone": ["--deformable", "False"],
    "ours, network alone (after the affine stage)": ["--refine_steps", "0"],
    DEFAULTS_ROW: [],
    ACCURATE_ROW: ACCURATE,
}
"""Our rows: ``python -m custom register`` with these options (and ``--jacobian True``)."""
ROW_KEYS = dict(zip(("affine", "network", "defaults", "accurate"), OURS))
"""The short names of our rows (``--subject_rows``)."""
MAX_FOLDING_PERCENT, MAX_RSS_GIB, MIN_ACCURATE_GAIN = 0.01, 2.0, 0.02
"""The targets :func:`targets` checks: % folding voxels on every pair, peak RSS of every run, the accurate
setting's Dice over the defaults'."""


def _fixed_files(folder: Path, label: str) -> Tuple[Path, Path]:
    """A subject's files as the fixed side of a pair: ``aligned_norm`` and ``aligned_<label>``."""
    return folder / "aligned_norm.nii.gz", folder / f"aligned_{label}.nii.gz"


def find_subject_pairs(
    root: str, count: int, label: str = "auto", subjects: Sequence[str] = ()
) -> Dict[str, List[dict]]:
    """The pairs of each section (:data:`SECTIONS`) that ``root``'s subjects allow.

    Args:
        root: a neurite-OASIS-style folder.
        count: pairs per section at most: subject ``2i`` to subject ``2i + 1`` of the sorted subjects (then
            ``2i + 1`` to ``2i + 2``, ... when there are too few for disjoint pairs).
        label: the label map's name without ``aligned_`` (``seg35``), or ``"auto"`` (:data:`LABELS`).
        subjects: only these subject folders (e.g. subjects held out from training); default every one.

    Returns:
        Section name -> pairs with ``moving``, ``moving_label``, ``fixed``, ``fixed_label`` (paths) and
        ``moving_id``, ``fixed_id``; a section without any pair is left out.

    Raises:
        ValueError: for a named subject that is not a folder of ``root``.
    """
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir())
    unknown = sorted(set(subjects) - {f.name for f in folders})
    if unknown:
        raise ValueError(f"subjects {unknown} are not folders of {root!r} (have {[f.name for f in folders][:6]}).")
    folders = [f for f in folders if f.name in subjects] if subjects else folders
    for name in LABELS if label == "auto" else (label,):
        labelled = [f for f in folders if all(path.is_file() for path in _fixed_files(f, name))]
        if len(labelled) >= 2:
            break
    else:
        return {}
    n = len(labelled)
    order = [(2 * i % n, (2 * i + 1) % n) for i in range(n // 2)] + [(i, (i + 1) % n) for i in range(1, n, 2)]
    sections: Dict[str, List[dict]] = {}
    for section, (image, moving_label) in SECTIONS.items():
        pairs = []
        for m, f in order:
            moving = labelled[m] / f"{image}.nii.gz"
            labels = labelled[m] / f"{moving_label.format(name)}.nii.gz"
            if len(pairs) < count and moving.is_file() and labels.is_file():
                fixed, fixed_label = _fixed_files(labelled[f], name)
                pairs.append(
                    {
                        "moving": str(moving),
                        "moving_label": str(labels),
                        "fixed": str(fixed),
                        "fixed_label": str(fixed_label),
                        "moving_id": labelled[m].name,
                        "fixed_id": labelled[f].name,
                    }
                )
        if pairs:
            sections[section] = pairs
    return sections


def _command(kind: str, options: List[str], pair: dict, out: Path) -> List[str]:
    """The command line of one registration, writing into ``out``."""
    if kind == "peer":
        python, tool, settings = options
        return [python, "-P", str(RUNNER), tool, pair["moving"], pair["fixed"], str(out), settings]
    if kind == "ants":
        run = "import sys; from custom.methods import ants_register_files as run; run(*sys.argv[1:])"
        return [sys.executable, "-c", run, pair["moving"], pair["fixed"], pair["moving_label"], str(out), *options]
    args = ["--moving", pair["moving"], "--fixed", pair["fixed"], "--moving_label", pair["moving_label"]]
    return [sys.executable, "-m", "custom", "register", *args, "--output_dir", str(out), "--jacobian", "True", *options]


def _run(kind: str, options: List[str], pair: dict, item: dict, work: Path, threads: int) -> dict:
    """One registration of ``pair`` (``item``: its :func:`_labels`) as a process of its own: the pair's row, with
    the process's CPU seconds (every thread), wall seconds and peak RSS."""
    out = Path(tempfile.mkdtemp(dir=work))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)}
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        process = subprocess.Popen(_command(kind, options, pair, out), stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        tail = (out / "log.txt").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the {kind} registration of {pair['moving']} failed (exit {process.returncode}):\n{tail}")
    warped, det = _outputs(out, item["moving_label"])
    shutil.rmtree(out)
    timing = {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gib": usage.ru_maxrss / 2**20}
    return pair_row(item, warped.round().long(), det, **timing)


def _outputs(out: Path, moving_label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(warped label map, Jacobian determinant)`` of a finished registration: the ones the tool wrote, or for a
    peer's ``displacement.nii.gz`` (:mod:`custom.peer_run`) ``moving_label`` ``(1, *S)`` warped by it (nearest) and
    its determinant, both computed here as for every peer."""
    field = out / "displacement.nii.gz"
    if field.is_file():
        image = nib.load(field)
        ddf = torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32)).permute(3, 0, 1, 2)[None]
        warped = SpatialTransformer("nearest")(moving_label[None].float(), ddf)[0, 0]
        return warped, jacobian_determinant(ddf)[0]
    found = {
        key: sorted(out.glob(f"*{suffix}"))
        for key, suffix in (("label", "warped_label.nii.gz"), ("det", "jacobian.nii.gz"))
    }
    return tuple(_load(nib.load(found[key][0])) for key in ("label", "det"))


def _load(image: nib.Nifti1Image) -> torch.Tensor:
    """A volume (the first three axes of the file) as float32."""
    return torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32).reshape(image.shape[:3]))


def _labels(pair: dict) -> dict:
    """The pair as :func:`~custom.accuracy_report.pair_row` takes it, the fixed labels read; the moving labels
    resampled by world coordinates onto the fixed grid (nearest): the row of no registration."""
    moving, fixed = nib.load(pair["moving_label"]), nib.load(pair["fixed_label"])
    matrix = torch.as_tensor(voxel_map(np.eye(4), moving.affine, fixed.affine))
    resampled = sample_at(_load(moving)[None, None], grid_coordinates(matrix, fixed.shape[:3]), "nearest")[0].long()
    return {**pair, "moving_label": resampled, "fixed_label": _load(fixed).long()[None]}


def _worst(rows: List[dict], key: str) -> float:
    return max(row[key] for row in rows)


def targets(summary: Dict[str, dict], per_pair: Dict[str, List[dict]]) -> List[str]:
    """The section's targets, each a line saying met or not met with the values measured: ``register``'s
    defaults above every other tool's Dice, at most :data:`MAX_FOLDING_PERCENT` % folding voxels on every pair, at
    most half of ANTs SyN's CPU seconds, at most :data:`MAX_RSS_GIB` of peak RSS; the accurate setting at least
    :data:`MIN_ACCURATE_GAIN` Dice above the defaults and as fold-free.

    Args:
        summary: row name -> its :func:`~custom.accuracy_report.aggregate` over the pairs.
        per_pair: row name -> its rows, one per pair.
    """
    if DEFAULTS_ROW not in per_pair:
        return []
    mean = {name: {k: v["mean"] for k, v in columns.items()} for name, columns in summary.items()}
    ours, folds = mean[DEFAULTS_ROW], _worst(per_pair[DEFAULTS_ROW], "nonpositive_percent")
    rss = _worst(per_pair[DEFAULTS_ROW], "peak_rss_gib")
    checks = []
    peers = {name: m["dice_mean"] for name, m in mean.items() if name not in (*OURS, NO_REGISTRATION_ROW)}
    if peers:
        best = max(peers, key=peers.get)
        text = f"Dice of the defaults {ours['dice_mean']:.3f} > every peer's (best: {best}, {peers[best]:.3f})"
        checks.append((ours["dice_mean"] > peers[best], text))
    text = f"folding of the defaults <= {MAX_FOLDING_PERCENT}% on every pair (worst {folds:.4f}%)"
    checks.append((folds <= MAX_FOLDING_PERCENT, text))
    checks.append((rss <= MAX_RSS_GIB, f"peak RSS of the defaults <= {MAX_RSS_GIB} GiB (worst {rss:.2f})"))
    if ANTS_ROW in mean:
        ants = mean[ANTS_ROW]["cpu_s"]
        text = f"CPU of the defaults <= half of ANTs SyN's ({ours['cpu_s']:.1f} s against {ants:.1f})"
        checks.append((ours["cpu_s"] <= ants / 2, text))
    if ACCURATE_ROW in mean:
        gain = mean[ACCURATE_ROW]["dice_mean"] - ours["dice_mean"]
        worst = _worst(per_pair[ACCURATE_ROW], "nonpositive_percent")
        text = f"{ACCURATE_ROW}: Dice >= the defaults' + {MIN_ACCURATE_GAIN} (+{gain:.3f}), folding <= "
        text += f"{MAX_FOLDING_PERCENT}% (worst {worst:.4f}%)"
        checks.append((gain >= MIN_ACCURATE_GAIN and worst <= MAX_FOLDING_PERCENT, text))
    return [f"- {'met' if ok else 'NOT MET'}: {text}" for ok, text in checks]


def _rows(
    peers: Sequence[str],
    seed: int,
    ours: Sequence[str] = tuple(ROW_KEYS),
    model_path: Optional[str] = None,
    peer_envs: str = ".peers",
) -> Dict[str, Optional[tuple]]:
    """The methods: name -> (kind, options), None for no registration; the peer tools' rows (:data:`PEER_ROWS`)
    with the Python of their environments under ``peer_envs``, skipped with the reason when one is absent.

    Raises:
        ValueError: for an unknown short name in ``ours``.
    """
    unknown = sorted(set(ours) - set(ROW_KEYS))
    if unknown:
        raise ValueError(f"subject_rows must be among {list(ROW_KEYS)}, got {unknown}.")
    model = ["--model_path", str(model_path)] if model_path else []
    rows: Dict[str, Optional[tuple]] = {NO_REGISTRATION_ROW: None}
    rows.update({ROW_KEYS[key]: ("ours", OURS[ROW_KEYS[key]] + model) for key in ROW_KEYS if key in ours})
    if "ants" in peers:
        if ants_available():
            rows[ANTS_ROW] = ("ants", ["SyN", str(seed)])
        else:
            print('ANTs row skipped: antspyx is not installed (pip install -e ".[peers]")', flush=True)
    for tool in (t for t in PEER_TOOLS if t in peers):
        python, why = peer_python(peer_envs, tool)
        if python is None:
            print(f"{tool} rows skipped: {why}", flush=True)
            continue
        for name, (row_tool, settings) in PEER_ROWS.items():
            if row_tool == tool:
                rows[name] = ("peer", [str(python), tool, json.dumps(settings)])
    return rows


def _section_rows(rows: Dict[str, Optional[tuple]], section: str) -> Dict[str, Optional[tuple]]:
    """The rows of one section: the peer tools' (one grid only) in the aligned section alone."""
    if section == ALIGNED:
        return rows
    peers = [name for name, method in rows.items() if method and method[0] == "peer"]
    if peers:
        print(f"  not run in this section (they take images on one grid): {', '.join(peers)}", flush=True)
    return {name: method for name, method in rows.items() if name not in peers}


def run_subject_pairs(
    root: str,
    count: int,
    label: str,
    peers: Sequence[str],
    threads: int,
    seed: int,
    work: Path,
    subjects: Sequence[str] = (),
    ours: Sequence[str] = tuple(ROW_KEYS),
    model_path: Optional[str] = None,
    peer_envs: str = ".peers",
) -> Dict[str, dict]:
    """Register the pairs of every section (:func:`find_subject_pairs` of ``subjects``) with every method, one
    process each: our rows ``ours`` (short names, :data:`ROW_KEYS`) with ``model_path`` (default the shipped model),
    ANTs SyN and the peer tools in ``peers`` (their environments under ``peer_envs``; they take images on one grid,
    so they run in the aligned section only).

    Returns:
        Section name -> ``{"summary": method -> summary, "pairs": method -> rows}``; empty when ``root``'s subjects
        give no pair.
    """
    rows = _rows(peers, seed, ours, model_path, peer_envs)
    sections = find_subject_pairs(root, count, label, subjects)
    if not sections:
        print(f"no real subject pairs: {root} has fewer than 2 subjects with aligned_norm and a label map", flush=True)
    trained = set() if model_path else set(trained_subjects(bundle_dir(), 3, "both"))
    results = {}
    for section, pairs in sections.items():
        names = ", ".join(f"{p['moving_id']} -> {p['fixed_id']}" for p in pairs)
        print(f"{section}: {len(pairs)} pairs of real subjects ({names})", flush=True)
        seen = [f"{p['moving_id']} -> {p['fixed_id']}" for p in pairs if {p["moving_id"], p["fixed_id"]} & trained]
        if seen:
            print(f"  note: not held out from the shipped 3D model's training: {', '.join(seen)}", flush=True)
        items, per_pair, summaries = [_labels(pair) for pair in pairs], {}, {}
        for name, method in _section_rows(rows, section).items():
            per_pair[name] = [
                _run(*method, pair, item, work, threads) if method else pair_row(item)
                for pair, item in zip(pairs, items)
            ]
            summaries[name] = aggregate(per_pair[name])
            print(f"  {name}: {json.dumps({k: round(v['mean'], 4) for k, v in summaries[name].items()})}", flush=True)
        results[section] = {"summary": summaries, "pairs": per_pair, "targets": targets(summaries, per_pair)}
        if seen:
            results[section]["not_held_out"] = seen
    return results
