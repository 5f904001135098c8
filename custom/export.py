"""``python -m custom export-bundle OUT``: the bundle as the MONAI model zoo takes it.

The repository keeps the Python package at the top (``custom/``) and the bundle in ``bundle/``; the model zoo wants
one self-contained folder, which it puts on ``sys.path``: ``configs/``, ``docs/``, ``LICENSE``, ``models/model.pt``
and ``large_files.yml``, with the code the configs name inside it. The export writes that folder (and a zip of it)
from this checkout: the configs with ``bundle_root`` ``"."``, the docs' paths made relative to the bundle, the
shipped pretrained weights plus ``models/model.pt`` (the default 2D model, which ``evaluate.json`` also reads),
the manifest with every weight file's sha256, and the modules of the ``custom`` package that the configs reach
(:func:`config_modules`: the networks, warp, losses, data, refinement, interop and Ignite glue; no study,
benchmark, scale or command-line code).
"""

import ast
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import List, Optional, Set, Union

import yaml

from custom import __version__
from custom.errors import as_bool
from custom.pretrained import MANIFEST, pretrained_path, read_manifest, sha256
from custom.runner import bundle_dir

__all__ = ["DEFAULT_MODEL", "MARKER", "check_target", "config_modules", "export_bundle"]

MARKER = ".vxm-lite-export.json"
"""Written into every exported folder (not into the zip): ``--overwrite True`` replaces only a folder holding it."""

DEFAULT_MODEL = {"spatial_dims": 2, "variant": "both"}
_ROOT_CONFIGS = ("train.json", "inference.json")
_DOCS_PATHS = {"bundle/configs/": "configs/", "bundle/models/": "models/", "bundle/docs/": "docs/"}


_REFERENCE = re.compile(r"\bcustom(?:\.[A-Za-z_]\w*)*")


def _module(package: Path, dotted: str) -> Optional[str]:
    """The longest prefix of the dotted name ``dotted`` (``custom.refine.RefiningInferer``) that is a module of the
    ``custom`` package at ``package``, or ``None``."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        path = package.joinpath(*parts[1:n])
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return ".".join(parts[:n])
    return None


def _imports(package: Path, module: str) -> Set[str]:
    """The ``custom`` modules ``module`` imports (anywhere in it, lazy imports included), with its parent
    packages (importing ``custom.data.demo`` runs ``custom/data/__init__.py``)."""
    parts = module.split(".")
    path = package.joinpath(*parts[1:])
    path = path / "__init__.py" if (path / "__init__.py").is_file() else path.with_suffix(".py")
    names = {".".join(parts[:n]) for n in range(1, len(parts))}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "custom":
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {found for name in names if name.split(".")[0] == "custom" and (found := _module(package, name))}


def config_modules(configs: Path, package: Path) -> List[str]:
    """The modules of the ``custom`` package at ``package`` that the bundle's configs reach: every ``custom.<...>``
    name in a config (``_target_``, ``$`` expressions, ``imports``), and every module those import, transitively."""
    names = {m for path in configs.glob("*.json") for m in _REFERENCE.findall(path.read_text())}
    todo = {found for name in names if (found := _module(package, name))}
    reached: Set[str] = set()
    while todo:
        module = todo.pop()
        reached.add(module)
        todo |= _imports(package, module) - reached
    return sorted(reached)


def _copy_package(configs: Path, target: Path) -> None:
    """Copy the modules the configs reach (:func:`config_modules`), and nothing else, into ``target``."""
    package = Path(__file__).resolve().parent
    for module in config_modules(configs, package):
        source = package.joinpath(*module.split(".")[1:])
        source = source / "__init__.py" if (source / "__init__.py").is_file() else source.with_suffix(".py")
        destination = target / source.relative_to(package)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)


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


def _ours_zip(path: Path, name: str) -> bool:
    """Whether ``path`` is a zip this command wrote for the bundle ``name`` (every member under ``name/``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return f"{name}/configs/metadata.json" in members and all(m.startswith(f"{name}/") for m in members)


def check_target(out: Path, overwrite: bool, archive: bool) -> None:
    """Refuse a bundle folder (and zip) that the export may not write: it replaces only its own earlier export.

    Never replaced: the current folder or a parent of it, the home folder, a repository (holding ``.git``), a
    non-empty folder without :data:`MARKER`, a file, a zip that is not an export of this bundle name.

    Raises:
        ValueError: for a target that is never replaced, or a path under a file.
        FileExistsError: for an earlier export when ``overwrite`` is false.
    """
    blocker = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        what = "is a file" if blocker == out else f"lies under {str(blocker)!r}, which is a file"
        raise ValueError(f"cannot write the bundle folder {str(out)!r}: it {what}; give a new or empty folder.")
    real, cwd, home = out.resolve(), Path.cwd().resolve(), Path.home().resolve()
    if real == cwd or real in cwd.parents or real == home or (out / ".git").exists():
        what = "the current folder" if real == cwd else "a repository" if (out / ".git").exists() else None
        what = what or ("the home folder" if real == home else "a parent of the current folder")
        raise ValueError(f"refusing to write the bundle into {str(out)!r}: it is {what}; give a new or empty folder.")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ValueError(
                f"{str(out)!r} holds files that export-bundle did not write (no {MARKER}); it is never replaced: "
                "give a new or empty folder."
            )
        if not overwrite:
            raise FileExistsError(f"{str(out)!r} holds an earlier export; pass --overwrite True to replace it.")
    zipped = out.with_suffix(".zip")
    if archive and zipped.exists():
        if not _ours_zip(zipped, out.name):
            raise ValueError(
                f"{str(zipped)!r} exists and is not an export of {out.name!r}; it is never replaced: move it or give "
                "another folder name."
            )
        if not overwrite:
            raise FileExistsError(f"{str(zipped)!r} holds an earlier export; pass --overwrite True to replace it.")


def export_bundle(output_dir: Union[str, Path], overwrite: bool = False, archive: bool = True) -> str:
    """Write the self-contained model-zoo bundle folder ``output_dir`` (and ``output_dir.zip``).

    Args:
        output_dir: the bundle folder to write; its name is the bundle's name in the zoo (``models/<name>``).
        overwrite: replace an existing, non-empty ``output_dir`` (and its zip).
        archive: also write ``<output_dir>.zip`` holding the folder.

    Returns:
        The bundle folder (or the zip, when ``archive``).

    Raises:
        FileExistsError: when ``output_dir`` holds an earlier export and ``overwrite`` is false.
        ValueError: for a folder the export never replaces (:func:`check_target`).
        FileNotFoundError: when the checkout lacks the bundle or its pretrained weights.
    """
    out = Path(os.path.abspath(output_dir))
    check_target(out, as_bool("overwrite", overwrite), as_bool("archive", archive))
    bundle = bundle_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        staged.mkdir()
        _write_configs(bundle / "configs", staged / "configs")
        _write_docs(bundle / "docs", staged / "docs")
        shutil.copy2(bundle / "LICENSE", staged / "LICENSE")
        _write_models(bundle, staged)
        _copy_package(bundle / "configs", staged / "custom")
        zipped = Path(shutil.make_archive(str(Path(tmp) / out.name), "zip", tmp, out.name)) if archive else None
        (staged / MARKER).write_text(json.dumps({"command": "export-bundle", "version": __version__}) + "\n")
        if out.exists():
            check_target(out, True, False)  # checked again just before anything is removed
            shutil.rmtree(out)
        staged.rename(out)
        if zipped is not None:
            zipped.replace(out.with_suffix(".zip"))
    return str(out.with_suffix(".zip") if archive else out)
