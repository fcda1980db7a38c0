"""Ingest: each adapter turns its layout into the one manifest, reading every file once."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest

from tasks.ingest import MANIFEST_COLUMNS, IngestError, build_manifest, detect_layout
from tests.datasets import empty, make_folder, make_ham, make_isic, truncate


def test_isic2019_adapter(tmp_path):
    root = make_isic(
        tmp_path / "isic",
        [
            {"image": "ISIC_1", "label": "MEL", "lesion_id": "L1", "mask": True, "age": 70},
            {"image": "ISIC_2", "label": "NV", "lesion_id": "L1", "sex": "male"},
            {"image": "ISIC_3", "label": ["MEL", "NV"]},
            {"image": "ISIC_4", "label": "BCC", "write": False},
        ],
    )
    m = build_manifest(root, workers=1, progress=False).set_index("image_id")
    assert list(build_manifest(root, progress=False).columns) == MANIFEST_COLUMNS
    assert m.loc["ISIC_1", "label"] == "MEL" and m.loc["ISIC_1", "age"] == 70
    assert m.loc["ISIC_1", "mask_path"].endswith("ISIC_1_segmentation.png")
    assert pd.isna(m.loc["ISIC_2", "mask_path"]) and m.loc["ISIC_2", "sex"] == "male"
    assert pd.isna(m.loc["ISIC_3", "label"]) and m.loc["ISIC_3", "onehot_sum"] == 2
    assert m.loc["ISIC_4", "file_error"] == "missing"
    # ISIC_3 has no lesion id: it stands for itself.
    assert m.loc["ISIC_3", "lesion_id"] == "ISIC_3"
    data = (root / m.loc["ISIC_1", "path"]).read_bytes()
    assert m.loc["ISIC_1", "sha256"] == hashlib.sha256(data).hexdigest()
    assert (m.loc["ISIC_1", "width"], m.loc["ISIC_1", "height"]) == (48, 48)
    assert detect_layout(root) == "isic2019"


def test_ham10000_adapter_maps_codes_and_reads_both_parts(tmp_path):
    rows = [
        {"image_id": f"ISIC_00{i}", "dx": dx, "lesion_id": f"HAM_{i // 2}"}
        for i, dx in enumerate(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc", "xyz"])
    ]
    rows[0]["sex"] = "unknown"  # HAM10000 writes "unknown" for missing sex and site
    root = make_ham(tmp_path / "ham", rows)
    m = build_manifest(root, progress=False)
    assert list(m["label"]) == ["AK", "BCC", "BKL", "DF", "MEL", "NV", "VASC", "xyz"]
    assert {p.split("/")[0] for p in m["path"]} == {
        "HAM10000_images_part_1",
        "HAM10000_images_part_2",
    }
    assert m["file_error"].isna().all()
    assert m["site"].eq("back").all() and m["lesion_id"].nunique() == 4
    assert pd.isna(m.loc[0, "sex"]) and m.loc[1, "sex"] == "male"


def test_folder_adapter_and_file_defects(tmp_path):
    files = make_folder(tmp_path / "f", {"melanoma": 3, "naevus": 2}, size=(40, 30))
    truncate(files["melanoma"][0])
    empty(files["naevus"][1])
    m = build_manifest(tmp_path / "f", layout="folder", workers=2, progress=False)
    assert sorted(m["label"].unique()) == ["melanoma", "naevus"]
    by_id = m.set_index("image_id")
    assert by_id.loc["melanoma_0", "file_error"] == "truncated"
    assert by_id.loc["naevus_1", "file_error"] == "empty"
    assert by_id.loc["melanoma_1", "width"] == 40 and by_id.loc["melanoma_1", "height"] == 30


def test_parallel_equals_serial(tmp_path):
    make_folder(tmp_path / "f", {"a": 6, "b": 5})
    serial = build_manifest(tmp_path / "f", workers=1, progress=False)
    parallel = build_manifest(tmp_path / "f", workers=2, progress=False)
    assert serial.equals(parallel)


def test_unknown_layout_is_a_clear_error(tmp_path):
    (tmp_path / "lonely.txt").write_text("x")
    with pytest.raises(IngestError, match="no ISIC_2019_Training_GroundTruth.csv"):
        build_manifest(tmp_path, progress=False)
    with pytest.raises(IngestError, match="does not exist"):
        build_manifest(tmp_path / "nope", progress=False)


def test_mednode_real_data(mednode):
    m = build_manifest(mednode, workers=2, progress=False)
    assert len(m) == 170
    assert m["label"].value_counts().to_dict() == {"naevus": 100, "melanoma": 70}
    assert m["file_error"].isna().all() and m["sha256"].str.len().eq(64).all()
    assert (m[["width", "height"]].min() >= 200).all()


BINARY = {"MEL": "malignant", "BCC": "malignant", "SCC": "malignant", "AK": "malignant"}
BINARY |= {"NV": "benign", "BKL": "benign", "DF": "benign", "VASC": "benign", "UNK": None}


def _isic_for_mapping(tmp_path):
    labels = ["MEL", "NV", "BCC", "UNK", "AK", ["MEL", "NV"]]
    return make_isic(
        tmp_path / "isic", [{"image": f"ISIC_{i}", "label": lab} for i, lab in enumerate(labels)]
    )


def test_label_map_makes_a_binary_task_and_keeps_the_source_label(tmp_path):
    from tasks.config import load_params
    from tasks.ingest import label_vocabulary
    from tasks.validate import validate_manifest
    from tests.helpers import REPO

    root = _isic_for_mapping(tmp_path)
    m = build_manifest(root, progress=False, label_map=BINARY).set_index("image_id")
    assert "ISIC_3" not in m.index  # UNK -> null: dropped before any file is read
    assert m.loc["ISIC_0", "label"] == "malignant" and m.loc["ISIC_0", "source_label"] == "MEL"
    assert m.loc["ISIC_1", "label"] == "benign" and m.loc["ISIC_4", "label"] == "malignant"
    assert pd.isna(m.loc["ISIC_5", "label"])  # broken one-hot row: kept for validation to report
    assert label_vocabulary(BINARY) == ["benign", "malignant"]
    cfg = load_params(REPO / "params.yaml").validate
    report = validate_manifest(m.reset_index(), root, cfg, label_vocabulary(BINARY))
    failed = {r.rule for r in report.results if not r.success}
    assert "label_known" not in failed and "onehot_single" in failed


def test_label_map_missing_a_class_names_it_and_its_first_row(tmp_path):
    root = _isic_for_mapping(tmp_path)
    partial = {k: v for k, v in BINARY.items() if k != "AK"}
    with pytest.raises(IngestError, match=r"does not map AK \(1 images\).*ISIC_4.*map it to null"):
        build_manifest(root, progress=False, label_map=partial)
