"""The data stages under real DVC in a tmp git repo: run, skip unchanged, re-run selectively."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import TINY, make_project, run

DATA_STAGES = ["synth", "ingest", "validate", "split", "prepare"]


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.mark.slow
def test_dvc_repro_runs_skips_and_reruns_only_what_changed(tmp_path):
    project = make_project(tmp_path / "proj", TINY)
    first = run(["dvc", "repro", "prepare"], project)
    assert ran(first.stdout) == DATA_STAGES
    split = json.loads((project / "metrics/split.json").read_text())
    assert split["leakage"] == {"shared_lesions": 0, "shared_hashes": 0}
    assert sum(split["images"].values()) == 150
    prepared = json.loads((project / "data/prepared/meta.json").read_text())
    assert prepared["classes"] == ["MEL", "NV", "BCC"] and prepared["size"] == 32
    assert (project / "data/reports/contact_sheet.png").stat().st_size > 10_000

    second = run(["dvc", "repro", "prepare"], project)
    assert ran(second.stdout) == []
    status = run(["dvc", "status", "prepare"], project)
    assert "up to date" in status.stdout

    text = (project / "params.yaml").read_text().replace("seed: 42", "seed: 43")
    (project / "params.yaml").write_text(text)
    third = run(["dvc", "repro", "prepare"], project)
    assert ran(third.stdout) == ["split", "prepare"]
    reseeded = json.loads((project / "metrics/split.json").read_text())
    assert reseeded["seed"] == 43 and reseeded["leakage"]["shared_lesions"] == 0


@pytest.mark.slow
def test_full_pipeline_appends_to_one_lineage_run(tmp_path):
    """dvc repro end to end: calibrate, export and explain append to train's MLflow run."""
    overrides = TINY + [
        "explain.methods=[gradcam, ig]",
        "explain.layers=[deep]",
        "explain.per_class=1",
        "explain.misclassified_cap=1",
        "explain.bootstrap=50",
        "export.bench_repeats=2",
    ]
    project = make_project(tmp_path / "proj", overrides)
    out = run(["dvc", "repro"], project)
    assert ran(out.stdout) == [*DATA_STAGES, "train", "calibrate", "export", "explain"]
    assert ran(run(["dvc", "repro"], project).stdout) == []

    from mlflow.tracking import MlflowClient

    info = json.loads((project / "models/run.json").read_text())
    client = MlflowClient(info["tracking_uri"], registry_uri=info["tracking_uri"])
    metrics = client.get_run(info["run_id"]).data.metrics
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
        assert key in metrics, key
    assert metrics["parity_max_abs_diff"] <= 1e-4
    artifacts = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"train", "calibrate", "explain", "data"} <= artifacts
    onnx_version = client.get_model_version_by_alias("dermaflow-classifier-onnx", "candidate")
    registration = json.loads((project / "models/onnx.json").read_text())
    assert str(onnx_version.version) == registration["version"]
    torch_version = client.get_model_version_by_alias("dermaflow-classifier", "candidate")
    assert torch_version.run_id == info["run_id"]

    # Batch prediction through the registry alias, over a folder with one corrupt file.
    images = project / "new"
    images.mkdir()
    for src in sorted((project / "data/raw/synthetic/ISIC_2019_Training_Input").glob("*.jpg"))[:3]:
        (images / src.name).write_bytes(src.read_bytes())
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    model = "models:/dermaflow-classifier-onnx@candidate"
    run(["dermaflow", "predict", str(images), "--model", model, "-o", "pred.csv"], project)
    import pandas as pd

    pred = pd.read_csv(project / "pred.csv")
    assert len(pred) == 4 and pred["error"].notna().sum() == 1
    assert "broken.jpg" in pred.loc[pred["error"].notna(), "image"].item()
    good = pred[pred["error"].isna()]
    probs = good[[c for c in good.columns if c.startswith("p_")]]
    assert ((probs.sum(axis=1) - 1).abs() < 1e-5).all()
    assert set(good["predicted"]) <= {"MEL", "NV", "BCC"}
