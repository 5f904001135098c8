"""Training at the scale of the neurite-OASIS release: start-up time and peak memory per ``cache`` mode.

``python -m custom scale`` builds a neurite-OASIS-shaped root of 414 subjects (symbolic links to the files of a
few generated 160x192x224 subjects, or of the subjects of ``--source``), then runs the bundle's training
(``epochs 1``, a few iterations, no validation pass, though the validation split is loaded as usual) for each
of ``spatial_dims``, ``cache`` mode (``memory``, ``disk`` with an empty cache, ``disk`` with the cache the
previous run wrote, ``none``) and process count (one process, and ``torchrun --nproc_per_node=2``). Each run
is its own process tree; it reports:

- start-up: seconds from launch until the first training iteration starts (imports, discovery, decoding or
  reading the cache, building the networks), i.e. the time of the first epoch summary minus the epoch's time;
- peak memory: the largest sum over the run's processes (ranks, their data-loader workers) of their proportional
  set size (PSS: shared pages counted once), sampled every 0.2 s; and the anonymous part of it (RAM that cannot
  be given back, unlike the memory-mapped, file-backed disk cache pages).

Runs are sequential (two timed jobs on one machine disturb each other); the table is printed and written to
``output_dir/scale.md``.
"""

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from custom.atomic import atomic_write_text
from custom.benchmark import machine_description
from custom.data.demo import make_demo
from custom.data.oasis import IMAGE_FILES, LABEL_FILES
from custom.runner import as_list, bundle_dir

__all__ = ["link_release", "process_tree_memory", "run_scale", "SCALE_MODES"]

RELEASE_SUBJECTS = 414
RELEASE_SHAPE = (160, 192, 224)
SCALE_MODES = ("memory", "disk-cold", "disk-warm", "none")
BATCH = {2: 8, 3: 1}  # the bundle's 2D default; one volume per step in 3D, as the docs' 3D command
GIB = 1024**3


def link_release(root: Union[str, Path], source: Union[str, Path], num_subjects: int = RELEASE_SUBJECTS) -> Path:
    """A neurite-OASIS-shaped root of ``num_subjects`` folders ``OASIS_OAS1_<i>_MR1/`` whose files are symbolic
    links to the image and label files of ``source``'s subjects, taken in turn.

    A label file that only some source subjects have is linked into every folder (it stands in for the
    release's ``aligned_seg35``: same grid and decoding cost), so that ``label: auto`` finds labels everywhere.

    Args:
        root: the folder to create (must not exist or be empty).
        source: a neurite-OASIS-style root with at least one subject folder.
        num_subjects: how many subject folders.

    Returns:
        ``root``.

    Raises:
        FileNotFoundError: ``source`` has no subject folder with an image file.
        FileExistsError: ``root`` exists and is not empty.
    """
    root, source = Path(root), Path(source).resolve()
    names = [f"{n}.nii.gz" for n in IMAGE_FILES + LABEL_FILES]
    samples = sorted(p for p in source.iterdir() if p.is_dir() and (p / names[0]).is_file()) if source.is_dir() else []
    if not samples:
        raise FileNotFoundError(f"{str(source)!r} has no subject folder with {names[0]} to link.")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{str(root)!r} exists and is not empty; give a new folder.")
    labels = {
        n: next(s / n for s in samples if (s / n).is_file())
        for n in names[len(IMAGE_FILES) :]
        if any((s / n).is_file() for s in samples)
    }
    for i in range(num_subjects):
        sample = samples[i % len(samples)]
        folder = root / f"OASIS_OAS1_{i + 1:04d}_MR1"
        folder.mkdir(parents=True)
        for name in names:
            target = sample / name if (sample / name).is_file() else labels.get(name)
            if target is not None:
                (folder / name).symlink_to(target)
    return root


