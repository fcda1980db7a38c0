"""Validate stage: real files, real ingest, real Great Expectations.

Each broken dataset is built once per module and validated in one call; the parametrized tests
then check that every planted defect is reported by its rule, with the offending row named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.config import ValidateConfig, load_params
from tasks.ingest import build_manifest
from tasks.report import contact_sheet, write_reports
from tasks.validate import (
    RULE_NAMES,
    ValidationError,
    ValidationReport,
    raise_for_errors,
    validate_manifest,
)
from tests.datasets import (
    ISIC_INPUT,
    ISIC_MASKS,
    empty,
    make_folder,
    make_ham,
    make_isic,
    not_an_image,
    truncate,
    write_image,
)

REPO = Path(__file__).resolve().parents[1]
MEDNODE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mednode"


@dataclasses.dataclass
class Built:
    root: Path
    manifest: pd.DataFrame
    report: ValidationReport | None = None


@pytest.fixture(scope="module")
def cfg() -> ValidateConfig:
    """params.yaml's validate section (its severities), with the thresholds these sets assume."""
    default = load_params(REPO / "params.yaml").validate
    return dataclasses.replace(default, min_side=32, min_per_class=3, age_range=(0, 120))


def _ingest(root: Path) -> pd.DataFrame:
    return build_manifest(root, workers=1, progress=False)


@pytest.fixture(scope="module")
def isic(tmp_path_factory, cfg) -> Built:
    """An ISIC 2019 set with one planted defect per rule (except label_known)."""
    root = tmp_path_factory.mktemp("isic")
    outside = write_image(tmp_path_factory.mktemp("outside") / "elsewhere.jpg")
    rows = [{"image": f"ISIC_mel_{i}", "label": "MEL", "mask": i == 0} for i in range(4)]
    rows += [{"image": f"ISIC_nv_{i}", "label": "NV", "mask": i == 0} for i in range(4)]
    rows += [{"image": f"ISIC_bcc_{i}", "label": "BCC"} for i in range(3)]
    rows += [
        {"image": "ISIC_multihot", "label": ["MEL", "NV"]},
        {"image": "ISIC_allzero", "label": []},
        {"image": "ISIC_dup", "label": "BCC"},
        {"image": "ISIC_dup", "label": "BCC"},
        {"image": "ISIC_missing", "label": "NV", "write": False},
        {"image": "ISIC_empty", "label": "NV"},
        {"image": "ISIC_text", "label": "NV"},
        {"image": "ISIC_trunc", "label": "NV"},
        {"image": "ISIC_link", "label": "MEL", "write": False},
        {"image": "ISIC_small", "label": "MEL", "size": (16, 16)},
        {"image": "ISIC_old", "label": "MEL", "age": 150},
        {"image": "ISIC_twin_a", "label": "MEL"},
        {"image": "ISIC_twin_b", "label": "NV"},
        {"image": "ISIC_df", "label": "DF"},
        {"image": "ISIC_badmask", "label": "BCC", "mask": True},
        {"image": "ISIC_nomask", "label": "BCC"},
        {"image": "ISIC_sex", "label": "NV", "sex": "intersex?"},
        {"image": "ISIC_site", "label": "NV", "site": "moon"},
    ]
    make_isic(root, rows)
    images = root / ISIC_INPUT
    empty(images / "ISIC_empty.jpg")
    not_an_image(images / "ISIC_text.jpg")
    truncate(images / "ISIC_trunc.jpg")
    (images / "ISIC_link.jpg").symlink_to(outside)
    shutil.copyfile(images / "ISIC_twin_a.jpg", images / "ISIC_twin_b.jpg")
    not_an_image(root / ISIC_MASKS / "ISIC_badmask_segmentation.png")
    (root / ISIC_MASKS / "ISIC_nomask_segmentation.png").symlink_to(root / "no-such-mask.png")
    manifest = _ingest(root)
    return Built(root, manifest, validate_manifest(manifest, root, cfg))


