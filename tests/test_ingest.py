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


def test_ham10000_dataverse_tab_reads_as_the_csv(tmp_path):
    """Harvard Dataverse's download: HAM10000_metadata.tab, tab-separated, quoted, + dataset."""
    rows = [
        {"image_id": f"ISIC_00{i}", "dx": dx, "lesion_id": f"HAM_{i // 2}", "age": 40 + i}
        for i, dx in enumerate(["mel", "nv", "bkl", "df"])
    ]
    root = make_ham(tmp_path / "ham", rows)
    from_csv = build_manifest(root, progress=False)
    header, *lines = (root / "HAM10000_metadata.csv").read_text().splitlines()
    quoted = [
        "\t".join(f'"{v}"' if not v.isdigit() else f"{v}.0" for v in line.split(","))
        + '\t"vidir_modern"'
        for line in lines
    ]
    tab = "\n".join(["\t".join(header.split(",") + ["dataset"]), *quoted]) + "\n"
    (root / "HAM10000_metadata.tab").write_text(tab)
    (root / "HAM10000_metadata.csv").unlink()

    from_tab = build_manifest(root, progress=False)
    facts = from_tab.attrs["ingest"]
    assert facts["layout_reason"] == "HAM10000_metadata.tab found at the root"
    assert facts["label_csv"] == "HAM10000_metadata.tab"
    columns = ["image_id", "label", "lesion_id", "age", "sex", "site", "csv_line", "sha256"]
    pd.testing.assert_frame_equal(from_tab[columns], from_csv[columns])


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


# --------------------------------------------------------------------------------------------
# Nothing silently dropped or reinterpreted; every unreadable CSV is one line naming the file
# --------------------------------------------------------------------------------------------

GT = "ISIC_2019_Training_GroundTruth.csv"
META = "ISIC_2019_Training_Metadata.csv"


def _isic(tmp_path, n=4, **extra):
    rows = [{"image": f"ISIC_{i}", "label": "MEL" if i % 2 else "NV", **extra} for i in range(n)]
    return make_isic(tmp_path / "isic", rows)


def test_auto_layout_says_which_and_why(tmp_path):
    from tasks.ingest import choose_layout, manifest_summary

    root = _isic(tmp_path)
    assert choose_layout(root) == ("isic2019", f"{GT} found at the root")
    m = build_manifest(root, progress=False)
    assert m.attrs["ingest"]["layout"] == "isic2019"
    make_folder(tmp_path / "f", {"mel": 2, "nev": 2})
    layout, why = choose_layout(tmp_path / "f")
    assert layout == "folder" and "2 class folder(s): mel, nev" in why
    summary = manifest_summary(build_manifest(tmp_path / "f", progress=False))
    assert summary["layout"] == "folder" and "class folder" in summary["layout_reason"]


def test_isic2019_test_part_is_read_like_the_training_part(tmp_path):
    """ISIC's released test ground truth: its own file names, a score_weight column."""
    root = make_isic(
        tmp_path / "isic_test",
        [{"image": "ISIC_9", "label": "UNK", "age": 35}, {"image": "ISIC_8", "label": "SCC"}],
    )
    gt = (root / GT).read_text().splitlines()
    (root / "ISIC_2019_Test_GroundTruth.csv").write_text(
        "\n".join([gt[0] + ",score_weight", *(row + ",1.0" for row in gt[1:])]) + "\n"
    )
    (root / META).rename(root / "ISIC_2019_Test_Metadata.csv")
    (root / GT).unlink()
    m = build_manifest(root, progress=False)
    facts = m.attrs["ingest"]
    assert facts["layout_reason"] == "ISIC_2019_Test_GroundTruth.csv found at the root"
    assert (facts["label_csv"], facts["meta_csv"]) == (
        "ISIC_2019_Test_GroundTruth.csv", "ISIC_2019_Test_Metadata.csv"
    )  # fmt: skip
    assert list(m["label"]) == ["UNK", "SCC"] and m["age"].tolist()[0] == 35
    # Two parts in one root would merge two sets: refused, naming both.
    (root / "ISIC_2019_Training_GroundTruth.csv").write_text("\n".join(gt) + "\n")
    with pytest.raises(IngestError, match="ISIC_2019_Test_GroundTruth.csv, ISIC_2019_Training"):
        build_manifest(root, progress=False)


