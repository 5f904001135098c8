"""A cohort over processes (custom/cohort.py): each rank's share, the finished pairs an earlier run left (checked,
not assumed), one pairs_out.csv; end to end with two gloo ranks under torchrun, and a run killed mid-cohort and
resumed."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom.cohort import ROWS_DIR, finished_rows, gather_table, save_row, shard
from custom.data import make_demo


@pytest.mark.parametrize(
    "count,size",
    [
        (5, 2),  # uneven: 3 and 2
        (4, 2),  # even
        (1, 3),  # fewer pairs than ranks: two ranks idle
        (7, 1),  # one process takes everything
    ],
)
def test_every_pair_goes_to_exactly_one_rank(count, size):
    shares = [shard(count, rank, size) for rank in range(size)]
    assert sorted(i for s in shares for i in s) == list(range(count))  # none twice, none lost
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("rank,size", [(2, 2), (-1, 2)])  # not a rank of the group
def test_bad_ranks(rank, size):
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        shard(3, rank, size)


def _ours(path: Path) -> str:
    header = nib.Nifti1Header()
    header["descrip"] = b"vxm-lite"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4), header), str(path))
    return path.name


def test_finished_pairs_are_checked_not_assumed(tmp_path):
    rows = {}
    for name in ("done", "half", "foreign", "failed", "earlier"):
        rows[name] = {"moving": f"{name}.nii.gz", "fixed": "f.nii.gz", "name": name, "status": "registered"}
        rows[name].update(warped=_ours(tmp_path / f"{name}_warped.nii.gz"), ddf=_ours(tmp_path / f"{name}_ddf.nii.gz"))
    (tmp_path / "half_ddf.nii.gz").unlink()  # killed between its renames
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(tmp_path / "foreign_ddf.nii.gz"))
    rows["failed"]["status"] = "failed"  # failed pairs are tried again
    for name in ("done", "half", "foreign", "failed"):
        save_row(tmp_path, name, rows[name])
    table = ["moving,fixed,name,warped,ddf,status", "earlier.nii.gz,f.nii.gz,earlier,{warped},{ddf},registered"]
    (tmp_path / "pairs_out.csv").write_text("\n".join(table).format(**rows["earlier"]) + "\n")  # a finished run
    assert list(finished_rows(tmp_path, list(rows) + ["new"])) == ["done", "earlier"]
    gathered = gather_table(tmp_path, ["earlier", "new", "done", "failed"])  # the listing's order, known rows only
    assert [row["name"] for row in gathered] == ["earlier", "done", "failed"]
    with open(tmp_path / "pairs_out.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["name"] for r in written] == ["earlier", "done", "failed"] and list(written[0])[-2:] == [
        "status",
        "warning",
    ]
    assert not (tmp_path / ROWS_DIR).exists()


def _env():
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Twelve slice pairs of the demo subjects (and, for the two-rank run, two of them and one pair that is not
    registrable)."""
    root = tmp_path_factory.mktemp("cohort")
    make_demo(root / "demo", num_subjects=6, shape=(24, 28, 20))
    slices = sorted(str(p) for p in (root / "demo").glob("*/slice_norm.nii.gz"))
    rows = [f"{slices[m]},{slices[f]}" for m in range(6) for f in range(6) if m != f][:12]
    (root / "pairs.csv").write_text("moving,fixed\n" + "\n".join(rows) + "\n")
    label = str(Path(slices[1]).parent / "slice_seg4.nii.gz")  # a label map given as the moving image
    (root / "with_bad.csv").write_text("moving,fixed\n" + "\n".join(rows[:2] + [f"{label},{slices[0]}"]) + "\n")
    return root


REGISTER = ["-m", "custom", "register", "--refine_steps", "2", "--affine", "False"]


@pytest.mark.slow
def test_two_gloo_ranks_share_a_cohort_and_a_bad_pair_does_not_stop_it(cohort, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *REGISTER]
    proc = subprocess.run(
        cmd + ["--pairs", str(cohort / "with_bad.csv"), "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=Path(__file__).resolve().parents[1],
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "1 pair(s) failed" in log and "looks like a label map" in log  # reported
    assert "on rank 0" in log and "on rank 1" in log  # both ranks registered
    assert log.count("summary: 3 pairs: 2 registered, 0 skipped (finished earlier), 1 failed") == 1  # rank 0
    with open(tmp_path / "out" / "pairs_out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["registered", "registered", "failed"]  # one table, the listing's order
    assert (
        all((tmp_path / "out" / r["warped"]).is_file() for r in rows[:2]) and not (tmp_path / "out" / ROWS_DIR).exists()
    )


@pytest.mark.slow
def test_a_killed_cohort_resumes_where_it_stopped(cohort, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, *REGISTER, "--pairs", str(cohort / "pairs.csv"), "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 300
    while (
        time.time() < deadline and len(list((out / ROWS_DIR).glob("*.json")) if (out / ROWS_DIR).is_dir() else []) < 2
    ):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name[: -len(".json")] for p in (out / ROWS_DIR).glob("*.json"))
    assert 2 <= len(done) < 12 and not (out / "pairs_out.csv").exists()
    half = json.loads((out / ROWS_DIR / f"{done[0]}.json").read_text())
    (out / half["ddf"]).unlink()  # as if killed between its renames: done again
    resumed = subprocess.run(cmd + ["--resume", "True"], capture_output=True, text=True, timeout=600, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume: {len(done) - 1} pairs finished earlier, {13 - len(done)} to do" in resumed.stdout
    assert f"{13 - len(done)} registered, {len(done) - 1} skipped (finished earlier), 0 failed" in resumed.stdout
    with open(out / "pairs_out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all((out / r["ddf"]).is_file() for r in rows) and len({r["name"] for r in rows}) == 12
    again = subprocess.run(cmd + ["--resume", "True"], capture_output=True, text=True, timeout=600, env=_env())
    assert again.returncode == 0 and "resume: 12 pairs finished earlier, 0 to do" in again.stdout  # nothing left