@pytest.fixture(scope="module")
def ham(tmp_path_factory, cfg) -> Built:
    """HAM10000 with an unknown dx code: the only way an ISIC-vocabulary label goes wrong."""
    root = tmp_path_factory.mktemp("ham")
    rows = [
        {"image_id": f"HAM_{dx}_{i}", "dx": dx} for dx in ("nv", "mel", "xyz") for i in range(3)
    ]
    make_ham(root, rows)
    manifest = _ingest(root)
    return Built(root, manifest, validate_manifest(manifest, root, cfg))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Built:
    """A clean class-per-folder set: 3 classes x 4 images."""
    root = tmp_path_factory.mktemp("folder")
    make_folder(root, {"a": 4, "b": 4, "c": 4})
    return Built(root, _ingest(root))


@pytest.fixture(scope="module")
def folder_classes(folder, cfg) -> Built:
    """The folder set validated against an explicit vocabulary that lacks class c."""
    report = validate_manifest(folder.manifest, folder.root, cfg, classes=["a", "b"])
    return Built(folder.root, folder.manifest, report)


@pytest.fixture(scope="module")
def five(tmp_path_factory) -> Built:
    """A folder set with exactly five defects, each owned by a different rule."""
    root = tmp_path_factory.mktemp("five")
    files = make_folder(root, {"a": 4, "b": 4, "c": 2})
    truncate(files["a"][0])  # image_readable
    write_image(root / "a" / "a_small.jpg", (16, 16))  # min_size
    write_image(root / "b" / "a_1.jpg")  # image_id_unique (same stem as a/a_1.jpg)
    shutil.copyfile(files["a"][2], root / "b" / "twin.jpg")  # hash_label_conflict
    return Built(root, _ingest(root))  # class c has 2 < 3 images: class_min_count


DEFECTS = [
    ("isic", "onehot_single", "ISIC_multihot", "2 classes marked"),
    ("isic", "onehot_single", "ISIC_allzero", "0 classes marked"),
    ("isic", "image_id_unique", "ISIC_dup", "also on row"),
    ("isic", "image_readable", "ISIC_missing", "missing"),
    ("isic", "image_readable", "ISIC_empty", "empty"),
    ("isic", "image_readable", "ISIC_text", "not_an_image"),
    ("isic", "image_readable", "ISIC_trunc", "truncated"),
    ("isic", "path_inside_root", "ISIC_link", "outside the root"),
    ("isic", "min_size", "ISIC_small", "16x16"),
    ("isic", "age_range", "ISIC_old", "age 150"),
    ("isic", "hash_label_conflict", "ISIC_twin_a", "'NV'"),
    ("isic", "hash_label_conflict", "ISIC_twin_b", "'MEL'"),
    ("isic", "class_min_count", "ISIC_df", "class 'DF' has 1"),
    ("isic", "mask_readable", "ISIC_badmask", "not_an_image"),
    ("isic", "mask_readable", "ISIC_nomask", "missing"),
    ("ham", "label_known", "HAM_xyz_0", "unknown label 'xyz'"),
    ("folder_classes", "label_known", "c_3", "unknown label 'c'"),
]


@pytest.mark.parametrize(("dataset", "rule", "image_id", "value"), DEFECTS)
def test_defect_is_reported_by_its_rule(request, dataset, rule, image_id, value):
    built = request.getfixturevalue(dataset)
    manifest, report = built.manifest, built.report
    result = report.result(rule)
    assert not result.success
    assert result.severity == "error"
    assert not report.passed
    rows = manifest.index[manifest["image_id"] == image_id].tolist()
    assert rows, f"{image_id} not in the manifest"
    offenders = [o for o in result.offenders if o["image_id"] == image_id]
    assert [o["row"] for o in offenders] == rows
    assert all(value in o["value"] for o in offenders), offenders
    assert f"row {rows[0]} (image_id={image_id}, path=" in result.message
    assert f"image_id={image_id}" in str(ValidationError(report))


