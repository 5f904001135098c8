"""3D registration accuracy on known deformations, against ANTs SyN, measured in one run.

``python -m custom accuracy --spatial_dims 3`` takes the labelled subjects of a dataset, pulls each image and label
map into another space by random smooth diffeomorphisms of inter-subject size
(:func:`custom.data.known_deformation_pairs`) and registers every deformed scan back to its original with: no
registration, the network alone (the shipped pretrained model, or ``model_path``), the network + refinement at
the default and at a sweep of steps, refinement alone from a zero field, and ANTs SyN through ``antspyx`` when it
is installed. Each method runs in a process of its own, one pair at a time, so its peak resident memory (RSS) and
its CPU seconds (every thread of the process) are its own; CPU seconds are the fairer figure on a shared machine.

The table gives Dice over every label (mean ± sd over pairs), the worst 30% of labels, HD95, % folding (Jacobian
determinant <= 0), the minimum determinant, SDlogJ, wall and CPU seconds per pair and peak RSS.
"""

import json
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from custom.accuracy_report import VOLUME_SWEEP, aggregate, pair_row, write_report
from custom.accuracy_subjects import run_subject_pairs
from custom.data.demo import ensure_dataset
from custom.data.frames import SubjectFrames
from custom.data.oasis import find_subjects, resolve_label
from custom.data.synth import known_deformation_pairs
from custom.methods import ants_available, ants_register
from custom.metrics import jacobian_determinant
from custom.networks import RegistrationNet
from custom.peers import PEER_TOOLS, check_peer_names
from custom.refine import DEFAULTS, RefineOptions, RefiningInferer
from custom.runner import as_list
from custom.warp import SpatialTransformer

__all__ = ["run_volume_accuracy"]


def _register_network(spec: dict, moving: torch.Tensor, fixed: torch.Tensor, moving_label: torch.Tensor):
    """Our network (+ refinement) in the child process: (warped label, Jacobian determinant)."""
    net = RegistrationNet(3, spec["variant"])
    if spec["model_path"]:
        net.load_state_dict(torch.load(spec["model_path"], map_location="cpu", weights_only=True))
    else:  # a network predicting zero: refinement from zero
        torch.nn.init.zeros_(net.flow.weight)
        torch.nn.init.zeros_(net.flow.bias)
    inferer = RefiningInferer(**spec["refine"])
    with torch.no_grad():
        ddf = inferer(torch.cat([moving, fixed])[None], net.eval())
        return SpatialTransformer("nearest")(moving_label[None].float(), ddf)[0, 0], jacobian_determinant(ddf)[0]


def _register_ants(spec: dict, moving: torch.Tensor, fixed: torch.Tensor, moving_label: torch.Tensor):
    """ANTs in the child process: (warped label, Jacobian determinant of its forward transform)."""
    warped, det, _ = ants_register(moving, fixed, moving_label, spec["transform"], spec["seed"])
    return warped, det


def _run_in_process(what: str, target: Callable, *args) -> None:
    """Run ``target(*args)`` in a fresh (spawned) process, so its memory and CPU time are its own.

    Raises:
        RuntimeError: naming ``what`` when the process fails.
    """
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{what} failed (process exit code {process.exitcode}).")


def _peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _child(spec: dict, pair_files: List[str], out_dir: str, threads: int) -> None:
    """Register every pair with one method (in a fresh process); write per pair the warped label, the determinant
    and the wall and CPU seconds of the registration alone, and the process's peak RSS."""
    torch.set_num_threads(threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    register = _register_ants if spec["kind"] == "ants" else _register_network
    timings = []
    for i, path in enumerate(pair_files):
        item = torch.load(path, weights_only=True)
        wall, cpu = time.perf_counter(), time.process_time()
        warped, det = register(spec, item["moving"], item["fixed"], item["moving_label"])
        timings.append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu})
        torch.save({"warped_label": warped.to(torch.int32), "det": det.float()}, Path(out_dir) / f"{i}.pt")
        del item, warped, det
    (Path(out_dir) / "timings.json").write_text(json.dumps({"pairs": timings, "peak_rss_gib": _peak_rss_gib()}))


