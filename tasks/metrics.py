"""Classification metrics, plots and plot data from a model's logits and the true labels.

Everything here is a pure function of arrays (plus ``save_*`` helpers that write one file
atomically), so the stages, the training loop's validation step and the tests all score
a model the same way. Metrics come from scikit-learn rather than hand-written formulas, so the
numbers match what anyone else computes from the same predictions.

Balanced accuracy (mean recall over the classes present) is the primary metric: it is the ISIC
2019 challenge metric, and plain accuracy rewards a model that calls every lesion a naevus.

Classes absent from the labels are common (ISIC 2019 has no UNK training images, and a small
test split can miss a rare class). Their recall, F1 and AUROC are undefined, so every
class-averaged metric here averages over the classes present in the labels, the per-class
entries of an absent class are None, and the result names which classes were left out.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from tasks.io import atomic_path

DPI = 100
SCALAR_KEYS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro", "nll")
PER_CLASS_KEYS: tuple[str, ...] = ("precision", "recall", "f1", "auroc")


class Predictions(TypedDict):
    """What :func:`load_predictions` returns: the arrays calibration and reports read."""

    logits: np.ndarray  # (n, k) float32
    labels: np.ndarray  # (n,) int64
    image_ids: np.ndarray  # (n,) str
    classes: list[str]


# --------------------------------------------------------------------------- checks


def _check_labels(labels: Any, n: int | None, k: int, what: str = "labels") -> np.ndarray:
    """Labels as a 1-D int64 array of class indices in ``[0, k)``, or a ValueError saying why."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D class indices, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise ValueError(f"{what} must be integer class indices, got dtype {arr.dtype}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{what} has {arr.shape[0]} entries but logits have {n} rows")
    arr = arr.astype(np.int64)
    bad = np.flatnonzero((arr < 0) | (arr >= k))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{what}[{i}] = {arr[i]} is not a class index in [0, {k})")
    return arr


