"""External evaluation (tasks/evaluate.py) and the ISIC 2018 Task 3 adapter (tasks/ingest.py).

The metric helpers are checked against sklearn and hand-worked cases; the two ends-to-end run
``run_cli`` on sets written here as real JPEG files: a tiny ISIC-2018-layout set scored by a
real ONNX model (logged to a real sqlite MLflow run), and a PH2-style class-per-folder set
with a label map scored by a real bundle, with fewer classes than the model.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from tasks.calibrate import Calibrator
from tasks.conformal import ConformalSets
from tasks.evaluate import (
    EvaluateError,
    bootstrap_ci,
    melanoma_at_referral,
    parse_label_map,
    resampled_balanced_accuracy,
    restrict,
    run_cli,
    shared_classes,
)
from tasks.ingest import IngestError, build_manifest
from tasks.metrics import softmax
from tasks.predict import load_predictor, predict_files
from tests.datasets import make_ph2, write_image
from tests.helpers import TINY, patients, write_params

CLASSES = ["MEL", "NV", "BCC"]
ISIC2018_COLUMNS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
COLOURS = {"MEL": (70, 40, 30), "NV": (150, 100, 70), "BCC": (220, 150, 160), "AK": (200, 90, 80)}


def write_jpeg(path: Path, colour: tuple[int, int, int], seed: int) -> Path:
    """A 48 px skin-coloured JPEG with a lesion of ``colour`` in the middle."""
    rng = np.random.default_rng(seed)
    img = np.empty((48, 48, 3), dtype=np.float64)
    img[:] = (225, 185, 160)
    yy, xx = np.mgrid[:48, :48]
    img[(yy - 24) ** 2 + (xx - 24) ** 2 < 12**2] = colour
    img += rng.normal(0, 6, img.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=92)
    return path


def make_isic2018(
    root: Path, labels: list[str], part: str = "Validation", unzipped: bool = False
) -> Path:
    """ISIC 2018 Task 3 layout: one-hot CSV at the root, images nested one folder deeper.

    ``unzipped``: the CSV in the folder its archive unzips to (``..._GroundTruth/``).
    """
    gt_dir = root / f"ISIC2018_Task3_{part}_GroundTruth" if unzipped else root
    gt_dir.mkdir(parents=True, exist_ok=True)
    with (gt_dir / f"ISIC2018_Task3_{part}_GroundTruth.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *ISIC2018_COLUMNS])
        for i, label in enumerate(labels):
            column = "AKIEC" if label == "AK" else label
            writer.writerow([f"ISIC_{i:07d}", *[float(c == column) for c in ISIC2018_COLUMNS]])
            write_jpeg(root / f"ISIC2018_Task3_{part}_Input" / f"ISIC_{i:07d}.jpg",
                       COLOURS[label], i)  # fmt: skip
    return root


def tiny_cnn(seed: int = 0) -> torch.nn.Module:
    """An untrained 32 px CNN with a scaled head, so that its predictions differ per image."""
    from tasks.models import build_model

    torch.manual_seed(seed)
    model = build_model("custom_cnn", len(CLASSES)).eval()
    with torch.no_grad():
        model.classifier[-1].weight.mul_(20.0)
    return model


# --------------------------------------------------------------------------- pure helpers


def test_vectorised_balanced_accuracy_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=(50, 40))
    p = np.where(rng.random((50, 40)) < 0.6, y, rng.integers(0, 4, size=(50, 40)))
    p[0] = 3  # a resample where one class is predicted but absent from y
    y[0, :] = np.r_[np.zeros(20, int), np.ones(20, int)]
    ours = resampled_balanced_accuracy(y, p, 4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = [balanced_accuracy_score(a, b) for a, b in zip(y, p, strict=True)]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_bootstrap_ci_brackets_the_estimate_and_repeats() -> None:
    rng = np.random.default_rng(1)
    y = rng.choice(CLASSES, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.choice(CLASSES, 200))
    low, high = bootstrap_ci(y, p, 300, 0.95, seed=3)
    assert low < balanced_accuracy_score(y, p) < high
    assert high - low < 0.25
    assert bootstrap_ci(y, p, 300, 0.95, seed=3) == [low, high]
    assert bootstrap_ci(y, p, 50, 0.9, 0, metric="melanoma_sensitivity")[0] is not None
    assert bootstrap_ci(["NV", "BCC"], ["NV", "NV"], 50, 0.9, 0, "melanoma_sensitivity") == [
        None,
        None,
    ]


def test_restrict_is_the_softmax_of_the_kept_logits() -> None:
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    t = Calibrator("temperature", temperature=1.7)
    kept = restrict(t.probabilities(logits), [0, 1])
    np.testing.assert_allclose(kept, softmax(logits[:, :2] / 1.7), atol=1e-12)
    np.testing.assert_allclose(kept.sum(axis=1), 1.0, atol=1e-12)


def test_melanoma_at_referral_by_hand() -> None:
    labels = ["MEL", "MEL", "MEL", "NV", "NV", "BCC"]
    predicted = ["MEL", "NV", "NV", "NV", "MEL", "BCC"]
    referred = np.array([False, True, False, True, False, False])
    # MEL caught: #0 (called MEL), #1 (referred); missed: #2 -> 2/3.
    # Others spared: #5 only (#3 referred, #4 called MEL) -> 1/3.
    out = melanoma_at_referral(labels, predicted, referred)
    assert out == pytest.approx({"sensitivity": 2 / 3, "specificity": 1 / 3})
    assert melanoma_at_referral(["NV"], ["NV"], np.array([False]))["sensitivity"] is None


def test_shared_classes_and_label_map_text() -> None:
    assert shared_classes(CLASSES, ["NV", "MEL", "NV"]) == ["MEL", "NV"]
    with pytest.raises(EvaluateError, match=r"SCC \(2 images\)"):
        shared_classes(CLASSES, ["SCC", "SCC", "NV"])
    assert parse_label_map("common_nevus=NV, melanoma=MEL,other=") == {
        "common_nevus": "NV",
        "melanoma": "MEL",
        "other": None,
    }
    with pytest.raises(EvaluateError, match="'melanoma'"):
        parse_label_map("melanoma")


# --------------------------------------------------------------------------- ISIC 2018 adapter


def test_isic2018_adapter_reads_nested_images_and_maps_akiec(tmp_path: Path) -> None:
    root = make_isic2018(tmp_path / "isic2018", ["MEL", "NV", "AK", "BCC"])
    manifest = build_manifest(root, progress=False)
    assert manifest.attrs["ingest"]["layout"] == "isic2018"
    assert list(manifest["label"]) == ["MEL", "NV", "AK", "BCC"]
    assert manifest["path"].iloc[2] == "ISIC2018_Task3_Validation_Input/ISIC_0000002.jpg"
    assert manifest["file_error"].isna().all() and (manifest["source"] == "isic2018").all()
    assert list(manifest["csv_line"]) == [2, 3, 4, 5]


def test_isic2018_unzipped_with_lesion_groupings(tmp_path: Path) -> None:
    """The archives as unzipped: the CSV in its own folder; ISIC's lesion groupings read."""
    root = make_isic2018(tmp_path / "isic2018", ["NV", "NV", "MEL", "BCC"], "Training", True)
    (root / "ISIC2018_Task3_Training_LesionGroupings.csv").write_text(
        "image,lesion_id,diagnosis_confirm_type\n"
        "ISIC_0000000,HAM_0000118,histopathology\n"
        "ISIC_0000001,HAM_0000118,histopathology\n"
        "ISIC_0000003,HAM_0002730,follow_up\n"
    )
    manifest = build_manifest(root, progress=False)
    facts = manifest.attrs["ingest"]
    assert facts["layout"] == "isic2018"
    assert facts["layout_reason"] == (
        "ISIC2018_Task3_Training_GroundTruth.csv found in ISIC2018_Task3_Training_GroundTruth/"
    )
    assert facts["label_csv"] == (
        "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"
    )
    assert facts["meta_csv"] == "ISIC2018_Task3_Training_LesionGroupings.csv"
    assert facts["metadata"]["lesion_ids"]
    # Two images of one lesion share its id; an image the groupings omit is its own lesion.
    assert list(manifest["lesion_id"]) == [
        "HAM_0000118", "HAM_0000118", "ISIC_0000002", "HAM_0002730"
    ]  # fmt: skip
    assert list(manifest["meta_line"].astype("object").fillna(0)) == [2, 3, 0, 4]
    assert manifest["file_error"].isna().all() and list(manifest["label"])[2] == "MEL"


