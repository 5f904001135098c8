"""Registration accuracy against the peers a user would otherwise run, measured in one run.

``python -m custom accuracy`` trains the bundle on the given subjects for a wall-clock budget, trains MONAI's
``VoxelMorph`` with the same data, loss and budget, then registers held-out labelled pairs with: no
registration, the network, the network + test-time refinement (several step counts, the trade-off), refinement
alone from a zero field, MONAI's ``VoxelMorph``, and ANTs SyN through ``antspyx`` when it is installed
(``pip install -e ".[peers]"``; the row is skipped otherwise). The table gives Dice (mean ± sd over pairs),
the mean Dice of the worst 30% of labels, HD95, % folding, SDlogJ and seconds per pair.

Pairs: in 2D, slice ``z + offset`` (moving) to slice ``z`` (fixed) of each test subject (``intra_volume``); in
3D, test subjects to each other (``inter_subject``). Images are normalised as in training.
"""

import importlib.util
import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from custom.atomic import atomic_write_text
from custom.data.demo import ensure_dataset
from custom.data.frames import SubjectFrames
from custom.data.oasis import find_subjects
from custom.data.pairs import PairDataset
from custom.metrics import format_mean, jacobian_determinant, pair_metrics, summarize
from custom.networks import RegistrationNet
from custom.pretrained import pretrained_path
from custom.refine import RefineOptions, RefiningInferer
from custom.runner import as_list, bundle_dir, train_run
from custom.spatial import check_spatial_dims
from custom.warp import SpatialTransformer

__all__ = ["MonaiVoxelMorph", "aggregate", "ants_available", "ants_register", "run_accuracy", "to_markdown"]

VOLUME_SWEEP = ((60, 10, 0), (60, 20, 10), (60, 20, 20))
"""The refinement steps per level (a quarter, half and full resolution) tabulated in 3D besides the default."""
COLUMNS = ("dice", "dice30", "hd95", "folding", "min_det", "sdlogj", "seconds", "wall_s", "cpu_s", "peak_rss_gib")


