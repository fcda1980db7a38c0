"""Metrics, plot data, pictures and the predictions file of tasks.metrics, on tiny hand cases.

The expected numbers are worked out by hand in each test, so a test checks the definition of
a metric (and which classes it averages over), not just that sklearn agrees with itself.
"""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from tasks.labels import ISIC_CLASSES
from tasks.metrics import (
    classification_metrics,
    confusion_rows,
    flat_metrics,
    load_predictions,
    normalize_rows,
    plot_confusion_matrix,
    plot_roc_curves,
    plot_training_curves,
    roc_points,
    save_figure,
    save_predictions,
    softmax,
)

ABC = ["A", "B", "C"]


def onehot_logits(preds: list[int], k: int, scale: float = 5.0) -> np.ndarray:
    """Logits whose argmax is ``preds``."""
    return np.eye(k)[preds] * scale


def assert_png(path: Path, min_side: int = 200) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert min(img.size) >= min_side


# --------------------------------------------------------------------------- softmax


def test_softmax_is_stable_and_normalised():
    logits = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0], [-800.0, -800.0, -800.0]])
    p = softmax(logits)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(p[2], [1 / 3] * 3)
    np.testing.assert_allclose(softmax(logits[1:2] + 123.0), p[1:2])  # shift-invariant


# --------------------------------------------------------------------------- metrics


def test_hand_case_three_classes_six_samples():
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(onehot_logits(preds, 3), labels, ABC)

    # true A: 2 right, 1 called B; true B: 1 right, 1 called C; true C: 1 right.
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    recall = [Fraction(2, 3), Fraction(1, 2), Fraction(1, 1)]
    precision = [Fraction(2, 2), Fraction(1, 2), Fraction(1, 2)]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    assert f1 == [Fraction(4, 5), Fraction(1, 2), Fraction(2, 3)]
    assert m["balanced_accuracy"] == pytest.approx(13 / 18)  # (2/3 + 1/2 + 1) / 3
    assert m["macro_f1"] == pytest.approx(59 / 90)  # (4/5 + 1/2 + 2/3) / 3
    for i, name in enumerate(ABC):
        row = m["per_class"][name]
        assert row["precision"] == pytest.approx(float(precision[i]))
        assert row["recall"] == pytest.approx(float(recall[i]))
        assert row["f1"] == pytest.approx(float(f1[i]))
    assert [m["per_class"][n]["support"] for n in ABC] == [3, 2, 1]
    assert m["n_samples"] == 6
    assert m["absent_classes"] == []
    assert m["auroc_classes"] == ABC
    json.dumps(m, allow_nan=False)  # the metrics file is plain JSON


def test_perfect_logits_score_one_everywhere():
    labels = np.array([0, 1, 2, 0, 1, 2, 2])
    m = classification_metrics(onehot_logits(labels.tolist(), 3, scale=20.0), labels, ABC)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro"):
        assert m[key] == 1.0
    for row in m["per_class"].values():
        assert row["precision"] == row["recall"] == row["f1"] == row["auroc"] == 1.0
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 3]]
    assert m["nll"] < 1e-6


def test_uniform_logits_have_nll_log_k():
    labels = np.array([0, 1, 2, 3])
    m = classification_metrics(np.zeros((4, 4)), labels, list("ABCD"))
    assert m["nll"] == pytest.approx(np.log(4))
    assert m["auroc_macro"] == pytest.approx(0.5)


def test_balanced_accuracy_punishes_the_majority_guess():
    labels = np.array([0] * 8 + [1] * 2)
    m = classification_metrics(onehot_logits([0] * 10, 2), labels, ["NV", "MEL"])
    assert m["accuracy"] == pytest.approx(0.8)  # 8 of 10 right
    assert m["balanced_accuracy"] == pytest.approx(0.5)  # recall 1 on NV, 0 on MEL
    assert m["per_class"]["MEL"]["recall"] == 0.0
    assert m["per_class"]["MEL"]["precision"] == 0.0  # never predicted: 0, not an error


def test_binary_auroc_comes_from_positive_class_probability():
    labels = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    logits = np.stack([np.zeros(4), np.log(p1 / (1 - p1))], axis=1)
    m = classification_metrics(logits, labels, ["benign", "malignant"])
    # pairs (neg, pos): (0.1,0.35) ok, (0.1,0.8) ok, (0.4,0.35) wrong, (0.4,0.8) ok -> 3/4
    assert m["auroc_macro"] == pytest.approx(0.75)
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(labels, p1))
    assert m["per_class"]["malignant"]["auroc"] == pytest.approx(0.75)
    assert m["per_class"]["benign"]["auroc"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.75)  # threshold 0.5: only 0.8 is called malignant
    assert m["confusion_matrix"] == [[2, 0], [1, 1]]


