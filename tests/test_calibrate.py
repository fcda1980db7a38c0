"""Calibrators, calibration metrics, selective prediction and the stage outputs of tasks.calibrate.

Metric tests use tiny cases worked out by hand in the test, so they check the definitions
(bin edges, weights, which classes are averaged), not that the code agrees with itself. Fitting
tests use synthetic logits whose miscalibration is known by construction.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.isotonic import IsotonicRegression

from tasks.calibrate import (
    METHODS,
    adaptive_ece,
    apply_referral_threshold,
    brier_score,
    calibrate,
    calibration_report,
    calibrator_from_dict,
    classwise_ece,
    expected_calibration_error,
    fit_calibrator,
    fit_temperature,
    fit_vector_scaling,
    maximum_calibration_error,
    nll,
    referral_threshold,
    reliability_bins,
    risk_coverage,
    write_outputs,
)
from tasks.metrics import softmax

# 6 samples, 4 classes. Confidence / prediction / label, with equal-width bins of 1/3:
#   0.30 pred 0 label 0 right  | bin 0
#   0.30 pred 1 label 0 wrong  | bin 0   -> conf 0.30, acc 0.5, gap 0.20
#   0.50 pred 0 label 0 right  | bin 1
#   0.60 pred 1 label 2 wrong  | bin 1   -> conf 0.55, acc 0.5, gap 0.05
#   0.90 pred 0 label 0 right  | bin 2
#   0.80 pred 3 label 3 right  | bin 2   -> conf 0.85, acc 1.0, gap 0.15
HAND_PROBS = np.array(
    [
        [0.30, 0.25, 0.25, 0.20],
        [0.20, 0.30, 0.25, 0.25],
        [0.50, 0.20, 0.20, 0.10],
        [0.10, 0.60, 0.20, 0.10],
        [0.90, 0.05, 0.03, 0.02],
        [0.05, 0.05, 0.10, 0.80],
    ]
)
HAND_LABELS = np.array([0, 0, 0, 2, 0, 3])


def sampled_labels(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per row drawn from that row's distribution: calibrated by construction."""
    u = rng.random(probs.shape[0])[:, None]
    return (u > np.cumsum(probs, axis=1)).sum(axis=1).clip(max=probs.shape[1] - 1)


def calibrated_logits(n: int, k: int, seed: int, scale: float = 1.5):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * scale
    return z, sampled_labels(softmax(z), rng)