def test_isic_root_without_its_csv_is_an_error_not_a_folder_set(tmp_path):
    """Today's bug: read as class-per-folder, it became one class ISIC_2019_Training_Input."""
    root = _isic(tmp_path)
    (root / GT).unlink()
    with pytest.raises(IngestError) as caught:
        build_manifest(root, progress=False)
    text = str(caught.value)
    assert text.startswith(f"{root / GT}: missing; the root looks like ISIC 2019")
    assert "ISIC_2019_Training_Input" in text and "dataset.layout: folder" in text
    (root / META).unlink()  # the images folder alone is sign enough
    with pytest.raises(IngestError, match="looks like ISIC 2019 \\(ISIC_2019_Training_Input\\)"):
        build_manifest(root, progress=False)
    # Asked for explicitly, the folder reading is the user's choice (validation's min_classes
    # then stops the one-class set it makes).
    forced = build_manifest(root, layout="folder", progress=False)
    assert forced["label"].unique().tolist() == ["ISIC_2019_Training_Input"]
    assert forced.attrs["ingest"]["layout_reason"] == "set by dataset.layout"


def test_ham_root_without_metadata_is_an_error(tmp_path):
    root = make_ham(tmp_path / "ham", [{"image_id": f"I{i}", "dx": "nv"} for i in range(3)])
    (root / "HAM10000_metadata.csv").unlink()
    with pytest.raises(IngestError, match=r"HAM10000_metadata.csv: missing; the root looks like"):
        build_manifest(root, progress=False)


def test_unlisted_images_and_missing_metadata_are_counted(tmp_path):
    from tasks.ingest import manifest_summary
    from tests.datasets import write_image

    root = _isic(tmp_path)
    write_image(root / "ISIC_2019_Training_Input" / "ISIC_orphan.jpg")
    write_image(root / "extra" / "ISIC_stray.png")
    (root / META).unlink()
    m = build_manifest(root, progress=False)
    facts = m.attrs["ingest"]
    assert facts["unlisted_images"] == {
        "count": 2,
        "paths": ["ISIC_2019_Training_Input/ISIC_orphan.jpg", "extra/ISIC_stray.png"],
    }
    assert facts["metadata"]["present"] is False and facts["metadata"]["lesion_ids"] is False
    summary = manifest_summary(m)
    assert summary["unlisted_images"] == 2 and summary["lesion_grouping"] is False
    assert m["meta_line"].isna().all() and m["age"].isna().all()


def test_folder_set_counts_what_it_skips(tmp_path):
    from tests.datasets import write_image

    make_folder(tmp_path / "f", {"a": 2, "b": 2})
    (tmp_path / "f" / "a" / "notes.txt").write_text("x")
    write_image(tmp_path / "f" / "loose.jpg")  # in no class folder
    m = build_manifest(tmp_path / "f", progress=False)
    assert len(m) == 4
    assert m.attrs["ingest"]["other_files"] == {"count": 1, "paths": ["a/notes.txt"]}
    assert m.attrs["ingest"]["unlisted_images"]["paths"] == ["loose.jpg"]


def test_non_numeric_age_is_kept_as_text_with_its_csv_line(tmp_path):
    root = make_isic(
        tmp_path / "isic",
        [
            {"image": "ISIC_0", "label": "NV", "age": 40},
            {"image": "ISIC_1", "label": "MEL", "age": "abc"},
            {"image": "ISIC_2", "label": "MEL", "age": ""},
            {"image": "ISIC_3", "label": "MEL", "age": "unknown"},
        ],
    )
    m = build_manifest(root, progress=False).set_index("image_id")
    assert pd.isna(m.loc["ISIC_1", "age"]) and m.loc["ISIC_1", "age_text"] == "abc"
    assert pd.isna(m.loc["ISIC_2", "age_text"]) and pd.isna(m.loc["ISIC_3", "age_text"])
    assert m.loc["ISIC_0", "age"] == 40 and pd.isna(m.loc["ISIC_0", "age_text"])
    # 0-based manifest rows vs 1-based CSV lines under a header: row 1 is line 3.
    assert m["csv_line"].tolist() == [2, 3, 4, 5] and m["meta_line"].tolist() == [2, 3, 4, 5]


def test_csv_lines_follow_quoted_newlines_and_blank_lines(tmp_path):
    root = _isic(tmp_path, n=3)
    (root / META).write_text(
        "image,age_approx,anatom_site_general,lesion_id,sex\n"
        'ISIC_0,30,"anterior\ntorso",L0,male\n\n'
        "ISIC_1,40,back,L1,female\nISIC_2,50,back,L2,female\n"
    )
    m = build_manifest(root, progress=False).set_index("image_id")
    assert m["meta_line"].to_dict() == {"ISIC_0": 2, "ISIC_1": 5, "ISIC_2": 6}