def _run_method(spec: dict, pair_files: List[str], work: Path, threads: int) -> dict:
    """Run ``_child`` in a spawned process; its per-pair outputs and peak RSS."""
    out = Path(tempfile.mkdtemp(dir=work))
    _run_in_process(f"the {spec['kind']} registration process", _child, spec, pair_files, str(out), threads)
    record = json.loads((out / "timings.json").read_text())
    record["outputs"] = [torch.load(out / f"{i}.pt", weights_only=True) for i in range(len(pair_files))]
    return record


def _methods(model_path: Optional[str], variant: str, steps: Sequence[int], options: dict, peers: Sequence[str], seed):
    """The rows to measure: name -> the child's spec (None: no registration)."""
    network = {"kind": "network", "variant": variant, "model_path": model_path}
    default = list(DEFAULTS[3]["steps"])
    methods: Dict[str, Optional[dict]] = {"identity (no registration)": None}
    methods[f"network alone ({variant})"] = {**network, "refine": {**options, "steps": 0}}
    methods[f"network + refine, default ({default} steps)"] = {**network, "refine": options}
    for n in steps:
        methods[f"network + refine {list(n) if isinstance(n, tuple) else n} steps"] = {
            **network,
            "refine": {**options, "steps": n},
        }
    methods["refine from zero, default (no network)"] = {**network, "model_path": None, "refine": options}
    if "ants" in peers:
        if ants_available():
            methods["ANTs SyN (antspyx defaults)"] = {"kind": "ants", "transform": "SyN", "seed": seed}
        else:
            print('ANTs row skipped: antspyx is not installed (pip install -e ".[peers]")', flush=True)
    return methods


def _pairs(root: str, subjects: Sequence[str], image: str, label: str, count: int, displacement, seed):
    """Known-deformation pairs of ``subjects`` of the dataset ``root`` (default the last subject with a label map),
    each with its own label map (``label``, or for ``"auto"`` the finest it has)."""
    root = Path(root)
    every = find_subjects(root, image, None)
    names = [s["subject"] for s in every]
    missing = [s for s in subjects if s not in names]
    if missing:
        raise ValueError(f"test subjects {missing} are not subjects of {str(root)!r} (have {names}).")
    labelled = []
    for item in every:
        if subjects and item["subject"] not in subjects:
            continue
        found = resolve_label([root / item["subject"]], label, image)
        if found and (root / item["subject"] / f"{found}.nii.gz").is_file():
            labelled.append({**item, "label": str(root / item["subject"] / f"{found}.nii.gz")})
        elif subjects:
            raise ValueError(f"test subject {item['subject']!r} has no label map (label={label!r}).")
    if not labelled:
        raise ValueError(
            f"no subject of {str(root)!r} has a label map (label={label!r}): the 3D benchmark deforms a labelled "
            "scan and registers it back."
        )
    labelled = labelled if subjects else labelled[-1:]
    frames = SubjectFrames(labelled, 3)
    pairs = []
    for i, subject in enumerate(labelled):
        frame = frames[i]
        pairs += known_deformation_pairs(
            frame["image"], frame["label"], count, displacement, seed + 100 * i, subject["subject"]
        )
    return pairs


