"""The real-pair section's targets (custom.accuracy_subjects.targets), met and not met."""

import pytest

from custom.accuracy_report import aggregate
from custom.accuracy_subjects import ACCURATE_ROW, ANTS_ROW, DEFAULTS_ROW, NO_REGISTRATION_ROW, targets


def _rows(dice, folding, cpu=40.0, rss=1.5):
    """One row per value of ``folding`` (% folding voxels of each pair)."""
    return [{"dice_mean": dice, "nonpositive_percent": f, "cpu_s": cpu, "peak_rss_gib": rss} for f in folding]


def _section(**changes):
    """A section whose every target is met, with ``changes`` (row name -> rows) applied."""
    per_pair = {
        NO_REGISTRATION_ROW: _rows(0.5, [0.0, 0.0], cpu=0.0, rss=0.0),
        DEFAULTS_ROW: _rows(0.80, [0.0, 0.005]),
        ACCURATE_ROW: _rows(0.83, [0.0, 0.008], cpu=300.0, rss=3.4),
        ANTS_ROW: _rows(0.75, [0.0, 0.0], cpu=100.0),
    }
    per_pair.update(
        {{"defaults": DEFAULTS_ROW, "accurate": ACCURATE_ROW, "ants": ANTS_ROW}[k]: v for k, v in changes.items()}
    )
    return {name: aggregate(rows) for name, rows in per_pair.items()}, per_pair


CASES = [
    # (changed rows, the target that fails or None)
    ({}, None),  # every target met
    ({"ants": _rows(0.81, [0.0, 0.0], cpu=100.0)}, "Dice of the defaults"),  # a peer above the defaults
    ({"defaults": _rows(0.80, [0.0, 0.02])}, "folding of the defaults"),  # one pair folds too much
    ({"defaults": _rows(0.80, [0.0, 0.0], rss=2.1)}, "peak RSS"),  # over 2 GiB
    ({"defaults": _rows(0.80, [0.0, 0.0], cpu=60.0)}, "CPU of the defaults"),  # more than half of ANTs' CPU
    ({"accurate": _rows(0.81, [0.0, 0.0], cpu=300.0)}, "ours, accurate"),  # gains 0.01 only
    ({"accurate": _rows(0.83, [0.0, 0.03], cpu=300.0)}, "ours, accurate"),  # folds
]


@pytest.mark.parametrize("changes,failing", CASES)
def test_targets_met_and_not_met(changes, failing):
    lines = targets(*_section(**changes))
    assert len(lines) == 5
    missed = [line for line in lines if line.startswith("- NOT MET: ")]
    if failing is None:
        assert not missed, missed
    else:
        assert len(missed) == 1 and failing in missed[0], lines
    assert all(line.startswith(("- met: ", "- NOT MET: ")) for line in lines)


def test_no_targets_without_the_defaults_row():
    summary, per_pair = _section()
    del summary[DEFAULTS_ROW], per_pair[DEFAULTS_ROW]
    assert targets(summary, per_pair) == []