def test_isic_defects_fail_exactly_their_rules(isic):
    """Every defect in one call, and no rule fires on a row another rule owns."""
    report = isic.report
    assert {r.rule for r in report.errors()} == {
        "onehot_single",
        "image_id_unique",
        "image_readable",
        "path_inside_root",
        "min_size",
        "age_range",
        "hash_label_conflict",
        "class_min_count",
        "mask_readable",
    }
    assert {r.rule for r in report.warnings()} == {"sex_known", "site_known"}
    assert report.result("image_readable").unexpected_count == 4
    assert report.result("onehot_single").unexpected_count == 2
    assert report.n_rows == len(isic.manifest) == 29


def test_unknown_sex_is_a_warning_by_default(isic):
    report = isic.report
    sex = report.result("sex_known")
    assert (sex.severity, sex.success) == ("warning", False)
    assert sex.offenders[0]["image_id"] == "ISIC_sex"
    assert "sex_known" not in {r.rule for r in report.errors()}


def test_clean_folder_passes(folder, cfg):
    report = validate_manifest(folder.manifest, folder.root, cfg)
    assert report.passed and not report.errors() and not report.warnings()
    assert [r.rule for r in report.results] == list(RULE_NAMES)
    assert report.class_counts == {"a": 4, "b": 4, "c": 4}
    assert raise_for_errors(report) is report


def test_five_defects_in_one_call(five, cfg):
    report = validate_manifest(five.manifest, five.root, cfg)
    expected = {
        "image_readable",
        "min_size",
        "image_id_unique",
        "hash_label_conflict",
        "class_min_count",
    }
    assert {r.rule for r in report.errors()} == expected
    assert not report.warnings()
    with pytest.raises(ValidationError) as caught:
        raise_for_errors(report)
    text = str(caught.value)
    assert caught.value.report is report
    assert text.startswith("validation FAILED: 5 error rule(s)")
    for rule in expected:
        assert f"[error] {rule}: " in text
    for image_id in ("a_0", "a_small", "a_1", "twin", "c_0", "c_1"):
        assert f"image_id={image_id}," in text


def test_warning_severity_reports_without_failing(five, cfg, tmp_path):
    """GX holds each rule's severity; the run keeps GX's result and builds its Data Docs."""
    severity = {
        **cfg.severity,
        "min_size": "warning",
        "class_min_count": "warning",
        "image_readable": "off",
        "image_id_unique": "off",
        "hash_label_conflict": "off",
    }
    report = validate_manifest(
        five.manifest, five.root, dataclasses.replace(cfg, severity=severity), docs_dir=tmp_path
    )
    assert report.passed
    assert {r.rule for r in report.warnings()} == {"min_size", "class_min_count"}
    # GX's own result: the severity sits on the expectation, and the rules are GX built-ins on
    # the manifest's columns (min_size on width and height, label_known on label).
    kept = json.loads((tmp_path / "validation_result.json").read_text())
    by_column: dict[tuple[str, str | None], dict] = {
        (r["expectation_config"]["type"], r["expectation_config"]["kwargs"].get("column")): r
        for r in kept["results"]
    }
    for side in ("width", "height"):
        r = by_column[("expect_column_values_to_be_between", side)]
        assert r["expectation_config"]["severity"] == "warning"
        assert r["expectation_config"]["meta"] == {"rule": "min_size"}
    assert not by_column[("expect_column_values_to_be_between", "width")]["success"]
    label = by_column[("expect_column_values_to_be_in_set", "label")]["expectation_config"]
    assert label["severity"] == "critical" and label["meta"] == {"rule": "label_known"}
    assert not kept["success"] and kept["statistics"]["unsuccessful_expectations"] >= 3
    # Data Docs: an HTML site with the suite and this validation run.
    index = (tmp_path / "index.html").read_text()
    assert "manifest" in index
    pages = list((tmp_path / "validations").rglob("*.html"))
    assert len(pages) == 1 and "a_small" in pages[0].read_text()  # an offending image_id
    assert set(report.skipped) == {"image_readable", "image_id_unique", "hash_label_conflict"}
    assert not {r.rule for r in report.results} & set(report.skipped)
    with pytest.raises(KeyError):
        report.result("image_readable")
    assert "| image_readable | off | not run |" in report.to_markdown()
    raise_for_errors(report)


