"""The fire CLI, and the study end to end on tiny data."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from warm_python import python_env, run_python

from custom import RegistrationNet
from custom.accuracy_subjects import OURS
from custom.cli import _commands, boolean_options, parse_booleans
from custom.data import make_demo
from custom.pretrained import trained_subjects

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def cli(args, cwd, check=True):
    cmd = [sys.executable, "-m", "custom"] + (shlex.split(args) if isinstance(args, str) else args)
    env = {"PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = run_python(cmd, cwd, {**env, "HOME": str(cwd)}, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def add_native_scan(folder: Path, degrees: float = 8.0, shift_mm=(6.0, -4.0, 3.0), pad: int = 4):
    """Give a neurite-OASIS-style subject its "native" norm.nii.gz and seg4.nii.gz: its aligned scan and labels
    padded, with axes permuted and flipped (another orientation and field of view) and moved rigidly in the world
    (rotated about z, shifted), voxel for voxel."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    world = np.array([[c, -s, 0, shift_mm[0]], [s, c, 0, shift_mm[1]], [0, 0, 1, shift_mm[2]], [0, 0, 0, 1]])
    for aligned, native in (("aligned_norm", "norm"), ("aligned_seg4", "seg4")):
        image = nib.load(folder / f"{aligned}.nii.gz")
        data = np.flip(np.transpose(np.pad(np.asarray(image.dataobj), pad), (1, 0, 2)), 0)
        to_padded = np.zeros((4, 4))  # native voxel -> padded aligned voxel
        to_padded[1, 0], to_padded[0, 1], to_padded[2, 2], to_padded[3, 3] = -1, 1, 1, 1
        to_padded[1, 3] = data.shape[0] - 1
        unpad = np.eye(4)
        unpad[:3, 3] = -pad
        affine = world @ image.affine @ unpad @ to_padded
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(folder / f"{native}.nii.gz"))


def test_a_native_scan_is_its_aligned_scan_moved(tmp_path):
    """The helper's native scan holds every aligned voxel's value at that voxel's world point moved by the rigid
    motion (rotated 8 degrees about z, shifted), on another grid (padded, axes permuted and flipped)."""
    make_demo(tmp_path, num_subjects=2, shape=(16, 18, 20))
    folder = tmp_path / "OASIS_OAS1_0001_MR1"
    add_native_scan(folder)
    for aligned_name, native_name in (("aligned_norm", "norm"), ("aligned_seg4", "seg4")):
        aligned, native = nib.load(folder / f"{aligned_name}.nii.gz"), nib.load(folder / f"{native_name}.nii.gz")
        assert native.shape == (26, 24, 28) and not np.allclose(native.affine[:3, :3], aligned.affine[:3, :3])
        c, s = np.cos(np.radians(8.0)), np.sin(np.radians(8.0))
        motion = np.array([[c, -s, 0, 6.0], [s, c, 0, -4.0], [0, 0, 1, 3.0], [0, 0, 0, 1]])
        voxels = np.stack(np.meshgrid(*[np.arange(n) for n in aligned.shape], indexing="ij"), -1).reshape(-1, 3)
        points = np.c_[voxels, np.ones(len(voxels))] @ (np.linalg.inv(native.affine) @ motion @ aligned.affine).T
        index = np.round(points[:, :3]).astype(int)
        assert np.allclose(points[:, :3], index, atol=1e-6)  # whole voxels of the native grid
        found = np.asarray(native.dataobj)[tuple(index.T)]
        assert np.array_equal(found, np.asarray(aligned.dataobj)[tuple(voxels.T)])


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_demo(root / "data" / "demo", num_subjects=12, shape=(24, 28, 20))
    for subject in ("OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1"):  # in native space too
        add_native_scan(root / "data" / "demo" / subject)
    (root / "bundle" / "models").mkdir(parents=True)
    torch.save(RegistrationNet(2, "both").state_dict(), root / "bundle" / "models" / "model.pt")
    return root


@pytest.mark.parametrize(
    "command", ["register", "apply", "plot", "evaluate", "benchmark", "make-demo", "export-bundle", "study", "accuracy"]
)
def test_help_for_each_command(ws, command):
    proc = cli([command, "--help"], ws)
    text = proc.stdout + proc.stderr  # fire prints help on stderr
    assert "SYNOPSIS" in text and "FLAGS" in text
    assert f"vxm-lite {command}" in text or f"vxm-lite {command.replace('-', '_')}" in text


