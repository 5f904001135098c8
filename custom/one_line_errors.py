"""Imported by the bundle configs (``"$import custom.one_line_errors"``): a user error that reaches the top of
``python -m monai.bundle run ...`` (a missing file, a bad option, a checkpoint of another variant), even wrapped in
MONAI's ``RuntimeError`` by the config parser, is printed as one ``error: <message>`` line and the process exits
with code 2, as ``python -m custom ...`` does. Any other exception keeps its full traceback.

Importing this module sets ``sys.excepthook`` and, under ``python -m monai.bundle``, checks the command line's
``--key`` options against the config files (:func:`custom.runner.check_bundle_arguments`): a mistyped key stops
before any work instead of being added silently. Ctrl-C prints one line and exits with code 130.
"""

import os
import sys
from pathlib import Path

from custom.errors import INTERRUPTED, user_error
from custom.runner import check_bundle_arguments

__all__ = ["excepthook"]

_default_hook = sys.excepthook


def excepthook(exc_type, exc, tb) -> None:
    """``sys.excepthook``: one line and exit code 2 for user errors (130 for Ctrl-C), the default report otherwise."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.stdout.flush()
        print("\n" + INTERRUPTED, file=sys.stderr)
        os._exit(130)
    cause = user_error(exc)
    if cause is None:
        _default_hook(exc_type, exc, tb)
        return
    sys.stdout.flush()
    print(f"error: {cause}", file=sys.stderr, flush=True)
    os._exit(2)  # an excepthook cannot set the exit status otherwise


sys.excepthook = excepthook
if Path(sys.argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py"):
    try:  # MONAI imports config modules through optional_import, which would swallow the error: exit here
        check_bundle_arguments(sys.argv[1:])
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        os._exit(2)
