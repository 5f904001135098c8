"""The fire CLI, and the study end to end on tiny data."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from custom import RegistrationNet
from custom.data import make_demo

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def cli(args, cwd, check=True):
    cmd = [sys.executable, "-m", "custom"] + (shlex.split(args) if isinstance(args, str) else args)
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={
            "PYTHONWARNINGS": "ignore",
            "MPLBACKEND": "Agg",
            "OMP_NUM_THREADS": "1",
            "PATH": "/usr/bin:/bin",
            "HOME": str(cwd),
        },
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_demo(root / "data" / "demo", num_subjects=12, shape=(24, 28, 20))
    (root / "bundle" / "models").mkdir(parents=True)
    torch.save(RegistrationNet(2, "both").state_dict(), root / "bundle" / "models" / "model.pt")
    return root


@pytest.mark.parametrize("command", ["register", "plot", "evaluate", "benchmark", "make-demo", "study"])
def test_help_for_each_command(ws, command):
    proc = cli([command, "--help"], ws)
    text = proc.stdout + proc.stderr  # fire prints help on stderr
    assert "SYNOPSIS" in text and "FLAGS" in text
    assert f"vxm-lite {command}" in text or f"vxm-lite {command.replace('-', '_')}" in text


def test_documented_cli_commands_run(ws):
    """Every `python -m custom ...` command shown in bundle/docs/README.md, in a scratch copy of the layout."""
    from test_bundle import documented_commands  # pytest puts tests/ on sys.path

    commands = [
        c for c in documented_commands(REPO / "bundle" / "docs" / "README.md") if c.startswith("python -m custom ")
    ]
    assert any(" study " in c for c in commands)
    for cmd in commands:
        extra = " --epochs 1 --num_val 2 --num_test 2 --batch_size 4" if " study " in cmd else ""
        extra += " --shape [32,32] --batch_size 2 --repeats 1" if " benchmark" in cmd else ""
        cli(cmd.replace("python -m custom ", "") + extra, ws)


def test_register_plot_evaluate(ws):
    s1, s2 = ws / "data/demo/OASIS_OAS1_0001_MR1", ws / "data/demo/OASIS_OAS1_0002_MR1"
    cli(
        [
            "register",
            "--moving",
            str(s2 / "slice_norm.nii.gz"),
            "--fixed",
            str(s1 / "slice_norm.nii.gz"),
            "--moving_label",
            str(s2 / "slice_seg4.nii.gz"),
            "--output_dir",
            "reg",
        ],
        ws,
    )
    assert len(list((ws / "reg").iterdir())) == 3
    cli(["plot", "--split", "all", "--output_dir", "figs"], ws)
    assert sorted(p.name for p in (ws / "figs").iterdir()) == [
        "deformation_grid.png",
        "jacobian.png",
        "registration_grid.png",
    ]
    cli(["evaluate", "--split", "all", "--output_dir", "ev"], ws)
    assert "dice_mean" in (ws / "ev" / "summary.md").read_text()


BAD_ARGS = [
    # (arguments, message in the one error line)
    (["evaluate", "--model_path", "nothing.pt"], "model file 'nothing.pt' does not exist"),  # no weights
    (["plot", "--dataset_dir", "nowhere"], "dataset folder 'nowhere' does not exist"),  # no data
    (["make-demo", "data/demo"], "exists and is not empty"),  # never overwrites
    (["study", "--variants", "tiny"], "variants must be among"),  # unknown variant
    (["study", "--losses", "ssim"], "losses among"),  # unknown loss
    (["register", "--fixed", "x.nii.gz"], "give --moving and --fixed"),  # missing moving
]


@pytest.mark.parametrize("args,message", BAD_ARGS)
def test_bad_arguments_one_line(ws, args, message):
    proc = cli(args, ws, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


def test_study_end_to_end(ws):
    cli(
        "study --epochs 1 --run_name tiny --variants both,reduced --losses mse,lncc --num_val 2 --num_test 2 "
        "--batch_size 4",
        ws,
    )
    run = ws / "results" / "tiny"
    report = (run / "report.md").read_text()
    assert "| loss | variant | params |" in report and "Machine:" in report and "python -m custom study" in report
    for loss in ("mse", "lncc"):
        assert (run / f"loss_curves_{loss}.png").is_file()
        for variant in ("both", "reduced"):
            assert f"| {loss} | {variant} | 45,106 |" in report
            for png in ("registration_grid.png", "deformation_grid.png", "jacobian.png"):
                assert (run / loss / variant / png).read_bytes().startswith(b"\x89PNG")
    assert "| - | none (identity) |" in report
    data = json.loads((run / "results.json").read_text())
    assert data["identity"]["nonpositive_percent"]["mean"] == 0.0 and data["identity"]["log_jacobian_std"]["mean"] == 0
    results = data["runs"]
    assert len(results) == 4 and all(r["max_batch"] >= 1 and r["peak_mb_1"] > 0 for r in results)
    assert all(0 <= r["summary"]["dice_mean"]["mean"] <= 1 for r in results)
