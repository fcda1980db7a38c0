"""The ``dermaflow`` entries as a user meets them: exit codes and messages, no tracebacks."""

from __future__ import annotations

import json

import pytest

from tests.datasets import make_folder, not_an_image, truncate
from tests.helpers import REPO, run, write_params


def test_help_lists_every_stage(tmp_path):
    out = run(["dermaflow", "--help"], tmp_path).stdout
    for name in ("synth", "ingest", "validate", "split", "prepare", "train", "preset", "run"):
        assert name in out


def test_broken_dataset_stops_validate_naming_rows(tmp_path):
    files = make_folder(tmp_path / "ds", {"melanoma": 4, "naevus": 4})
    truncate(files["melanoma"][1])
    not_an_image(files["naevus"][2])
    write_params(tmp_path / "params.yaml", ["dataset.root=ds", "dataset.layout=folder"])
    run(["dermaflow", "ingest"], tmp_path)
    proc = run(["dermaflow", "validate"], tmp_path, check=False)
    assert proc.returncode == 2  # EXIT_BAD_INPUT
    message = proc.stdout + proc.stderr
    assert "Traceback" not in message
    assert "image_readable" in message
    assert "melanoma_1" in message and "truncated" in message
    assert "naevus_2" in message and "not_an_image" in message
    # The report is written even though the stage failed, and split refuses to run.
    report = json.loads((tmp_path / "data/reports/validation.json").read_text())
    assert report["passed"] is False
    blocked = run(["dermaflow", "split"], tmp_path, check=False)
    assert blocked.returncode == 2 and "failed validation" in blocked.stdout + blocked.stderr


def test_unknown_param_is_a_clear_error(tmp_path):
    (tmp_path / "params.yaml").write_text(
        (REPO / "params.yaml").read_text().replace("  count: 1500", "  cuont: 1500")
    )
    proc = run(["dermaflow", "synth"], tmp_path, check=False)
    assert proc.returncode == 2  # EXIT_BAD_INPUT
    assert "unknown key(s) ['cuont']" in proc.stdout + proc.stderr


def test_preset_merges_and_keeps_comments(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    run(["dermaflow", "preset", str(REPO / "configs/isic2019.yaml"), "-p", str(params)], tmp_path)
    text = params.read_text()
    assert "arch: resnet50" in text and "layout: isic2019" in text
    assert "# side of the square cached images" in text  # comments survive
    from tasks.config import load_params

    p = load_params(params)
    assert p.prepare.size == 224 and p.train.lr == 0.0001 and p.synth.count == 1500


@pytest.mark.parametrize("value", [1e-05, 1e-12, 2.5e-07, 0.001, 3.0, 1e20])
def test_preset_floats_load_back_as_floats(tmp_path, value):
    """ruamel writes 1e-05 without a dot; PyYAML would read that back as a string."""
    from tasks.config import load_params, update_params

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    update_params(params, {"train": {"weight_decay": value}}, where="test")
    assert load_params(params).train.weight_decay == value


def test_preset_replaces_whole_values_instead_of_merging(tmp_path):
    """A recipe's compare variants and class mix replace the defaults; sections still merge."""
    from tasks.config import apply_preset, load_params

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        "compare: {variants: {a: [model.arch=resnet18]}}\n"
        "synth: {class_mix: {NV: 0.6, MEL: 0.4}}\ntrain: {epochs: 3}\n"
    )
    apply_preset(params, preset)
    p = load_params(params)
    assert p.compare.variants == {"a": ["model.arch=resnet18"]}
    assert p.synth.class_mix == {"NV": 0.6, "MEL": 0.4}
    assert p.train.epochs == 3 and p.train.batch_size == 64  # the rest of train is kept


def test_ham10000_preset_b_applies_on_top_of_preset_a(tmp_path):
    """The README's two commands give the GPU recipe: B's fine-tuning keys, A's for the rest."""
    from tasks.config import load_params

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    run(["dermaflow", "preset", str(REPO / "configs/ham10000.yaml"), "-p", str(params)], tmp_path)
    a = load_params(params)
    run(
        ["dermaflow", "preset", str(REPO / "configs/ham10000_gpu.yaml"), "-p", str(params)],
        tmp_path,
    )
    b = load_params(params)
    assert (b.prepare.size, b.model.pretrained, b.train.lr, b.train.epochs) == (
        224,
        "imagenet",
        0.0001,
        30,
    )
    assert b.train.augment.rotation == 20 and tuple(b.train.augment.crop_scale) == (0.75, 1.0)
    assert b.train.augment.hflip and b.train.augment.vflip  # A's flips: the section merges
    assert (a.train.loss, a.train.class_weights) == ("logit_adjusted", "none")  # preset A's
    assert (a.train.mask_loss, a.train.mask_missing) == (0.5, "skip")  # preset A's mask loss
    for key in ("loss", "class_weights", "logit_tau", "tta", "mixup_alpha", "mask_loss"):
        assert getattr(b.train, key) == getattr(a.train, key), key  # carried over from A
    assert b.prepare.color_constancy == a.prepare.color_constancy == "shades_of_gray"
    assert b.dataset == a.dataset and b.split == a.split


