"""Shared fixtures: environment for offline runs and the path of the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Two pytest workers share two cores: one thread each beats oversubscribed small kernels.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
MEDNODE = REPO.parent / "shared" / "data" / "mednode"


@pytest.fixture(scope="session")
def mednode() -> Path:
    """MED-NODE (170 real photos, melanoma/ naevus/) from ../shared beside the checkout."""
    if not MEDNODE.is_dir():
        pytest.skip(f"real data not present at {MEDNODE}")
    return MEDNODE
