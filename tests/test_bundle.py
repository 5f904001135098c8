"""Every bundle config and stock MONAI verb, end to end on tiny data, as the docs show them."""

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

from custom import RegistrationNet
from custom.data import make_demo
from custom.workflow import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "monai" / "meta_schema_20240725.json"
TINY = (24, 28, 20)
INFERENCE = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundle/configs/inference.json"]
pytestmark = pytest.mark.slow


def workspace(root: Path, num_subjects: int = 12) -> Path:
    """A folder laid out like the repository root for the commands: bundle/configs (linked), data/demo (tiny)."""
    (root / "bundle").mkdir(parents=True)
    (root / "bundle" / "configs").symlink_to(REPO / "bundle" / "configs")
    make_demo(root / "data" / "demo", num_subjects=num_subjects, shape=TINY)
    if SCHEMA.is_file():
        (root / "schema").mkdir()
        (root / "schema" / SCHEMA.name).write_bytes(SCHEMA.read_bytes())
    return root


def run(cmd, cwd, check=True, timeout=600, **kwargs):
    args = shlex.split(cmd) if isinstance(cmd, str) else cmd
    env = dict(os.environ, PYTHONWARNINGS="ignore", MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
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
    assert written == [
        "OASIS_OAS1_0002_MR1_slice_norm_ddf.nii.gz",
        "OASIS_OAS1_0002_MR1_slice_norm_warped.nii.gz",
        "OASIS_OAS1_0002_MR1_slice_norm_warped_label.nii.gz",
    ]
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
    (ws / "moving").mkdir()
    for name in ("OASIS_OAS1_0002_MR1", "OASIS_OAS1_0003_MR1"):
        (ws / "moving" / f"{name[-7:-4]}.nii.gz").write_bytes((subj / name / "aligned_norm.nii.gz").read_bytes())
    fixed_path = subj / "OASIS_OAS1_0001_MR1" / "aligned_norm.nii.gz"
    base = INFERENCE + ["--spatial_dims", "3", "--model_path", "model.pt"]
    run(base + ["--moving", "moving", "--fixed", str(fixed_path), "--output_dir", "out"], cwd=ws)
    fixed = nib.load(fixed_path)
    assert sorted(p.name for p in (ws / "out").iterdir()) == [
        "002_ddf.nii.gz",
        "002_warped.nii.gz",
        "003_ddf.nii.gz",
        "003_warped.nii.gz",
    ]
    warped, ddf = nib.load(ws / "out" / "002_warped.nii.gz"), nib.load(ws / "out" / "002_ddf.nii.gz")
    assert warped.shape == fixed.shape and ddf.shape == fixed.shape + (3,)
    assert (warped.affine == fixed.affine).all() and warped.header.get_zooms() == fixed.header.get_zooms()
    assert oct(os.stat(ws / "out" / "002_warped.nii.gz").st_mode)[-3:] == "644"
    # a CSV of pairs, paths relative to the CSV; OASIS file names get the subject folder as prefix
    (ws / "pairs.csv").write_text(
        "moving,fixed,moving_label\n"
        "data/demo/OASIS_OAS1_0003_MR1/aligned_norm.nii.gz,data/demo/OASIS_OAS1_0001_MR1/aligned_norm.nii.gz,"
        "data/demo/OASIS_OAS1_0003_MR1/aligned_seg4.nii.gz\n"
    )
    run(base + ["--pairs", "pairs.csv", "--output_dir", "out_csv"], cwd=ws)
    label = nib.load(ws / "out_csv" / "OASIS_OAS1_0003_MR1_aligned_norm_warped_label.nii.gz")
    assert label.get_data_dtype().kind == "i" and label.shape == fixed.shape


@pytest.fixture(scope="module")
def infer_ws(tmp_path_factory):
    ws = workspace(tmp_path_factory.mktemp("inf") / "ws", num_subjects=2)
    torch.save(RegistrationNet(2, "both").state_dict(), ws / "both.pt")
    torch.save(RegistrationNet(2, "maxpool").state_dict(), ws / "maxpool.pt")
    nib.save(nib.Nifti1Image(np.zeros((24, 30, 1), np.float32), np.eye(4)), str(ws / "wide.nii.gz"))
    return ws


S1, S2 = "data/demo/OASIS_OAS1_0001_MR1", "data/demo/OASIS_OAS1_0002_MR1"
BAD_INFERENCE = [
    # (arguments, message)
    (
        ["--moving", f"{S2}/nothing.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz"],
        "moving file .* does not exist",
    ),  # file
    (
        ["--moving", f"{S2}/aligned_norm.nii.gz", "--fixed", f"{S1}/aligned_norm.nii.gz"],
        r"has shape \[24, 28, 20\], but the model registers 2-D images",
    ),  # 3D volumes for a 2D model
    (
        [
            "--moving",
            f"{S2}/slice_norm.nii.gz",
            "--fixed",
            f"{S1}/slice_norm.nii.gz",
            "--moving_label",
            f"{S2}/aligned_seg4.nii.gz",
        ],
        "moving_label .* but the model registers 2-D",
    ),  # label of another shape
    (
        ["--moving", f"{S2}/slice_norm.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz", "--model_path", "maxpool.pt"],
        "checkpoint is for a 2D 'maxpool'.*this network is 2D 'both'",
    ),  # checkpoint of another variant
    (["--fixed", f"{S1}/slice_norm.nii.gz"], "give --moving and --fixed"),  # no moving image
    (["--moving", "wide.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz"], r"has shape \[24, 30\] but fixed"),  # shapes
]


@pytest.mark.parametrize("args,message", BAD_INFERENCE)
def test_bad_inference_inputs(infer_ws, args, message):
    out = infer_ws / "bad_out"
    cmd = INFERENCE + ["--model_path", "both.pt", "--output_dir", str(out)] + args
    proc = run(cmd, cwd=infer_ws, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), last
    assert not out.exists()


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
    while time.time() < deadline and not (ckpt_dir.is_dir() and list(ckpt_dir.glob("checkpoint_[2-9]*.pt"))):
        time.sleep(0.2)
    time.sleep(0.3)  # kill somewhere in the middle of a later epoch (or of a checkpoint write)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = latest_checkpoint(ckpt_dir)
    assert latest is not None
    state = torch.load(latest, weights_only=True)  # never a corrupt file
    done = state["trainer"]["iteration"] // state["trainer"]["epoch_length"]  # Ignite keeps no epoch key
    assert done >= 2
    resumed = run(cmd[:-4] + ["--epochs", str(done + 1), "--resume", "True"], cwd=ws)
    log = resumed.stdout + resumed.stderr
    assert f"Epoch[{done + 1}] Complete" in log and "Epoch[1] Complete" not in log
    final = torch.load(latest_checkpoint(ckpt_dir), weights_only=True)["trainer"]
    assert final["iteration"] // final["epoch_length"] == done + 1
