"""``python -m custom export-bundle``: the exported bundle passes the model zoo's checks in a clean environment that
holds only the packages ``metadata.json`` lists (as the zoo's CI installs them), with no trace of this repository."""

import json
import os
import re
import subprocess
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

from custom.export import MARKER, config_modules, export_bundle

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SCHEMA = SHARED / "monai" / "meta_schema_20240725.json"
REAL = SHARED / "data" / "oasis_real"
pytestmark = pytest.mark.slow

CHECKS = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path

    bundle, schema = Path(sys.argv[1]), sys.argv[2]
    sys.path.insert(0, str(bundle))  # as the zoo's verify_bundle.py does
    import custom
    from monai.bundle import ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out

    assert Path(custom.__file__).resolve().parent == (bundle / "custom").resolve(), custom.__file__
    meta, inference = str(bundle / "configs/metadata.json"), str(bundle / "configs/inference.json")
    if schema:
        target = bundle.parent / "schema" / "schema.json"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(schema, target)
        verify_metadata(meta_file=meta, filepath=str(target), hash_val="06954cad2cc5d3784e72077ac76f0fc8")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=inference, bundle_root=str(bundle))
    ckpt_export(
        net_id="network_def", filepath=str(bundle.parent / "model.ts"), ckpt_file=str(bundle / "models/model.pt"),
        meta_file=meta, config_file=inference, bundle_root=str(bundle),
    )
    missing = {}
    for kind, configs in (("train", ["train.json"]), ("inference", ["inference.json"])):
        workflow = ConfigWorkflow(
            [str(bundle / "configs" / c) for c in configs], workflow_type=kind, meta_file=meta, logging_file=False,
            bundle_root=str(bundle), dataset_dir=str(bundle.parent / "demo"),
        )
        workflow.initialize()
        missing[kind] = workflow.check_properties()
    print("MISSING", json.dumps(missing))
    """)


def clean_environment(root: Path, metadata: dict) -> Path:
    """A virtual environment holding the packages ``metadata.json`` names, at its versions (plus jsonschema, which
    ``verify_metadata`` needs and the zoo's CI installs), and nothing of this repository."""
    venv.create(root, with_pip=True)
    python = root / "bin" / "python"
    packages = [f"torch=={metadata['pytorch_version']}"]  # first: the CPU build
    packages += [f"monai=={metadata['monai_version']}", f"numpy=={metadata['numpy_version']}"]
    packages += [f"{name}=={version}" for name, version in metadata["required_packages_version"].items()]
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + packages[:1], check=True, capture_output=True, timeout=900)
    subprocess.run(pip + packages[1:] + ["jsonschema"], check=True, capture_output=True, timeout=900)
    return python


