"""Subject discovery and subject-level splits for the neurite-OASIS layout.

A dataset root holds one folder per subject (e.g. ``OASIS_OAS1_0001_MR1/``) with any of the files in
:data:`IMAGE_FILES` and :data:`LABEL_FILES`, and optionally a ``subjects.txt`` listing the folders to use.
"""

import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["IMAGE_FILES", "LABEL_FILES", "find_subjects", "split_subjects", "resolve_label"]

IMAGE_FILES = ("aligned_norm", "aligned_orig", "slice_norm")
# finest first: label="auto" takes the first one every subject has
LABEL_FILES = ("aligned_aseg", "aligned_seg35", "aligned_seg4", "slice_aseg", "slice_seg24", "slice_seg4")
SUFFIX = ".nii.gz"


def _file(folder: Path, name: str) -> Path:
    return folder / (name if name.endswith((".nii.gz", ".nii")) else name + SUFFIX)


def resolve_label(folders: Sequence[Path], label: Optional[str], image: str) -> Optional[str]:
    """Pick the label file name: ``None`` for none, ``"auto"`` for the finest label map every subject has
    (``aligned_aseg``, then ``aligned_seg35``, then ``aligned_seg4``; ``slice_*`` alike).

    ``"auto"`` only considers label files of the image's kind (``aligned_*`` for volumes, ``slice_*`` for
    slices) and gives ``None`` when no label file is common to all subjects.
    """
    if label != "auto":
        return label
    prefix = image.split("_")[0] + "_"
    for name in LABEL_FILES:
        if name.startswith(prefix) and all(_file(f, name).is_file() for f in folders):
            return name
    return None


def find_subjects(
    root: Union[str, Path], image: str = "aligned_norm", label: Optional[str] = "auto", extra_images: Sequence[str] = ()
) -> List[Dict[str, str]]:
    """List the subjects of a neurite-OASIS-style root.

    Args:
        root: the dataset folder.
        image: image file name without ``.nii.gz`` (``aligned_norm``, ``aligned_orig``, ``slice_norm``, ...).
        label: label file name, ``None`` for no labels, or ``"auto"`` (see :func:`resolve_label`).
        extra_images: further image files each subject must have (e.g. ``("aligned_orig",)``), stored
            under their own names.

    Returns:
        One dict per subject, sorted by folder name (or in ``subjects.txt`` order): ``subject``, ``image``,
        ``label`` (when used) and each extra image, as file paths.

    Raises:
        FileNotFoundError: missing root, a folder listed in ``subjects.txt`` that does not exist, or a subject
            without the requested image or label file.
        ValueError: a root with no subject folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist.")
    listing = root / "subjects.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        folders = [root / n for n in names]
        missing = [str(f) for f in folders if not f.is_dir()]
        if missing:
            raise FileNotFoundError(f"subjects.txt in {str(root)!r} lists folders that do not exist: {missing[:5]}.")
    else:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"dataset folder {str(root)!r} has no subject folders (expected e.g. OASIS_OAS1_0001_MR1/).")
    label = resolve_label(folders, label, image)
    subjects = []
    for folder in folders:
        item = {"subject": folder.name}
        for key, name in [("image", image), ("label", label)] + [(n, n) for n in extra_images]:
            if name is None:
                continue
            path = _file(folder, name)
            if not path.is_file():
                raise FileNotFoundError(f"subject {folder.name!r} has no {path.name} (looked for {str(path)!r}).")
            item[key] = str(path)
        subjects.append(item)
    return subjects


def _count(size: Union[int, float], total: int, name: str, minimum: int) -> int:
    """A split's subject count: a fraction of ``total`` (rounded; at least ``minimum`` when it is > 0) or a count."""
    if isinstance(size, float) and 0 <= size < 1:
        return max(int(round(size * total)), minimum if size > 0 else 0)
    if size < 0 or int(size) != size:
        raise ValueError(f"{name} must be a fraction in [0, 1) or a count >= 0, got {size!r}.")
    return int(size)


def _sizes(n: int, num_val, num_test, minimum: int) -> Tuple[int, int]:
    """Validation and test counts of ``n`` subjects; a fraction that would leave training fewer than ``minimum``
    subjects gives up its share, the test split's first (training needs neither)."""
    n_val, n_test = _count(num_val, n, "num_val", minimum), _count(num_test, n, "num_test", minimum)
    if n - n_val - n_test < minimum and isinstance(num_test, float):
        n_test = 0
    if n - n_val - n_test < minimum and isinstance(num_val, float):
        n_val = 0
    if n - n_val - n_test < minimum:
        raise ValueError(
            f"--num_val {num_val} and --num_test {num_test} ask for {n_val} validation + {n_test} test subjects of the "
            f"{n} found, leaving {n - n_val - n_test} for training, which needs at least {minimum}; give smaller "
            "counts (e.g. --num_val 0 --num_test 0) or more subjects."
        )
    return n_val, n_test


def split_subjects(
    subjects: Sequence[Dict[str, str]],
    num_val: Union[int, float] = 0.2,
    num_test: Union[int, float] = 0.2,
    seed: int = 0,
    val_subjects: Optional[Sequence[str]] = None,
    test_subjects: Optional[Sequence[str]] = None,
    minimum: int = 1,
) -> Dict[str, List[Dict[str, str]]]:
    """Split subjects into train / validation / test; a subject is in exactly one split.

    Args:
        subjects: from :func:`find_subjects`.
        num_val: validation size, a fraction in ``[0, 1)`` or a count.
        num_test: test size, a fraction in ``[0, 1)`` or a count.
        seed: the shuffle seed (the split is deterministic given the subjects and the seed).
        val_subjects: subject names for validation, instead of drawing them.
        test_subjects: subject names for testing, instead of drawing them.
        minimum: the subjects a split needs to be paired (2 for inter-subject pairs): a fraction > 0 takes at least
            this many, and fractions give way (test first) when training would be left fewer.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.

    Raises:
        ValueError: a requested split larger than the data, or named subjects that do not exist or
            appear in both lists.
    """
    by_name = {s["subject"]: s for s in subjects}
    n = len(subjects)
    if val_subjects is not None or test_subjects is not None:
        val, test = list(val_subjects or []), list(test_subjects or [])
        unknown = [s for s in val + test if s not in by_name]
        if unknown:
            raise ValueError(f"unknown subjects in the split lists: {unknown[:5]} (have {sorted(by_name)[:5]}...).")
        both = set(val) & set(test)
        if both:
            raise ValueError(f"subjects in both the validation and test lists: {sorted(both)}.")
        held = set(val) | set(test)
        return {
            "train": [s for s in subjects if s["subject"] not in held],
            "val": [by_name[s] for s in val],
            "test": [by_name[s] for s in test],
        }
    n_val, n_test = _sizes(n, num_val, num_test, minimum)
    order = sorted(by_name)
    random.Random(seed).shuffle(order)
    val_names, test_names = order[:n_val], order[n_val : n_val + n_test]
    return split_subjects(subjects, val_subjects=val_names, test_subjects=test_names)