def test_shared_options_are_declared_once():
    """plot takes evaluate's model, split and data options; evaluate takes register's refinement options: one
    declaration and one description each, in the signature fire parses and the help it prints."""
    import inspect

    from custom.cli import REFINE_OPTIONS, SPLIT_OPTIONS, Commands, with_options_of

    plot = list(inspect.signature(Commands.plot).parameters)
    assert plot == [*SPLIT_OPTIONS, "output_dir", "num_pairs"]
    evaluate = inspect.signature(Commands.evaluate).parameters
    assert list(evaluate)[-len(REFINE_OPTIONS) :] == list(REFINE_OPTIONS) and "options" not in evaluate
    for name in REFINE_OPTIONS:
        assert evaluate[name].default == inspect.signature(Commands.register).parameters[name].default
    assert "    refine_lr: refinement learning rate" in inspect.getdoc(Commands.evaluate)
    assert "    seed: the split seed, as in training." in inspect.getdoc(Commands.plot)

    def source(a: int = 1, b: int = 2):
        """Source.

        Args:
            a: the first.
            b: the second,
                on two lines.
        """

    @with_options_of(source, ["b"])
    def command(c: int = 3, **options):
        """Command.

        Args:
            c: its own.
        """
        return c, options

    assert command() == (3, {"b": 2}) and command(5, c=4) == (4, {"b": 5})
    assert inspect.getdoc(command).endswith("b: the second,\n        on two lines.\n    c: its own.")
    with pytest.raises(TypeError, match="a"):
        command(a=1)


def test_top_level_help_lists_every_command(ws):
    from custom.cli import Commands

    proc = cli(["--help"], ws)
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    expected = sorted(name.replace("_", "-") for name in dir(Commands) if not name.startswith("_"))
    assert listed == expected and "register" in listed and "export-bundle" in listed


def _documented_cli_commands():
    """The `python -m custom ...` commands of bundle/docs/README.md, grouped: an `apply` goes with the `register`
    before it, which writes its field."""
    from test_bundle import documented_commands  # pytest puts tests/ on sys.path

    groups = []
    for cmd in documented_commands(REPO / "bundle" / "docs" / "README.md"):
        if cmd.startswith("python -m custom apply ") and groups:
            groups[-1].append(cmd)
        elif cmd.startswith("python -m custom "):
            groups.append([cmd])
    return groups


DOCUMENTED = _documented_cli_commands()
STUDY = next(g[0] for g in DOCUMENTED if " study " in g[0])
ACCURACY_3D = next(
    g[0] for g in DOCUMENTED if " accuracy --spatial_dims 3 --output_dir results/accuracy_3d_demo" in g[0]
)
CHECKED_APART = (STUDY, ACCURACY_3D)  # run, with their outputs checked, by test_study_end_to_end and ..._3d_...


def test_the_documented_commands_are_found():
    commands = [c for group in DOCUMENTED for c in group]
    assert any(" study " in c for c in commands) and any(" accuracy " in c for c in commands)
    assert any(" scale" in c for c in commands) and any("benchmark --spatial_dims 3" in c for c in commands)
    assert any(" apply " in c for c in commands)


@pytest.mark.parametrize(
    "group", [g for g in DOCUMENTED if g[0] not in CHECKED_APART], ids=lambda g: g[0][len("python -m custom ") :][:40]
)
def test_documented_cli_commands_run(ws, group):
    """Every `python -m custom ...` command shown in bundle/docs/README.md, in a scratch copy of the layout (each
    group a case of its own, so the slow ones run side by side; the study and the 3D accuracy benchmark run in
    their own tests, which check their outputs)."""
    for cmd in group:
        extra = ""
        shape = "[16,16,16]" if "--spatial_dims 3" in cmd else "[32,32]"
        extra += f" --shape {shape} --batch_size 2 --repeats 1" if " benchmark" in cmd else ""
        extra += (
            " --subjects 6 --spatial_dims 2 --ranks 1 --source data/demo --epoch_length 1" if " scale" in cmd else ""
        )
        extra += (
            " --budget_minutes 0.05 --max_pairs 2 --refine_steps 2 --default_refine_steps 2"
            if " accuracy" in cmd
            else ""
        )
        extra += " --subject_pairs 0" if " accuracy --spatial_dims 3" in cmd else ""  # run by test_accuracy_3d_...
        extra += " --threads 1" if " benchmark" in cmd or " accuracy" in cmd else ""  # beside the other xdist worker
        extra += f" --bundle_root {_bundle_copy(ws)} --max_steps 2 --minutes 2" if " pretrain " in cmd else ""
        extra += f" --env_dir {REPO / '.peers'}" if " peer_envs" in cmd else ""  # made by .ci/run, kept if current
        cli(cmd.replace("python -m custom ", "").replace("../shared/data/oasis_labelled", "data/demo") + extra, ws)


