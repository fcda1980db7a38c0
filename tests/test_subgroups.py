"""Subgroup analysis (tasks/subgroups.py): per-group metrics, gaps, flags, and the stage.

The analysis is checked on predictions built so that one group is worse by a known amount; the
stage runs once, end to end, on a tiny prepared project with a real bundle, a real lineage run
in a sqlite MLflow store and one external set (scored by the real evaluate stage first).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.config import SubgroupsConfig
from tasks.subgroups import age_band, analyse_split, attribute_columns
from tests.helpers import TINY, prepare_tiny, write_params

CFG = SubgroupsConfig(min_group_n=20, max_gap=0.1, bootstrap=200, confidence=0.95, seed=0)


def test_age_bands() -> None:
    bands = age_band([5, 30, 44.9, 45, 75, 90, None, float("nan")], [30, 45, 60, 75])
    assert bands == ["<30", "30-44", "30-44", "45-59", "75+", "75+", "unknown", "unknown"]


def worse_group_case() -> tuple[list[str], list[str], pd.DataFrame]:
    """``b`` (n=60) is right 50 % of the time, ``a`` and ``unknown`` 90 %, ``tiny`` (n=5) never."""
    labels, predicted, sex = [], [], []
    for group, n, right in (("a", 60, 54), ("b", 60, 30), ("tiny", 5, 0), ("unknown", 30, 27)):
        for i in range(n):
            label = ["MEL", "NV"][i % 2]
            labels.append(label)
            predicted.append(label if i < right else ("NV" if label == "MEL" else "MEL"))
            sex.append(group)
    return labels, predicted, pd.DataFrame({"sex": sex})


def test_flags_the_group_below_the_rest_and_reports_the_largest_gap() -> None:
    labels, predicted, groups = worse_group_case()
    out = analyse_split(labels, predicted, groups, CFG, "test")
    table = out["groups"]["sex"]
    assert table["a"]["n"] == 60 and table["b"]["n"] == 60
    assert table["a"]["accuracy"] == pytest.approx(0.9) and table["b"]["accuracy"] == 0.5
    low, high = table["b"]["ci"]
    assert low <= table["b"]["balanced_accuracy"] <= high and high - low < 0.4
    flagged = [f for f in out["flags"] if "sex=b" in f]
    assert flagged and all("sex=a" not in f for f in out["flags"])
    assert not [f for f in out["flags"] if "tiny" in f or "unknown" in f]  # small / no group
    gap = out["largest_gap"]["accuracy"]
    assert gap["attribute"] == "sex" and gap["gap"] == pytest.approx(0.4)
    assert "melanoma_sensitivity" in table["a"]


def test_a_higher_threshold_flags_nothing() -> None:
    labels, predicted, groups = worse_group_case()
    cfg = SubgroupsConfig(min_group_n=20, max_gap=0.6, bootstrap=50, seed=0)
    assert analyse_split(labels, predicted, groups, cfg, "test")["flags"] == []


def test_attribute_columns_fill_unknowns() -> None:
    frame = pd.DataFrame(
        {"sex": ["male", None], "age": [50, np.nan], "site": ["back", None],
         "skin_tone": ["tan", "unknown"]}
    )  # fmt: skip
    cols = attribute_columns(frame, CFG)
    assert cols.to_dict("list") == {
        "sex": ["male", "unknown"],
        "age_band": ["45-59", "unknown"],
        "site": ["back", "unknown"],
        "skin_tone": ["tan", "unknown"],
    }


def test_stage_on_a_tiny_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import evaluate, paths, subgroups, tracking
    from tasks.config import load_params
    from tasks.conformal import ConformalSets
    from tasks.io import write_json
    from tasks.metrics import save_predictions
    from tasks.models import build_model, save_bundle
    from tasks.prepare import open_split
    from tasks.train import MEAN, STD
    from tests.test_evaluate import COLOURS, write_jpeg

    monkeypatch.chdir(tmp_path)
    paths.DATA.mkdir()
    prepare_tiny(paths.DATA)  # data/splits and data/prepared: where the stages read them
    ext = tmp_path / "ph2"
    for folder, cls, n in (("common_nevus", "NV", 5), ("melanoma", "MEL", 5)):
        for i in range(n):
            write_jpeg(ext / folder / f"{folder}_{i}.jpg", COLOURS[cls], i)
    external = ("evaluate.external=[{name: ph2, root: ph2, layout: folder, "
                "label_map: {common_nevus: NV, melanoma: MEL}}]")  # fmt: skip
    write_params(tmp_path / "params.yaml", [*TINY, external, "evaluate.bootstrap=50",
                 "subgroups.bootstrap=50", "subgroups.min_group_n=3"])  # fmt: skip
    p = load_params("params.yaml")

    test = open_split(paths.PREPARED, "test")
    torch.manual_seed(0)
    model = build_model("custom_cnn", len(test.classes)).eval()
    with torch.no_grad():
        model.classifier[-1].weight.mul_(20.0)
        x = torch.from_numpy(np.array(test.images)).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        logits = model(x).numpy()
    save_bundle(paths.BUNDLE, model, "custom_cnn", test.classes, 32, MEAN, STD)
    with tracking.lineage_run("tiny", "train", {}, ".", bundle=paths.BUNDLE):
        tracking.log_metrics({"test_balanced_accuracy": 0.5})
    save_predictions(paths.PREDICTIONS / "test.npz", logits, test.labels,
                     test.rows["image_id"], test.classes)  # fmt: skip
    write_json(paths.CALIBRATION / "calibrator.json", {"method": "temperature", "temperature": 2})
    write_json(paths.METRICS / "calibrate.json", {"referral_threshold": 0.8})
    write_json(paths.MODELS / "conformal.json", ConformalSets("aps", 0.9, qhat=0.9).to_dict())

    evaluate.run(p)
    subgroups.run(p)

    ev = json.loads((paths.METRICS / "evaluate.json").read_text())["sets"]["ph2"]
    assert ev["n"] == 10 and ev["shared_classes"] == ["MEL", "NV"]
    assert 0.0 <= ev["referred_share"] <= 1.0 and ev["melanoma"]["sensitivity"] is not None
    # The conformal stage's sets of this very bundle, scored on the external set.
    table = pd.read_parquet(evaluate.TABLES / "ph2.parquet")
    members = [s.strip("{}").split(", ") for s in table["prediction_set"]]
    hits = [label in m for label, m in zip(table["label"], members, strict=True)]
    assert ev["conformal"]["target_coverage"] == 0.9
    assert ev["conformal"]["coverage"] == pytest.approx(np.mean(hits))
    assert ev["conformal"]["mean_set_size"] == pytest.approx(np.mean([len(m) for m in members]))
    out = json.loads((paths.METRICS / "subgroups.json").read_text())
    assert set(out["splits"]) == {"test", "ph2"}
    test_groups = out["splits"]["test"]["groups"]
    assert set(test_groups) == {"sex", "age_band", "site", "skin_tone"}
    assert sum(g["n"] for g in test_groups["sex"].values()) == len(test.rows)
    for entry in test_groups["sex"].values():
        assert {"n", "balanced_accuracy", "ci"} <= set(entry)
    assert out["splits"]["ph2"]["groups"]["sex"] == {
        "unknown": out["splits"]["ph2"]["groups"]["sex"]["unknown"]
    }  # a folder set records no sex
    train_n = len(open_split(paths.PREPARED, "train").rows)
    assert sum(out["train_skin_tone"].values()) == train_n
    assert out["train_skin_tone"]["unknown"] < train_n  # the synthetic skin is measurable
    assert (Path("reports/subgroups") / "test_balanced_accuracy.png").stat().st_size > 0
    assert (Path("reports/evaluate/ph2") / "confusion_matrix.png").is_file()
    assert pd.read_parquet(Path("data/evaluate/ph2.parquet"))["label"].tolist().count("NV") == 5
