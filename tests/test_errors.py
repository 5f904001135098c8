"""The shared checks of user input (custom/errors.py): one message format for every option of every entry point."""

import math

import numpy as np
import pytest

from custom.errors import as_bool, check_integer, check_number, closest

GOOD = [
    # (check, value, expected)
    (lambda v: check_integer("epochs", v, 1), 3, 3),  # a plain int
    (lambda v: check_integer("epochs", v, 1), np.int64(2), 2),  # a numpy integer
    (lambda v: check_integer("steps", v, 0), 0, 0),  # the minimum itself
    (lambda v: check_number("lr", v, positive=True), 0.5, 0.5),  # a float
    (lambda v: check_number("lr", v, positive=True), 2, 2.0),  # an int is a number
    (lambda v: check_number("weight", v, positive=False), 0, 0.0),  # zero allowed when not positive
]


@pytest.mark.parametrize("check, value, expected", GOOD)
def test_valid_options_pass_through(check, value, expected):
    result = check(value)
    assert result == expected and type(result) is type(expected)


BAD = [
    # (check, value, message)
    (lambda v: check_integer("epochs", v, 1), 0, r"epochs must be an integer >= 1, got 0\."),  # below the minimum
    (lambda v: check_integer("epochs", v, 1), True, r"epochs must be an integer >= 1, got True\."),  # a bool
    (lambda v: check_integer("epochs", v, 1), 2.0, r"epochs must be an integer >= 1, got 2\.0\."),  # a float
    (lambda v: check_integer("epochs", v, 1), "2", r"epochs must be an integer >= 1, got '2'\."),  # a string
    (lambda v: check_number("lr", v, positive=True), 0.0, r"lr must be a finite number > 0, got 0\.0\."),  # zero
    (lambda v: check_number("lr", v, positive=True), math.nan, r"lr must be a finite number > 0, got nan\."),  # NaN
    (lambda v: check_number("lr", v, positive=True), math.inf, r"lr must be a finite number > 0, got inf\."),  # inf
    (lambda v: check_number("w", v, positive=False), -1, r"w must be a finite number >= 0, got -1\."),  # negative
    (lambda v: check_number("w", v, positive=False), False, r"w must be a finite number >= 0, got False\."),  # bool
]


@pytest.mark.parametrize("check, value, message", BAD)
def test_invalid_options_name_themselves(check, value, message):
    with pytest.raises(ValueError, match=message):
        check(value)


def test_closest_choice():
    assert closest("--refine_step", ["--refine_steps", "--refine_lr"]) == "--refine_steps"
    assert closest("--xyz", ["--refine_steps", "--refine_lr"]) is None


BOOLEANS = [
    # (value, parsed)
    (True, True),  # a bool as it is
    (False, False),  # a bool as it is
    (1, True),  # fire's --flag 1
    (0, False),  # fire's --flag 0
    ("true", True),  # lowercase, as fire hands it over
    ("false", False),  # the case that counted as true
    ("FALSE", False),  # any case
    ("Yes", True),  # yes/no
    ("no", False),  # yes/no
    (" 0 ", False),  # spaces around
    ("1", True),  # a digit string (monai.bundle's --key 1)
]


@pytest.mark.parametrize("value, parsed", BOOLEANS)
def test_one_boolean_parser(value, parsed):
    assert as_bool("overwrite", value) is parsed


@pytest.mark.parametrize("value", ["maybe", "", "2", 2, None, 0.5, "ture"])  # words, numbers and nothing else
def test_non_booleans_are_refused_naming_the_option(value):
    with pytest.raises(ValueError, match=r"overwrite must be true or false \(also yes/no, 1/0, in any case\), got"):
        as_bool("overwrite", value)