def two_class(confidences: list[float], right: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [c, 1 - c] (prediction 0) with label 0 where ``right``, else 1."""
    c = np.asarray(confidences)
    return np.column_stack([c, 1.0 - c]), np.where(right, 0, 1)


# --------------------------------------------------------------------------- metrics by hand


def test_ece_mce_on_hand_case():
    assert expected_calibration_error(HAND_PROBS, HAND_LABELS, 3) == pytest.approx(
        2 / 6 * 0.20 + 2 / 6 * 0.05 + 2 / 6 * 0.15
    )
    assert maximum_calibration_error(HAND_PROBS, HAND_LABELS, 3) == pytest.approx(0.20)


def test_reliability_bins_on_hand_case():
    rows = reliability_bins(HAND_PROBS, HAND_LABELS, 3)
    assert [r["count"] for r in rows] == [2, 2, 2]
    assert [r["confidence"] for r in rows] == pytest.approx([0.30, 0.55, 0.85])
    assert [r["accuracy"] for r in rows] == pytest.approx([0.5, 0.5, 1.0])
    assert rows[0]["lower"] == 0.0 and rows[-1]["upper"] == 1.0
    empty = reliability_bins(HAND_PROBS, HAND_LABELS, 10)[0]  # nothing at confidence <= 0.1
    assert empty["count"] == 0 and empty["confidence"] is None and empty["accuracy"] is None


def test_adaptive_ece_uses_equal_mass_bins():
    # Sorted confidences 0.3 0.3 0.5 | 0.6 0.8 0.9; each half has 2 of 3 right.
    low = abs(2 / 3 - (0.3 + 0.3 + 0.5) / 3)
    high = abs(2 / 3 - (0.6 + 0.8 + 0.9) / 3)
    assert adaptive_ece(HAND_PROBS, HAND_LABELS, 2) == pytest.approx(0.5 * low + 0.5 * high)


def test_brier_on_hand_case():
    onehot = np.eye(4)[HAND_LABELS]
    per_sample = [
        0.7**2 + 0.25**2 + 0.25**2 + 0.2**2,
        0.8**2 + 0.3**2 + 0.25**2 + 0.25**2,
        0.5**2 + 0.2**2 + 0.2**2 + 0.1**2,
        0.1**2 + 0.6**2 + 0.8**2 + 0.1**2,
        0.1**2 + 0.05**2 + 0.03**2 + 0.02**2,
        0.05**2 + 0.05**2 + 0.1**2 + 0.2**2,
    ]
    assert brier_score(HAND_PROBS, HAND_LABELS) == pytest.approx(np.mean(per_sample))
    assert brier_score(onehot, HAND_LABELS) == 0.0
    assert nll(HAND_PROBS, HAND_LABELS) == pytest.approx(
        -np.mean(np.log(HAND_PROBS[np.arange(6), HAND_LABELS]))
    )


def test_classwise_ece_on_hand_case():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    labels = np.array([0, 2, 2])
    # Two bins (0, .5] and (.5, 1], per class: |mean outcome - mean p| weighted by bin size.
    class0 = 2 / 3 * abs(0.0 - 0.15) + 1 / 3 * abs(1.0 - 0.6)
    class1 = 2 / 3 * abs(0.0 - 0.25) + 1 / 3 * abs(0.0 - 0.7)
    class2 = 2 / 3 * abs(0.5 - 0.1) + 1 / 3 * abs(1.0 - 0.7)
    expected = (class0 + class1 + class2) / 3
    assert classwise_ece(probs, labels, 2) == pytest.approx(expected)


def test_calibrated_data_has_ece_near_zero():
    z, y = calibrated_logits(20_000, 4, seed=1)
    p = softmax(z)
    assert expected_calibration_error(p, y, 15) < 0.015
    assert adaptive_ece(p, y, 15) < 0.015
    assert classwise_ece(p, y, 15) < 0.01


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="not a probability vector"):
        expected_calibration_error(np.array([[0.7, 0.7]]), np.array([0]), 5)
    with pytest.raises(ValueError, match="not a class index"):
        expected_calibration_error(HAND_PROBS, HAND_LABELS + 3, 5)
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(HAND_PROBS, HAND_LABELS, 0)


# --------------------------------------------------------------------------- fitting


def test_temperature_recovers_overconfidence_and_keeps_argmax():
    z_val, y_val = calibrated_logits(3000, 5, seed=2)
    z_test, y_test = calibrated_logits(3000, 5, seed=3)
    t = fit_temperature(4.0 * z_val, y_val)
    assert t == pytest.approx(4.0, rel=0.15)
    cal = fit_calibrator("temperature", 4.0 * z_val, y_val)
    assert cal.temperature == pytest.approx(t)
    raw, after = softmax(4.0 * z_test), cal.probabilities(4.0 * z_test)
    assert nll(after, y_test) < nll(raw, y_test) - 0.1
    assert expected_calibration_error(after, y_test, 15) < expected_calibration_error(
        raw, y_test, 15
    )
    np.testing.assert_array_equal(after.argmax(axis=1), raw.argmax(axis=1))


def miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated logits distorted per class (scale and shift): what vector scaling undoes."""
    z, y = calibrated_logits(n, 4, seed=seed)
    return z * np.array([3.0, 0.5, 2.0, 1.0]) + np.array([1.0, 0.0, -1.0, 0.5]), y


@pytest.mark.parametrize("method", ["vector", "isotonic"])
def test_vector_and_isotonic_improve_miscalibrated_data(method):
    z_val, y_val = miscalibrated(3000, seed=4)
    z_test, y_test = miscalibrated(3000, seed=5)
    cal = fit_calibrator(method, z_val, y_val)
    raw, after = softmax(z_test), cal.probabilities(z_test)
    np.testing.assert_allclose(after.sum(axis=1), 1.0)
    assert nll(after, y_test) < nll(raw, y_test)
    assert expected_calibration_error(after, y_test, 15) < expected_calibration_error(
        raw, y_test, 15
    )


def test_vector_scaling_is_near_identity_on_calibrated_logits():
    z, y = calibrated_logits(3000, 3, seed=6)
    w, b = fit_vector_scaling(z, y)
    assert w.shape == b.shape == (3,)
    np.testing.assert_allclose(w, 1.0, atol=0.15)
    np.testing.assert_allclose(b - b.mean(), 0.0, atol=0.15)


def test_isotonic_matches_sklearn_and_round_trips_through_json():
    z, y = miscalibrated(500, seed=7)
    cal = fit_calibrator("isotonic", z, y)
    p_val, p = softmax(z), softmax(z[:50])
    expected = np.column_stack(
        [
            IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
            .fit(p_val[:, c], (y == c).astype(float))
            .predict(p[:, c])
            for c in range(4)
        ]
    )
    expected = np.maximum(expected, 1e-6)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(cal.probabilities(z[:50]), expected, atol=1e-12)
    for method in METHODS:
        fitted = fit_calibrator(method, z, y)
        again = calibrator_from_dict(json.loads(json.dumps(fitted.to_dict())))
        np.testing.assert_allclose(again.probabilities(z), fitted.probabilities(z))


def test_unknown_method_is_named():
    z, y = calibrated_logits(50, 3, seed=8)
    with pytest.raises(ValueError, match="'platt'"):
        fit_calibrator("platt", z, y)


# --------------------------------------------------------------------------- selective prediction

# Ten cases by falling confidence; prefix accuracies 1 1 1 .75 .8 .833 .714 .75 .667 .6.
CONF = [0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55, 0.52]
RIGHT = [True, True, True, False, True, True, False, True, False, False]


def test_referral_threshold_by_hand():
    probs, labels = two_class(CONF, RIGHT)
    # 0.8: the top 4 miss it (0.75) but the top 6 reach it again (5/6): the largest coverage wins.
    got = referral_threshold(probs, labels, 0.8)
    assert got["reachable"] is True
    assert got["threshold"] == 0.70
    assert got["coverage"] == pytest.approx(0.6)
    assert got["accuracy"] == pytest.approx(5 / 6)
    assert got["referred_fraction"] == pytest.approx(0.4)
    exact = referral_threshold(probs, labels, 0.75)  # met exactly at 6/8
    assert (exact["threshold"], exact["coverage"]) == (0.60, pytest.approx(0.8))
    perfect = referral_threshold(probs, labels, 1.0)
    assert (perfect["threshold"], perfect["coverage"]) == (0.85, pytest.approx(0.3))


def test_unreachable_target_is_reported():
    probs, labels = two_class(CONF, [not r for r in RIGHT])  # the most confident case is wrong
    got = referral_threshold(probs, labels, 0.99)
    assert got["reachable"] is False
    assert got["threshold"] == 1.0
    assert got["coverage"] == 0.0 and got["referred_fraction"] == 1.0
    assert got["accuracy"] is None
    assert apply_referral_threshold(probs, labels, 0.0)["coverage"] == 1.0


def test_risk_coverage_curve_and_aurc():
    probs, labels = two_class(CONF, RIGHT)
    rc = risk_coverage(probs, labels)
    assert rc["coverage"][0] == 1.0
    assert np.all(np.diff(rc["coverage"]) < 0)
    assert np.all(np.diff(rc["thresholds"]) > 0)
    prefix_risk = [0, 0, 0, 1 / 4, 1 / 5, 1 / 6, 2 / 7, 2 / 8, 3 / 9, 4 / 10]
    np.testing.assert_allclose(rc["risk"], prefix_risk[::-1])
    assert rc["aurc"] == pytest.approx(np.mean(prefix_risk))

    right = [True] * 6 + [False] * 4
    best = risk_coverage(*two_class(CONF, right))["aurc"]
    worst = risk_coverage(*two_class(CONF, right[::-1]))["aurc"]
    assert best < worst
    ties = risk_coverage(*two_class([0.9, 0.9, 0.6], [True, False, True]))
    np.testing.assert_allclose(ties["coverage"], [1.0, 2 / 3])
    np.testing.assert_allclose(ties["risk"], [1 / 3, 1 / 2])


# --------------------------------------------------------------------------- the stage


@pytest.mark.parametrize("method", METHODS)
def test_calibrate_and_write_outputs(tmp_path, method):
    z_val, y_val = calibrated_logits(400, 4, seed=9)
    z_test, y_test = calibrated_logits(400, 4, seed=10)
    result = calibrate(3.0 * z_val, y_val, 3.0 * z_test, y_test, method, 10, 0.9)
    assert result.after["ece"] < result.before["ece"]
    assert result.bins_before == result.before["reliability"]
    assert set(calibration_report(result.probs_after, y_test, 10)) == set(result.after)

    flat = write_outputs(result, tmp_path)
    for name in ("reliability.png", "confidence_histogram.png", "risk_coverage.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and min(img.size) >= 300
    rel = json.loads((tmp_path / "reliability.json").read_text())
    assert {r["stage"] for r in rel} == {"before", "after"}
    assert set(rel[0]) == {"bin_center", "accuracy", "confidence", "count", "stage"}
    assert sum(r["count"] for r in rel if r["stage"] == "after") == 400
    rc = json.loads((tmp_path / "risk_coverage.json").read_text())
    assert set(rc[0]) == {"coverage", "risk", "stage"}
    saved = json.loads((tmp_path / "calibrator.json").read_text())
    assert saved["method"] == method
    assert json.loads((tmp_path / "calibration_report.json").read_text())["referral"]

    for key in ("test_ece_before", "test_ece_after", "test_nll_after", "aurc_after"):
        assert key in flat
    assert ("temperature" in flat) == (method == "temperature")
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())
    assert flat["referral_threshold"] == result.referral["threshold"]


def test_calibrate_rejects_mismatched_classes():
    z, y = calibrated_logits(50, 3, seed=11)
    z4, y4 = calibrated_logits(50, 4, seed=12)
    with pytest.raises(ValueError, match="3 classes but test has 4"):
        calibrate(z, y, z4, y4, "temperature", 10, 0.9)
