"""The promotion gate: does the new model replace the current champion?

Stored test metrics are not comparable: each model was tested on the split of its own day (or
of another dataset altogether). So the gate scores the champion again, on the candidate's
current test images, and compares the two on the very same images: balanced accuracy (the
ISIC metric) and calibrated ECE, each model with its own calibrator. A difference on one test
split is partly luck, so the gain must also be significant: a paired bootstrap over the test
images gives its confidence interval and a one-sided p-value, and the exact McNemar test on the
images where exactly one model is right is reported beside it.

Everything here is a pure function of arrays and files; the flow (``flows/pipeline.py``)
fetches the champion from the registry and records the verdict through ``tasks/tracking.py``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import balanced_accuracy_score

from tasks import paths
from tasks.calibrate import Calibrator, calibrator_from_dict, expected_calibration_error
from tasks.config import GateConfig
from tasks.metrics import classification_metrics, load_predictions
from tasks.prepare import PreparedSplit, open_split

if TYPE_CHECKING:
    from torch import nn

BATCH_SIZE = 64  # champion images per forward pass


class Incomparable(ValueError):
    """The champion cannot be scored on the candidate's test split (other classes or inputs)."""


@dataclass(frozen=True, eq=False)
class Candidate:
    """The candidate's evidence: its test logits and calibrator, on the current test split.

    Attributes:
        split: the prepared test images, labels and classes (the rows of ``logits``).
        logits: the candidate's test logits (``data/predictions/test.npz``).
        calibrator: the candidate's calibrator (``reports/calibrate/calibrator.json``).
        version: content hash of the test split file, naming the test set both are scored on.
    """

    split: PreparedSplit
    logits: np.ndarray
    calibrator: Calibrator
    version: str

    @property
    def labels(self) -> np.ndarray:
        return self.split.labels

    @property
    def classes(self) -> list[str]:
        return self.split.classes


@dataclass(frozen=True, eq=False)
class Score:
    """One model on the test split: balanced accuracy, calibrated ECE, per-image predictions."""

    balanced_accuracy: float
    ece: float
    predicted: np.ndarray


@dataclass(frozen=True)
class Significance:
    """Paired bootstrap of the balanced-accuracy gain (candidate - champion).

    Attributes:
        gain: the gain on the whole test split.
        ci_low: lower end of the two-sided percentile interval at ``confidence``.
        ci_high: upper end of that interval.
        p_value: one-sided bootstrap p-value of ``gain <= min_gain``.
        confidence: the interval's level.
        resamples: bootstrap resamples drawn.
    """

    gain: float
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float
    resamples: int


@dataclass(frozen=True)
class Decision:
    """The verdict, with a reason a person can read and the significance behind it."""

    promote: bool
    reason: str
    significance: Significance | None = None
    mcnemar_p_value: float | None = None