def _bundle_copy(ws):
    """A copy of the shipped weights and their manifest, for pretraining commands to write into."""
    root = ws / "pretrain_bundle"
    if not root.is_dir():
        (root / "models").mkdir(parents=True)
        shutil.copy(REPO / "bundle" / "large_files.yml", root)
        for weights in (REPO / "bundle" / "models").glob("pretrained_*.pt"):
            shutil.copy(weights, root / "models")
    return root


def test_register_plot_evaluate(ws):
    s1, s2 = ws / "data/demo/OASIS_OAS1_0001_MR1", ws / "data/demo/OASIS_OAS1_0002_MR1"
    proc = cli(
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
            "--jacobian",
            "True",
            "--affine",
            "False",
        ],
        ws,
    )
    name = "OASIS_OAS1_0002_MR1_slice_norm__to__OASIS_OAS1_0001_MR1_slice_norm"
    # without the affine stage the printed LNCC before registration is that of the normalised pair; refinement
    # raises it
    from custom.data.transforms import scale_foreground
    from custom.losses import LocalNCCLoss

    before, after = (float(v) for v in re.search(rf"{name}: [\d.]+ s, LNCC (\S+) -> (\S+);", proc.stdout).groups())
    images = [
        scale_foreground(torch.from_numpy(nib.load(s / "slice_norm.nii.gz").get_fdata()[..., 0])) for s in (s2, s1)
    ]
    expected = -float(LocalNCCLoss(2)(images[0][None, None].float(), images[1][None, None].float()))
    assert before == pytest.approx(expected, abs=1e-3) and after > before
    suffixes = ["_ddf.mha", "_jacobian.nii.gz", "_warped.nii.gz", "_warped_label.nii.gz"]
    assert sorted(p.name for p in (ws / "reg").iterdir()) == [name + s for s in suffixes] + ["pairs_out.csv"]
    # the saved field, applied to the moving label map by `apply`, gives register's own warped label map
    field = ws / "reg" / f"{name}_ddf.mha"
    cli(["apply", "--image", str(s2 / "slice_seg4.nii.gz"), "--field", str(field), "--output", "applied.nii.gz"], ws)
    applied = nib.load(ws / "applied.nii.gz")
    assert np.array_equal(applied.get_fdata(), nib.load(ws / "reg" / f"{name}_warped_label.nii.gz").get_fdata())
    cli(["plot", "--split", "all", "--output_dir", "figs"], ws)
    assert sorted(p.name for p in (ws / "figs").iterdir()) == [
        "deformation_grid.png",
        "jacobian.png",
        "registration_grid.png",
    ]
    cli(["evaluate", "--split", "all", "--output_dir", "ev", "--affine", "False"], ws)  # default: documented test
    assert "dice_mean" in (ws / "ev" / "summary.md").read_text()


BOOLEAN_OPTIONS = [(command, option) for command in _commands() for option in boolean_options(command)]
BOOLEAN_WORDS = [("false", "False"), ("No", "False"), ("0", "False"), ("TRUE", "True"), ("yes", "True"), ("1", "True")]


def test_every_command_has_its_booleans_found():
    assert ("register", "overwrite") in BOOLEAN_OPTIONS and ("export-bundle", "overwrite") in BOOLEAN_OPTIONS
    commands = {"register", "evaluate", "apply", "export-bundle", "accuracy", "pretrain", "scale", "peer-envs"}
    assert {c for c, _ in BOOLEAN_OPTIONS} == commands


@pytest.mark.parametrize("command,option", BOOLEAN_OPTIONS)
def test_every_boolean_option_is_parsed_once(command, option):
    """Every boolean option of every command, spelled as a user would: --opt WORD, --opt=WORD, a bare flag."""
    for word, parsed in BOOLEAN_WORDS:
        assert parse_booleans([command, "x", f"--{option}", word, "--y", "1"]) == [
            command,
            "x",
            f"--{option}={parsed}",
            "--y",
            "1",
        ]
        assert parse_booleans([command, f"--{option}={word}"]) == [command, f"--{option}={parsed}"]
    assert parse_booleans([command, f"--{option}", "--y", "1"]) == [command, f"--{option}", "--y", "1"]
    with pytest.raises(ValueError, match=f"{option} must be true or false"):
        parse_booleans([command, f"--{option}", "maybe"])