def test_macro_auroc_matches_sklearn_ovr_when_every_class_is_present():
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(4), 10)
    logits = rng.normal(size=(40, 4)) + np.eye(4)[labels]
    m = classification_metrics(logits, labels, list("ABCD"))
    expected = roc_auc_score(labels, softmax(logits), multi_class="ovr", average="macro")
    assert m["auroc_macro"] == pytest.approx(expected)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_absent_class_is_reported_not_fatal():
    classes = ["MEL", "NV", "BCC", "UNK"]
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = [0, 3, 1, 1, 2, 0]  # one MEL called UNK, one BCC called MEL
    rng = np.random.default_rng(1)
    logits = onehot_logits(preds, 4) + rng.normal(scale=0.1, size=(6, 4))
    m = classification_metrics(logits, labels, classes)

    assert m["absent_classes"] == ["UNK"]
    assert m["auroc_classes"] == ["MEL", "NV", "BCC"]
    unk = m["per_class"]["UNK"]
    assert unk["support"] == 0
    assert unk["precision"] is unk["recall"] is unk["f1"] is unk["auroc"] is None
    assert len(m["confusion_matrix"]) == 4 and m["confusion_matrix"][3] == [0, 0, 0, 0]
    assert m["confusion_matrix"][0] == [1, 0, 0, 1]  # the miss into UNK still counts
    # averages over the three present classes: recalls 1/2, 1, 1/2
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    present = [m["per_class"][c] for c in ("MEL", "NV", "BCC")]
    assert m["auroc_macro"] == pytest.approx(np.mean([r["auroc"] for r in present]))
    assert m["macro_f1"] == pytest.approx(np.mean([r["f1"] for r in present]))
    assert "UNK" not in " ".join(flat_metrics(m, "test"))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_single_class_has_no_auroc():
    m = classification_metrics(onehot_logits([0, 1, 0], 2), np.array([0, 0, 0]), ["A", "B"])
    assert m["auroc_macro"] is None
    assert m["auroc_classes"] == []
    assert m["absent_classes"] == ["B"]
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert "x_auroc_macro" not in flat_metrics(m, "x")


@pytest.mark.parametrize(
    ("logits", "labels", "classes", "match"),
    [
        (np.zeros((3, 2)), [0, 1, 2], ["A", "B"], "labels\\[2\\] = 2 is not a class index"),
        (np.zeros((3, 4)), [0, 1, 2], ABC, "4 columns but there are 3 classes"),
        (np.zeros((3, 3)), [0, 1], ABC, "2 entries but logits have 3 rows"),
        (np.zeros((3, 3)), [0.0, 1.0, 2.0], ABC, "integer class indices"),
        (np.zeros((0, 3)), [], ABC, "no samples"),
        (np.array([[0.0, np.nan, 0.0]]), [0], ABC, "row 0 is not finite"),
        (np.zeros((2, 2)), [0, 1], ["A", "A"], "unique"),
    ],
)
def test_bad_inputs_name_the_problem(logits, labels, classes, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(logits, np.asarray(labels), classes)


# --------------------------------------------------------------------------- flat metrics


def test_flat_metrics_has_per_class_keys_and_no_none():
    classes = list(ISIC_CLASSES)
    labels = np.arange(18) % 8  # UNK absent, as in ISIC 2019 training data
    logits = onehot_logits(labels.tolist(), 9) + np.random.default_rng(2).normal(size=(18, 9))
    flat = flat_metrics(classification_metrics(logits, labels, classes), "test")

    assert all(isinstance(v, float) and np.isfinite(v) for v in flat.values())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro", "nll"):
        assert f"test_{key}" in flat
    for name in ISIC_CLASSES[:-1]:
        for key in ("precision", "recall", "f1", "auroc"):
            assert f"test_{key}_{name}" in flat
    assert not any(k.endswith("_UNK") for k in flat)
    assert not any("support" in k or "confusion" in k for k in flat)


def test_flat_metrics_without_prefix_and_with_odd_class_names():
    m = classification_metrics(onehot_logits([0, 1], 2), np.array([0, 1]), ["naevus", "a/b c"])
    flat = flat_metrics(m, "")
    assert flat["accuracy"] == 1.0
    assert flat["recall_a_b_c"] == 1.0


# --------------------------------------------------------------------------- plot data


def test_roc_points_are_json_rows_per_present_class():
    labels = np.array([0, 0, 1, 1, 2, 2])
    logits = np.random.default_rng(3).normal(size=(6, 4))
    rows = roc_points(logits, labels, list("ABCD"))
    json.dumps(rows, allow_nan=False)  # the inf start threshold has been replaced
    assert {r["class"] for r in rows} == {"A", "B", "C"}
    assert set(rows[0]) == {"class", "fpr", "threshold", "tpr"}
    for name in "ABC":
        curve = [r for r in rows if r["class"] == name]
        assert (curve[0]["fpr"], curve[0]["tpr"]) == (0.0, 0.0)
        assert (curve[-1]["fpr"], curve[-1]["tpr"]) == (1.0, 1.0)
        assert curve[0]["threshold"] > 1.0  # above every probability: flags nothing


def test_confusion_rows_count_back_to_the_matrix():
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 1, 1, 2, 2])
    rows = confusion_rows(labels, preds, ABC)
    assert len(rows) == 6
    assert rows[2] == {"actual": "A", "predicted": "B"}
    counts = Counter((r["actual"], r["predicted"]) for r in rows)
    assert counts == {("A", "A"): 2, ("A", "B"): 1, ("B", "B"): 1, ("B", "C"): 1, ("C", "C"): 1}
    with pytest.raises(ValueError, match="preds"):
        confusion_rows(labels, preds[:5], ABC)


