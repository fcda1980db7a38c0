"""Metadata fusion: the encoding, the model, its bundle, its explanations and its training;
the metadata prior (late fusion): its log-odds, its fit, its refusals and its training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from tasks.cams import explain_batch
from tasks.config import ConfigError, load_params
from tasks.fusion import (
    EMBED,
    FusionNet,
    ImageOnly,
    MetadataPrior,
    MetadataPriorError,
    feature_names,
    fit_metadata_prior,
    metadata_features,
    prior_from_meta,
)
from tasks.io import file_digest, write_json
from tasks.models import build_model, load_bundle, save_bundle, target_layers
from tasks.prepare import open_split
from tasks.train import MEAN, STD, train
from tests.helpers import TINY, patients, prepare_tiny, write_params
from tests.tolerances import assert_maps_match

SITES = ["back", "face"]


def _rows(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"age": 50.0, "sex": "male", "site": "face"}, [0.5, 0, 1, 0, 0, 1]),
        ({"age": np.nan, "sex": "female", "site": "back"}, [0.0, 1, 0, 1, 1, 0]),
        ({"age": 85.0, "sex": None, "site": None}, [0.85, 0, 0, 0, 0, 0]),
        ({"age": 5.0, "sex": "MALE", "site": "palms/soles"}, [0.05, 0, 1, 0, 0, 0]),  # unseen
    ],
)
def test_metadata_encoding_known_answers(row: dict, expected: list[float]) -> None:
    frame = _rows(**{k: [v] for k, v in row.items()})
    out = metadata_features(frame, SITES)
    assert out.dtype == np.float32 and out.shape == (1, len(feature_names(SITES)))
    np.testing.assert_allclose(out[0], expected, atol=1e-7)


def _fusion(arch: str = "custom_cnn", classes: int = 3, seed: int = 0) -> FusionNet:
    torch.manual_seed(seed)
    return FusionNet(build_model(arch, EMBED), len(feature_names(SITES)), classes, 0.1).eval()


@pytest.mark.parametrize("arch", ["custom_cnn", "resnet18"])
def test_bundle_round_trip_keeps_the_logits(arch: str, tmp_path: Path) -> None:
    model = _fusion(arch)
    x, meta = torch.randn(2, 3, 32, 32), torch.rand(2, len(feature_names(SITES)))
    extra = {"metadata_features": feature_names(SITES), "metadata_sites": SITES}
    path = save_bundle(tmp_path / "m.pt", model, arch, ["a", "b", "c"], 32, MEAN, STD, extra=extra)
    loaded, meta_info = load_bundle(path)
    assert isinstance(loaded, FusionNet)
    assert meta_info["fusion"]["features"] == feature_names(SITES)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, meta), model(x, meta))


def test_metadata_changes_the_prediction() -> None:
    model = _fusion()
    x = torch.randn(1, 3, 32, 32)
    young = metadata_features(_rows(age=[20.0], sex=["male"], site=["back"]), SITES)
    old = metadata_features(_rows(age=[80.0], sex=["female"], site=["face"]), SITES)
    with torch.no_grad():
        a, b = model(x, torch.from_numpy(young)), model(x, torch.from_numpy(old))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ig", "lime"])
def test_image_only_view_explains_like_any_image_model(method: str) -> None:
    """CAM layers resolve through the view; a batch of copies equals one image's map."""
    model = _fusion()
    meta = metadata_features(_rows(age=[60.0], sex=["male"], site=["back"]), SITES)
    view = ImageOnly(model, meta[0])
    assert target_layers(view, "custom_cnn")["deep"] is target_layers(model, "custom_cnn")["deep"]
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits = view(x)
        torch.testing.assert_close(logits, model(x, torch.from_numpy(meta)))
    c = int(logits.argmax())
    one = explain_batch(view, "custom_cnn", method, x, [c], "middle", ig_steps=4)
    two = explain_batch(
        view, "custom_cnn", method, x.repeat(2, 1, 1, 1), [c, c], "middle", ig_steps=4
    )
    assert one.shape == (1, 64, 64) and np.isfinite(one).all() and one.max() > 0
    assert_maps_match(two, np.concatenate([one, one]), f"{method}: batch 2 vs batch 1")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, object]:
    """A prepared 32-px synthetic set (3 classes, 150 images) and the matching params."""
    root = tmp_path_factory.mktemp("prepared")
    return root, prepare_tiny(root)


