"""Every bundle config and stock MONAI verb, end to end on tiny data, as the docs show them."""

import csv
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from warm_python import run_python

from custom import RegistrationNet
from custom.data import build_pair_dataset, make_demo
from custom.workflow import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "monai" / "meta_schema_20240725.json"
TINY = (24, 28, 20)
INFERENCE = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundle/configs/inference.json"]
CONFIGS_EVAL = "['bundle/configs/train.json','bundle/configs/evaluate.json']"
pytestmark = pytest.mark.slow


def workspace(root: Path, num_subjects: int = 12) -> Path:
    """A folder laid out like the repository root for the commands: bundle/configs and the pretrained models
    (linked), data/demo (tiny)."""
    (root / "bundle" / "models").mkdir(parents=True)
    (root / "bundle" / "configs").symlink_to(REPO / "bundle" / "configs")
    (root / "bundle" / "large_files.yml").symlink_to(REPO / "bundle" / "large_files.yml")
    for weights in (REPO / "bundle" / "models").glob("pretrained_*.pt"):  # the shipped pretrained models
        (root / "bundle" / "models" / weights.name).symlink_to(weights)
    make_demo(root / "data" / "demo", num_subjects=num_subjects, shape=TINY)
    if SCHEMA.is_file():
        (root / "schema").mkdir()
        (root / "schema" / SCHEMA.name).write_bytes(SCHEMA.read_bytes())
    return root