S1, S2 = "data/demo/OASIS_OAS1_0001_MR1", "data/demo/OASIS_OAS1_0002_MR1"
REGISTER = ["register", "--moving", f"{S2}/slice_norm.nii.gz", "--fixed", f"{S1}/slice_norm.nii.gz"]
APPLY = ["apply", "--image", f"{S2}/slice_norm.nii.gz", "--output", "out/warped.nii.gz"]
BAD_ARGS = [
    # (arguments, message in the one error line); every command writes to "out", which must not appear
    (["evaluate", "--model_path", "nothing.pt"], "model file 'nothing.pt' does not exist"),  # no weights
    (["plot", "--dataset_dir", "nowhere"], "dataset folder 'nowhere' does not exist"),  # no data
    (["make-demo", "data/demo"], "exists and is not empty"),  # never overwrites
    (["study", "--variants", "tiny"], "variants must be among"),  # unknown variant
    (["study", "--losses", "ssim"], "losses among"),  # unknown loss
    (["register", "--fixed", "x.nii.gz"], "give --moving and --fixed"),  # missing moving
    (REGISTER + ["--refine_steps", "-1"], "refine_steps must be an integer >= 0"),  # negative steps
    (REGISTER + ["--refine_lr", "0"], "refine_lr must be a finite number > 0"),  # zero learning rate
    (["evaluate", "--refine_steps", "-3"], "refine_steps must be an integer >= 0"),  # negative steps
    (["evaluate", "--refine_lr", "-1"], "refine_lr must be a finite number > 0"),  # negative learning rate
    (["evaluate", "--label", "aligned_seg35"], "has no aligned_seg35.nii.gz"),  # label file that is missing
    (["accuracy", "--peers", "elastix"], "peers must be among"),  # unknown peer
    (["accuracy", "--test_subjects", "nobody"], "train and test subjects must be disjoint"),  # unknown subject
    (["accuracy", "--refine_steps", "10,-1"], "refine_steps must be an integer >= 0"),  # negative steps
    (["accuracy", "--spatial_dims", "3", "--refine_steps", "[[4,2]]"], "one per level of refine_levels"),  # 2 of 3
    (["accuracy", "--spatial_dims", "3", "--label", "aligned_seg35"], "label map (label='aligned_seg35')"),  # none
    (["accuracy", "--spatial_dims", "3", "--test_subjects", "nobody"], "are not subjects of"),  # unknown subject
    (REGISTER + ["--refine_lr", "nan"], "refine_lr must be a finite number > 0, got 'nan'"),  # not a number
    (REGISTER + ["--refine_levels", "[1,2]"], "refine_levels must go from coarse to fine"),  # fine first
    (APPLY + ["--field", f"{S2}/slice_norm.nii.gz"], "is not a displacement field"),  # an image as the field
    (APPLY + ["--field", "out/none_ddf.mha"], "field file 'out/none_ddf.mha' does not exist"),  # no field
    (["export-bundle", "data"], "holds files that export-bundle did not write"),  # never overwrites
    (["export-bundle", "data", "--overwrite", "True"], "it is never replaced"),  # not even when told
    (["export-bundle", ".", "--overwrite", "True"], "it is the current folder"),  # the checkout itself
    (["export-bundle", "data/demo/subjects.txt/x"], "which is a file"),  # a path under a file: no raw Errno 17
    (["export-bundle", "new", "--overwrite", "maybe"], "overwrite must be true or false"),  # not a boolean
    (REGISTER + ["--similarity", "ncc"], "similarity must be 'lncc' or 'mse', got 'ncc'"),  # the option's name
    (REGISTER + ["--model_path", "data"], "model file 'data' is a folder"),  # a folder is not missing
]


