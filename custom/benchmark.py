"""Speed, size and memory of the four variants against MONAI's ``VoxelMorph``, measured in one run.

``python -m custom benchmark --spatial_dims 2`` prints a markdown table: parameters, multiply-adds per pair,
inference and full training step (network + warp + LNCC + smoothness + Adam) time per batch and the training
steps per hour it allows (the network's own work: pairs already in memory), peak memory,
and each one's speed ratio to MONAI's ``VoxelMorph`` with the same channels (``integration_steps=0`` like our
default; MONAI's out-of-the-box ``integration_steps=7`` is listed too). A second table times our
``SpatialTransformer`` and ``LocalNCCLoss`` against MONAI's ``Warp`` and ``LocalNormalizedCrossCorrelationLoss``.

Every row runs in its own process. Peak memory is the tensor memory of one training step (see
:func:`peak_memory_mb`). Timings are medians.
"""

import multiprocessing as mp
import platform
import statistics
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from custom.atomic import atomic_write_text
from custom.networks import VARIANTS
from custom.spatial import check_spatial_dims

__all__ = [
    "benchmark",
    "build_pair_model",
    "machine_description",
    "measure_model",
    "multiply_adds",
    "peak_memory_mb",
    "time_call",
    "training_epochs",
]

DEFAULT_SHAPES = {2: (160, 192), 3: (160, 192, 224)}
DEFAULT_BATCH = {2: 8, 3: 1}
DEFAULT_REPEATS = {2: 5, 3: 1}  # 3D: a training step takes seconds on a CPU; the whole run stays under 10 minutes
MONAI_ROWS = {"monai VoxelMorph (steps=0)": 0, "monai VoxelMorph (default, steps=7)": 7}


def machine_description(device: str = "cpu") -> str:
    """One line naming the processor or GPU, the thread count and the torch version."""
    if device.startswith("cuda") and torch.cuda.is_available():
        hw = torch.cuda.get_device_name(torch.device(device))
    else:
        hw = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                hw = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return f"{hw}, {torch.get_num_threads()} threads, torch {torch.__version__}, python {platform.python_version()}"