def test_isic_test_ground_truth_score_weight_is_not_a_class(tmp_path: Path) -> None:
    root = make_isic2018(tmp_path / "isic2018", ["MEL", "NV"], "Test")
    gt = root / "ISIC2018_Task3_Test_GroundTruth.csv"
    header, *rows = gt.read_text().splitlines()
    gt.write_text(f"{header},score_weight\n{rows[0]},1.0\n{rows[1]},0.0\n")
    assert list(build_manifest(root, progress=False)["label"]) == ["MEL", "NV"]


def test_isic2018_bad_cell_is_named(tmp_path: Path) -> None:
    root = make_isic2018(tmp_path / "bad", ["MEL", "NV"])
    gt = root / "ISIC2018_Task3_Validation_GroundTruth.csv"
    gt.write_text(gt.read_text().replace("ISIC_0000001,0.0,1.0", "ISIC_0000001,0.0,yes"))
    with pytest.raises(IngestError, match=r"line 3: column NV is 'yes'"):
        build_manifest(root, progress=False)


# --------------------------------------------------------------------------- PH2 adapter

PH2_TO_ISIC = {"common_nevus": "NV", "atypical_nevus": "NV", "melanoma": "MEL"}


def test_ph2_adapter_reads_the_distributed_layout(tmp_path: Path) -> None:
    root = make_ph2(tmp_path / "PH2Dataset", ["common_nevus", "atypical_nevus", "melanoma"] * 2)
    cases = root / "PH2 Dataset images"
    stray = write_image(cases / "IMD900/IMD900_Dermoscopic_Image/IMD900.bmp", (64, 48))
    (cases / "IMD007/IMD007_lesion/IMD007_lesion.bmp").unlink()  # a case without its mask

    manifest = build_manifest(root, progress=False, label_map=PH2_TO_ISIC)

    facts = manifest.attrs["ingest"]
    assert facts["layout"] == "ph2" and facts["label_csv"] == "PH2_dataset.txt"
    assert list(manifest["source_label"][:3]) == ["common_nevus", "atypical_nevus", "melanoma"]
    assert list(manifest["label"]) == ["NV", "NV", "MEL"] * 2
    assert list(manifest["csv_line"]) == [2, 3, 4, 5, 6, 7]  # the table's own lines
    assert manifest["path"][2] == "PH2 Dataset images/IMD004/IMD004_Dermoscopic_Image/IMD004.bmp"
    assert manifest["mask_path"][2] == "PH2 Dataset images/IMD004/IMD004_lesion/IMD004_lesion.bmp"
    assert pd.isna(manifest["mask_path"][5])
    assert manifest["file_error"].isna().all() and manifest["mask_error"].isna().all()
    assert (manifest["mask_foreground"][:5] > 0.1).all() and (manifest["source"] == "ph2").all()
    assert list(manifest["lesion_id"]) == list(manifest["image_id"])
    # Each case's mask and colour-region images belong to it; a case the table omits does not.
    assert facts["unlisted_images"]["paths"] == [stray.relative_to(root).as_posix()]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("||                  1 ||", "|| 1a ||"),
         r"PH2_dataset.txt line 3: column Clinical Diagnosis is '1a', not 0 \(common_nevus\)"),
        (lambda t: t.replace("|| Name ||", "|| Case ||"), r"line 1: a table row before the header"),
        (lambda t: "Legends:\n", r"PH2_dataset.txt: no header row"),
        (lambda t: t.splitlines()[0] + "\n", r"PH2_dataset.txt: the table lists no cases"),
    ],
)  # fmt: skip
def test_a_bad_ph2_table_is_named(tmp_path: Path, edit, message: str) -> None:
    root = make_ph2(tmp_path / "PH2Dataset", ["common_nevus", "atypical_nevus"])
    txt = root / "PH2_dataset.txt"
    txt.write_text(edit(txt.read_text()))
    with pytest.raises(IngestError, match=message):
        build_manifest(root, progress=False)


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", [*TINY, "evaluate.bootstrap=100"])
    return tmp_path


