"""The model card: every section from realistic metrics files, "not run" where one is missing.

The card stage runs for real in a scratch project folder: real metrics files as the stages
write them (the evaluate, subgroups, ood and conformal files with realistic values), real test
predictions, a real sqlite MLflow store in tmp holding the lineage run and two registered
versions (PyTorch and ONNX), whose descriptions the stage sets.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import balanced_accuracy_score

from tasks import card, paths, tracking
from tasks.config import load_params
from tasks.io import write_json
from tasks.metrics import classification_metrics, save_predictions
from tasks.stage import EXIT_BAD_INPUT, run_entry
from tests.helpers import REPO, write_params

CLASSES = ["MEL", "NV", "BCC"]
MODEL = "card-model"
DATA_VERSION = "4e4ab5694acc"

EVALUATE = {
    "sets": {
        "ham-holdout": {
            "n": 412, "classes": CLASSES, "shared_classes": CLASSES,
            "balanced_accuracy": 0.583, "balanced_accuracy_ci": [0.541, 0.627],
            "per_class_recall": {"MEL": 0.52, "NV": 0.81, "BCC": 0.42}, "auroc": 0.801,
            "ece_before": 0.143, "ece_after": 0.097, "referred_share": 0.38,
            "melanoma": {"sensitivity": 0.71, "specificity": 0.83}, "note": "",
            "conformal": {"method": "aps", "target_coverage": 0.9, "coverage": 0.833,
                          "mean_set_size": 2.21},
        },
        "mednode": {
            "n": 170, "classes": ["MEL", "NV"], "shared_classes": ["MEL", "NV"],
            "balanced_accuracy": 0.744, "balanced_accuracy_ci": [0.676, 0.805],
            "per_class_recall": {"MEL": 0.657, "NV": 0.83}, "auroc": 0.79,
            "ece_before": 0.21, "ece_after": 0.18, "referred_share": 0.44,
            "melanoma": {"sensitivity": 0.657, "specificity": 0.83},
            "note": "probabilities restricted to the 2 shared classes",
        },
    }
}  # fmt: skip
SUBGROUPS = {
    "splits": {
        "test": {
            "groups": {
                "sex": {
                    "female": {"n": 110, "balanced_accuracy": 0.742, "ci": [0.66, 0.81]},
                    "male": {"n": 115, "balanced_accuracy": 0.731, "ci": [0.65, 0.80]},
                },
                "skin_tone": {
                    "light": {"n": 160, "balanced_accuracy": 0.761, "ci": [0.69, 0.82]},
                    "brown": {"n": 41, "balanced_accuracy": 0.604, "ci": [0.47, 0.73],
                              "rest": {"balanced_accuracy": 0.761}},
                    "unknown": {"n": 18, "balanced_accuracy": 0.41, "ci": [0.2, 0.6]},
                    "dark": {"n": 6, "balanced_accuracy": 0.333, "ci": [0.0, 0.83]},
                },
            },
            "largest_gap": {"balanced_accuracy": {"attribute": "skin_tone", "gap": 0.428}},
            "flags": ["skin_tone=brown (n=41): balanced accuracy 0.604, 0.157 below the rest"],
        }
    },
    "train_skin_tone": {"very_light": 560, "light": 340, "intermediate": 97, "tan": 38,
                        "brown": 15, "dark": 0, "unknown": 0},
}  # fmt: skip
OOD = {
    "method": "energy",
    "threshold": -4.2173,
    "target_pass_rate": 0.95,
    "test_pass_rate": 0.862,
    "detection_auroc": {"mednode": 0.913, "not_skin": 0.998, "real_photos": 0.724},
}
CONFORMAL = {
    "method": "aps",
    "target_coverage": 0.9,
    "coverage": 0.904,
    "coverage_per_class": {"MEL": 0.93, "NV": 0.95, "BCC": 0.81},
    "mean_set_size": 1.74,
    "qhat": 0.8731,
}
CALIBRATE = {
    "test_ece_before": 0.118, "test_ece_after": 0.071, "test_nll_before": 0.81,
    "test_nll_after": 0.74, "temperature": 1.63, "referral_threshold": 0.742,
    "referral_reachable": 1.0, "referral_coverage": 0.41, "referral_accuracy": 0.951,
    "referral_referred_fraction": 0.59,
}  # fmt: skip
EXPLAIN = {
    "images": 24,
    "ranking": [
        {"method": "ig", "layer": None, "rank": 1, "pointing_game_mean": 0.583,
         "deletion_auc_mean": 0.412, "insertion_auc_mean": 0.701},
        {"method": "gradcam", "layer": "deep", "rank": 2, "pointing_game_mean": 0.417,
         "deletion_auc_mean": 0.455, "insertion_auc_mean": 0.652},
    ],
    "inside_share_by_class": {"MEL": 0.62, "NV": 0.71, "BCC": 0.31},
    "outside_flag_rate": 0.375,
    "sanity": {"ssim_final": 0.21},
}  # fmt: skip


def test_predictions(n: int = 225, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits that are right about 75 % of the time, labels with the synthetic set's imbalance."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=[0.3, 0.5, 0.2])
    logits = rng.normal(0, 1, (n, 3)).astype(np.float32)
    right = rng.random(n) < 0.75
    logits[np.arange(n), labels] += np.where(right, 3.0, 0.0)
    return logits, labels


test_predictions.__test__ = False  # a helper, not a test


def write_project(root: Path, optional: bool = True) -> None:
    """The files the card reads, as the stages write them (optional: the four new stages')."""
    logits, labels = test_predictions()
    ids = [f"i{i}" for i in range(len(labels))]
    save_predictions(root / paths.PREDICTIONS / "test.npz", logits, labels, ids, CLASSES)
    run = {"run_id": "r1", "experiment_id": "0", "registered_model": MODEL, "model_version": "1"}
    write_json(root / paths.MODELS / "run.json", run)  # replaced by register_lineage's
    scores = classification_metrics(logits, labels, CLASSES)
    per_class = scores.pop("per_class")
    write_json(
        root / paths.METRICS / "train.json",
        {"test": scores, "test_per_class": per_class, "best_epoch": 7, "device": "cpu",
         "precision": "bf16 autocast", "seconds": 81.4,
         "class_weights": {"MEL": 1.08, "NV": 0.83, "BCC": 1.31}},
    )  # fmt: skip
    write_json(
        root / paths.METRICS / "ingest.json",
        {"images": 1500, "lesions": 862, "with_mask": 1500, "layout": "isic2019",
         "per_class": {"NV": 762, "MEL": 268, "BCC": 470}},
    )  # fmt: skip
    write_json(
        root / paths.METRICS / "split.json",
        {"seed": 42, "images": {"train": 1050, "val": 225, "test": 225},
         "per_class": {"NV": {"train": 533, "val": 115, "test": 114},
                       "MEL": {"train": 188, "val": 40, "test": 40},
                       "BCC": {"train": 329, "val": 70, "test": 71}},
         "leakage": {"shared_lesions": 0, "shared_hashes": 0}},
    )  # fmt: skip
    write_json(root / paths.VALIDATION_JSON, {"passed": True, "errors": [], "warnings": ["w"]})
    write_json(root / paths.METRICS / "calibrate.json", CALIBRATE)
    export = {"parity_max_abs_diff": 8.9e-8, "provider": "CPUExecutionProvider"}
    write_json(root / paths.METRICS / "export.json", export)
    write_json(root / paths.EXPLAIN / "summary.json", EXPLAIN)
    if optional:
        write_json(root / paths.METRICS / "evaluate.json", EVALUATE)
        write_json(root / paths.METRICS / "subgroups.json", SUBGROUPS)
        write_json(root / paths.METRICS / "ood.json", OOD)
        write_json(root / paths.METRICS / "conformal.json", CONFORMAL)


def register_lineage(root: Path) -> str:
    """A lineage run in a sqlite store under ``root``, a PyTorch and an ONNX version of it."""
    tags = {"data_version": DATA_VERSION, "git_commit": "0123abc", "dataset": "synthetic"}
    with tracking.lineage_run("card-test", "synthetic-custom_cnn", tags, repo=root) as run:
        client = MlflowClient()
        for name in (MODEL, f"{MODEL}-onnx"):
            client.create_registered_model(name)
            client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
        tracking.update_run_file(root, registered_model=MODEL, model_version="1")
    onnx = {"registered_model": f"{MODEL}-onnx", "version": "1", "alias": "candidate"}
    write_json(root / paths.ONNX_REGISTRATION, onnx)
    return run.info.run_id


class TagBalance(HTMLParser):
    """Fails on an end tag that closes something other than the innermost open element."""

    VOID = {"meta", "br", "img", "hr", "input", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001 (HTMLParser's signature)
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):  # noqa: ANN001
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data):  # noqa: ANN001
        self.text.append(data)


def parse_html(text: str) -> str:
    parser = TagBalance()
    parser.feed(text)
    parser.close()
    assert parser.open == [], f"unclosed: {parser.open}"
    return " ".join(" ".join(parser.text).split())


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    write_params(tmp_path / "params.yaml", [])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_intervals_are_sklearn_balanced_accuracy_with_bootstrap_and_wilson_bounds():
    logits, labels = test_predictions()
    cfg = load_params(REPO / "params.yaml").card
    found = card.test_intervals(logits, labels, CLASSES, cfg)
    ba = found["metrics"]["balanced_accuracy"]
    assert ba["value"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))
    assert ba["low"] < ba["value"] < ba["high"] and ba["high"] - ba["low"] < 0.2
    assert found == card.test_intervals(logits, labels, CLASSES, cfg)  # seeded: reproducible
    bcc = found["per_class"]["BCC"]
    assert bcc["support"] == int((labels == 2).sum()) and bcc["low"] < bcc["recall"] < bcc["high"]


