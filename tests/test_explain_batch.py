"""explain-batch: the Prefect flow over new images, on threads, on Dask, and from the registry.

Real Prefect (its test harness starts a temporary server once per session), a real sqlite
MLflow store in a temp folder, real JPEG/PNG files with a corrupt one among them (two with
lesion masks, ISIC- and HAM10000-style), and a random-init custom CNN at 32 px: the numbers
mean nothing, the plumbing is what is tested.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from flows.explain_batch import ExplainBatchError, explain_chunk, run_explain_batch
from tasks import tracking
from tasks.explain_text import OUTSIDE_SHARE
from tasks.export import normalize
from tasks.metrics import softmax
from tasks.models import build_model, load_bundle, save_bundle
from tasks.predict import load_image
from tasks.train import MEAN, STD
from tests.datasets import not_an_image, write_image, write_mask
from tests.helpers import patients, write_params

SIZE = 32
CLASSES = ["MEL", "NV", "BCC"]
EXPERIMENT = "explain-batch-test"
REGISTERED = "explain-batch-test-model"
PAIRS = {("gradcam", "deep"), ("ig", "input")}


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    patch = pytest.MonkeyPatch()
    patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network: no telemetry
    # The temporary server can take over 30 s (the default) to start on a busy 2-core machine.
    with prefect_test_harness(server_startup_timeout=120):
        yield
    patch.undo()


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A bundle, a folder of five good images and a corrupt one, params, an MLflow store."""
    root = tmp_path_factory.mktemp("explain_batch")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.configure()
    MlflowClient().create_experiment(EXPERIMENT, (root / "artifacts").as_uri())
    torch.manual_seed(0)
    model = build_model("custom_cnn", len(CLASSES))
    bundle = save_bundle(
        root / "model" / "model.pt", model, "custom_cnn", CLASSES, SIZE, MEAN, STD, temperature=1.5
    )
    folder = root / "new"
    for i, (name, size) in enumerate(
        [("a.jpg", (48, 48)), ("b.png", (40, 56)), ("c.jpg", (64, 40))]
        + [("sub/d.jpg", (48, 48)), ("sub/e.png", (33, 33))]
    ):
        write_image(folder / name, size, seed=i)
    not_an_image(folder / "broken.jpg")
    write_mask(folder / "a_segmentation.png", (48, 48))  # beside its image (ISIC)
    write_mask(folder / "segmentations" / "d_segmentation.png", (48, 48))  # elsewhere (HAM)
    params = write_params(
        root / "params.yaml",
        [
            f"tracking.experiment={EXPERIMENT}",
            "explain.methods=[gradcam, ig]",
            "explain.layers=[deep]",
            "explain.ig_steps=4",
            "explain.batch_size=4",
            "orchestration.retries=0",
            "orchestration.chunk_size=2",
        ],
    )
    yield SimpleNamespace(root=root, bundle=bundle, folder=folder, params=params, uri=uri)
    patch.undo()