def test_training_a_fusion_model_end_to_end(prepared, tmp_path: Path) -> None:
    root, p = prepared
    model_cfg = dataclasses.replace(p.model, metadata=True)
    train_cfg = dataclasses.replace(p.train, epochs=1)
    result = train(model_cfg, train_cfg, root / "prepared", tmp_path / "ck.pt", show_progress=False)
    assert isinstance(result.model, FusionNet)
    sites = result.extra["metadata_sites"]
    assert sites and result.extra["metadata_features"] == feature_names(sites)
    test = open_split(root / "prepared", "test")
    assert result.test_logits.shape == (len(test.labels), len(test.classes))
    assert np.isfinite(result.test_logits).all() and 0.0 <= result.test["balanced_accuracy"] <= 1
    # The logits come from the image AND that image's own metadata row.
    x = torch.from_numpy(np.array(test.images[:4])).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    meta = torch.from_numpy(metadata_features(test.rows.iloc[:4], sites))
    with torch.no_grad():
        np.testing.assert_allclose(result.model(x, meta).numpy(), result.test_logits[:4], atol=1e-4)


def test_export_refuses_a_fusion_bundle_naming_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", TINY)
    bundle = tmp_path / "models" / "model.pt"
    save_bundle(bundle, _fusion(), "custom_cnn", ["a", "b", "c"], 32, MEAN, STD)
    # The run file a successful training leaves beside its bundle: the lineage check passes,
    # so the refusal below is the fusion one.
    write_json(
        tmp_path / "models" / "run.json", {"run_id": "r1", "bundle_sha256": file_digest(bundle)}
    )
    result = CliRunner().invoke(app, ["export"])
    assert result.exit_code == 2  # EXIT_BAD_INPUT
    text = result.output.replace("\n", " ")
    assert "model.metadata" in text and "dermaflow compare" in text


def test_exact_cam_refuses_a_fusion_model_and_deeplift_runs() -> None:
    model = FusionNet(build_model("resnet18", EMBED), len(feature_names(SITES)), 3).eval()
    meta = metadata_features(_rows(age=[40.0], sex=["female"], site=["face"]), SITES)
    view = ImageOnly(model, meta[0])
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="metadata-fusion"):
        explain_batch(view, "resnet18", "cam", x, [0, 1], "deep")
    maps = explain_batch(view, "resnet18", "deeplift", x, [0, 1])
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()


# --------------------------------------------------------------------------------------------
# The metadata prior
# --------------------------------------------------------------------------------------------

PRIOR_CLASSES = ["BCC", "NV", "MEL"]


def test_prior_is_sklearns_log_posterior_over_the_class_frequencies() -> None:
    """log_odds = log p(y | m) of the same regression fitted directly - log p(y)."""
    from sklearn.linear_model import LogisticRegression

    rows, y = patients()
    prior = fit_metadata_prior(rows, y, PRIOR_CLASSES, c=0.5)
    x = metadata_features(rows, prior.sites)
    ref = LogisticRegression(C=0.5, max_iter=5000).fit(x.astype(np.float64), y)
    expected = np.log(ref.predict_proba(x)) - np.log(np.bincount(y) / len(y))
    got = prior.log_odds(rows)
    assert got.dtype == np.float32 and got.shape == (len(rows), 3)
    np.testing.assert_allclose(got, expected, atol=1e-4)  # float32 output of float64 sums
    # What the metadata says: an old patient's face lesion leans BCC, a young back one NV.
    cases = _rows(age=[75.0, 25.0], sex=["male", "female"], site=["face", "back"])
    assert prior.log_odds(cases).argmax(axis=1).tolist() == [0, 1]