def test_unknown_rule_in_severity_is_an_error(five, cfg):
    typo = dataclasses.replace(cfg, severity={**cfg.severity, "min_sise": "off"})
    with pytest.raises(ValueError, match="min_sise"):
        validate_manifest(five.manifest, five.root, typo)


@pytest.mark.skipif(not MEDNODE.is_dir(), reason=f"MED-NODE not found at {MEDNODE}")
def test_mednode_validates_clean(cfg):
    manifest = build_manifest(MEDNODE, workers=2, progress=False)
    report = validate_manifest(manifest, MEDNODE, cfg)
    assert report.passed, report.message()
    assert all(r.success for r in report.results), report.message()
    assert set(report.class_counts) == {"melanoma", "naevus"}


def test_reports_are_written(isic, tmp_path):
    out = tmp_path / "out"
    write_reports(isic.report, out / "validation.json", out / "validation.md")
    data = json.loads((out / "validation.json").read_text())
    assert data["passed"] is False
    assert "image_readable" in data["errors"] and "sex_known" in data["warnings"]
    readable = next(r for r in data["rules"] if r["rule"] == "image_readable")
    assert {"row", "image_id", "path", "value"} <= set(readable["offenders"][0])
    markdown = (out / "validation.md").read_text()
    assert "**FAILED**" in markdown and "## Class counts" in markdown
    assert "| ISIC_trunc | ISIC_2019_Training_Input/ISIC_trunc.jpg | truncated |" in markdown
    assert sorted(os.listdir(out)) == ["validation.json", "validation.md"]


def test_contact_sheet_grows_with_classes(folder, tmp_path):
    two, three = tmp_path / "two.png", tmp_path / "three.png"
    manifest = folder.manifest
    contact_sheet(manifest[manifest["label"] != "c"], folder.root, two, per_class=4, thumb=48)
    contact_sheet(manifest, folder.root, three, per_class=4, thumb=48)
    with Image.open(two) as a, Image.open(three) as b:
        assert a.format == b.format == "PNG"
        assert a.width == b.width
        assert b.height > a.height
    assert three.stat().st_size > 1000
    assert sorted(os.listdir(tmp_path)) == ["three.png", "two.png"]


def test_contact_sheet_outlines_masks_and_skips_broken_files(isic, tmp_path):
    """Masks show as a cyan outline; broken, missing and escaping files are never drawn."""
    out = tmp_path / "sheet.png"
    contact_sheet(isic.manifest, isic.root, out, per_class=6, thumb=64, seed=1)
    with Image.open(out) as img:
        rgb = np.asarray(img.convert("RGB")).astype(int)
    cyan = (rgb[..., 0] < 80) & (rgb[..., 1] > 200) & (rgb[..., 2] > 200)
    assert cyan.sum() > 20, "no mask outline drawn"


def test_dotdot_path_escapes_root(folder, cfg):
    """A hand-edited manifest path that climbs out of the root is caught without opening it."""
    manifest = folder.manifest.copy()
    manifest.loc[5, "path"] = "../../etc/passwd"
    result = validate_manifest(manifest, folder.root, cfg).result("path_inside_root")
    assert not result.success
    assert [o["row"] for o in result.offenders] == [5]
    assert "/etc/passwd" in result.offenders[0]["value"]


