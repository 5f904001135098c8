"""The paper's variant comparison, with registration accuracy, in one command.

For each similarity loss and each variant: train with the bundle's ``train.json`` (same data, loss, epochs or
wall-clock budget), evaluate the test split with ``evaluate.json``, measure size, speed and memory, draw the
figures, and write ``<output_dir>/<run>/report.md``.
"""

import json
import shlex
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Union

import torch

from custom.atomic import atomic_write_text
from custom.benchmark import machine_description, measure_model, multiply_adds
from custom.metrics import format_mean
from custom.networks import VARIANTS, RegistrationNet, count_parameters
from custom.runner import as_list, bundle_workflow, train_run
from custom.spatial import check_spatial_dims

__all__ = ["DEFAULT_SMOOTH_WEIGHT", "run_study"]

DEFAULT_SMOOTH_WEIGHT = {"lncc": 1.0, "mse": 0.01}  # VoxelMorph's recommended regularisation per similarity


def _summary(overrides: dict, eval_dir: Path, refine_steps: Optional[int]):
    """Evaluate the best checkpoint on the evaluation split with ``refine_steps`` of test-time refinement (``None``:
    the default) and no affine stage (the networks are compared, on pairs already aligned); the summary and the
    evaluation dataset."""
    overrides = {**overrides, "eval_dir": str(eval_dir), "refine_steps": refine_steps, "affine": False}
    workflow = bundle_workflow(["train.json", "evaluate.json"], "evaluating", overrides)
    workflow.initialize()
    workflow.run()
    dataset = workflow.parser.get_parsed_content("validate#dataset")
    workflow.finalize()
    return json.loads((eval_dir / "summary.json").read_text()), dataset


def _evaluate(overrides: dict, eval_dir: Path, figures_dir: Path, spatial_dims: int, variant: str, steps: int):
    """The network alone on the evaluation split (the paper's comparison; refinement is reported on its own):
    its summary and figures, and the spatial shape of the pairs."""
    from custom.plots import display

    summary, dataset = _summary(overrides, eval_dir, 0)
    model_path = Path(overrides["ckpt_dir"]) / "model.pt"
    display(RegistrationNet(spatial_dims, variant, integration_steps=steps), dataset, figures_dir, model_path)
    return summary, tuple(dataset[0]["moving"].shape[1:])


def _identity(common: dict, out: Path, eval_split: str, spatial_dims: int) -> dict:
    """Metrics of no registration (a zero field: a network whose flow conv is all zeros), for reference."""
    net = RegistrationNet(spatial_dims, "both")
    with torch.no_grad():
        net.flow.weight.zero_()
        net.flow.bias.zero_()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out / "model.pt")
    overrides = {**common, "variant": "both", "integration_steps": 0, "ckpt_dir": str(out), "eval_split": eval_split}
    return _evaluate(overrides, out / "eval", out, spatial_dims, "both", 0)[0]


