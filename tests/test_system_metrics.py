"""A training's lineage run carries MLflow system metrics (CPU, RAM), read back by the client."""

from __future__ import annotations

import dataclasses
import time

from mlflow.tracking import MlflowClient

from tasks import tracking
from tasks.train import train
from tests.helpers import prepare_tiny


def test_training_lineage_run_logs_system_metrics(tmp_path, monkeypatch):
    """A real one-epoch training inside :func:`tracking.lineage_run` gets sampled curves."""
    p = prepare_tiny(tmp_path)
    monkeypatch.chdir(tmp_path)
    # MLflow's own variable; 0.5 s makes even this few-second run yield several samples.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    cfg = dataclasses.replace(p.train, epochs=1)
    with tracking.lineage_run("sysmetrics", "tiny", {"arch": "custom_cnn"}, repo=tmp_path) as run:
        result = train(p.model, cfg, tmp_path / "prepared", tmp_path / "ck.pt", show_progress=False)
        tracking.log_metrics({"test_balanced_accuracy": result.test["balanced_accuracy"]})
        tracking.set_tags(tracking.environment_tags())
        # A sample is published only after a full interval while the run is RUNNING: keep the
        # run open past three intervals even where the training itself is quicker.
        time.sleep(1.5)
    client = MlflowClient(tracking_uri=tracking.local_store_uri(tmp_path))
    data = client.get_run(run.info.run_id).data
    assert "system/cpu_utilization_percentage" in data.metrics
    assert "system/system_memory_usage_megabytes" in data.metrics
    history = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert history and all(0.0 <= m.value <= 100.0 * 64 for m in history)
    assert data.metrics["system/system_memory_usage_megabytes"] > 0
    assert int(data.tags["cpu_count"]) >= 1 and float(data.tags["ram_gb"]) > 0
