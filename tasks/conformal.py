"""Conformal prediction sets: every class the model cannot rule out at a chosen coverage.

A top-1 answer with a confidence hides how many classes are still plausible. Split-conformal
prediction (Vovk et al.; Angelopoulos & Bates, 2021) turns the calibrated probabilities into a
*set* of classes that contains the true class for at least ``conformal.coverage`` (e.g. 90 %)
of images drawn like the calibration split, whatever the model. The sets are fitted on the
validation split (the calibration split of :mod:`tasks.calibrate`) and measured on test.

Scores (larger = the class fits the image worse):

- ``aps`` (Romano et al., 2020): the probability mass of the classes ranked above ``y`` plus
  ``p_y``; sets grow where the model is unsure.
- ``raps`` (Angelopoulos et al., 2021): APS plus ``lambda * max(0, rank_y - k_reg)``, which
  keeps sets small when many classes have tiny probabilities.

Both are the non-randomised forms, so the same image always gets the same set (a referral
rule must be reproducible); the top class is always in the set (an empty set cannot be acted
on), which can only raise coverage. With ``class_conditional`` the quantile is computed per
true class (Mondrian conformal prediction), so each class, the rare malignant ones included,
gets the coverage, not only the average over classes.

Library: the p-values and sets come from crepes' :class:`crepes.ConformalClassifier`, which
takes numpy non-conformity scores and Mondrian categories directly. crepes ships hinge and
margin scores but not APS/RAPS, so :func:`conformal_scores` computes those (a cumulative sum);
torchcp has them but pulls in transformers and torch-geometric, and MAPIE 1.x wants a
scikit-learn estimator rather than probabilities. Predict (onnxruntime, no crepes) uses the
equivalent threshold form ``score <= qhat`` (:func:`threshold_from_scores`), which is what the
ONNX metadata carries; tests/test_conformal.py checks both give the same sets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from crepes import ConformalClassifier
from matplotlib.figure import Figure

from tasks import paths
from tasks.config import CONFORMAL_METHODS, ConfigError, Params
from tasks.io import write_json
from tasks.labels import MALIGNANT
from tasks.metrics import DPI, _check_labels, save_figure, softmax
from tasks.stage import console, main

SETS_FILE = paths.MODELS / "conformal.json"
REPORTS = Path("reports") / "conformal"
SWEEP = tuple(np.round(np.arange(0.50, 0.995, 0.01), 2))  # target coverages of the figure


class ConformalError(ValueError):
    """Bad input to conformal prediction: too few calibration images, bad probabilities."""


@dataclass(frozen=True)
class ConformalSets:
    """A fitted set predictor: ``{y : score(x, y) <= qhat_y} | {argmax}``.

    Attributes:
        method: ``aps`` | ``raps``.
        coverage: target coverage.
        qhat: the marginal threshold (all classes pooled).
        qhat_per_class: per class (class-conditional only); None means the class had too few
            calibration images for the quantile and is always in the set.
        class_conditional: whether ``qhat_per_class`` is used.
        raps_lambda: RAPS penalty (0 for APS).
        raps_k_reg: RAPS free set size.
    """

    method: str
    coverage: float
    qhat: float
    qhat_per_class: list[float | None] = field(default_factory=list)
    class_conditional: bool = False
    raps_lambda: float = 0.0
    raps_k_reg: int = 0

    def thresholds(self, k: int) -> np.ndarray:
        """One threshold per class (inf: always in the set)."""
        if not self.class_conditional:
            return np.full(k, self.qhat)
        return np.asarray([np.inf if q is None else q for q in self.qhat_per_class], float)

    def sets(self, probs: np.ndarray) -> np.ndarray:
        """Boolean membership (n, K): the prediction set of each row of ``probs``."""
        p = _check_probs(probs)
        scores = conformal_scores(p, self.raps_lambda, self.raps_k_reg)
        member = scores <= self.thresholds(p.shape[1])[None, :]
        member[np.arange(len(p)), p.argmax(axis=1)] = True
        return member

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``models/conformal.json`` and the ONNX metadata key ``conformal``."""
        return {
            "method": self.method,
            "coverage": float(self.coverage),
            "qhat": float(self.qhat),
            "qhat_per_class": [None if q is None else float(q) for q in self.qhat_per_class],
            "class_conditional": bool(self.class_conditional),
            "raps_lambda": float(self.raps_lambda),
            "raps_k_reg": int(self.raps_k_reg),
        }