@pytest.mark.parametrize("args,message", BAD_ARGS)
def test_bad_arguments_one_line(ws, args, message):
    out = [] if args[0] in ("make-demo", "apply", "export-bundle") else ["--output_dir", "out"]
    proc = cli(args + out, ws, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not (ws / "out").exists()


def test_accuracy_end_to_end(ws):
    """The accuracy benchmark on tiny demo data: every row, measured in one run (ANTs when installed)."""
    from custom.methods import ants_available

    cli(
        "accuracy --output_dir acc --budget_minutes 0.05 --max_pairs 3 --offset 2 --refine_steps 2,4 "
        "--default_refine_steps 2 --batch_size 4 --threads 1",
        ws,
    )
    table = (ws / "acc" / "accuracy.md").read_text()
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ")]
    expected = [
        "identity (no registration)",
        "ours (both)",
        "ours + refine 2 steps",
        "ours + refine 4 steps",
        "refine 2 steps from zero (no network)",
        "pretrained, synthetic data only (no training here)",
        "pretrained + refine 2 steps",
        "MONAI VoxelMorph (same data and budget)",
    ] + (["ANTs SyN (antspyx)"] if ants_available() else [])
    assert rows == ["method"] + expected
    results = json.loads((ws / "acc" / "results.json").read_text())
    identity = results["summary"]["identity (no registration)"]
    assert identity["nonpositive_percent"]["mean"] == 0.0 and identity["log_jacobian_std"]["mean"] == 0.0
    for name in expected:
        summary = results["summary"][name]
        dice, worst = summary["dice_mean"]["mean"], summary["dice_worst30"]["mean"]
        assert 0 <= dice <= 1 and worst <= dice + 1e-9
        assert len(results["pairs"][name]) == 3
    # the test subject is never trained on
    assert (ws / "acc" / "train_data" / "subjects.txt").read_text().split() == [
        f"OASIS_OAS1_{i:04d}_MR1" for i in range(1, 12)
    ]
    # a second run reuses the trained models and measures every registration again
    proc = cli(
        "accuracy --output_dir acc --max_pairs 2 --offset 2 --refine_steps 2 --default_refine_steps 2 "
        "--reuse_models True --peers monai",
        ws,
    )
    assert "reusing the ours model" in proc.stdout and "reusing the monai model" in proc.stdout
    assert "models of an earlier run" in (ws / "acc" / "accuracy.md").read_text()


def test_accuracy_3d_end_to_end(ws):
    """The 3D benchmark on tiny demo volumes: known deformations of a labelled subject, every method in a process
    of its own with its CPU seconds and peak memory; ANTs when installed."""
    from custom.methods import ants_available

    extra = " --test_subjects OASIS_OAS1_0012_MR1 --pairs_per_subject 2 --max_displacement 1.5 --refine_steps [[4,2,0]]"
    extra += " --threads 1"
    cli(ACCURACY_3D.replace("python -m custom ", "") + extra + " --subject_pairs 1", ws)  # the documented command
    out = ws / "results" / "accuracy_3d_demo"
    results = json.loads((out / "results.json").read_text())
    expected = [
        "identity (no registration)",
        "network alone (both)",
        "network + refine, default ([60, 10, 5] steps)",
        "network + refine [4, 2, 0] steps",
        "refine from zero, default (no network)",
    ] + (["ANTs SyN (antspyx defaults)"] if ants_available() else [])
    assert list(results["summary"]) == expected
    table = (out / "accuracy.md").read_text()
    assert "## Known deformations: 2 pairs" in table
    assert "| method | Dice | Dice worst 30% | HD95 (vox) | % folding | min det | SDlogJ | wall s | CPU s |" in table
    identity = results["summary"]["identity (no registration)"]
    assert identity["nonpositive_percent"]["mean"] == 0.0 and identity["jacobian_min"]["mean"] == 1.0
    assert "cpu_s" not in identity
    assert identity["dice_mean"]["mean"] < 0.95  # the known deformations move the labels
    for name in expected[1:]:
        summary, pairs = results["summary"][name], results["pairs"][name]
        assert len(pairs) == 2 and {p["fixed"] for p in pairs} == {"OASIS_OAS1_0012_MR1"}
        assert 0 <= summary["dice_mean"]["mean"] <= 1 and summary["jacobian_min"]["mean"] <= 1.5
        assert summary["cpu_s"]["mean"] > 0 and summary["wall_s"]["mean"] > 0
        assert 0.1 < summary["peak_rss_gib"]["mean"] < 8
    default = results["summary"]["network + refine, default ([60, 10, 5] steps)"]
    assert default["dice_mean"]["mean"] > identity["dice_mean"]["mean"]
    # real subject pairs, each tool run whole from the files: subject 1 to 2, aligned and from its native scan
    sections = results["subjects"]
    assert list(sections) == ["aligned -> aligned", "native -> aligned"]
    rows = ["no registration (world coordinates)", *OURS] + (
        ["ANTs SyN (antspyx defaults)"] if ants_available() else []
    )
    for name, section in sections.items():
        assert list(section["summary"]) == rows and f"## Real subject pairs, {name}: OASIS_OAS1_0001_MR1 -> " in table
        dice = {row: section["summary"][row]["dice_mean"]["mean"] for row in rows}
        assert dice["ours, register defaults"] > dice["no registration (world coordinates)"]
        assert section["summary"]["ours, affine stage alone"]["jacobian_min"]["mean"] == 1.0  # a zero field
        assert all(section["summary"][row]["cpu_s"]["mean"] > 0.5 for row in rows[1:])  # imports and I/O counted
    native = sections["native -> aligned"]["summary"]
    assert native["no registration (world coordinates)"]["dice_mean"]["mean"] < 0.3  # moved and turned in the world
    # pairs of subjects the shipped model was trained on are marked (the demo's subjects bear OASIS names)
    marked = "Not held out: the shipped model was trained on the subjects of OASIS_OAS1_0001_MR1 -> OASIS_OAS1_0002_MR1"
    assert (marked in table) == ("OASIS_OAS1_0001_MR1" in trained_subjects(REPO / "bundle", 3, "both"))
    assert native["ours, affine stage alone"]["dice_mean"]["mean"] > 0.6  # the affine stage undoes it


def test_study_end_to_end(ws):
    extra = " --epochs 1 --num_val 2 --num_test 2 --batch_size 4 --variants both,reduced --threads 1"
    cli(STUDY.replace("python -m custom ", "") + extra, ws)  # the documented command, on tiny data
    run = ws / "results" / "demo"
    report = (run / "report.md").read_text()
    assert "| loss | variant | params |" in report and "Machine:" in report and "python -m custom study" in report
    for loss in ("mse", "lncc"):
        assert (run / f"loss_curves_{loss}.png").is_file()
        for variant in ("both", "reduced"):
            assert f"| {loss} | {variant} | 45,106 |" in report
            for png in ("registration_grid.png", "deformation_grid.png", "jacobian.png"):
                assert (run / loss / variant / png).read_bytes().startswith(b"\x89PNG")
    # the networks alone (the paper's comparison) and, as its own column, with the default refinement
    results = json.loads((run / "results.json").read_text())["runs"]
    assert "| Dice | % folding | inference s/pair | Dice + refinement |" in report and len(results) == 4
    for r in results:
        assert 0 <= r["summary"]["dice_mean"]["mean"] <= 1 and 0 <= r["refined"]["dice_mean"]["mean"] <= 1
    assert "| - | none (identity) |" in report
    data = json.loads((run / "results.json").read_text())
    assert data["identity"]["nonpositive_percent"]["mean"] == 0.0 and data["identity"]["log_jacobian_std"]["mean"] == 0
    results = data["runs"]
    assert len(results) == 4 and all(r["max_batch"] >= 1 and r["peak_mb_1"] > 0 for r in results)
    assert all(0 <= r["summary"]["dice_mean"]["mean"] <= 1 for r in results)


def test_warm_runs_are_processes_of_their_own(tmp_path):
    """The tests' warm runner (tests/warm_python.py) gives what a new interpreter gives: the same exit status and
    output, the command's own working directory and environment, and a kill at the timeout."""
    env = {**python_env(), "HOME": str(tmp_path)}
    bad = [sys.executable, "-m", "custom", "register", "--moving", "missing.nii.gz", "--fixed", "missing.nii.gz"]
    warm = run_python(bad, tmp_path, env)
    cold = subprocess.run(bad, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (warm.returncode, warm.stdout, warm.stderr) == (cold.returncode, cold.stdout, cold.stderr)
    assert warm.returncode == 2 and "missing.nii.gz" in warm.stderr
    (tmp_path / "probe.py").write_text("import os\nprint(os.getcwd(), os.environ['PROBE'])\n")
    probe = run_python([sys.executable, "-m", "probe"], tmp_path, {**env, "PROBE": "mine"})  # found in its cwd
    assert probe.returncode == 0 and probe.stdout.split() == [str(tmp_path), "mine"], probe.stderr
    made = run_python(
        [sys.executable, "-m", "custom", "make-demo", "d", "--num_subjects", "2", "--shape", "[8,8,8]"], tmp_path, env
    )
    assert made.returncode == 0 and len(list((tmp_path / "d").iterdir())) >= 2  # in the command's directory
    with pytest.raises(subprocess.TimeoutExpired):
        run_python([sys.executable, "-m", "custom", "make-demo", "e", "--num_subjects", "40"], tmp_path, env, 0.5)
