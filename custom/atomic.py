"""Crash-safe file writing: write to a temporary name in the same folder, then rename over the target; and the
signature our image files carry, so that ``--overwrite True`` replaces only files this project wrote."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

__all__ = ["SIGNATURE", "atomic_path", "atomic_write_text", "check_replaceable", "written_by_us"]

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
