"""Crash-safe file writing: write to a temporary name in the same folder, then rename over the target; and the
signature our image files carry, so that ``--overwrite True`` replaces only files this project wrote."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Union

__all__ = [
    "SIGNATURE",
    "atomic_path",
    "atomic_paths",
    "atomic_write_text",
    "check_replaceable",
    "check_writable",
    "written_by_us",
]

SIGNATURE = "vxm-lite"
"""Written into the NIfTI ``descrip`` field and the MetaImage ``Comment`` of every image file we write."""

PathLike = Union[str, "os.PathLike[str]"]


@contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error remove it.

    Readers never see a half-written ``path``: it is either the old file or the complete new one.

    Args:
        path: the final file.
        suffix: suffix of the temporary name, for writers that infer the format from it (e.g. ``".nii.gz"``).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_paths(paths: Dict[str, Path]) -> Iterator[Dict[str, Path]]:
    """Yield a temporary path next to each of ``paths`` (same keys; each keeps its file's suffix: ``.nii.gz``,
    ``.mha``, ``.txt``); once all are written, rename them all; on error remove them. A crash leaves at most the
    renames of one group half done, never a half-written file.
    """
    staged = {}
    for key, path in paths.items():
        suffix = "".join(Path(path).suffixes[-2:]) if str(path).endswith(".nii.gz") else Path(path).suffix
        staged[key] = Path(path).parent / f".{Path(path).name}.{os.getpid()}.part{suffix}"
    try:
        yield staged
        for key, path in paths.items():
            os.replace(staged[key], path)
    finally:
        for tmp in staged.values():
            if tmp.exists():
                tmp.unlink()


def check_writable(folder: PathLike) -> None:
    """A real write test of ``folder`` (or its first existing parent): permission bits say nothing for root, a
    read-only mount or a full disk.

    Raises:
        ValueError: naming the folder and the cause.
    """
    folder = Path(folder)
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"cannot write to the output folder {str(folder)!r}: {str(existing)!r} is not a writable "
            f"folder ({error.strerror or error})."
        ) from None


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def written_by_us(path: PathLike) -> bool:
    """Whether ``path`` carries :data:`SIGNATURE` (a NIfTI ``descrip``; in the text header of a MetaImage or an ITK
    transform file), or is a CSV table of ours (``pairs_out.csv``: its header starts with ``moving,fixed``)."""
    path = Path(path)
    try:
        if path.name.endswith(".csv"):
            with path.open(encoding="utf-8") as f:
                return f.readline().startswith("moving,fixed")
        if path.name.endswith((".mha", ".txt")):
            with path.open("rb") as f:
                return SIGNATURE.encode() in f.read(4096)
        import nibabel as nib

        return bytes(nib.load(str(path)).header["descrip"]).decode(errors="replace").startswith(SIGNATURE)
    except Exception:  # unreadable, not an image: not ours
        return False


def check_replaceable(paths) -> None:
    """Refuse to replace any existing file of ``paths`` that :func:`written_by_us` does not recognise.

    Raises:
        ValueError: naming the first such file; it is never replaced, whatever ``--overwrite`` says.
    """
    foreign = [str(p) for p in paths if Path(p).exists() and not written_by_us(p)]
    if foreign:
        raise ValueError(
            f"{foreign[0]!r} exists and was not written by vxm-lite (no {SIGNATURE!r} signature in it); it is never "
            "replaced: move it away or write the outputs elsewhere."
        )
