"""Split-conformal prediction sets: coverage on a held-out synthetic split, crepes agreement.

The synthetic model is calibrated by construction: each image's probabilities are drawn from a
Dirichlet and its label from those probabilities, so calibration and test images are
exchangeable, as split conformal assumes.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tasks import conformal, paths
from tasks.calibrate import Calibrator
from tasks.config import load_params
from tasks.conformal import (
    ConformalError,
    ambiguous,
    conformal_scores,
    crepes_sets,
    fit_sets,
    sets_from_dict,
)
from tasks.io import write_json
from tasks.metrics import save_predictions
from tests.helpers import write_params

CLASSES = ["MEL", "NV", "BCC", "BKL"]


def synthetic(n: int, seed: int, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities (labels drawn from them) of a fairly sure model."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(k, 0.6), size=n)
    labels = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return probs, labels


def tolerance(n_cal: int, n_test: int, coverage: float) -> float:
    """How far below the target the test coverage of one calibration draw may fall.

    Given its calibration split, the coverage of split conformal is Beta-distributed with
    variance about a(1-a)/(n_cal+2) (Vovk, 2012; Angelopoulos & Bates, 2021, sec. 3.2), and
    its estimate on n_test images adds binomial variance a(1-a)/n_test; three standard
    deviations of each leave a false failure rate below ~0.2 %. Non-randomised scores and the
    always-kept top class only raise coverage, so the bound stays valid.
    """
    a = 1.0 - coverage
    return 3 * math.sqrt(a * (1 - a) / (n_cal + 2)) + 3 * math.sqrt(a * (1 - a) / n_test)


@pytest.mark.parametrize("method", ["aps", "raps"])
def test_coverage_on_held_out_split(method: str) -> None:
    cal_p, cal_y = synthetic(1000, seed=0)
    test_p, test_y = synthetic(4000, seed=1)
    sets = fit_sets(cal_p, cal_y, 0.90, method)
    report = conformal.coverage_report(sets.sets(test_p), test_y, CLASSES)
    assert report["coverage"] >= 0.90 - tolerance(1000, 4000, 0.90)
    assert 1.0 < report["mean_set_size"] < len(CLASSES)  # informative: neither top-1 nor all


def test_class_conditional_coverage_per_class() -> None:
    cal_p, cal_y = synthetic(2000, seed=2)
    test_p, test_y = synthetic(4000, seed=3)
    sets = fit_sets(cal_p, cal_y, 0.90, "aps", class_conditional=True)
    member = sets.sets(test_p)
    report = conformal.coverage_report(member, test_y, CLASSES)
    for i, c in enumerate(CLASSES):
        n_cal, n_test = int((cal_y == i).sum()), int((test_y == i).sum())
        assert report["coverage_per_class"][c] >= 0.90 - tolerance(n_cal, n_test, 0.90), c


@pytest.mark.parametrize("method", ["aps", "raps"])
@pytest.mark.parametrize("class_conditional", [False, True])
def test_threshold_form_equals_crepes(method: str, class_conditional: bool) -> None:
    cal_p, cal_y = synthetic(300, seed=4)
    test_p, _ = synthetic(500, seed=5)
    sets = fit_sets(cal_p, cal_y, 0.85, method, class_conditional)
    np.testing.assert_array_equal(sets.sets(test_p), crepes_sets(cal_p, cal_y, test_p, sets))


def test_aps_and_raps_scores_by_hand() -> None:
    p = np.array([[0.1, 0.6, 0.3]])
    np.testing.assert_allclose(conformal_scores(p), [[1.0, 0.6, 0.9]])
    # RAPS, lambda 0.5, k_reg 1: ranks 2 and 3 pay 0.5 and 1.0.
    np.testing.assert_allclose(conformal_scores(p, 0.5, 1), [[2.0, 0.6, 1.4]])


def test_ambiguous_sets_are_referred() -> None:
    classes = ["MEL", "NV", "BKL"]
    probs = np.array([[0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.1, 0.5, 0.4], [0.7, 0.2, 0.1]])
    member = np.array([[0, 1, 0], [1, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(ambiguous(member, probs, classes), [False, True, True, False])
    assert conformal.set_labels(member[:2], classes) == ["{NV}", "{MEL, NV}"]


def test_too_few_calibration_images_and_round_trip() -> None:
    p, y = synthetic(8, seed=6)
    with pytest.raises(ConformalError, match="8 calibration images cannot give 90% coverage"):
        fit_sets(p, y, 0.90)
    p, y = synthetic(50, seed=6)
    sets = fit_sets(p, y, 0.90, "raps", class_conditional=True)
    assert sets_from_dict(json.loads(json.dumps(sets.to_dict()))) == sets
    with pytest.raises(ConformalError, match="models/conformal.json"):
        sets_from_dict({"method": "aps"}, "models/conformal.json")


def test_graph_probabilities_follow_the_export() -> None:
    logits = np.array([[2.0, 0.0, -1.0]])
    t2 = conformal.graph_probabilities(logits, Calibrator("temperature", temperature=2.0))
    np.testing.assert_allclose(t2.sum(), 1.0)
    assert t2[0, 0] < conformal.graph_probabilities(logits, Calibrator("vector"))[0, 0]


def test_stage_writes_the_card_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage's files, with MLflow logging stubbed (tests/test_lineage.py covers logging)."""
    from tasks import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking, "resume_lineage_run", contextlib.nullcontext)
    logged = {}
    monkeypatch.setattr(tracking, "log_ood_conformal", lambda *a: logged.setdefault("args", a))
    rng = np.random.default_rng(7)
    for split, n in (("val", 400), ("test", 400)):
        probs, y = synthetic(n, seed=8 if split == "val" else 9)
        logits = np.log(probs) + rng.normal(0, 1e-3, probs.shape)
        save_predictions(paths.PREDICTIONS / f"{split}.npz", logits, y, range(n), CLASSES)
    write_json(paths.CALIBRATION / "calibrator.json", {"method": "temperature", "temperature": 1})
    p = load_params(write_params(tmp_path / "params.yaml", []))
    conformal.run(p)
    metrics = json.loads((paths.METRICS / "conformal.json").read_text())
    assert set(metrics) >= {
        "method", "target_coverage", "coverage", "coverage_per_class", "mean_set_size", "qhat",
    }  # fmt: skip
    assert set(metrics["coverage_per_class"]) == set(CLASSES)
    assert metrics["coverage"] >= 0.90 - tolerance(400, 400, 0.90)
    assert metrics["crepes_agreement"] == 1.0
    assert (conformal.REPORTS / "tradeoff.png").stat().st_size > 0
    assert conformal.read_sets().qhat == pytest.approx(metrics["qhat"])
    assert logged["args"][0] == "conformal"
