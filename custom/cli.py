"""``python -m custom <command>`` (or ``vxm-lite <command>``): register, apply, plot, evaluate,
benchmark, make-demo, export-bundle, study, accuracy, pretrain, scale, peer-envs.

Each command runs the same code as the bundle (its configs or the functions they call). Bad arguments and bad
input stop with one ``error:`` line and exit code 2.
"""

import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import fire

from custom.accuracy import run_accuracy
from custom.benchmark import benchmark
from custom.errors import INTERRUPTED, as_bool, closest, exit_on_user_error
from custom.peers import make_peer_envs
from custom.pretrain import pretrain
from custom.runner import bundle_dir, check_checkpoint, run_workflow
from custom.scale import run_scale
from custom.study import run_study

__all__ = ["Commands", "boolean_options", "check_arguments", "main", "parse_booleans", "usage"]


def _evaluation_options(args: dict) -> dict:
    """Bundle overrides of ``evaluate`` / ``plot``: the model, the split and the data, named as in the configs."""
    check_checkpoint(args["model_path"])
    renamed = {"split": "eval_split", "output_dir": "eval_dir"}
    return {renamed.get(k, k): v for k, v in args.items()}


INFERRED = ("model_path", "spatial_dims")  # left to the inference config when not given
SPLIT_OPTIONS = (
    "dataset_dir",
    "model_path",
    "spatial_dims",
    "variant",
    "integration_steps",
    "split",
    "image",
    "label",
    "pair_strategy",
    "atlas",
    "num_val",
    "num_test",
    "val_subjects",
    "seed",
)
"""The model, split and data options of ``evaluate`` that ``plot`` takes too (the training run's)."""
REFINE_OPTIONS = (
    "similarity",
    "loss",
    "refine_steps",
    "refine_lr",
    "refine_smooth_weight",
    "refine_levels",
    "refine_downsample",
    "refine_grad_sigma",
)
"""The refinement options of ``register`` that ``evaluate`` takes too (:class:`custom.refine.RefineOptions`)."""


def _args_section(function: Callable, names: Sequence[str]) -> List[str]:
    """The docstring lines of ``names`` in ``function``'s ``Args:`` (each with its continuation lines)."""
    lines, keep = [], False
    for line in (inspect.getdoc(function) or "").split("\n"):
        entry = line.strip().split(":", 1)[0]
        if line.startswith("    ") and not line.startswith("        "):
            keep = entry in names
        if keep:
            lines.append(line)
    return lines


def with_options_of(source: Callable, names: Sequence[str], first: bool = True) -> Callable:
    """Decorator: the command takes ``source``'s options ``names`` (declared and documented once, there) before its
    own (after them unless ``first``) and receives them in its ``**options``; fire, ``--help`` and
    :func:`check_arguments` read the combined signature and docstring."""

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command).parameters.values() if p.kind != p.VAR_KEYWORD]
        shared = [p for name, p in inspect.signature(source).parameters.items() if name in names]
        ordered = shared + own if first else own + shared
        signature = inspect.Signature(ordered, return_annotation=str)

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return command(**bound.arguments)

        wrapper.__signature__ = signature
        head, args = inspect.getdoc(command).split("Args:\n", 1)
        borrowed = "\n".join(_args_section(source, names))
        args = borrowed + "\n" + args if first else args.rstrip("\n") + "\n" + borrowed
        wrapper.__doc__ = head + "Args:\n" + args
        return wrapper

    return decorate


