"""Team stores on a real PostgreSQL server: MLflow's tracking server and a shared Optuna study.

The services are the ones README "Running for a team" starts (deploy/ has them as a compose
file): a PostgreSQL server (initdb + pg_ctl in a tmp dir, tests/pg.py), ``mlflow server`` on
it with served artifacts, and ``tune.storage`` pointing Optuna at it. The stages, ``dermaflow
tune`` and ``dermaflow tune --worker`` reach them only through ``MLFLOW_TRACKING_URI`` and
params, as a team member's machine would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tasks import paths
from tests.helpers import REPO, TINY, env, gate_config, prepare_tiny
from tests.pg import mlflow_server, postgres_server, stop_group

STRICT = gate_config()
# Promotes any candidate that is not worse on every image: the alias must move to it.
LENIENT = gate_config(min_gain=-1.0, max_ece_increase=1.0)
SPACE = (
    "tune.space={train.lr: {low: 0.001, high: 0.01, log: true}, "
    "model.dropout: {low: 0.0, high: 0.5}}"
)


@pytest.fixture(scope="module")
def pg():
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def served_artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow-server") / "artifacts"


@pytest.fixture(scope="module")
def mlflow_url(pg, served_artifacts):
    """One MLflow tracking server on PostgreSQL for the module, artifacts served from tmp."""
    backend = pg.url(pg.create_database("mlflow"))
    log = served_artifacts.parent / "server.log"
    with mlflow_server(backend, served_artifacts, log) as url:
        yield url


def tiny_project(root: Path, overrides: list[str]) -> Path:
    """A project folder as the data stages leave it: params.yaml, manifest, splits, cache."""
    from tasks.ingest import build_manifest

    (root / "data").mkdir(parents=True)
    prepare_tiny(root / "data", overrides)
    shutil.copy(root / "data" / "params.yaml", root / "params.yaml")
    build_manifest(root / "data" / "raw", progress=False).to_parquet(root / paths.MANIFEST)
    return root


def team_env(tracking: str) -> dict[str, str]:
    return {**env(), "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": tracking}


@pytest.mark.slow
def test_train_logs_registers_and_moves_aliases_through_an_mlflow_server_on_postgres(
    pg, mlflow_url, served_artifacts, tmp_path, monkeypatch
):
    from flows.pipeline import promotion_gate
    from tasks.stage import run_entry

    project = tiny_project(tmp_path / "proj", TINY)
    # The train stage as dvc.yaml runs it, with only the tracking URI pointing at the server.
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.train"],
        cwd=project,
        env=team_env(mlflow_url),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((project / "models/run.json").read_text())
    assert first["tracking_uri"] == mlflow_url

    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    assert run_entry("calibrate") == 0  # reopens the lineage run on the server
    assert promotion_gate.fn(str(project), STRICT, None)["promote"]  # the first: champion

    assert run_entry("train", overrides=["train.seed=1"]) == 0
    second = json.loads((project / "models/run.json").read_text())
    assert run_entry("calibrate") == 0
    assert promotion_gate.fn(str(project), LENIENT, None)["promote"]

    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    name = first["registered_model"]
    assert second["registered_model"] == name
    assert (first["model_version"], second["model_version"]) == ("1", "2")
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    run = client.get_run(first["run_id"])
    assert run.data.params["model.arch"] == "custom_cnn"
    assert {"test_balanced_accuracy", "test_ece_after"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    assert "bundle/model.pt" in {f.path for f in client.list_artifacts(run.info.run_id, "bundle")}
    # Served artifacts: the bytes went over HTTP into the server's destination; the project
    # holds no store of its own.
    assert len(list(served_artifacts.glob("**/bundle/model.pt"))) == 2
    assert not (project / "mlruns" / "mlflow.db").exists()
    assert not list((project / "mlruns").glob("**/model.pt"))
    # And the metadata is in PostgreSQL: both runs, both versions, the alias on version 2.
    run_ids = {r for (r,) in pg.query("mlflow", "SELECT run_uuid FROM runs")}
    assert {first["run_id"], second["run_id"]} <= run_ids
    aliases = pg.query(
        "mlflow", f"SELECT alias, version FROM registered_model_aliases WHERE name = '{name}'"
    )
    assert aliases == [("champion", 2)]


@pytest.mark.slow
def test_two_tune_workers_share_one_study_on_postgres(pg, mlflow_url, tmp_path):
    import optuna

    storage = pg.url(pg.create_database("optuna"))
    trials = 6
    project = tiny_project(
        tmp_path / "proj",
        [
            *TINY,
            "tracking.experiment=team-tune",
            "tune.epochs=2",
            f"tune.trials={trials}",
            "tune.pruner=none",
            SPACE,
            f"tune.storage={storage}",
        ],
    )
    logs = {who: (tmp_path / f"{who}.log").open("w") for who in ("worker", "leader")}
    dermaflow = str(Path(sys.executable).parent / "dermaflow")
    commands = {
        # The worker starts first and waits for the leader to open the study.
        "worker": [dermaflow, "tune", "--worker", "--wait", "180", "--no-repro"],
        "leader": [dermaflow, "tune", "--no-repro"],
    }
    procs = {
        who: subprocess.Popen(
            cmd,
            cwd=project,
            env=team_env(mlflow_url),
            stdout=logs[who],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for who, cmd in commands.items()
    }
    try:
        for proc in procs.values():
            proc.wait(timeout=600)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                stop_group(proc, grace_s=5)
        for log in logs.values():
            log.close()
    text = {who: (tmp_path / f"{who}.log").read_text() for who in procs}
    for who, proc in procs.items():
        assert proc.returncode == 0, f"{who}:\n{text[who][-4000:]}"

    study = optuna.load_study(study_name="team-tune-tune-custom_cnn", storage=storage)
    done = study.trials
    # Optuna hands out the trials: the study stops at tune.trials, give or take the one a
    # second process may start in the same instant as the last.
    assert trials <= len(done) <= trials + 1
    assert all(t.state.name == "COMPLETE" for t in done)

    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name("team-tune")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1 == len(done)
    # No trial ran twice: every trial number has exactly one child run, the one it recorded.
    by_number = {int(c.data.tags["trial_number"]): c.info.run_id for c in children}
    assert sorted(by_number) == list(range(len(done)))
    assert {t.number: t.user_attrs["mlflow_run_id"] for t in done} == by_number
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_balanced_accuracy")
        assert [m.step for m in history] == [1, 2]
    # Both processes ran trials, and the leader's report counts the worker's too.
    assert len({c.data.tags["dermaflow.tune_worker"] for c in children}) == 2
    assert "tune worker: ran trials [" in text["worker"]
    assert parent.data.metrics["trials_complete"] == len(done)
    assert parent.data.params["study_storage"] == storage  # no password: nothing to redact
    value_steps = {m.step for m in client.get_metric_history(parent.info.run_id, "trial_value")}
    assert value_steps == set(by_number)
    ((stored,),) = pg.query("optuna", "SELECT count(*) FROM trials")
    assert stored == len(done)
    assert (project / "configs" / "tuned.yaml").is_file()


def test_tune_storage_comes_from_params_and_its_password_is_masked(tmp_path):
    from tasks.config import load_params
    from tasks.tune import redact_url, storage_uri
    from tests.helpers import write_params

    assert storage_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/optuna.db"
    url = "postgresql+psycopg://ana:s3cret@db.lab:5432/optuna"
    p = load_params(write_params(tmp_path / "params.yaml", [f"tune.storage={url}"]))
    assert p.tune.storage == url and storage_uri(tmp_path, p.tune.storage) == url
    assert redact_url(url) == "postgresql+psycopg://ana:***@db.lab:5432/optuna"
    plain = "postgresql+psycopg://ana@db.lab/optuna"
    assert redact_url(plain) == plain
    assert load_params(REPO / "params.yaml").tune.storage is None  # one machine: sqlite


def test_a_worker_without_an_open_tune_call_stops_with_a_clear_message(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from tests.helpers import write_params

    write_params(tmp_path / "params.yaml", [*TINY, SPACE])
    (tmp_path / paths.PREPARED).mkdir(parents=True)
    meta = {"size": 32, "resize": "center_crop"}  # the cache the TINY params name
    (tmp_path / paths.PREPARED / "meta.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["tune", "--worker", "--no-repro"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())  # Rich wraps long lines
    assert "no open `dermaflow tune` on study synthetic-tune-custom_cnn" in message
    assert "Traceback" not in result.output
    assert os.path.exists(tmp_path / "mlruns" / "optuna.db")  # the default: beside MLflow's


@pytest.mark.slow
def test_a_deployment_run_on_a_prefect_server_on_postgres_completes_the_pipeline(
    pg, mlflow_url, tmp_path
):
    """prefect.yaml's deployment, a process work pool and its worker, a run through the API."""
    from tests.helpers import make_project
    from tests.pg import free_port, wait_for_http

    db = pg.url(pg.create_database("prefect"), driver="asyncpg")
    port = free_port()
    home = tmp_path / "prefect-home"
    base = {
        **team_env(mlflow_url),
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    server_log = tmp_path / "prefect-server.log"
    prefect = str(Path(sys.executable).parent / "prefect")
    with server_log.open("w") as out:
        server = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env={**base, "PREFECT_API_DATABASE_CONNECTION_URL": db},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    project = make_project(
        tmp_path / "proj",
        TINY
        + [
            "tracking.registered_model=team-scheduled",  # not test 1's model and champion
            "explain.methods=[gradcam]",
            "explain.layers=[deep]",
            "explain.per_class=1",
            "explain.misclassified_cap=1",
            "explain.bootstrap=50",
            "export.bench_repeats=2",
            "export.bench_batches=[1]",
            "ood.external=[]",
            "ood.nonskin_count=4",
            "subgroups.bootstrap=20",
            "card.bootstrap=50",
            "gate.bootstrap=50",
            "orchestration.save_experiment=false",
        ],
    )
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    client = {
        **base,
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "DERMAFLOW_REPO": str(project),
    }
    worker = None
    worker_log = tmp_path / "worker.log"
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/health", server, server_log)

        def cli(*args: str) -> str:
            proc = subprocess.run(
                [prefect, *args], cwd=project, env=client, capture_output=True, text=True
            )
            assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
            return proc.stdout + proc.stderr

        cli("work-pool", "create", "dermaflow", "--type", "process")
        cli("--no-prompt", "deploy", "--all")
        with worker_log.open("w") as out:
            worker = subprocess.Popen(
                [prefect, "worker", "start", "--pool", "dermaflow"],
                cwd=project,
                env=client,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        out = subprocess.run(
            [
                prefect, "deployment", "run", "dermaflow-pipeline/weekly-retraining",
                "--param", "refresh=false", "--watch", "--watch-timeout", "900",
            ],
            cwd=project, env=client, capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode == 0, (
            f"{out.stdout}{out.stderr}\nworker:\n{worker_log.read_text()[-6000:]}"
        )
        assert "Flow run finished successfully in 'Completed'" in out.stdout + out.stderr
    finally:
        for proc in (worker, server):
            if proc is not None:
                stop_group(proc)
    info = json.loads((project / "models/run.json").read_text())
    assert info["tracking_uri"] == mlflow_url
    mlflow = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    champion = mlflow.get_model_version_by_alias(info["registered_model"], "champion")
    assert champion.version == str(info["model_version"])
    (deployments,) = pg.query("prefect", "SELECT count(*) FROM deployment")
    assert deployments == (1,)
    states = pg.query("prefect", "SELECT state_type FROM flow_run")
    assert ("COMPLETED",) in [(str(s),) for (s,) in states]