def test_limitations_are_written_from_the_numbers(project):
    write_project(project)
    p = load_params("params.yaml")
    inputs = card.load_inputs()
    context = card.build_context(inputs, p, None, {"data_version": DATA_VERSION})
    test_ba = context["test"]["balanced_accuracy"]
    text = "\n".join(card.known_limitations(context, p.card))
    gap = test_ba - 0.583
    assert (
        f"Balanced accuracy on ham-holdout is {gap:.3f} below test (0.583 vs {test_ba:.3f}, n=412)"
        in text
    )
    assert "mednode is" not in text or test_ba - 0.744 > p.card.external_gap
    brown = "skin_tone = brown falls 0.157 below the rest (balanced accuracy 0.604 vs 0.761, n=41)"
    assert f"On test, {brown}" in text
    assert "unknown" not in text  # unmeasured skin is no group, and no category
    assert "sex =" not in text and "skin_tone = light" not in text  # above the rest: no gap
    assert "skin_tone = dark" not in text  # n=6 < min_group_n: shown, never named
    assert "intermediate" not in text and "brown 1.4% (n=15)" in text and "dark 0.0% (n=0)" in text
    assert "Conformal coverage below the 0.90 target for class BCC (0.810)" in text
    assert "Conformal coverage on test" not in text  # 0.904 overall meets the target
    assert "On ham-holdout the conformal sets hold the true class for only 83.3%" in text
    assert "On mednode the conformal" not in text  # no sets recorded there
    assert "The OOD guard passes only 86.2% of test (target 95%)" in text
    assert "tells real_photos from the training images poorly (detection AUROC 0.724)" in text
    assert "mednode from the training" not in text
    assert "Calibrated test ECE is 0.071 (above 0.050)" in text
    assert "sends 59.0% of test cases to a dermatologist" in text
    assert "38% of the explanation maps lie mostly outside the lesion" in text
    assert "For BCC, only 31% of the attention" in text and "For MEL" not in text
    # The same model with better numbers: the limitations they caused are gone.
    better = {
        **inputs,
        "ood": {**OOD, "test_pass_rate": 0.951, "detection_auroc": {"mednode": 0.95}},
        "calibrate": {**CALIBRATE, "test_ece_after": 0.02, "referral_referred_fraction": 0.2},
    }
    context = card.build_context(better, p, None, {})
    text = "\n".join(card.known_limitations(context, p.card))
    assert "OOD guard" not in text and "ECE" not in text and "referral" not in text
    assert "metadata prior" not in text  # the fixture's training reports no image-only number
    fused = {**inputs, "train": {**inputs["train"], "image_only": {"test_balanced_accuracy": 0.5}}}
    context = card.build_context(fused, p, None, {})
    text = "\n".join(card.known_limitations(context, p.card))
    assert (
        f"with each case's age, sex and site the balanced accuracy is {test_ba:.3f}, from the "
        "image alone 0.500" in text
    )