def register(
    moving: Optional[str] = None,
    fixed: Optional[str] = None,
    moving_label: Optional[str] = None,
    pairs: Optional[str] = None,
    model_path: Optional[str] = None,
    spatial_dims: Optional[int] = None,
    variant: str = "both",
    integration_steps: int = 0,
    output_dir: str = "runs/inference",
    ddf_format: str = "itk",
    jacobian: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    stop_on_error: bool = False,
    resample: bool = False,
    affine: bool = True,
    deformable: bool = True,
    similarity: str = "lncc",
    loss: Optional[str] = None,
    refine_steps: Union[int, Sequence[int], None] = None,
    refine_lr: float = 0.2,
    refine_smooth_weight: float = 1.0,
    refine_levels: Optional[Sequence[int]] = None,
    refine_downsample: Optional[int] = None,
    refine_grad_sigma: Optional[float] = None,
    max_memory_gb: Optional[float] = None,
) -> str:
    """Register NIfTI pairs with a trained model, as the bundle's inference config does.

    Args:
        moving: moving image, or a folder of moving images.
        fixed: fixed image.
        moving_label: optional label map of the moving image (warped by nearest neighbour).
        pairs: instead of moving/fixed, a CSV with columns moving,fixed[,moving_label].
        model_path: the trained weights; default the shipped pretrained model of spatial_dims and variant.
        spatial_dims: 2 or 3, as the model was trained; default from the inputs (2 for single slices).
        variant: the model's variant.
        integration_steps: the model's integration steps.
        output_dir: where <moving>__to__<fixed>_warped / _ddf / _warped_label .nii.gz and pairs_out.csv go.
        ddf_format: itk (a displacement field ITK/ANTs/Slicer apply: LPS mm, intent vector; .mha for single
            slices) or voxel.
        jacobian: also write <name>_jacobian.nii.gz, the field's Jacobian determinant (<= 0 where it folds).
        overwrite: replace the outputs of an earlier run of the same pairs in output_dir (refused otherwise).
        resume: continue an interrupted run in output_dir: pairs whose outputs are complete are skipped (checked,
            not assumed), the others are done.
        stop_on_error: stop at the first pair that fails; otherwise it is reported (a warning line, pairs_out.csv,
            the summary, exit code 2 at the end) and the others go on. Under torchrun (torchrun --nproc_per_node N
            -m custom register ...) each process registers its share of the pairs (one GPU each; gloo on CPU).
        resample: resample moving images (and labels) onto the fixed grid when their geometry differs.
        affine: run the affine stage first (centres of mass, then rigid and affine, see custom.affine): moving
            scans in their own space (any grid, orientation or field of view) need no resample; also writes
            <name>_affine.txt (ITK AffineTransform_double_3_3, apply it after the field). False: the
            deformable stage alone, on moving images already on the fixed grid (or --resample True).
        deformable: run the deformable stage (network + refinement); False: the affine stage alone (a zero
            field is written).
        similarity: the training similarity (lncc or mse), used by the refinement.
        loss: deprecated name of similarity.
        refine_steps: test-time refinement steps per pair at most, one number for every level or one per level
            (0: the network's field as it is); default 10 in 2D, [60,10,5] in 3D (custom.refine.DEFAULTS).
        refine_lr: refinement learning rate (voxels per step).
        refine_smooth_weight: refinement smoothness weight.
        refine_levels: the refinement's resolution divisors, coarse to fine, e.g. [4,2,1]; default [1] in 2D,
            [4,2,1] in 3D.
        refine_downsample: the optimised field's resolution divisor at most (1, 2, 4 or 8); default 1 in 2D, 2 in
            3D (1: a full-resolution field, slower, more accurate).
        refine_grad_sigma: the Gaussian sigma (voxels of the optimised field) smoothing each refinement step's
            gradient, which keeps the field from folding (0: none); default 2 in 2D, 1.5 in 3D.
        max_memory_gb: refuse pairs whose estimated peak memory exceeds this (default: the memory available).
    """
    options = {k: v for k, v in locals().items() if not (k in INFERRED and v is None)}
    configs = ["inference.json"] + (["multi_gpu_inference.json"] if int(os.environ.get("WORLD_SIZE", "1")) > 1 else [])
    run_workflow(configs, "run", {**options, "bundle_root": str(bundle_dir())})
    return output_dir