def _check(logits: Any, labels: Any, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validate logits (n, k) against ``classes`` and labels; return float64 logits, int labels."""
    x = np.asarray(logits, dtype=np.float64)
    k = len(classes)
    if x.ndim != 2:
        raise ValueError(f"logits must be 2-D (samples, classes), got shape {x.shape}")
    if x.shape[1] != k:
        raise ValueError(f"logits have {x.shape[1]} columns but there are {k} classes {classes}")
    if len(set(classes)) != k:
        raise ValueError(f"class names must be unique, got {list(classes)}")
    if x.shape[0] == 0:
        raise ValueError("no samples: logits have 0 rows")
    nonfinite = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if nonfinite.size:
        raise ValueError(f"logits row {int(nonfinite[0])} is not finite: {x[nonfinite[0]]}")
    return x, _check_labels(labels, x.shape[0], k)


def _none_if_nan(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


# --------------------------------------------------------------------------- metrics


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, computed in float64 after subtracting the row maximum.

    Subtracting the maximum leaves the result unchanged but keeps ``exp`` from overflowing on
    large logits (an overconfident model easily produces logits of several hundred).
    """
    x = np.asarray(logits, dtype=np.float64)
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _present(labels: np.ndarray, k: int) -> list[int]:
    return [c for c in range(k) if np.any(labels == c)]


def _roc_classes(labels: np.ndarray, k: int) -> list[int]:
    """Classes with a one-vs-rest ROC curve: present, and with some other class present too."""
    present = _present(labels, k)
    return present if len(present) >= 2 else []


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Score logits against true labels: overall, per-class, and the confusion matrix.

    Class-averaged metrics (balanced accuracy, macro F1, macro AUROC) average over the classes
    present in ``labels``: an absent class has no recall to average, and counting it as 0 (or 1)
    would move the score for a reason that has nothing to do with the model. Predictions *into*
    an absent class still count, as misses of the true class. AUROC is one-vs-rest per present
    class; its macro average is None when fewer than two classes are present. With two classes
    it is the AUROC of the positive class (index 1) scored by its probability.

    Args:
        logits: (n, k) raw scores, one column per class (softmax is applied here).
        labels: (n,) true class indices into ``classes``.
        classes: the k class names, in logit column order.

    Returns:
        A JSON-ready dict: accuracy, balanced_accuracy, macro_f1, auroc_macro (or None), nll,
        n_samples, auroc_classes and absent_classes (names), per_class (name -> precision,
        recall, f1, support, auroc; the rates are None for a class with no support), and
        confusion_matrix (k x k counts, rows = true, columns = predicted, every class a row).

    Raises:
        ValueError: if shapes, class count or label values do not fit together.
    """
    x, y = _check(logits, labels, classes)
    k = len(classes)
    probs = softmax(x)
    preds = probs.argmax(axis=1)
    present = _present(y, k)
    roc_classes = _roc_classes(y, k)

    precision, recall, f1, support = precision_recall_fscore_support(
        y, preds, labels=list(range(k)), zero_division=0
    )
    class_auroc: dict[int, float] = {}
    auroc_macro: float | None = None
    if roc_classes:
        # One indicator column per present class: sklearn's multilabel path scores each column
        # one-vs-rest without requiring the chosen probability columns to sum to 1.
        onehot = (y[:, None] == np.asarray(roc_classes)[None, :]).astype(np.int64)
        scores = probs[:, roc_classes]
        per = roc_auc_score(onehot, scores, average=None)
        class_auroc = {c: float(a) for c, a in zip(roc_classes, per, strict=True)}
        if k == 2:
            auroc_macro = float(roc_auc_score(y, probs[:, 1]))
        else:
            auroc_macro = float(roc_auc_score(onehot, scores, average="macro"))

    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(classes):
        has = c in present
        per_class[name] = {
            "precision": float(precision[c]) if has else None,
            "recall": float(recall[c]) if has else None,
            "f1": float(f1[c]) if has else None,
            "support": int(support[c]),
            "auroc": class_auroc.get(c),
        }

    return {
        "accuracy": float(accuracy_score(y, preds)),
        "balanced_accuracy": float(balanced_accuracy_score(y, preds)),
        "macro_f1": float(f1_score(y, preds, labels=present, average="macro", zero_division=0)),
        "auroc_macro": auroc_macro,
        "nll": float(log_loss(y, probs, labels=list(range(k)))),
        "n_samples": int(y.shape[0]),
        "auroc_classes": [classes[c] for c in roc_classes],
        "absent_classes": [name for c, name in enumerate(classes) if c not in present],
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y, preds, labels=list(range(k))).tolist(),
    }


def _metric_name(text: str) -> str:
    """A class name made safe as part of an MLflow metric key (folder names can be anything)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def flat_metrics(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The scalar metrics as one flat ``{name: float}`` for MLflow ``log_metrics`` and DVC.

    Keys read ``{prefix}_{metric}`` and ``{prefix}_{metric}_{class}`` (``test_recall_MEL``).
    Undefined values (None) are left out rather than logged as NaN, since MLflow and
    ``dvc metrics diff`` would show a NaN as a real number that changed. Supports and the
    confusion matrix describe the data, not the model, and stay in the full metrics file.

    Args:
        metrics: a dict from :func:`classification_metrics`.
        prefix: the split or stage name (``val``, ``test``); empty for bare names.
    """
    head = f"{prefix}_" if prefix else ""
    flat: dict[str, float] = {}
    for key in SCALAR_KEYS:
        value = metrics.get(key)
        if value is not None and np.isfinite(value):
            flat[f"{head}{key}"] = float(value)
    for name, row in metrics.get("per_class", {}).items():
        for key in PER_CLASS_KEYS:
            value = row.get(key)
            if value is not None and np.isfinite(value):
                flat[f"{head}{key}_{_metric_name(name)}"] = float(value)
    return flat


# --------------------------------------------------------------------------- plot data


def roc_points(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """One-vs-rest ROC curves as rows ``{class, fpr, threshold, tpr}`` for ``dvc plots``.

    Only classes with an ROC curve appear (present in labels, with another class present).
    scikit-learn starts every curve at threshold ``inf``, which is not valid JSON; it is written
    as the class's highest probability + 1 (the convention of scikit-learn before 1.3), which
    still means "flag nothing".
    """
    x, y = _check(logits, labels, classes)
    probs = softmax(x)
    rows: list[dict] = []
    for c in _roc_classes(y, len(classes)):
        fpr, tpr, thresholds = roc_curve(y == c, probs[:, c])
        thresholds = np.where(np.isfinite(thresholds), thresholds, probs[:, c].max() + 1.0)
        rows.extend(
            {"class": classes[c], "fpr": float(f), "threshold": float(t), "tpr": float(r)}
            for f, t, r in zip(fpr, thresholds, tpr, strict=True)
        )
    return rows


def confusion_rows(
    labels: np.ndarray, preds: np.ndarray, classes: Sequence[str]
) -> list[dict[str, str]]:
    """One row ``{actual, predicted}`` (class names) per sample: ``dvc plots``' confusion input.

    DVC's ``confusion`` template counts the pairs itself, so it needs the raw pairs rather than
    the matrix.
    """
    k = len(classes)
    y = _check_labels(labels, None, k, "labels")
    p = _check_labels(preds, y.shape[0], k, "preds")
    return [{"actual": classes[a], "predicted": classes[b]} for a, b in zip(y, p, strict=True)]


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Divide each row of a confusion matrix by its total, so the diagonal reads as recall.

    A class with no samples keeps a row of zeros instead of NaNs, so the plot stays drawable.
    """
    m = np.asarray(cm, dtype=np.float64)
    totals = m.sum(axis=1, keepdims=True)
    return np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)


# --------------------------------------------------------------------------- pictures
# Bare Figures render with Agg without pyplot's global figure registry: thread-safe under a
# Prefect thread pool, and nothing to leak if a caller forgets to close.


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], normalize: bool) -> Figure:
    """Heatmap of a confusion matrix with every cell annotated.

    Args:
        cm: (k, k) counts, rows = true class, columns = predicted class.
        classes: the k class names.
        normalize: if True, plot :func:`normalize_rows` (each row sums to 1, recall on the
            diagonal), which shows how rare classes fare; if False, raw counts, which show
            where the bulk of the errors are.
    """
    counts = np.asarray(cm)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix has shape {counts.shape}, expected ({k}, {k})")
    data = normalize_rows(counts) if normalize else counts.astype(np.float64)
    side = max(4.0, 0.65 * k + 2.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(float(data.max()), 1.0)
    image = ax.imshow(data, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fontsize = 10 if k <= 6 else 8
    for i in range(k):
        for j in range(k):
            value = data[i, j]
            text = f"{value:.2f}" if normalize else f"{int(counts[i, j])}"
            color = "white" if value > 0.5 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (row-normalised: recall)" if normalize else "Confusion matrix")
    return fig


def _colors(k: int) -> list:
    """Distinct colours for k curves (tab10 covers the nine ISIC classes)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


def plot_roc_curves(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> Figure:
    """One-vs-rest ROC curve per class, AUROC in the legend, and the chance diagonal.

    Classes without a curve (absent from labels) are named in the title rather than silently
    dropped.
    """
    x, y = _check(logits, labels, classes)
    probs = softmax(x)
    colors = _colors(len(classes))
    fig = Figure(figsize=(6.5, 6.0), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    drawn = _roc_classes(y, len(classes))
    for c in drawn:
        fpr, tpr, _ = roc_curve(y == c, probs[:, c])
        auc = roc_auc_score(y == c, probs[:, c])
        ax.plot(fpr, tpr, color=colors[c], lw=1.6, label=f"{classes[c]} (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1.0, label="chance")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    missing = [name for c, name in enumerate(classes) if c not in drawn]
    title = "ROC, one-vs-rest"
    if missing:
        title += f"\nno curve (absent or sole class): {', '.join(missing)}"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list, list]:
    """(epochs, values) for one history key, skipping epochs where it is missing or None."""
    pairs = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
    return [e for e, _ in pairs], [v for _, v in pairs]


def plot_training_curves(history: Sequence[Mapping[str, Any]]) -> Figure:
    """Loss panel (train and val) and metric panel (val accuracy, balanced accuracy, and lr).

    The learning rate shares the metric panel on a log-scale right axis, so a jump in the
    metrics can be read against the schedule step that caused it.

    Args:
        history: one dict per epoch with ``epoch``, ``train_loss``, ``val_loss``,
            ``val_accuracy``, ``val_balanced_accuracy`` and ``lr``; missing values are skipped.
    """
    if not history:
        raise ValueError("training history is empty: nothing to plot")
    missing = [i for i, h in enumerate(history) if "epoch" not in h]
    if missing:
        raise ValueError(f"training history entry {missing[0]} has no 'epoch'")
    fig = Figure(figsize=(11.0, 4.2), dpi=DPI, layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        epochs, values = _series(history, key)
        if values:
            loss_ax.plot(epochs, values, marker="o", ms=3, label=label)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("Loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()

    for key, label in (("val_accuracy", "val accuracy"), ("val_balanced_accuracy", "val bal. acc")):
        epochs, values = _series(history, key)
        if values:
            metric_ax.plot(epochs, values, marker="o", ms=3, label=label)
    metric_ax.set_ylim(0.0, 1.0)
    metric_ax.set_xlabel("epoch")
    metric_ax.set_ylabel("score")
    metric_ax.set_title("Validation metrics")
    metric_ax.grid(alpha=0.3)
    handles, labels = metric_ax.get_legend_handles_labels()
    epochs, lrs = _series(history, "lr")
    if lrs:
        lr_ax = metric_ax.twinx()
        (line,) = lr_ax.plot(epochs, lrs, ls="--", color="grey", label="lr")
        if min(lrs) > 0:
            lr_ax.set_yscale("log")
        lr_ax.set_ylabel("learning rate")
        handles, labels = [*handles, line], [*labels, "lr"]
    if handles:
        metric_ax.legend(handles, labels, loc="lower right")
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write a figure as PNG atomically, then release it.

    The temp file ends in ``.tmp``, so the format is named explicitly. A figure made through
    pyplot is also closed there, since pyplot would otherwise keep it alive.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    if fig.canvas.manager is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


# --------------------------------------------------------------------------- predictions


def save_predictions(
    path: str | Path,
    logits: np.ndarray,
    labels: np.ndarray,
    image_ids: Sequence[str] | np.ndarray,
    classes: Sequence[str],
) -> Path:
    """Write one split's predictions to an ``.npz``: the file calibration and reports read.

    Logits (not probabilities) are kept, in float32, so temperature scaling can refit on them.
    Strings are stored as fixed-width unicode arrays, so loading needs no pickle.
    """
    x, y = _check(logits, labels, classes)
    ids = np.asarray([str(i) for i in image_ids], dtype=str)
    if ids.shape != (x.shape[0],):
        raise ValueError(f"image_ids has {ids.shape[0]} entries but logits have {x.shape[0]} rows")
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        # A file handle, not a path: np.savez appends ".npz" to a name that lacks it.
        np.savez(
            fh,
            logits=x.astype(np.float32),
            labels=y.astype(np.int64),
            image_ids=ids,
            classes=np.asarray(list(classes), dtype=str),
        )
    return path


def load_predictions(path: str | Path) -> Predictions:
    """Read a file written by :func:`save_predictions`, checking its arrays still fit together."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable predictions .npz ({exc})") from exc
    missing = {"logits", "labels", "image_ids", "classes"} - set(arrays)
    if missing:
        raise ValueError(f"{path}: predictions file lacks {sorted(missing)}")
    logits = arrays["logits"].astype(np.float32)
    labels = arrays["labels"]
    image_ids = arrays["image_ids"].astype(str)
    classes = [str(c) for c in arrays["classes"]]
    try:
        _, y = _check(logits, labels, classes)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if image_ids.shape != (logits.shape[0],):
        raise ValueError(f"{path}: {image_ids.shape[0]} image_ids for {logits.shape[0]} rows")
    return {"logits": logits, "labels": y, "image_ids": image_ids, "classes": classes}
