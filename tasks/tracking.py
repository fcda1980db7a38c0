"""The one module that talks to MLflow: store location, the lineage run, artifacts, registry.

One MLflow run per pipeline execution holds every param, metric, model and picture of that
lineage. The train entry opens it; the later stages (calibrate, export, explain) reopen the same
run from ``models/run.json`` (a DVC out).

The lineage survives a crash:

- ``models/run.json`` is written once, atomically, when training *succeeded* (the run ended
  FINISHED), with the sha256 of the bundle it made. A failed or killed training leaves the
  previous, consistent file; a stage that finds run.json and model.pt from different trainings
  refuses (:func:`tasks.io.lineage_problem`).
- Runs this project opens carry its identity (``dermaflow.repo``, host, pid). A run left
  RUNNING by a killed process is marked FAILED the next time a lineage run starts or resumes
  in that experiment (a resumed run killed mid-stage goes back to its own status).
- A resumed run keeps its status: a failing calibrate never turns the training's FINISHED run
  into FAILED, and a FAILED run is never reopened (and so never flipped to FINISHED).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from tasks import paths
from tasks.io import LineageError, file_digest, lineage_problem, write_json

STORE_DIR = Path("mlruns")
RUN_FILE = Path("models/run.json")
CLASSES_TAG = "classes"  # model version tag: the JSON list of classes, in output order


def local_store_uri(repo: str | Path = ".") -> str:
    """The project's own store: sqlite metadata in mlruns/mlflow.db."""
    db = (Path(repo) / STORE_DIR / "mlflow.db").resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def tracking_uri(repo: str | Path = ".") -> str:
    """``$MLFLOW_TRACKING_URI`` when set (a tracking server), else the project's sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(repo)


def ui_url(experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: the tracking server's when there is one, else the local
    ``make ui`` address (``dermaflow ui`` serves the sqlite store on port 5000)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


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


REPO_TAG, HOST_TAG, PID_TAG = "dermaflow.repo", "dermaflow.host", "dermaflow.pid"
RESUMED_TAG = "dermaflow.resumed_status"  # the status a resumed run goes back to
ABANDONED_TAG = "dermaflow.abandoned"
# run.json fields of lineage runs open in this process, written when the run succeeds.
_PENDING: dict[Path, dict[str, Any]] = {}


def _repo_id(repo: str | Path) -> str:
    """This checkout's identity on runs (a hash: safe inside an MLflow filter string)."""
    return hashlib.sha256(str(Path(repo).resolve()).encode()).hexdigest()[:16]