def file_version(path: str | Path) -> str:
    """A short content hash of one file (as the train stage's ``data_version``)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def load_candidate(repo: str | Path = ".") -> Candidate:
    """Read the candidate's test logits and calibrator, checked against the prepared test split.

    Raises:
        ValueError: the predictions are not of the current test split (re-run train), named.
    """
    root = Path(repo)
    predictions_file = root / paths.PREDICTIONS / "test.npz"
    predictions = load_predictions(predictions_file)
    split = open_split(root / paths.PREPARED, "test")
    ids = split.rows["image_id"].astype(str).to_numpy()
    if predictions["classes"] != split.classes or not np.array_equal(predictions["image_ids"], ids):
        raise ValueError(
            f"{predictions_file}: not the predictions of the current test split "
            f"{root / paths.PREPARED} (other images or classes); re-run the train stage"
        )
    calibrator = json.loads((root / paths.CALIBRATION / "calibrator.json").read_text())
    return Candidate(
        split=split,
        logits=predictions["logits"],
        calibrator=calibrator_from_dict(calibrator),
        version=file_version(root / paths.SPLITS / "test.parquet"),
    )


def score(
    logits: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    calibrator: Calibrator,
    bins: int,
) -> Score:
    """Score one model's test logits as the train and calibrate stages score their own.

    Balanced accuracy is of the raw argmax (as the stored ``test_balanced_accuracy``); ECE is of
    the model's own calibrated probabilities (as ``test_ece_after``).
    """
    metrics = classification_metrics(logits, labels, classes)
    ece = expected_calibration_error(calibrator.probabilities(logits), labels, bins)
    return Score(metrics["balanced_accuracy"], ece, np.asarray(logits).argmax(axis=1))


def class_mismatch(candidate: Sequence[str], champion: Sequence[str] | None) -> str | None:
    """Why two models cannot be compared, naming both class lists; None when they can.

    Class order matters as much as the names: logit column i must mean the same class. None
    for ``champion`` (classes unknown) is no reason to refuse.
    """
    if champion is None or list(candidate) == list(champion):
        return None
    return (
        f"the champion predicts {list(champion)} but the candidate predicts {list(candidate)}: "
        "another task (dataset or label set); register it under its own model name"
    )


def model_logits(
    model: nn.Module, meta: dict[str, Any], split: PreparedSplit, batch_size: int = BATCH_SIZE
) -> np.ndarray:
    """A loaded bundle's logits over a prepared split, as the train stage scores its test split.

    Args:
        model: from :func:`tasks.models.load_bundle`.
        meta: its bundle facts (classes, input size, normalisation, fusion sites).
        split: the prepared split to score.
        batch_size: images per forward pass.

    Raises:
        Incomparable: other classes, input size or normalisation than the split's cache.
    """
    from torch.utils.data import DataLoader

    from tasks.fusion import metadata_features, prior_from_meta
    from tasks.models import eval_mode
    from tasks.train import MEAN, STD, CachedImages, pick_device, predict_logits

    reason = class_mismatch(split.classes, meta["classes"])
    if reason:
        raise Incomparable(reason)
    size = meta["input_size"] if isinstance(meta["input_size"], int) else meta["input_size"][0]
    if size != split.images.shape[1]:
        raise Incomparable(
            f"it takes {size} px images, the test cache is {split.images.shape[1]} px"
        )
    norm = meta["normalization"]
    if not (np.allclose(norm["mean"], MEAN) and np.allclose(norm["std"], STD)):
        raise Incomparable(f"it was trained with another normalisation ({norm})")
    sites = (meta.get("extra") or {}).get("metadata_sites") if meta.get("fusion") else None
    metadata = None if sites is None else metadata_features(split.rows, sites)
    loader = DataLoader(CachedImages(split, metadata), batch_size=batch_size, shuffle=False)
    device = pick_device("auto")
    with eval_mode(model.to(device)) as scoring:
        logits, _ = predict_logits(scoring, loader, device)
    prior = prior_from_meta(meta.get("extra"))  # the model's answer includes its metadata prior
    return logits if prior is None else logits + prior.log_odds(split.rows)


def paired_bootstrap(
    labels: np.ndarray,
    candidate: np.ndarray,
    champion: np.ndarray,
    min_gain: float,
    confidence: float,
    resamples: int,
    seed: int,
) -> Significance:
    """Is the candidate's balanced-accuracy gain over the champion more than luck?

    Both models are scored on the same resampled images (a paired bootstrap), so the test
    split's difficulty cancels and only their disagreements count. The p-value is the share of
    resampled gains at or below ``min_gain``, counted with the observed split as one more
    resample (``(1 + #) / (1 + resamples)``), so it is never 0 and it falls as the gain grows.

    Args:
        labels: true class indices of the test images.
        candidate: the candidate's predicted class per image.
        champion: the champion's predicted class per image (same images, same order).
        min_gain: the gain that must be exceeded.
        confidence: level of the reported interval (e.g. 0.95).
        resamples: bootstrap resamples.
        seed: RNG seed: the same inputs give the same interval and p-value.
    """
    y, new, old = (np.asarray(a) for a in (labels, candidate, champion))
    if not (y.shape == new.shape == old.shape and y.ndim == 1 and y.size):
        raise ValueError(
            f"labels and predictions must be equal 1-D arrays: {y.shape}, {new.shape}, {old.shape}"
        )
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(
            f"confidence must be in (0, 1) and resamples >= 1: {confidence}, {resamples}"
        )
    index = np.random.default_rng(seed).integers(0, y.size, size=(resamples, y.size))
    with warnings.catch_warnings():
        # A resample may lack a class one model predicts; sklearn averages over those present.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        gains = np.array(
            [
                balanced_accuracy_score(y[i], new[i]) - balanced_accuracy_score(y[i], old[i])
                for i in index
            ]
        )
        gain = balanced_accuracy_score(y, new) - balanced_accuracy_score(y, old)
    tail = (1 - confidence) / 2
    low, high = np.quantile(gains, [tail, 1 - tail])
    p_value = (1 + np.count_nonzero(gains <= min_gain)) / (1 + resamples)
    return Significance(float(gain), float(low), float(high), float(p_value), confidence, resamples)


def mcnemar_p_value(labels: np.ndarray, candidate: np.ndarray, champion: np.ndarray) -> float:
    """Exact one-sided McNemar test that the candidate is right more often than the champion.

    Only the discordant images count: ``b`` where only the candidate is right, ``c`` where only
    the champion is; under "equally good" ``b ~ Binomial(b + c, 1/2)``. It tests plain accuracy,
    not balanced accuracy, so it is reported beside the bootstrap, not used to decide.
    """
    y, new, old = (np.asarray(a) for a in (labels, candidate, champion))
    right_new, right_old = new == y, old == y
    b = int(np.count_nonzero(right_new & ~right_old))
    c = int(np.count_nonzero(right_old & ~right_new))
    return float(binomtest(b, b + c, 0.5, alternative="greater").pvalue) if b + c else 1.0


def decide(
    candidate: Score,
    champion: Score | None,
    significance: Significance | None,
    cfg: GateConfig,
) -> Decision:
    """Promote when the gain is significant at ``cfg.confidence`` and ECE rises within bound.

    Args:
        candidate: the new model on the current test split.
        champion: the champion re-scored on the same images, or None when there is none yet.
        significance: :func:`paired_bootstrap` of the two (required with a champion).
        cfg: the thresholds (``gate`` in params.yaml).
    """
    if champion is None:
        return Decision(True, f"no {cfg.champion_alias} yet: the first model becomes it")
    if significance is None:
        raise ValueError("a champion to beat needs the paired bootstrap of the gain")
    s, alpha = significance, round(1 - cfg.confidence, 12)  # 1 - 0.95 is not 0.05 in floats
    versus = (
        f"balanced accuracy {candidate.balanced_accuracy:.4f} vs {champion.balanced_accuracy:.4f} "
        f"on the same images: gain {s.gain:+.4f}, {s.confidence:.0%} CI "
        f"[{s.ci_low:+.4f}, {s.ci_high:+.4f}], p = {s.p_value:.3g} for gain <= {cfg.min_gain:+.4f}"
    )
    if s.p_value >= alpha:
        return Decision(False, f"{versus}: not significant (p >= {alpha:.3g})", s)
    rise = candidate.ece - champion.ece
    if rise > cfg.max_ece_increase:
        return Decision(
            False,
            f"{versus}; but ECE {candidate.ece:.4f} vs {champion.ece:.4f} "
            f"(+{rise:.4f} > {cfg.max_ece_increase:.4f})",
            s,
        )
    return Decision(True, f"{versus} (< {alpha:.3g}); ECE {rise:+.4f} within bound", s)


def judge(
    candidate: Score, champion: Score | None, labels: np.ndarray, cfg: GateConfig
) -> Decision:
    """Test the gain of ``candidate`` over ``champion`` on their shared images, then decide."""
    if champion is None:
        return decide(candidate, None, None, cfg)
    args = (labels, candidate.predicted, champion.predicted)
    significance = paired_bootstrap(*args, cfg.min_gain, cfg.confidence, cfg.bootstrap, cfg.seed)
    decision = decide(candidate, champion, significance, cfg)
    return Decision(decision.promote, decision.reason, significance, mcnemar_p_value(*args))


def summary(
    decision: Decision, candidate: Score, champion: Score | None, test: Candidate
) -> dict[str, Any]:
    """Everything the gate found, flat: the flow's return value and what MLflow records."""
    s = decision.significance
    return {
        "promote": decision.promote,
        "reason": decision.reason,
        "test_set_version": test.version,
        "n_images": int(test.labels.size),
        "classes": list(test.classes),
        "candidate_balanced_accuracy": candidate.balanced_accuracy,
        "candidate_ece": candidate.ece,
        "champion_balanced_accuracy": None if champion is None else champion.balanced_accuracy,
        "champion_ece": None if champion is None else champion.ece,
        "gain": None if s is None else s.gain,
        "gain_ci_low": None if s is None else s.ci_low,
        "gain_ci_high": None if s is None else s.ci_high,
        "p_value": None if s is None else s.p_value,
        "mcnemar_p_value": decision.mcnemar_p_value,
    }


METRIC_KEYS = (
    "n_images",
    "candidate_balanced_accuracy",
    "candidate_ece",
    "champion_balanced_accuracy",
    "champion_ece",
    "gain",
    "gain_ci_low",
    "gain_ci_high",
    "p_value",
    "mcnemar_p_value",
)


def mlflow_record(
    result: dict[str, Any], flow_run_id: str | None
) -> tuple[dict[str, str], dict[str, float]]:
    """The :func:`summary` (plus the versions) as MLflow tags and ``gate_*`` metrics."""
    tags = {
        "promotion": "promoted" if result["promote"] else "refused",
        "promotion_reason": result["reason"][:5000],
        "gate_test_set_version": result["test_set_version"],
    }
    if result.get("champion_version"):
        tags["gate_champion_version"] = str(result["champion_version"])
    if flow_run_id:
        tags["prefect_flow_run_id"] = flow_run_id
    metrics = {f"gate_{k}": float(result[k]) for k in METRIC_KEYS if result[k] is not None}
    return tags, metrics
