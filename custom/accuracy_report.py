"""The rows, summaries and report of the accuracy benchmarks, shared by the 2D (:mod:`custom.accuracy`) and 3D
(:mod:`custom.accuracy_3d`) ones: one pair's row, the summary over pairs, the markdown table, ``accuracy.md`` and
``results.json``."""

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

from custom.atomic import atomic_write_text
from custom.metrics import format_mean, pair_metrics, summarize

__all__ = ["COLUMNS", "VOLUME_SWEEP", "aggregate", "pair_row", "to_markdown", "write_report"]

VOLUME_SWEEP = ((60, 10, 0), (60, 20, 10), (60, 20, 20))
"""The refinement steps per level (a quarter, half and full resolution) tabulated in 3D besides the default."""
COLUMNS = (
    "dice_mean",
    "dice_worst30",
    "hd95_mean",
    "nonpositive_percent",
    "jacobian_min",
    "log_jacobian_std",
    "seconds",
    "wall_s",
    "cpu_s",
    "peak_rss_gib",
)
"""The summarised columns of the per-pair rows (:func:`custom.metrics.pair_metrics` and the timings)."""


def pair_row(item: dict, warped_label: Optional[torch.Tensor] = None, det: Optional[torch.Tensor] = None, **extra):
    """One pair's row of the table: its names, :func:`custom.metrics.pair_metrics` of the registration (no
    registration when ``warped_label`` is not given: the moving labels and a unit determinant) and ``extra``
    columns (timings).

    Args:
        item: a pair with ``moving_id``, ``fixed_id``, ``moving_label`` and ``fixed_label`` ``(1, *S)``.
        warped_label: the moving labels after registration.
        det: the Jacobian determinant of the registration.
    """
    if warped_label is None:
        warped_label, det = item["moving_label"][0], torch.ones(item["fixed_label"].shape[1:])
    metrics = pair_metrics(det, warped_label, item["fixed_label"][0])
    return {"moving": item["moving_id"], "fixed": item["fixed_id"], **metrics, **extra}


def aggregate(rows: List[dict]) -> Dict[str, dict]:
    """Mean, sd and count over pairs of every column of :data:`COLUMNS` present in ``rows``."""
    return summarize(rows, COLUMNS)


def to_markdown(results: Dict[str, dict], volumes: bool = False) -> str:
    """The table of :func:`run_accuracy`'s results; ``volumes``: the 3D benchmark's columns (minimum
    determinant, wall and CPU seconds, peak RSS)."""
    cells = [("dice_mean", 3, True), ("dice_worst30", 3, False), ("hd95_mean", 2, False)]
    if volumes:
        head = "| method | Dice | Dice worst 30% | HD95 (vox) | % folding | min det | SDlogJ | wall s | CPU s "
        head += "| peak RSS GiB |"
        cells += [("nonpositive_percent", 4, False), ("jacobian_min", 2, False), ("log_jacobian_std", 3, False)]
        cells += [("wall_s", 1, False), ("cpu_s", 1, False), ("peak_rss_gib", 2, False)]
    else:
        head = "| method | Dice | Dice worst 30% | HD95 (vox) | % folding | SDlogJ | s/pair |"
        cells += [("nonpositive_percent", 3, False), ("log_jacobian_std", 3, False), ("seconds", 3, False)]
    lines = [head, "|---" + "|---:" * len(cells) + "|"]
    for name, s in results.items():
        lines.append(f"| {name} | " + " | ".join(format_mean(s, key, digits, sd) for key, digits, sd in cells) + " |")
    return "\n".join(lines)


def write_report(
    out: Path,
    header: str,
    results: Dict[str, dict],
    per_pair: Dict[str, List[dict]],
    volumes: bool = False,
    sections: Optional[Dict[str, dict]] = None,
) -> Path:
    """Print the tables and write ``<out>/accuracy.md`` (``header``, the table of ``results`` when there are any,
    then a titled table per section) and ``results.json`` (the summaries and every pair's row; the sections', each
    ``{"summary", "pairs"}``, under ``"subjects"``); the path of ``accuracy.md``."""
    text = header + (to_markdown(results, volumes) + "\n" if results else "")
    for name, section in (sections or {}).items():
        pairs = next(iter(section["pairs"].values()))
        names = ", ".join(f"{p['moving']} -> {p['fixed']}" for p in pairs)
        text += f"\n## Real subject pairs, {name}: {names}\n\n{to_markdown(section['summary'], volumes)}\n"
        if section.get("not_held_out"):
            seen = ", ".join(section["not_held_out"])
            text += f"\nNot held out: the shipped model was trained on the subjects of {seen}.\n"
        if section.get("targets"):
            text += "\nTargets:\n\n" + "\n".join(section["targets"]) + "\n"
    print(text, flush=True)
    atomic_write_text(out / "accuracy.md", text)
    data = {"summary": results, "pairs": per_pair, **({"subjects": sections} if sections else {})}
    atomic_write_text(out / "results.json", json.dumps(data, indent=4) + "\n")
    return out / "accuracy.md"