def run(cmd, cwd, check=True, timeout=600):
    args = shlex.split(cmd) if isinstance(cmd, str) else cmd
    env = dict(os.environ, PYTHONWARNINGS="ignore", MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    proc = run_python(args, cwd, env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def documented_commands(path: Path):
    """The commands of the ```bash blocks of a markdown file, in order."""
    text = path.read_text()
    return [
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_readme_commands_match_ci():
    commands = documented_commands(REPO / "README.md")
    assert len(commands) == 2, "README.md shows exactly two set-up commands"
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines(), "CI must run README's test command verbatim"
    install = commands[0].split(" && ")[:2]
    assert install == ["pip install torch==2.13.0", "pip install -e ."]


def test_documented_commands_end_to_end(tmp_path):
    ws = workspace(tmp_path / "ws")
    slices = [f"data/demo/OASIS_OAS1_000{i}_MR1/slice_norm.nii.gz" for i in (1, 2, 3, 4)]
    (ws / "cohort.csv").write_text("moving,fixed\n" + "".join(f"{m},{slices[0]}\n" for m in slices[1:]))
    main_job = documented_commands(REPO / "README.md")[0].split(" && ")[-1]
    commands = [main_job] + documented_commands(REPO / "bundle" / "docs" / "README.md")
    assert any("torchrun" in c for c in commands) and any("ckpt_export" in c for c in commands)
    for cmd in commands:
        if "verify_metadata" in cmd and not SCHEMA.is_file():
            continue  # the offline schema copy lives in ../shared
        if cmd.startswith("python -m custom "):
            continue  # run by tests/test_cli.py
        args = shlex.split(cmd)
        if args[0] == "python":
            args[0] = sys.executable
        if args[0] == "torchrun":
            args[0:1] = [sys.executable, "-m", "torch.distributed.run"]
        if "training" in args:
            args += ["--epochs", "1"]
        run(args, cwd=ws)
    models = ws / "bundle" / "models"
    assert {"model.pt", "model_final.pt", "model.ts"} <= {p.name for p in models.iterdir()}
    assert (ws / "runs" / "evaluate" / "metrics.csv").read_text().startswith("moving,fixed,lncc,mse")
    written = sorted(p.name for p in (ws / "runs" / "inference").iterdir())
    name = "OASIS_OAS1_0002_MR1_slice_norm__to__OASIS_OAS1_0001_MR1_slice_norm"
    suffixes = ["_affine.txt", "_ddf.mha", "_warped.nii.gz", "_warped_label.nii.gz"]
    assert written == [name + suffix for suffix in suffixes] + ["pairs_out.csv"]
    with open(ws / "runs" / "cohort" / "pairs_out.csv", newline="") as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["registered"] * 3  # the documented cohort, 2 ranks
    # the scripted export gives the checkpoint's output
    net = RegistrationNet(2, "both").eval()
    net.load_state_dict(torch.load(models / "model.pt", weights_only=True))
    scripted = torch.jit.load(str(models / "model.ts"))
    x = torch.rand(2, 2, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), atol=1e-5, rtol=0)


def test_inference_folder_and_csv_carry_fixed_geometry(tmp_path):
    ws = workspace(tmp_path / "ws", num_subjects=3)
    torch.save(RegistrationNet(3, "both").state_dict(), ws / "model.pt")
    subj = ws / "data" / "demo"
    for folder in ("a", "b"):  # two moving files of the same name in two folders
        (ws / folder).mkdir()
        src = subj / f"OASIS_OAS1_000{2 if folder == 'a' else 3}_MR1" / "aligned_norm.nii.gz"
        (ws / folder / "T1.nii.gz").write_bytes(src.read_bytes())
    fixed_path = subj / "OASIS_OAS1_0001_MR1" / "aligned_norm.nii.gz"
    base = INFERENCE + ["--spatial_dims", "3", "--model_path", "model.pt", "--refine_steps", "2"]
    run(base + ["--moving", "a", "--fixed", str(fixed_path), "--output_dir", "out"], cwd=ws)
    fixed = nib.load(fixed_path)
    name = "T1__to__OASIS_OAS1_0001_MR1_aligned_norm"
    assert sorted(p.name for p in (ws / "out").iterdir()) == [
        f"{name}_affine.txt",
        f"{name}_ddf.nii.gz",
        f"{name}_warped.nii.gz",
        "pairs_out.csv",
    ]
    warped, ddf = nib.load(ws / "out" / f"{name}_warped.nii.gz"), nib.load(ws / "out" / f"{name}_ddf.nii.gz")
    assert warped.shape == fixed.shape and ddf.shape == fixed.shape + (1, 3)  # an ITK displacement field
    assert int(ddf.header["intent_code"]) == 1007
    assert (warped.affine == fixed.affine).all() and warped.header.get_zooms() == fixed.header.get_zooms()
    assert oct(os.stat(ws / "out" / f"{name}_warped.nii.gz").st_mode)[-3:] == "644"
    # a CSV of pairs, paths relative to the CSV: same-named moving files and one moving image against two fixed
    # images get distinct outputs; OASIS file names get the subject folder as prefix
    (ws / "pairs.csv").write_text(
        "moving,fixed,moving_label\n"
        "a/T1.nii.gz,data/demo/OASIS_OAS1_0001_MR1/aligned_norm.nii.gz,\n"
        "b/T1.nii.gz,data/demo/OASIS_OAS1_0001_MR1/aligned_norm.nii.gz,\n"
        "data/demo/OASIS_OAS1_0003_MR1/aligned_norm.nii.gz,data/demo/OASIS_OAS1_0001_MR1/aligned_norm.nii.gz,"
        "data/demo/OASIS_OAS1_0003_MR1/aligned_seg4.nii.gz\n"
        "data/demo/OASIS_OAS1_0003_MR1/aligned_norm.nii.gz,data/demo/OASIS_OAS1_0002_MR1/aligned_norm.nii.gz,\n"
    )
    run(base + ["--pairs", "pairs.csv", "--output_dir", "out_csv", "--ddf_format", "voxel"], cwd=ws)
    with open(ws / "out_csv" / "pairs_out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["ddf"] for r in rows] == [
        f"{name}__0_ddf.nii.gz",
        f"{name}__1_ddf.nii.gz",
        "OASIS_OAS1_0003_MR1_aligned_norm__to__OASIS_OAS1_0001_MR1_aligned_norm_ddf.nii.gz",
        "OASIS_OAS1_0003_MR1_aligned_norm__to__OASIS_OAS1_0002_MR1_aligned_norm_ddf.nii.gz",
    ]
    assert rows[1]["moving"] == str(ws / "b" / "T1.nii.gz") and rows[2]["warped_label"].endswith("_warped_label.nii.gz")
    assert len(list((ws / "out_csv").glob("*.nii.gz"))) == 4 * 2 + 1
    label = nib.load(ws / "out_csv" / rows[2]["warped_label"])
    assert label.get_data_dtype().kind == "i" and label.shape == fixed.shape
    assert nib.load(ws / "out_csv" / rows[0]["ddf"]).shape == fixed.shape + (3,)  # our voxel layout


def test_inference_resamples_onto_the_fixed_grid(tmp_path):
    """With --resample True a moving image on another grid is resampled (MONAI) and the field is the fixed grid's."""
    ws = workspace(tmp_path / "ws", num_subjects=2)
    torch.save(RegistrationNet(3, "both").state_dict(), ws / "model.pt")
    fixed_path = ws / "data" / "demo" / "OASIS_OAS1_0001_MR1" / "aligned_norm.nii.gz"
    moving = nib.load(ws / "data" / "demo" / "OASIS_OAS1_0002_MR1" / "aligned_norm.nii.gz")
    shifted = moving.affine.copy()
    shifted[:3, 3] += [2.0, -1.0, 0.5]  # same shape, moved origin
    nib.save(nib.Nifti1Image(np.asarray(moving.dataobj), shifted), str(ws / "moved.nii.gz"))
    base = INFERENCE + ["--spatial_dims", "3", "--model_path", "model.pt", "--refine_steps", "0"]
    args = ["--moving", "moved.nii.gz", "--fixed", str(fixed_path)]
    refused = run(base + args + ["--output_dir", "refused", "--affine", "False"], cwd=ws, check=False)
    assert refused.returncode == 2 and "is not on the grid of fixed" in refused.stderr and not (ws / "refused").exists()
    run(base + args + ["--output_dir", "resampled", "--resample", "True", "--affine", "False"], cwd=ws)
    warped = nib.load(next((ws / "resampled").glob("*_warped.nii.gz")))
    assert warped.shape == nib.load(fixed_path).shape and np.allclose(warped.affine, nib.load(fixed_path).affine)


@pytest.fixture(scope="module")
def infer_ws(tmp_path_factory):
    """A workspace with checkpoints and broken inputs of every kind."""
    ws = workspace(tmp_path_factory.mktemp("inf") / "ws", num_subjects=2)
    torch.save(RegistrationNet(2, "both").state_dict(), ws / "both.pt")
    torch.save(RegistrationNet(2, "maxpool").state_dict(), ws / "maxpool.pt")
    nib.save(nib.Nifti1Image(np.zeros((24, 30, 1), np.float32), np.eye(4)), str(ws / "wide.nii.gz"))
    moving = nib.load(ws / S2 / "slice_norm.nii.gz")
    data, affine = np.asarray(moving.dataobj), moving.affine
    nan = data.copy()
    nan[3, 4, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), str(ws / "nan.nii.gz"))
    rotated = affine.copy()
    rotated[:2, :2] = [[0.0, -1.0], [-1.0, 0.0]]  # same shape, axes swapped
    nib.save(nib.Nifti1Image(data, rotated), str(ws / "rotated.nii.gz"))
    moved = affine.copy()
    moved[:3, 3] = [5.0, 0.0, 0.0]
    nib.save(
        nib.Nifti1Image(np.asarray(nib.load(ws / S2 / "slice_seg4.nii.gz").dataobj), moved),
        str(ws / "label_moved.nii.gz"),
    )
    shear = affine.copy()
    shear[0, 1] = 0.4
    for name in ("shear_moving", "shear_fixed"):
        nib.save(nib.Nifti1Image(data, shear), str(ws / f"{name}.nii.gz"))
    (ws / "junk.nii.gz").write_text("not an image")
    nib.save(nib.Nifti1Image(np.zeros_like(data), affine), str(ws / "zero.nii.gz"))
    nib.save(nib.Nifti1Image(data * 3.3, affine), str(ws / "float_label.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), affine), str(ws / "four_d.nii.gz"))
    volume = (ws / S2 / "aligned_norm.nii.gz").read_bytes()
    (ws / "truncated.nii.gz").write_bytes(volume[: len(volume) // 2])
    (ws / "corrupt.pt").write_bytes((ws / "both.pt").read_bytes()[:500])
    (ws / "afile").write_text("a file, not a folder")
    good = f"{S2}/slice_norm.nii.gz,{S1}/slice_norm.nii.gz"
    (ws / "pairs_nan.csv").write_text(f"moving,fixed\n{good}\nnan.nii.gz,{S1}/slice_norm.nii.gz\n")
    (ws / "pairs_empty.csv").write_text(f"moving,fixed\n{good}\n{S2}/slice_norm.nii.gz, \n")
    (ws / "pairs_header.csv").write_text(f"source,target\n{good}\n")
    (ws / "pairs_twice.csv").write_text(f"moving,fixed\n{good}\n{good}\n")
    (ws / "pairs_no_rows.csv").write_text("moving,fixed\n")
    dot = np.zeros_like(data)
    dot[3, 3, 0] = 1.0
    nib.save(nib.Nifti1Image(dot, affine), str(ws / "dot.nii.gz"))
    return ws


S1, S2 = "data/demo/OASIS_OAS1_0001_MR1", "data/demo/OASIS_OAS1_0002_MR1"
PAIR = ["--moving", f"{S2}/slice_norm.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz"]
EVALUATE = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", CONFIGS_EVAL]
TRAIN = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundle/configs/train.json"]
REGISTER = [sys.executable, "-m", "custom", "register"]
BAD_INPUTS = [
    # (entry point, arguments, message in the one error line); nothing may be written
    (
        "inference",
        ["--moving", f"{S2}/nothing.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz"],
        "moving file .* does not exist",
    ),  # missing file
    (
        "inference",
        ["--moving", f"{S2}/aligned_norm.nii.gz", "--fixed", f"{S1}/aligned_norm.nii.gz", "--spatial_dims", "2"],
        r"has shape \[24, 28, 20\], a 3-D image, but the model registers 2-D images",
    ),  # 3D for a 2D model
    (
        "inference",
        PAIR + ["--moving_label", f"{S2}/aligned_seg4.nii.gz"],
        "moving_label .* but the model registers 2-D",
    ),  # label of another shape
    (
        "inference",
        PAIR + ["--model_path", "maxpool.pt"],
        "checkpoint is for a 2D 'maxpool'.*this network is 2D 'both'",
    ),  # other variant
    ("inference", PAIR + ["--model_path", "nothing.pt"], "nothing.pt"),  # missing checkpoint
    ("inference", ["--fixed", f"{S1}/slice_norm.nii.gz"], "give --moving and --fixed"),  # no moving image
    (
        "inference",
        ["--moving", "wide.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz", "--affine", "false"],
        "is not on the grid of fixed",
    ),  # shapes, without the affine stage (which takes any grid)
    (
        "inference",
        ["--moving", "rotated.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz", "--affine", "false"],
        "is not on the grid of fixed",
    ),  # affines, without the affine stage
    (
        "inference",
        PAIR + ["--moving_label", "label_moved.nii.gz", "--affine", "false"],
        "is not on the grid of fixed",
    ),  # label geometry, without the affine stage
    (
        "inference",
        PAIR + ["--moving_label", "label_moved.nii.gz"],
        "and moving .* have different affines; a label map must share its image's grid",
    ),  # label geometry: the affine stage moves the image's grid, the label must share it
    (
        "inference",
        ["--moving", "shear_moving.nii.gz", "--fixed", "shear_fixed.nii.gz"],
        "affine with shear",
    ),  # no ITK field
    (
        "inference",
        ["--moving", "junk.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz"],
        "cannot read moving .* as NIfTI",
    ),  # not NIfTI
    (
        "inference",
        ["--pairs", "pairs_nan.csv", "--stop_on_error", "True"],
        "nan.nii.gz' contains NaN",
    ),  # NaN in the second pair, stop on error: first not written (without it the others go on: test_cohort)
    ("inference", ["--pairs", "pairs_empty.csv"], "line 3: empty fixed cell"),  # empty CSV cell
    ("inference", ["--pairs", "pairs_header.csv"], "needs a header with columns moving,fixed"),  # wrong header
    ("inference", ["--pairs", "nothing.csv"], "pairs CSV 'nothing.csv' does not exist"),  # missing CSV
    ("inference", PAIR + ["--pairs", "pairs_nan.csv"], "not both"),  # two forms at once
    (
        "inference",
        ["--moving", S2, "--fixed", f"{S1}/slice_norm.nii.gz", "--moving_label", f"{S2}/slice_seg4.nii.gz"],
        "goes with one moving file, not a folder",
    ),  # label dropped silently before
    ("inference", PAIR + ["--ddf_format", "mm"], "ddf_format must be one of"),  # unknown format
    ("inference", PAIR + ["--refine_steps", "-1"], "refine_steps must be an integer >= 0"),  # negative steps
    ("inference", PAIR + ["--refine_lr", "0"], "refine_lr must be a finite number > 0"),  # zero learning rate
    ("inference", PAIR + ["--refine_levels", "[2,4]"], "refine_levels must go from coarse to fine"),  # fine first
    (
        "inference",
        ["--moving", f"{S2}/aligned_norm.nii.gz", "--fixed", f"{S1}/aligned_norm.nii.gz", "--spatial_dims", "3"],
        "checkpoint is for a 2D 'both'.*this network is 3D",
    ),  # 2D model for 3D data
    ("inference", PAIR + ["--refine_steps", "[5,5]"], r"one per level of refine_levels \[1\]"),  # 2 counts, 1 level
    (
        "inference",
        [
            "--moving",
            f"{S2}/aligned_norm.nii.gz",
            "--fixed",
            f"{S1}/aligned_norm.nii.gz",
            "--spatial_dims",
            "3",
            "--max_memory_gb",
            "0.601",
        ],
        r"24x28x20 grid: registering it needs about 0.6 GiB, more than the 0.6 GiB allowed",
    ),  # too large
    ("evaluate", ["--eval_split", "dev"], "split must be 'train', 'val', 'test' or 'all', got 'dev'"),  # unknown split
    ("evaluate", ["--eval_split", "all", "--model_path", "maxpool.pt"], "checkpoint is for a 2D 'maxpool'"),  # variant
    ("evaluate", ["--eval_split", "all", "--label", "aligned_seg35"], "has no aligned_seg35.nii.gz"),  # missing label
    (
        "evaluate",
        ["--eval_split", "all", "--refine_lr", "-2"],
        "refine_lr must be a finite number > 0",
    ),  # negative learning rate
    ("train", ["--dataset_dir", "data/demo_typo"], "dataset folder 'data/demo_typo' does not exist"),  # no silent demo
    ("train", ["--cache", "ram"], r"cache must be one of \('memory', 'disk', 'none'\), got 'ram'"),  # unknown cache
    (
        "register",
        ["--moving", "rotated.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz", "--affine", "no"],
        "is not on the grid of fixed",
    ),  # CLI
    ("register", ["--pairs", "pairs_nan.csv", "--stop_on_error", "yes"], "contains NaN"),  # CLI, second pair
    ("inference", PAIR + ["--refine_step", "0"], "unknown option --refine_step: .*did you mean --refine_steps"),  # typo
    ("register", PAIR + ["--refine_step", "0"], "unknown option --refine_step; did you mean '--refine_steps'"),  # typo
    ("train", ["--epoch", "2"], "did you mean --epochs"),  # a typo through monai.bundle is not a new key
    ("train", ["--epochs", "0"], "epochs must be an integer >= 1, got 0"),  # nothing replaced before a resume
    ("train", ["--learning_rate", "nan"], "learning_rate must be a finite number > 0"),  # not a number
    ("inference", ["--moving", "zero.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz"], "is constant"),  # blank image
    ("inference", PAIR + ["--moving_label", "float_label.nii.gz"], "has non-integer values"),  # not a label map
    (
        "inference",
        ["--moving", "four_d.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz"],
        "a 4-D image; give one 2D or 3D image per file",
    ),  # 4-D image
    (
        "inference",
        ["--moving", "truncated.nii.gz", "--fixed", f"{S1}/aligned_norm.nii.gz"],
        "cannot read the data of moving .*truncated or corrupt",
    ),  # truncated .nii.gz
    ("inference", PAIR + ["--model_path", "corrupt.pt"], "is not a weights-only PyTorch checkpoint"),  # corrupt .pt
    ("inference", PAIR + ["--refine_lr", "1e999"], "refine_lr must be a finite number > 0"),  # overflows to inf
    (
        "inference",
        ["--moving", f"{S2}/aligned_norm.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz", "--resample", "True"],
        "is a 3-D image but fixed .* is 2-D; give a moving and a fixed image of one dimensionality",
    ),  # resampling that changes dimensionality
    (
        "register",
        ["--moving", f"{S2}/aligned_norm.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz"],
        "is a 3-D image but fixed .* is 2-D",
    ),  # no advice to set the spatial_dims that would fail the other way
    (
        "register",
        ["--moving", f"{S2}/slice_seg4.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz"],
        "looks like a label map .*pass it as --moving_label",
    ),  # a label map registered as an image
    ("register", ["--moving", "dot.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz"], "is nearly empty"),  # one voxel
    ("register", PAIR + ["--max_memory_gb", "0.01"], "max_memory_gb 0.01 is below the 0.6 GiB"),  # no cropping advice
    ("register", ["--pairs", "pairs_twice.csv"], "line 3 repeats line 2"),  # the same pair twice
    ("register", ["--pairs", "pairs_no_rows.csv"], "has its header but no rows"),  # nothing to register
    ("inference", PAIR + ["--overwrite", "nope"], "overwrite must be true or false"),  # not a boolean
    ("train", ["--resume", "nope"], "resume must be true or false"),  # not a boolean
    ("inference", PAIR + ["--output_dir", "afile/out"], "'afile' is not a writable folder"),  # unwritable output
    ("register", PAIR + ["--output_dir", "afile/out"], "'afile' is not a writable folder"),  # unwritable output
]


@pytest.mark.parametrize("entry,args,message", BAD_INPUTS)
def test_bad_inputs_one_error_line_nothing_written(infer_ws, entry, args, message):
    out = infer_ws / f"bad_{entry}"
    model = ["--model_path", "both.pt"] if "--model_path" not in args else []
    output = ["--output_dir", str(out)] if "--output_dir" not in args else []
    epochs = ["--epochs", "1"] if "--epochs" not in args else []
    before = {p: p.stat().st_mtime_ns for p in infer_ws.rglob("*") if p.is_file()}
    cmd = {
        "inference": INFERENCE + model + output,
        "register": REGISTER + model + output,
        "evaluate": EVALUATE + model + ["--eval_dir", str(out), "--num_val", "0", "--num_test", "0"],
        "train": TRAIN + ["--output_dir", str(out), "--ckpt_dir", str(out / "models")] + epochs,
    }[entry] + args
    proc = run(cmd, cwd=infer_ws, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), last
    assert not out.exists()
    assert {p: p.stat().st_mtime_ns for p in infer_ws.rglob("*") if p.is_file()} == before  # nothing changed


def test_rerun_refuses_overwrite_replaces_and_interrupt_leaves_complete_pairs(infer_ws, tmp_path):
    """A rerun into a folder holding its outputs is refused unless --overwrite True; 3D inputs need no
    --spatial_dims; a CSV with a byte-order mark is read; Ctrl-C exits 130 with one line and no partial files."""
    out = tmp_path / "out"
    (infer_ws / "bom.csv").write_text(f"moving,fixed\n{S2}/slice_norm.nii.gz,{S1}/slice_norm.nii.gz\n", "utf-8-sig")
    cmd = INFERENCE + ["--model_path", "both.pt", "--pairs", "bom.csv", "--output_dir", str(out), "--refine_steps", "0"]
    first = run(cmd, cwd=infer_ws)
    assert "LNCC" in first.stdout and "_ddf.mha" in first.stdout  # the files written and the similarity
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for flag in ([], ["--overwrite", "false"]):  # a lowercase false is false
        again = run(cmd + flag, cwd=infer_ws, check=False)
        assert again.returncode == 2 and "already holds outputs of these pairs" in again.stderr.strip().splitlines()[-1]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    header = next(csv.DictReader((out / "pairs_out.csv").open()))
    assert set(header) >= {"lncc_before", "lncc_after", "warning"}
    run(cmd + ["--overwrite", "True"], cwd=infer_ws)
    assert all(p.stat().st_mtime_ns > stamps[p.name] for p in out.iterdir())
    warped = next(out.glob("*_warped.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(warped))  # now a user's file
    foreign = run(cmd + ["--overwrite", "yes"], cwd=infer_ws, check=False)
    assert foreign.returncode == 2 and "was not written by vxm-lite" in foreign.stderr.strip().splitlines()[-1]
    assert nib.load(str(warped)).shape == (2, 2, 2)  # never replaced
    torch.save(RegistrationNet(3, "both").state_dict(), tmp_path / "both3d.pt")
    volumes = ["--moving", f"{S2}/aligned_norm.nii.gz", "--fixed", f"{S1}/aligned_norm.nii.gz"]
    slow = INFERENCE + volumes + ["--model_path", str(tmp_path / "both3d.pt"), "--output_dir", str(tmp_path / "cut")]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        slow + ["--refine_steps", "100000", "--refine_tolerance", "0"],
        cwd=infer_ws,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # pytest-xdist workers ignore SIGINT
    )
    seen, deadline = b"", time.time() + 300
    try:
        while b"refine" not in seen and proc.poll() is None and time.time() < deadline:  # during the work
            seen += os.read(proc.stderr.fileno(), 4096)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    stderr = (seen + proc.stderr.read()).decode()
    assert code == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted")
    assert not (tmp_path / "cut").exists() or not any((tmp_path / "cut").iterdir())


def test_inference_elsewhere_names_the_bundle_root(tmp_path):
    proc = run(INFERENCE[:-1] + [str(REPO / "bundle/configs/inference.json")] + PAIR, cwd=tmp_path, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and f"in the bundle root {str(tmp_path / 'bundle')!r}" in last
    assert "run from the repository root or pass --bundle_root" in last


def test_resume_after_sigkill(tmp_path):
    ws = workspace(tmp_path / "ws")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "bundle/configs/train.json",
        "--epochs",
        "200",
        "--val_interval",
        "100",
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ws, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpt_dir = ws / "runs" / "train" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt_dir.is_dir() and list(ckpt_dir.glob("*checkpoint_[2-9]*.pt"))):
        time.sleep(0.2)
    time.sleep(0.3)  # kill somewhere in the middle of a later epoch (or of a checkpoint write)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = latest_checkpoint(ckpt_dir)
    assert latest is not None
    state = torch.load(latest, weights_only=True)  # never a corrupt file
    assert "best" in state  # the best-model score travels with the resume checkpoint
    done = state["trainer"]["iteration"] // state["trainer"]["epoch_length"]  # Ignite keeps no epoch key
    assert done >= 2
    resumed = run(cmd[:-4] + ["--epochs", str(done + 1), "--resume", "True"], cwd=ws)
    log = resumed.stdout + resumed.stderr
    assert f"after epoch {done} (" in log and Path(latest).name in log and "resuming run" in log  # what it continues
    assert f"Epoch[{done + 1}] Complete" in log and "Epoch[1] Complete" not in log
    final = torch.load(latest_checkpoint(ckpt_dir), weights_only=True)["trainer"]
    assert final["iteration"] // final["epoch_length"] == done + 1


def test_torchrun_two_ranks_share_the_disk_cache_and_only_rank_0_writes(tmp_path):
    """Two ranks, each loading its half of the subjects through one disk cache; rank 0 alone writes checkpoints,
    TensorBoard and the epoch summaries; ranks with different pair counts run the same iterations (no hang)."""
    ws = workspace(tmp_path / "ws", num_subjects=9)  # 5 training subjects: shares of 3 and 3 (one repeated)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training"]
    cmd += ["--config_file", "['bundle/configs/train.json','bundle/configs/multi_gpu_train.json']", "--epochs", "2"]
    cmd += ["--cache", "disk", "--cache_dir", "runs/cache", "--num_workers", "1", "--batch_size", "3"]
    cmd += ["--pretrained", "True"]  # needs train.json's imports (custom.pretrained) under torchrun too
    proc = run(cmd, cwd=ws, timeout=300)
    log = proc.stdout + proc.stderr
    assert len(re.findall(r"epoch \d/2: train_loss", log)) == 2  # one summary per epoch, from rank 0 only
    shares = re.findall(r"train split: 3 subjects, (\d+) frames", log)
    assert len(shares) == 2 and shares[0] != shares[1]  # the ranks' shares differ, yet neither rank waits forever
    assert len(list((ws / "runs" / "cache").glob("*.pt"))) == 7  # 5 training + 2 validation subjects, cached once
    events = list((ws / "runs" / "train" / "tensorboard").glob("events.out.tfevents.*"))
    assert len({e.name.split(".")[-2] for e in events}) == 1  # the pid of one process: rank 0
    checkpoints = ws / "runs" / "train" / "checkpoints"
    run_id = json.loads((checkpoints / "run.json").read_text())["run_id"]
    assert [p.name for p in checkpoints.glob("*.pt")] == [f"{run_id}_checkpoint_2.pt"]  # rank 0's run id
    assert {"model.pt", "model_final.pt"} <= {p.name for p in (ws / "bundle" / "models").iterdir()}


@pytest.mark.parametrize("override", ["evaluate.json", "multi_gpu_train.json"])
def test_override_configs_add_to_the_imports(override):
    """MONAI replaces a list when merging configs: an override config adds imports with "+imports"."""
    from monai.bundle import ConfigParser

    base = json.loads((REPO / "bundle" / "configs" / "train.json").read_text())["imports"]
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundle" / "configs" / name) for name in ("train.json", override)])
    merged = parser.get("imports")
    assert merged[: len(base)] == base and "$import custom.one_line_errors" in merged
    if override == "multi_gpu_train.json":
        assert merged[len(base) :] == ["$import torch.distributed as dist"]


def test_documented_defaults_match_train_json():
    """The bundle README's list of training options gives each default as train.json has it."""
    text = (REPO / "bundle" / "docs" / "README.md").read_text()
    paragraph = text[text.index("Every option is a top-level key") :].split("\n\n")[0]
    documented = dict(re.findall(r"`(\w+)` \(([^)]*)\)", paragraph))
    config = json.loads((REPO / "bundle" / "configs" / "train.json").read_text())
    assert len(documented) >= 20
    for key, value in documented.items():
        assert key in config, f"documented option {key!r} is not a top-level key of train.json"
        actual = config[key]
        if isinstance(actual, str) and actual.startswith("$"):
            continue  # an expression, described in words
        literal = json.dumps(actual).strip('"')
        assert re.split(r"[;:]", value)[0].strip() == literal, f"{key}: documented {value!r}, train.json {literal!r}"


def test_short_amp_training_quiet_logs_epoch_length(tmp_path):
    """amp: true trains (the loss decreases), epoch_length bounds an epoch, val_max_pairs bounds validation,
    and the log has one summary line per epoch instead of a line per iteration."""
    ws = workspace(tmp_path / "ws", num_subjects=4)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundle/configs/train.json"]
    cmd += ["--amp", "True", "--epochs", "6", "--epoch_length", "4", "--batch_size", "4", "--val_max_pairs", "3"]
    cmd += ["--num_val", "2", "--num_test", "0", "--learning_rate", "0.003"]
    proc = run(cmd, cwd=ws)
    log = proc.stdout + proc.stderr
    losses = [float(v) for v in re.findall(r"epoch \d+/6: train_loss (-?[\d.]+)", log)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert "Iter:" not in log  # no line per iteration
    state = torch.load(latest_checkpoint(ws / "runs" / "train" / "checkpoints"), weights_only=True)
    assert state["trainer"]["iteration"] == 6 * 4 and state["trainer"]["epoch_length"] == 4


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_semi_supervised_augmented_training_validated_by_dice(tmp_path, spatial_dims):
    """train.json with label_weight, augment, synth_mix, val_subjects and val_metric dice runs: the held-out subjects
    are not trained on, the synthetic pairs join the real ones in every epoch, and the best model is kept by the
    held-out Dice."""
    ws = workspace(tmp_path / "ws", num_subjects=4)
    held = ["OASIS_OAS1_0003_MR1", "OASIS_OAS1_0004_MR1"]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundle/configs/train.json"]
    cmd += ["--spatial_dims", str(spatial_dims), "--label_weight", "1.0", "--augment", "True", "--synth_mix", "2"]
    cmd += ["--val_metric", "dice", "--val_subjects", repr(held)]
    cmd += ["--num_test", "0", "--epochs", "2", "--batch_size", "2", "--ckpt_dir", "runs/models"]
    proc = run(cmd, cwd=ws)
    log = proc.stdout + proc.stderr
    scores = [float(v) for v in re.findall(r"Metrics -- val_dice: ([\d.]+)", log)]
    assert len(scores) == 2 and all(0 < v <= 1 for v in scores)
    assert len(re.findall(r"epoch \d/2: train_loss", log)) == 2
    real = build_pair_dataset(ws / "data" / "demo", "train", spatial_dims, val_subjects=held, num_test=0)
    assert {u["subject"] for u in real.frames.units}.isdisjoint(held)
    state = torch.load(latest_checkpoint(ws / "runs" / "train" / "checkpoints"), weights_only=True)
    assert state["trainer"]["iteration"] == 2 * math.ceil((len(real) + 2) / 2)  # real and 2 synthetic pairs, batch 2
    assert (ws / "runs" / "models" / "model.pt").is_file() and "val_ncc" not in log


META_FORMAT = "_meta_#network_data_format"
NET_IN_OUT = [
    # (spatial_dims, the declared size of "*", meta overrides): what verify_net_in_out exercises
    (2, 1, {}),  # the declared 2D format, as the zoo's CI runs it
    (2, 37, {}),  # an odd size: the network pads internally
    (3, 9, {"inputs#image#spatial_shape": ["*"] * 3, "outputs#pred#spatial_shape": ["*"] * 3}),  # 3D format
]


@pytest.mark.parametrize("spatial_dims, size, meta", NET_IN_OUT)
def test_metadata_shapes_are_what_the_network_takes(spatial_dims, size, meta):
    """metadata.json declares any spatial size and one field channel per axis; MONAI's verify_net_in_out runs the
    inference network on what it declares, in 2D and (with the 3D format) in 3D; a wrong channel count fails."""
    from monai.bundle import verify_net_in_out

    metadata = json.loads((REPO / "bundle" / "configs" / "metadata.json").read_text())
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == ["*", "*"]
    overrides = {f"{META_FORMAT}#{key}": value for key, value in meta.items()}
    overrides[f"{META_FORMAT}#outputs#pred#num_channels"] = spatial_dims
    common = dict(
        net_id="network_def",
        meta_file=str(REPO / "bundle" / "configs" / "metadata.json"),
        config_file=str(REPO / "bundle" / "configs" / "inference.json"),
        bundle_root=str(REPO / "bundle"),
        spatial_dims=spatial_dims,
        any=size,
    )
    verify_net_in_out(**common, **overrides)
    overrides[f"{META_FORMAT}#outputs#pred#num_channels"] = spatial_dims + 1
    with pytest.raises(ValueError, match=f"output channel number `{spatial_dims}` doesn't match"):
        verify_net_in_out(**common, **overrides)


def test_one_version_for_the_package_and_the_bundle():
    """setup.cfg reads custom.__version__; metadata.json states it, with its changelog entry first."""
    import custom

    metadata = json.loads((REPO / "bundle" / "configs" / "metadata.json").read_text())
    assert metadata["version"] == custom.__version__ == next(iter(metadata["changelog"]))
    assert "version = attr: custom.__version__" in (REPO / "setup.cfg").read_text()
