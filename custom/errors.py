"""User errors: found inside MONAI's wrapping and reported as one ``error:`` line with exit code 2."""

import difflib
import math
import numbers
import sys
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

__all__ = [
    "INTERRUPTED",
    "USER_ERRORS",
    "as_bool",
    "check_integer",
    "check_number",
    "closest",
    "exit_on_user_error",
    "user_error",
]

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)
INTERRUPTED = "error: interrupted; the outputs of unfinished pairs or epochs were not written"
"""The one line every entry point prints on Ctrl-C (before exiting with code 130)."""


TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")


def as_bool(name: str, value) -> bool:
    """The one boolean parser of every command-line flag and bundle key: ``True``/``False``, ``1``/``0`` and the
    words true/false, yes/no, 1/0 in any case (fire and ``python -m monai.bundle`` hand ``--flag false`` over as
    the string ``"false"``, which ``bool()`` would take as true).

    Raises:
        ValueError: for anything else, naming the option: ``"<name> must be true or false ..., got <value>."``
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    word = value.strip().lower() if isinstance(value, str) else None
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError(f"{name} must be true or false (also yes/no, 1/0, in any case), got {value!r}.")


def check_integer(name: str, value, minimum: int) -> int:
    """``value`` as an ``int``, refused unless it is an integer (not a bool) ``>= minimum``.

    Raises:
        ValueError: naming the option: ``"<name> must be an integer >= <minimum>, got <value>."``
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_number(name: str, value, positive: bool) -> float:
    """``value`` as a ``float``, refused unless it is a finite real number ``> 0`` (``positive``) or ``>= 0``.

    Raises:
        ValueError: naming the option: ``"<name> must be a finite number > 0, got <value>."``
    """
    real = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not real or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}.")
    return float(value)


def closest(name: str, choices: Sequence[str]) -> Optional[str]:
    """The valid choice closest to a mistyped ``name`` (for a "did you mean" hint), or ``None``."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


def user_error(error: BaseException) -> Optional[BaseException]:
    """The first of our clear errors (``ValueError`` / ``FileNotFoundError`` / ``FileExistsError``) in the chain
    of ``error``'s causes, skipping MONAI's wrappers ("applying transform ...", the config parser's
    ``RuntimeError``); ``None`` when there is none."""
    seen = set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, USER_ERRORS) and "applying transform" not in str(e):
            return e
        e = e.__cause__ or e.__context__
    return None


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Run a block; a user error anywhere in it (even wrapped by MONAI) becomes ``error: <message>`` on stderr and
    ``SystemExit(2)``. Other exceptions propagate unchanged."""
    try:
        yield
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