def test_card_renders_every_section_and_sets_the_registry_description(project):
    write_project(project)
    run_id = register_lineage(project)
    assert run_entry("card", "params.yaml") == 0

    md = (project / card.CARD_DIR / card.MARKDOWN).read_text()
    html = parse_html((project / card.CARD_DIR / card.HTML).read_text())
    context = json.loads((project / card.CARD_DIR / card.CONTEXT_FILE).read_text())
    assert context["not_run"] == []
    ba = context["test"]["metrics"][0]
    assert ba["metric"] == "balanced_accuracy" and ba["low"] < ba["value"] < ba["high"]
    numbers = [
        "Research and teaching",  # intended use
        "Diagnosis without a clinician",  # out of scope
        DATA_VERSION, "1500", "862",  # data
        "very_light", "53.3%",  # skin tone: 560 of the 1050 training images
        "train.lr", "0.002", "custom_cnn", "bf16 autocast",  # training configuration
        f"{ba['value']:.3f}", f"[{ba['low']:.3f}, {ba['high']:.3f}]",  # test with its CI
        "ham-holdout", "0.583", "[0.541, 0.627]", "0.710 / 0.830", "83.3% / 2.210",  # external
        "brown", "0.604", "[0.470, 0.730]", "0.428 (skin_tone)",  # subgroups
        "0.118", "0.071", "0.742", "59.0% referred",  # calibration, referral
        "aps", "0.904", "1.740", "0.810",  # conformal
        "-4.2173", "86.2%", "0.913", "0.998", "0.724",  # OOD
        "gradcam", "0.583", "37.5%", "31.0%",  # explanations: ranking, flags
        "pending", "p < 0.05",  # the decision, before the gate, with its criteria
    ]  # fmt: skip
    for number in numbers:
        assert number in md, number
        assert number in html, number
    assert "skin_tone=brown (n=41): balanced accuracy 0.604, 0.157 below the rest" in md
    assert "not run" not in md and "not run" not in html
    for line in context["limitations"]:  # derived from the numbers, in both renderings
        assert line in md
        assert line.replace("'", "&#39;") in html or line in html
    assert any("ham-holdout" in line for line in context["limitations"])

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    for name in (MODEL, f"{MODEL}-onnx"):
        text = client.get_model_version(name, "1").description
        assert text.startswith("**Model card (short form)**: custom_cnn on synthetic")
        assert DATA_VERSION in text and f"Test balanced accuracy {ba['value']:.3f}" in text
        assert "calibrated ECE 0.071" in text and "ham-holdout 0.583 (n=412)" in text
        assert "detection AUROC mednode 0.913" in text and "coverage 0.904" in text
        assert "Promotion: pending" in text
    artifacts = {a.path for a in client.list_artifacts(run_id, "card")}
    assert {"card/model_card.md", "card/model_card.html"} <= artifacts

    # After the gate: the verdict in the registry's card and description; local files as made.
    gate = {"promote": True, "reason": "no champion yet: the first model becomes it"}
    where = card.record_decision(project, {**gate, "champion_version": None})
    assert where["decision"] == "promoted" and where["registry_url"].endswith(
        f"/{MODEL}/versions/1"
    )
    text = client.get_model_version(MODEL, "1").description
    assert "Promotion: promoted: no champion yet" in text
    stored = Path(client.download_artifacts(run_id, "card/model_card.md", str(project / "dl")))
    assert "**promoted**: no champion yet" in stored.read_text()
    assert "**pending**" in (project / card.CARD_DIR / card.MARKDOWN).read_text()


