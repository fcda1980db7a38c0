"""Lineage that survives a crash: run.json, MLflow run states, checkpoints, leftovers, modes.

Real sqlite MLflow stores in tmp folders, a real SIGKILLed process, real files; the training
case runs the real ``train`` on a tiny prepared cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tasks import tracking
from tasks.io import LineageError, atomic_dir, atomic_path, clean_stale_temps, file_digest
from tests.helpers import REPO, env, prepare_tiny, write_params


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A project folder whose MLflow store is its own mlruns/mlflow.db."""
    (tmp_path / "models").mkdir()
    tracking.configure(tmp_path)
    return tmp_path


def _status(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.status


def _train_like(repo: Path, bundle_bytes: bytes, fail: bool = False) -> str:
    """What the train stage does with the lineage: open the run, write the bundle, record."""
    bundle = repo / "models" / "model.pt"
    with tracking.lineage_run("exp", "run", {"dataset": "t"}, repo, bundle=bundle) as run:
        import zipfile

        with zipfile.ZipFile(bundle, "w") as z:  # torch.save writes a zip archive
            z.writestr("data.pkl", bundle_bytes)
        tracking.update_run_file(repo, model_version="1", registered_model="m")
        if fail:
            raise RuntimeError("out of memory")
        return run.info.run_id


def test_run_file_is_written_only_when_training_succeeds(repo: Path) -> None:
    run_file = repo / "models" / "run.json"
    first = _train_like(repo, b"weights-1")
    info = json.loads(run_file.read_text())
    assert info["run_id"] == first and info["model_version"] == "1"
    assert info["bundle_sha256"] == file_digest(repo / "models" / "model.pt")
    assert _status(first) == "FINISHED"
    before = run_file.read_bytes()

    with pytest.raises(RuntimeError, match="out of memory"):
        _train_like(repo, b"weights-2", fail=True)
    assert run_file.read_bytes() == before  # still the successful run, atomically untouched
    failed = MlflowClient().search_runs(
        [info["experiment_id"]], filter_string="attributes.status = 'FAILED'"
    )
    assert len(failed) == 1 and failed[0].info.run_id != first

    # The bundle now belongs to the failed run: a later stage refuses instead of logging into
    # the wrong run (today calibrate flipped the failed run to FINISHED).
    with (
        pytest.raises(LineageError, match="come from different trainings"),
        tracking.resume_lineage_run(repo),
    ):
        pass
    assert _status(first) == "FINISHED" and _status(failed[0].info.run_id) == "FAILED"


def test_a_killed_training_run_is_marked_failed_on_the_next_start(repo: Path) -> None:
    script = textwrap.dedent(f"""
        import os, signal
        from tasks import tracking
        tracking.configure({str(repo)!r})
        with tracking.lineage_run("exp", "doomed", {{}}, {str(repo)!r}) as run:
            print(run.info.run_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env(), cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == -9
    killed = proc.stdout.split()[0]
    assert _status(killed) == "RUNNING"  # what MLflow alone would leave forever
    assert not (repo / "models" / "run.json").exists()

    # A run of this project held by a live process (here: this one) is left alone.
    client = MlflowClient()
    experiment = client.get_run(killed).info.experiment_id
    live = client.create_run(experiment, tags=tracking._owner_tags(repo)).info.run_id
    # A RUNNING run of another checkout is not this project's business either.
    other = client.create_run(experiment, tags={tracking.REPO_TAG: "someone-else"}).info.run_id

    _train_like(repo, b"weights")
    assert _status(killed) == "FAILED"
    assert (
        "ended without closing the run" in client.get_run(killed).data.tags[tracking.ABANDONED_TAG]
    )
    assert _status(live) == "RUNNING" and _status(other) == "RUNNING"


def test_resume_keeps_the_status_and_refuses_failed_runs(repo: Path) -> None:
    run_id = _train_like(repo, b"weights")
    with (
        pytest.raises(ValueError, match="calibration blew up"),
        tracking.resume_lineage_run(repo),
    ):
        raise ValueError("calibration blew up")
    assert _status(run_id) == "FINISHED"  # a failed calibrate does not fail the training

    MlflowClient().set_terminated(run_id, status="FAILED")
    with (
        pytest.raises(LineageError, match=f"names MLflow run {run_id}, which is FAILED"),
        tracking.resume_lineage_run(repo),
    ):
        pass
    assert _status(run_id) == "FAILED"  # never flipped to FINISHED


def test_a_resumed_run_killed_mid_stage_returns_to_finished(repo: Path) -> None:
    run_id = _train_like(repo, b"weights")
    script = textwrap.dedent(f"""
        import os, signal
        from tasks import tracking
        with tracking.resume_lineage_run({str(repo)!r}):
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=env(), cwd=REPO)
    assert proc.returncode == -9 and _status(run_id) == "RUNNING"
    with tracking.resume_lineage_run(repo):  # the next stage start closes it first
        pass
    assert _status(run_id) == "FINISHED"


def test_stage_door_refuses_a_truncated_bundle(repo: Path) -> None:
    from tasks.io import lineage_problem

    _train_like(repo, b"weights")
    bundle = repo / "models" / "model.pt"
    bundle.write_bytes(bundle.read_bytes()[:10])
    problem = lineage_problem(repo / "models" / "run.json", bundle)
    assert problem.startswith(f"{bundle}: corrupt or truncated (not a PyTorch archive)")


# --------------------------------------------------------------------------------------------
# Checkpoints, leftovers and permissions
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return root, prepare_tiny(root)


def test_truncated_checkpoint_is_quarantined_and_training_starts_fresh(tiny, tmp_path, capsys):
    from tasks.train import train

    root, p = tiny
    cfg = dataclasses.replace(p.train, epochs=1)
    checkpoint = tmp_path / "checkpoint.pt"
    train(p.model, cfg, root / "prepared", checkpoint, "v1", show_progress=False)
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])  # a kill in the middle of an old write

    result = train(p.model, cfg, root / "prepared", checkpoint, "v1", show_progress=False)
    assert result.resumed_from is None and len(result.history) == 1
    moved = [f for f in tmp_path.iterdir() if f.name.startswith("checkpoint.pt.corrupt-")]
    assert len(moved) == 1 and moved[0].stat().st_size == len(data) // 2
    assert checkpoint.is_file() and checkpoint.stat().st_size > len(data) // 2  # a fresh one
    err = capsys.readouterr().err
    assert f"{checkpoint} is unreadable" in err and "starts fresh from epoch 1" in err


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_stage_start_removes_what_a_killed_run_left(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    dead = _dead_pid()
    data = tmp_path / "data"
    (data / f".prepared.{dead}.abc123.tmp").mkdir(parents=True)
    (data / f".prepared.{dead}.abc123.tmp" / "train_images.npy").write_bytes(b"x" * 100)
    (data / ".prepared.q1w2e3.tmp").mkdir()  # the old name format, from before pids
    (data / f".prepared.old-{dead}").mkdir()
    live = data / f".prepared.{os.getpid()}.live.tmp"
    live.mkdir()
    other = data / f".splits.{dead}.zzz.tmp"  # another stage's leftover: not prepare's to clean
    other.mkdir()
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    write_params(tmp_path / "params.yaml", [])
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["prepare"])
    assert result.exit_code == 2  # no splits yet: it stops, but only after cleaning up
    assert "prepare: removed 3 leftover(s) of an interrupted earlier run" in result.output
    assert sorted(p.name for p in data.iterdir()) == sorted([live.name, other.name])


def test_outputs_follow_the_umask(tmp_path):
    from tasks.split import write_splits

    old = os.umask(0o022)
    try:
        frame = pd.DataFrame({"image_id": ["a", "b", "c"], "split": ["train", "val", "test"]})
        write_splits(frame, tmp_path / "splits")
        with atomic_dir(tmp_path / "prepared") as tmp:
            (tmp / "x.npy").write_bytes(b"1")
        with atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "splits") == 0o755 and mode(tmp_path / "prepared") == 0o755
    assert mode(tmp_path / "m.json") == 0o644
    assert clean_stale_temps([tmp_path / "splits", tmp_path / "prepared"]) == []
