"""Imported by the bundle configs (``"$import custom.one_line_errors"``): a user error that reaches the top of
``python -m monai.bundle run ...`` (a missing file, a bad option, a checkpoint of another variant), even wrapped in
MONAI's ``RuntimeError`` by the config parser, is printed as one ``error: <message>`` line and the process exits
with code 2, as ``python -m custom ...`` does. Any other exception keeps its full traceback.

Importing this module sets ``sys.excepthook``; it has no other effect.
"""

import os
import sys

from custom.errors import user_error

__all__ = ["excepthook"]

_default_hook = sys.excepthook


def excepthook(exc_type, exc, tb) -> None:
    """``sys.excepthook``: one line and exit code 2 for user errors, the default report for the rest."""
    cause = user_error(exc)
    if cause is None:
        _default_hook(exc_type, exc, tb)
        return
    sys.stdout.flush()
    print(f"error: {cause}", file=sys.stderr, flush=True)
    os._exit(2)  # an excepthook cannot set the exit status otherwise


sys.excepthook = excepthook
