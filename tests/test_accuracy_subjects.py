"""The real-pair section's targets (custom.accuracy_subjects.targets), met and not met."""

import pytest

from custom.accuracy_report import aggregate
from custom.accuracy_subjects import (
    ACCURATE_ROW,
    ANTS_ROW,
    DEFAULTS_ROW,
    NO_REGISTRATION_ROW,
    OURS,
    ROW_KEYS,
    _rows,
    find_subject_pairs,
    targets,
)
from custom.data import make_demo


def _scores(dice, folding, cpu=40.0, rss=1.5):
    """One row per value of ``folding`` (% folding voxels of each pair)."""
    return [{"dice_mean": dice, "nonpositive_percent": f, "cpu_s": cpu, "peak_rss_gib": rss} for f in folding]


def _section(**changes):
    """A section whose every target is met, with ``changes`` (row name -> rows) applied."""
    per_pair = {
        NO_REGISTRATION_ROW: _scores(0.5, [0.0, 0.0], cpu=0.0, rss=0.0),
        DEFAULTS_ROW: _scores(0.80, [0.0, 0.005]),
        ACCURATE_ROW: _scores(0.83, [0.0, 0.008], cpu=300.0, rss=3.4),
        ANTS_ROW: _scores(0.75, [0.0, 0.0], cpu=100.0),
    }
    per_pair.update(
        {{"defaults": DEFAULTS_ROW, "accurate": ACCURATE_ROW, "ants": ANTS_ROW}[k]: v for k, v in changes.items()}
    )
    return {name: aggregate(rows) for name, rows in per_pair.items()}, per_pair


CASES = [
    # (changed rows, the target that fails or None)
    ({}, None),  # every target met
    ({"ants": _scores(0.81, [0.0, 0.0], cpu=100.0)}, "Dice of the defaults"),  # a peer above the defaults
    ({"defaults": _scores(0.80, [0.0, 0.02])}, "folding of the defaults"),  # one pair folds too much
    ({"defaults": _scores(0.80, [0.0, 0.0], rss=2.1)}, "peak RSS"),  # over 2 GiB
    ({"defaults": _scores(0.80, [0.0, 0.0], cpu=60.0)}, "CPU of the defaults"),  # more than half of ANTs' CPU
    ({"accurate": _scores(0.81, [0.0, 0.0], cpu=300.0)}, "ours, accurate"),  # gains 0.01 only
    ({"accurate": _scores(0.83, [0.0, 0.03], cpu=300.0)}, "ours, accurate"),  # folds
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


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("d") / "demo", num_subjects=5, shape=(24, 28, 20))


@pytest.mark.parametrize(
    "subjects,expected",
    [
        ((), [(1, 2), (3, 4), (2, 3)]),  # every subject: disjoint pairs first, then the next ones
        (("OASIS_OAS1_0004_MR1", "OASIS_OAS1_0005_MR1"), [(4, 5), (5, 4)]),  # two held-out subjects, both ways
    ],
)
def test_subject_pairs_of_the_named_subjects(five, subjects, expected):
    pairs = find_subject_pairs(str(five), 3, "auto", subjects)["aligned -> aligned"]
    assert [(int(p["moving_id"][11:15]), int(p["fixed_id"][11:15])) for p in pairs] == expected


def test_subject_pairs_refuse_an_unknown_subject(five):
    with pytest.raises(ValueError, match="subjects \\['nobody'\\] are not folders of"):
        find_subject_pairs(str(five), 3, "auto", ["nobody", "OASIS_OAS1_0001_MR1"])


def test_our_rows_by_short_name_with_a_model():
    rows = _rows([], 0, ["network", "defaults"], "m.pt")
    assert list(rows) == [NO_REGISTRATION_ROW, ROW_KEYS["network"], DEFAULTS_ROW]
    assert rows[DEFAULTS_ROW] == ("ours", ["--model_path", "m.pt"])
    assert rows[ROW_KEYS["network"]] == ("ours", OURS[ROW_KEYS["network"]] + ["--model_path", "m.pt"])
    assert list(_rows([], 0)) == [NO_REGISTRATION_ROW, *OURS]  # the defaults: every row, the shipped model
    with pytest.raises(
        ValueError, match="subject_rows must be among \\['affine', 'network', 'defaults', 'accurate'\\]"
    ):
        _rows([], 0, ["network", "fast"])
