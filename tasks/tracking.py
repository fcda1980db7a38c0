"""The one module that talks to MLflow: store location, the lineage run, artifacts, registry.

One MLflow run per pipeline execution holds every param, metric, model and picture of that
lineage. The train entry opens it and records its id in ``models/run.json`` (a DVC out); the
later stages (calibrate, export, explain) reopen the same run from that file.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from tasks.io import write_json

STORE_DIR = Path("mlruns")
RUN_FILE = Path("models/run.json")


def local_store_uri(repo: str | Path = ".") -> str:
    """The project's own store: sqlite metadata in mlruns/mlflow.db."""
    db = (Path(repo) / STORE_DIR / "mlflow.db").resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def tracking_uri(repo: str | Path = ".") -> str:
    """``$MLFLOW_TRACKING_URI`` when set (a tracking server), else the project's sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(repo)


def configure(repo: str | Path = ".") -> str:
    uri = tracking_uri(repo)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(name: str, repo: str | Path = ".") -> str:
    """Create (once) the experiment, with artifacts under mlruns/ beside the sqlite file."""
    uri = configure(repo)
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri == local_store_uri(repo):  # a server chooses its own artifact store
        location = (Path(repo) / STORE_DIR / "artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def git_commit(repo: str | Path = ".") -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def lineage_run(
    experiment: str, run_name: str, tags: dict[str, str], repo: str | Path = "."
) -> Iterator[mlflow.ActiveRun]:
    """Start the pipeline's run and record its id in models/run.json for later stages."""
    experiment_id = ensure_experiment(experiment, repo)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        write_json(
            Path(repo) / RUN_FILE,
            {
                "run_id": run.info.run_id,
                "experiment_id": experiment_id,
                "experiment": experiment,
                "tracking_uri": mlflow.get_tracking_uri(),
            },
        )
        yield run


@contextlib.contextmanager
def resume_lineage_run(repo: str | Path = ".") -> Iterator[mlflow.ActiveRun]:
    """Reopen the run that the train stage started (for calibrate, export, explain)."""
    info = json.loads((Path(repo) / RUN_FILE).read_text())
    configure(repo)
    with mlflow.start_run(run_id=info["run_id"]) as run:
        yield run


def update_run_file(repo: str | Path = ".", **fields: Any) -> None:
    path = Path(repo) / RUN_FILE
    info = json.loads(path.read_text())
    info.update(fields)
    write_json(path, info)


def log_params(flat: dict[str, Any]) -> None:
    """The resolved config in one call (MLflow caps values at 6000 characters)."""
    mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    clean = {k: float(v) for k, v in metrics.items() if v is not None}
    mlflow.log_metrics(clean, step=step)


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def log_artifacts(files: dict[str, str | Path]) -> None:
    """``{artifact_dir: path}``: each existing file (or folder) into that artifact dir."""
    for where, path in files.items():
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=where)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path=where)


def log_pytorch_model(
    model: Any, input_example: Any, registered_model: str | None
) -> tuple[str, str | None]:
    """Log the hookable nn.Module (pickle format: pt2 graphs cannot take CAM hooks).

    Returns:
        The model URI and the registered version (None when not registered).
    """
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    signature = None
    if hasattr(model, "fusion_head"):  # image + metadata inputs: no single-tensor signature
        input_example = None
    else:
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        signature = infer_signature(input_example, output)
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        serialization_format="pickle",
        signature=signature,
        input_example=input_example,
        registered_model_name=registered_model,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    version = getattr(info, "registered_model_version", None)
    return info.model_uri, None if version is None else str(version)


def log_onnx_model(path: str | Path, registered_model: str, alias: str | None) -> str:
    """Log the ONNX file with mlflow.onnx, register a version and point ``alias`` at it."""
    import mlflow.onnx
    import onnx

    info = mlflow.onnx.log_model(
        onnx.load(str(path)), name="onnx_model", registered_model_name=registered_model
    )
    version = str(info.registered_model_version)
    if alias:
        set_alias(registered_model, alias, version)
    return version


def set_alias(registered_model: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(registered_model, alias, str(version))


def version_metrics(registered_model: str, version: str) -> dict[str, float]:
    """The metrics of the run that produced a registered model version."""
    client = MlflowClient()
    run_id = client.get_model_version(registered_model, str(version)).run_id
    return dict(client.get_run(run_id).data.metrics)


def alias_version(registered_model: str, alias: str) -> str | None:
    """The version an alias points at, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(registered_model, alias).version)
    except MlflowException:
        return None


def environment_tags() -> dict[str, str]:
    import torch

    return {
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "cuda": str(torch.cuda.is_available()),
    }