def test_evaluate_isic2018_set_with_onnx_logged_to_mlflow(project: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks import tracking
    from tasks.config import load_params
    from tasks.export import export_onnx
    from tasks.train import MEAN, STD

    uri = tracking.configure(project)
    run_id = mlflow.start_run(experiment_id=tracking.ensure_experiment("t", project)).info.run_id
    mlflow.end_run()
    meta = {"arch": "custom_cnn", "classes": CLASSES, "input_size": 32,
            "normalization": {"mean": list(MEAN), "std": list(STD)}}  # fmt: skip
    labels = ["MEL"] * 4 + ["NV"] * 5 + ["BCC"] * 4
    root = make_isic2018(project / "isic2018", labels)
    files = sorted(root.rglob("*.jpg"))

    def export(extra: dict | None = None) -> Path:
        return export_onnx(tiny_cnn(), meta, project / "model.onnx", 18, 2.0, run_id=run_id,
                           referral_threshold=0.9, extra=extra)  # fmt: skip

    # APS sets whose threshold sits halfway between the two middle top-2 masses: about half the
    # sets hold two classes. Not the median itself: with 13 images that is one image's own mass,
    # a tie that float rounding (batching, CPU kernels) breaks one way here and the other there.
    probe = predict_files(load_predictor(str(export())), files)
    top2 = np.sort(probe[[f"p_{c}" for c in CLASSES]].to_numpy(), axis=1)[:, -2:].sum(axis=1)
    middle = np.sort(top2)[len(top2) // 2 - 1 : len(top2) // 2 + 1]
    sets = ConformalSets(method="aps", coverage=0.9, qhat=float(middle.mean()))
    onnx = export({"conformal": sets.to_dict()})

    rec = run_cli(root, str(onnx), load_params("params.yaml"), name="isic18")

    assert rec["n"] == 13 and rec["shared_classes"] == CLASSES
    assert rec["note"] == "all 3 model classes present"
    table = pd.read_parquet(project / "reports/external/isic18/predictions.parquet")
    assert list(table["label"]) == labels
    assert rec["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(table["label"], table["predicted"]), abs=1e-12
    )
    low, high = rec["balanced_accuracy_ci"]
    assert low <= rec["balanced_accuracy"] <= high
    assert rec["referred_share"] == pytest.approx(float((table["confidence"] < 0.9).mean()))
    assert rec["ece_before"] != pytest.approx(rec["ece_after"])  # T = 2 changes confidences
    assert set(rec["melanoma"]) >= {"sensitivity", "specificity"}
    assert (project / "reports/external/isic18/reliability.png").stat().st_size > 0
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.metrics["isic18/balanced_accuracy"] == pytest.approx(rec["balanced_accuracy"])
    contexts = [
        {t.key: t.value for t in d.tags}.get("mlflow.data.context")
        for d in run.inputs.dataset_inputs
    ]
    assert "evaluation" in contexts

    # The model's conformal sets on the external set: the same sets `dermaflow predict` gives
    # for these files (the graph's probabilities), and coverage / size counted from them.
    predicted = predict_files(load_predictor(str(onnx)), files)
    stems = [Path(f).stem for f in predicted["image"]]
    by_file = dict(zip(stems, predicted["prediction_set"], strict=True))
    assert list(table["prediction_set"]) == [by_file[i] for i in table["image_id"]]
    members = [s.strip("{}").split(", ") for s in table["prediction_set"]]
    assert len({len(m) for m in members}) > 1  # sets of different sizes: the test can fail
    assert all(top in m for top, m in zip(table["predicted"], members, strict=True))
    got = rec["conformal"]
    assert got["method"] == "aps" and got["target_coverage"] == 0.9
    hits = [label in m for label, m in zip(labels, members, strict=True)]
    assert got["coverage"] == pytest.approx(np.mean(hits))
    assert got["mean_set_size"] == pytest.approx(np.mean([len(m) for m in members]))
    assert got["coverage_per_class"]["NV"] == pytest.approx(np.mean(hits[4:9]))
    assert run.data.metrics["isic18/set_coverage"] == pytest.approx(got["coverage"])


@pytest.mark.parametrize("layout", ["folder", "ph2"])
def test_evaluate_set_with_label_map_and_fewer_classes(project: Path, layout: str) -> None:
    """PH2's classes, as class folders or as PH2 itself is distributed."""
    from tasks.config import load_params
    from tasks.models import save_bundle
    from tasks.train import MEAN, STD

    bundle = save_bundle(project / "model.pt", tiny_cnn(1), "custom_cnn", CLASSES, 32, MEAN, STD,
                         temperature=1.5)  # fmt: skip
    root = project / "ph2"
    counts = (("common_nevus", "NV", 4), ("atypical_nevus", "NV", 3), ("melanoma", "MEL", 4))
    if layout == "ph2":
        make_ph2(root, [cls for cls, _, n in counts for _ in range(n)])
    else:
        for cls, colour, n in counts:
            for i in range(n):
                write_jpeg(root / cls / f"{cls}_{i}.jpg", COLOURS[colour], hash(cls) % 1000 + i)
    label_map = "common_nevus=NV,atypical_nevus=NV,melanoma=MEL"
    p = load_params("params.yaml")

    rec = run_cli(root, str(bundle), p, label_map=label_map, log=False)

    assert rec["classes"] == ["MEL", "NV"] and rec["shared_classes"] == ["MEL", "NV"]
    assert "restricted to the 2 shared classes" in rec["note"] and "BCC" in rec["note"]
    assert set(rec["per_class_recall"]) == {"MEL", "NV"}
    table = pd.read_parquet(project / "reports/external/ph2/predictions.parquet")
    assert (table["label"] == "NV").sum() == 7
    np.testing.assert_allclose(table["p_MEL"] + table["p_NV"], 1.0, atol=1e-9)
    assert set(table["predicted"]) <= {"MEL", "NV"}
    assert table["skin_tone"].isin(["very_light", "light", "intermediate"]).all()
    assert rec["referral_threshold"] is None and rec["referred_share"] == 0.0
    assert rec["conformal"] is None  # a stray bundle gets no sets (no run file records it)
    saved = json.loads((project / "reports/external/ph2/evaluate.json").read_text())
    assert saved["balanced_accuracy"] == pytest.approx(rec["balanced_accuracy"])
    with pytest.raises(IngestError, match="does not map atypical_nevus"):
        run_cli(root, str(bundle), p, label_map="common_nevus=NV,melanoma=MEL", log=False)


def test_a_model_with_a_metadata_prior_adds_it_for_the_rows_with_metadata(project: Path) -> None:
    """Bundle and ONNX alike: p ∝ exp(log p_image + prior/T) where a row has metadata."""
    from tasks.config import load_params
    from tasks.export import export_onnx
    from tasks.fusion import fit_metadata_prior
    from tasks.models import save_bundle
    from tasks.train import MEAN, STD
    from tests.datasets import make_ham

    prior = fit_metadata_prior(*patients(), CLASSES)
    dx = ["mel", "nv", "bcc"] * 4
    rows = [
        {
            "image_id": f"ISIC_{i:07d}",
            "dx": d,
            "age": 20 + 7 * i,
            "localization": ["back", "face"][i % 2],
        }
        for i, d in enumerate(dx)
    ]
    rows[4].update(age="", sex="unknown", localization="unknown")  # no metadata at all
    root = make_ham(project / "ham", rows)
    t = 1.5
    extra = {"metadata_prior": prior.to_dict()}
    model = tiny_cnn(2)
    plain = save_bundle(project / "plain.pt", model, "custom_cnn", CLASSES, 32, MEAN, STD,
                        temperature=t)  # fmt: skip
    fused = save_bundle(project / "fused.pt", model, "custom_cnn", CLASSES, 32, MEAN, STD,
                        temperature=t, extra=extra)  # fmt: skip
    meta = {"arch": "custom_cnn", "classes": CLASSES, "input_size": 32,
            "normalization": {"mean": list(MEAN), "std": list(STD)}, "extra": extra}  # fmt: skip
    onnx = export_onnx(model, meta, project / "fused.onnx", 18, t)
    p = load_params("params.yaml")
    cols = [f"p_{c}" for c in CLASSES]

    def scored(ref: Path, name: str) -> tuple[dict, pd.DataFrame]:
        rec = run_cli(root, str(ref), p, name=name, log=False)
        table = pd.read_parquet(project / f"reports/external/{name}/predictions.parquet")
        return rec, table.set_index("image_id").loc[[r["image_id"] for r in rows]]

    rec0, base = scored(plain, "plain")
    assert rec0["metadata_prior_images"] is None
    manifest = pd.DataFrame({
        "age": [r["age"] if r["age"] != "" else np.nan for r in rows],
        "sex": [None if r.get("sex") == "unknown" else "male" for r in rows],
        "site": [None if r["localization"] == "unknown" else r["localization"] for r in rows],
    })  # fmt: skip
    z = np.log(base[cols].to_numpy()) + prior.log_odds(manifest) / t
    expected = softmax(z)
    for ref, name in ((fused, "fused_pt"), (onnx, "fused_onnx")):
        rec, table = scored(ref, name)
        assert rec["metadata_prior_images"] == len(rows) - 1
        assert "the metadata prior used age, sex or site for 11 of 12 images" in rec["note"]
        np.testing.assert_allclose(table[cols].to_numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(table[cols].to_numpy()[4], base[cols].to_numpy()[4], atol=1e-6)
    assert np.abs(expected - base[cols].to_numpy()).max() > 0.01  # the prior moved something
