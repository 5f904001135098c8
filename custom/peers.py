"""The peer tools that cannot share our environment, each in an environment of its own.

FireANTs pins its own SimpleITK (2.2.1) and pulls hydra, pandas and scikit-image; ConvexAdam and itk-elastix bring
their own stacks. ``python -m custom peer_envs`` makes one virtual environment per tool under ``--env_dir``
(default ``.peers``) from the pins of :data:`PEER_TOOLS` (the CPU ``torch==2.13.0`` first, where a tool needs torch,
so that no CUDA build is pulled). The 3D benchmark (``python -m custom accuracy --spatial_dims 3 --peers
ants,fireants,convexadam,elastix``) runs each tool's rows (:data:`PEER_ROWS`) through :mod:`custom.peer_run` with
that environment's Python, and skips a tool, saying why, when its environment is absent.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["PEER_ROWS", "PEER_TOOLS", "RUNNER", "check_peer_names", "make_peer_envs", "peer_python"]

TORCH = "torch==2.13.0"
PEER_TOOLS: Dict[str, Tuple[str, ...]] = {
    "fireants": (TORCH, "fireants==1.5.0"),
    "convexadam": (TORCH, "convexadam==0.2.0"),
    "elastix": ("itk-elastix==0.25.4", "nibabel>=5.0"),
}
"""Each tool's pinned requirements, installed in this order (one ``pip install`` each)."""

FIREANTS_OASIS = {
    "deformation_type": "compositive",
    "optimizer": "adam",
    "optimizer_lr": 0.25,
    "optimizer_params": {"beta1": 0.1, "scaledown": False},
    "cc_kernel_size": 7,
    "smooth_grad_sigma": 1.0,
    "smooth_warp_sigma": 0.25,
}
"""FireANTs' own OASIS settings (its ``scripts/pairwise/oasis.py``, test mode, Greedy): compositive updates, Adam
(learning rate 0.25, beta1 0.1), local NCC over 7 voxels, gradient smoothing sigma 1, warp smoothing sigma 0.25, at
scales 4, 2, 1."""

PEER_ROWS: Dict[str, Tuple[str, dict]] = {
    "FireANTs 1.5 Greedy, its OASIS settings (iterations [250,200,100])": (
        "fireants",
        {"iterations": [250, 200, 100], **FIREANTS_OASIS},
    ),
    "FireANTs 1.5 Greedy, fast (iterations [100,50,20])": ("fireants", {"iterations": [100, 50, 20], **FIREANTS_OASIS}),
    "ConvexAdam 0.2.0 (convex_adam_pt defaults, MIND)": ("convexadam", {}),
    "elastix (itk-elastix 0.25.4, default B-spline map)": ("elastix", {"transform": "bspline", "resolutions": 4}),
}
"""The benchmark's rows of the peer tools: row name -> (tool, the settings :mod:`custom.peer_run` passes it)."""

RUNNER = Path(__file__).with_name("peer_run.py")
"""The script each peer environment runs (it imports the tool, numpy and nibabel, never this package)."""
MARKER = "vxm-lite-peer.json"
"""Written last into a finished environment: the requirements it was made from."""


def check_peer_names(peers: Sequence[str], allowed: Sequence[str]) -> List[str]:
    """``peers`` as a list, checked.

    Raises:
        ValueError: for a name not in ``allowed``.
    """
    unknown = [p for p in peers if p not in allowed]
    if unknown:
        raise ValueError(f"peers must be among {list(allowed)}, got {unknown}.")
    return list(peers)


def _python(env: Path) -> Path:
    return env / "bin" / "python"


def peer_python(env_dir: Union[str, Path], tool: str) -> Tuple[Optional[Path], str]:
    """The Python of ``tool``'s environment under ``env_dir``: ``(path, "")``, or ``(None, why not)`` when it is
    absent, unfinished or made from other requirements than :data:`PEER_TOOLS` pins now."""
    env = Path(env_dir) / tool
    marker = env / MARKER
    make = f"make it with: python -m custom peer_envs --peers {tool} --env_dir {env_dir}"
    if not marker.is_file() or not _python(env).exists():
        return None, f"no {tool} environment at {env} ({make})"
    if json.loads(marker.read_text()).get("requirements") != list(PEER_TOOLS[tool]):
        return None, f"the {tool} environment at {env} has other requirements than {list(PEER_TOOLS[tool])} ({make})"
    return _python(env), ""


def make_peer_envs(
    peers: Union[str, Sequence[str]] = tuple(PEER_TOOLS), env_dir: str = ".peers", rebuild: bool = False
) -> Dict[str, str]:
    """Make the environment of each tool in ``peers`` under ``env_dir``: ``python -m venv``, then its pinned
    requirements (:data:`PEER_TOOLS`). An environment that is finished and current is kept unless ``rebuild``; an
    unfinished one is made anew. Needs the package registry (and the local CPU torch file for torch).

    Args:
        peers: tool names (comma-separated or a list).
        env_dir: the folder of the environments (``<env_dir>/<tool>``).
        rebuild: make every named environment anew.

    Returns:
        Tool -> the path of its Python.

    Raises:
        ValueError: for an unknown tool.
        RuntimeError: when ``pip`` fails (its output's tail in the message).
    """
    from custom.runner import as_list

    made = {}
    for tool in check_peer_names(as_list(peers), tuple(PEER_TOOLS)):
        env = Path(env_dir) / tool
        python, _ = peer_python(env_dir, tool)
        if python and not rebuild:
            print(f"{tool}: {env} is current", flush=True)
            made[tool] = str(python)
            continue
        shutil.rmtree(env, ignore_errors=True)
        _call([sys.executable, "-m", "venv", str(env)], tool)
        for requirement in PEER_TOOLS[tool]:
            print(f"{tool}: pip install {requirement}", flush=True)
            _call([str(_python(env)), "-m", "pip", "install", "--quiet", requirement], tool)
        (env / MARKER).write_text(json.dumps({"requirements": list(PEER_TOOLS[tool])}))
        made[tool] = str(_python(env))
        print(f"{tool}: made {env}", flush=True)
    return made


def _call(command: List[str], tool: str) -> None:
    """Run ``command``; raise ``RuntimeError`` with its output's tail when it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-2000:]
        raise RuntimeError(
            f"making the {tool} environment failed: {' '.join(command)} (exit {done.returncode}):\n{tail}"
        )
