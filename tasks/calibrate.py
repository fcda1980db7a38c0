"""Post-hoc calibration, calibration metrics and selective prediction from a model's logits.

A classifier's softmax is usually over-confident after training (Guo et al., 2017, "On
Calibration of Modern Neural Networks"). In a dermatology workflow the confidence is used to
decide which lesions a dermatologist must look at, so it has to mean what it says: a
calibrator is fitted on the *validation* logits (never on test) and judged on the *test*
logits, before and after.

Three calibrators, all fitted by minimising the negative log-likelihood on validation:

- ``temperature``: one scalar T, logits / T. Keeps the argmax (accuracy unchanged) and is what
  the export stage bakes into the ONNX graph.
- ``vector``: a per-class scale w and bias b, logits * w + b (Guo et al.'s vector scaling).
  More flexible; may change the argmax.
- ``isotonic``: per-class one-vs-rest isotonic regression on the softmax probabilities,
  renormalised (Zadrozny & Elkan, 2002). Non-parametric; may change the argmax.

Everything is a pure function of arrays, except :func:`write_outputs`, which writes the stage's
files (atomically, through :mod:`tasks.io` and :func:`tasks.metrics.save_figure`). Metrics that
scikit-learn has (log loss, Brier, accuracy) come from scikit-learn; only the ECE family, which
it lacks, is written here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss

from tasks import paths
from tasks.config import ConfigError, Params
from tasks.io import write_json
from tasks.metrics import DPI, _check_labels, save_figure, softmax
from tasks.stage import console, main

METHODS: tuple[str, ...] = ("temperature", "vector", "isotonic")
# Temperature search interval: wide enough for any real network (T in [0.01, 100]), bounded so
# a degenerate validation set (every case right, or every case wrong) cannot run T to 0 or inf.
LOG_T_BOUNDS: tuple[float, float] = (float(np.log(0.01)), float(np.log(100.0)))
VECTOR_L2 = 1e-4  # pulls w to 1 and b to 0: fixes the softmax's shift freedom in b
ISOTONIC_FLOOR = 1e-6  # smallest class probability isotonic may output (keeps NLL finite)
MAX_CURVE_POINTS = 1000  # risk-coverage rows per stage in the DVC plot file


# --------------------------------------------------------------------------- checks


def _check_logits(logits: Any, labels: Any | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits as finite float64 (n, k), labels (if given) as int64 class indices."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] < 2:
        raise ValueError(f"logits must be 2-D (samples >= 1, classes >= 2), got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(f"logits row {int(bad[0])} is not finite: {x[bad[0]]}")
    y = None if labels is None else _check_labels(labels, x.shape[0], x.shape[1])
    return x, y


def _check_probs(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (n, k) in [0, 1] with rows summing to 1, and matching labels."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(f"probs must be 2-D (samples >= 1, classes >= 2), got shape {p.shape}")
    bad = np.flatnonzero(
        ~np.isfinite(p).all(axis=1)
        | (p < 0).any(axis=1)
        | (p > 1 + 1e-9).any(axis=1)
        | (np.abs(p.sum(axis=1) - 1.0) > 1e-6)
    )
    if bad.size:
        raise ValueError(f"probs row {int(bad[0])} is not a probability vector: {p[bad[0]]}")
    return p, _check_labels(labels, p.shape[0], p.shape[1])


def _check_bins(bins: int) -> int:
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    return int(bins)


# --------------------------------------------------------------------------- calibrators


@dataclass(frozen=True, eq=False)
class Calibrator:
    """A fitted calibrator: maps logits to calibrated probabilities.

    Only the fields of its ``method`` are set: ``temperature`` for temperature scaling,
    ``w`` and ``b`` for vector scaling, ``iso_x`` and ``iso_y`` (per class, the knots of the
    fitted isotonic step function) for isotonic. Everything is plain numbers, so
    :meth:`to_dict` / :func:`calibrator_from_dict` round-trip it through JSON without pickle.
    """

    method: str
    temperature: float | None = None
    w: np.ndarray | None = None
    b: np.ndarray | None = None
    iso_x: tuple[np.ndarray, ...] | None = None
    iso_y: tuple[np.ndarray, ...] | None = None

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (n, k), rows summing to 1."""
        x, _ = _check_logits(logits)
        if self.method == "temperature":
            return softmax(x / self.temperature)
        if self.method == "vector":
            if x.shape[1] != self.w.shape[0]:
                raise ValueError(f"logits have {x.shape[1]} classes, calibrator {len(self.w)}")
            return softmax(x * self.w + self.b)
        if self.method == "isotonic":
            if x.shape[1] != len(self.iso_x):
                raise ValueError(f"logits have {x.shape[1]} classes, calibrator {len(self.iso_x)}")
            return _isotonic_apply(softmax(x), self.iso_x, self.iso_y)
        raise ValueError(f"unknown calibration method {self.method!r}; expected one of {METHODS}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (``calibrator.json``; the export stage reads ``temperature``)."""
        out: dict[str, Any] = {"method": self.method}
        if self.temperature is not None:
            out["temperature"] = float(self.temperature)
        if self.w is not None:
            out["w"] = [float(v) for v in self.w]
            out["b"] = [float(v) for v in self.b]
        if self.iso_x is not None:
            out["isotonic"] = [
                {"x": [float(v) for v in xs], "y": [float(v) for v in ys]}
                for xs, ys in zip(self.iso_x, self.iso_y, strict=True)
            ]
        return out


def calibrator_from_dict(data: Mapping[str, Any]) -> Calibrator:
    """Rebuild a :class:`Calibrator` from :meth:`Calibrator.to_dict` (e.g. ``calibrator.json``)."""
    method = data.get("method")
    if method == "temperature":
        return Calibrator(method, temperature=float(data["temperature"]))
    if method == "vector":
        return Calibrator(
            method, w=np.asarray(data["w"], dtype=np.float64), b=np.asarray(data["b"], np.float64)
        )
    if method == "isotonic":
        knots = data["isotonic"]
        return Calibrator(
            method,
            iso_x=tuple(np.asarray(k["x"], dtype=np.float64) for k in knots),
            iso_y=tuple(np.asarray(k["y"], dtype=np.float64) for k in knots),
        )
    raise ValueError(f"calibrator method {method!r} is not one of {METHODS}")


def _nll_of_logits(x: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of labels under softmax(x), via a stable log-softmax."""
    return float(-log_softmax(x, axis=1)[np.arange(y.shape[0]), y].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fit the temperature T of Guo et al. (2017) by minimising validation NLL of logits / T.

    The search is over log T, which keeps T positive without constraints, with bounded Brent
    (scipy ``minimize_scalar``): the NLL is convex in 1/T, hence unimodal in log T, so a 1-D
    bracketing search finds the optimum without gradients, learning rates or restarts. The
    bounds (:data:`LOG_T_BOUNDS`) only bite on degenerate sets, e.g. every validation case
    right (the NLL keeps falling as T -> 0).

    Args:
        logits: (n, k) validation logits.
        labels: (n,) true class indices.

    Returns:
        The temperature T > 0; calibrated probabilities are ``softmax(logits / T)``.
    """
    x, y = _check_logits(logits, labels)
    res = minimize_scalar(
        lambda log_t: _nll_of_logits(x / np.exp(log_t), y),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(res.x))


def fit_vector_scaling(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit vector scaling (Guo et al., 2017): per-class scale w and bias b, ``logits * w + b``.

    Minimises validation NLL plus a tiny L2 penalty ``VECTOR_L2 * (|w - 1|^2 + |b|^2)`` with
    L-BFGS and the exact gradient. The penalty makes the problem well-posed: softmax ignores a
    common shift of b, and a class absent from validation would otherwise have its bias pushed
    to minus infinity. It starts at the identity (w = 1, b = 0).

    Args:
        logits: (n, k) validation logits.
        labels: (n,) true class indices.

    Returns:
        ``(w, b)``, each a float64 array of shape (k,).
    """
    x, y = _check_logits(logits, labels)
    n, k = x.shape
    onehot = np.eye(k)[y]

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:k], theta[k:]
        logp = log_softmax(x * w + b, axis=1)
        loss = -(logp * onehot).sum() / n + VECTOR_L2 * (((w - 1.0) ** 2).sum() + (b**2).sum())
        g = (np.exp(logp) - onehot) / n
        grad_w = (g * x).sum(axis=0) + 2.0 * VECTOR_L2 * (w - 1.0)
        grad_b = g.sum(axis=0) + 2.0 * VECTOR_L2 * b
        return float(loss), np.concatenate([grad_w, grad_b])

    theta0 = np.concatenate([np.ones(k), np.zeros(k)])
    res = minimize(loss_and_grad, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return res.x[:k].copy(), res.x[k:].copy()


def fit_isotonic(
    logits: np.ndarray, labels: np.ndarray
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Fit one-vs-rest isotonic regression per class on the softmax probabilities.

    Each class c gets a monotone map p_c -> P(y = c | p_c) (scikit-learn
    ``IsotonicRegression``, clipped outside the fitted range). Only its knots are kept, since
    ``IsotonicRegression.predict`` is linear interpolation between them: that makes the
    calibrator JSON-serialisable.

    Note that the per-class maps are fitted independently, so after renormalisation the argmax
    (and hence accuracy) can change, and many inputs share a step, so confidences tie.

    Returns:
        ``(xs, ys)``: per class, the increasing knot inputs and their fitted outputs.
    """
    x, y = _check_logits(logits, labels)
    p = softmax(x)
    xs, ys = [], []
    for c in range(x.shape[1]):
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(p[:, c], (y == c).astype(np.float64))
        xs.append(np.asarray(iso.X_thresholds_, dtype=np.float64))
        ys.append(np.asarray(iso.y_thresholds_, dtype=np.float64))
    return tuple(xs), tuple(ys)


def _isotonic_apply(
    p: np.ndarray, xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]
) -> np.ndarray:
    """Map each class column through its isotonic knots, floor, renormalise.

    The floor (:data:`ISOTONIC_FLOOR`) matters: isotonic regression outputs exactly 0 below
    the smallest validation positive, and one test lesion of that class would make the NLL
    infinite. It also keeps a row that every class maps to 0 defined (it becomes uniform).
    """
    q = np.column_stack([np.interp(p[:, c], xs[c], ys[c]) for c in range(p.shape[1])])
    q = np.maximum(q, ISOTONIC_FLOOR)
    return q / q.sum(axis=1, keepdims=True)


def fit_calibrator(method: str, logits: np.ndarray, labels: np.ndarray) -> Calibrator:
    """Fit the calibrator named by ``method`` (temperature | vector | isotonic) on validation.

    Raises:
        ValueError: for an unknown method, or logits and labels that do not fit together.
    """
    if method == "temperature":
        return Calibrator(method, temperature=fit_temperature(logits, labels))
    if method == "vector":
        w, b = fit_vector_scaling(logits, labels)
        return Calibrator(method, w=w, b=b)
    if method == "isotonic":
        xs, ys = fit_isotonic(logits, labels)
        return Calibrator(method, iso_x=xs, iso_y=ys)
    raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")


# --------------------------------------------------------------------------- metrics
# The ECE family is hand-written: scikit-learn has calibration_curve (binary only) but no ECE.


def _bin_index(values: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin of each value in [0, 1]: bin i is (i/bins, (i+1)/bins], 0 in bin 0."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.searchsorted(edges[1:-1], values, side="left")


def _binned_gaps(
    values: np.ndarray, outcomes: np.ndarray, index: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: count, mean value (confidence), mean outcome (accuracy); NaN means when empty."""
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    sum_v = np.bincount(index, weights=values, minlength=bins)
    sum_o = np.bincount(index, weights=outcomes.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts, sum_v / counts, sum_o / counts


def _ece(values: np.ndarray, outcomes: np.ndarray, index: np.ndarray, bins: int) -> float:
    counts, conf, acc = _binned_gaps(values, outcomes, index, bins)
    full = counts > 0
    return float((counts[full] / counts.sum() * np.abs(acc[full] - conf[full])).sum())


def _top_label(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confidence (max probability) and correctness of the argmax, per sample."""
    return probs.max(axis=1), (probs.argmax(axis=1) == labels)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Top-label ECE (Naeini et al., 2015; Guo et al., 2017) with equal-width bins.

    ``sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|`` over the non-empty bins of the
    max probability; bin i is ``(i/bins, (i+1)/bins]``. Hand-written: scikit-learn has none.
    """
    p, y = _check_probs(probs, labels)
    bins = _check_bins(bins)
    conf, correct = _top_label(p, y)
    return _ece(conf, correct, _bin_index(conf, bins), bins)


def maximum_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Top-label MCE: the largest |accuracy - confidence| over the non-empty equal-width bins.

    The worst case matters where a confidence band drives a decision (e.g. "refer below 0.8").
    Hand-written: scikit-learn has none.
    """
    p, y = _check_probs(probs, labels)
    bins = _check_bins(bins)
    conf, correct = _top_label(p, y)
    counts, mean_conf, acc = _binned_gaps(conf, correct, _bin_index(conf, bins), bins)
    full = counts > 0
    return float(np.abs(acc[full] - mean_conf[full]).max())


def adaptive_ece(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Top-label ECE with equal-mass bins (Nguyen & O'Connor, 2015; Nixon et al., 2019).

    Samples are sorted by confidence and split into ``bins`` groups of (nearly) equal size
    (``np.array_split``), so a confident model's crowded top bin does not hide the spread of
    the sparse low-confidence bins. Ties are broken by a stable sort. Hand-written.
    """
    p, y = _check_probs(probs, labels)
    bins = _check_bins(bins)
    conf, correct = _top_label(p, y)
    order = np.argsort(conf, kind="stable")
    n = conf.shape[0]
    total = 0.0
    for group in np.array_split(order, bins):
        if group.size:
            total += group.size / n * abs(correct[group].mean() - conf[group].mean())
    return float(total)


def classwise_ece(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Class-wise ECE (Kull et al., 2019): mean over all classes of the ECE of p_c vs 1[y = c].

    Top-label ECE only looks at the winning class; class-wise ECE also checks the probability
    given to, say, melanoma when the model says naevus, which is what a referral rule on
    P(melanoma) would rely on. Equal-width bins per class. Hand-written.
    """
    p, y = _check_probs(probs, labels)
    bins = _check_bins(bins)
    eces = [_ece(p[:, c], y == c, _bin_index(p[:, c], bins), bins) for c in range(p.shape[1])]
    return float(np.mean(eces))


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multiclass Brier score: mean over samples of ``sum_c (p_c - 1[y = c])^2``, in [0, 2].

    scikit-learn's ``brier_score_loss`` with ``scale_by_half=False`` (the unscaled multiclass
    form, also for two classes, so the number means the same whatever the class count).
    """
    p, y = _check_probs(probs, labels)
    return float(brier_score_loss(y, p, labels=list(range(p.shape[1])), scale_by_half=False))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (scikit-learn ``log_loss``)."""
    p, y = _check_probs(probs, labels)
    return float(log_loss(y, p, labels=list(range(p.shape[1]))))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose argmax is the true class (scikit-learn ``accuracy_score``)."""
    p, y = _check_probs(probs, labels)
    return float(accuracy_score(y, p.argmax(axis=1)))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int) -> list[dict[str, Any]]:
    """The data behind a reliability diagram: one row per equal-width confidence bin.

    Every bin is listed, so diagrams of different models line up; an empty bin has count 0 and
    ``confidence`` / ``accuracy`` None (JSON null) rather than NaN.

    Returns:
        Rows ``{lower, upper, count, confidence, accuracy}`` (confidence = mean max probability
        in the bin, accuracy = share of its argmaxes that are right), lowest bin first.
    """
    p, y = _check_probs(probs, labels)
    bins = _check_bins(bins)
    conf, correct = _top_label(p, y)
    counts, mean_conf, acc = _binned_gaps(conf, correct, _bin_index(conf, bins), bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    return [
        {
            "lower": float(edges[i]),
            "upper": float(edges[i + 1]),
            "count": int(counts[i]),
            "confidence": float(mean_conf[i]) if counts[i] else None,
            "accuracy": float(acc[i]) if counts[i] else None,
        }
        for i in range(bins)
    ]


def _ece_from_bins(rows: Sequence[Mapping[str, Any]]) -> float:
    n = sum(r["count"] for r in rows)
    return float(
        sum(r["count"] / n * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"])
    )


def calibration_report(probs: np.ndarray, labels: np.ndarray, bins: int) -> dict[str, Any]:
    """Every calibration metric of one set of probabilities, JSON-ready.

    Returns:
        ``ece, mce, adaptive_ece, classwise_ece, brier, nll, accuracy, mean_confidence,
        n_samples`` and ``reliability`` (the rows of :func:`reliability_bins`).
    """
    p, y = _check_probs(probs, labels)
    return {
        "ece": expected_calibration_error(p, y, bins),
        "mce": maximum_calibration_error(p, y, bins),
        "adaptive_ece": adaptive_ece(p, y, bins),
        "classwise_ece": classwise_ece(p, y, bins),
        "brier": brier_score(p, y),
        "nll": nll(p, y),
        "accuracy": accuracy(p, y),
        "mean_confidence": float(p.max(axis=1).mean()),
        "n_samples": int(y.shape[0]),
        "reliability": reliability_bins(p, y, bins),
    }


# --------------------------------------------------------------------------- selective prediction


def risk_coverage(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Risk-coverage curve of the rule "keep a case if its max probability >= t, else refer".

    One point per distinct confidence t (so tied cases are kept or referred together, as the
    rule does): coverage = share kept, risk = error rate among the kept. Points run from the
    lowest threshold (coverage 1) to the highest (smallest coverage), so coverage decreases.

    AURC (Geifman et al., 2019) is the area under risk over coverage as a step function,
    ``sum_j (coverage_j - coverage_{j+1}) * risk_j``; without ties it equals the usual mean
    of the risk over the n top-k prefixes. Lower is better: confident cases are the right ones.

    Returns:
        ``coverage``, ``risk``, ``thresholds`` (float64 arrays, same length) and ``aurc``.
    """
    p, y = _check_probs(probs, labels)
    conf, correct = _top_label(p, y)
    order = np.argsort(-conf, kind="stable")
    conf_sorted, errors = conf[order], np.cumsum(~correct[order])
    n = conf.shape[0]
    # Last position of each run of equal confidence: the rule keeps the whole run or none of it.
    ends = np.flatnonzero(np.append(conf_sorted[1:] != conf_sorted[:-1], True))
    kept = ends + 1
    coverage = kept / n
    risk = errors[ends] / kept
    thresholds = conf_sorted[ends]
    widths = np.diff(np.concatenate([[0.0], coverage]))
    aurc = float((widths * risk).sum())
    return {
        "coverage": coverage[::-1].copy(),
        "risk": risk[::-1].copy(),
        "thresholds": thresholds[::-1].copy(),
        "aurc": aurc,
    }


def apply_referral_threshold(
    probs: np.ndarray, labels: np.ndarray, threshold: float
) -> dict[str, Any]:
    """Keep the cases with max probability >= ``threshold``; measure what that gives.

    Returns:
        ``coverage`` (share kept), ``referred_fraction`` (1 - coverage), ``accuracy`` among the
        kept (None when nothing is kept: the accuracy of no cases is undefined) and ``n_kept``.
    """
    p, y = _check_probs(probs, labels)
    conf, correct = _top_label(p, y)
    keep = conf >= threshold
    n_kept = int(keep.sum())
    coverage = n_kept / y.shape[0]
    return {
        "coverage": float(coverage),
        "referred_fraction": float(1.0 - coverage),
        "accuracy": float(correct[keep].mean()) if n_kept else None,
        "n_kept": n_kept,
    }


def referral_threshold(
    probs: np.ndarray, labels: np.ndarray, target_accuracy: float
) -> dict[str, Any]:
    """The confidence threshold above which the model decides and below which it refers.

    Picks the smallest threshold t (one of the observed confidences) such that the cases with
    max probability >= t reach ``target_accuracy``; accuracy is not monotone in t, so this is
    the largest coverage that reaches the target, not the first t met on the way down.

    When no threshold reaches the target, that is reported, never papered over:
    ``reachable`` is False and ``threshold`` is 1.0 (refer (almost) everything), with the
    coverage and accuracy that 1.0 actually gives.

    Args:
        probs: (n, k) probabilities, calibrated ones for a threshold that means something.
        labels: (n,) true class indices.
        target_accuracy: accuracy the kept cases must reach, in (0, 1].

    Returns:
        ``threshold, coverage, accuracy, referred_fraction, n_kept, reachable,
        target_accuracy``.
    """
    if not 0.0 < target_accuracy <= 1.0:
        raise ValueError(f"target_accuracy must be in (0, 1], got {target_accuracy}")
    p, y = _check_probs(probs, labels)
    rc = risk_coverage(p, y)
    # A tiny tolerance so a target met exactly (e.g. 19/20 = 0.95) is not lost to rounding.
    ok = np.flatnonzero(1.0 - rc["risk"] >= target_accuracy - 1e-12)
    reachable = bool(ok.size)
    threshold = float(rc["thresholds"][ok[0]]) if reachable else 1.0
    return {
        "threshold": threshold,
        **apply_referral_threshold(p, y, threshold),
        "reachable": reachable,
        "target_accuracy": float(target_accuracy),
    }


# --------------------------------------------------------------------------- pictures


def _reliability_panel(ax: Any, rows: Sequence[Mapping[str, Any]], name: str) -> None:
    full = [r for r in rows if r["count"]]
    width = rows[0]["upper"] - rows[0]["lower"] if rows else 0.1
    centers = [(r["lower"] + r["upper"]) / 2 for r in full]
    acc = [r["accuracy"] for r in full]
    conf = [r["confidence"] for r in full]
    ax.bar(centers, acc, width=width, color="tab:blue", edgecolor="black", lw=0.6, label="accuracy")
    ax.bar(
        centers,
        [c - a for c, a in zip(conf, acc, strict=True)],
        bottom=acc,
        width=width,
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        lw=0.6,
        label="gap to confidence",
    )
    for x, a, c, r in zip(centers, acc, conf, full, strict=True):
        ax.text(x, max(a, c) + 0.01, str(r["count"]), ha="center", va="bottom", fontsize=7)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1.0, label="perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.08)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{name}: ECE = {_ece_from_bins(rows):.4f}" if full else f"{name}: no samples")
    ax.legend(loc="upper left", fontsize=8)


def plot_reliability(
    before_bins: Sequence[Mapping[str, Any]],
    after_bins: Sequence[Mapping[str, Any]],
    title: str = "Reliability (test)",
) -> Figure:
    """Side-by-side reliability diagrams, before and after calibration.

    Bars are the accuracy per confidence bin, the hatched part the gap up (or down) to the mean
    confidence, numbers above the bars the bin counts (a big gap in a bin of 3 means little),
    the dashed diagonal perfect calibration; the ECE is in each panel's title.

    Args:
        before_bins: :func:`reliability_bins` rows of the raw softmax.
        after_bins: the same for the calibrated probabilities.
        title: figure title.
    """
    fig = Figure(figsize=(11.0, 5.4), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    _reliability_panel(left, before_bins, "before")
    _reliability_panel(right, after_bins, "after")
    fig.suptitle(title)
    return fig


def plot_confidence_histogram(
    probs_before: np.ndarray, probs_after: np.ndarray, labels: np.ndarray
) -> Figure:
    """Histograms of the max probability, right vs wrong cases, before and after calibration.

    Well-calibrated wrong predictions sit at low confidence; an over-confident model piles
    them up near 1 with the right ones, where no referral threshold can separate them.
    """
    pb, y = _check_probs(probs_before, labels)
    pa, _ = _check_probs(probs_after, labels)
    fig = Figure(figsize=(11.0, 4.2), dpi=DPI, layout="constrained")
    edges = np.linspace(0.0, 1.0, 21)
    panels = zip(fig.subplots(1, 2, sharey=True), (pb, pa), ("before", "after"), strict=True)
    for ax, p, name in panels:
        conf, correct = _top_label(p, y)
        ax.hist(conf[correct], bins=edges, color="tab:green", alpha=0.6, label="correct")
        ax.hist(conf[~correct], bins=edges, color="tab:red", alpha=0.6, label="wrong")
        ax.axvline(conf.mean(), color="black", ls="--", lw=1.0, label=f"mean = {conf.mean():.3f}")
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("confidence (max probability)")
        ax.set_title(f"{name}: accuracy = {correct.mean():.3f}")
        ax.legend(loc="upper left", fontsize=8)
    fig.axes[0].set_ylabel("cases")
    return fig


def plot_risk_coverage(
    rc_before: Mapping[str, Any],
    rc_after: Mapping[str, Any],
    threshold_info: Mapping[str, Any] | None = None,
) -> Figure:
    """Risk (error rate of the kept cases) over coverage, before and after calibration.

    Args:
        rc_before: :func:`risk_coverage` of the raw softmax.
        rc_after: the same for the calibrated probabilities.
        threshold_info: a referral dict (``threshold``, ``coverage``, ``accuracy``,
            ``target_accuracy``, ``reachable``); its operating point is marked on the
            calibrated curve and the target risk drawn as a line.
    """
    fig = Figure(figsize=(6.5, 5.0), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for rc, name, color in ((rc_before, "before", "tab:grey"), (rc_after, "after", "tab:blue")):
        ax.step(
            rc["coverage"],
            rc["risk"],
            where="post",
            color=color,
            lw=1.6,
            label=f"{name} (AURC = {rc['aurc']:.4f})",
        )
    if threshold_info is not None:
        target = threshold_info.get("target_accuracy")
        if target is not None:
            ax.axhline(1.0 - target, color="tab:red", ls=":", lw=1.0, label="target risk")
        if threshold_info.get("accuracy") is not None:
            note = "" if threshold_info.get("reachable", True) else " (target unreachable)"
            ax.plot(
                [threshold_info["coverage"]],
                [1.0 - threshold_info["accuracy"]],
                marker="o",
                ms=9,
                color="tab:red",
                ls="none",
                label=f"threshold {threshold_info['threshold']:.3f}{note}",
            )
    ax.set_xlim(0.0, 1.02)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("coverage (share decided by the model)")
    ax.set_ylabel("risk (error rate of the kept cases)")
    ax.set_title("Risk-coverage: refer the least confident cases")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return fig


# --------------------------------------------------------------------------- orchestration


@dataclass(frozen=True, eq=False)
class CalibrationResult:
    """What :func:`calibrate` found; :func:`write_outputs` turns it into the stage's files.

    ``before`` / ``after`` are :func:`calibration_report` dicts on TEST (raw softmax vs
    calibrated). ``referral`` is the threshold chosen on VALIDATION calibrated probabilities
    (``threshold``, ``reachable``, ``target_accuracy``, ``val_coverage``, ``val_accuracy``)
    and what it gives on TEST (``coverage``, ``accuracy``, ``referred_fraction``, ``n_kept``).
    """

    calibrator: Calibrator
    before: dict[str, Any]
    after: dict[str, Any]
    referral: dict[str, Any]
    risk_coverage_before: dict[str, Any]
    risk_coverage_after: dict[str, Any]
    probs_before: np.ndarray
    probs_after: np.ndarray
    labels: np.ndarray

    @property
    def bins_before(self) -> list[dict[str, Any]]:
        return self.before["reliability"]

    @property
    def bins_after(self) -> list[dict[str, Any]]:
        return self.after["reliability"]


def calibrate(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    method: str,
    bins: int,
    target_accuracy: float,
) -> CalibrationResult:
    """Fit a calibrator on validation, judge it on test, and choose the referral threshold.

    The threshold is chosen on the calibrated *validation* probabilities and only measured on
    test, so the test coverage and accuracy are an honest estimate of what the rule does on new
    lesions. (The calibrator was fitted on the same validation cases, which makes the threshold
    a little optimistic, most of all for isotonic; the test numbers show by how much.)

    Args:
        val_logits, val_labels: validation logits (n, k) and labels, to fit on.
        test_logits, test_labels: test logits (m, k) and labels, to judge on.
        method: temperature | vector | isotonic.
        bins: equal-width bins for ECE, MCE, class-wise ECE and the reliability diagrams
            (also the number of equal-mass bins of the adaptive ECE).
        target_accuracy: accuracy the cases the model keeps must reach.
    """
    xv, yv = _check_logits(val_logits, val_labels)
    xt, yt = _check_logits(test_logits, test_labels)
    if xv.shape[1] != xt.shape[1]:
        raise ValueError(f"validation has {xv.shape[1]} classes but test has {xt.shape[1]}")
    _check_bins(bins)
    calibrator = fit_calibrator(method, xv, yv)
    before_p, after_p = softmax(xt), calibrator.probabilities(xt)
    chosen = referral_threshold(calibrator.probabilities(xv), yv, target_accuracy)
    on_test = apply_referral_threshold(after_p, yt, chosen["threshold"])
    referral = {
        "threshold": chosen["threshold"],
        "reachable": chosen["reachable"],
        "target_accuracy": chosen["target_accuracy"],
        "val_coverage": chosen["coverage"],
        "val_accuracy": chosen["accuracy"],
        **on_test,
    }
    return CalibrationResult(
        calibrator=calibrator,
        before=calibration_report(before_p, yt, bins),
        after=calibration_report(after_p, yt, bins),
        referral=referral,
        risk_coverage_before=risk_coverage(before_p, yt),
        risk_coverage_after=risk_coverage(after_p, yt),
        probs_before=before_p,
        probs_after=after_p,
        labels=yt,
    )


REPORT_KEYS: tuple[str, ...] = (
    "ece",
    "mce",
    "adaptive_ece",
    "classwise_ece",
    "brier",
    "nll",
    "accuracy",
    "mean_confidence",
)


def flat_calibration_metrics(result: CalibrationResult) -> dict[str, float]:
    """The scalar results as one flat ``{name: float}`` for MLflow and ``dvc metrics``.

    ``test_{metric}_{before|after}`` for every metric of :data:`REPORT_KEYS`, ``aurc_*``,
    ``referral_*`` (``referral_reachable`` as 1.0 / 0.0) and, for temperature scaling,
    ``temperature``. Undefined values (the test accuracy when the threshold keeps no case) are
    left out rather than logged as NaN, as in :func:`tasks.metrics.flat_metrics`.
    """
    flat: dict[str, float] = {}
    for stage, report in (("before", result.before), ("after", result.after)):
        for key in REPORT_KEYS:
            flat[f"test_{key}_{stage}"] = float(report[key])
    flat["aurc_before"] = float(result.risk_coverage_before["aurc"])
    flat["aurc_after"] = float(result.risk_coverage_after["aurc"])
    if result.calibrator.temperature is not None:
        flat["temperature"] = float(result.calibrator.temperature)
    ref = result.referral
    flat["referral_threshold"] = float(ref["threshold"])
    flat["referral_reachable"] = 1.0 if ref["reachable"] else 0.0
    for key in ("coverage", "accuracy", "referred_fraction", "val_coverage", "val_accuracy"):
        if ref[key] is not None:
            flat[f"referral_{key}"] = float(ref[key])
    return {k: v for k, v in flat.items() if np.isfinite(v)}


def _thin(n: int, max_points: int = MAX_CURVE_POINTS) -> np.ndarray:
    """At most ``max_points`` evenly spread indices of ``range(n)``, always both ends."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(int))


def write_outputs(result: CalibrationResult, out_dir: str | Path) -> dict[str, float]:
    """Write the calibrate stage's files into ``out_dir`` (each atomically).

    Files: ``reliability.png``, ``confidence_histogram.png``, ``risk_coverage.png``;
    ``reliability.json`` (DVC plot rows ``{bin_center, accuracy, confidence, count, stage}``,
    non-empty bins only), ``risk_coverage.json`` (rows ``{coverage, risk, stage}``, at most
    :data:`MAX_CURVE_POINTS` per stage), ``calibrator.json`` (:meth:`Calibrator.to_dict`) and
    ``calibration_report.json`` (the full before / after reports and the referral).

    Returns:
        The flat scalar metrics of :func:`flat_calibration_metrics`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_figure(plot_reliability(result.bins_before, result.bins_after), out / "reliability.png")
    save_figure(
        plot_confidence_histogram(result.probs_before, result.probs_after, result.labels),
        out / "confidence_histogram.png",
    )
    save_figure(
        plot_risk_coverage(
            result.risk_coverage_before, result.risk_coverage_after, result.referral
        ),
        out / "risk_coverage.png",
    )
    reliability_rows = [
        {
            "bin_center": (r["lower"] + r["upper"]) / 2,
            "accuracy": r["accuracy"],
            "confidence": r["confidence"],
            "count": r["count"],
            "stage": stage,
        }
        for stage, rows in (("before", result.bins_before), ("after", result.bins_after))
        for r in rows
        if r["count"]
    ]
    write_json(out / "reliability.json", reliability_rows)
    rc_rows = []
    for stage, rc in (
        ("before", result.risk_coverage_before),
        ("after", result.risk_coverage_after),
    ):
        idx = _thin(len(rc["coverage"]))
        rc_rows.extend(
            {"coverage": float(rc["coverage"][i]), "risk": float(rc["risk"][i]), "stage": stage}
            for i in idx
        )
    write_json(out / "risk_coverage.json", rc_rows)
    write_json(out / "calibrator.json", result.calibrator.to_dict())
    write_json(
        out / "calibration_report.json",
        {"before": result.before, "after": result.after, "referral": result.referral},
    )
    return flat_calibration_metrics(result)


def read_calibrator(out_dir: str | Path = paths.CALIBRATION) -> Calibrator:
    """The calibrate stage's fitted calibrator, as export and explain read it."""
    import json

    return calibrator_from_dict(json.loads((Path(out_dir) / "calibrator.json").read_text()))


def run(p: Params) -> dict:
    """The ``calibrate`` stage: fit on validation logits, measure on test, set the referral."""
    from tasks import tracking
    from tasks.metrics import load_predictions

    val = load_predictions(paths.PREDICTIONS / "val.npz")
    test = load_predictions(paths.PREDICTIONS / "test.npz")
    if list(val["classes"]) != list(test["classes"]):
        raise ConfigError("val and test predictions disagree on the classes; re-run train")
    c = p.calibrate
    result = calibrate(
        val["logits"], val["labels"], test["logits"], test["labels"], c.method, c.bins,
        c.target_accuracy,
    )  # fmt: skip
    metrics = write_outputs(result, paths.CALIBRATION)
    write_json(paths.METRICS / "calibrate.json", metrics)
    with tracking.resume_lineage_run():
        tracking.log_metrics(metrics)
        tracking.log_artifacts({"calibrate": paths.CALIBRATION})
    r = result.referral
    console.print(
        f"calibrate ({c.method}): test ECE {metrics['test_ece_before']:.3f} -> "
        f"{metrics['test_ece_after']:.3f}, NLL {metrics['test_nll_before']:.3f} -> "
        f"{metrics['test_nll_after']:.3f}; refer below confidence {r['threshold']:.3f} "
        f"({'reaches' if r['reachable'] else 'cannot reach'} {c.target_accuracy:.0%} "
        f"on validation; keeps {r['coverage']:.0%} of test cases)"
    )
    return metrics


if __name__ == "__main__":
    raise SystemExit(main("calibrate"))
