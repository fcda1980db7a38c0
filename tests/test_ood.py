"""The OOD guard: fitted on a synthetic-trained tiny model, it flags MED-NODE and non-skin images.

One module fixture trains a 32 px custom CNN on 240 synthetic images (4 epochs, the real
``tasks.train.train``); the guard is fitted on its training logits, its threshold set on
validation, and judged against the test split (in-distribution), MED-NODE clinical photos and
generated noise, textures and document scans. The ONNX tests use a random-init model: they
check the plumbing (metadata, columns, referral rule), not detection.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import ood
from tasks.conformal import ambiguous, fit_sets
from tasks.export import export_onnx, guard_metadata, read_metadata
from tasks.io import write_json
from tasks.models import build_model
from tasks.predict import load_predictor, predict_files
from tasks.train import MEAN, STD
from tests.datasets import write_image
from tests.helpers import TINY, prepare_tiny

CLASSES = ["MEL", "NV", "BCC"]
TARGET = 0.95


def chance_bar(n_in: int, n_out: int, sigmas: float = 3.0) -> float:
    """AUROC that chance exceeds with probability ~0.1 %: 0.5 + 3 standard errors.

    Under the null (scores of both sets from one distribution) the AUROC is the Mann-Whitney
    statistic over n_in * n_out pairs, with variance (n_in + n_out + 1) / (12 n_in n_out).
    """
    return 0.5 + sigmas * math.sqrt((n_in + n_out + 1) / (12 * n_in * n_out))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model trained on synthetic dermoscopy, and its logits on each split."""
    from tasks.prepare import open_split
    from tasks.train import train

    root = tmp_path_factory.mktemp("ood")
    p = prepare_tiny(root, [*TINY, "synth.count=240", "train.epochs=4"])
    result = train(p.model, p.train, root / "prepared", root / "ckpt.pt", show_progress=False)
    model = result.model.eval()
    splits = {s: open_split(root / "prepared", s) for s in ("train", "val", "test")}
    logits = {s: ood.model_logits(model, sp.images, MEAN, STD) for s, sp in splits.items()}
    return {"model": model, "logits": logits, "labels": {s: sp.labels for s, sp in splits.items()}}


def test_guard_flags_mednode_and_nonskin_images(trained: dict, mednode: Path) -> None:
    logits, labels, model = trained["logits"], trained["labels"], trained["model"]
    guard = ood.fit_guard("mahalanobis", logits["train"], labels["train"], logits["val"], TARGET)
    images, files = ood.folder_images(mednode, 32)
    assert len(files) == 170  # README.md and other non-images are ignored
    others = {"mednode": ood.model_logits(model, images, MEAN, STD)}
    for kind, arrays in ood.nonskin_images(32, 32, seed=0).items():
        others[kind] = ood.model_logits(model, arrays, MEAN, STD)
    report = ood.evaluate_guard(guard, logits["test"], others)
    n_test = len(logits["test"])
    for name, auroc in report["detection_auroc"].items():
        bar = chance_bar(n_test, len(others[name]))
        assert auroc > bar, f"{name}: AUROC {auroc:.3f} not above chance + 3 SE ({bar:.3f})"
    # Uniform noise is as far from lesions as an image gets: most of it must be flagged.
    assert report["flagged_rate"]["noise"] > 0.5
    assert set(report) >= {"method", "threshold", "target_pass_rate", "test_pass_rate"}


def test_threshold_lets_the_target_share_of_validation_pass() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    train = rng.normal(size=(600, 3)) + 4 * np.eye(3)[y]
    val = rng.normal(size=(400, 3)) + 4 * np.eye(3)[rng.integers(0, 3, 400)]
    for method in ood.OOD_METHODS:
        guard = ood.fit_guard(method, train, y, val, TARGET)
        passed = np.mean(guard.scores(val) <= guard.threshold)
        # "higher" quantile: at least the target passes, and at most one more image.
        assert TARGET <= passed <= TARGET + 1 / len(val) + 1e-12, method
        far = ood.detection_auroc(guard.scores(val), guard.scores(val + 40.0))
        if method == "mahalanobis":
            assert far == 1.0  # logits shifted far from every class mean


def test_numpy_scores_equal_pytorch_ood() -> None:
    from pytorch_ood.detector import EnergyBased, Mahalanobis

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 30)
    z = rng.normal(size=(120, 4)) + 3 * np.eye(4)[y]
    x = rng.normal(scale=3, size=(50, 4))
    guard = ood.fit_guard("mahalanobis", z, y, z, TARGET)
    ref = Mahalanobis(None).fit_features(torch.tensor(z), torch.tensor(y))
    expected = ref.predict_features(torch.tensor(x, dtype=torch.float32)).double().numpy()
    # pytorch-ood keeps its means and precision in float32: float32 rounding of O(10) scores.
    np.testing.assert_allclose(guard.scores(x), expected, rtol=1e-5)
    energy = ood.OodGuard("energy", 0.0, TARGET)
    np.testing.assert_allclose(
        energy.scores(x), EnergyBased.score(torch.from_numpy(x)).numpy(), rtol=1e-12
    )


