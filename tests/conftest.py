"""Shared fixtures: environment for offline runs and the path of the shared real data."""

from __future__ import annotations

import os
import sys
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


_MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def isolated_mlflow_uris():
    """Each test starts with no MLflow tracking or registry URI, and leaves none behind.

    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` (called in-process by
    ``tasks.tracking.configure``) also export ``MLFLOW_*_URI`` into ``os.environ`` so that
    subprocesses inherit them. Without this reset, a later test on the same xdist worker would
    read or register into an earlier test's store, and its CLI subprocesses would too.
    """
    for name in _MLFLOW_URI_VARS:
        os.environ.pop(name, None)
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    for name in _MLFLOW_URI_VARS:
        os.environ.pop(name, None)
