"""The promotion gate: the champion re-scored on the candidate's test split, a paired test.

The flow-level tests use the real pieces: a prepared 32 px cache, a sqlite MLflow store in
tmp, champions registered as the train stage registers them (bundle artifact, pickled model,
optionally a calibrator artifact), and the gate task called with ``.fn``. The candidate is
what the train and calibrate stages leave on disk (test logits, calibrator), written by hand
so that its predictions can be placed exactly against the champion's.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.metrics import balanced_accuracy_score

from tasks import paths, tracking
from tasks.calibrate import expected_calibration_error
from tasks.config import load_params
from tasks.gate import mcnemar_p_value, paired_bootstrap
from tasks.io import write_json
from tasks.metrics import save_predictions, softmax
from tasks.models import build_model, load_bundle, save_bundle
from tasks.prepare import PreparedSplit, open_split
from tasks.train import MEAN, STD
from tests.helpers import REPO, TINY, gate_config, prepare_tiny

GATE = gate_config()
MODEL = "gate-model"
CLASSES = ["MEL", "NV", "BCC"]  # the prepared cache's order (ISIC order)
BINS = 15  # calibrate.bins in params.yaml: the ECE the gate measures


# ------------------------------------------------------------------------- helpers (shared)


def prepared_project(root: Path) -> Path:
    """A project folder holding params.yaml and a prepared 32 px cache of 300 images."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    prepare_tiny(root / "data", [*TINY, "synth.count=300"])
    shutil.copy(root / "data" / "params.yaml", root / "params.yaml")
    return root


def open_test_split(repo: Path) -> PreparedSplit:
    return open_split(repo / paths.PREPARED, "test")


def tiny_cnn(classes: list[str], seed: int) -> torch.nn.Module:
    """An untrained 32 px CNN whose head is scaled up (no bias), so its predictions vary.

    A plain random init calls every image the same class; a champion with an opinion per
    image makes "scored on these images" a real check.
    """
    torch.manual_seed(seed)
    model = build_model("custom_cnn", len(classes)).eval()
    with torch.no_grad():
        model.classifier[-1].weight.mul_(20.0)
        model.classifier[-1].bias.zero_()
    return model


def register(
    repo: Path,
    model: torch.nn.Module,
    classes: list[str] = CLASSES,
    stored_bacc: float = 0.5,
    temperature: float | None = None,
) -> tuple[str, Path]:
    """A lineage run as train (and calibrate) leave it; returns the version and its bundle.

    ``stored_bacc`` is the test metric stored on the run (the gate must not trust it);
    ``temperature`` logs a ``calibrate/calibrator.json`` artifact.
    """
    n = len(list(repo.glob("registered/*")))
    bundle = repo / "registered" / str(n) / "model.pt"
    save_bundle(bundle, model, "custom_cnn", classes, 32, MEAN, STD)
    with tracking.lineage_run("gate", f"gate-run-{n}", {}, repo):
        tracking.log_metrics({"test_balanced_accuracy": stored_bacc, "test_ece_after": 0.0})
        tracking.log_artifacts({"bundle": bundle})
        if temperature is not None:
            calibrator = bundle.parent / "calibrator.json"
            write_json(calibrator, {"method": "temperature", "temperature": temperature})
            tracking.log_artifacts({"calibrate": calibrator})
        example = np.zeros((1, 3, 32, 32), dtype=np.float32)
        _, version = tracking.log_pytorch_model(model, example, MODEL)
    tracking.update_run_file(repo, model_version=version, registered_model=MODEL)
    return version, bundle


def write_candidate(repo: Path, logits: np.ndarray, temperature: float = 1.0) -> None:
    """The candidate's test predictions and calibrator, where train and calibrate write them."""
    split = open_test_split(repo)
    save_predictions(
        repo / paths.PREDICTIONS / "test.npz",
        logits,
        split.labels,
        split.rows["image_id"],
        split.classes,
    )
    write_json(
        repo / paths.CALIBRATION / "calibrator.json",
        {"method": "temperature", "temperature": temperature},
    )


def perfect_logits(labels: np.ndarray, k: int = len(CLASSES)) -> np.ndarray:
    return 5.0 * np.eye(k, dtype=np.float32)[labels]