def test_missing_sections_say_not_run(project):
    write_project(project, optional=False)
    (project / paths.EXPLAIN / "summary.json").unlink()
    p = load_params("params.yaml")
    context = card.build_context(card.load_inputs(), p, None, {})
    assert context["not_run"] == ["external", "subgroups", "conformal", "ood", "explanations"]
    md = card.render(f"{card.MARKDOWN}.j2", context)
    html = parse_html(card.render(f"{card.HTML}.j2", context))
    for missing in ("evaluate", "subgroups", "ood", "conformal", "explain"):
        line = f"not run: no {card.INPUTS[missing]} (the {missing} stage has not run"
        assert line in md and line in html, missing
    assert "Test ECE 0.118 before calibration" in md  # what did run is still there
    limits = "\n".join(context["limitations"])
    assert "No external evaluation" in limits and "No out-of-distribution guard" in limits
    assert "No subgroup analysis" in limits and "No conformal prediction sets" in limits
    assert "External: not run" in card.short_form(context)


def test_a_corrupt_metrics_file_stops_the_stage_naming_it(project, capsys):
    write_project(project)  # the file is read before MLflow is: no store needed
    (project / paths.METRICS / "ood.json").write_text('{"method": "energy", ')
    assert run_entry("card", "params.yaml") == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "metrics/ood.json: not valid JSON" in err and "Traceback" not in err
    assert not (project / card.CARD_DIR).exists()