def test_masks_are_measured_in_the_images_orientation(tmp_path):
    from PIL import Image

    from tests.datasets import ISIC_MASKS, write_mask

    root = _isic(tmp_path, n=3, mask=True)
    write_mask(root / ISIC_MASKS / "ISIC_1_segmentation.png", (96, 96))  # same aspect, 2x
    Image.new("L", (48, 48), 0).save(root / ISIC_MASKS / "ISIC_2_segmentation.png")  # blank
    m = build_manifest(root, progress=False).set_index("image_id")
    assert (m.loc["ISIC_0", "mask_width"], m.loc["ISIC_0", "mask_height"]) == (48, 48)
    assert m.loc["ISIC_1", "mask_width"] == 96
    assert 0.1 < m.loc["ISIC_0", "mask_foreground"] < 0.5
    assert m.loc["ISIC_2", "mask_foreground"] == 0.0


def test_a_huge_valid_image_is_too_large_not_truncated(tmp_path):
    """A 14000 x 14000 PNG (1-bit: small on disk) is over PIL's limit; it is never decoded."""
    from PIL import Image

    make_folder(tmp_path / "f", {"a": 2, "b": 2})
    Image.new("1", (14000, 14000), 1).save(tmp_path / "f" / "a" / "huge.png")
    m = build_manifest(tmp_path / "f", progress=False).set_index("image_id")
    assert m.loc["huge", "file_error"] == "too_large"
    assert (m.loc["huge", "width"], m.loc["huge", "height"]) == (14000, 14000)
    # The limit is a param: a tiny one flags the small images too.
    small = build_manifest(tmp_path / "f", progress=False, max_pixels=1000)
    assert small["file_error"].eq("too_large").all()


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda p: p.write_bytes("image,MEL,NV\nISIC_\xe9,1,0\n".encode("latin-1")),
         "not UTF-8 text (byte 0xe9 on line 2; saved as Latin-1"),
        (lambda p: p.write_bytes(b""), "empty file (0 bytes"),
        (lambda p: p.write_text("  \n\n"), "empty file"),
        (lambda p: p.write_text('image,MEL,NV\n"ISIC_0,1,0\n'), "not a readable CSV"),
        (lambda p: p.write_text("img,MEL,NV\nISIC_0,1,0\n"), "missing column(s) ['image']"),
        (lambda p: p.write_text("image,MEL,NV\nISIC_0,1,0\nISIC_1,yes,0\n"),
         "line 3: column MEL is 'yes', not 0 or 1"),
        (lambda p: p.write_text("image,MEL,FOO\nISIC_0,1,0\n"), "unexpected ['FOO']"),
    ],
)  # fmt: skip
def test_unreadable_ground_truth_is_one_line_naming_the_file(tmp_path, damage, says):
    root = _isic(tmp_path)
    damage(root / GT)
    with pytest.raises(IngestError) as caught:
        build_manifest(root, progress=False)
    text = str(caught.value)
    assert text.startswith(str(root / GT)) and says in text and "\n" not in text


def test_latin1_metadata_and_ham_csv_name_their_file(tmp_path):
    root = _isic(tmp_path)
    (root / META).write_bytes("image,age_approx,sex\nISIC_0,40,f\xe9male\n".encode("latin-1"))
    with pytest.raises(IngestError, match=f"{META}: not UTF-8 text"):
        build_manifest(root, progress=False)
    ham = make_ham(tmp_path / "ham", [{"image_id": "I0", "dx": "nv"}])
    (ham / "HAM10000_metadata.csv").write_bytes(b"")
    with pytest.raises(IngestError, match="HAM10000_metadata.csv: empty file"):
        build_manifest(ham, progress=False)


def test_header_only_csv_gives_an_empty_manifest_for_validation_to_stop(tmp_path):
    root = _isic(tmp_path)
    (root / GT).write_text("image,MEL,NV\n")
    m = build_manifest(root, progress=False)
    assert len(m) == 0 and list(m.columns) == MANIFEST_COLUMNS
    assert m.attrs["ingest"]["unlisted_images"]["count"] == 4  # its images are all unlisted


def test_label_map_error_names_the_csv_line(tmp_path):
    root = _isic_for_mapping(tmp_path)
    partial = {k: v for k, v in BINARY.items() if k != "AK"}
    with pytest.raises(IngestError, match=r"image_id ISIC_4, CSV line 6\)"):
        build_manifest(root, progress=False, label_map=partial)


def test_facts_survive_the_parquet_file(tmp_path):
    from tasks.ingest import ingest_facts
    from tasks.io import write_parquet

    root = _isic(tmp_path)
    m = build_manifest(root, progress=False)
    write_parquet(tmp_path / "manifest.parquet", m)
    back = pd.read_parquet(tmp_path / "manifest.parquet")
    assert ingest_facts(back) == ingest_facts(m) and ingest_facts(back)["layout"] == "isic2019"