def test_guard_round_trip_and_bad_guard() -> None:
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 10)
    guard = ood.fit_guard("mahalanobis", rng.normal(size=(30, 3)), y, rng.normal(size=(9, 3)), 0.9)
    back = ood.guard_from_dict(guard.to_dict())
    x = rng.normal(size=(5, 3))
    np.testing.assert_allclose(back.scores(x), guard.scores(x), rtol=1e-12)  # einsum order
    assert back.threshold == guard.threshold
    with pytest.raises(ood.OodError, match="not one of"):
        ood.guard_from_dict({"method": "odin", "threshold": 1.0})
    with pytest.raises(ood.OodError, match="models/ood.json: not a fitted OOD guard"):
        ood.guard_from_dict({"method": "mahalanobis", "threshold": 1.0}, "models/ood.json")
    with pytest.raises(ood.OodError, match=r"classes \[2\] have no training images"):
        ood.fit_guard("mahalanobis", rng.normal(size=(4, 3)), [0, 1, 0, 1], x, 0.9)


@pytest.fixture(scope="module")
def guarded_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ood.OodGuard]:
    """A random-init model exported with a guard and conformal sets in its metadata.

    The guard's threshold is the median score of random images, so about half are flagged;
    the conformal sets come from random calibration probabilities.
    """
    root = tmp_path_factory.mktemp("guarded")
    torch.manual_seed(0)
    model = build_model("custom_cnn", len(CLASSES)).eval()
    with torch.no_grad():
        model.classifier[-1].weight.mul_(20.0)  # opinions that vary per image
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        logits = model(x).numpy()
    y = logits.argmax(axis=1)
    y[:3] = [0, 1, 2]
    fitted = ood.fit_guard("mahalanobis", logits, y, logits, 0.5)
    rng = np.random.default_rng(0)
    cal = rng.dirichlet(np.ones(3), size=200)
    sets = fit_sets(cal, [rng.choice(3, p=row) for row in cal], 0.8)
    (root / "models").mkdir()
    write_json(root / "models" / "ood.json", fitted.to_dict())
    write_json(root / "models" / "conformal.json", sets.to_dict())
    meta = {
        "arch": "custom_cnn",
        "classes": CLASSES,
        "input_size": 32,
        "normalization": {"mean": list(MEAN), "std": list(STD)},
        "data_version": "v1",
    }
    cwd = Path.cwd()
    try:  # guard_metadata reads the stage outs relative to the repo root, as export runs
        import os

        os.chdir(root)
        extra = guard_metadata()
    finally:
        os.chdir(cwd)
    path = export_onnx(
        model, meta, root / "model.onnx", 17, 1.0, referral_threshold=0.5, extra=extra
    )
    return path, fitted


def test_onnx_metadata_carries_guard_and_conformal_quantile(guarded_onnx) -> None:
    path, fitted = guarded_onnx
    meta = read_metadata(path)
    assert meta["ood"]["threshold"] == pytest.approx(fitted.threshold, rel=1e-12)
    assert meta["ood"]["method"] == "mahalanobis"
    assert np.asarray(meta["ood"]["means"]).shape == (3, 3)
    assert 0 < meta["conformal"]["qhat"] <= 1.0 and meta["conformal"]["coverage"] == 0.8


def test_predict_columns_and_referral_rule(guarded_onnx, tmp_path: Path) -> None:
    path, fitted = guarded_onnx
    predictor = load_predictor(path)
    files = [write_image(tmp_path / f"case_{i}.jpg", (40, 40), seed=i) for i in range(24)]
    files.append(tmp_path / "notes.jpg")
    files[-1].write_text("not an image")
    df = predict_files(predictor, files, batch_size=8, progress=False)
    for col in ("ood_score", "ood", "prediction_set", "refer"):
        assert col in df.columns
    good = df[df["error"].isna()]
    assert good["prediction_set"].str.match(r"^\{[A-Z]+(, [A-Z]+)*\}$").all()
    assert good["ood"].astype(bool).tolist() == (good["ood_score"] > fitted.threshold).tolist()
    probs = good[[f"p_{c}" for c in CLASSES]].to_numpy()
    member = np.asarray(
        [[c in s.strip("{}").split(", ") for c in CLASSES] for s in good["prediction_set"]]
    )
    expected = (
        (good["confidence"] < 0.5).to_numpy()
        | good["ood"].astype(bool).to_numpy()
        | ambiguous(member, probs, CLASSES)
    )
    np.testing.assert_array_equal(good["refer"].astype(bool).to_numpy(), expected)
    flagged_confident = good[good["ood"].astype(bool) & (good["confidence"] >= 0.5)]
    assert flagged_confident["refer"].all()  # flagged: referred whatever the confidence
    bad = df[df["error"].notna()].iloc[0]
    assert pd_isna(bad["ood"]) and pd_isna(bad["prediction_set"]) and pd_isna(bad["refer"])


def pd_isna(value: object) -> bool:
    import pandas as pd

    return bool(pd.isna(value))
