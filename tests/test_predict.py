"""Batch prediction on new files: from the ONNX file alone, robust to broken images.

A random-init custom CNN is exported once (32 px) and scores a folder of small real JPEG/PNG
files with a corrupt one among them; the registry path runs against a real sqlite MLflow store
in a temp folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.export import export_onnx, normalize
from tasks.fusion import MetadataPrior, fit_metadata_prior
from tasks.models import build_model
from tasks.predict import (
    PredictError,
    Predictor,
    collect_images,
    load_image,
    load_image_and_mask,
    load_predictor,
    match_masks,
    predict_files,
    preprocess,
    read_metadata_table,
    scan_inputs,
    write_csv,
)
from tasks.prepare import PrepareError, decode_one
from tasks.train import MEAN, STD, to_input
from tests.datasets import make_ph2, not_an_image, truncate, write_image, write_mask
from tests.helpers import patients
from tests.tolerances import PROB_ATOL

SIZE = 32
CLASSES = ["MEL", "NV", "BCC"]
THRESHOLD = 0.9  # stored in the model: every random-init confidence (about 1/3) is below it


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model("custom_cnn", len(CLASSES)).eval()
    meta = {
        "arch": "custom_cnn",
        "classes": CLASSES,
        "input_size": SIZE,
        "normalization": {"mean": list(MEAN), "std": list(STD)},
        "data_version": "v1",
    }
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    return export_onnx(model, meta, path, 18, 1.3, run_id="r", referral_threshold=THRESHOLD)


@pytest.fixture(scope="module")
def predictor(onnx_path: Path) -> Predictor:
    return load_predictor(onnx_path)


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, Path]:
    """Nine good files (JPEG, PNG, non-square, greyscale, RGBA, nested) and three bad ones.

    Beside them, what gets no row: a mask and two hidden files (skipped and counted).
    """
    d = tmp_path / "new"
    files = {f"good{i}": write_image(d / f"case_{i}.jpg", (40 + 4 * i, 48)) for i in range(5)}
    files["png"] = write_image(d / "sub" / "lesion.PNG", (64, 40))
    files["grey"] = write_image(d / "sub" / "grey.png", (48, 48), mode="L")
    files["rgba"] = write_image(d / "sub" / "deeper" / "alpha.png", (36, 50), mode="RGBA")
    files["big"] = write_image(d / "big.jpeg", (120, 90))
    files["html"] = not_an_image(d / "download_error.jpg")
    files["truncated"] = truncate(write_image(d / "sub" / "cut.jpg", (96, 96)))
    files["notes"] = d / "notes.txt"  # any file found gets a row: an error row here
    files["notes"].write_text("not an image\n")
    not_an_image(d / "._case_0.jpg")  # macOS resource fork: hidden, skipped
    (d / ".DS_Store").write_bytes(b"\x00")  # hidden, skipped
    write_image(d / "sub" / "lesion_segmentation.png", (64, 40))  # a mask: skipped, counted
    return files


def test_collect_images(images: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "new"
    found = collect_images([folder, images["good0"]])  # a file also inside the folder: once
    assert found == sorted(images.values())
    # One rule whether a file is named or found: notes.txt gets a row both ways.
    assert collect_images([tmp_path / "new" / "notes.txt"]) == [folder / "notes.txt"]
    scan = scan_inputs([folder])
    assert scan.masks == [folder / "sub" / "lesion_segmentation.png"]
    assert sorted(p.name for p in scan.hidden) == [".DS_Store", "._case_0.jpg"]
    assert scan.skipped() == "1 mask(s) and 2 hidden file(s) skipped"
    named_mask = scan_inputs([folder / "sub" / "lesion_segmentation.png"])
    assert named_mask.files == [] and len(named_mask.masks) == 1  # named or found: skipped
    with pytest.raises(FileNotFoundError, match="missing"):
        collect_images([tmp_path / "missing"])


def test_a_ph2_folder_as_distributed_yields_its_dermoscopic_images(tmp_path: Path) -> None:
    root = make_ph2(tmp_path / "PH2Dataset", ["common_nevus", "melanoma"])
    scan = scan_inputs([root])
    cases = root / "PH2 Dataset images"
    assert scan.files == [
        cases / "IMD002/IMD002_Dermoscopic_Image/IMD002.bmp",
        cases / "IMD003/IMD003_Dermoscopic_Image/IMD003.bmp",
        root / "PH2_dataset.txt",  # any other file found gets an error row, as elsewhere
    ]
    assert sorted(p.name for p in scan.masks) == [
        "IMD002_R1_Label4.bmp", "IMD002_lesion.bmp", "IMD003_R1_Label4.bmp", "IMD003_lesion.bmp"
    ]  # fmt: skip


def test_each_image_finds_its_mask_by_the_layouts_ingest_reads(tmp_path: Path) -> None:
    ph2 = make_ph2(tmp_path / "PH2Dataset", ["common_nevus", "melanoma"])
    isic = tmp_path / "isic"
    write_image(isic / "ISIC_1.jpg")
    write_mask(isic / "ISIC_1_segmentation.png")
    write_image(isic / "ISIC_2.jpg")  # no mask anywhere
    ham = tmp_path / "ham"
    write_image(ham / "HAM10000_images_part_1" / "ISIC_3.jpg")
    write_mask(ham / "HAM10000_segmentations" / "ISIC_3_segmentation.png")
    two = tmp_path / "two"  # a mask in two other folders: which one is a guess
    write_image(two / "images" / "ISIC_4.jpg")
    for folder in ("a", "b"):
        write_mask(two / folder / "ISIC_4_segmentation.png")

    scan = scan_inputs([ph2, isic, ham, two])
    found = dict(zip(scan.files, match_masks(scan.files, scan.masks), strict=True))
    cases = ph2 / "PH2 Dataset images"
    for case in ("IMD002", "IMD003"):
        image = cases / case / f"{case}_Dermoscopic_Image" / f"{case}.bmp"
        assert found[image] == (cases / case / f"{case}_lesion" / f"{case}_lesion.bmp", None)
    assert found[isic / "ISIC_1.jpg"] == (isic / "ISIC_1_segmentation.png", None)
    assert found[isic / "ISIC_2.jpg"] == (None, None)
    image = ham / "HAM10000_images_part_1" / "ISIC_3.jpg"
    assert found[image] == (ham / "HAM10000_segmentations" / "ISIC_3_segmentation.png", None)
    mask, problem = found[two / "images" / "ISIC_4.jpg"]
    assert mask is None and problem.startswith(str(two / "images" / "ISIC_4.jpg"))
    assert "2 masks could be its mask" in problem and str(two / "b") in problem
    assert found[ph2 / "PH2_dataset.txt"] == (None, None)


def test_an_image_and_its_mask_decode_with_one_geometry(tmp_path: Path) -> None:
    image = write_image(tmp_path / "x.jpg", (64, 48))
    write_mask(tmp_path / "half.png", (32, 24))  # same aspect, half the pixels: accepted
    rgb, mask = load_image_and_mask(image, tmp_path / "half.png", 32)
    np.testing.assert_array_equal(rgb, load_image(image, 32))
    assert mask.shape == (32, 32) and set(np.unique(mask)) == {0, 1}
    assert mask[16, 16] == 1 and mask[0, 0] == 0  # the centred ellipse, cropped like the image

    write_mask(tmp_path / "square.png", (48, 48))
    with pytest.raises(PrepareError) as caught:
        load_image_and_mask(image, tmp_path / "square.png", 32)
    text = str(caught.value)
    assert text.startswith(str(tmp_path / "square.png")) and "\n" not in text
    assert "48x48 px vs image 64x48 px" in text and "validate.mask_aspect_tolerance" in text
    with pytest.raises(PrepareError, match="cannot decode the mask"):
        load_image_and_mask(image, not_an_image(tmp_path / "bad_segmentation.png"), 32)


def test_predict_files(predictor: Predictor, images: dict[str, Path], tmp_path: Path) -> None:
    files = collect_images([tmp_path / "new"])
    df = predict_files(predictor, files, batch_size=4, progress=False)
    prob_cols = [f"p_{c}" for c in CLASSES]
    assert list(df.columns) == [
        "image", "predicted", "confidence", *prob_cols, "ood_score", "ood", "prediction_set",
        "refer", "metadata", "error",
    ]  # fmt: skip
    assert df["image"].tolist() == [str(f) for f in files]

    bad = df[df["error"].notna()]
    assert sorted(bad["image"]) == sorted(str(images[k]) for k in ("html", "truncated", "notes"))
    for _, row in bad.iterrows():
        assert row["image"] in row["error"] and "cannot decode" in row["error"]
        assert pd.isna(row["predicted"]) and pd.isna(row["confidence"]) and pd.isna(row["refer"])

    good = df[df["error"].isna()]
    assert len(good) == 9
    probs = good[prob_cols].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert good["predicted"].tolist() == [CLASSES[k] for k in probs.argmax(axis=1)]
    np.testing.assert_allclose(good["confidence"], probs.max(axis=1))
    # The model's own threshold applies by default.
    assert predictor.referral_threshold == pytest.approx(THRESHOLD)
    assert good["refer"].tolist() == (good["confidence"] < THRESHOLD).tolist()
    # An explicit threshold overrides it; at the median confidence both outcomes occur.
    median = float(good["confidence"].median())
    split = predict_files(predictor, files, referral_threshold=median, progress=False)
    refer = split.loc[good.index, "refer"]
    assert refer.tolist() == (good["confidence"] < median).tolist()
    assert refer.any() and not refer.all()
    assert split.loc[bad.index, "refer"].isna().all()

    # Batching changes nothing but float32 kernel-path noise (the batch axis is dynamic;
    # onnxruntime picks other GEMM blockings for batch 1), and never the predicted class.
    one = predict_files(predictor, files, batch_size=1, progress=False)
    np.testing.assert_allclose(
        one[prob_cols].to_numpy(), df[prob_cols].to_numpy(), rtol=0, atol=PROB_ATOL
    )
    assert one["predicted"].tolist() == df["predicted"].tolist()


def test_referral_threshold_override(predictor: Predictor, images: dict[str, Path]) -> None:
    files = [images["good0"], images["png"], images["html"]]
    off = predict_files(predictor, files, referral_threshold=None, progress=True)
    assert off["refer"].isna().all()
    always = predict_files(predictor, files, referral_threshold=1.01, progress=False)
    assert always["refer"].tolist()[:2] == [True, True] and pd.isna(always["refer"].iloc[2])


def test_preprocess_matches_the_cache(predictor: Predictor, images: dict[str, Path]) -> None:
    """New files go through the prepare decode and the training normalisation."""
    for key in ("good1", "png", "grey", "rgba", "big"):
        cached, _, _ = decode_one(images[key], None, SIZE, "center_crop")
        x = preprocess(images[key], SIZE, MEAN, STD)
        assert x.shape == (3, SIZE, SIZE) and x.dtype == np.float32
        mean, std = np.array(MEAN)[:, None, None], np.array(STD)[:, None, None]
        pixels = (x * std + mean) * 255.0
        assert np.abs(pixels.transpose(1, 2, 0) - cached).max() <= 1.0
        np.testing.assert_array_equal(load_image(images[key], SIZE), cached)
        batch = torch.from_numpy(cached[None].copy())
        trained = to_input(batch, torch.device("cpu"))[0].numpy()
        np.testing.assert_allclose(x, trained, atol=1e-6)
    assert predictor.input_size == SIZE and predictor.classes == CLASSES
    assert predictor.mean == pytest.approx(MEAN) and predictor.resize == "center_crop"


def test_write_csv(predictor: Predictor, images: dict[str, Path], tmp_path: Path) -> None:
    df = predict_files(predictor, [images["good0"], images["html"]], progress=False)
    out = write_csv(df, tmp_path / "out" / "predictions.csv")
    back = pd.read_csv(out)
    assert back.columns.tolist() == df.columns.tolist() and len(back) == 2
    assert [p.name for p in out.parent.iterdir()] == ["predictions.csv"]


def test_load_predictor_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.onnx"):
        load_predictor(tmp_path / "nothing.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .onnx file"):
        load_predictor(tmp_path / "empty")


def test_plain_onnx_without_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.onnx"
    torch.onnx.export(
        torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(path), dynamo=False, input_names=["input"]
    )
    with pytest.raises(ValueError, match="not a dermaflow ONNX model"):
        load_predictor(path)


@pytest.fixture()
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real sqlite MLflow store in tmp, made current for this test only."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_load_from_registry_alias(
    mlflow_uri: str, onnx_path: Path, predictor: Predictor, images: dict[str, Path], tmp_path: Path
) -> None:
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)), name="onnx_model", registered_model_name="m"
        )
    client.set_registered_model_alias("m", "candidate", info.registered_model_version)

    files = sorted(images.values())
    local = predict_files(predictor, files, progress=False)
    for ref in ("models:/m@candidate", f"models:/m/{info.registered_model_version}"):
        remote = load_predictor(ref, tracking_uri=mlflow_uri)
        assert remote.source == ref and remote.classes == CLASSES
        assert remote.referral_threshold == pytest.approx(THRESHOLD)
        pd.testing.assert_frame_equal(predict_files(remote, files, progress=False), local)


# --------------------------------------------------------------------------------------------
# One input rule for predict and explain-batch; one-line errors for every bad model or option
# --------------------------------------------------------------------------------------------


def test_broken_link_and_huge_image_get_named_error_rows(predictor: Predictor, tmp_path: Path):
    d = tmp_path / "in"
    good = write_image(d / "ok.jpg")
    (d / "gone.jpg").symlink_to(tmp_path / "elsewhere" / "target.jpg")
    files = collect_images([d])
    assert files == [d / "gone.jpg", good]  # the link keeps its own name
    df = predict_files(predictor, files, progress=False, max_pixels=1000)
    gone, ok = df.iloc[0], df.iloc[1]
    assert gone["image"] == str(d / "gone.jpg") and "broken symbolic link" in gone["error"]
    assert "target.jpg" in gone["error"]  # where it points, as the reason, not as the name
    assert ok["error"] == (
        f"{good}: larger than the decompression-bomb limit (48x48 = 2304 pixels > 1000; "
        "validate.max_pixels)"
    )


def test_explain_batch_collects_by_the_same_rule(images: dict[str, Path], tmp_path: Path):
    from flows.explain_batch import find_images

    folder = tmp_path / "new"
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    found = find_images([str(folder)])
    assert found == [f.absolute() for f in collect_images([folder])]  # same files, same order
    assert folder / "gone.jpg" in found and all(p.is_absolute() for p in found)
    assert not any(p.name.endswith("_segmentation.png") for p in found)
    assert any(p.name == "notes.txt" for p in found)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "empty file (0 bytes), not an ONNX model"),
        (b"<html>404</html>", "not a readable ONNX model, corrupt or truncated"),
        ("half", "not a readable ONNX model, corrupt or truncated"),
    ],
)
def test_unreadable_onnx_is_one_line(onnx_path: Path, tmp_path: Path, content, says) -> None:
    bad = tmp_path / "model.onnx"
    data = onnx_path.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if content == "half" else content)
    with pytest.raises(PredictError) as caught:
        load_predictor(bad)
    text = str(caught.value)
    assert text.startswith(str(bad)) and says in text and "\n" not in text


def test_plain_onnx_is_a_predict_error(tmp_path: Path) -> None:
    path = tmp_path / "plain.onnx"
    torch.onnx.export(
        torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(path), dynamo=False, input_names=["input"]
    )
    with pytest.raises(PredictError, match="not a dermaflow ONNX model"):
        load_predictor(path)


def test_unknown_registry_alias_is_one_line(mlflow_uri: str) -> None:
    with pytest.raises(PredictError) as caught:
        load_predictor("models:/nope@champion", tracking_uri=mlflow_uri)
    text = str(caught.value)
    assert text.startswith("models:/nope@champion: not found in the MLflow registry at sqlite:")
    assert "\n" not in text


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"batch_size": 0}, "--batch-size 0: must be >= 1"),
        ({"provider": "gpu9"}, "--provider 'gpu9': unknown execution provider"),
    ],
)
def test_bad_options_fail_before_the_model_is_read(tmp_path: Path, kwargs, says) -> None:
    from tasks.predict import run_predict

    write_image(tmp_path / "in" / "a.jpg")
    with pytest.raises(PredictError, match=re.escape(says)):
        run_predict(
            [tmp_path / "in"], str(tmp_path / "no-model.onnx"), tmp_path / "p.csv", **kwargs
        )
    assert not (tmp_path / "p.csv").exists()


def test_output_is_checked_before_any_prediction(onnx_path: Path, tmp_path: Path) -> None:
    """-o pointing at a folder used to fail after every image had been scored."""
    from tasks.io import OutputPathError
    from tasks.predict import run_predict

    write_image(tmp_path / "in" / "a.jpg")
    (tmp_path / "out").mkdir()
    # The model does not exist: the -o check must come first to give this message.
    with pytest.raises(OutputPathError, match=r"out: is a folder; the -o/--out CSV needs a file"):
        run_predict([tmp_path / "in"], str(tmp_path / "nope.onnx"), tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match=r"is a file, not a folder"):
        run_predict([tmp_path / "in"], str(onnx_path), tmp_path / "file" / "p.csv")
    assert list((tmp_path / "out").iterdir()) == []
    done = run_predict(
        [tmp_path / "in"], str(onnx_path), tmp_path / "out" / "p.csv", progress=False
    )
    assert done.out.is_file() and "1 images scored" in done.summary()


def test_no_images_names_what_was_skipped(tmp_path: Path) -> None:
    from tasks.predict import run_predict

    write_image(tmp_path / "in" / "a_segmentation.png")
    with pytest.raises(PredictError, match=r"no image files under .*\(1 mask\(s\) skipped\)"):
        run_predict([tmp_path / "in"], "model.onnx", tmp_path / "p.csv")


# --------------------------------------------------------------------------------------------
# A model with a metadata prior: --metadata
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prior_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MetadataPrior]:
    """The fixture's network, exported with a metadata prior fitted on random patients."""
    prior = fit_metadata_prior(*patients(), CLASSES)
    torch.manual_seed(0)
    model = build_model("custom_cnn", len(CLASSES)).eval()
    meta = {
        "arch": "custom_cnn", "classes": CLASSES, "input_size": SIZE,
        "normalization": {"mean": list(MEAN), "std": list(STD)}, "data_version": "v1",
        "extra": {"metadata_prior": prior.to_dict()},
    }  # fmt: skip
    path = tmp_path_factory.mktemp("prior") / "model.onnx"
    return export_onnx(model, meta, path, 18, 1.3, run_id="r"), prior


