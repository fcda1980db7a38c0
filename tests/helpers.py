"""Running the real CLI and DVC in a scratch project folder, as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A small, fast version of the default: three classes, 32-48 px, two epochs.
TINY = [
    "synth.count=150",
    "synth.image_size=48",
    "synth.class_mix={NV: 0.5, MEL: 0.3, BCC: 0.2}",
    "validate.min_side=32",
    "prepare.size=32",
    "ingest.workers=1",
    "prepare.workers=1",
    "model.arch=custom_cnn",
    "train.epochs=2",
    "train.batch_size=32",
    "train.warmup_epochs=0",
]


def env() -> dict[str, str]:
    """The caller's environment with this venv first on PATH and tracking kept local."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out["PATH"] = f"{BIN}{os.pathsep}{out.get('PATH', '')}"
    out["GX_ANALYTICS_ENABLED"] = "false"
    out["DVC_NO_ANALYTICS"] = "1"
    out["MPLBACKEND"] = "Agg"
    return out


def write_params(dest: Path, overrides: list[str]) -> Path:
    """The repo's params.yaml with ``key=value`` overrides applied, written to ``dest``."""
    from tasks.config import apply_override

    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    for text in overrides:
        apply_override(tree, text)
    dest.write_text(yaml.safe_dump(tree, sort_keys=False))
    return dest


def make_project(root: Path, overrides: list[str], git: bool = True) -> Path:
    """A scratch copy of the project (code, dvc.yaml, params) as its own git + DVC repo."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("tasks", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root / "params.yaml", overrides)
    if git:
        run(["git", "init", "-q"], root)
        run(["dvc", "init", "-q"], root)
        run(["dvc", "config", "core.analytics", "false"], root)
        run(["git", "add", "-A"], root)
        run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], root)
    return root


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{tail}")
    return proc


def prepare_tiny(root: Path, overrides: list[str] | None = None):
    """In-process synth -> ingest -> split -> prepare (32 px) under ``root``; returns params.

    For tests of one stage function on a real prepared cache without DVC or a subprocess.
    """
    from tasks.config import load_params
    from tasks.ingest import build_manifest
    from tasks.prepare import prepare
    from tasks.split import split_manifest, write_splits
    from tasks.synth import generate

    p = load_params(write_params(root / "params.yaml", TINY if overrides is None else overrides))
    generate(p.synth, root / "raw", progress=False)
    manifest = build_manifest(root / "raw", progress=False)
    frame, _ = split_manifest(manifest, p.split.fractions, p.split.seed)
    write_splits(frame, root / "splits")
    prepare(root / "splits", root / "raw", root / "prepared", size=32, show_progress=False)
    return p


def gate_config(min_gain: float = 0.0, max_ece_increase: float = 0.02):
    """The promotion gate's config for tests: 200 resamples, seed 0, alias ``champion``.

    The defaults are params.yaml's strict rule; ``gate_config(-1.0, 1.0)`` promotes any
    candidate, for tests that need the alias to move.
    """
    from tasks.config import GateConfig

    return GateConfig(
        min_gain=min_gain,
        max_ece_increase=max_ece_increase,
        confidence=0.95,
        bootstrap=200,
        seed=0,
        champion_alias="champion",
    )


def patients(n: int = 300, seed: int = 0):
    """Random patients of three classes whose class leans on age and site, for metadata priors.

    Class 0 is old and mostly on the face, class 1 (60 % of them) young, class 2 old; sex is
    noise. Returns the rows (``age``, ``sex``, ``site``) and the class indices.
    """
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.2, 0.6, 0.2])
    face = rng.random(n) < np.where(y == 0, 0.8, 0.2)
    age = np.where(y == 1, 30.0, 70.0) + rng.normal(0, 10, n)
    sex = rng.choice(["male", "female"], size=n)
    rows = pd.DataFrame({"age": age, "sex": sex, "site": np.where(face, "face", "back")})
    return rows, y