def time_call(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` calls, after ``warmup`` untimed calls."""
    times = []
    for i in range(repeats + warmup):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def multiply_adds(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of one forward pass of ``net(x)`` (counted by ``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops() // 2


def build_pair_model(name: str, spatial_dims: int):
    """A ``(moving, fixed) -> (warped, ddf)`` model, its similarity and smoothness losses and its backbone.

    Args:
        name: a variant of :data:`custom.networks.VARIANTS` or a key of :data:`MONAI_ROWS`.
        spatial_dims: 2 or 3.

    Returns:
        ``(model, similarity, smoothness, backbone)``; ``backbone`` maps the ``(B, 2, *S)`` pair to the field.
    """
    if name in VARIANTS:
        from custom.losses import GradLoss, LocalNCCLoss
        from custom.networks import VxmDense

        model = VxmDense(spatial_dims, name)
        return model, LocalNCCLoss(spatial_dims, 9), GradLoss("l2"), model.net
    if name in MONAI_ROWS:
        from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss
        from monai.networks.nets import VoxelMorph, VoxelMorphUNet

        backbone = VoxelMorphUNet(spatial_dims, 2, 32, (16, 32, 32, 32, 32, 32), (16, 16))
        model = VoxelMorph(backbone, integration_steps=MONAI_ROWS[name], spatial_dims=spatial_dims)
        return model, LocalNormalizedCrossCorrelationLoss(spatial_dims, 9), DiffusionLoss(), backbone
    raise ValueError(f"unknown model {name!r}: expected one of {list(VARIANTS) + list(MONAI_ROWS)}.")


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory held by tensors while ``fn`` runs, above what was held before, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the running sum of the allocation and free events that
    ``torch.profiler`` records (tensor bytes, like the CUDA figure; independent of the allocator's caching).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak / 2**20


def _measure_model(name: str, spatial_dims: int, shape: Sequence[int], batch: int, device: str, repeats: int):
    warnings.filterwarnings("ignore")
    dev = torch.device(device)
    torch.manual_seed(0)
    model, sim, reg, backbone = build_pair_model(name, spatial_dims)
    model, sim, reg = model.to(dev), sim.to(dev), reg.to(dev)
    moving = torch.rand(batch, 1, *shape, device=dev)
    fixed = torch.rand(batch, 1, *shape, device=dev)
    params = sum(p.numel() for p in model.parameters())
    macs = multiply_adds(backbone, torch.cat([moving[:1], fixed[:1]], 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def infer():
        with torch.no_grad():
            model(moving, fixed)

    def train_step():
        opt.zero_grad(set_to_none=True)
        warped, ddf = model(moving, fixed)
        loss = sim(warped, fixed) + 0.01 * reg(ddf)
        loss.backward()
        opt.step()

    train_step()  # warm-up: optimizer state and one-off buffers are not part of the step's peak
    peak = peak_memory_mb(train_step, dev)  # a second untimed step: training is warm
    return {
        "model": name,
        "params": params,
        "macs_per_pair": macs,
        "infer_s": time_call(infer, repeats, dev, warmup=1),
        "train_s": time_call(train_step, repeats, dev, warmup=0),
        "peak_mb": peak,
    }


def _measure_blocks(spatial_dims: int, shape: Sequence[int], batch: int, device: str, repeats: int):
    from monai.losses import LocalNormalizedCrossCorrelationLoss
    from monai.networks.blocks import Warp

    from custom.losses import LocalNCCLoss
    from custom.warp import SpatialTransformer

    warnings.filterwarnings("ignore")
    dev = torch.device(device)
    image = torch.rand(batch, 1, *shape, device=dev, requires_grad=True)
    target = torch.rand(batch, 1, *shape, device=dev)
    ddf = torch.randn(batch, spatial_dims, *shape, device=dev, requires_grad=True)
    pairs = {
        "warp (bilinear, zeros)": (SpatialTransformer().to(dev), Warp("bilinear", "zeros"), (image, ddf)),
        "LNCC (kernel 9)": (
            LocalNCCLoss(spatial_dims, 9).to(dev),
            LocalNormalizedCrossCorrelationLoss(spatial_dims, 9).to(dev),
            (image, target),
        ),
    }
    rows = []
    for name, (ours, theirs, args) in pairs.items():
        t_ours = time_call(lambda m=ours, a=args: m(*a).sum().backward(), repeats, dev, warmup=1)
        t_monai = time_call(lambda m=theirs, a=args: m(*a).sum().backward(), repeats, dev, warmup=1)
        rows.append({"block": name, "ours_s": t_ours, "monai_s": t_monai})
    return rows


def _in_subprocess(fn, threads: int, *args):
    torch.set_num_threads(threads)
    return fn(*args)


def _isolated(fn, threads: int, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_in_subprocess, (fn, threads) + args)


def measure_model(
    name: str,
    spatial_dims: int,
    shape: Sequence[int],
    batch_size: int,
    device: str = "cpu",
    threads: int = 2,
    repeats: int = 5,
) -> dict:
    """Parameters, multiply-adds per pair, inference and training-step time and peak memory of one model,
    measured in a fresh process.

    Args:
        name: a variant or a key of :data:`MONAI_ROWS`.
        spatial_dims: 2 or 3.
        shape: spatial shape of a pair.
        batch_size: pairs per batch.
        device: ``"cpu"`` or ``"cuda[:i]"``.
        threads: CPU threads.
        repeats: timed repetitions (median).
    """
    return _isolated(_measure_model, threads, name, spatial_dims, tuple(shape), batch_size, device, repeats)


TRAINING_RECIPE = {"pair_strategy": "intra_volume", "num_val": 1, "num_test": 0}
"""The training-epoch figure's split, fit for a small root such as the three real subjects of ``../shared``:
slice pairs of one volume, one validation subject, no test subject; everything else is ``train.json``'s default."""
MONAI_NETWORK = {"_target_": "custom.methods.MonaiVoxelMorph", "spatial_dims": "@spatial_dims"}


def _training_epochs(network: str, dataset_dir: str, epochs: int, device: str, folder: str) -> dict:
    """Train ``epochs`` epochs of the stock 2D ``train.json`` (with :data:`TRAINING_RECIPE`) on ``dataset_dir``,
    our network or MONAI's ``VoxelMorph`` (``network="monai"``); medians over the epochs after the first."""
    from custom.runner import train_run

    out = f"{folder}/{network}"
    overrides = {**TRAINING_RECIPE, "dataset_dir": dataset_dir, "epochs": epochs, "output_dir": f"{out}/train"}
    overrides.update(ckpt_dir=f"{out}/models", device=f"$torch.device('{device}')")
    if network == "monai":
        overrides["network_def"] = MONAI_NETWORK
    record = train_run(overrides, None)
    later = slice(1, None) if record["epochs"] > 1 else slice(None)  # the first epoch warms up
    epoch_s, step_s = statistics.median(record["epoch_s"][later]), statistics.median(record["epoch_step_s"][later])
    return {"iterations": record["iterations"] // record["epochs"], "epoch_s": epoch_s, "steps_s": step_s}


def training_epochs(dataset_dir: str, epochs: int = 3, device: str = "cpu", threads: int = 2) -> str:
    """The "training epoch on real slices" table: seconds per epoch of the stock 2D training of our default network
    and of MONAI's ``VoxelMorph`` (its defaults) on the same data, each in a fresh process, split into the training
    iterations and the rest (validation, data, checkpoints).

    Args:
        dataset_dir: a neurite-OASIS-style root with at least three subjects (e.g. ``../shared/data/oasis_real``).
        epochs: epochs per network (at least 2: the first is left out of the medians).
        device: ``"cpu"`` or ``"cuda[:i]"``.
        threads: CPU threads per process.
    """
    if epochs < 2:
        raise ValueError(f"epochs must be >= 2 (the first epoch warms up), got {epochs}.")
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for network in ("ours", "monai"):
            rows[network] = _isolated(_training_epochs, threads, network, str(dataset_dir), epochs, device, folder)
    lines = [
        f"## Training epoch on real slices: {dataset_dir}, 2D, train.json defaults with {TRAINING_RECIPE}, "
        f"median of epochs 2-{epochs}",
        "",
        "| model | iterations/epoch | s/epoch | training iterations s | validation, data and checkpoints s "
        "| epoch speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {"ours": "ours (both, train.json defaults)", "monai": "MONAI VoxelMorph (default, steps=7)"}
    for network, r in rows.items():
        lines.append(
            f"| {names[network]} | {r['iterations']} | {r['epoch_s']:.2f} | {r['steps_s']:.2f} "
            f"| {r['epoch_s'] - r['steps_s']:.2f} | {rows['monai']['epoch_s'] / r['epoch_s']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def benchmark(
    spatial_dims: int = 2,
    shape: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    device: str = "cpu",
    threads: int = 2,
    repeats: Optional[int] = None,
    variants: Union[str, Sequence[str]] = VARIANTS,
    output: Optional[str] = None,
    train_dataset: Optional[str] = None,
    train_epochs: int = 3,
) -> str:
    """Measure the variants and MONAI's VoxelMorph, each in a fresh process: the markdown table (also written to
    ``output`` when given; the command line prints it).

    Args:
        spatial_dims: 2 or 3.
        shape: spatial shape; default 160x192 (2D) or 160x192x224 (3D).
        batch_size: pairs per batch; default 8 (2D) or 1 (3D).
        device: ``"cpu"`` or ``"cuda[:i]"``.
        threads: CPU threads per process.
        repeats: timed repetitions (median) after a warm-up; default 5 (2D) or 1 (3D).
        variants: which of our variants to include (a list, or comma-separated).
        output: also write the table to this file.
        train_dataset: 2D: also time training epochs on this root (:func:`training_epochs`), e.g. the real
            subjects of ``../shared/data/oasis_real``.
        train_epochs: epochs of each training run of ``train_dataset``.

    Returns:
        The tables of :func:`to_markdown`: ``{"models": [...], "blocks": [...]}`` rows (seconds, MiB) rendered.
    """
    spatial_dims = check_spatial_dims(spatial_dims)
    shape = tuple(shape or DEFAULT_SHAPES[spatial_dims])
    if len(shape) != spatial_dims:
        raise ValueError(f"shape must have {spatial_dims} sizes for spatial_dims={spatial_dims}, got {list(shape)}.")
    batch = batch_size or DEFAULT_BATCH[spatial_dims]
    repeats = repeats or DEFAULT_REPEATS[spatial_dims]
    from custom.runner import as_list  # here: the measuring processes need none of the bundle machinery

    variants = as_list(variants)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variants {bad}: expected a subset of {list(VARIANTS)}.")
    if train_dataset and (spatial_dims != 2 or train_epochs < 2):
        raise ValueError(
            f"train_dataset times 2D training over train_epochs >= 2 (the first warms up); got spatial_dims="
            f"{spatial_dims}, train_epochs={train_epochs}."
        )
    models = [measure_model(n, spatial_dims, shape, batch, device, threads, repeats) for n in [*variants, *MONAI_ROWS]]
    blocks = _isolated(_measure_blocks, threads, spatial_dims, shape, batch, device, repeats)
    torch.set_num_threads(threads)
    header = (
        f"## {spatial_dims}D benchmark, {'x'.join(map(str, shape))}, batch {batch}, {device}\n\n"
        f"Machine: {machine_description(device)}. Speed-ups are against {next(iter(MONAI_ROWS))}."
    )
    table = to_markdown({"models": models, "blocks": blocks}, header)
    if train_dataset:
        table += "\n" + training_epochs(train_dataset, train_epochs, device, threads)
    if output:
        atomic_write_text(output, table)
    return table


def to_markdown(result: Dict[str, List[dict]], header: str) -> str:
    """Render :func:`benchmark`'s result as markdown tables."""
    peer = next(r for r in result["models"] if r["model"] == next(iter(MONAI_ROWS)))
    lines = [
        header,
        "",
        "| model | params | MACs/pair (G) | inference s/batch | train step s/batch | train steps/hour | peak MiB "
        "| inference speed-up | train speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["models"]:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['macs_per_pair'] / 1e9:.2f} | {r['infer_s']:.4f} "
            f"| {r['train_s']:.4f} | {3600 / r['train_s']:,.0f} | {r['peak_mb']:.0f} "
            f"| {peer['infer_s'] / r['infer_s']:.2f}x | {peer['train_s'] / r['train_s']:.2f}x |"
        )
    lines += ["", "| block (forward + backward) | ours s | MONAI s | speed-up |", "|---|---:|---:|---:|"]
    for b in result["blocks"]:
        lines.append(f"| {b['block']} | {b['ours_s']:.4f} | {b['monai_s']:.4f} | {b['monai_s'] / b['ours_s']:.2f}x |")
    return "\n".join(lines) + "\n"