def run_bundle(bundle: Path, split: PreparedSplit) -> np.ndarray:
    """The bundle's logits on the split, computed here in one plain forward pass."""
    model, _ = load_bundle(bundle)
    x = torch.from_numpy(np.array(split.images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x).numpy()


def gate_now(repo: Path, flow_run_id: str = "flow-1") -> dict:
    from flows.pipeline import promotion_gate

    return promotion_gate.fn(str(repo), GATE, flow_run_id)


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepared_project(tmp_path_factory.mktemp("gate-data"))


@pytest.fixture
def repo(tmp_path, prepared) -> Path:
    """A fresh project (own MLflow store) on the shared prepared data."""
    shutil.copytree(prepared, tmp_path / "repo")
    return tmp_path / "repo"


# ------------------------------------------------------------------------- pure functions


def _arrays(n: int = 90, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Labels of 3 balanced classes and a champion right on about half of them."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n // 3)
    champion = np.where(rng.random(n) < 0.5, labels, (labels + 1) % 3)
    return labels, champion


def _improved(labels: np.ndarray, champion: np.ndarray, fixes: int) -> np.ndarray:
    """The champion's predictions with its first ``fixes`` mistakes corrected."""
    out = champion.copy()
    wrong = np.flatnonzero(out != labels)[:fixes]
    out[wrong] = labels[wrong]
    return out


def test_bootstrap_is_deterministic_for_a_seed():
    labels, champion = _arrays()
    candidate = _improved(labels, champion, 5)
    first = paired_bootstrap(labels, candidate, champion, 0.0, 0.95, 100, seed=7)
    assert first == paired_bootstrap(labels, candidate, champion, 0.0, 0.95, 100, seed=7)
    other = paired_bootstrap(labels, candidate, champion, 0.0, 0.95, 100, seed=8)
    assert other.gain == first.gain and (other.ci_low, other.ci_high) != (
        first.ci_low,
        first.ci_high,
    )
    assert first.ci_low <= first.gain <= first.ci_high


def test_bootstrap_p_value_falls_as_the_gain_grows():
    labels, champion = _arrays()
    runs = [
        paired_bootstrap(labels, _improved(labels, champion, k), champion, 0.0, 0.95, 200, 0)
        for k in (0, 1, 4, 16)
    ]
    gains = [r.gain for r in runs]
    p_values = [r.p_value for r in runs]
    assert gains == sorted(gains) and gains[0] == 0.0
    assert p_values == sorted(p_values, reverse=True)
    assert p_values[0] == 1.0  # identical predictions: no evidence at all
    assert p_values[1] > 0.05  # one more image right: luck
    assert p_values[-1] < 0.01  # sixteen: a real gain
    # A required margin makes the same gain harder to accept.
    margin = paired_bootstrap(labels, _improved(labels, champion, 16), champion, 0.1, 0.95, 200, 0)
    assert margin.p_value > p_values[-1]


def test_mcnemar_counts_only_the_discordant_images():
    labels, champion = _arrays()
    assert mcnemar_p_value(labels, champion, champion) == 1.0
    ten_wins = _improved(labels, champion, 10)
    assert mcnemar_p_value(labels, ten_wins, champion) == pytest.approx(0.5**10)
    p = [mcnemar_p_value(labels, _improved(labels, champion, k), champion) for k in (1, 3, 6)]
    assert p == sorted(p, reverse=True)
    # Ten wins and ten losses elsewhere: no evidence either way.
    losses = np.flatnonzero(ten_wins == labels)[-10:]
    mixed = ten_wins.copy()
    mixed[losses] = (labels[losses] + 1) % 3
    assert mcnemar_p_value(labels, mixed, champion) > 0.5


def test_registered_model_name_follows_dataset_and_label_set():
    name = tracking.registered_model_name(None, "HAM10000", ["MEL", "NV", "BCC"])
    digest = hashlib.sha256(b"BCC\nMEL\nNV").hexdigest()[:6]
    assert name == f"dermaflow-ham10000-3cls-{digest}"
    assert name == tracking.registered_model_name("", "HAM10000", ["NV", "BCC", "MEL"])
    assert name != tracking.registered_model_name(None, "synthetic", ["MEL", "NV", "BCC"])
    assert name != tracking.registered_model_name(None, "HAM10000", ["MEL", "NV"])
    assert tracking.registered_model_name("my-model", "HAM10000", ["MEL"]) == "my-model"
    assert load_params(REPO / "params.yaml").tracking.registered_model is None


# ------------------------------------------------------------------------- the gate task


@pytest.mark.parametrize("tagged", [True, False], ids=["classes-tag", "bundle-only"])
def test_a_champion_of_another_label_set_is_refused(repo, monkeypatch, tagged):
    other = ["MEL", "NV"]
    champion, _ = register(repo, tiny_cnn(other, seed=1), classes=other)
    tracking.set_alias(MODEL, "champion", champion)
    if tagged:
        # As the gate records on every version it judges; then no weights need loading.
        tracking.set_version_classes(MODEL, champion, other)

        def no_weights(*_a, **_k):
            raise AssertionError("the classes tag should settle it without loading weights")

        monkeypatch.setattr("tasks.models.load_bundle", no_weights)
    candidate, _ = register(repo, tiny_cnn(CLASSES, seed=2))
    write_candidate(repo, perfect_logits(open_test_split(repo).labels))

    result = gate_now(repo)

    assert not result["promote"]
    assert "['MEL', 'NV']" in result["reason"] and "['MEL', 'NV', 'BCC']" in result["reason"]
    assert tracking.alias_version(MODEL, "champion") == champion
    assert result["champion_balanced_accuracy"] is None and result["p_value"] is None
    tags = MlflowClient().get_model_version(MODEL, candidate).tags
    assert tags["promotion"] == "refused" and tags["classes"] == '["MEL", "NV", "BCC"]'


def test_the_champion_is_rescored_on_the_new_split_and_a_real_win_promotes(repo):
    # The champion's run claims 0.99: a number from some other test split, never to be used.
    champion, bundle = register(repo, tiny_cnn(CLASSES, seed=0), stored_bacc=0.99, temperature=2)
    tracking.set_alias(MODEL, "champion", champion)
    candidate, _ = register(repo, tiny_cnn(CLASSES, seed=2))
    split = open_test_split(repo)
    write_candidate(repo, perfect_logits(split.labels))

    result = gate_now(repo, "flow-7")

    logits = run_bundle(bundle, split)  # the champion on today's test images, own temperature
    assert len(set(logits.argmax(axis=1))) > 1  # it tells images apart
    expected_bacc = balanced_accuracy_score(split.labels, logits.argmax(axis=1))
    expected_ece = expected_calibration_error(softmax(logits / 2.0), split.labels, BINS)
    assert result["champion_balanced_accuracy"] == pytest.approx(expected_bacc, abs=1e-9)
    assert result["champion_balanced_accuracy"] != pytest.approx(0.99)
    assert result["champion_ece"] == pytest.approx(expected_ece, abs=1e-5)
    assert result["candidate_balanced_accuracy"] == 1.0
    assert result["gain"] == pytest.approx(1.0 - expected_bacc)
    test_file = (repo / paths.SPLITS / "test.parquet").read_bytes()
    assert result["test_set_version"] == hashlib.sha256(test_file).hexdigest()[:12]
    assert result["n_images"] == len(split.labels) >= 40

    assert result["promote"] and result["p_value"] < 0.05
    assert tracking.alias_version(MODEL, "champion") == candidate

    # Recorded on the lineage run and on the candidate's model version.
    client = MlflowClient()
    run = client.get_run(result["run_id"]).data
    assert run.tags["promotion"] == "promoted" and run.tags["prefect_flow_run_id"] == "flow-7"
    assert run.tags["gate_test_set_version"] == result["test_set_version"]
    assert run.metrics["gate_champion_balanced_accuracy"] == pytest.approx(expected_bacc)
    assert run.metrics["gate_p_value"] == pytest.approx(result["p_value"])
    assert run.metrics["gate_n_images"] == result["n_images"]
    tags = client.get_model_version(MODEL, candidate).tags
    assert tags["promotion"] == "promoted" and tags["gate_champion_version"] == champion
    assert float(tags["gate_champion_ece"]) == pytest.approx(expected_ece, rel=1e-4)
    assert float(tags["gate_candidate_balanced_accuracy"]) == 1.0

    from flows.pipeline import report_markdown

    text = report_markdown([{"stage": "train", "ran": True}], result, GATE)
    assert f"{expected_bacc:.4f}" in text and result["test_set_version"] in text
    assert f"p = {result['p_value']:.3g}" in text and "**promoted**" in text


def test_a_win_by_noise_is_refused_with_its_p_value(repo):
    champion, bundle = register(repo, tiny_cnn(CLASSES, seed=0))
    tracking.set_alias(MODEL, "champion", champion)
    register(repo, tiny_cnn(CLASSES, seed=2))
    split = open_test_split(repo)
    logits = run_bundle(bundle, split)
    # The champion's own logits, with one of its mistakes put right: a gain, but luck.
    wrong = np.flatnonzero(logits.argmax(axis=1) != split.labels)[0]
    logits[wrong] = perfect_logits(split.labels[wrong : wrong + 1])[0]
    write_candidate(repo, logits)

    result = gate_now(repo)

    assert not result["promote"] and result["gain"] > 0
    assert result["p_value"] >= 0.05 and f"p = {result['p_value']:.3g}" in result["reason"]
    assert "not significant" in result["reason"]
    assert tracking.alias_version(MODEL, "champion") == champion
