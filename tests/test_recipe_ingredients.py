"""The real-data recipe's ingredients, each a params switch, on tiny data.

Long-tail losses (logit adjustment, deferred re-weighting), Shades of Gray colour constancy in
the one shared decode, an EMA of the weights, Mixup / CutMix soft targets and test-time
augmentation inside the exported graph. Each is checked against an independent computation
(torch's own cross-entropy, views computed by hand, the training cache's bytes, onnxruntime).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.config import ConfigError, load_params
from tasks.losses import FocalLoss, LogitAdjustedLoss, epoch_class_weights, make_loss
from tasks.models import TTAClassifier, build_model, load_bundle, save_bundle, with_tta
from tasks.prepare import color_constancy, decode_one, shades_of_gray
from tests.helpers import REPO, TINY, write_params
from tests.tolerances import PROB_ATOL

# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("tau", [0.0, 1.0, 1.5])
def test_logit_adjusted_loss_is_cross_entropy_on_prior_shifted_logits(tau: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 4, generator=gen) * 3
    target = torch.randint(0, 4, (16,), generator=gen)
    counts = torch.tensor([50.0, 20.0, 5.0, 1.0])
    weight = torch.tensor([0.5, 1.0, 2.0, 4.0])
    shifted = logits + tau * torch.log(counts / counts.sum())
    for w, eps in ((None, 0.0), (weight, 0.1)):
        got = LogitAdjustedLoss(counts, tau, w, eps)(logits, target)
        want = F.cross_entropy(shifted, target, weight=w, label_smoothing=eps)
        torch.testing.assert_close(got, want)
    soft = torch.softmax(torch.randn(16, 4, generator=gen), dim=1)  # Mixup / CutMix targets
    got = make_loss("logit_adjusted", weight, prior=counts, tau=tau)(logits, soft)
    torch.testing.assert_close(got, F.cross_entropy(shifted, soft, weight=weight))
    if tau > 0:  # the rare class needs a margin: the same logits cost more when it is the label
        rare = LogitAdjustedLoss(counts, tau)(torch.zeros(1, 4), torch.tensor([3]))
        common = LogitAdjustedLoss(counts, tau)(torch.zeros(1, 4), torch.tensor([0]))
        assert float(rare) > float(common)


def test_logit_adjusted_needs_a_prior_and_focal_refuses_soft_targets() -> None:
    with pytest.raises(ValueError, match="class counts"):
        make_loss("logit_adjusted")
    with pytest.raises(ValueError, match="soft targets"):
        FocalLoss()(torch.zeros(2, 3), torch.full((2, 3), 1 / 3))


def test_focal_with_mixup_is_a_config_error(tmp_path: Path) -> None:
    path = write_params(tmp_path / "params.yaml", ["train.loss=focal", "train.cutmix_alpha=1.0"])
    with pytest.raises(ConfigError, match="focal takes class indices"):
        load_params(path)


@pytest.mark.parametrize("clash", ["train.mixup_alpha=0.2", "train.compile=true"])
def test_mask_loss_with_mixing_or_compile_is_a_config_error(tmp_path: Path, clash: str) -> None:
    path = write_params(tmp_path / "params.yaml", ["train.mask_loss=0.5", clash])
    with pytest.raises(ConfigError, match="train.mask_loss: the auxiliary mask loss cannot"):
        load_params(path)


def test_deferred_reweighting_switches_the_weights_on_at_drw_epoch() -> None:
    weights = torch.tensor([0.4, 1.0, 3.0])
    for epoch in range(3):
        assert torch.equal(epoch_class_weights(weights, epoch, 3), torch.ones(3))
    for epoch in (3, 4, 11):
        assert torch.equal(epoch_class_weights(weights, epoch, 3), weights)
    assert torch.equal(epoch_class_weights(weights, 0, 0), weights)  # 0 = no deferral


# ----------------------------------------------------------------------------- colour


def test_shades_of_gray_neutralises_a_colour_cast() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(60, 200, size=(24, 24, 1)).repeat(3, axis=2).astype(np.float64)
    cast = np.clip(grey * np.array([1.3, 1.0, 0.7]), 0, 255).astype(np.uint8)
    fixed = shades_of_gray(cast).astype(np.float64)
    illuminant = np.power(np.mean(np.power(fixed, 6), axis=(0, 1)), 1 / 6)
    assert np.ptp(illuminant) / illuminant.mean() < 0.02  # the p-norm illuminant is grey
    before = np.power(np.mean(np.power(cast.astype(np.float64), 6), axis=(0, 1)), 1 / 6)
    assert np.ptp(before) / before.mean() > 0.4
    assert np.array_equal(color_constancy(cast, "none"), cast)
    with pytest.raises(ValueError, match="shades_of_gray"):
        color_constancy(cast, "retinex")


# ----------------------------------------------------------------------------- TTA


def _tiny_model(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("custom_cnn", classes, dropout=0.0).eval()


@pytest.mark.parametrize("mode", ["flips", "flips_rot90"])
def test_tta_is_the_mean_softmax_of_the_views_computed_by_hand(mode: str) -> None:
    model = _tiny_model()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    views = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)]
    if mode == "flips_rot90":
        views += [torch.rot90(v, 1, dims=(2, 3)).flip(2) for v in views]  # = the transposes
    with torch.no_grad():
        by_hand = torch.stack([torch.softmax(model(v), dim=1) for v in views]).mean(0)
        got = TTAClassifier(model, mode)(x).exp()
    torch.testing.assert_close(got, by_hand, rtol=0, atol=PROB_ATOL)
    assert len({tuple(v.flatten()[:5].tolist()) for v in views}) == len(views)  # all distinct
    assert with_tta(model, "none") is model


# ----------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def tiny_cc(tmp_path_factory) -> tuple[Path, object]:
    """A 32-px synthetic set (60 images) prepared with Shades of Gray colour constancy."""
    from tasks.ingest import build_manifest
    from tasks.prepare import prepare
    from tasks.split import split_manifest, write_splits
    from tasks.synth import generate

    root = tmp_path_factory.mktemp("cc")
    over = [*TINY, "synth.count=60", "prepare.color_constancy=shades_of_gray"]
    p = load_params(write_params(root / "params.yaml", over))
    generate(p.synth, root / "raw", progress=False)
    manifest = build_manifest(root / "raw", progress=False)
    frame, _ = split_manifest(manifest, p.split.fractions, p.split.seed)
    write_splits(frame, root / "splits")
    prepare(
        root / "splits", root / "raw", root / "prepared", size=32, show_progress=False,
        color="shades_of_gray",
    )  # fmt: skip
    return root, p


def test_cache_predict_and_onnx_agree_with_colour_constancy_and_tta(tiny_cc, tmp_path) -> None:
    from tasks.export import CalibratedClassifier, export_onnx, normalize, read_metadata
    from tasks.predict import load_predictor, predict_files, preprocess
    from tasks.prepare import open_split
    from tasks.train import MEAN, STD

    root, _ = tiny_cc
    test = open_split(root / "prepared", "test")
    assert test.color_constancy == "shades_of_gray"
    files = [root / "raw" / p for p in test.rows["path"][:3]]
    cache = np.asarray(test.images[:3])
    for f, cached in zip(files, cache, strict=True):
        plain, _, _ = decode_one(f, None, 32, "center_crop")
        assert np.array_equal(decode_one(f, None, 32, "center_crop", "shades_of_gray")[0], cached)
        assert not np.array_equal(plain, cached)  # the setting changes the pixels
        np.testing.assert_array_equal(
            preprocess(f, 32, MEAN, STD, color="shades_of_gray"),
            normalize(cached[None], MEAN, STD)[0],
        )

    extra = {"color_constancy": "shades_of_gray", "tta": "flips_rot90"}
    save_bundle(tmp_path / "model.pt", _tiny_model(len(test.classes)), "custom_cnn",
                test.classes, 32, MEAN, STD, extra=extra)  # fmt: skip
    model, meta = load_bundle(tmp_path / "model.pt")
    scored = with_tta(model, meta["extra"]["tta"])
    onnx_path = export_onnx(scored, meta, tmp_path / "model.onnx", 18, 1.3)
    assert read_metadata(onnx_path)["color_constancy"] == "shades_of_gray"
    predictor = load_predictor(onnx_path, provider="cpu")
    assert predictor.color_constancy == "shades_of_gray"  # from the file, not params.yaml
    table = predict_files(predictor, files, progress=False, referral_threshold=None)
    onnx_probs = table[[f"p_{c}" for c in test.classes]].to_numpy(np.float64)
    with torch.no_grad():
        x = torch.from_numpy(normalize(cache, MEAN, STD))
        _, torch_probs = CalibratedClassifier(scored, 1.3).eval()(x)
        _, single_view = CalibratedClassifier(model, 1.3).eval()(x)
    np.testing.assert_allclose(onnx_probs, torch_probs.numpy(), rtol=0, atol=PROB_ATOL)
    assert np.abs(single_view.numpy() - torch_probs.numpy()).max() > 10 * PROB_ATOL


# ----------------------------------------------------------------------------- training


def test_ema_warms_up_then_averages_at_the_configured_decay() -> None:
    """The average follows the weights early (decay (1+n)/(10+n)), then decays at 0.9."""
    from tasks.train import ema_decay_at, make_ema

    assert ema_decay_at(0.999, 0) == pytest.approx(0.1) and ema_decay_at(0.999, 10**6) == 0.999
    model = torch.nn.Linear(1, 1, bias=False)
    ema = make_ema(model, 0.9)
    expected = None
    for step in range(120):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.update_parameters(model)
        d = ema_decay_at(0.9, step)  # torch passes the updates so far; the first one copies
        expected = float(step) if expected is None else d * expected + (1 - d) * float(step)
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6), step
    assert ema_decay_at(0.9, 119) == 0.9  # the last updates ran at the configured decay
    # a fixed 0.999 would still hold 89 % of the first weights after 120 steps; this is recent
    assert ema.module.weight.item() > 100.0


def test_ema_bundle_holds_the_averaged_weights_with_every_switch_on(tiny_cc, tmp_path) -> None:
    """One epoch with EMA, Mixup + CutMix, logit adjustment, DRW and TTA on a colour cache."""
    from tasks.train import TrainResult, save_model_bundle, train

    root, p = tiny_cc
    cfg = dataclasses.replace(
        p.train, epochs=1, batch_size=16, ema_decay=0.5, mixup_alpha=0.4, cutmix_alpha=1.0,
        mix_prob=1.0, loss="logit_adjusted", logit_tau=1.0, drw_epoch=1, tta="flips",
    )  # fmt: skip
    image_only = dataclasses.replace(p.model, metadata_prior=False)  # its log-odds: checked last
    result: TrainResult = train(
        image_only, cfg, root / "prepared", tmp_path / "ckpt.pt", "v1", show_progress=False,
        color="shades_of_gray",
    )  # fmt: skip
    assert result.extra["tta"] == "flips" and result.extra["color_constancy"] == "shades_of_gray"
    assert np.isfinite(result.history[0]["train_loss"])
    save_model_bundle(tmp_path / "model.pt", result, "custom_cnn", "v1")
    bundle = torch.load(tmp_path / "model.pt", weights_only=True)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"}
    raw = ckpt["model"]
    assert bundle["state_dict"].keys() == raw.keys()
    differs = False
    for key, value in bundle["state_dict"].items():
        torch.testing.assert_close(value, ema[key], rtol=0, atol=0)
        differs |= value.is_floating_point() and not torch.equal(value, raw[key])
    assert differs  # the raw weights are not what was saved
    # the final logits are TTA log-probabilities: they exponentiate to distributions
    np.testing.assert_allclose(np.exp(result.test_logits).sum(1), 1.0, atol=PROB_ATOL)
    # With the metadata prior, the same network's log-probabilities plus the prior's log-odds.
    from tasks.fusion import prior_from_meta
    from tasks.prepare import open_split

    fused = train(p.model, cfg, root / "prepared", tmp_path / "ckpt2.pt", "v1",
                  show_progress=False, color="shades_of_gray")  # fmt: skip
    prior = prior_from_meta(fused.extra)
    term = prior.log_odds(open_split(root / "prepared", "test").rows)
    np.testing.assert_allclose(np.exp(fused.test_logits - term).sum(1), 1.0, atol=PROB_ATOL)


def test_a_cache_written_without_colour_constancy_gets_it_on_load(tiny_cc, tmp_path) -> None:
    """Compare shares one cache: color on load equals a cache written with it."""
    from tasks.prepare import open_split
    from tasks.train import CachedImages

    root, _ = tiny_cc
    split = open_split(root / "prepared", "val")
    files = [root / "raw" / path for path in split.rows["path"]]
    plain = np.stack([decode_one(f, None, 32, "center_crop")[0] for f in files])
    raw_split = dataclasses.replace(split, images=plain, color_constancy="none")
    on_load = CachedImages(raw_split, color="shades_of_gray")
    for i in range(len(files)):
        assert np.array_equal(on_load[i][0].numpy(), np.asarray(split.images[i]))


# ----------------------------------------------------------------------------- the recipe

ABLATION = REPO / "configs" / "recipes" / "ham10000_dev_ablation.yaml"


@pytest.mark.slow
def test_ablation_recipe_runs_end_to_end_on_tens_of_images(tmp_path: Path) -> None:
    """Every variant of the ablation trains, is calibrated and reported, baseline first."""
    import pandas as pd
    import yaml

    from tests.helpers import make_project, run

    project = make_project(tmp_path / "proj", [])
    tiny = [
        "synth.count=60", "synth.image_size=40", "synth.class_mix={NV: 0.5, MEL: 0.3, BCC: 0.2}",
        "validate.min_side=32", "ingest.workers=1", "prepare.workers=1", "prepare.size=32",
        "train.epochs=1", "train.batch_size=32", "train.warmup_epochs=0",
        "compare.explain_images=2", "explain.ig_steps=2",
    ]  # fmt: skip
    sets = [a for o in tiny for a in ("--set", o)]
    # All the variants are checked against the config when the recipe loads (a bad override
    # stops it before any work); three of them train here, to keep the suite within its
    # budget: the baseline row, a loss row and the last row: preset A with the metadata prior.
    recipe = yaml.safe_load(ABLATION.read_text())
    variants = list(recipe["compare"]["variants"])
    assert variants[0] == "baseline" and len(variants) >= 10
    kept = [variants[0], "logit_adjusted", variants[-1]]
    recipe["compare"]["variants"] = {k: recipe["compare"]["variants"][k] for k in kept}
    trimmed = tmp_path / "ablation.yaml"
    trimmed.write_text(yaml.safe_dump(recipe, sort_keys=False))
    check = tmp_path / "check.yaml"  # every variant validates, without touching the project
    shutil.copy(project / "params.yaml", check)
    run(["dermaflow", "preset", str(ABLATION), "--params", str(check)], project)
    run(["dermaflow", "recipe", str(trimmed), "--no-refresh", *sets], project)
    table = pd.read_csv(project / "reports" / "compare" / "comparison.csv")
    assert list(table["model"]) == kept
    # The last row is preset A with the metadata prior: it alone adds age, sex and site.
    assert table["metadata_prior"].tolist() == [False, False, True]
    ba = table["balanced_accuracy"]
    assert (table["balanced_accuracy_ci_low"] <= ba).all()
    assert (ba <= table["balanced_accuracy_ci_high"]).all()
    assert table[["ece_before", "ece_after", "train_minutes"]].notna().all().all()
    np.testing.assert_allclose(table["train_minutes"] * 60, table["train_seconds"])
    # Which ingredients earn their place: each row against the bare script, same test images.
    paired = pd.read_csv(project / "reports" / "compare" / "paired.csv")
    assert list(paired["model"]) == kept[1:] and set(paired["reference"]) == {"baseline"}
    gain = table.set_index("model")["balanced_accuracy"] - ba[0]
    np.testing.assert_allclose(paired["gain"], gain[kept[1:]], atol=1e-9)