def test_predict_adds_the_prior_of_the_images_with_metadata(
    prior_onnx: tuple[Path, MetadataPrior], images: dict[str, Path], tmp_path: Path
) -> None:
    path, prior = prior_onnx
    table = tmp_path / "meta.csv"
    table.write_text(  # HAM10000's own column names; case_2 has only "unknown"s: no metadata
        "lesion_id,image_id,dx,age,sex,localization\n"
        "HAM_1,case_0,nv,25,male,back\nHAM_2,case_1,bcc,80,female,face\n"
        "HAM_3,case_2,nv,,unknown,unknown\nHAM_4,not_in_the_folder,mel,50,male,back\n"
    )
    files = [images[k] for k in ("good0", "good1", "good2", "good3")]
    predictor = load_predictor(path)
    plain = predict_files(predictor, files, progress=False)
    fused = predict_files(predictor, files, progress=False, metadata=read_metadata_table(table))
    assert fused["metadata"].tolist() == [True, True, False, False]
    assert not plain["metadata"].any()
    cols = [f"p_{c}" for c in CLASSES]
    # Without metadata: the graph's own probabilities; with it: the graph's logits plus the
    # prior, through the graph's temperature (1.3).
    np.testing.assert_allclose(
        fused[cols].to_numpy()[2:], plain[cols].to_numpy()[2:], atol=PROB_ATOL
    )
    x = normalize(np.stack([load_image(f, SIZE) for f in files[:2]]), MEAN, STD)
    logits, _ = predictor.predict(x)
    rows = pd.DataFrame({"age": [25.0, 80.0], "sex": ["male", "female"], "site": ["back", "face"]})
    z = (logits + prior.log_odds(rows)) / 1.3
    expected = np.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(fused[cols].to_numpy()[:2], expected, atol=PROB_ATOL)
    assert np.abs(expected - plain[cols].to_numpy()[:2]).max() > 10 * PROB_ATOL  # it moved


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,age\nx,3\n", "no image_id (or image) column"),
        ("image_id,dx\nx,nv\n", "no age, sex or site column"),
        ("image_id,age\na,30\nb,40\na,50\n", "line 4: image id a again (first on line 2)"),
        ("image_id,age\na,thirty\n", "line 2: age 'thirty' is not a number in 0-120"),
        ("image_id,age\na,-4\n", "line 2: age '-4' is not a number in 0-120"),
        ("image_id,sex\na,M\n", "line 2: sex 'M' is not male, female or empty"),
        ("image_id,age\n,30\n", "line 2: empty image id"),
        ("", "not a readable CSV"),
    ],
)
def test_a_bad_metadata_table_is_named_by_line_and_rule(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "meta.csv"
    path.write_text(text)
    with pytest.raises(PredictError, match=re.escape(message)) as err:
        read_metadata_table(path)
    assert str(err.value).startswith(f"--metadata {path}") and "\n" not in str(err.value)


def test_isic_2019_metadata_columns_are_read_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "ISIC_2019_Training_Metadata.csv"
    path.write_text(
        "image,age_approx,anatom_site_general,lesion_id,sex\n"
        "ISIC_0000000,55.0,anterior torso,,female\nISIC_0000001,,,,\n"
    )
    table = read_metadata_table(path)
    assert table.loc["ISIC_0000000"].tolist() == [55.0, "female", "anterior torso"]
    assert table.loc["ISIC_0000001"].isna().all()
