"""A cohort of pairs over processes, and its bookkeeping: which pairs a rank registers, which pairs an earlier run
finished, each pair's row as it is done, and the one ``pairs_out.csv`` and summary at the end.

Under ``torchrun`` (``multi_gpu_inference.json``: one process per GPU, gloo on CPU) rank ``r`` of ``n`` takes the
pairs ``r, r + n, r + 2n, ...`` of the listing (:func:`shard`): no pair twice, none lost, uneven counts fine. Each
finished pair's ``pairs_out.csv`` row is saved at once in ``<output_dir>/.vxm-lite-rows/`` (after its files are
renamed into place), so an interrupted cohort keeps what it did; at the end rank 0 gathers every row, in the
listing's order, into ``pairs_out.csv`` and removes the folder. ``--resume True`` skips the pairs whose row says
they were registered *and* whose output files all exist and carry our signature (:func:`finished_rows`): a pair
interrupted half-way is done again.
"""

import csv
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

from custom.atomic import atomic_write_text, written_by_us
from custom.errors import as_bool

__all__ = [
    "CohortShare",
    "FILE_COLUMNS",
    "ROWS_DIR",
    "barrier",
    "conclude",
    "finished_rows",
    "gather_table",
    "rank_and_size",
    "save_row",
    "shard",
    "start_rows",
]

ROWS_DIR = ".vxm-lite-rows"
"""The folder of the rows of the pairs finished so far, inside the output folder (removed at the end)."""
FILE_COLUMNS = ("warped", "ddf", "warped_label", "affine", "jacobian")
"""The ``pairs_out.csv`` columns that name a pair's output files."""


def rank_and_size() -> Tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if rank_and_size()[1] > 1:
        dist.barrier()


def shard(count: int, rank: int, size: int) -> List[int]:
    """The indices of ``count`` pairs that rank ``rank`` of ``size`` registers: every ``size``-th from ``rank``."""
    if not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, {size}), got {rank}.")
    return list(range(rank, count, size))


def save_row(output_dir: Path, name: str, row: Dict[str, str]) -> None:
    """Save a finished (or failed) pair's row, atomically."""
    atomic_write_text(Path(output_dir) / ROWS_DIR / f"{name}.json", json.dumps(row) + "\n")


def _table_rows(output_dir: Path) -> Dict[str, Dict[str, str]]:
    """The rows of an earlier run's ``pairs_out.csv`` by pair name (none when it is missing or not ours)."""
    path = Path(output_dir) / "pairs_out.csv"
    if not path.is_file() or not written_by_us(path):
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {row["name"]: row for row in csv.DictReader(f) if row.get("name")}


def finished_rows(output_dir: Path, names: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """The rows of the pairs ``names`` that an earlier run in ``output_dir`` registered completely: a row (in
    ``pairs_out.csv`` or in :data:`ROWS_DIR`) with status ``registered`` (or ``skipped``: registered before that),
    and every output file it names present and written by us (checked, not assumed)."""
    rows = _table_rows(output_dir)
    folder = Path(output_dir) / ROWS_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        rows[path.name[: -len(".json")]] = json.loads(path.read_text())
    finished = {}
    for name in names:
        row = rows.get(name)
        files = [Path(output_dir) / row[key] for key in FILE_COLUMNS if row and row.get(key)] if row else []
        if row and row.get("status") in ("registered", "skipped") and all(written_by_us(f) for f in files):
            finished[name] = row
    return finished


def gather_table(output_dir: Path, names: Sequence[str]) -> List[Dict[str, str]]:
    """Write ``pairs_out.csv`` from the saved rows of ``names`` (in that order; pairs without a row are left out)
    and remove :data:`ROWS_DIR`; the rows written."""
    folder = Path(output_dir) / ROWS_DIR
    earlier = _table_rows(output_dir)
    rows = []
    for name in names:
        path = folder / f"{name}.json"
        row = json.loads(path.read_text()) if path.is_file() else earlier.get(name)
        if row:
            rows.append(row)
    first, last = ["moving", "fixed", "moving_label", "name", *FILE_COLUMNS], ["status", "warning"]
    found = list(dict.fromkeys(key for row in rows for key in row))
    columns = [c for c in first if c in found or c in first[:4]] + [c for c in found if c not in first + last] + last
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(output_dir) / "pairs_out.csv", buffer.getvalue())
    shutil.rmtree(folder, ignore_errors=True)
    return rows


def start_rows(output_dir: Path, share: "CohortShare", finished: Dict[str, Dict[str, str]], resume: bool) -> None:
    """Before the first pair (after the outputs are checked): a run that does not resume drops the rows an earlier
    run saved; the pairs ``finished`` earlier are recorded as skipped, the pairs ``share`` refused as failed."""
    if not resume and rank_and_size()[0] == 0:
        shutil.rmtree(Path(output_dir) / ROWS_DIR, ignore_errors=True)
    barrier()
    for name, row in finished.items():
        save_row(output_dir, name, {**row, "status": "skipped"})
    for name, reason in share.failures.items():
        save_row(output_dir, name, {**share.pair_row(name), "status": "failed", "warning": reason})
    if resume:
        print(f"resume: {len(finished)} pairs finished earlier, {len(share)} to do", flush=True)