def sets_from_dict(data: Mapping[str, Any], source: str = "conformal") -> ConformalSets:
    """Rebuild :class:`ConformalSets` from :meth:`ConformalSets.to_dict`.

    Raises:
        ConformalError: an unknown method or missing fields, naming ``source``.
    """
    if data.get("method") not in CONFORMAL_METHODS:
        raise ConformalError(f"{source}: conformal method {data.get('method')!r} is unknown")
    try:
        return ConformalSets(
            method=str(data["method"]),
            coverage=float(data["coverage"]),
            qhat=float(data["qhat"]),
            qhat_per_class=[None if q is None else float(q) for q in data["qhat_per_class"]],
            class_conditional=bool(data["class_conditional"]),
            raps_lambda=float(data["raps_lambda"]),
            raps_k_reg=int(data["raps_k_reg"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConformalError(f"{source}: not fitted conformal sets ({err})") from None


def _check_probs(probs: Any) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ConformalError(f"probabilities must be 2-D (samples, classes >= 2), got {p.shape}")
    bad = np.flatnonzero(~np.isfinite(p).all(axis=1) | (np.abs(p.sum(axis=1) - 1) > 1e-4))
    if bad.size:
        raise ConformalError(f"probabilities row {int(bad[0])} is not a probability vector")
    return p


def conformal_scores(probs: np.ndarray, raps_lambda: float = 0.0, k_reg: int = 0) -> np.ndarray:
    """APS / RAPS non-conformity score of every class of every row, (n, K).

    For class ``y`` ranked ``r`` (1 = top; ties broken by class index, stably): the summed
    probability of the classes ranked 1..r, plus ``raps_lambda * max(0, r - k_reg)``.
    ``raps_lambda = 0`` gives APS.
    """
    p = _check_probs(probs)
    order = np.argsort(-p, axis=1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=1)
    cum = np.cumsum(ranked, axis=1)
    rank = np.arange(1, p.shape[1] + 1)[None, :]
    ranked_scores = cum + raps_lambda * np.maximum(0, rank - k_reg)
    scores = np.empty_like(p)
    np.put_along_axis(scores, order, ranked_scores, axis=1)
    return scores


def threshold_from_scores(scores: np.ndarray, coverage: float) -> float | None:
    """The largest score that crepes' non-smoothed p-value still admits at ``coverage``.

    crepes keeps class ``y`` when ``p_y = (#{calibration scores >= s_y} + 1) / (n + 1) >=
    1 - coverage``, i.e. when at least ``m = ceil((1 - coverage)(n + 1)) - 1`` calibration
    scores are ``>= s_y``, i.e. ``s_y <= qhat``, the ``m``-th largest calibration score (the
    usual ``ceil((n + 1) coverage) / n`` quantile). None when ``m <= 0``: too few calibration
    scores, every class is kept.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    m = math.ceil((1.0 - coverage) * (len(s) + 1) - 1e-9) - 1
    if m <= 0:
        return None
    return float(s[len(s) - m])


def fit_sets(
    probs: np.ndarray,
    labels: np.ndarray,
    coverage: float,
    method: str = "aps",
    class_conditional: bool = False,
    raps_lambda: float = 0.01,
    raps_k_reg: int = 1,
) -> ConformalSets:
    """Fit split-conformal sets on calibration probabilities and labels.

    Raises:
        ConformalError: an unknown method, bad probabilities or labels, or fewer calibration
            images than ``1 / (1 - coverage) - 1`` (no finite quantile exists).
    """
    if method not in CONFORMAL_METHODS:
        raise ConformalError(f"conformal.method {method!r} is not one of {CONFORMAL_METHODS}")
    p = _check_probs(probs)
    y = _check_labels(labels, len(p), p.shape[1])
    lam, k_reg = (raps_lambda, raps_k_reg) if method == "raps" else (0.0, 0)
    true_scores = conformal_scores(p, lam, k_reg)[np.arange(len(p)), y]
    qhat = threshold_from_scores(true_scores, coverage)
    if qhat is None:
        need = math.ceil(1.0 / (1.0 - coverage)) - 1
        raise ConformalError(
            f"{len(p)} calibration images cannot give {coverage:.0%} coverage; at least {need} "
            "are needed (a bigger validation split, or a lower conformal.coverage)"
        )
    per_class = [
        threshold_from_scores(true_scores[y == c], coverage) if (y == c).any() else None
        for c in range(p.shape[1])
    ]
    return ConformalSets(method, coverage, qhat, per_class, class_conditional, lam, k_reg)


def crepes_sets(
    cal_probs: np.ndarray, cal_labels: np.ndarray, probs: np.ndarray, sets: ConformalSets
) -> np.ndarray:
    """The same sets from crepes' p-values (non-smoothed), top class added: the reference.

    Class-conditional sets are Mondrian by *candidate* class: the p-value of class ``c`` is
    computed against the calibration images of class ``c`` only (crepes' ``bins``).
    """
    cal = _check_probs(cal_probs)
    y = _check_labels(cal_labels, len(cal), cal.shape[1])
    cal_scores = conformal_scores(cal, sets.raps_lambda, sets.raps_k_reg)[np.arange(len(cal)), y]
    scores = conformal_scores(probs, sets.raps_lambda, sets.raps_k_reg)
    n, k = scores.shape
    if not sets.class_conditional:
        cc = ConformalClassifier().fit(cal_scores)
        member = cc.predict_set(scores, confidence=sets.coverage, smoothing=False).astype(bool)
    else:
        cc = ConformalClassifier().fit(cal_scores, bins=y)
        member = np.ones((n, k), dtype=bool)
        for c in range(k):
            if (y == c).any():
                col = cc.predict_set(
                    scores, bins=np.full(n, c), confidence=sets.coverage, smoothing=False
                )
                member[:, c] = col[:, c].astype(bool)
    member[np.arange(n), np.asarray(probs).argmax(axis=1)] = True
    return member


# --------------------------------------------------------------------------- report


def coverage_report(member: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
    """Empirical coverage overall and per true class, mean set size, share of singletons."""
    y = _check_labels(labels, len(member), member.shape[1])
    hit = member[np.arange(len(y)), y]
    sizes = member.sum(axis=1)
    return {
        "coverage": float(hit.mean()),
        "coverage_per_class": {
            str(c): float(hit[y == i].mean()) for i, c in enumerate(classes) if (y == i).any()
        },
        "mean_set_size": float(sizes.mean()),
        "singleton_rate": float(np.mean(sizes == 1)),
        "n": len(y),
    }


def set_labels(member: np.ndarray, classes: Sequence[str]) -> list[str]:
    """``{MEL, NV}`` per row, classes in the model's order."""
    return [
        "{" + ", ".join(c for c, m in zip(classes, row, strict=True) if m) + "}" for row in member
    ]


def ambiguous(member: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """The referral reason of a set: more than one class, or a malignant class that is not top.

    The second clause is implied by the first (the top class is always in the set); it is
    kept explicit because it is the clinical reason, and holds for any set rule.
    """
    top = np.asarray(probs).argmax(axis=1)
    malignant = np.asarray([c in MALIGNANT for c in classes])
    other_malignant = (member & malignant[None, :]).copy()
    other_malignant[np.arange(len(top)), top] = False
    return (member.sum(axis=1) > 1) | other_malignant.any(axis=1)


def tradeoff(
    cal_probs: np.ndarray,
    cal_labels: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    sets: ConformalSets,
    targets: Sequence[float] = SWEEP,
) -> list[dict[str, float]]:
    """Test coverage and mean set size for each target coverage (refitted on calibration)."""
    rows = []
    for t in targets:
        try:
            fitted = fit_sets(
                cal_probs, cal_labels, float(t), sets.method, sets.class_conditional,
                sets.raps_lambda, sets.raps_k_reg,
            )  # fmt: skip
        except ConformalError:
            continue
        r = coverage_report(fitted.sets(probs), labels, [str(i) for i in range(probs.shape[1])])
        rows.append({"target": float(t), "coverage": r["coverage"], "size": r["mean_set_size"]})
    return rows


def plot_tradeoff(rows: Sequence[Mapping[str, float]], target: float) -> Figure:
    """Empirical coverage and mean set size against the target coverage."""
    fig = Figure(figsize=(7, 3.6), dpi=DPI)
    ax, ax2 = fig.subplots(1, 2)
    t = [r["target"] for r in rows]
    ax.plot(t, [r["coverage"] for r in rows], marker=".", label="test coverage")
    ax.plot([min(t, default=0.5), 1], [min(t, default=0.5), 1], "k--", lw=0.8, label="target")
    ax.axvline(target, color="grey", lw=0.8)
    ax.set_xlabel("target coverage")
    ax.set_ylabel("empirical coverage (test)")
    ax.legend(fontsize=7)
    ax2.plot([r["size"] for r in rows], [r["coverage"] for r in rows], marker=".")
    ax2.set_xlabel("mean set size (test)")
    ax2.set_ylabel("empirical coverage (test)")
    ax2.set_title("coverage / size trade-off", fontsize=9)
    fig.tight_layout()
    return fig


def graph_probabilities(logits: np.ndarray, calibrator: Any) -> np.ndarray:
    """The probabilities the ONNX graph returns for these logits.

    The export bakes only temperature scaling into the graph (T = 1 for the other calibration
    methods), and predict builds its sets from the graph's output, so the sets are fitted on
    exactly those probabilities: otherwise the coverage guarantee would be about numbers
    predict never sees.
    """
    t = calibrator.temperature if calibrator.method == "temperature" else 1.0
    return softmax(np.asarray(logits, dtype=np.float64) / float(t or 1.0))


def read_sets(path: str | Path = SETS_FILE) -> ConformalSets:
    """The conformal stage's fitted sets, as export reads them."""
    import json

    path = Path(path)
    return sets_from_dict(json.loads(path.read_text()), str(path))


def run(p: Params) -> dict:
    """The ``conformal`` stage: fit on validation, report coverage and set size on test."""
    from tasks import tracking
    from tasks.calibrate import read_calibrator
    from tasks.metrics import load_predictions

    c = p.conformal
    val = load_predictions(paths.PREDICTIONS / "val.npz")
    test = load_predictions(paths.PREDICTIONS / "test.npz")
    if list(val["classes"]) != list(test["classes"]):
        raise ConfigError("val and test predictions disagree on the classes; re-run train")
    classes = list(val["classes"])
    calibrator = read_calibrator()
    cal_p = graph_probabilities(val["logits"], calibrator)
    test_p = graph_probabilities(test["logits"], calibrator)
    sets = fit_sets(
        cal_p, val["labels"], c.coverage, c.method, c.class_conditional, c.raps_lambda,
        c.raps_k_reg,
    )  # fmt: skip
    member = sets.sets(test_p)
    reference = crepes_sets(cal_p, val["labels"], test_p, sets)
    report = coverage_report(member, test["labels"], classes)
    metrics = {
        "method": sets.method + (" (class-conditional)" if sets.class_conditional else ""),
        "target_coverage": float(c.coverage),
        "coverage": report["coverage"],
        "coverage_per_class": report["coverage_per_class"],
        "mean_set_size": report["mean_set_size"],
        "qhat": sets.qhat,
        "qhat_per_class": dict(zip(classes, sets.qhat_per_class, strict=True)),
        "singleton_rate": report["singleton_rate"],
        "ambiguous_rate": float(ambiguous(member, test_p, classes).mean()),
        "crepes_agreement": float(np.mean((member == reference).all(axis=1))),
        "n_calibration": len(cal_p),
        "n_test": report["n"],
    }
    rows = tradeoff(cal_p, val["labels"], test_p, test["labels"], sets)
    write_json(SETS_FILE, sets.to_dict())
    write_json(REPORTS / "tradeoff.json", rows)
    save_figure(plot_tradeoff(rows, c.coverage), REPORTS / "tradeoff.png")
    write_json(paths.METRICS / "conformal.json", metrics)
    with tracking.resume_lineage_run():
        tracking.log_ood_conformal(
            "conformal", metrics, {"conformal": REPORTS, "conformal_sets": SETS_FILE}
        )
    console.print(
        f"conformal ({metrics['method']}): test coverage {metrics['coverage']:.1%} "
        f"(target {c.coverage:.0%}), mean set size {metrics['mean_set_size']:.2f}, "
        f"qhat {sets.qhat:.4f}"
    )
    return metrics


if __name__ == "__main__":
    raise SystemExit(main("conformal"))