# --------------------------------------------------------------------------------------------
# New rules: values never changed without a word, masks that fit, degenerate sets, set facts
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory, cfg) -> Built:
    """ISIC set with one defect per new rule: text age, bad masks, unlisted image, no metadata."""
    from tests.datasets import write_mask

    root = tmp_path_factory.mktemp("planted")
    rows = [{"image": f"ISIC_{i}", "label": ["MEL", "NV", "BCC"][i % 3]} for i in range(12)]
    rows[1]["age"] = "abc"
    for i in (2, 3, 4, 5):
        rows[i]["mask"] = True
    make_isic(root, rows)
    masks = root / ISIC_MASKS
    write_mask(masks / "ISIC_3_segmentation.png", (64, 32))  # aspect 2 vs 1: misaligned
    write_mask(masks / "ISIC_4_segmentation.png", (96, 96))  # twice the size: same aspect, fine
    Image.new("L", (48, 48), 0).save(masks / "ISIC_5_segmentation.png")  # marks nothing
    write_image(root / ISIC_INPUT / "ISIC_orphan.jpg")  # no ground-truth row
    meta = root / "ISIC_2019_Training_Metadata.csv"
    text = meta.read_text()
    manifest_with_meta = _ingest(root)
    meta.unlink()
    manifest = _ingest(root)
    meta.write_text(text)
    built = Built(root, manifest_with_meta, validate_manifest(manifest_with_meta, root, cfg))
    built.no_meta = validate_manifest(manifest, root, cfg)  # type: ignore[attr-defined]
    return built


def test_text_age_is_reported_with_row_and_csv_line(planted):
    result = planted.report.result("age_numeric")
    assert not result.success and result.severity == "error"
    (o,) = result.offenders
    assert o["row"] == 1 and o["csv"] == "ISIC_2019_Training_Metadata.csv line 3"
    assert o["value"] == "age 'abc' is not a number"
    assert (
        "row 1 (image_id=ISIC_1, path=ISIC_2019_Training_Input/ISIC_1.jpg, "
        "ISIC_2019_Training_Metadata.csv line 3): age 'abc' is not a number" in result.message
    )


def test_misaligned_and_empty_masks_fail_their_rules(planted):
    size = planted.report.result("mask_size")
    assert [o["image_id"] for o in size.offenders] == ["ISIC_3"]
    assert "mask 64x32 px vs image 48x48 px: aspect 2.000 vs 1.000" in size.offenders[0]["value"]
    assert size.offenders[0]["csv"] == "ISIC_2019_Training_GroundTruth.csv line 5"
    empty_mask = planted.report.result("mask_nonempty")
    assert [o["image_id"] for o in empty_mask.offenders] == ["ISIC_5"]
    assert "marks no lesion pixel" in empty_mask.offenders[0]["value"]
    assert {r.rule for r in planted.report.errors()} == {
        "age_numeric",
        "mask_size",
        "mask_nonempty",
    }


def test_unlisted_images_and_missing_metadata_are_warnings_naming_them(planted):
    unlisted = planted.report.result("image_unlisted")
    assert (unlisted.severity, unlisted.success, unlisted.unexpected_count) == ("warning", False, 1)
    assert unlisted.offenders[0]["path"] == "ISIC_2019_Training_Input/ISIC_orphan.jpg"
    assert "left out of the manifest" in unlisted.message
    assert planted.report.result("metadata_present").success
    meta = planted.no_meta.result("metadata_present")
    assert (meta.severity, meta.success) == ("warning", False)
    assert "ISIC_2019_Training_Metadata.csv is missing: lesion grouping is off" in meta.message
    md = planted.no_meta.to_markdown()
    assert "## [warning] metadata_present" in md and "## [warning] image_unlisted" in md
    assert "Layout: **isic2019** (ISIC_2019_Training_GroundTruth.csv found at the root)." in md


def test_set_rules_follow_their_severity(planted, cfg):
    strict = dataclasses.replace(
        cfg, severity={**cfg.severity, "image_unlisted": "error", "metadata_present": "error"}
    )
    manifest = _ingest(planted.root)
    report = validate_manifest(manifest, planted.root, strict, facts={
        **manifest.attrs["ingest"], "metadata": {"file": "m.csv", "present": False,
                                                  "lesion_ids": False, "note": "m.csv is missing"}
    })  # fmt: skip
    assert {"image_unlisted", "metadata_present"} <= {r.rule for r in report.errors()}
    off = dataclasses.replace(cfg, severity={**cfg.severity, "image_unlisted": "off"})
    assert "image_unlisted" in validate_manifest(manifest, planted.root, off).skipped


