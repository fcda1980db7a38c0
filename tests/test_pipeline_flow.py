"""The Prefect pipeline flow and its promotion gate, on real DVC, MLflow and Prefect."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from tasks import tracking
from tasks.config import GateConfig
from tasks.gate import decide
from tests.helpers import TINY, make_project, run

GATE = GateConfig(
    metric="test_balanced_accuracy", min_gain=0.0, max_ece_increase=0.02, champion_alias="champion"
)


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.parametrize(
    ("candidate", "champion", "promote", "why"),
    [
        ({"test_balanced_accuracy": 0.7}, None, True, "first model"),
        (
            {"test_balanced_accuracy": 0.8, "test_ece_after": 0.05},
            {"test_balanced_accuracy": 0.7, "test_ece_after": 0.05},
            True,
            "ECE within bound",
        ),
        ({"test_balanced_accuracy": 0.6}, {"test_balanced_accuracy": 0.7}, False, "-0.1000"),
        (
            {"test_balanced_accuracy": 0.9, "test_ece_after": 0.20},
            {"test_balanced_accuracy": 0.7, "test_ece_after": 0.05},
            False,
            "ECE 0.2000",
        ),
        ({}, None, False, "no test_balanced_accuracy"),
    ],
)
def test_gate_rule(candidate, champion, promote, why):
    decision = decide(candidate, champion, GATE)
    assert decision.promote is promote and why in decision.reason


def _register(repo, bacc: float, ece: float) -> str:
    """A real lineage run with a registered (tiny) model version and its test metrics."""
    with tracking.lineage_run("gate", "gate-run", {}, repo):
        tracking.log_metrics({"test_balanced_accuracy": bacc, "test_ece_after": ece})
        example = torch.zeros(1, 4).numpy()
        _, version = tracking.log_pytorch_model(torch.nn.Linear(4, 2), example, "gate-model")
    tracking.update_run_file(repo, model_version=version, registered_model="gate-model")
    return version


def test_gate_promotes_a_better_model_and_refuses_a_worse_one(tmp_path, prefect_harness):
    from flows.pipeline import promotion_gate

    v1 = _register(tmp_path, 0.70, 0.05)
    first = promotion_gate.fn(str(tmp_path), GATE, "flow-1")
    assert first["promote"] and tracking.alias_version("gate-model", "champion") == v1
    v2 = _register(tmp_path, 0.80, 0.05)
    assert promotion_gate.fn(str(tmp_path), GATE, "flow-2")["promote"]
    assert tracking.alias_version("gate-model", "champion") == v2
    _register(tmp_path, 0.60, 0.04)
    worse = promotion_gate.fn(str(tmp_path), GATE, "flow-3")
    assert not worse["promote"] and "0.6000 vs 0.8000" in worse["reason"]
    assert tracking.alias_version("gate-model", "champion") == v2
    # The decision and the flow run id are on the candidate's MLflow run.
    from mlflow.tracking import MlflowClient

    tags = MlflowClient().get_run(worse["run_id"]).data.tags
    assert tags["promotion"] == "refused" and tags["prefect_flow_run_id"] == "flow-3"


@pytest.mark.slow
def test_pipeline_flow_runs_skips_reruns_and_gates(tmp_path, prefect_harness):
    from flows.pipeline import STAGES, pipeline

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
    assert [s["stage"] for s in first["stages"]] == list(STAGES)
    assert all(s["ran"] for s in first["stages"])
    assert first["gate"]["promote"] and "first model" in first["gate"]["reason"]

    # The flow left dvc.lock as `dvc repro` would: DVC finds nothing to do, and neither does
    # a second flow run; the model stays champion.
    assert "Running stage" not in run(["dvc", "repro"], project).stdout
    second = pipeline(repo=str(project))
    assert not any(s["ran"] for s in second["stages"])
    assert not second["gate"]["promote"] and "already champion" in second["gate"]["reason"]

    # An override re-runs exactly the stages that read it.
    third = pipeline(overrides=["explain.per_class=2"], repo=str(project))
    assert [s["stage"] for s in third["stages"] if s["ran"]] == ["explain"]
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
    # The last flow run's verdict on this run's model (already champion since the first).
    assert (
        data.tags["promotion"] == "refused" and "already champion" in data.tags["promotion_reason"]
    )
    assert data.tags["prefect_flow_run_id"]
    assert {"train", "calibrate", "explain", "data"} <= {
        a.path for a in client.list_artifacts(info["run_id"])
    }
    registration = json.loads((project / "models/onnx.json").read_text())
    onnx = client.get_model_version_by_alias("dermaflow-classifier-onnx", "champion")
    assert str(onnx.version) == registration["version"]
    assert (
        client.get_model_version_by_alias("dermaflow-classifier", "candidate").run_id
        == (info["run_id"])
    )

    # Batch prediction through the registry alias, over a folder with one corrupt file.
    images = project / "new"
    images.mkdir()
    for src in sorted((project / "data/raw/synthetic/ISIC_2019_Training_Input").glob("*.jpg"))[:3]:
        (images / src.name).write_bytes(src.read_bytes())
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    model = "models:/dermaflow-classifier-onnx@champion"
    run(["dermaflow", "predict", str(images), "--model", model, "-o", "pred.csv"], project)
    pred = pd.read_csv(project / "pred.csv")
    assert len(pred) == 4 and pred["error"].notna().sum() == 1
    assert "broken.jpg" in pred.loc[pred["error"].notna(), "image"].item()
    good = pred[pred["error"].isna()]
    probs = good[[c for c in good.columns if c.startswith("p_")]]
    assert ((probs.sum(axis=1) - 1).abs() < 1e-5).all()