@with_options_of(register, REFINE_OPTIONS, first=False)
def evaluate(
    dataset_dir: str = "data/demo",
    model_path: str = "bundle/models/model.pt",
    spatial_dims: int = 2,
    variant: str = "both",
    integration_steps: int = 0,
    split: str = "test",
    image: str = "aligned_norm",
    label: Optional[str] = "auto",
    pair_strategy: str = "inter_subject",
    atlas: Optional[str] = None,
    num_val: float = 0.2,
    num_test: float = 0.2,
    val_subjects: Optional[Sequence[str]] = None,
    seed: int = 0,
    affine: bool = True,
    output_dir: str = "runs/evaluate",
    **options,
) -> str:
    """Evaluate a trained model on a split: metrics.csv and summary.json/.md (LNCC, MSE, Dice, worst-30% Dice,
    HD95, folding, SDlogJ, seconds per pair). The split and model options must be the training run's.

    Args:
        dataset_dir: a neurite-OASIS-style root.
        model_path: the trained weights.
        spatial_dims: 2 or 3, as the model was trained.
        variant: the model's variant.
        integration_steps: the model's integration steps.
        split: test, val, train or all.
        image: the image file of each subject.
        label: the label file (aligned_seg35, ...), "auto" (the finest every subject has) or None.
        pair_strategy: inter_subject, atlas, intra_volume or orig_to_norm.
        atlas: the fixed subject for pair_strategy atlas.
        num_val: validation subjects (fraction or count), as in training.
        num_test: test subjects (fraction or count), as in training.
        val_subjects: the validation subjects by name, as in training (e.g. those a model was held out from:
            --split val --val_subjects [...]); the test split is then empty.
        seed: the split seed, as in training.
        affine: run the affine stage before the deformable one on each pair (custom.affine.after_affine); the
            metrics are those of the composed transform. False: the network (+ refinement) alone.
        output_dir: where the files go.
    """
    options = _evaluation_options({**{k: v for k, v in locals().items() if k != "options"}, **options})
    run_workflow(["train.json", "evaluate.json"], "evaluating", options)
    return str(Path(output_dir) / "summary.md")


@with_options_of(evaluate, SPLIT_OPTIONS)
def plot(output_dir: str = "runs/plots", num_pairs: int = 4, **options) -> str:
    """Draw the 3x4 registration grid, a deformation grid and a Jacobian map for pairs of a split (the
    network's fields, no refinement).

    Args:
        output_dir: where the PNGs go.
        num_pairs: columns of the grid.
    """
    options = _evaluation_options({**options, "output_dir": output_dir})
    run_workflow(["train.json", "evaluate.json"], "display", {**options, "plot_pairs": num_pairs})
    return output_dir


def make_demo(
    directory: str = "data/demo", num_subjects: int = 12, shape: Sequence[int] = (80, 96, 112), seed: int = 0
) -> str:
    """Write the synthetic demo dataset (neurite-OASIS layout) to DIRECTORY, which must be new or empty.

    Args:
        directory: the folder to create.
        num_subjects: number of subjects.
        shape: volume shape, e.g. [80,96,112].
        seed: generator seed.
    """
    from custom.data import make_demo

    return str(make_demo(directory, num_subjects, tuple(shape), seed))


def apply(
    image: str,
    field: str,
    output: str,
    mode: str = "auto",
    jacobian: bool = False,
    overwrite: bool = False,
    affine: Optional[str] = None,
) -> str:
    """Warp an image or label map with a field that register wrote, onto the field's (fixed) grid.

    Args:
        image: a NIfTI image or label map on the grid the pair was registered on (with affine: the moving grid).
        field: the <name>_ddf file (ITK .nii.gz/.mha or voxel layout).
        output: the warped file (.nii.gz or .nii).
        mode: linear (images), nearest (label maps) or auto (nearest for integer data).
        jacobian: also write <output>_jacobian.nii.gz, the field's Jacobian determinant.
        overwrite: replace existing outputs (inputs are never overwritten).
        affine: the pair's <name>_affine.txt when register ran the affine stage (applied after the field).
    """
    from custom.interop import apply_field

    return "\n".join(apply_field(image, field, output, mode, jacobian, overwrite, affine))


def export_bundle(output_dir: str, overwrite: bool = False, archive: bool = True) -> str:
    """Write the bundle as the MONAI model zoo takes it: one self-contained folder (configs, docs, LICENSE,
    models/model.pt, large_files.yml and the custom package) and a zip of it.

    Args:
        output_dir: the bundle folder; its name is the bundle's name in the zoo (models/<name>).
        overwrite: replace an existing non-empty folder (and its zip).
        archive: also write <output_dir>.zip.
    """
    from custom.export import export_bundle

    return export_bundle(output_dir, overwrite, archive)