def _owner_tags(repo: str | Path) -> dict[str, str]:
    return {
        REPO_TAG: _repo_id(repo),
        "dermaflow.repo_path": str(Path(repo).resolve()),
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
    }


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_abandoned_runs(experiment_id: str, repo: str | Path = ".") -> list[str]:
    """Close the runs of this project that a killed process left RUNNING; return their ids.

    Only runs tagged with this checkout's id, opened on this host by a process that no longer
    exists, are touched: a training running right now elsewhere keeps its run. A training run
    becomes FAILED; a resumed run (calibrate, export, explain killed mid-way) goes back to the
    status it had before, and both get a ``dermaflow.abandoned`` tag saying what happened.
    """
    client = MlflowClient()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{REPO_TAG}` = '{_repo_id(repo)}'",
        max_results=1000,
    )
    closed: list[str] = []
    host = socket.gethostname()
    for run in runs:
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) != host or not pid.isdigit() or _process_alive(int(pid)):
            continue
        status = tags.get(RESUMED_TAG) or "FAILED"
        client.set_tag(
            run.info.run_id,
            ABANDONED_TAG,
            f"process {pid} on {host} ended without closing the run (killed?); set to {status} "
            f"at {time.strftime('%Y-%m-%d %H:%M:%S')}",
        )
        client.set_terminated(run.info.run_id, status=status)
        closed.append(run.info.run_id)
    return closed


# Seconds between system-metric samples of a training run. MLflow's default (10 s) logs
# nothing for a run shorter than one interval; ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
# (MLflow's own variable) overrides it.
SYSTEM_METRICS_INTERVAL_S = 2.0


def _short_system_metrics_interval() -> None:
    """Sample CPU, RAM, disk, network (and GPU with nvidia-ml-py) every few seconds.

    MLflow's monitor publishes a sample only after a full interval has passed while the run is
    still RUNNING, so the interval bounds the shortest training that gets a curve.
    """
    if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)


@contextlib.contextmanager
def lineage_run(
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    repo: str | Path = ".",
    bundle: str | Path | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start the pipeline's run; record it in models/run.json only when the block succeeds.

    The run logs system metrics (``system/cpu_utilization_percentage``,
    ``system/system_memory_usage_megabytes``, ``system/gpu_0_utilization_percentage`` where
    an NVIDIA GPU and nvidia-ml-py are present), shown in the run page's System metrics tab.

    Runs this project left RUNNING (killed processes) are closed first
    (:func:`mark_abandoned_runs`). Inside the block, :func:`update_run_file` adds fields to
    the record; after the block returns and the run has ended FINISHED, run.json is written
    atomically with them and the sha256 of ``bundle``. An exception leaves run.json as it was
    (and MLflow marks the run FAILED), so later stages never log into a failed run.
    """
    experiment_id = ensure_experiment(experiment, repo)
    mark_abandoned_runs(experiment_id, repo)
    run_file = (Path(repo) / RUN_FILE).resolve()
    owned = {**tags, **_owner_tags(repo)}
    _short_system_metrics_interval()
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, tags=owned, log_system_metrics=True
    ) as run:
        _PENDING[run_file] = {
            "run_id": run.info.run_id,
            "experiment_id": experiment_id,
            "experiment": experiment,
            "tracking_uri": mlflow.get_tracking_uri(),
        }
        try:
            yield run
        finally:
            info = _PENDING.pop(run_file)
    bundle = (
        Path(repo) / bundle if bundle is not None and not Path(bundle).is_absolute() else bundle
    )
    if bundle is not None and Path(bundle).is_file():
        info["bundle_sha256"] = file_digest(bundle)
    write_json(run_file, info)


@contextlib.contextmanager
def resume_lineage_run(repo: str | Path = ".") -> Iterator[mlflow.ActiveRun]:
    """Reopen the run that the train stage finished (for calibrate, export, explain, the gate).

    The run keeps its status whatever happens inside: it ends as it was (FINISHED), even when
    the block raises, because a failed calibrate does not make the training fail.

    Raises:
        FileNotFoundError: no models/run.json.
        LineageError: run.json and models/model.pt come from different trainings, or the run
            is unknown to the store, FAILED or KILLED.
    """
    from mlflow.exceptions import MlflowException

    run_file = Path(repo) / RUN_FILE
    if not run_file.is_file():
        raise FileNotFoundError(f"{run_file}: no lineage run recorded; run the train stage first")
    problem = lineage_problem(run_file, Path(repo) / paths.BUNDLE)
    if problem:
        raise LineageError(problem)
    info = json.loads(run_file.read_text())
    uri = configure(repo)
    client = MlflowClient()
    try:
        found = client.get_run(info["run_id"])
    except MlflowException:
        raise LineageError(
            f"{run_file} names MLflow run {info['run_id']}, which the store at {uri} does not "
            "hold; re-run the train stage"
        ) from None
    mark_abandoned_runs(found.info.experiment_id, repo)
    status = client.get_run(info["run_id"]).info.status
    if status in ("FAILED", "KILLED"):
        raise LineageError(
            f"{run_file} names MLflow run {info['run_id']}, which is {status}; a failed "
            "training is never extended. Re-run the train stage"
        )
    client.set_tag(info["run_id"], RESUMED_TAG, "FINISHED" if status == "RUNNING" else status)
    for key, value in _owner_tags(repo).items():
        client.set_tag(info["run_id"], key, value)
    run = mlflow.start_run(run_id=info["run_id"])
    try:
        yield run
    finally:
        mlflow.end_run(status="FINISHED" if status == "RUNNING" else status)


def update_run_file(repo: str | Path = ".", **fields: Any) -> None:
    """Add fields to models/run.json (inside an open :func:`lineage_run`: to its record)."""
    path = (Path(repo) / RUN_FILE).resolve()
    if path in _PENDING:
        _PENDING[path].update(fields)
        return
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no lineage run recorded; run the train stage first")
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


def registered_model_name(configured: str | None, dataset: str, classes: list[str]) -> str:
    """The registry name of a model: the configured one, else one per task.

    Versions under one name compete for one champion alias, so only models of the same task
    may share a name: a HAM10000 model must not be judged against a synthetic-set champion.
    The derived name ``dermaflow-<dataset>-<n>cls-<hash>`` changes with the dataset and with
    the label set (a short hash of the sorted class names), and stays stable across retrains.

    Args:
        configured: ``tracking.registered_model``; used as is when set (e.g. by a preset).
        dataset: ``dataset.name``.
        classes: the model's class names.
    """
    if configured:
        return configured
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-") or "dataset"
    digest = hashlib.sha256("\n".join(sorted(classes)).encode()).hexdigest()[:6]
    return f"dermaflow-{slug}-{len(classes)}cls-{digest}"


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
        # The pickle names classes from ``tasks`` (the zoo, FusionNet): ship that package with
        # the model, so `mlflow.pytorch.load_model` works where dermaflow is not installed.
        code_paths=[str(Path(__file__).resolve().parent)],
        pip_requirements=_requirements("torch", "torchvision", "numpy"),
    )
    version = getattr(info, "registered_model_version", None)
    return info.model_uri, None if version is None else str(version)


def log_data_lineage(frames: Mapping[str, Any], source: str, version: str, name: str) -> None:
    """Attach the data a run trained on as MLflow datasets, shown on the run page.

    Args:
        frames: MLflow input context (``train``, ``validation``, ``test``, ``manifest``) ->
            the pandas table of that split (one row per image: id, path, label, lesion, ...).
        source: where the images live (the dataset root).
        version: the data version (manifest + split hash); each table's digest adds its own
            context, so the three splits of one version stay distinct datasets.
        name: the dataset's name (``dataset.name``).
    """
    import mlflow.data

    for context, frame in frames.items():
        dataset = mlflow.data.from_pandas(
            frame, source=source, name=f"{name}-{context}", digest=f"{version}-{context}"
        )
        mlflow.log_input(dataset, context=context)


def _requirements(*packages: str) -> list[str]:
    """``name==version`` pins of the installed packages (local build tags dropped)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def log_onnx_model(
    path: str | Path, registered_model: str, alias: str | None, input_example: Any = None
) -> str:
    """Log the ONNX file with mlflow.onnx, register a version and point ``alias`` at it.

    The graph's own metadata (classes, input size, normalisation, temperature, referral
    threshold) is copied into the MLflow model's metadata, with the name of the calibrated
    output, so the registry page says how to read its outputs; the signature is inferred from
    a real run of the graph on ``input_example`` (a float32 N x 3 x H x W batch).
    """
    import mlflow.onnx
    import onnx
    import onnxruntime as ort
    from mlflow.models import infer_signature

    proto = onnx.load(str(path))
    metadata = {p.key: p.value for p in proto.metadata_props}
    metadata["probabilities_output"] = "probabilities"
    signature = None
    if input_example is not None:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        outputs = dict(
            zip(
                [o.name for o in session.get_outputs()],
                session.run(None, {name: input_example}),
                strict=True,
            )
        )
        signature = infer_signature(input_example, outputs)
    info = mlflow.onnx.log_model(
        proto,
        name="onnx_model",
        registered_model_name=registered_model,
        signature=signature,
        input_example=input_example,
        metadata=metadata,
        pip_requirements=_requirements("onnxruntime-gpu", "numpy"),
    )
    version = str(info.registered_model_version)
    if alias:
        set_alias(registered_model, alias, version)
    return version


def set_alias(registered_model: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(registered_model, alias, str(version))


def alias_version(registered_model: str, alias: str) -> str | None:
    """The version an alias points at, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(registered_model, alias).version)
    except MlflowException:
        return None


def set_version_tags(registered_model: str, version: str, tags: Mapping[str, str]) -> None:
    """Tag one registered model version (its own facts, beside its run's)."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, str(version), key, str(value))


def describe_version(registered_model: str, version: str, description: str) -> None:
    """The text the registry page shows for a model version."""
    MlflowClient().update_model_version(registered_model, str(version), description=description)


def set_version_classes(registered_model: str, version: str, classes: Sequence[str]) -> None:
    """Record a version's classes, so the gate can refuse another task without loading it."""
    set_version_tags(registered_model, version, {CLASSES_TAG: json.dumps(list(classes))})


def version_classes(registered_model: str, version: str) -> list[str] | None:
    """The classes recorded on a model version (:func:`set_version_classes`), or None."""
    tags = MlflowClient().get_model_version(registered_model, str(version)).tags
    return json.loads(tags[CLASSES_TAG]) if CLASSES_TAG in tags else None


def record_gate(
    registered_model: str,
    version: str,
    tags: Mapping[str, str],
    metrics: Mapping[str, float],
    classes: Sequence[str],
    repo: str | Path = ".",
) -> None:
    """The promotion gate's verdict on the lineage run and on the candidate model version.

    The run gets the tags and metrics; the version gets the same facts as tags (a version has
    no metrics) plus its classes, so the registry alone says why it is, or is not, champion.
    """
    with resume_lineage_run(repo):
        set_tags(dict(tags))
        log_metrics(dict(metrics))
    numbers = {key: f"{value:.6g}" for key, value in metrics.items()}
    set_version_tags(registered_model, version, {**tags, **numbers})
    set_version_classes(registered_model, version, classes)


def environment_tags() -> dict[str, str]:
    """The machine a training ran on (psutil is also what MLflow's system metrics sample)."""
    import psutil
    import torch

    return {
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "cuda": str(torch.cuda.is_available()),
        "cpu_count": str(psutil.cpu_count()),
        "ram_gb": f"{psutil.virtual_memory().total / 2**30:.1f}",
    }


def log_evaluations(
    evaluations: Mapping[str, tuple[Any, str, Mapping[str, float]]],
    run_id: str | None = None,
    version: tuple[str, str] | None = None,
) -> str:
    """Log external evaluations of a model into its training run; returns what was done.

    Each set becomes an MLflow dataset input with context ``evaluation`` (its per-image table,
    digest from the table's content) and its metrics (already prefixed ``<set>/``) are linked
    to that dataset. With ``version`` (registered model, version) the balanced accuracy of each
    set also becomes a tag of that model version, so the registry page shows it.

    Args:
        evaluations: set name -> (per-image pandas table, source root, flat metrics).
        run_id: the run to log into when none is active (``dermaflow evaluate``); a run the
            store does not hold is skipped and said so, never created.
        version: optional (registered model name, version) to tag.
    """
    import mlflow.data
    from mlflow.exceptions import MlflowException

    def log_all(active_id: str) -> str:
        for name, (table, source, metrics) in evaluations.items():
            content = table.to_csv(index=False).encode()
            digest = hashlib.sha256(content).hexdigest()[:16]
            dataset = mlflow.data.from_pandas(
                table, source=source, name=f"external-{name}", digest=digest
            )
            mlflow.log_input(dataset, context="evaluation")
            mlflow.log_metrics(dict(metrics), dataset=dataset)
            if version is not None:
                key = f"{name}/balanced_accuracy"
                if key in metrics:
                    set_version_tags(*version, {f"evaluation.{key}": f"{metrics[key]:.4f}"})
        return f"logged {len(evaluations)} evaluation(s) to MLflow run {active_id}"

    active = mlflow.active_run()
    if active is not None:
        return log_all(active.info.run_id)
    if run_id is None:
        return "not logged to MLflow (no run to log into)"
    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        return f"not logged to MLflow (run {run_id} is not in {mlflow.get_tracking_uri()})"
    with mlflow.start_run(run_id=run_id):
        return log_all(run_id)


def run_tags(run_id: str) -> dict[str, str]:
    """The tags of one run (the train stage's data_version, git_commit, dataset, arch, ...)."""
    return dict(MlflowClient().get_run(run_id).data.tags)


def version_url(registered_model: str, version: str) -> str:
    """A model version's page in the MLflow UI (the registry page that shows its description)."""
    from urllib.parse import quote

    base = ui_url("0", "0").split("/#/", 1)[0]
    return f"{base}/#/models/{quote(registered_model, safe='')}/versions/{version}"


def log_ood_conformal(
    prefix: str, metrics: Mapping[str, Any], artifacts: Mapping[str, str | Path]
) -> None:
    """Log an OOD or conformal report into the active run: numbers flat, files as artifacts.

    Nested numbers become ``<prefix>_<key>_<subkey>`` (``ood_detection_auroc_mednode``,
    ``conformal_coverage_per_class_MEL``); strings and None are skipped; the report itself is
    logged as ``<prefix>/<prefix>.json``.
    """
    flat: dict[str, float] = {}

    def walk(name: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{name}_{key}", item)
        elif isinstance(value, bool | int | float) and value is not None:
            flat[re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", name)] = float(value)

    walk(prefix, metrics)
    log_metrics(flat)
    mlflow.log_dict(dict(metrics), f"{prefix}/{prefix}.json")
    log_artifacts(dict(artifacts))
