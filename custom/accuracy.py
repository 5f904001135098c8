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

import os
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from custom.accuracy_report import VOLUME_SWEEP, aggregate, pair_row, write_report
from custom.data.demo import ensure_dataset
from custom.data.frames import SubjectFrames
from custom.data.oasis import find_subjects
from custom.data.pairs import PairDataset
from custom.methods import MonaiVoxelMorph, ZeroField, ants_available, ants_register, network_method
from custom.metrics import format_mean
from custom.networks import RegistrationNet
from custom.peers import check_peer_names
from custom.pretrained import pretrained_path
from custom.refine import RefineOptions, RefiningInferer
from custom.runner import as_list, bundle_dir, train_run
from custom.spatial import check_spatial_dims

__all__ = ["run_accuracy"]


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
    subject_pairs: int = 3,
    subject_rows: Union[str, Sequence[str]] = ("affine", "network", "defaults", "accurate"),
    pair_subjects: Union[str, Sequence[str]] = (),
    peer_envs: str = ".peers",
) -> Path:
    """Train, register held-out pairs with every method, print the table and write it to
    ``<output_dir>/accuracy.md`` (the path returned) with every pair's row in ``results.json``. In 3D no network is
    trained: :mod:`custom.accuracy_3d` registers known-deformation pairs back with the shipped (or ``model_path``)
    network, refinement and ANTs SyN, and real subject pairs with each tool run whole (:mod:`custom.accuracy_subjects`).

    Args:
        dataset_dir: a neurite-OASIS-style root.
        train_subjects: subject folders to train on (comma-separated or a list); default every subject not tested.
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
        refine_steps: refinement step counts to tabulate (comma-separated or a list); default 5,10,25,50 in 2D,
            in 3D one count per level: [[60,10,0],[60,20,10],[60,20,20]].
        refine_lr: refinement learning rate.
        refine_smooth_weight: refinement smoothness weight.
        default_refine_steps: the step count of the "refinement only, from zero" row.
        peers: any of ``monai`` and ``ants`` (comma-separated or a list); in 3D also ``fireants``, ``convexadam``
            and ``elastix`` (custom.peers: real aligned subject pairs, each in its own environment).
        ants_transform: ``type_of_transform`` for ``ants.registration``.
        threads: CPU threads for every method.
        device: ``cpu`` or ``cuda``; default CUDA when available.
        seed: training and ANTs seed.
        pretrained: add the shipped pretrained model (synthetic data only), alone and with
            ``default_refine_steps`` of refinement, when the bundle has one for ``spatial_dims`` and ``variant``.
        reuse_models: use the models of an earlier run in ``output_dir`` instead of training again.
        model_path: 3D: our network's weights (default the shipped pretrained model of ``variant``).
        pairs_per_subject: 3D: known deformations of each labelled test subject (0: none).
        max_displacement: 3D: standard deviation of the known deformations' velocity, in voxels.
        subject_pairs: 3D: pairs of real, different subjects per section (aligned -> aligned, and native ->
            aligned where subjects have their native norm.nii.gz), each tool run whole from the files
            (custom.accuracy_subjects); 0: none.
        subject_rows: 3D: our rows of the real subject pairs, any of affine (the affine stage alone), network
            (the network alone after it), defaults (register's) and accurate (comma-separated or a list); with
            model_path, they use that model.
        pair_subjects: 3D: the subject folders the real pairs are made of (e.g. those held out from the model's
            training; comma-separated or a list); default every subject.
        peer_envs: 3D: the folder of the peer tools' environments (made by ``python -m custom peer_envs``).
    """
    options = SimpleNamespace(**locals())
    if check_spatial_dims(spatial_dims) == 3:
        return _run_volumes(options)
    steps_list = _check_slice_options(options)
    root, out, dev = Path(ensure_dataset(dataset_dir)), Path(output_dir), _use_threads(threads, device)
    trains, tests = _split_subjects(root, image, as_list(train_subjects), as_list(test_subjects))
    pairs = _test_pairs(options, _linked_root(out / "test_data", root, tests), tests)
    print(f"{len(pairs)} test pairs from {tests}; training on {trains}", flush=True)
    # the training root links to the training subjects only, so nothing of the test subjects is seen
    common = _training_overrides(options, _linked_root(out / "train_data", root, trains), dev)
    results, per_pair = _score(_methods(options, steps_list, common, dev), pairs)
    return write_report(out, _slice_header(options, len(pairs), trains, tests), results, per_pair)


