"""User errors: found inside MONAI's wrapping and reported as one ``error:`` line with exit code 2."""

import sys
from contextlib import contextmanager
from typing import Iterator, Optional

__all__ = ["USER_ERRORS", "exit_on_user_error", "user_error"]

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


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