def test_the_flow_summary_says_where_the_card_is():
    from flows.pipeline import report_markdown

    gate = {
        "experiment_id": "1", "run_id": "abc", "promote": True, "champion_version": None,
        "reason": "no champion yet", "test_set_version": "v", "n_images": 225, "model": MODEL,
        "candidate_version": "1", "candidate_balanced_accuracy": 0.8, "candidate_ece": 0.05,
        "champion_balanced_accuracy": None, "champion_ece": None,
    }  # fmt: skip
    where = {
        "card": "reports/card/model_card.html", "artifact": "card/model_card.html",
        "registry_url": "http://127.0.0.1:5000/#/models/card-model/versions/1",
    }  # fmt: skip
    cfg = load_params(REPO / "params.yaml").gate
    text = report_markdown([{"stage": "card", "ran": True}], gate, cfg, where)
    assert "Model card: `reports/card/model_card.html`" in text
    assert "(http://127.0.0.1:5000/#/models/card-model/versions/1)" in text
    assert "Model card" not in report_markdown([], gate, cfg)  # no card stage: no line


def test_the_flow_summary_reports_every_trust_check_from_the_stage_metrics(tmp_path) -> None:
    from flows.pipeline import trust_markdown

    assert trust_markdown(tmp_path) == ""  # no trust stage has run: no section
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    record = {
        "n": 170,
        "balanced_accuracy": 0.61,
        "balanced_accuracy_ci": [0.55, 0.68],
        "auroc": 0.7,
        "ece_after": 0.08,
        "referred_share": 0.42,
        "conformal": {"coverage": 0.833, "mean_set_size": 2.21},
    }
    (metrics / "evaluate.json").write_text(json.dumps({"sets": {"mednode": record}}))
    flag = "test: skin_tone=brown (n=25) balanced_accuracy 0.400 vs 0.700 for the rest"
    subgroups = {
        "n": 300,
        "largest_gap": {"balanced_accuracy": {"attribute": "skin_tone", "gap": 0.3}},
        "flags": [flag],
    }
    (metrics / "subgroups.json").write_text(json.dumps({"splits": {"test": subgroups}}))
    text = trust_markdown(tmp_path)
    row = "| mednode | 170 | 0.6100 [0.5500, 0.6800] | 0.7000 | 0.0800 | 42.0% | 83.3% / 2.21 |"
    assert row in text
    assert "largest gap balanced_accuracy 0.300 (skin_tone); 1 flag(s)" in text
    assert flag in text and "Out-of-distribution" not in text  # the OOD stage has not run