def test_preset_a_trains_a_ham10000_download_that_came_without_masks(tmp_path):
    """Preset A turns the lesion-mask loss on; HAM10000 as Harvard Dataverse gives it has no
    segmentations: the README's walk-through still trains, and says the loss is off."""
    from tests.datasets import make_ham
    from tests.helpers import make_project

    rows = [{"image_id": f"ISIC_{i:07d}", "dx": ("nv", "mel", "bkl")[i % 3]} for i in range(36)]
    make_ham(tmp_path / "ham", rows)
    project = make_project(tmp_path / "proj", [])
    run(["dermaflow", "preset", str(REPO / "configs/ham10000.yaml")], project)
    tiny = tmp_path / "tiny.yaml"  # the dev-half numbers at test size
    tiny.write_text(
        f"dataset: {{root: {tmp_path / 'ham'}}}\nvalidate: {{min_side: 32}}\n"
        "prepare: {size: 32, workers: 1}\ningest: {workers: 1}\n"
        "train: {epochs: 1, batch_size: 16, warmup_epochs: 0}\n"
    )
    run(["dermaflow", "preset", str(tiny)], project)
    out = run(["dvc", "repro", "train"], project)
    said = " ".join((out.stdout + out.stderr).split())
    assert "have no lesion mask" in said and "so the mask loss is off" in said
    assert (project / "models" / "model.pt").is_file()


def test_ingest_and_validate_say_what_they_chose_and_what_they_left_out(tmp_path):
    """Auto-detection names its layout and why; unlisted files and lost metadata are warned."""
    from tests.datasets import make_isic, write_image

    rows = [{"image": f"ISIC_{i}", "label": ["MEL", "NV"][i % 2]} for i in range(12)]
    root = make_isic(tmp_path / "ds", rows)
    (root / "ISIC_2019_Training_Metadata.csv").unlink()
    write_image(root / "ISIC_2019_Training_Input" / "ISIC_orphan.jpg")
    write_params(tmp_path / "params.yaml", ["dataset.root=ds", "ingest.workers=1"])
    ingest = run(["dermaflow", "ingest"], tmp_path)
    said = ingest.stdout + ingest.stderr
    assert "layout isic2019 (ISIC_2019_Training_GroundTruth.csv found at the root)" in said
    assert "1 image file(s) have no ground-truth row" in said
    summary = json.loads((tmp_path / "metrics/ingest.json").read_text())
    assert summary["unlisted_examples"] == ["ISIC_2019_Training_Input/ISIC_orphan.jpg"]
    assert summary["lesion_grouping"] is False
    validate = run(["dermaflow", "validate"], tmp_path)  # warnings by default: it passes
    said = validate.stdout + validate.stderr
    assert "[warning] metadata_present:" in said and "lesion grouping is off" in said
    assert "[warning] image_unlisted: 1 image file(s)" in said and "Traceback" not in said
    strict = run(
        ["dermaflow", "validate", "--set", "validate.severity.metadata_present=error"],
        tmp_path,
        check=False,
    )
    assert strict.returncode == 2 and "[error] metadata_present" in strict.stdout + strict.stderr


def test_predict_gives_every_file_one_row_and_counts_the_skipped(tmp_path):
    """The same rule for a folder and for files named one by one (tasks.predict.scan_inputs)."""
    import pandas as pd

    from tasks.export import export_onnx
    from tasks.models import build_model
    from tasks.train import MEAN, STD
    from tests.datasets import write_image

    meta = {
        "arch": "custom_cnn", "classes": ["a", "b"], "input_size": 32,
        "normalization": {"mean": list(MEAN), "std": list(STD)},
    }  # fmt: skip
    export_onnx(build_model("custom_cnn", 2).eval(), meta, tmp_path / "m.onnx", 18, 1.0, "r")
    d = tmp_path / "in"
    write_image(d / "a.jpg")
    (d / "notes.txt").write_text("x")
    write_image(d / "a_segmentation.png")
    (d / ".DS_Store").write_bytes(b"\0")
    (d / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    folder = run(["dermaflow", "predict", "in", "-m", "m.onnx", "-o", "f.csv"], tmp_path)
    named = run(
        ["dermaflow", "predict", "in/a.jpg", "in/notes.txt", "in/gone.jpg", "in/a_segmentation.png",
         "-m", "m.onnx", "-o", "n.csv"], tmp_path,
    )  # fmt: skip
    a, b = pd.read_csv(tmp_path / "f.csv"), pd.read_csv(tmp_path / "n.csv")
    assert sorted(a["image"]) == ["in/a.jpg", "in/gone.jpg", "in/notes.txt"]
    assert sorted(b["image"]) == sorted(a["image"])  # named or found: the same rows
    assert a.set_index("image")["error"].notna().to_dict() == {
        "in/a.jpg": False, "in/gone.jpg": True, "in/notes.txt": True,
    }  # fmt: skip
    assert "1 mask(s) and 1 hidden file(s) skipped" in folder.stdout + folder.stderr
    assert "1 mask(s) skipped" in named.stdout + named.stderr
