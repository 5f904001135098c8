"""``python -m custom export-bundle OUT``: the bundle as the MONAI model zoo takes it.

The repository keeps the Python package at the top (``custom/``) and the bundle in ``bundle/``; the model zoo wants
one self-contained folder, which it puts on ``sys.path``: ``configs/``, ``docs/``, ``LICENSE``, ``models/model.pt``
and ``large_files.yml``, with the code the configs name inside it. The export writes that folder (and a zip of it)
from this checkout: the configs with ``bundle_root`` ``"."``, the docs' paths made relative to the bundle, the
shipped pretrained weights plus ``models/model.pt`` (the default 2D model, which ``evaluate.json`` also reads),
the manifest with every weight file's sha256, and a copy of the ``custom`` package.
"""

import json
import shutil
import tempfile
from pathlib import Path
from typing import Union

import yaml

from custom.pretrained import MANIFEST, pretrained_path, read_manifest, sha256
from custom.runner import bundle_dir

__all__ = ["DEFAULT_MODEL", "export_bundle"]

DEFAULT_MODEL = {"spatial_dims": 2, "variant": "both"}
_ROOT_CONFIGS = ("train.json", "inference.json")
_DOCS_PATHS = {"bundle/configs/": "configs/", "bundle/models/": "models/", "bundle/docs/": "docs/"}


def _copy_package(target: Path) -> None:
    package = Path(__file__).resolve().parent
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))


def _write_configs(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.name in _ROOT_CONFIGS:
            config = json.loads(path.read_text())
            config["bundle_root"] = "."
            (target / path.name).write_text(json.dumps(config, indent=4) + "\n")
        elif path.is_file():
            shutil.copy2(path, target / path.name)


def _write_docs(source: Path, target: Path) -> None:
    shutil.copytree(source, target)
    readme = target / "README.md"
    text = readme.read_text()
    for old, new in _DOCS_PATHS.items():
        text = text.replace(old, new)
    readme.write_text(text)


def _write_models(bundle: Path, target: Path) -> None:
    (target / "models").mkdir()
    entries = []
    for entry in read_manifest(bundle):
        shutil.copy2(bundle / entry["path"], target / entry["path"])
        entries.append(entry)
    default = pretrained_path(bundle, **DEFAULT_MODEL)
    shutil.copy2(default, target / "models" / "model.pt")
    entries.append(
        {
            "path": "models/model.pt",
            "url": "",
            "hash_val": sha256(default),
            "hash_type": "sha256",
            "data": f"a copy of {Path(default).name}, the default model of inference.json and evaluate.json",
        }
    )
    (target / MANIFEST).write_text(yaml.safe_dump({"large_files": entries}, sort_keys=False))


def export_bundle(output_dir: Union[str, Path], overwrite: bool = False, archive: bool = True) -> str:
    """Write the self-contained model-zoo bundle folder ``output_dir`` (and ``output_dir.zip``).

    Args:
        output_dir: the bundle folder to write; its name is the bundle's name in the zoo (``models/<name>``).
        overwrite: replace an existing, non-empty ``output_dir`` (and its zip).
        archive: also write ``<output_dir>.zip`` holding the folder.

    Returns:
        The bundle folder (or the zip, when ``archive``).

    Raises:
        FileExistsError: when ``output_dir`` exists and is not empty and ``overwrite`` is false.
        FileNotFoundError: when the checkout lacks the bundle or its pretrained weights.
    """
    out = Path(output_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{str(output_dir)!r} exists and is not empty; pass --overwrite True to replace it.")
    bundle = bundle_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        staged.mkdir()
        _write_configs(bundle / "configs", staged / "configs")
        _write_docs(bundle / "docs", staged / "docs")
        shutil.copy2(bundle / "LICENSE", staged / "LICENSE")
        _write_models(bundle, staged)
        _copy_package(staged / "custom")
        zipped = Path(shutil.make_archive(str(Path(tmp) / out.name), "zip", tmp, out.name)) if archive else None
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staged.rename(out)
        if zipped is not None:
            zipped.replace(out.with_suffix(".zip"))
    return str(out.with_suffix(".zip") if archive else out)
