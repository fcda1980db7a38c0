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
    assert proc.returncode == 1
    message = proc.stdout + proc.stderr
    assert "Traceback" not in message
    assert "image_readable" in message
    assert "melanoma_1" in message and "truncated" in message
    assert "naevus_2" in message and "not_an_image" in message
    # The report is written even though the stage failed, and split refuses to run.
    report = json.loads((tmp_path / "data/reports/validation.json").read_text())
    assert report["passed"] is False
    blocked = run(["dermaflow", "split"], tmp_path, check=False)
    assert blocked.returncode == 1 and "failed validation" in blocked.stdout + blocked.stderr


def test_unknown_param_is_a_clear_error(tmp_path):
    (tmp_path / "params.yaml").write_text(
        (REPO / "params.yaml").read_text().replace("  count: 1500", "  cuont: 1500")
    )
    proc = run(["dermaflow", "synth"], tmp_path, check=False)
    assert proc.returncode == 1
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