def _max_batch(variant: str, spatial_dims: int, shape, device: str, budget_mb: float, threads: int) -> dict:
    """Peak training-step memory at batch 1 and 2 (each in a fresh process), extrapolated linearly to the
    largest batch that fits ``budget_mb``."""
    one = measure_model(variant, spatial_dims, shape, 1, device, threads, repeats=1)
    two = measure_model(variant, spatial_dims, shape, 2, device, threads, repeats=1)
    per_item = max(two["peak_mb"] - one["peak_mb"], 1e-3)
    base = one["peak_mb"] - per_item
    return {"peak_mb_1": one["peak_mb"], "max_batch": max(int((budget_mb - base) // per_item), 0)}


def _command() -> str:
    """The command line that made the report (``python -m custom ...`` when run as a module)."""
    prog = "python -m custom" if sys.argv[0].endswith("__main__.py") else Path(sys.argv[0]).name
    return " ".join([prog] + [shlex.quote(a) for a in sys.argv[1:]])


def run_study(
    dataset_dir: str = "data/demo",
    output_dir: str = "results",
    run_name: Optional[str] = None,
    spatial_dims: int = 2,
    variants: Union[str, Sequence[str]] = VARIANTS,
    losses: Union[str, Sequence[str]] = ("lncc",),
    epochs: int = 10,
    max_minutes: Optional[float] = None,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    smooth_weight: Optional[float] = None,
    integration_steps: int = 0,
    image: str = "aligned_norm",
    label: str = "auto",
    num_val: float = 0.2,
    num_test: float = 0.2,
    val_split: str = "val",
    eval_split: str = "test",
    device: Optional[str] = None,
    memory_budget_mb: float = 4096,
    threads: int = 2,
    seed: int = 0,
) -> Path:
    """Train, evaluate and compare the variants; write ``<output_dir>/<run_name>/report.md`` and figures.

    Args:
        dataset_dir: a neurite-OASIS-style root (the demo data is generated there when it is missing).
        output_dir: parent of the run folder.
        run_name: the run folder; default ``study-<timestamp>``.
        spatial_dims: 2 (slices) or 3 (volumes).
        variants: variants to compare (comma-separated or a list).
        losses: similarity losses, each a separate comparison (``"lncc"``, ``"mse"`` or ``"mse,lncc"``).
        epochs: epochs per run (the same budget for every variant).
        max_minutes: optional wall-clock budget per run, in minutes.
        batch_size: training batch size.
        learning_rate: Adam learning rate.
        smooth_weight: smoothness weight; default 1.0 for LNCC and 0.01 for MSE.
        integration_steps: 0, or the scaling-and-squaring steps of the diffeomorphic variant.
        image: image file name of the dataset.
        label: label file name, ``"auto"`` or ``None``.
        num_val: validation subjects (fraction or count).
        num_test: test subjects (fraction or count).
        val_split: split validated on during training (``"all"`` for tiny datasets).
        eval_split: split evaluated (``"test"``, ``"val"`` or ``"all"``).
        device: ``"cpu"`` or ``"cuda"``; default CUDA when available.
        memory_budget_mb: memory budget for the "max batch" column.
        threads: CPU threads.
        seed: data split, pairing and initialisation seed.

    Returns:
        The report path.
    """
    options = SimpleNamespace(**locals())
    variants, losses = _check_study_options(spatial_dims, variants, losses, epochs)
    device = options.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(threads)
    run_dir = Path(output_dir) / (run_name or datetime.now().strftime("study-%Y%m%d-%H%M%S"))
    common = _study_overrides(options)
    identity = _identity(common, run_dir / "identity", eval_split, spatial_dims)
    rows = [
        _study_run(options, common, run_dir / loss / variant, loss, variant) for loss in losses for variant in variants
    ]
    return _write_report(run_dir, rows, identity, spatial_dims, device, memory_budget_mb)


def _check_study_options(spatial_dims: int, variants, losses, epochs: int):
    """The variants and losses as lists, checked with the other options before any work.

    Raises:
        ValueError: for an unknown variant or loss, none of either, or ``epochs < 1``.
    """
    check_spatial_dims(spatial_dims)
    variants, losses = as_list(variants), as_list(losses)
    bad = [v for v in variants if v not in VARIANTS] + [s for s in losses if s not in DEFAULT_SMOOTH_WEIGHT]
    if bad or not variants or not losses:
        raise ValueError(
            f"variants must be among {list(VARIANTS)} and losses among "
            f"{list(DEFAULT_SMOOTH_WEIGHT)}; got variants={variants}, losses={losses}."
        )
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    return variants, losses


def _study_overrides(o: SimpleNamespace) -> dict:
    """The ``train.json`` overrides every run of the study shares: the data, its split and the training budget."""
    return {
        "dataset_dir": o.dataset_dir,
        "spatial_dims": o.spatial_dims,
        "batch_size": o.batch_size,
        "learning_rate": o.learning_rate,
        "integration_steps": o.integration_steps,
        "image": o.image,
        "label": o.label,
        "num_val": o.num_val,
        "num_test": o.num_test,
        "seed": o.seed,
        "device": f"$torch.device('{o.device}')",
        "validate#dataset": f"$custom.data.build_pair_dataset(split='{o.val_split}', **@dataset_options)",
    }


def _study_run(o: SimpleNamespace, common: dict, out: Path, loss: str, variant: str) -> dict:
    """Train one variant with one similarity, evaluate it alone and refined, measure its size and memory: its row
    of the report (with the training record and the evaluation summaries)."""
    weight = DEFAULT_SMOOTH_WEIGHT[loss] if o.smooth_weight is None else o.smooth_weight
    overrides = {
        **common,
        "variant": variant,
        "similarity": loss,
        "smooth_weight": weight,
        "epochs": o.epochs,
        "output_dir": str(out / "train"),
        "ckpt_dir": str(out / "models"),
    }
    trained = train_run(overrides, o.max_minutes)
    evaluation = {**overrides, "eval_split": o.eval_split}
    summary, shape = _evaluate(evaluation, out / "eval", out, o.spatial_dims, variant, o.integration_steps)
    refined, _ = _summary(evaluation, out / "eval_refined", None)
    net = RegistrationNet(o.spatial_dims, variant, integration_steps=o.integration_steps)
    memory = _max_batch(variant, o.spatial_dims, shape, o.device, o.memory_budget_mb, o.threads)
    return {
        "loss": loss,
        "variant": variant,
        "params": count_parameters(net),
        "macs": multiply_adds(net, torch.rand(1, 2, *shape)),
        **trained,
        **memory,
        "summary": summary,
        "refined": refined,
    }


def _write_report(
    run_dir: Path, rows: List[dict], identity: dict, spatial_dims: int, device: str, budget: float
) -> Path:
    from custom.plots import plot_loss_curves

    curves: Dict[str, Dict[str, List[float]]] = {}  # per loss, each variant's training curve
    for r in rows:
        curves.setdefault(r["loss"], {})[r["variant"]] = r["curve"]
    for loss, per_variant in curves.items():
        plot_loss_curves(per_variant, run_dir / f"loss_curves_{loss}.png", ylabel=f"training loss ({loss})")
    lines = [
        f"# Variant study: {run_dir.name}",
        "",
        f"Command: `{_command()}`",
        "",
        f"Machine: {machine_description(device)}; device {device}.",
        "",
        f"{spatial_dims}D. Train time is the whole run (training and validation); time per step is the mean "
        "training iteration; peak memory is the tensor memory of a training step at batch 1; max batch is "
        f"extrapolated linearly from batches 1 and 2 to a budget of {budget:.0f} MiB. LNCC, Dice and folding "
        "are on the evaluation split (Dice over the labels present, mean ± sd over pairs) for the networks alone (the "
        "paper's comparison); Dice + refinement is the same after the default test-time refinement.",
        "",
        "| loss | variant | params | MACs/pair (M) | epochs | train time (s) | time/step (s) | peak MiB (batch 1) "
        "| max batch | LNCC | MSE | Dice | % folding | inference s/pair | Dice + refinement |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| - | none (identity) | - | - | - | - | - | - | - "
        f"| {format_mean(identity, 'lncc')} | {format_mean(identity, 'mse', 4)} "
        f"| {format_mean(identity, 'dice_mean', 3, sd=True)} | {format_mean(identity, 'nonpositive_percent')} "
        "| - | - |",
    ]
    for r in rows:
        s = r["summary"]
        lines.append(
            f"| {r['loss']} | {r['variant']} | {r['params']:,} | {r['macs'] / 1e6:.1f} | {r['epochs']} "
            f"| {r['train_s']:.1f} | {r['step_s']:.4f} | {r['peak_mb_1']:.0f} | {r['max_batch']} "
            f"| {format_mean(s, 'lncc')} | {format_mean(s, 'mse', 4)} | {format_mean(s, 'dice_mean', 3, sd=True)} "
            f"| {format_mean(s, 'nonpositive_percent')} | {format_mean(s, 'seconds', 4)} "
            f"| {format_mean(r['refined'], 'dice_mean', 3, sd=True)} |"
        )
    lines += ["", "## Figures", ""]
    lines += [f"![loss curves ({loss})](loss_curves_{loss}.png)" for loss in curves]
    for r in rows:
        prefix = f"{r['loss']}/{r['variant']}"
        lines += [
            "",
            f"### {r['variant']} ({r['loss']})",
            "",
            f"![registration grid]({prefix}/registration_grid.png) ",
            f"![deformation grid]({prefix}/deformation_grid.png) ![Jacobian]({prefix}/jacobian.png)",
        ]
    report = run_dir / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    data = {"identity": identity, "runs": rows}
    atomic_write_text(run_dir / "results.json", json.dumps(data, indent=4) + "\n")
    return report