def test_prior_adds_nothing_without_metadata_and_survives_its_own_dict() -> None:
    rows, y = patients()
    prior = fit_metadata_prior(rows, y, PRIOR_CLASSES)
    blank = _rows(age=[np.nan, np.nan], sex=[None, None], site=[None, "palms/soles"])
    term = prior.log_odds(blank)
    assert (term[0] == 0).all()  # no metadata at all: the image model's own answer
    assert (term[1] != 0).any()  # an unseen site is still a row with metadata
    again = prior_from_meta({"metadata_prior": prior.to_dict()})
    assert again is not None and again.sites == prior.sites
    np.testing.assert_allclose(again.log_odds(rows), prior.log_odds(rows), atol=1e-6)
    assert prior_from_meta({}) is None and prior_from_meta(None) is None
    broken = {**prior.to_dict(), "intercept": [0.0, 0.0]}
    with pytest.raises(ValueError, match="do not fit 3 classes"):
        MetadataPrior.from_dict(broken)


def test_prior_is_none_without_metadata_and_refuses_a_class_without_it() -> None:
    rows, y = patients()
    blank = rows.copy()
    blank[["age", "sex", "site"]] = [np.nan, None, None]
    assert fit_metadata_prior(blank, y, PRIOR_CLASSES) is None  # p(y | m) = p(y): adds zero
    gone = y == PRIOR_CLASSES.index("MEL")
    rows.loc[gone, ["age", "sex", "site"]] = [np.nan, None, None]
    with pytest.raises(MetadataPriorError, match="no row with age, sex or site for class MEL"):
        fit_metadata_prior(rows, y, PRIOR_CLASSES)


def test_bayes_fusion_beats_either_half_when_both_carry_signal() -> None:
    """Image and metadata independent given the class: the sum recovers more than either.

    The image logits here are exact class log-likelihoods of a 1-D Gaussian feature, so this
    checks the Bayes rule the prior implements, not a trained network.
    """
    from sklearn.metrics import balanced_accuracy_score

    rows, y = patients(4000, seed=1)
    test_rows, y_test = patients(4000, seed=2)
    prior = fit_metadata_prior(rows, y, PRIOR_CLASSES)
    feature = np.random.default_rng(3).normal(y_test.astype(float), 1.0)  # class means 0, 1, 2
    image = -0.5 * (feature[:, None] - np.arange(3)[None, :]) ** 2  # log p(x | y) + const
    fused = image + prior.log_odds(test_rows)
    scores = {
        name: balanced_accuracy_score(y_test, z.argmax(axis=1))
        for name, z in (("image", image), ("meta", prior.log_odds(test_rows)), ("fused", fused))
    }
    assert scores["fused"] > max(scores["image"], scores["meta"]) + 0.02, scores


def test_config_refuses_both_kinds_of_metadata_use(tmp_path: Path) -> None:
    path = write_params(tmp_path / "params.yaml", TINY)
    assert load_params(path).model.metadata_prior is True  # the default
    assert load_params(path, ["model.metadata=true", "model.metadata_prior=false"]).model.metadata
    with pytest.raises(ConfigError, match="model.metadata_prior: a fusion model"):
        load_params(path, ["model.metadata=true"])


def test_training_with_the_metadata_prior_writes_the_fused_logits(prepared, tmp_path) -> None:
    """The predictions are the image model's logits plus the prior the bundle carries."""
    from tasks.models import with_tta
    from tasks.train import save_model_bundle

    root, p = prepared
    model_cfg = dataclasses.replace(p.model, metadata_prior=True)
    train_cfg = dataclasses.replace(p.train, epochs=1)
    result = train(model_cfg, train_cfg, root / "prepared", tmp_path / "ck.pt", show_progress=False)
    prior = prior_from_meta(result.extra)
    assert prior is not None and prior.classes == tuple(result.classes)
    assert 0 <= result.extra["image_only"]["test_balanced_accuracy"] <= 1
    save_model_bundle(tmp_path / "m.pt", result, p.model.arch, "v1")
    model, meta = load_bundle(tmp_path / "m.pt")
    assert prior_from_meta(meta["extra"]).to_dict() == prior.to_dict()  # the bundle carries it
    test = open_split(root / "prepared", "test")
    x = torch.from_numpy(np.array(test.images)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image = with_tta(model, meta["extra"].get("tta")).eval()(x).numpy()
    np.testing.assert_allclose(result.test_logits, image + prior.log_odds(test.rows), atol=1e-4)
    assert np.abs(prior.log_odds(test.rows)).max() > 0.01  # the synthetic set has metadata