def run_volume_accuracy(
    dataset_dir: str = "data/demo",
    test_subjects: Union[str, Sequence[str]] = (),
    output_dir: str = "results/accuracy_3d",
    variant: str = "both",
    model_path: Optional[str] = None,
    image: str = "aligned_norm",
    label: str = "auto",
    pairs_per_subject: int = 2,
    max_displacement: float = 4.0,
    refine_steps: Union[str, Sequence] = VOLUME_SWEEP,
    refine_options: Optional[dict] = None,
    peers: Union[str, Sequence[str]] = ("ants",),
    threads: int = 2,
    seed: int = 0,
    subject_pairs: int = 3,
    subject_rows: Union[str, Sequence[str]] = ("affine", "network", "defaults", "accurate"),
    pair_subjects: Union[str, Sequence[str]] = (),
    peer_envs: str = ".peers",
) -> Path:
    """The 3D benchmark: write ``<output_dir>/accuracy.md`` and ``results.json`` and print the table.

    Args: as :func:`custom.accuracy.run_accuracy` (``model_path``: our network's weights, default the shipped
        pretrained model; ``refine_options``: the other :class:`~custom.refine.RefineOptions`).

    Returns:
        The path of ``accuracy.md``.
    """
    from custom.pretrained import pretrained_path
    from custom.runner import bundle_dir

    check_peer_names(as_list(peers), ("monai", "ants", *PEER_TOOLS))
    if pairs_per_subject < 0 or subject_pairs < 0 or not max_displacement > 0:
        raise ValueError(
            f"pairs_per_subject and subject_pairs must be >= 0 and max_displacement > 0, got {pairs_per_subject}, "
            f"{subject_pairs} and {max_displacement}."
        )
    steps = [tuple(int(n) for n in s) if isinstance(s, (list, tuple)) else int(s) for s in as_list(refine_steps)]
    options = {k: v for k, v in (refine_options or {}).items() if v is not None}
    for n in steps:
        RefineOptions(**{**options, "steps": n}).for_dims(3)
    given_model, model_path = model_path, model_path or pretrained_path(bundle_dir(), 3, variant)
    known, root = pairs_per_subject > 0, ensure_dataset(dataset_dir)  # checked before anything is written
    pairs = (
        _pairs(root, as_list(test_subjects), image, label, pairs_per_subject, max_displacement, seed) if known else []
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, per_pair, header = {}, {}, f"# 3D accuracy on {dataset_dir}\n\n{LEGEND.format(threads=threads)}\n\n"
    with tempfile.TemporaryDirectory(dir=out) as work:
        if known:
            methods = _methods(model_path, variant, steps, options, as_list(peers), seed)
            results, per_pair = _known_deformations(pairs, methods, Path(work), threads)
            header += (
                f"## Known deformations: {len(pairs)} pairs (velocity std {max_displacement} voxels) of the labelled "
                "subjects\n\n"
            )
        sections = run_subject_pairs(
            root,
            subject_pairs,
            "auto",
            as_list(peers),
            threads,
            seed,
            Path(work),
            as_list(pair_subjects),
            as_list(subject_rows),
            given_model,
            peer_envs,
        )
    return write_report(out, header, results, per_pair, volumes=True, sections=sections)


LEGEND = (
    "Dice over every label, mean ± sd over pairs; worst 30%: the mean of each pair's lowest 30% label Dice; HD95 in "
    "voxels; % folding, min det and SDlogJ of the Jacobian determinant of the deformable transform; wall and CPU "
    "seconds per pair and the peak RSS of the method's process ({threads} threads): of the registration alone for "
    "known deformations, of the whole tool (imports, reading and writing files) for real subject pairs."
)


def _known_deformations(pairs: List[dict], methods: Dict[str, Optional[dict]], work: Path, threads: int):
    """Register the known-deformation pairs with every method (one process each): ``(summaries, rows)``."""
    print(f"{len(pairs)} known-deformation pairs of shape {list(pairs[0]['fixed'].shape[1:])}", flush=True)
    results, per_pair, files = {}, {}, []
    for i, item in enumerate(pairs):
        files.append(str(work / f"pair{i}.pt"))
        torch.save({k: item[k] for k in ("moving", "fixed", "moving_label")}, files[-1])
    for name, spec in methods.items():
        record = _run_method(spec, files, work, threads) if spec else None
        per_pair[name] = [_row(item, record, i) for i, item in enumerate(pairs)]
        results[name] = aggregate(per_pair[name])
        print(f"{name}: {json.dumps({k: round(v['mean'], 4) for k, v in results[name].items()})}", flush=True)
    return results, per_pair


def _row(item: dict, record: Optional[dict], i: int) -> dict:
    """Pair ``i``'s row: no registration without a ``record``, else the method's outputs, timings and peak RSS."""
    if record is None:
        return pair_row(item)
    output = record["outputs"][i]
    timing = {**record["pairs"][i], "peak_rss_gib": record["peak_rss_gib"]}
    return pair_row(item, output["warped_label"], output["det"], **timing)
