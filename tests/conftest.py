import os
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "oasis_real"

warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample.*")
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1)
"""Torch threads of a test process: one per xdist worker (``-n 2`` on 2 cores: more would contend)."""


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)  # a benchmark run in-process may have changed it


@pytest.fixture
def real_data():
    """The three real subjects in ../shared (skipped only when that folder is absent)."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real samples not found at {REAL_DATA}")
    return REAL_DATA