def test_normalize_rows_sums_to_one_and_keeps_empty_rows_zero():
    cm = np.array([[2, 1, 0], [0, 1, 1], [0, 0, 0]])
    norm = normalize_rows(cm)
    np.testing.assert_allclose(norm.sum(axis=1), [1.0, 1.0, 0.0])
    np.testing.assert_allclose(norm[0], [2 / 3, 1 / 3, 0.0])
    assert np.isfinite(norm).all()


# --------------------------------------------------------------------------- pictures


@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_matrix_png_for_nine_classes(tmp_path, normalize):
    rng = np.random.default_rng(4)
    cm = rng.integers(0, 50, size=(9, 9))
    cm[8] = 0  # an absent class still gets a (blank) row
    fig = plot_confusion_matrix(cm, list(ISIC_CLASSES), normalize=normalize)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 81
    if normalize:
        assert texts[0] == f"{cm[0, 0] / cm[0].sum():.2f}"
    else:
        assert texts[0] == str(cm[0, 0])
    out = save_figure(fig, tmp_path / "plots" / f"cm_{normalize}.png")
    assert_png(out)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp left behind


def test_roc_curves_png(tmp_path):
    labels = np.tile(np.arange(4), 5)
    logits = np.random.default_rng(5).normal(size=(20, 5)) + np.eye(5)[labels]
    fig = plot_roc_curves(logits, labels, list("ABCDE"))
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(legend) == 5 and legend[-1] == "chance"
    assert all("AUC = " in t for t in legend[:4])
    assert "E" in fig.axes[0].get_title()  # the class without a curve is named
    assert_png(save_figure(fig, tmp_path / "roc.png"))


def test_training_curves_png(tmp_path):
    history = [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "val_loss": 2.2 / e,
            "val_accuracy": 0.5 + 0.1 * e,
            "val_balanced_accuracy": 0.4 + 0.1 * e,
            "lr": 1e-3 * 0.5**e,
        }
        for e in range(1, 5)
    ]
    fig = plot_training_curves(history)
    assert len(fig.axes) == 3  # loss, metrics, lr twin
    assert_png(save_figure(fig, tmp_path / "curves.png"))
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves([])


def test_save_figure_closes_pyplot_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 3))
    ax.plot([0, 1], [0, 1])
    save_figure(fig, tmp_path / "p.png")
    assert not plt.fignum_exists(fig.number)
    assert_png(tmp_path / "p.png", min_side=100)


# --------------------------------------------------------------------------- predictions


def test_predictions_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(5, 3))
    labels = np.array([0, 2, 1, 1, 0])
    ids = ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002", "img-é", "ISIC_0000004"]
    path = save_predictions(tmp_path / "test_predictions.npz", logits, labels, ids, ABC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_predictions.npz"]

    back = load_predictions(path)
    assert back["logits"].dtype == np.float32
    np.testing.assert_array_equal(back["logits"], logits.astype(np.float32))
    assert back["labels"].dtype == np.int64
    np.testing.assert_array_equal(back["labels"], labels)
    assert back["image_ids"].tolist() == ids
    assert back["classes"] == ABC


def test_predictions_keep_the_given_name_and_reject_bad_files(tmp_path):
    path = save_predictions(
        tmp_path / "preds.bin", np.zeros((2, 2)), [0, 1], ["a", "b"], ["x", "y"]
    )
    assert path.name == "preds.bin" and path.is_file()
    assert load_predictions(path)["classes"] == ["x", "y"]

    with pytest.raises(ValueError, match="image_ids has 1 entries"):
        save_predictions(tmp_path / "p.npz", np.zeros((2, 2)), [0, 1], ["a"], ["x", "y"])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="garbage.npz"):
        load_predictions(garbage)
    partial = tmp_path / "partial.npz"
    np.savez(partial, logits=np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="lacks"):
        load_predictions(partial)
