"""Metadata fusion: the encoding, the model, its bundle, its explanations and its training."""

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
from tasks.fusion import EMBED, FusionNet, ImageOnly, feature_names, metadata_features
from tasks.io import file_digest, write_json
from tasks.models import build_model, load_bundle, save_bundle, target_layers
from tasks.prepare import open_split
from tasks.train import MEAN, STD, train
from tests.helpers import TINY, prepare_tiny, write_params
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