def _slice_header(o: SimpleNamespace, num_pairs: int, trains: List[str], tests: List[str]) -> str:
    """The title and legend of the 2D table."""
    trained = "models of an earlier run" if o.reuse_models else f"{o.budget_minutes:g} min each"
    return (
        f"# Accuracy: {num_pairs} pairs of {tests}, trained on {trains} ({trained})\n\n"
        f"2D, intra_volume pairs (offset {o.offset}); Dice over the labels of either map, mean ± sd over pairs; "
        "worst 30%: the mean of each pair's lowest 30% label Dice; HD95 mean over labels, in voxels.\n\n"
    )


def _use_threads(threads: int, device: Optional[str]) -> torch.device:
    """Every method's CPU threads (torch now, ITK when ANTs starts); the device, default CUDA when available."""
    torch.set_num_threads(threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _score(methods: Dict[str, Optional[Callable]], pairs: List[dict]):
    """``(summaries, rows)`` per method: every pair registered and scored, the summary printed."""
    results, per_pair = {}, {}
    for name, method in methods.items():
        per_pair[name] = [pair_row(item, **_register(method, item)) for item in pairs]
        results[name] = aggregate(per_pair[name])
        print(f"{name}: Dice {format_mean(results[name], 'dice_mean', 3, sd=True)}", flush=True)
    return results, per_pair


def _register(method: Optional[Callable], item: dict) -> dict:
    """:func:`pair_row`'s keywords for one method on one pair: the warped labels, the determinant and the seconds;
    none for no registration."""
    if method is None:
        return {}
    warped_label, det, seconds = method(item["moving"], item["fixed"], item["moving_label"])
    return {"warped_label": warped_label, "det": det, "seconds": seconds}


def _run_volumes(o: SimpleNamespace) -> Path:
    """The 3D benchmark (:func:`custom.accuracy_3d.run_volume_accuracy`) with ``run_accuracy``'s options."""
    from custom.accuracy_3d import run_volume_accuracy

    return run_volume_accuracy(
        o.dataset_dir,
        o.test_subjects,
        o.output_dir,
        o.variant,
        o.model_path,
        o.image,
        o.label,
        o.pairs_per_subject,
        o.max_displacement,
        VOLUME_SWEEP if o.refine_steps is None else o.refine_steps,
        {"lr": o.refine_lr, "smooth_weight": o.refine_smooth_weight},
        o.peers,
        o.threads,
        o.seed,
        o.subject_pairs,
        o.subject_rows,
        o.pair_subjects,
        o.peer_envs,
    )


def _check_slice_options(o: SimpleNamespace) -> List[int]:
    """Check the 2D options before any work; the refinement step counts to tabulate."""
    steps_list = [int(s) for s in as_list((5, 10, 25, 50) if o.refine_steps is None else o.refine_steps)]
    for steps in steps_list + [o.default_refine_steps]:
        RefineOptions(steps, o.refine_lr, o.refine_smooth_weight)
    check_peer_names(as_list(o.peers), ("monai", "ants"))
    if o.budget_minutes <= 0 or o.max_pairs < 1:
        raise ValueError(f"budget_minutes must be > 0 and max_pairs >= 1, got {o.budget_minutes} and {o.max_pairs}.")
    return steps_list


def _split_subjects(root: Path, image: str, trains: List[str], tests: List[str]):
    """``(train subjects, test subjects)``: the test subjects default to the last one, the training subjects to
    every other.

    Raises:
        ValueError: unless both are non-empty, disjoint subjects of ``root``.
    """
    every = [s["subject"] for s in find_subjects(root, image, None)]
    tests = tests or every[-1:]
    trains = trains or [s for s in every if s not in tests]
    missing = [s for s in trains + tests if s not in every]
    if missing or set(trains) & set(tests) or not trains:
        raise ValueError(
            f"train and test subjects must be disjoint, non-empty subjects of {str(root)!r} (have {every}); "
            f"got train={trains}, test={tests}."
        )
    return trains, tests


def _test_pairs(o: SimpleNamespace, test_root: Path, tests: List[str]) -> List[dict]:
    """At most ``max_pairs`` labelled intra-volume pairs of the test subjects, evenly spread, normalised as in
    training."""
    test_items = find_subjects(test_root, o.image, o.label)
    if not test_items or "label" not in test_items[0]:
        raise ValueError(f"the test subjects {tests} need a label map (label={o.label!r} found none common to them).")
    dataset = PairDataset(SubjectFrames(test_items, 2), "intra_volume", o.seed, offset=o.offset)
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(o.max_pairs, len(dataset))).round().astype(int))
    return [dataset[int(i)] for i in picks]