@pytest.fixture(autouse=True)
def store(ws: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every test at the module's store (conftest clears MLflow URIs between tests)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ws.uri)
    tracking.configure()


@pytest.fixture(scope="module")
def local(ws: SimpleNamespace, prefect_server: None):
    """One run on Prefect's default (thread pool) runner, shared by the assertions below."""
    with pytest.MonkeyPatch.context() as patch:  # module scope: set up before ``store`` runs
        patch.setenv("MLFLOW_TRACKING_URI", ws.uri)
        return run_explain_batch(
            [ws.folder], str(ws.bundle), out_dir=ws.root / "out_local", params_path=ws.params
        )


def _calibrated(bundle: Path, files: list[str], temperature: float) -> np.ndarray:
    """Probabilities computed by hand: the prepare decode, the model, softmax(logits / T)."""
    model, meta = load_bundle(bundle)
    raw = np.stack([load_image(f, SIZE, "center_crop") for f in files])
    with torch.no_grad():
        logits = model(torch.from_numpy(normalize(raw, MEAN, STD))).numpy()
    return softmax(logits / temperature)


def test_local_run_writes_every_output_and_an_error_row(ws: SimpleNamespace, local) -> None:
    out = local.out_dir
    errors = local.table[local.table["error"].notna()]
    assert len(errors) == 1 and errors.iloc[0]["image"].endswith("broken.jpg")
    assert "broken.jpg" in errors.iloc[0]["error"]

    good = local.table[local.table["error"].isna()]
    ids = {"a", "b", "c", "d", "e"}
    assert set(good["image_id"]) == ids and len(good) == len(ids) * len(PAIRS)
    assert set(zip(good["method"], good["layer"], strict=True)) == PAIRS
    assert good["text"].str.startswith("Predicted").all()
    assert good["average_drop"].between(0, 1).all()
    located = good[good["mask"].notna()]  # a and d: scored against their lesion
    assert set(located["image_id"]) == {"a", "d"}
    assert set(located["mask"].map(lambda m: Path(m).name)) == {
        "a_segmentation.png", "d_segmentation.png"
    }  # fmt: skip
    for column in ("pointing_game", "energy_pointing_game", "iou"):
        assert located[column].astype(float).between(0, 1).all(), column
        assert good.loc[good["mask"].isna(), column].isna().all(), column
    outside = 1 - located["energy_pointing_game"].astype(float) > OUTSIDE_SHARE
    assert located["outside_flag"].tolist() == outside.tolist()  # the sentence's rule
    lesion = np.asarray(Image.open(out / "overlays" / "a.png"))
    assert ((lesion == (0, 255, 255)).all(axis=-1)).any()  # the input, outlined
    plain = np.asarray(Image.open(out / "overlays" / "b.png"))
    assert not ((plain == (0, 255, 255)).all(axis=-1)).any()

    with np.load(out / "heatmaps.npz") as npz:
        keys = {f"{i}__{m}__{lay}" for i in ids for m, lay in PAIRS}
        assert set(npz.files) == keys
        for key in keys:
            assert npz[key].dtype == np.float16 and npz[key].shape == (SIZE, SIZE)
            assert Image.open(out / "overlays" / f"{key}.png").mode == "RGB"
    assert not (out / "_shards").exists()
    assert len(pd.read_parquet(out / "explanations.parquet")) == len(local.table) == 11

    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == 6 and preds["error"].notna().sum() == 1
    ok = preds[preds["error"].isna()]
    probs = ok[[f"p_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs, _calibrated(ws.bundle, list(ok["image"]), 1.5), atol=1e-5)

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["errors"], summary["chunks"]) == (5, 1, 3)
    assert summary["masks"] == 2
    assert {(r["method"], r["layer"]) for r in summary["localisation"]} == PAIRS
    assert all(r["images"] == 2 for r in summary["localisation"])
    config = json.loads((out / "config.json").read_text())
    assert config["calibration"]["source"] == "bundle temperature"
    assert "broken.jpg" in (out / "gallery.html").read_text()

    run = MlflowClient().get_run(local.mlflow_run_id)
    assert run.data.tags["model_uri"] == str(ws.bundle)
    assert run.data.tags["source"] == str(ws.folder)
    assert run.data.metrics["images"] == 5 and run.data.metrics["errors"] == 1
    assert run.data.metrics["masks"] == 2
    assert 0 <= run.data.metrics["xai_gradcam_deep_pointing_game"] <= 1
    logged = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "explain_batch")}
    assert {"explain_batch/heatmaps.npz", "explain_batch/predictions.csv"} <= logged


def test_a_mask_that_does_not_fit_its_image_makes_an_error_row(
    ws: SimpleNamespace, tmp_path: Path
) -> None:
    """The chunk task itself (no flow): each mask problem names the mask and the rule; the
    image without a mask in the same chunk is still explained."""
    from tasks.config import load_params

    image = write_image(tmp_path / "x.jpg", (64, 48))
    wrong = write_mask(tmp_path / "masks" / "wrong.png", (48, 48))
    broken = not_an_image(tmp_path / "masks" / "broken.png")
    items = [
        (str(image), "wrong", str(wrong), None),
        (str(image), "broken", str(broken), None),
        (str(image), "two", None, f"{image}: 2 masks could be its mask (m1, m2)"),
        (str(image), "plain", None, None),
    ]
    calibration = {"calibrator": {"method": "temperature", "temperature": 1.0}}
    calibration["referral_threshold"] = None  # as resolve_calibration gives it without one
    cfg = load_params(ws.params).explain
    out = explain_chunk.fn(items, 0, str(ws.bundle), None, calibration, cfg, "center_crop",
                           str(tmp_path / "staging"), 0.02)  # fmt: skip
    errors = {r["image_id"]: r["error"] for r in out["rows"] if r["error"]}
    assert set(errors) == {"wrong", "broken", "two"}
    assert (
        errors["wrong"].startswith(str(wrong))
        and "validate.mask_aspect_tolerance" in errors["wrong"]
    )
    assert errors["broken"].startswith(str(broken)) and "cannot decode the mask" in errors["broken"]
    assert errors["two"].endswith("2 masks could be its mask (m1, m2)")
    plain = [r for r in out["rows"] if r["image_id"] == "plain"]
    assert len(plain) == len(PAIRS) and all(r["mask"] is None for r in plain)


def test_dask_cluster_gives_the_same_table(ws: SimpleNamespace, local) -> None:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        result = run_explain_batch(
            [ws.folder],
            str(ws.bundle),
            out_dir=ws.root / "out_dask",
            params_path=ws.params,
            dask_address=cluster.scheduler_address,
        )
    pd.testing.assert_frame_equal(result.table, local.table, rtol=1e-4)
    pd.testing.assert_frame_equal(result.predictions, local.predictions, rtol=1e-5)
    with (
        np.load(result.out_dir / "heatmaps.npz") as a,
        np.load(local.out_dir / "heatmaps.npz") as b,
    ):
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_allclose(a[key], b[key], atol=2e-3)


