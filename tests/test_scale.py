import re

import pytest

from custom.data import find_subjects, make_demo
from custom.scale import link_release, process_tree_memory, run_scale


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = make_demo(tmp_path_factory.mktemp("src") / "demo", num_subjects=2, shape=(24, 28, 20), seed=1)
    (root / "OASIS_OAS1_0002_MR1" / "aligned_seg4.nii.gz").unlink()  # a label only some subjects have
    return root


def test_link_release_layout(source, tmp_path):
    root = link_release(tmp_path / "release", source, num_subjects=5)
    subjects = find_subjects(root, "aligned_norm", "auto")
    assert [s["subject"] for s in subjects] == [f"OASIS_OAS1_{i:04d}_MR1" for i in range(1, 6)]
    assert all("label" in s for s in subjects)  # the label file is linked into every folder
    first, second = (root / f"OASIS_OAS1_000{i}_MR1" / "aligned_norm.nii.gz" for i in (1, 2))
    assert first.is_symlink() and first.resolve() != second.resolve()  # the sources taken in turn
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        link_release(root, source, num_subjects=5)
    with pytest.raises(FileNotFoundError, match="has no subject folder with aligned_norm.nii.gz"):
        link_release(tmp_path / "other", tmp_path / "nothing")


def test_process_tree_memory_counts_this_process():
    import os

    mem = process_tree_memory(os.getpid())
    assert 10 * 2**20 < mem["anon"] <= mem["pss"]  # torch is loaded: tens of MB at least


@pytest.mark.slow
def test_scale_benchmark_runs_every_mode(source, tmp_path):
    """Every cache mode over 2 torchrun ranks (the documented command, run by tests/test_cli.py, runs them on 1)."""
    table = run_scale(
        str(tmp_path / "scale"), str(source), subjects=8, spatial_dims=2, ranks="2", epoch_length=1, num_workers=1
    )
    rows = [line for line in table.splitlines() if line.startswith("| 2D")]
    assert [r.split(" | ")[1:3] for r in rows] == [[m, "2"] for m in ("memory", "disk-cold", "disk-warm", "none")]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[-1] == "0" and re.fullmatch(r"\d+", cells[3]), row  # exit status 0, a start-up time
        assert float(cells[5]) > 0.05  # peak memory of a training process, in GiB
        assert (float(cells[7]) > 0) == cells[1].startswith("disk"), row  # only the disk cache writes files
    assert (tmp_path / "scale" / "scale.md").read_text() == table
    assert not (tmp_path / "scale" / "cache_2d").exists()  # removed after the runs


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"modes": "ram"}, r"modes must be a subset of \('memory', 'disk-cold', 'disk-warm', 'none'\)"),  # mode
        ({"spatial_dims": 4}, r"spatial_dims must be a subset of \(2, 3\), got \[4\]"),  # 4D
        ({"ranks": 0}, r"ranks must be process counts >= 1, got \[0\]"),  # no process
    ],
)
def test_scale_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_scale(str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()