def conclude(output_dir: Path, names: Sequence[str]) -> Dict[str, str]:
    """Write ``pairs_out.csv`` (:func:`gather_table`) and print the summary: pairs registered, skipped (finished
    earlier) and failed, each failure with its reason; returns the failures (name -> reason)."""
    rows = gather_table(output_dir, names)
    counts = {status: sum(r.get("status") == status for r in rows) for status in ("registered", "skipped")}
    failed = {r["name"]: r.get("warning", "") for r in rows if r.get("status") == "failed"}
    print(
        f"summary: {len(names)} pairs: {counts['registered']} registered, {counts['skipped']} skipped (finished "
        f"earlier), {len(failed)} failed; pairs_out.csv in {output_dir}",
        flush=True,
    )
    for name, reason in failed.items():
        print(f"  failed: {name}: {reason}", flush=True)
    return failed


class CohortShare:
    """The pairs one process registers: its share (:func:`shard`) of a listing, less the pairs left out (finished
    earlier, :meth:`drop`; or refused, :meth:`check`). The listing is made on first use.

    Args:
        pairs: a callable returning the whole listing (dicts of file paths).
        name_pairs: maps the listing to one unique output name per pair.
        shard: ``[rank, size]``; default the whole listing.
        stop_on_error: :meth:`check` stops at the first refused pair.
    """

    def __init__(
        self,
        pairs: Callable[[], List[Dict[str, str]]],
        name_pairs: Callable[[List[Dict[str, str]]], List[str]],
        shard: Optional[Sequence[int]] = None,
        stop_on_error: bool = False,
    ) -> None:
        self._pairs_fn, self._name_pairs = pairs, name_pairs
        self.shard = tuple(int(v) for v in shard) if shard is not None else (0, 1)
        self.stop_on_error = as_bool("stop_on_error", stop_on_error)
        self._listing: Optional[List[Dict[str, str]]] = None
        self._work: List[int] = []
        self.all_names: List[str] = []
        self.failures: Dict[str, str] = {}

    def _listed(self) -> List[Dict[str, str]]:
        if self._listing is None:
            self._listing = self._pairs_fn()
            self.all_names = self._name_pairs(self._listing)
            self._work = shard(len(self._listing), *self.shard)
        return self._listing

    @property
    def pairs(self) -> List[Dict[str, str]]:
        """The pairs this process registers: its share of the listing (:func:`custom.cohort.shard`), less those
        dropped (:meth:`drop`) or refused (:attr:`failures`)."""
        listing = self._listed()
        return [listing[i] for i in self._work]

    @property
    def names(self) -> List[str]:
        """The output name of each of :attr:`pairs` (named over the whole listing)."""
        self._listed()
        return [self.all_names[i] for i in self._work]

    def pair_row(self, name: str) -> Dict[str, str]:
        """The ``pairs_out.csv`` columns of the pair ``name`` (of the whole listing): its input files and name."""
        item = self._listed()[self.all_names.index(name)]
        return {**{key: item.get(key, "") for key in ("moving", "fixed", "moving_label")}, "name": name}

    def item(self, i: int) -> Tuple[Dict[str, str], str]:
        """The ``i``-th pair of :attr:`pairs` and its name."""
        listing = self._listed()
        return listing[self._work[i]], self.all_names[self._work[i]]

    def drop(self, names: Sequence[str]) -> None:
        """Leave the pairs ``names`` out (e.g. finished by an earlier run)."""
        self._listed()
        left_out = set(names)
        self._work = [i for i in self._work if self.all_names[i] not in left_out]

    def check(self, check_pair: Callable[[Dict[str, str]], None]) -> None:
        """Check every pair of this share with ``check_pair`` (raising ``ValueError``). A pair that fails is left out
        and its reason kept in :attr:`failures` (one warning line each), so the others go on; unless
        ``stop_on_error`` or every pair fails.

        Raises:
            ValueError: the first pair's error, then.
        """
        errors = {}
        for item, name in zip(self.pairs, self.names):
            try:
                check_pair(item)
            except ValueError as error:
                if self.stop_on_error:
                    raise
                errors[name] = error
        if errors and len(errors) == len(self.names):
            raise next(iter(errors.values()))
        for name, error in errors.items():
            print(f"warning: {name}: left out: {error}", file=sys.stderr)
        self.failures.update({name: str(error) for name, error in errors.items()})
        self.drop(errors)

    def __len__(self) -> int:
        self._listed()
        return len(self._work)
