"""The Prefect pipeline flow and its promotion gate, on real DVC, MLflow and Prefect."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from tasks import tracking
from tasks.gate import Score, Significance, decide
from tests.helpers import REPO, TINY, make_project, run
from tests.test_gate import (
    CLASSES,
    GATE,
    MODEL,
    open_test_split,
    prepared_project,
    register,
    run_bundle,
    tiny_cnn,
    write_candidate,
)

DVC_YAML = (REPO / "dvc.yaml").read_text()


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def gate_data(tmp_path_factory):
    return prepared_project(tmp_path_factory.mktemp("gate-data"))


def _score(balanced_accuracy: float, ece: float) -> Score:
    return Score(balanced_accuracy, ece, np.zeros(1, dtype=np.int64))


def _significance(gain: float, p_value: float) -> Significance:
    return Significance(gain, gain - 0.05, gain + 0.05, p_value, 0.95, 1000)


@pytest.mark.parametrize(
    ("candidate", "champion", "significance", "promote", "why"),
    [
        (_score(0.7, 0.05), None, None, True, "first model"),
        (_score(0.8, 0.05), _score(0.7, 0.06), _significance(0.1, 0.001), True, "within bound"),
        (_score(0.72, 0.05), _score(0.7, 0.05), _significance(0.02, 0.2), False, "p = 0.2"),
        (_score(0.72, 0.05), _score(0.7, 0.05), _significance(0.02, 0.05), False, "p >= 0.05"),
        (_score(0.6, 0.05), _score(0.7, 0.05), _significance(-0.1, 1.0), False, "-0.1000"),
        (_score(0.9, 0.20), _score(0.7, 0.05), _significance(0.2, 0.001), False, "ECE 0.2000"),
    ],
)
def test_gate_rule(candidate, champion, significance, promote, why):
    decision = decide(candidate, champion, significance, GATE)
    assert decision.promote is promote and why in decision.reason


def test_gate_promotes_a_better_model_and_refuses_a_worse_one(tmp_path, gate_data):
    """Each candidate's test logits are its own model's, as the train stage writes them."""
    from flows.pipeline import promotion_gate

    repo = shutil.copytree(gate_data, tmp_path / "repo")
    split = open_test_split(repo)

    def candidate(seed: int) -> str:
        version, bundle = register(repo, tiny_cnn(CLASSES, seed))
        write_candidate(repo, run_bundle(bundle, split))
        return version

    v1 = candidate(2)  # one class for every image
    first = promotion_gate.fn(str(repo), GATE, "flow-1")
    assert first["promote"] and "first model" in first["reason"]
    assert tracking.alias_version(MODEL, "champion") == v1
    v2 = candidate(0)  # tells the classes apart better
    better = promotion_gate.fn(str(repo), GATE, "flow-2")
    assert better["promote"] and better["champion_version"] == v1 and better["p_value"] < 0.05
    assert tracking.alias_version(MODEL, "champion") == v2
    candidate(1)
    worse = promotion_gate.fn(str(repo), GATE, "flow-3")
    assert not worse["promote"] and worse["gain"] < 0 and "not significant" in worse["reason"]
    assert tracking.alias_version(MODEL, "champion") == v2
    # The decision and the flow run id are on the candidate's MLflow run.
    from mlflow.tracking import MlflowClient

    tags = MlflowClient().get_run(worse["run_id"]).data.tags
    assert tags["promotion"] == "refused" and tags["prefect_flow_run_id"] == "flow-3"

    tracking.update_run_file(repo, model_version=v2)
    write_candidate(repo, run_bundle(repo / "registered/1/model.pt", split))
    again = promotion_gate.fn(str(repo), GATE, "flow-4")
    assert not again["promote"] and "already champion" in again["reason"]


@pytest.mark.slow
def test_pipeline_flow_runs_skips_reruns_and_gates(tmp_path, prefect_harness, capfd):
    from flows.pipeline import PROGRESS_KEY, pipeline

    overrides = TINY + [
        "explain.methods=[gradcam, ig]",
        "explain.layers=[deep]",
        "explain.per_class=1",
        "explain.misclassified_cap=1",
        "explain.bootstrap=50",
        "export.bench_repeats=2",
    ]
    project = make_project(tmp_path / "proj", overrides)
    first = pipeline(repo=str(project))
    # A clean run says nothing alarming: no ERROR line, no traceback (stages, DVC, Prefect).
    said = capfd.readouterr()
    for text in (said.out, said.err):
        assert "ERROR" not in text and "Traceback" not in text, text[-3000:]
    # The flow run's progress artifact reached 100 % (one step per stage).
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[PROGRESS_KEY]))
        )
    assert found and found[0].type == "progress" and float(found[0].data) == 100.0
    # The summary artifact carries the trust checks, with this run's numbers.
    with get_client(sync_client=True) as prefect:
        (summary,) = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dermaflow-pipeline"])),
            limit=1,
        )
    ood = json.loads((project / "metrics" / "ood.json").read_text())
    conformal = json.loads((project / "metrics" / "conformal.json").read_text())
    for heading in ("## Subgroups", "## Out-of-distribution guard", "## Conformal sets"):
        assert heading in summary.data
    assert f"test pass rate {ood['test_pass_rate']:.1%}" in summary.data
    assert f"mean set size {conformal['mean_set_size']:.2f}" in summary.data
    # The flow runs what dvc.yaml defines, in the order of its deps.
    assert [s["stage"] for s in first["stages"]] == list(yaml.safe_load(DVC_YAML)["stages"])
    assert all(s["ran"] for s in first["stages"])
    assert first["gate"]["promote"] and "first model" in first["gate"]["reason"]
    # The run is a DVC experiment holding every stage's lock entry and metrics (every stage ran,
    # so `dvc exp save` got dvc.yaml for them all).
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], project).stdout
    (ref,) = [r for r in refs.split() if r.endswith(f"/{first['experiment']}")]
    saved = yaml.safe_load(run(["git", "show", f"{ref}:dvc.lock"], project).stdout)
    assert saved["stages"] == yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert list(saved["stages"]) == list(yaml.safe_load(DVC_YAML)["stages"])
    for metrics in ("metrics/train.json", "metrics/explain.json"):
        shown = run(["git", "show", f"{ref}:{metrics}"], project).stdout
        assert json.loads(shown) == json.loads((project / metrics).read_text()), metrics
    # The default's metadata prior: its image-only number beside the fused one, and the
    # explanations of the cases with age, sex or site say what it changed.
    trained = json.loads((project / "metrics/train.json").read_text())
    assert 0 <= trained["image_only"]["test_balanced_accuracy"] <= 1
    texts = pd.read_parquet(project / "reports/explain/explanations.parquet")["text"]
    assert texts.str.contains("(metadata prior)", regex=False).any()

    # The flow left dvc.lock as `dvc repro` would: DVC finds nothing to do, and neither does
    # a second flow run; the model stays champion.
    assert "Running stage" not in run(["dvc", "repro"], project).stdout
    second = pipeline(repo=str(project))
    assert not any(s["ran"] for s in second["stages"])
    assert not second["gate"]["promote"] and "already champion" in second["gate"]["reason"]

    # An override re-runs exactly the stages that read it, and those downstream of their outs
    # (the card reports the explanations).
    third = pipeline(overrides=["explain.per_class=2"], repo=str(project))
    assert [s["stage"] for s in third["stages"] if s["ran"]] == ["explain", "card"]
    assert "per_class: 2\n" in (project / "params.yaml").read_text()

    # One lineage run holds train, calibrate, export and explain.
    from mlflow.tracking import MlflowClient

    info = json.loads((project / "models/run.json").read_text())
    client = MlflowClient(info["tracking_uri"], registry_uri=info["tracking_uri"])
    data = client.get_run(info["run_id"]).data
    for key in (
        "test_balanced_accuracy",
        "test_ece_before",
        "test_ece_after",
        "temperature",
        "referral_threshold",
        "parity_max_abs_diff",
        "latency_ms_ort_b1",
        "xai_gradcam_deep_pointing_game",
    ):
        assert key in data.metrics, key
    assert data.metrics["parity_max_abs_diff"] <= 1e-4
    # The dynamo exporter's graph: its opset and size, as metrics/export.json says.
    exported = json.loads((project / "metrics/export.json").read_text())
    assert data.metrics["onnx_opset"] == exported["onnx_opset"] == 18
    assert exported["onnx_bytes"] == (project / "models/model.onnx").stat().st_size
    assert exported["onnx_nodes"] > 5
    # The training sampled the machine (MLflow system metrics; a 2 s interval).
    assert "system/cpu_utilization_percentage" in data.metrics
    # The last flow run's verdict on this run's model (already champion since the first).
    assert (
        data.tags["promotion"] == "refused" and "already champion" in data.tags["promotion_reason"]
    )
    assert data.tags["prefect_flow_run_id"]
    # The precision that trained (bf16 on a CPU with bf16 instructions), in the tag and metrics.
    import torch

    from tasks.train import precision_name

    trained = json.loads((project / "metrics/train.json").read_text())["precision"]
    assert data.tags["precision"] == trained == precision_name(torch.device("cpu"), "bf16")
    assert {"train", "calibrate", "explain", "data"} <= {
        a.path for a in client.list_artifacts(info["run_id"])
    }
    # GX's Data Docs and validation result, logged next to validation.md.
    docs = {a.path for a in client.list_artifacts(info["run_id"], "data/data_docs")}
    assert {"data/data_docs/index.html", "data/data_docs/validation_result.json"} <= docs
    assert (project / "data/reports/data_docs/index.html").is_file()
    # One registered name per task: dataset + label set (tracking.registered_model: null).
    name = info["registered_model"]
    assert name.startswith("dermaflow-synthetic-3cls-")
    registration = json.loads((project / "models/onnx.json").read_text())
    assert registration["registered_model"] == f"{name}-onnx"
    onnx = client.get_model_version_by_alias(f"{name}-onnx", "champion")
    assert str(onnx.version) == registration["version"]
    import mlflow.models

    onnx_info = mlflow.models.get_model_info(f"models:/{name}-onnx/{onnx.version}")
    assert onnx_info.signature is not None and onnx_info.saved_input_example_info is not None
    assert {"logits", "probabilities"} <= set(onnx_info.signature.outputs.input_names())
    assert json.loads(onnx_info.metadata["classes"]) == ["MEL", "NV", "BCC"]
    assert onnx_info.metadata["probabilities_output"] == "probabilities"
    assert client.get_model_version_by_alias(name, "candidate").run_id == info["run_id"]

    # Batch prediction through the registry alias, over a folder with one corrupt file.
    images = project / "new"
    images.mkdir()
    for src in sorted((project / "data/raw/synthetic/ISIC_2019_Training_Input").glob("*.jpg"))[:3]:
        (images / src.name).write_bytes(src.read_bytes())
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    model = f"models:/{name}-onnx@champion"
    run(["dermaflow", "predict", str(images), "--model", model, "-o", "pred.csv"], project)
    pred = pd.read_csv(project / "pred.csv")
    assert len(pred) == 4 and pred["error"].notna().sum() == 1
    assert "broken.jpg" in pred.loc[pred["error"].notna(), "image"].item()
    good = pred[pred["error"].isna()]
    probs = good[[c for c in good.columns if c.startswith("p_")]]
    assert ((probs.sum(axis=1) - 1).abs() < 1e-5).all()


def test_bad_data_stops_the_flow_at_once_with_the_stage_message(tmp_path, prefect_harness, capfd):
    """A stage that rejects its data (exit 2) is not retried, and no engine traceback follows."""
    import logging.handlers

    from flows.pipeline import pipeline
    from flows.stages import StageFailed

    project = make_project(tmp_path / "proj", TINY + ["validate.min_images=100000"])
    # What reaches the flow-run logger's handlers (after its filters), wherever they print.
    seen = logging.handlers.BufferingHandler(capacity=100_000)
    logging.getLogger("prefect.flow_runs").addHandler(seen)
    try:
        with pytest.raises(StageFailed) as failed:
            pipeline(repo=str(project))
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(seen)
    assert failed.value.stage == "validate" and failed.value.bad_input
    said = capfd.readouterr()
    text = said.out + said.err
    # The rule is named once: the stage ran once (orchestration.retries is 1 for crashes).
    assert text.count("at least 100000 are needed") == 1, text[-3000:]
    # The flow engine still logs the failure, as one line: no traceback attached to it.
    logged = [r for r in seen.buffer if "Encountered exception" in r.getMessage()]
    assert logged and all(r.exc_info is None and not r.exc_text for r in logged)
    assert "StageFailed" in logged[0].getMessage()
    assert "Traceback" not in text, text[-3000:]


def test_run_link_points_at_the_tracking_server(monkeypatch):
    """The Prefect artifact links to the team's MLflow server when there is one."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.lab.example:8443/")
    assert tracking.ui_url("3", "abc") == "https://mlflow.lab.example:8443/#/experiments/3/runs/abc"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlruns/mlflow.db")
    assert tracking.ui_url("3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