def run(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONWARNINGS="ignore", MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _foreign(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return folder


REFUSED = [
    # (make the target in tmp_path, overwrite, message); nothing in tmp_path may change
    (_foreign, True, "holds files that export-bundle did not write"),  # someone else's folder, even when told
    (lambda t: Path.cwd(), True, "it is the current folder"),  # the folder the user stands in
    (lambda t: Path.cwd().parent, True, "a parent of the current folder"),  # and its parents
    (lambda t: Path.home(), True, "it is the home folder"),  # home
    (lambda t: (t / "repo" / ".git").mkdir(parents=True) or t / "repo", True, "it is a repository"),  # a checkout
    (lambda t: (t / "afile").write_text("x") and t / "afile" / "out", False, "which is a file"),  # under a file
    (lambda t: (t / "afile").write_text("x") and t / "afile", True, "it is a file"),  # a file
    (lambda t: (t / "b.zip").write_text("x") and t / "b", True, "b.zip' exists and is not an export of"),  # a zip
]


@pytest.mark.parametrize("make,overwrite,message", REFUSED)
def test_export_replaces_only_its_own_earlier_export(tmp_path, monkeypatch, make, overwrite, message):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for folder in ("home", "work"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "work")
    target = make(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(ValueError, match=message):
        export_bundle(target, overwrite=overwrite)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_export_writes_a_marked_bundle_and_replaces_it_only_when_told(tmp_path):
    target = tmp_path / "zoo" / "vxm_lite"
    written = export_bundle(target)
    assert written == str(target.with_suffix(".zip")) and Path(written).is_file()
    assert (target / MARKER).is_file() and MARKER not in str(zipfile.ZipFile(written).namelist())
    stamp = (target / MARKER).stat().st_mtime_ns
    for flag in (False, "false", "No"):  # a lowercase false is false
        with pytest.raises(FileExistsError, match="holds an earlier export; pass --overwrite True"):
            export_bundle(target, overwrite=flag)
    assert (target / MARKER).stat().st_mtime_ns == stamp
    export_bundle(target, overwrite="yes")
    assert (target / MARKER).stat().st_mtime_ns != stamp
    assert sorted(p.name for p in target.iterdir()) == [
        MARKER,
        "LICENSE",
        "configs",
        "custom",
        "docs",
        "large_files.yml",
        "models",
    ]
    assert json.loads((target / "configs" / "inference.json").read_text())["bundle_root"] == "."
    assert "bundle/configs/" not in (target / "docs" / "README.md").read_text()
    assert not list(target.rglob("__pycache__"))
    exported = {str(p.relative_to(target / "custom")) for p in (target / "custom").rglob("*.py")}
    assert {"networks.py", "warp.py", "losses.py", "refine.py", "affine.py", "workflow.py", "data/pairs.py"} <= exported
    tools = {"cli.py", "__main__.py", "study.py", "benchmark.py", "scale.py", "accuracy.py", "pretrain.py", "export.py"}
    assert not tools & exported  # only what the configs reach
    lines = sum(len(p.read_text().splitlines()) for p in (target / "custom").rglob("*.py"))
    stated = re.search(r"(\d+) modules, about ([\d,]+) lines", (REPO / "bundle" / "docs" / "README.md").read_text())
    assert stated and int(stated.group(1)) == len(exported), (stated, len(exported))
    assert abs(int(stated.group(2).replace(",", "")) - lines) <= 0.05 * lines, lines  # the docs state its size


def test_config_modules_follow_the_imports(tmp_path):
    """Every custom.<...> name of a config (targets, expressions, imports) and, transitively, what those import."""
    package = tmp_path / "custom"
    (package / "data").mkdir(parents=True)
    files = {
        "__init__.py": "from custom.core import f\n",
        "core.py": "",
        "glue.py": "import os\nfrom custom.data import loader\n\ndef g():\n    from custom.core import f\n",
        "data/__init__.py": "",
        "data/loader.py": "",
        "tool.py": "from custom.glue import g\n",  # imports what the configs reach, reached by none
    }
    for name, text in files.items():
        (package / name).write_text(text)
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "a.json").write_text(json.dumps({"x": {"_target_": "custom.glue.G"}, "imports": ["$import custom"]}))
    expected = ["custom", "custom.core", "custom.data", "custom.data.loader", "custom.glue"]
    assert config_modules(configs, package) == expected


def test_exported_bundle_passes_the_zoo_checks_in_a_clean_environment(tmp_path):
    bundle = tmp_path / "models" / "vxm_lite_registration"
    export_bundle(bundle, archive=False)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    python = clean_environment(tmp_path / "env", metadata)
    from custom.data import make_demo

    make_demo(tmp_path / "models" / "demo", num_subjects=12, shape=(24, 28, 20))
    checks = tmp_path / "checks.py"
    checks.write_text(CHECKS)
    proc = run([str(python), str(checks), str(bundle), str(SCHEMA) if SCHEMA.is_file() else ""], cwd=tmp_path)
    missing = json.loads(proc.stdout.split("MISSING", 1)[1].strip().splitlines()[0])
    assert missing == {"train": [], "inference": []}
    # inference from the bundle folder, as a zoo user runs it: a real pair of slices when ../shared has them
    data = REAL if REAL.is_dir() else tmp_path / "models" / "demo"
    moving, fixed = sorted(data.glob("*/slice_norm.nii.gz"))[:2]
    command = ["-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--output_dir", "out"]
    run([str(python)] + command + ["--moving", str(moving), "--fixed", str(fixed)], cwd=bundle)
    name = f"{moving.parent.name}_slice_norm__to__{fixed.parent.name}_slice_norm"
    written = {p.name for p in (bundle / "out").iterdir()}
    assert written == {f"{name}_affine.txt", f"{name}_ddf.mha", f"{name}_warped.nii.gz", "pairs_out.csv"}