def _children(pid: int) -> List[int]:
    out: List[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def process_tree_memory(pid: int) -> Dict[str, int]:
    """Bytes of ``pid`` and all its descendants: summed ``Pss`` and ``Pss_Anon`` (Linux ``smaps_rollup``)."""
    total = {"pss": 0, "anon": 0}
    stack = [pid]
    while stack:
        p = stack.pop()
        stack += _children(p)
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue  # the process ended meanwhile
        for key, field in (("pss", "Pss:"), ("anon", "Pss_Anon:")):
            match = re.search(rf"^{field}\s+(\d+) kB", text, re.M)
            total[key] += int(match.group(1)) * 1024 if match else 0
    return total


def _run(cmd: List[str], env: dict, log: Path) -> dict:
    """Run one training; returns wall time, start-up, peak PSS / anonymous memory and the exit status."""
    peak = {"pss": 0, "anon": 0}
    lines: List[tuple] = []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def sample():
        while proc.poll() is None:
            mem = process_tree_memory(proc.pid)
            for k in peak:
                peak[k] = max(peak[k], mem[k])
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        lines.append((time.perf_counter() - start, line))
    proc.wait()
    sampler.join()
    wall = time.perf_counter() - start
    atomic_write_text(log, "".join(f"[{t:8.1f}] {line}" for t, line in lines))
    startup = None
    for t, line in lines:
        match = re.search(r"epoch 1/\d+: train_loss \S+, ([\d.]+) s", line)
        if match:
            startup = t - float(match.group(1))
            break
    return {"rc": proc.returncode, "wall_s": wall, "startup_s": startup, "pss": peak["pss"], "anon": peak["anon"]}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def run_scale(
    output_dir: str = "runs/scale",
    source: Optional[str] = None,
    subjects: int = RELEASE_SUBJECTS,
    spatial_dims: Union[int, str, Sequence[int]] = "2,3",
    modes: Union[str, Sequence[str]] = ",".join(SCALE_MODES),
    ranks: Union[int, str, Sequence[int]] = "1,2",
    epoch_length: int = 2,
    num_workers: int = 2,
    keep_cache: bool = False,
) -> str:
    """Measure start-up time and peak memory of training on a release-sized root (see the module docstring).

    Args:
        output_dir: where the linked root, the disk caches, the runs' logs and ``scale.md`` go.
        source: a neurite-OASIS-style root whose subjects are linked (e.g. ``../shared/data/oasis_real``);
            default three generated 160x192x224 subjects (``output_dir/generated``).
        subjects: subject folders in the linked root.
        spatial_dims: ``2``, ``3`` or ``"2,3"``.
        modes: a subset of ``memory,disk-cold,disk-warm,none`` (``disk-warm`` reuses the cache ``disk-cold`` wrote).
        ranks: process counts, e.g. ``"1,2"`` (``torchrun --nproc_per_node``).
        epoch_length: training iterations of the single epoch.
        num_workers: the bundle's ``num_workers`` (decoding at start-up and the training loader).
        keep_cache: keep the disk caches (gigabytes) after the runs.

    Returns:
        The markdown table.

    Raises:
        ValueError: an unknown mode, dimensionality or process count.
    """
    dims, mode_list, rank_list = _check_scale_options(spatial_dims, modes, ranks)
    out = Path(output_dir)
    if source is None:
        source = str(out / "generated")
        if not (out / "generated").is_dir():
            make_demo(out / "generated", num_subjects=3, shape=RELEASE_SHAPE)
    root = out / f"release_{subjects}"
    if not root.is_dir():
        link_release(root, source, subjects)
    rows = []
    for nd in dims:
        cache_dir = out / f"cache_{nd}d"
        for nproc in rank_list:
            for mode in mode_list:
                if mode == "disk-cold":
                    shutil.rmtree(cache_dir, ignore_errors=True)
                rows.append(_scale_run(out, root, cache_dir, nd, mode, nproc, epoch_length, num_workers))
        if not keep_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
    header = (
        f"## Training start-up and peak memory, {subjects} subjects ({'x'.join(map(str, RELEASE_SHAPE))}), "
        f"epoch_length {epoch_length}, batch {BATCH[2]} (2D) / {BATCH[3]} (3D), num_workers {num_workers}\n\n"
        f"Machine: {machine_description()}; "
        f"source of the linked files: {Path(source).name}.\n\n"
        "| dims | cache | processes | start-up s | wall s | peak memory GiB (PSS) | of which anonymous GiB "
        "| disk cache MiB | exit |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    table = "\n".join([header] + [_row(r) for r in rows]) + "\n"
    print(table)
    atomic_write_text(out / "scale.md", table)
    return table


def _check_scale_options(spatial_dims, modes, ranks) -> Tuple[List[int], List[str], List[int]]:
    """The dimensionalities, cache modes and process counts as lists, checked before any work.

    Raises:
        ValueError: an unknown mode, dimensionality or process count.
    """
    dims, mode_list, rank_list = (
        [int(d) for d in as_list(spatial_dims)],
        as_list(modes),
        [int(r) for r in as_list(ranks)],
    )
    for name, values, allowed in (("spatial_dims", dims, (2, 3)), ("modes", mode_list, SCALE_MODES)):
        if not values or any(v not in allowed for v in values):
            raise ValueError(f"{name} must be a subset of {allowed}, got {values!r}.")
    if not rank_list or min(rank_list) < 1:
        raise ValueError(f"ranks must be process counts >= 1, got {rank_list!r}.")
    return dims, mode_list, rank_list


def _scale_run(out: Path, root: Path, cache_dir: Path, nd: int, mode: str, nproc: int, epoch_length, workers) -> dict:
    """One training run (``nproc`` processes, ``torchrun`` when more than one) of ``root`` with one cache mode: its
    start-up, wall time, peak memory and disk cache size, printed as a table row."""
    name, cache, configs = f"{nd}d_{mode}_{nproc}rank", mode.split("-")[0], bundle_dir() / "configs"
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    files = [str(configs / "train.json")] + ([str(configs / "multi_gpu_train.json")] if nproc > 1 else [])
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = (launcher or [sys.executable]) + ["-m", "monai.bundle", "run", "training", "--config_file", repr(files)]
    cmd += ["--bundle_root", str(bundle_dir()), "--dataset_dir", str(root), "--spatial_dims", str(nd)]
    cmd += ["--output_dir", str(run_dir), "--ckpt_dir", str(run_dir / "models"), "--cache", cache]
    cmd += ["--cache_dir", str(cache_dir), "--num_workers", str(workers), "--epochs", "1"]
    cmd += ["--epoch_length", str(epoch_length), "--val_interval", "2", "--batch_size", str(BATCH[nd])]
    print(f"{name}: running", flush=True)
    result = _run(cmd, dict(os.environ, PYTHONWARNINGS="ignore"), out / "logs" / f"{name}.log")
    cache_mib = _folder_bytes(cache_dir) / 2**20 if cache == "disk" else 0.0
    result.update(spatial_dims=nd, mode=mode, ranks=nproc, cache_mib=cache_mib)
    print(f"{name}: {_row(result)}", flush=True)
    return result


def _row(r: dict) -> str:
    startup = f"{r['startup_s']:.0f}" if r["startup_s"] is not None else "n/a"
    return (
        f"| {r['spatial_dims']}D | {r['mode']} | {r['ranks']} | {startup} | {r['wall_s']:.0f} | {r['pss'] / GIB:.2f} | "
        f"{r['anon'] / GIB:.2f} | {r['cache_mib']:.1f} | {r['rc']} |"
    )
