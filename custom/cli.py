"""``python -m custom <command>`` (or ``vxm-lite <command>``): register, plot, evaluate, benchmark, make-demo, study.

Each command runs the same code as the bundle (its configs or the functions they call). Bad arguments and bad
input stop with one ``error:`` line and exit code 2.
"""

import sys
from pathlib import Path
from typing import Optional, Sequence

import fire

from custom.study import bundle_workflow, run_study

__all__ = ["Commands", "main"]


def _run_workflow(configs: Sequence[str], run_id: str, overrides: dict) -> None:
    workflow = bundle_workflow(configs, run_id, overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()


class Commands:
    """Fast, reduced-parameter VoxelMorph registration (MONAI bundle tools)."""

    def register(
        self,
        moving: Optional[str] = None,
        fixed: Optional[str] = None,
        moving_label: Optional[str] = None,
        pairs: Optional[str] = None,
        model_path: str = "bundle/models/model.pt",
        spatial_dims: int = 2,
        variant: str = "both",
        integration_steps: int = 0,
        output_dir: str = "runs/inference",
    ) -> str:
        """Register NIfTI pairs with a trained model, as the bundle's inference config does.

        Args:
            moving: moving image, or a folder of moving images.
            fixed: fixed image.
            moving_label: optional label map of the moving image (warped by nearest neighbour).
            pairs: instead of moving/fixed, a CSV with columns moving,fixed[,moving_label].
            model_path: the trained weights.
            spatial_dims: 2 or 3, as the model was trained.
            variant: the model's variant.
            integration_steps: the model's integration steps.
            output_dir: where <name>_warped / _ddf / _warped_label .nii.gz go.
        """
        _run_workflow(
            ["inference.json"],
            "run",
            {
                "moving": moving,
                "fixed": fixed,
                "moving_label": moving_label,
                "pairs": pairs,
                "model_path": model_path,
                "spatial_dims": spatial_dims,
                "variant": variant,
                "integration_steps": integration_steps,
                "output_dir": output_dir,
            },
        )
        return output_dir

    def evaluate(
        self,
        dataset_dir: str = "data/demo",
        model_path: str = "bundle/models/model.pt",
        spatial_dims: int = 2,
        variant: str = "both",
        split: str = "test",
        output_dir: str = "runs/evaluate",
    ) -> str:
        """Evaluate a trained model on a split: metrics.csv and summary.json/.md (LNCC, MSE, Dice, folding).

        Args:
            dataset_dir: a neurite-OASIS-style root.
            model_path: the trained weights.
            spatial_dims: 2 or 3, as the model was trained.
            variant: the model's variant.
            split: test, val, train or all.
            output_dir: where the files go.
        """
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"model file {model_path!r} does not exist; train first or pass --model_path.")
        _run_workflow(
            ["train.json", "evaluate.json"],
            "evaluating",
            {
                "dataset_dir": dataset_dir,
                "model_path": model_path,
                "spatial_dims": spatial_dims,
                "variant": variant,
                "eval_split": split,
                "eval_dir": output_dir,
            },
        )
        return str(Path(output_dir) / "summary.md")

    def plot(
        self,
        dataset_dir: str = "data/demo",
        model_path: str = "bundle/models/model.pt",
        spatial_dims: int = 2,
        variant: str = "both",
        split: str = "test",
        output_dir: str = "runs/plots",
        num_pairs: int = 4,
    ) -> list:
        """Draw the 3x4 registration grid, a deformation grid and a Jacobian map for pairs of a split.

        Args:
            dataset_dir: a neurite-OASIS-style root.
            model_path: the trained weights.
            spatial_dims: 2 or 3, as the model was trained.
            variant: the model's variant.
            split: test, val, train or all.
            output_dir: where the PNGs go.
            num_pairs: columns of the grid.
        """
        from custom.data import build_pair_dataset
        from custom.networks import RegistrationNet
        from custom.plots import display

        dataset = build_pair_dataset(dataset_dir, split, spatial_dims)
        paths = display(RegistrationNet(spatial_dims, variant), dataset, output_dir, model_path, num_pairs)
        return [str(p) for p in paths]

    def benchmark(
        self,
        spatial_dims: int = 2,
        shape: Optional[Sequence[int]] = None,
        batch_size: Optional[int] = None,
        device: str = "cpu",
        threads: int = 2,
        repeats: int = 5,
        output: Optional[str] = None,
    ) -> str:
        """Speed, size and memory of the variants against MONAI's VoxelMorph (a markdown table).

        Args:
            spatial_dims: 2 or 3.
            shape: spatial shape, e.g. [160,192]; default 160x192 or 160x192x224.
            batch_size: default 8 (2D) or 1 (3D).
            device: cpu or cuda.
            threads: CPU threads.
            repeats: timed repetitions.
            output: also write the table to this file.
        """
        from custom.benchmark import main as benchmark_main

        args = [
            "--spatial-dims",
            str(spatial_dims),
            "--device",
            device,
            "--threads",
            str(threads),
            "--repeats",
            str(repeats),
        ]
        args += ["--shape", *map(str, shape)] if shape else []
        args += ["--batch-size", str(batch_size)] if batch_size else []
        args += ["--output", output] if output else []
        benchmark_main(args)
        return output or ""

    def make_demo(
        self, directory: str = "data/demo", num_subjects: int = 12, shape: Sequence[int] = (80, 96, 112), seed: int = 0
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

    study = staticmethod(run_study)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point."""
    try:
        fire.Fire(Commands, command=list(sys.argv[1:] if argv is None else argv), name="vxm-lite")
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
