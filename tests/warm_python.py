"""``run_python``: run ``python -m <module> ...`` as a process of its own, in seconds less.

Most of a command-line test's time is the new interpreter importing torch and MONAI (about 5 s on 2 cores): a
table of 50 bad inputs spent 5 minutes importing. Each test process (each xdist worker) starts one
:mod:`warm_server`, which imports them once and forks a child per command: the child is the command's process,
with its own working directory, environment, output files and exit status, run by ``runpy`` as ``python -m``
runs it. Commands whose interpreter would start differently (other ``PYTHONWARNINGS``, ``OMP_NUM_THREADS``,
``MPLBACKEND``) and anything other than ``python -m`` run as plain subprocesses.
"""

import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

SERVER = Path(__file__).with_name("warm_server.py")
STARTUP = {"PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
"""What the server's interpreter starts with; a command asking for other values gets a fresh process."""

_server: Optional[subprocess.Popen] = None


def python_env() -> Dict[str, str]:
    """This process's environment with :data:`STARTUP`: what a command run by the warm server gets."""
    return {**os.environ, **STARTUP}


def _start() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        env = {**os.environ, **STARTUP}
        _server = subprocess.Popen(
            [sys.executable, str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        atexit.register(_server.kill)
        if json.loads(_server.stdout.readline()) != {"ready": True}:
            raise RuntimeError("the warm Python server did not start")
    return _server


def _reply(server: subprocess.Popen, timeout: Optional[float]) -> dict:
    if not select.select([server.stdout], [], [], timeout)[0]:
        raise TimeoutError
    line = server.stdout.readline()
    if not line:
        raise RuntimeError("the warm Python server ended")
    return json.loads(line)


def run_python(
    args: List[str], cwd, env: Dict[str, str], timeout: Optional[float] = None
) -> subprocess.CompletedProcess:
    """Run ``args`` (``[sys.executable, "-m", module, ...]``) like ``subprocess.run(args, cwd=cwd, env=env,
    capture_output=True, text=True, timeout=timeout)``.

    Raises:
        subprocess.TimeoutExpired: when the command runs past ``timeout`` (it is killed).
    """
    warm = len(args) > 2 and args[0] == sys.executable and args[1] == "-m"
    if not warm or any(env.get(k) != v for k, v in STARTUP.items()):
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    server = _start()
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        out.touch()
        err.touch()
        request = {"module": args[2], "args": args[3:], "cwd": str(cwd), "env": env, "stdout": str(out)}
        server.stdin.write(json.dumps({**request, "stderr": str(err)}) + "\n")
        server.stdin.flush()
        pid = _reply(server, 60)["pid"]
        try:
            returncode = _reply(server, timeout)["returncode"]
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):  # it may have ended just now
                os.kill(pid, signal.SIGKILL)
            _reply(server, 60)
            raise subprocess.TimeoutExpired(args, timeout) from None
        return subprocess.CompletedProcess(
            args, returncode, out.read_text(errors="replace"), err.read_text(errors="replace")
        )