def test_markdown_and_json_carry_the_csv_line(planted, tmp_path):
    write_reports(planted.report, tmp_path / "v.json", tmp_path / "v.md")
    md = (tmp_path / "v.md").read_text()
    assert "| row | csv line | image_id | path | value |" in md
    assert "| 1 | ISIC_2019_Training_Metadata.csv line 3 | ISIC_1 |" in md
    data = json.loads((tmp_path / "v.json").read_text())
    age = next(r for r in data["rules"] if r["rule"] == "age_numeric")
    assert age["offenders"][0]["csv"] == "ISIC_2019_Training_Metadata.csv line 3"
    assert data["layout"] == "isic2019"


def test_mask_aspect_tolerance_is_a_param(tmp_path, cfg):
    from tests.datasets import write_mask

    root = make_isic(tmp_path / "s", [{"image": "ISIC_0", "label": "NV", "mask": True}])
    write_mask(root / ISIC_MASKS / "ISIC_0_segmentation.png", (50, 48))  # 4 % wider
    manifest = _ingest(root)
    loose = dataclasses.replace(cfg, mask_aspect_tolerance=0.05)
    tight = dataclasses.replace(cfg, mask_aspect_tolerance=0.01)
    assert validate_manifest(manifest, root, loose).result("mask_size").success
    assert not validate_manifest(manifest, root, tight).result("mask_size").success


@pytest.mark.parametrize("kind", ["header_only", "one_class", "mapped_to_one"])
def test_degenerate_sets_stop_at_validate(tmp_path, cfg, kind):
    """Header-only CSVs crashed split (ZeroDivisionError), one class crashed train."""
    classes = None
    if kind == "header_only":
        root = make_isic(tmp_path / "s", [{"image": "ISIC_0", "label": "NV"}])
        (root / "ISIC_2019_Training_GroundTruth.csv").write_text("image,MEL,NV\n")
        expected = {"min_images", "min_classes"}
    elif kind == "one_class":
        root = tmp_path / "s"
        make_folder(root, {"naevus": 12})
        expected = {"min_classes"}
    else:
        root = make_isic(tmp_path / "s", [{"image": f"I{i}", "label": "NV"} for i in range(12)])
        classes = ["benign"]
        expected = {"min_classes"}
    manifest = (
        _ingest(root)
        if kind != "mapped_to_one"
        else build_manifest(root, progress=False, label_map={"NV": "benign"})
    )
    report = validate_manifest(manifest, root, cfg, classes)
    assert {r.rule for r in report.errors()} == expected
    text = report.message()
    assert (
        "min_classes: " in text and "a classifier needs at least 2 (validate.min_classes)" in text
    )
    if kind == "header_only":
        assert "min_images: 0 image(s) in the manifest; at least 10" in text
        assert report.n_rows == 0


def test_too_large_image_names_the_limit_param(tmp_path, cfg):
    root = tmp_path / "s"
    make_folder(root, {"a": 3, "b": 3})
    manifest = build_manifest(root, progress=False, max_pixels=2000)  # 48 x 48 = 2304 > 2000
    report = validate_manifest(manifest, root, dataclasses.replace(cfg, max_pixels=2000))
    value = report.result("image_readable").offenders[0]["value"]
    assert value == (
        "larger than the decompression-bomb limit (48x48 = 2304 pixels > 2000; validate.max_pixels)"
    )


def test_an_old_manifest_is_a_clear_error(folder, cfg):
    from tasks.validate import ManifestError

    old = folder.manifest.drop(columns=["age_text", "mask_foreground"])
    with pytest.raises(ManifestError, match=r"lacks column\(s\) \['age_text', 'mask_foreground'\]"):
        validate_manifest(old, folder.root, cfg)