def test_registry_alias_with_the_runs_calibrator(ws: SimpleNamespace, prefect_server) -> None:
    model, _ = load_bundle(ws.bundle)
    experiment_id = MlflowClient().get_experiment_by_name(EXPERIMENT).experiment_id
    calibration = ws.root / "calibrate" / "calibrator.json"
    calibration.parent.mkdir()
    calibration.write_text(json.dumps({"method": "temperature", "temperature": 2.0}))
    with mlflow.start_run(experiment_id=experiment_id) as lineage:  # the train stage's layout
        tracking.log_artifacts({"bundle": ws.bundle, "calibrate": calibration.parent})
        tracking.log_metrics({"referral_threshold": 0.5})
        example = np.zeros((1, 3, SIZE, SIZE), dtype=np.float32)
        _, version = tracking.log_pytorch_model(model, example, REGISTERED)
    tracking.set_alias(REGISTERED, "champion", version)

    result = run_explain_batch(
        [ws.folder],
        f"models:/{REGISTERED}@champion",
        methods=["gradcam"],
        out_dir=ws.root / "out_registry",
        chunk_size=8,
        params_path=ws.params,
    )
    tags = MlflowClient().get_run(result.mlflow_run_id).data.tags
    assert tags["model_name"] == REGISTERED and tags["model_version"] == version
    assert tags["model_alias"] == "champion" and tags["model_run_id"] == lineage.info.run_id
    ok = result.predictions[result.predictions["error"].isna()]
    probs = ok[[f"p_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs, _calibrated(ws.bundle, list(ok["image"]), 2.0), atol=1e-5)
    assert ok["refer"].tolist() == (ok["confidence"] < 0.5).tolist()
    assert set(result.table["method"].dropna()) == {"gradcam"}


def test_cli_exits_non_zero_naming_the_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"\0")  # hidden: skipped (any other file gets a row)
    result = CliRunner().invoke(app, ["explain-batch", str(empty)])
    assert result.exit_code == 2 and str(empty) in result.output.replace("\n", "")

    write_image(empty / "x.jpg")
    missing = tmp_path / "no_model.pt"
    result = CliRunner().invoke(app, ["explain-batch", str(empty), "--model", str(missing)])
    assert result.exit_code == 2 and str(missing) in result.output.replace("\n", "")


def test_a_metadata_prior_moves_the_images_with_metadata(
    ws: SimpleNamespace, prefect_server: None
) -> None:
    """``--metadata``: p = softmax((logits + prior) / T) where a file's stem has a row."""
    from tasks.fusion import fit_metadata_prior
    from tasks.predict import PredictError

    prior = fit_metadata_prior(*patients(), CLASSES)
    model, _ = load_bundle(ws.bundle)
    bundle = save_bundle(
        ws.root / "prior" / "model.pt", model, "custom_cnn", CLASSES, SIZE, MEAN, STD,
        temperature=1.5, extra={"metadata_prior": prior.to_dict()},
    )  # fmt: skip
    table = ws.root / "patients.csv"
    table.write_text("image_id,age,sex,site\na,80,female,face\nc,,,back\nzzz,40,male,back\n")
    result = run_explain_batch(
        [ws.folder], str(bundle), out_dir=ws.root / "out_prior", params_path=ws.params,
        metadata=table,
    )  # fmt: skip
    preds = pd.read_csv(ws.root / "out_prior" / "predictions.csv").set_index("image_id")
    ok = preds[preds["error"].isna()].sort_index()
    assert ok["metadata"].tolist() == [True, False, True, False, False]  # a b c d e
    files = list(ok["image"])
    raw = np.stack([load_image(f, SIZE, "center_crop") for f in files])
    with torch.no_grad():
        logits = model(torch.from_numpy(normalize(raw, MEAN, STD))).numpy()
    rows = pd.DataFrame(
        {"age": [80.0, None, None, None, None], "sex": ["female", None, None, None, None],
         "site": ["face", None, "back", None, None]}
    )  # fmt: skip
    expected = softmax((logits + prior.log_odds(rows)) / 1.5)
    np.testing.assert_allclose(ok[[f"p_{c}" for c in CLASSES]], expected, atol=1e-5)
    texts = result.table.set_index("image_id")["text"].dropna()
    assert texts.loc[["a", "c"]].str.contains("(metadata prior)", regex=False).all()
    assert not texts.loc[["b", "d", "e"]].str.contains("metadata", regex=False).any()
    with pytest.raises(PredictError, match="line 2: sex 'x' is not male"):
        bad = ws.root / "bad.csv"
        bad.write_text("image_id,sex\na,x\n")
        run_explain_batch([ws.folder], str(bundle), params_path=ws.params, metadata=bad)
    with pytest.raises(ExplainBatchError, match="carries no metadata prior"):
        run_explain_batch([ws.folder], str(ws.bundle), params_path=ws.params, metadata=table)