def _training_overrides(o: SimpleNamespace, train_root: Path, device: torch.device) -> dict:
    """The ``train.json`` overrides of both training runs (ours and MONAI's): the same data, loss and budget."""
    return {
        "dataset_dir": str(train_root),
        "spatial_dims": 2,
        "variant": o.variant,
        "image": o.image,
        "label": None,
        "num_val": 0,
        "num_test": 0,
        "batch_size": o.batch_size,
        "epochs": 1_000_000,  # the wall-clock budget ends the run
        "learning_rate": o.learning_rate,
        "smooth_weight": o.smooth_weight,
        "seed": o.seed,
        "device": f"$torch.device('{device}')",
        "validate#dataset": "$custom.data.build_pair_dataset(split='all', **@dataset_options)",
    }


def _methods(o: SimpleNamespace, steps_list: List[int], common: dict, dev: torch.device) -> Dict[str, Callable]:
    """The rows to measure, name -> ``method(moving, fixed, moving_label)`` (None: no registration); trains ours
    and MONAI's ``VoxelMorph`` (or reuses an earlier run's)."""
    out, budget = Path(o.output_dir), o.budget_minutes
    ours = _load(RegistrationNet(2, o.variant), _train("ours", common, out, budget, None, o.reuse_models), dev)
    default = RefiningInferer(o.default_refine_steps, o.refine_lr, o.refine_smooth_weight)
    methods: Dict[str, Callable] = {"identity (no registration)": None}
    methods[f"ours ({o.variant})"] = network_method(ours, RefiningInferer(0), dev)
    for steps in steps_list:
        inferer = RefiningInferer(steps, o.refine_lr, o.refine_smooth_weight)
        methods[f"ours + refine {steps} steps"] = network_method(ours, inferer, dev)
    methods[f"refine {o.default_refine_steps} steps from zero (no network)"] = network_method(ZeroField(), default, dev)
    if o.pretrained:
        try:
            shipped = _load(RegistrationNet(2, o.variant), Path(pretrained_path(bundle_dir(), 2, o.variant)), dev)
        except FileNotFoundError as error:
            print(f"pretrained rows skipped: {error}", flush=True)
        else:
            methods["pretrained, synthetic data only (no training here)"] = network_method(
                shipped, RefiningInferer(0), dev
            )
            methods[f"pretrained + refine {o.default_refine_steps} steps"] = network_method(shipped, default, dev)
    if "monai" in as_list(o.peers):
        network_def = {"_target_": "custom.methods.MonaiVoxelMorph", "spatial_dims": "@spatial_dims"}
        path = _train("monai", common, out, budget, network_def, o.reuse_models)
        monai_net = _load(MonaiVoxelMorph(2), path, dev)
        methods["MONAI VoxelMorph (same data and budget)"] = network_method(monai_net, RefiningInferer(0), dev)
    if "ants" in as_list(o.peers):
        if ants_available():
            transform = o.ants_transform
            methods[f"ANTs {transform} (antspyx)"] = partial(ants_register, transform=transform, seed=o.seed)
        else:
            print('ANTs row skipped: antspyx is not installed (pip install -e ".[peers]")', flush=True)
    return methods
