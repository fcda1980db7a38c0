"""Recipes: each reference study runs end to end, on the embedded default at tiny size.

The plan (fallback to the synthetic default, pinned overrides) is checked quickly for every
recipe; then each recipe runs through ``dermaflow recipe`` in a scratch git + DVC project and
the test reads what it left: DVC metrics, the MLflow store, the comparison report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.recipe import EMBEDDED, plan_recipe, write_recipe_params
from tasks.config import ConfigError, load_params
from tests.helpers import REPO, make_project, run

RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
NAMES = [r.stem for r in RECIPES]

# Tiny sizes for every model a recipe trains (pinned: they also override compare variants).
TINY_DATA = [
    "synth.count=150",
    "synth.image_size=48",
    "synth.class_mix={NV: 0.5, MEL: 0.3, BCC: 0.2}",
    "validate.min_side=32",
    "ingest.workers=1",
    "prepare.workers=1",
    "prepare.size=32",
    "train.epochs=1",
    "train.batch_size=32",
    "train.warmup_epochs=0",
    "train.workers=0",
    "explain.per_class=1",
    "explain.misclassified_cap=1",
    "explain.bootstrap=50",
    "explain.scorecam_budget=1",
    "explain.lime_budget=1",
    "explain.lime_samples=20",
    "explain.ig_steps=4",
    "export.bench_repeats=2",
    "compare.explain_images=4",
    "tune.trials=2",
    "tune.epochs=1",
    # The trust stages run, cheaply: the pipeline test covers their real-size behaviour.
    "ood.external=[]",
    "ood.nonskin_count=4",
    "evaluate.bootstrap=50",
    "subgroups.bootstrap=20",
    "card.bootstrap=50",
    "gate.bootstrap=50",
    "export.bench_batches=[1]",
    "orchestration.save_experiment=false",
]


def test_every_recipe_is_listed_and_valid() -> None:
    assert set(NAMES) == {
        "isic2019_resnet50_cams",
        "binary_malignancy",
        "backbones_side_by_side",
        "ham10000_balance_and_tune",
        "ham10000_dev_ablation",
        "mednode_agreement",
    }


@pytest.mark.parametrize("recipe", RECIPES, ids=NAMES)
def test_plan_falls_back_to_the_embedded_default_with_pinned_overrides(
    recipe: Path, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "proj", [], git=False)
    plan = plan_recipe(recipe, project, ["train.epochs=1"])
    section = yaml.safe_load(recipe.read_text())["recipe"]
    assert plan.embedded and plan.steps == section["steps"]
    assert plan.pinned == [*section["small"], "train.epochs=1"]
    assert plan.overrides[: len(EMBEDDED)] == EMBEDDED

    write_recipe_params(recipe, project, plan)
    p = load_params(project / "params.yaml")
    assert p.dataset.root == "data/raw/synthetic" and p.recipe.name == section["name"]
    assert p.train.epochs == 1 and p.model.pretrained == "none"
    preset = yaml.safe_load(recipe.read_text())
    if "compare" in plan.steps:  # the recipe's variants replace the default's, each pinned
        assert list(p.compare.variants) == list(preset["compare"]["variants"])
        for name, sets in p.compare.variants.items():
            assert (
                sets[: len(preset["compare"]["variants"][name])]
                == preset["compare"]["variants"][name]
            )
            assert sets[-1] == "train.epochs=1" and "model.pretrained=none" in sets


def test_plan_uses_the_dataset_when_present(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", [], git=False)
    data = tmp_path / "mednode"
    (data / "melanoma").mkdir(parents=True)
    recipe = REPO / "configs" / "recipes" / "mednode_agreement.yaml"
    plan = plan_recipe(recipe, project, [f"dataset.root={data}"])
    assert not plan.embedded and plan.overrides == [f"dataset.root={data}"]


@pytest.mark.parametrize(
    ("text", "match"),
    [("recipe: {name: x}\n", "not a recipe"), ("recipe: {steps: [deploy]}\n", "unknown steps")],
)
def test_bad_recipe_is_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    project = make_project(tmp_path / "proj", [], git=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=match):
        plan_recipe(bad, project)


def _recipe(project: Path, name: str, extra: list[str] = ()) -> None:
    sets = [a for o in [*TINY_DATA, *extra] for a in ("--set", o)]
    recipe = REPO / "configs" / "recipes" / f"{name}.yaml"
    run(["dermaflow", "recipe", str(recipe), "--no-refresh", *sets], project)


def _client(project: Path) -> MlflowClient:
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.slow
def test_recipe_isic2019_resnet50_cams(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", [])
    _recipe(project, "isic2019_resnet50_cams")
    p = load_params(project / "params.yaml")
    assert (p.model.arch, p.train.optimizer, p.train.lr) == ("resnet50", "adam", 0.002)
    assert p.split.fractions == {"train": 0.7, "val": 0.1, "test": 0.2}
    summary = json.loads((project / "reports" / "explain" / "summary.json").read_text())
    pairs = {(m["method"], m["layer"]) for m in summary["methods"]}
    wanted = {"gradcam", "gradcampp", "scorecam"}
    assert {(m, layer) for m in wanted for layer in ("early", "middle", "deep")} <= pairs
    explanations = pd.read_parquet(project / "reports" / "explain" / "explanations.parquet")
    assert explanations["text"].str.len().gt(20).all()  # a sentence for every map
    runs = _client(project).search_runs(
        [_client(project).get_experiment_by_name("isic2019-resnet50-cams-embedded").experiment_id]
    )
    assert runs and runs[0].data.params["model.arch"] == "resnet50"


@pytest.mark.slow
def test_recipe_binary_malignancy(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", [])
    _recipe(project, "binary_malignancy")
    meta = json.loads((project / "data" / "prepared" / "meta.json").read_text())
    assert meta["classes"] == ["benign", "malignant"]
    manifest = pd.read_parquet(project / "data" / "manifest.parquet")
    assert set(manifest.loc[manifest["label"] == "malignant", "source_label"]) == {"MEL", "BCC"}
    summary = json.loads((project / "reports" / "explain" / "summary.json").read_text())
    assert {m["method"] for m in summary["methods"]} == {"cam", "gradcam"}
    train = json.loads((project / "metrics" / "train.json").read_text())
    assert 0.0 <= train["test"]["balanced_accuracy"] <= 1.0


def _compare_runs(project: Path, experiment: str) -> tuple[object, list]:
    client = _client(project)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parent = next(r for r in runs if r.info.run_name == "compare")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


@pytest.mark.slow
def test_recipe_backbones_side_by_side(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", [])
    _recipe(project, "backbones_side_by_side", ["compare.agreement_layer=middle"])
    summary = json.loads((project / "reports" / "explain" / "summary.json").read_text())
    assert {(m["method"], m["layer"]) for m in summary["methods"]} >= {
        ("gradcam", "middle"),
        ("gradcam", "deep"),
        ("lime", "input"),
    }
    table = pd.read_csv(project / "reports" / "compare" / "comparison.csv")
    assert list(table["model"]) == ["resnet50", "efficientnet_b0", "densenet201"]
    across = pd.read_csv(project / "reports" / "compare" / "agreement_across.csv")
    assert set(across["method"]) == {"gradcam", "lime"} and len(across) == 2 * 3
    _, children = _compare_runs(project, "backbones-side-by-side-embedded")
    assert len(children) == 3


@pytest.mark.slow
def test_recipe_ham10000_balance_and_tune(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", [])
    _recipe(project, "ham10000_balance_and_tune", ["compare.agreement_layer=middle"])
    tuned = yaml.safe_load((project / "configs" / "tuned.yaml").read_text())
    assert set(tuned) <= {"train", "model"} and tuned
    table = pd.read_csv(project / "reports" / "compare" / "comparison.csv").set_index("model")
    archs = ("custom_cnn", "resnet50", "densenet121")
    expected = {f"{a}_{b}" for a in archs for b in ("balanced", "imbalanced")}
    assert set(table.index) == expected | {"custom_cnn_tuned"}
    weights = {
        r.info.run_name: r.data.params["train.class_weights"]
        for r in _compare_runs(project, "ham10000-balance-and-tune-embedded")[1]
    }
    assert weights["resnet50_balanced"] == "inverse" and weights["resnet50_imbalanced"] == "none"
    client = _client(project)
    runs = client.search_runs(
        [client.get_experiment_by_name("ham10000-balance-and-tune-embedded").experiment_id]
    )
    tune_parent = next(r for r in runs if r.info.run_name == "tune-custom_cnn")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune_parent.info.run_id]
    assert len(trials) == 2


@pytest.mark.slow
def test_recipe_mednode_agreement_on_real_photos(tmp_path: Path, mednode: Path) -> None:
    project = make_project(tmp_path / "proj", [])
    real = [f"dataset.root={mednode}", "validate.min_side=128", "prepare.size=48"]
    real += ["model.pretrained=none", "compare.agreement_layer=middle"]
    _recipe(project, "mednode_agreement", real)
    meta = json.loads((project / "data" / "prepared" / "meta.json").read_text())
    assert meta["classes"] == ["melanoma", "naevus"]
    calibration = json.loads((project / "metrics" / "calibrate.json").read_text())
    assert calibration["temperature"] > 0 and "test_ece_after" in calibration
    within = pd.read_csv(project / "reports" / "compare" / "agreement_within.csv")
    pairs = {("gradcam", "ig"), ("gradcam", "deeplift"), ("ig", "deeplift")}
    for model in ("efficientnet_b0", "resnet50"):
        part = within[within["model"] == model]
        assert set(zip(part["method_a"], part["method_b"], strict=True)) == pairs
    across = pd.read_csv(project / "reports" / "compare" / "agreement_across.csv")
    assert set(across["method"]) == {"gradcam", "ig", "deeplift"}
    # Pixel-level maps are never constant; a 48 px Grad-CAM may be (then Pearson is undefined).
    pixel = across[across["method"] != "gradcam"]
    assert pixel[["ssim", "pearson", "cosine", "topk_jaccard"]].notna().all().all()
    assert across["ssim"].between(-1, 1).all()