class Commands:
    """Fast, reduced-parameter VoxelMorph registration (MONAI bundle tools)."""

    register = staticmethod(register)
    evaluate = staticmethod(evaluate)
    plot = staticmethod(plot)
    make_demo = staticmethod(make_demo)
    apply = staticmethod(apply)
    export_bundle = staticmethod(export_bundle)
    benchmark = staticmethod(benchmark)
    study = staticmethod(run_study)
    accuracy = staticmethod(run_accuracy)
    pretrain = staticmethod(pretrain)
    scale = staticmethod(run_scale)
    peer_envs = staticmethod(make_peer_envs)


def _commands() -> Dict[str, Callable]:
    return {name.replace("_", "-"): getattr(Commands, name) for name in dir(Commands) if not name.startswith("_")}


def usage() -> str:
    """The top-level help: every command with the first line of its docstring."""
    lines = ["usage: python -m custom COMMAND [--option value ...]   (COMMAND --help for its options)", "", "commands:"]
    for name, function in _commands().items():
        summary = (inspect.getdoc(function) or "").split("\n\n")[0].replace("\n", " ").replace("``", "")
        summary = summary.split(". ")[0].split(": ")[0].rstrip(".")
        lines.append(f"  {name:<14} {summary}")
    return "\n".join(lines)


def _closest(name: str, choices: Sequence[str]) -> str:
    match = closest(name, choices)
    return f"; did you mean {match!r}?" if match else f"; valid: {', '.join(sorted(choices))}."


def check_arguments(argv: Sequence[str]) -> None:
    """Check the command and every ``--option`` name before any work.

    Raises:
        ValueError: for an unknown command or option, naming the closest valid one.
    """
    commands = _commands()
    command = argv[0]
    if command.replace("_", "-") not in commands:
        raise ValueError(f"unknown command {command!r}{_closest(command.replace('_', '-'), commands)}")
    parameters = list(inspect.signature(commands[command.replace("_", "-")]).parameters)
    for arg in argv[1:]:
        if arg.startswith("--") and arg not in ("--help", "--"):
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            name = name[2:] if name.startswith("no") and name[2:] in parameters else name  # fire's --noflag
            if name not in parameters:
                options = ["--" + p for p in parameters]
                raise ValueError(f"{command}: unknown option --{name}{_closest('--' + name, options)}")


def boolean_options(command: str) -> List[str]:
    """The options of ``command`` that are booleans (annotated ``bool`` or with a boolean default)."""
    parameters = inspect.signature(_commands()[command.replace("_", "-")]).parameters.values()
    return [p.name for p in parameters if p.annotation is bool or isinstance(p.default, bool)]


def parse_booleans(argv: Sequence[str]) -> List[str]:
    """The command line with every boolean option's value (``--flag VALUE`` or ``--flag=VALUE``) parsed by
    :func:`~custom.errors.as_bool` and written as ``--flag=True``/``--flag=False`` for fire, which would hand
    ``false`` or ``no`` over as a (true) string. A bare ``--flag`` stays (true).

    Raises:
        ValueError: for a value that is not a boolean word, naming the option.
    """
    flags = {"--" + name for name in boolean_options(argv[0])}
    flags |= {flag.replace("_", "-") for flag in flags}
    out, args, i = [argv[0]], list(argv), 1
    while i < len(args):
        name, has_value, value = args[i].partition("=")
        if name in flags and not has_value and i + 1 < len(args) and not args[i + 1].startswith("--"):
            has_value, value, i = True, args[i + 1], i + 1
        out.append(f"{name}={as_bool(name[2:].replace('-', '_'), value)}" if name in flags and has_value else args[i])
        i += 1
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point: one ``error:`` line and exit code 2 for bad arguments or input, 130 when interrupted."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    try:
        with exit_on_user_error():
            check_arguments(args)
            fire.Fire(Commands, command=parse_booleans(args), name="vxm-lite")
    except TypeError as error:  # fire's report of a wrong argument type
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\n" + INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None