class MonaiVoxelMorph(nn.Module):
    """MONAI's ``VoxelMorph`` (default backbone, ``integration_steps=7``) as a bundle ``network_def``: one
    ``(B, 2, *S)`` tensor in, the displacement out, so the bundle's trainer and inferer run it unchanged.

    Args:
        spatial_dims: 2 or 3.
        integration_steps: MONAI's default 7.
    """

    def __init__(self, spatial_dims: int, integration_steps: int = 7) -> None:
        super().__init__()
        from monai.networks.nets import VoxelMorph

        self.model = VoxelMorph(spatial_dims=check_spatial_dims(spatial_dims), integration_steps=integration_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, 2, H, W[, D])`` (moving, fixed), any size (zero-padded to MONAI's multiple of 16 and
        cropped back); returns ``(B, spatial_dims, H, W[, D])``."""
        sizes = x.shape[2:]
        pads = [p for n in reversed(sizes) for p in (0, -n % 16)]
        padded = F.pad(x, pads)
        ddf = self.model(padded[:, :1], padded[:, 1:])[1]
        return ddf[(slice(None), slice(None)) + tuple(slice(0, n) for n in sizes)]


def ants_available() -> bool:
    """Whether ``antspyx`` is installed."""
    return importlib.util.find_spec("ants") is not None


def _trained_model(models: Path) -> Path:
    """The best model (best validation score), or the last state when no validation ran within the budget."""
    best = models / "model.pt"
    return best if best.is_file() else models / "model_final.pt"


def _train(
    name: str, common: dict, out: Path, budget_minutes: float, network_def: Optional[dict] = None, reuse: bool = False
) -> Path:
    """Train with the bundle's ``train.json`` for ``budget_minutes`` of wall clock; the best model's path."""
    models = out / name / "models"
    if reuse and _trained_model(models).is_file():
        print(f"reusing the {name} model of an earlier run", flush=True)
        return _trained_model(models)
    overrides = {**common, "output_dir": str(out / name / "train"), "ckpt_dir": str(models)}
    if network_def:
        overrides["network_def"] = network_def
    record = train_run(overrides, budget_minutes)
    print(f"trained {name}: {record['epochs']} epochs in {record['train_s']:.0f} s", flush=True)
    return _trained_model(models)


def _linked_root(folder: Path, root: Path, subjects: Sequence[str]) -> Path:
    """A dataset root of links to some subjects of ``root`` (and a ``subjects.txt`` listing them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in subjects:
        link = folder / name
        if not link.exists():
            link.symlink_to((root / name).resolve(), target_is_directory=True)
    (folder / "subjects.txt").write_text("\n".join(subjects) + "\n")
    return folder


def _load(net: nn.Module, path: Path, device: torch.device) -> nn.Module:
    net.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    return net.to(device).eval()


def ants_register(moving: torch.Tensor, fixed: torch.Tensor, moving_label: torch.Tensor, transform: str, seed: int):
    """ANTs registration of a pair ``(1, *S)`` each: ``(warped label, Jacobian determinant of its deformable warp,
    seconds of the registration)``; ANTs' transform files are removed."""
    import ants

    f = ants.from_numpy(fixed[0].cpu().numpy().astype(np.float32))
    m = ants.from_numpy(moving[0].cpu().numpy().astype(np.float32))
    start = time.perf_counter()
    reg = ants.registration(fixed=f, moving=m, type_of_transform=transform, random_seed=seed)
    seconds = time.perf_counter() - start
    label = ants.from_numpy(moving_label[0].cpu().numpy().astype(np.float32))
    warped = ants.apply_transforms(f, label, reg["fwdtransforms"], interpolator="genericLabel")
    jac = torch.from_numpy(ants.create_jacobian_determinant_image(f, reg["fwdtransforms"][0]).numpy())
    for path in set(reg["fwdtransforms"] + reg["invtransforms"]):
        if os.path.exists(path):
            os.remove(path)
    return torch.from_numpy(warped.numpy()).round().to(moving_label.dtype), jac, seconds


def _network_method(net: nn.Module, inferer: RefiningInferer, device: torch.device):
    warp_labels = SpatialTransformer("nearest")

    def run(moving: torch.Tensor, fixed: torch.Tensor, moving_label: torch.Tensor):
        pair = torch.cat([moving, fixed])[None].to(device)
        start = time.perf_counter()
        with torch.no_grad():
            ddf = inferer(pair, net)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        ddf = ddf.float().cpu()
        return warp_labels(moving_label[None], ddf)[0, 0], jacobian_determinant(ddf)[0], seconds

    return run


def aggregate(rows: List[dict]) -> Dict[str, dict]:
    """Mean, sd and count over pairs of every column of :data:`COLUMNS` present in ``rows``."""
    return summarize(rows, COLUMNS)


def to_markdown(results: Dict[str, dict], volumes: bool = False) -> str:
    """The table of :func:`run_accuracy`'s results; ``volumes``: the 3D benchmark's columns (minimum
    determinant, wall and CPU seconds, peak RSS)."""
    if volumes:
        head = "| method | Dice | Dice worst 30% | HD95 (vox) | % folding | min det | SDlogJ | wall s | CPU s "
        head += "| peak RSS GiB |"
        cells = [("dice", 3, True), ("dice30", 3, False), ("hd95", 2, False), ("folding", 4, False)]
        cells += [("min_det", 2, False), ("sdlogj", 3, False), ("wall_s", 1, False), ("cpu_s", 1, False)]
        cells += [("peak_rss_gib", 2, False)]
    else:
        head = "| method | Dice | Dice worst 30% | HD95 (vox) | % folding | SDlogJ | s/pair |"
        cells = [("dice", 3, True), ("dice30", 3, False), ("hd95", 2, False), ("folding", 3, False)]
        cells += [("sdlogj", 3, False), ("seconds", 3, False)]
    lines = [head, "|---" + "|---:" * len(cells) + "|"]
    for name, s in results.items():
        lines.append(f"| {name} | " + " | ".join(format_mean(s, key, digits, sd) for key, digits, sd in cells) + " |")
    return "\n".join(lines)


def run_accuracy(
    dataset_dir: str = "data/demo",
    train_subjects: Union[str, Sequence[str]] = (),
    test_subjects: Union[str, Sequence[str]] = (),
    output_dir: str = "results/accuracy",
    spatial_dims: int = 2,
    variant: str = "both",
    image: str = "aligned_norm",
    label: str = "auto",
    offset: int = 4,
    max_pairs: int = 24,
    budget_minutes: float = 10.0,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    smooth_weight: float = 1.0,
    refine_steps: Union[str, Sequence[int], None] = None,
    refine_lr: float = 0.2,
    refine_smooth_weight: float = 1.0,
    default_refine_steps: int = 10,
    peers: Union[str, Sequence[str]] = ("monai", "ants"),
    ants_transform: str = "SyN",
    threads: int = 2,
    device: Optional[str] = None,
    seed: int = 0,
    pretrained: bool = True,
    reuse_models: bool = False,
    model_path: Optional[str] = None,
    pairs_per_subject: int = 2,
    max_displacement: float = 4.0,
) -> Path:
    """Train, register held-out pairs with every method, and write ``<output_dir>/accuracy.md`` and
    ``results.json``; prints the table.

    In 3D no network is trained: known-deformation pairs of the labelled subjects are registered back by the
    shipped (or ``model_path``) network alone and with refinement, refinement alone and ANTs SyN, each in a process
    of its own (:mod:`custom.accuracy_3d`); the options of the 2D training do not apply there.

    Args:
        dataset_dir: a neurite-OASIS-style root.
        train_subjects: subject folders to train on (comma-separated or a list); default every subject not
            tested.
        test_subjects: labelled subject folders to test on; default the last subject.
        output_dir: where models, the table and the per-pair results go.
        spatial_dims: 2 (slices) or 3 (volumes).
        variant: our network's variant.
        image: image file of each subject.
        label: label file of the test subjects, or ``"auto"`` (the finest they all have).
        offset: slice distance of the 2D pairs (moving ``z + offset`` to fixed ``z``).
        max_pairs: at most this many pairs, evenly spread over the available ones.
        budget_minutes: wall clock of each training run (ours and MONAI's), validation included.
        batch_size: training batch size.
        learning_rate: training learning rate.
        smooth_weight: training smoothness weight.
        refine_steps: refinement step counts to tabulate (comma-separated or a list); default 5,10,25,50 in 2D; in
            3D, where each may be one count per level, [[60,10,0],[60,20,10],[60,20,20]].
        refine_lr: refinement learning rate.
        refine_smooth_weight: refinement smoothness weight.
        default_refine_steps: the step count of the "refinement only, from zero" row.
        peers: any of ``monai`` and ``ants`` (comma-separated or a list).
        ants_transform: ``type_of_transform`` for ``ants.registration``.
        threads: CPU threads for every method.
        device: ``cpu`` or ``cuda``; default CUDA when available.
        seed: training and ANTs seed.
        pretrained: add the shipped pretrained model (synthetic data only, no training on these subjects), alone
            and with ``default_refine_steps`` of refinement, when the bundle has one for ``spatial_dims`` and
            ``variant``.
        reuse_models: use ``<output_dir>/<name>/models/model.pt`` of an earlier run instead of training again
            (the table then says so); the registrations and their timings are always measured anew.
        model_path: 3D: our network's weights (default the shipped pretrained model of ``variant``).
        pairs_per_subject: 3D: known deformations of each labelled test subject (default all labelled subjects).
        max_displacement: 3D: standard deviation of the known deformations' velocity, in voxels.

    Returns:
        The path of ``accuracy.md``.

    Raises:
        ValueError / FileNotFoundError: for bad options or data.
    """
    if check_spatial_dims(spatial_dims) == 3:
        from custom.accuracy_3d import run_volume_accuracy

        refine = {"lr": refine_lr, "smooth_weight": refine_smooth_weight}
        return run_volume_accuracy(
            dataset_dir,
            test_subjects,
            output_dir,
            variant,
            model_path,
            image,
            label,
            pairs_per_subject,
            max_displacement,
            VOLUME_SWEEP if refine_steps is None else refine_steps,
            refine,
            peers,
            threads,
            seed,
        )
    steps_list = [int(s) for s in as_list((5, 10, 25, 50) if refine_steps is None else refine_steps)]
    for steps in steps_list + [default_refine_steps]:
        RefineOptions(steps, refine_lr, refine_smooth_weight)
    peers = as_list(peers)
    unknown = [p for p in peers if p not in ("monai", "ants")]
    if unknown:
        raise ValueError(f"peers must be among ['monai', 'ants'], got {unknown}.")
    if budget_minutes <= 0 or max_pairs < 1:
        raise ValueError(f"budget_minutes must be > 0 and max_pairs >= 1, got {budget_minutes} and {max_pairs}.")
    torch.set_num_threads(threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)  # read when ANTs starts
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root, out = Path(ensure_dataset(dataset_dir)), Path(output_dir)
    every = [s["subject"] for s in find_subjects(root, image, None)]
    tests = as_list(test_subjects) or every[-1:]
    trains = as_list(train_subjects) or [s for s in every if s not in tests]
    missing = [s for s in trains + tests if s not in every]
    if missing or set(trains) & set(tests) or not trains:
        raise ValueError(
            f"train and test subjects must be disjoint, non-empty subjects of {str(root)!r} (have {every}); "
            f"got train={trains}, test={tests}."
        )

    # the training root links to the training subjects only, so nothing of the test subjects is seen
    train_root = _linked_root(out / "train_data", root, trains)
    common = {
        "dataset_dir": str(train_root),
        "spatial_dims": spatial_dims,
        "variant": variant,
        "image": image,
        "label": None,
        "num_val": 0,
        "num_test": 0,
        "batch_size": batch_size,
        "epochs": 1_000_000,  # the wall-clock budget ends the run
        "learning_rate": learning_rate,
        "smooth_weight": smooth_weight,
        "seed": seed,
        "device": f"$torch.device('{dev}')",
        "validate#dataset": "$custom.data.build_pair_dataset(split='all', **@dataset_options)",
    }

    # the test pairs, normalised as in training
    test_items = find_subjects(_linked_root(out / "test_data", root, tests), image, label)
    if not test_items or "label" not in test_items[0]:
        raise ValueError(f"the test subjects {tests} need a label map (label={label!r} found none common to them).")
    strategy = "intra_volume" if spatial_dims == 2 else "inter_subject"
    dataset = PairDataset(SubjectFrames(test_items, spatial_dims), strategy, seed, offset=offset)
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(max_pairs, len(dataset))).round().astype(int))
    pairs = [dataset[int(i)] for i in picks]
    print(f"{len(pairs)} test pairs from {tests}; training on {trains}", flush=True)

    ours = _load(
        RegistrationNet(spatial_dims, variant), _train("ours", common, out, budget_minutes, None, reuse_models), dev
    )
    methods: Dict[str, Callable] = {"identity (no registration)": None}
    methods[f"ours ({variant})"] = _network_method(ours, RefiningInferer(0), dev)
    for steps in steps_list:
        inferer = RefiningInferer(steps, refine_lr, refine_smooth_weight)
        methods[f"ours + refine {steps} steps"] = _network_method(ours, inferer, dev)
    default = RefiningInferer(default_refine_steps, refine_lr, refine_smooth_weight)
    methods[f"refine {default_refine_steps} steps from zero (no network)"] = _network_method(_ZeroField(), default, dev)
    if pretrained:
        try:
            shipped = pretrained_path(bundle_dir(), spatial_dims, variant)
        except FileNotFoundError as error:
            print(f"pretrained rows skipped: {error}", flush=True)
        else:
            net = _load(RegistrationNet(spatial_dims, variant), Path(shipped), dev)
            methods["pretrained, synthetic data only (no training here)"] = _network_method(
                net, RefiningInferer(0), dev
            )
            methods[f"pretrained + refine {default_refine_steps} steps"] = _network_method(net, default, dev)
    if "monai" in peers:
        network_def = {"_target_": "custom.accuracy.MonaiVoxelMorph", "spatial_dims": "@spatial_dims"}
        path = _train("monai", common, out, budget_minutes, network_def, reuse_models)
        monai_net = _load(MonaiVoxelMorph(spatial_dims), path, dev)
        methods["MONAI VoxelMorph (same data and budget)"] = _network_method(monai_net, RefiningInferer(0), dev)
    if "ants" in peers:
        if ants_available():
            methods[f"ANTs {ants_transform} (antspyx)"] = partial(ants_register, transform=ants_transform, seed=seed)
        else:
            print('ANTs row skipped: antspyx is not installed (pip install -e ".[peers]")', flush=True)

    results: Dict[str, dict] = {}
    per_pair: Dict[str, List[dict]] = {}
    for name, method in methods.items():
        rows = []
        for item in pairs:
            moving_label, fixed_label = item["moving_label"], item["fixed_label"]
            if method is None:
                warped_label, det, seconds = moving_label[0], torch.ones(moving_label.shape[1:]), 0.0
            else:
                warped_label, det, seconds = method(item["moving"], item["fixed"], moving_label)
            row = {**pair_metrics(warped_label.reshape(fixed_label[0].shape), fixed_label[0], det), "seconds": seconds}
            rows.append({"moving": item["moving_id"], "fixed": item["fixed_id"], **row})
        per_pair[name] = rows
        results[name] = aggregate(rows)
        print(f"{name}: Dice {format_mean(results[name], 'dice', 3, sd=True)}", flush=True)

    table = to_markdown(results)
    trained = "models of an earlier run" if reuse_models else f"{budget_minutes:g} min each"
    header = (
        f"# Accuracy: {len(pairs)} pairs of {tests}, trained on {trains} ({trained})\n\n"
        f"{spatial_dims}D, {strategy} pairs (offset {offset}); Dice over the labels of either map, mean ± sd over "
        f"pairs; worst 30%: the mean of each pair's lowest 30% label Dice; HD95 mean over labels, in voxels.\n\n"
    )
    print(table, flush=True)
    report = out / "accuracy.md"
    atomic_write_text(report, header + table + "\n")
    atomic_write_text(out / "results.json", json.dumps({"summary": results, "pairs": per_pair}, indent=4) + "\n")
    return report


class _ZeroField(nn.Module):
    """A "network" that predicts no displacement: refinement from zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], x.dim() - 2, *x.shape[2:])
