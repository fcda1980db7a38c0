"""The explain stage: sampling, every output per image x method x layer, summary, gallery."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.config import load_params
from tasks.explain import explained_classes, run_explain, sample_indices
from tasks.forward import autocast_dtype, precision_name
from tasks.ingest import build_manifest
from tasks.metrics import softmax
from tasks.models import build_model
from tasks.prepare import open_split, prepare
from tasks.split import split_manifest, write_splits
from tasks.synth import generate
from tests.helpers import TINY, write_params


def test_explained_class_can_be_predicted_true_or_named():
    preds, labels = np.array([0, 1, 1]), np.array([0, 0, 1])
    assert list(explained_classes("predicted", preds, labels, ["MEL", "NV"])) == [0, 1, 1]
    assert list(explained_classes("true", preds, labels, ["MEL", "NV"])) == [0, 0, 1]
    assert list(explained_classes("MEL", preds, labels, ["MEL", "NV"])) == [0, 0, 0]
    with pytest.raises(ValueError, match="explain.target 'DF'"):
        explained_classes("DF", preds, labels, ["MEL", "NV"])


def test_sample_takes_n_per_class_plus_misclassified():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 3)
    preds = labels.copy()
    preds[[1, 2, 3, 15]] = 2
    idx = sample_indices(labels, preds, per_class=2, misclassified_cap=3, seed=0)
    assert len(idx) == len(set(idx)) and list(idx) == sorted(idx)
    for c in range(3):
        assert (labels[idx] == c).sum() >= 2
    assert (labels[idx] != preds[idx]).sum() >= 3
    assert (idx == sample_indices(labels, preds, 2, 3, seed=0)).all()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Explain a random-init model on a tiny prepared set with masks (fast methods only)."""
    root = tmp_path_factory.mktemp("explain")
    p = load_params(write_params(root / "params.yaml", TINY))
    generate(p.synth, root / "raw", progress=False)
    frame, _ = split_manifest(build_manifest(root / "raw", progress=False), p.split.fractions, 0)
    write_splits(frame, root / "splits")
    prepare(root / "splits", root / "raw", root / "prep", size=32, show_progress=False)
    split = open_split(root / "prep", "test")
    torch.manual_seed(0)
    model = build_model("resnet18", len(split.classes)).eval()
    x = torch.from_numpy(np.array(split.images)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        probs = softmax(model(x).numpy())
    cfg = dataclasses.replace(
        p.explain,
        methods=["gradcam", "gradcampp", "cam", "ig"],
        layers=["middle", "deep"],
        per_class=2,
        misclassified_cap=2,
        bootstrap=50,
    )
    out = root / "out"
    out.mkdir()
    summary = run_explain(
        model, "resnet18", split, probs, cfg, out, torch.device("cpu"), show_progress=False
    )
    return out, summary, cfg


def test_every_image_method_layer_has_its_outputs(job):
    out, summary, cfg = job
    table = pd.read_parquet(out / "explanations.parquet")
    expected = {
        ("gradcam", "middle"),
        ("gradcam", "deep"),
        ("gradcampp", "middle"),
        ("gradcampp", "deep"),
        ("cam", "deep"),
        ("ig", "input"),
    }
    assert set(zip(table["method"], table["layer"], strict=True)) == expected
    n_images = table["image_id"].nunique()
    assert summary["images"] == n_images and len(table) == n_images * len(expected)
    work = summary["work"]  # the engine's account, which the bench's explain bound reads
    assert work["scored_images"] > 0 and 0 < work["forward_s"] <= work["scores_s"]
    expected_precision = precision_name(autocast_dtype(torch.device("cpu"), cfg.score_amp))
    assert summary["score_precision"] == expected_precision  # params.yaml's score_amp, here
    heat = np.load(out / "heatmaps.npz")
    assert len(heat.files) == len(table)
    for row in table.itertuples():
        key = f"{row.image_id}__{row.method}__{row.layer}"
        assert heat[key].dtype == np.float16 and heat[key].shape == (32, 32)
        assert (out / "overlays" / f"{key}.png").exists()
    for column in (
        "pointing_game",
        "energy_pointing_game",
        "iou",
        "deletion_auc",
        "insertion_auc",
        "average_drop",
        "road",
        "inside_share",
        "text",
    ):
        assert table[column].notna().all(), column
    assert table["text"].str.startswith("Predicted ").all()
    lesion = table["text"].str.contains("inside the lesion|outside the lesion")
    empty = table["text"].str.contains("map is empty")
    assert (lesion | empty).all() and lesion.any()


def test_summary_ranks_methods_and_runs_the_sanity_check(job):
    out, summary, _ = job
    ranked = [(r["method"], r["layer"]) for r in summary["ranking"]]
    assert len(ranked) == 6 and ranked[0] != ranked[-1]
    first = summary["methods"][0]
    assert first["pointing_game_low"] <= first["pointing_game_mean"] <= first["pointing_game_high"]
    sanity = summary["sanity"]
    assert -1.0 <= sanity["ssim_final"] <= 1.0 and sanity["self_ssim"] == pytest.approx(1.0)
    gallery = (out / "gallery.html").read_text()
    assert gallery.count("<tr") == summary["images"] + 1
    assert "overlays/" in gallery and "Predicted " in gallery


def _train_and_explain(root, marker: bool) -> dict:
    """Train a small CNN on a two-class synthetic set (MEL ruler-marked or not), explain it."""
    from tasks.train import train

    overrides = TINY + [
        "synth.count=240",
        "synth.image_size=64",
        "synth.class_mix={NV: 0.5, MEL: 0.5}",
        "synth.difficulty=1.0",
        "train.epochs=12",
        "train.lr=0.003",
        "train.class_weights=none",
        "train.augment.crop_scale=[1.0, 1.0]",
        "train.augment.rotation=0",
    ]
    if marker:
        overrides += [
            "synth.marker.label=MEL",
            "synth.marker.fraction=1.0",
            "synth.marker.kind=ruler",
        ]
    root.mkdir()
    p = load_params(write_params(root / "params.yaml", overrides))
    generate(p.synth, root / "raw", progress=False)
    frame, _ = split_manifest(build_manifest(root / "raw", progress=False), p.split.fractions, 0)
    write_splits(frame, root / "splits")
    prepare(root / "splits", root / "raw", root / "prep", size=48, show_progress=False)
    result = train(p.model, p.train, root / "prep", root / "ck.pt", "v", show_progress=False)
    split = open_split(root / "prep", "test")
    cfg = dataclasses.replace(
        p.explain, methods=["gradcam"], layers=["middle"], per_class=1000, bootstrap=20
    )
    (root / "out").mkdir()
    summary = run_explain(
        result.model,
        "custom_cnn",
        split,
        softmax(result.test_logits),
        cfg,
        root / "out",
        torch.device("cpu"),
        sanity=False,
        show_progress=False,
    )
    return {"summary": summary, "balanced_accuracy": result.test["balanced_accuracy"]}


@pytest.mark.slow
def test_a_learned_marker_shows_as_attention_outside_the_lesion(tmp_path):
    clean = _train_and_explain(tmp_path / "clean", marker=False)
    marked = _train_and_explain(tmp_path / "marked", marker=True)
    # The ruler is a perfect shortcut: the marked model scores higher...
    assert marked["balanced_accuracy"] > clean["balanced_accuracy"]
    # ...and its attention for melanoma leaves the lesion for the marker.
    before = clean["summary"]["inside_share_by_class"]["MEL"]
    after = marked["summary"]["inside_share_by_class"]["MEL"]
    assert after < 0.75 * before, (before, after)


def test_one_gallery_template_escapes_and_marks_missing_maps(tmp_path):
    """The gallery writer the explain stage and explain-batch share (tasks/gallery.py)."""
    from tasks.gallery import write_gallery

    table = pd.DataFrame(
        {
            "image_id": ["a", "a", "b"],
            "method": ["gradcam", "ig", "gradcam"],
            "layer": ["deep", "input", "deep"],
            "text": ["Predicted <b>melanoma</b>.", "IG text", "second"],
        }
    )
    path = tmp_path / "gallery.html"
    write_gallery(
        path,
        table,
        "deep",
        heading="Heading & more",
        caption=lambda first: [f"id {first['image_id']}"],
        errors=["broken.jpg: <not an image>"],
    )
    page = path.read_text()
    assert page.count("<tr") == 3  # header + two images
    assert "&lt;b&gt;melanoma&lt;/b&gt;" in page and "<b>melanoma" not in page
    assert 'src="overlays/a__ig__input.png"' in page and "<td>-</td>" in page  # b has no IG
    assert "Heading &amp; more" in page and "broken.jpg: &lt;not an image&gt;" in page
