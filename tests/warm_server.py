"""A Python process that imports torch, MONAI and the package once and then runs each ``python -m <module> ...``
it is sent in a child forked for it: a process of its own (its own working directory, environment, files,
exit status and output) that starts with the imports done. Used by :mod:`warm_python`.

Protocol: one JSON request per line on stdin (``module``, ``args``, ``cwd``, ``env``, ``stdout``, ``stderr``:
the paths the child's output goes to); for each, a line ``{"pid": ...}`` when the child starts and a line
``{"returncode": ...}`` when it ends.
"""

import atexit
import importlib
import json
import os
import runpy
import sys

PRELOAD = (
    "torch",
    "nibabel",
    "matplotlib.pyplot",
    "ignite.engine",
    "monai.bundle",
    "monai.handlers",
    "fire",
    "custom.cli",
    "custom.runner",
    "custom.workflow",
    "custom.inference",
    "custom.data",
    "custom.plots",
    "custom.interop",
)
"""Imported before any child starts. Not ``custom.one_line_errors``: it acts on the command line when imported."""


def _exit_code(error: SystemExit) -> int:
    """The status a Python process exits with for ``error`` (a message is printed and gives 1)."""
    if error.code is None or isinstance(error.code, int):
        return error.code or 0
    print(error.code, file=sys.stderr)
    return 1


def _child(request: dict) -> None:
    """Become the requested process: run the module as ``__main__`` and exit with its status."""
    os.chdir(request["cwd"])
    sys.path[0] = os.getcwd()  # as ``python -m`` puts it first: the server's own folder otherwise
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
        (2, request["stderr"], os.O_WRONLY | os.O_TRUNC),
    ):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(os.devnull)  # not the server's buffered requests
    sys.argv = [request["module"], *request["args"]]
    code = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as error:
        code = _exit_code(error)
    except BaseException:  # what the interpreter does with an uncaught exception
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
