"""dermaflow compare: variant resolution, the ablation pairing, agreement tables, fusion
explanations, and one end-to-end run through the CLI (real DVC, Prefect, MLflow, torch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from typer.testing import CliRunner

from tasks.compare import (
    AGREEMENT,
    Variant,
    ablation_pairs,
    ablation_table,
    agreement_across,
    agreement_within,
    paired_table,
    pick_images,
    reference_pairs,
    resolve_variants,
    seed_summary,
    variant_params,
    with_seeds,
)
from tasks.config import ConfigError
from tests.helpers import TINY, make_project, run, write_params

VARIANTS = {
    "custom_cnn": ["model.arch=custom_cnn", "model.metadata_prior=false"],
    "custom_cnn_metadata": [
        "model.arch=custom_cnn",
        "model.metadata=true",
        "model.metadata_prior=false",
    ],
}


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            "custom_cnn_metadata",
            Variant("custom_cnn_metadata", tuple(VARIANTS["custom_cnn_metadata"])),
        ),
        ("resnet18", Variant("resnet18", ("model.arch=resnet18",))),
        ("models:/clf@champion", Variant("clf@champion", (), "models:/clf@champion")),
        ("models:/clf/3", Variant("clf-v3", (), "models:/clf/3")),
    ],
)
def test_entry_resolves_to_a_variant(entry, expected):
    assert resolve_variants([entry], VARIANTS) == [expected]


def test_bundle_paths_are_loaded_with_unique_names(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.pt").write_bytes(b"x")
    got = resolve_variants(["a/model.pt", " b/model.pt ", "resnet18"], VARIANTS, tmp_path)
    assert [v.name for v in got] == ["model", "model-2", "resnet18"]
    assert got[0].source == str((tmp_path / "a/model.pt").resolve()) and not got[0].trained
    assert got[2].trained


def test_no_entries_compare_every_configured_variant():
    assert [v.name for v in resolve_variants(None, VARIANTS)] == list(VARIANTS)


@pytest.mark.parametrize("entry", ["resnet19", "missing/model.pt", "custom-cnn"])
def test_unknown_entry_names_the_choices(entry):
    with pytest.raises(ConfigError) as err:
        resolve_variants(["custom_cnn", entry], VARIANTS)
    message = str(err.value)
    for choice in (repr(entry), "custom_cnn_metadata", "resnet18", "efficientnet_b0", "models:/"):
        assert choice in message


def test_seeds_repeat_trained_variants_only():
    loaded = Variant("clf@champion", (), "models:/clf@champion")
    got = with_seeds([*resolve_variants(None, VARIANTS), loaded], [0, 7])
    assert [v.name for v in got] == [
        "custom_cnn-s0", "custom_cnn-s7", "custom_cnn_metadata-s0", "custom_cnn_metadata-s7",
        "clf@champion",
    ]  # fmt: skip
    assert got[3].overrides == (*VARIANTS["custom_cnn_metadata"], "train.seed=7")
    assert [v.as_dict()["group"] for v in got] == ["custom_cnn"] * 2 + [
        "custom_cnn_metadata"
    ] * 2 + ["clf@champion"]
    assert with_seeds([loaded], []) == [loaded]


def test_seed_summary_is_the_mean_and_sample_sd_per_variant():
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "model": ["a-s0", "a-s1", "a-s2", "b"],
            "balanced_accuracy": rng.random(4),
            "auroc_macro": rng.random(4),
            "ece_after": rng.random(4),
            "train_minutes": rng.random(4),
        }
    )
    got = seed_summary(table, ["a", "a", "a", "b"])
    assert list(got["variant"]) == ["a"] and got.at[0, "seeds"] == 3  # b has no spread
    for metric in ("balanced_accuracy", "auroc_macro", "ece_after", "train_minutes"):
        values = table[metric].to_numpy()[:3]
        assert got.at[0, f"{metric}_mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert got.at[0, f"{metric}_sd"] == pytest.approx(values.std(ddof=1), rel=1e-12)
    assert got.at[0, "balanced_accuracy_min"] == table["balanced_accuracy"][:3].min()
    assert seed_summary(table, ["a", "b", "c", "d"]).empty


@pytest.mark.parametrize("classes", [2, 7])
def test_the_seeds_ensemble_is_the_argmax_of_their_mean_probability(classes):
    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, 300)
    names = ["a-s0", "a-s1", "a-s2", "b"]
    probs = {m: rng.dirichlet(np.ones(classes), 300) for m in names}
    table = pd.DataFrame({"model": names, "balanced_accuracy": rng.random(4)})
    got = seed_summary(table, ["a", "a", "a", "b"], probs, labels)
    mean = (probs["a-s0"] + probs["a-s1"] + probs["a-s2"]) / 3
    expected = balanced_accuracy_score(labels, mean.argmax(axis=1))
    assert got.at[0, "ensemble_balanced_accuracy"] == pytest.approx(expected, rel=1e-12)
    # Not any one seed's score, nor the mean of their scores: the averaged probabilities'.
    alone = [balanced_accuracy_score(labels, probs[m].argmax(axis=1)) for m in names[:3]]
    assert all(abs(expected - a) > 1e-3 for a in [*alone, np.mean(alone)])
    assert got.at[0, "ensemble_ci_low"] < expected < got.at[0, "ensemble_ci_high"]
    # Seeds that agree: the ensemble is each of them.
    same = dict.fromkeys(names, probs["a-s0"])
    got = seed_summary(table, ["a", "a", "a", "b"], same, labels)
    assert got.at[0, "ensemble_balanced_accuracy"] == pytest.approx(alone[0], rel=1e-12)
    assert "ensemble_balanced_accuracy" not in seed_summary(table, ["a", "a", "a", "b"])


def test_each_model_meets_the_first_rows_same_seed():
    loaded = Variant("clf@champion", (), "models:/clf@champion")
    seeded = with_seeds([*resolve_variants(None, VARIANTS), loaded], [0, 7])
    assert reference_pairs([v.as_dict() for v in seeded]) == [
        ("custom_cnn_metadata-s0", "custom_cnn-s0"),
        ("custom_cnn_metadata-s7", "custom_cnn-s7"),
        ("clf@champion", "custom_cnn-s0"),  # no seed of its own: the first row's first seed
    ]
    plain = [v.as_dict() for v in resolve_variants(None, VARIANTS)]
    assert reference_pairs(plain) == [("custom_cnn_metadata", "custom_cnn")]
    assert reference_pairs(plain[:1]) == [] and reference_pairs([]) == []


def test_paired_table_calls_a_gain_only_when_its_interval_excludes_zero():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    noisy = np.where(rng.random(300) < 0.5, labels, (labels + 1) % 3)  # right half the time
    close = noisy.copy()
    close[np.flatnonzero(noisy != labels)[:3]] = labels[np.flatnonzero(noisy != labels)[:3]]
    predicted = {"ref": noisy, "perfect": labels, "same": noisy.copy(), "close": close}
    predicted["wrong"] = (labels + 2) % 3
    pairs = [(name, "ref") for name in ("perfect", "same", "close", "wrong")]
    got = paired_table(labels, predicted, pairs).set_index("model")
    assert list(got["verdict"]) == ["better", "within noise", "within noise", "worse"]
    for name in got.index:
        expected = balanced_accuracy_score(labels, predicted[name]) - balanced_accuracy_score(
            labels, noisy
        )
        assert got.at[name, "gain"] == pytest.approx(expected, abs=1e-12)
        assert got.at[name, "ci_low"] <= got.at[name, "gain"] <= got.at[name, "ci_high"]
    assert got.at["perfect", "p_value"] < 0.01 and got.at["wrong", "p_value"] > 0.99
    assert got.at["same", "gain"] == 0 and got.at["same", "mcnemar_p_value"] == 1.0
    close_gain = got.loc["close", ["ci_low", "gain", "ci_high"]].to_numpy(dtype=float)
    assert close_gain[0] <= 0 < close_gain[1] < close_gain[2]  # 3 images better: not enough
    assert got.at["perfect", "mcnemar_p_value"] < 1e-10 < got.at["wrong", "mcnemar_p_value"]
    assert list(got.reset_index().columns) == [
        "model", "reference", "balanced_accuracy", "reference_balanced_accuracy", "gain",
        "ci_low", "ci_high", "p_value", "mcnemar_p_value", "verdict",
    ]  # fmt: skip


def test_the_printed_table_shows_each_models_gain_over_the_first_row():
    from rich.console import Console

    from flows.compare import results_table

    row = {
        "arch": "resnet18", "metadata": False, "balanced_accuracy": 0.5, "accuracy": 0.6,
        "macro_f1": 0.4, "auroc_macro": 0.8, "ece_before": 0.1, "ece_after": 0.05,
        "train_seconds": 10.0, "parameters": 1000,
    }  # fmt: skip
    summary = {
        "dataset": "d",
        "methods": ["gradcam"],
        "models": [{**row, "model": "base"}, {**row, "model": "better_one"}],
        "paired": [{"model": "better_one", "gain": 0.0421, "verdict": "within noise"}],
    }
    console = Console(width=240, record=True)
    console.print(results_table(summary))
    lines = {line.split()[1]: line for line in console.export_text().splitlines() if "│" in line}
    assert lines["better_one"].rstrip(" │").endswith("+0.042 within noise")
    assert lines["base"].rstrip(" │").endswith("-")


def test_a_seed_listed_twice_is_refused(tmp_path):
    from tasks.config import load_params

    write_params(tmp_path / "params.yaml", ["compare.seeds=[0, 1, 0]"])
    with pytest.raises(ConfigError, match=r"compare\.seeds.*\[0\] listed twice"):
        load_params(tmp_path / "params.yaml")


def test_an_entry_twice_is_an_error():
    with pytest.raises(ConfigError, match="listed twice"):
        resolve_variants(["resnet18", "resnet18"], VARIANTS)


def test_overrides_that_change_the_data_are_refused(tmp_path):
    params = write_params(tmp_path / "params.yaml", TINY)
    same = Variant("v", ("model.arch=resnet18", "prepare.size=32"))  # repeats the base value
    assert variant_params(params, [], same).model.arch == "resnet18"
    with pytest.raises(ConfigError, match=r"prepare\.size.*same prepared split"):
        variant_params(params, [], Variant("v", ("prepare.size=64",)))
    with pytest.raises(ConfigError, match="unknown model.arch 'resnet19'"):
        variant_params(params, [], Variant("v", ("model.arch=resnet19",)))


def test_ablation_pairs_only_variants_that_differ_by_metadata_alone():
    base = {"model.arch": "custom_cnn", "model.metadata": False, "train.lr": 0.002}
    resnet = {**base, "model.arch": "resnet18"}
    params = {
        "cnn_meta": {**base, "model.metadata": True},  # given before its partner
        "cnn": base,
        "resnet": resnet,
        "resnet_meta_other_lr": {**resnet, "model.metadata": True, "train.lr": 0.01},
        "resnet_meta": {**resnet, "model.metadata": True},
        "loaded": None,  # training params unknown: pairs with nothing
    }
    assert ablation_pairs(params) == [("cnn", "cnn_meta"), ("resnet", "resnet_meta")]


def test_ablation_table_is_with_minus_without():
    table = pd.DataFrame(
        {
            "model": ["a", "b"],
            "metadata": [False, True],
            "balanced_accuracy": [0.5, 0.625],
            "ece_after": [0.1, 0.05],
        }
    )
    out = ablation_table(table, [("a", "b")]).set_index("metric")
    assert list(out.index) == ["balanced_accuracy", "ece_after"]  # bools are not metrics
    assert out.at["balanced_accuracy", "delta"] == pytest.approx(0.125)
    assert out.at["ece_after", "delta"] == pytest.approx(-0.05)


def test_agreement_tables_cover_every_pair():
    rng = np.random.default_rng(0)
    maps = {m: rng.random((3, 16, 16)).astype(np.float32) for m in ("gradcam", "ig", "deeplift")}
    maps["same"] = maps["ig"].copy()
    within = agreement_within(maps, 20.0, "m1")
    assert len(within) == 6 and set(within["model"]) == {"m1"}
    identical = within[(within["method_a"] == "ig") & (within["method_b"] == "same")].iloc[0]
    assert all(identical[k] == pytest.approx(1.0) for k in AGREEMENT)
    other = {"gradcam": maps["gradcam"], "ig": maps["deeplift"]}  # no deeplift in m3
    across = agreement_across({"m1": maps, "m2": maps, "m3": other}, 20.0)
    pairs = {(r.method, r.model_a, r.model_b) for r in across.itertuples()}
    assert ("gradcam", "m1", "m3") in pairs and ("deeplift", "m1", "m2") in pairs
    assert ("deeplift", "m1", "m3") not in pairs and len(across) == 3 + 3 + 1 + 1


def test_picked_images_are_stratified_and_fixed():
    labels = np.array([0] * 20 + [1] * 5 + [2] * 2)
    idx = pick_images(labels, 6, seed=0)
    assert len(set(idx)) == 6 and (idx == pick_images(labels, 6, seed=0)).all()
    assert sorted(labels[idx[:3]]) == [0, 1, 2]  # the gallery's first images cover the classes
    assert len(pick_images(labels, 100, seed=0)) == len(labels)


@pytest.mark.parametrize("arch", ["custom_cnn", "resnet18"])
def test_fusion_models_are_explained_one_image_at_a_time(arch):
    """Grad-CAM, IG and DeepLIFT on a fusion model through the engine: each image with its own
    metadata, the same maps as the image-only view of that case."""
    from tasks import engine
    from tasks.cams import explain_batch
    from tasks.fusion import EMBED, FusionNet, ImageOnly
    from tasks.models import build_model

    torch.manual_seed(0)
    model = FusionNet(build_model(arch, EMBED), 5, 3).eval()
    x, meta = torch.randn(2, 3, 32, 32), np.random.default_rng(0).random((2, 5))
    plan = engine.plan(["gradcam", "cam", "ig", "deeplift"], ["middle"], arch, fusion=True)
    assert [m for m, _ in plan] == ["gradcam", "ig", "deeplift"]  # exact CAM is not exact here
    opts = engine.Options(ig_steps=4)
    result = engine.explain(
        model, arch, x, [0, 2], plan, options=opts, scores=["deletion_insertion"], metadata=meta
    )
    for heat in result.maps.values():
        assert heat.shape == (2, 32, 32) and heat.min() >= 0.0 and heat.max() <= 1.0
    second = explain_batch(ImageOnly(model, meta[1]), arch, "gradcam", x[1:], [2], "middle")
    np.testing.assert_array_equal(result.maps[("gradcam", "middle")][1:], second)
    assert len(result.table) == 2 * len(plan)
    assert result.table["deletion_auc"].between(0, 1).all()
    with pytest.raises(ValueError, match="one metadata row per explained image"):
        engine.explain(model, arch, x, [0, 2], plan, options=opts)


def test_a_loaded_bundle_sees_the_cache_through_its_own_colour_constancy(tmp_path):
    """A Shades-of-Gray bundle on a plain cache is scored on corrected images, as it trained."""
    from types import SimpleNamespace

    from flows.compare import CompareError, _load
    from tasks.models import build_model, save_bundle
    from tasks.prepare import color_constancy, open_split, prepare
    from tasks.train import MEAN, STD, normalize
    from tests.helpers import prepare_tiny

    p = prepare_tiny(tmp_path)
    splits = {s: open_split(tmp_path / "prepared", s) for s in ("val", "test")}
    classes = splits["test"].classes
    torch.manual_seed(0)
    model = build_model("custom_cnn", len(classes)).eval()
    job = SimpleNamespace(repo=str(tmp_path), data_version="v1")
    logits = {}
    for color in ("shades_of_gray", "none"):
        bundle = tmp_path / f"{color}.pt"
        extra = {"color_constancy": color}
        save_bundle(bundle, model, "custom_cnn", classes, 32, MEAN, STD, extra=extra)
        got = _load(str(bundle), color, splits, p, job, torch.device("cpu"))
        logits[color] = got["logits"]["test"]
    raw = np.array(splits["test"].images)
    with torch.no_grad():
        for color, want in logits.items():
            x = torch.from_numpy(color_constancy(raw, color)).permute(0, 3, 1, 2).float() / 255
            expected = model(normalize(x)).numpy()
            scale = max(float(np.abs(expected).max()), 1.0)
            np.testing.assert_allclose(want, expected, rtol=0, atol=1e-5 * scale, err_msg=color)
    assert np.abs(logits["shades_of_gray"] - logits["none"]).max() > 1e-3  # it mattered

    # A cache written with colour constancy cannot be undone for a bundle trained without.
    prepare(
        tmp_path / "splits", tmp_path / "raw", tmp_path / "sog", size=32,
        show_progress=False, color="shades_of_gray",
    )  # fmt: skip
    corrected = {s: open_split(tmp_path / "sog", s) for s in ("val", "test")}
    with pytest.raises(CompareError, match="none but the prepared cache was written with shades"):
        _load(str(tmp_path / "none.pt"), "plain", corrected, p, job, torch.device("cpu"))


def test_cli_refuses_an_unknown_model_before_anything_runs(tmp_path):
    from flows.cli import app

    params = write_params(tmp_path / "params.yaml", TINY)
    result = CliRunner().invoke(app, ["compare", "--models", "resnet19", "--params", str(params)])
    assert result.exit_code == 2  # EXIT_BAD_INPUT
    assert "dermaflow compare failed" in result.output and "custom_cnn_metadata" in result.output
    assert not (tmp_path / "mlruns").exists()


# `dermaflow compare` whose first model, once done, leaves params.yaml unreadable behind it.
EDIT_MID_RUN = """
import sys
from pathlib import Path

import flows.compare as compare
from flows.cli import app

variant_task = compare.variant_task


def then_edit_params(variant, bundle, index, job):
    out = variant_task(variant, bundle, index, job)
    Path("params.yaml").write_text("train: {epochs: 3\\n")
    return out


compare.variant_task = then_edit_params
sys.argv = ["dermaflow", "compare", *sys.argv[1:]]
app()
"""


@pytest.mark.slow
def test_compare_three_models_then_load_bundles(tmp_path):
    """Three trained models in one MLflow parent run; then two loaded bundles compared."""
    from mlflow.tracking import MlflowClient

    project = make_project(
        tmp_path / "proj",
        TINY
        + [
            "train.epochs=1",
            "compare.explain_images=4",
            # At 32 px ResNet's deep layer is 1 x 1 (a constant Grad-CAM); middle is 2 x 2.
            "compare.agreement_layer=middle",
            "explain.ig_steps=8",
            "explain.perturbation_steps=8",
        ],
    )
    run(["dvc", "repro", "prepare"], project)
    models = ["custom_cnn", "custom_cnn_metadata", "resnet18"]
    out = run(["dermaflow", "compare", "--models", ",".join(models)], project)
    assert "dermaflow compare" in out.stdout + out.stderr

    uri = f"sqlite:///{project}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("synthetic").experiment_id
    runs = client.search_runs([experiment])
    parents = [r for r in runs if r.info.run_name == "compare"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(models)
    assert len(runs) == 4 and not client.search_registered_models()  # no champion candidates
    assert parent.data.params["variants"] == ",".join(models)
    assert "model.metadata=true" in parent.data.params["variant.custom_cnn_metadata"]
    for child in children:
        for key in ("test_balanced_accuracy", "test_ece_before", "test_ece_after"):
            assert np.isfinite(child.data.metrics[key]), (child.info.run_name, key)
        assert "xai_ig_deletion_auc" in child.data.metrics
        assert child.data.params["model.arch"] in {"custom_cnn", "resnet18"}
        listed = {a.path for a in client.list_artifacts(child.info.run_id, "bundle")}
        assert listed == {"bundle/model.pt"}
        assert "compare/reliability.png" in {
            a.path for a in client.list_artifacts(child.info.run_id, "compare")
        }
        # Like a pipeline run: the raw model in the bundle, its fitted calibrator beside it.
        calibrator = client.download_artifacts(
            child.info.run_id, "calibrate/calibrator.json", str(tmp_path / child.info.run_id)
        )
        fitted = json.loads(Path(calibrator).read_text())
        assert fitted["temperature"] == pytest.approx(child.data.metrics["temperature"])
    reported = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    for name in (
        "comparison.csv",
        "comparison.md",
        "agreement_within.csv",
        "agreement_across.csv",
        "headline.png",
        "reliability.png",
        "agreement_within.png",
        "agreement_across.png",
        "gallery.png",
        "paired.csv",
        "report.html",
        "summary.json",
    ):
        assert f"compare/{name}" in reported, name

    report = project / "reports/compare"
    table = pd.read_csv(report / "comparison.csv")
    assert list(table["model"]) == models
    assert np.isfinite(table[["balanced_accuracy", "ece_before", "ece_after"]]).all().all()
    assert list(table["metadata"]) == [False, True, False]
    assert (table["parameters"] > 0).all() and (table["train_seconds"] > 0).all()

    methods = ["gradcam", "ig", "deeplift"]
    method_pairs = {("gradcam", "ig"), ("gradcam", "deeplift"), ("ig", "deeplift")}
    within = pd.read_csv(report / "agreement_within.csv")
    for model in models:
        part = within[within["model"] == model]
        assert set(zip(part["method_a"], part["method_b"], strict=True)) == method_pairs
    across = pd.read_csv(report / "agreement_across.csv")
    model_pairs = {(a, b) for i, a in enumerate(models) for b in models[i + 1 :]}
    for method in methods:
        part = across[across["method"] == method]
        assert set(zip(part["model_a"], part["model_b"], strict=True)) == model_pairs
    for frame in (within, across):
        assert (frame["n_images"] == 4).all()
        values = frame[list(AGREEMENT)]
        assert values.notna().all().all(), frame
        assert (
            ((values[["ssim", "pearson"]] >= -1) & (values[["ssim", "pearson"]] <= 1)).all().all()
        )
        unit = values[["cosine", "topk_jaccard"]]
        assert ((unit >= 0) & (unit <= 1)).all().all()

    # Each model against the first row, on the same test images (gain = the difference of
    # the balanced accuracies in comparison.csv), also as parent-run metrics.
    paired = pd.read_csv(report / "paired.csv")
    assert list(zip(paired["model"], paired["reference"], strict=True)) == [
        ("custom_cnn_metadata", "custom_cnn"),
        ("resnet18", "custom_cnn"),
    ]
    accuracy = table.set_index("model")["balanced_accuracy"]
    for _, row in paired.iterrows():
        gain = accuracy[row["model"]] - accuracy["custom_cnn"]
        assert row["gain"] == pytest.approx(gain, abs=1e-9)
        assert row["ci_low"] <= row["gain"] <= row["ci_high"] and 0 < row["p_value"] <= 1
        assert row["verdict"] in {"better", "worse", "within noise"}
        assert parent.data.metrics[f"{row['model']}/gain"] == pytest.approx(row["gain"])
    markdown = (report / "comparison.md").read_text()
    assert "## Against the first row" in markdown
    assert "Against the first row" in (report / "report.html").read_text()
    assert "## Ablation: metadata" in markdown
    assert "custom_cnn_metadata (with metadata) minus custom_cnn (without)" in markdown
    assert "Ablation: metadata" in (report / "report.html").read_text()
    summary = json.loads((report / "summary.json").read_text())
    assert summary["ablation_pairs"] == [["custom_cnn", "custom_cnn_metadata"]]
    assert summary["run_id"] == parent.info.run_id and len(summary["images"]["indices"]) == 4

    # Loading instead of training: the fusion child's bundle as MLflow stored it, and a bundle
    # saved by hand (random weights, no data version).
    import mlflow.artifacts

    from tasks.models import build_model, save_bundle
    from tasks.train import MEAN, STD

    fusion_child = next(r for r in children if r.info.run_name == "custom_cnn_metadata")
    downloaded = mlflow.artifacts.download_artifacts(
        run_id=fusion_child.info.run_id,
        artifact_path="bundle/model.pt",
        dst_path=str(tmp_path / "dl"),
        tracking_uri=uri,
    )
    classes = json.loads((project / "data/prepared/meta.json").read_text())["classes"]
    saved = tmp_path / "random_resnet18.pt"
    save_bundle(saved, build_model("resnet18", len(classes)), "resnet18", classes, 32, MEAN, STD)
    # Someone edits params.yaml while the comparison runs (here: broken YAML after the first
    # model): the later models and the report read the flow's copy, so nothing changes.
    params_text = (project / "params.yaml").read_text()
    run(["python", "-c", EDIT_MID_RUN, "--models", f"{downloaded},{saved}", "--no-repro"], project)
    assert (project / "params.yaml").read_text().startswith("train: {epochs: 3")
    (project / "params.yaml").write_text(params_text)

    loaded = pd.read_csv(report / "comparison.csv")
    assert list(loaded["model"]) == ["model", "random_resnet18"]
    assert list(loaded["source"]) == [str(Path(downloaded).resolve()), str(saved.resolve())]
    assert list(loaded["metadata"]) == [True, False]
    assert list(loaded["data_version_match"]) == [True, False]
    assert loaded["train_seconds"].isna().all()
    # The same weights on the same split: the same test metrics as when it was trained.
    trained = table.set_index("model").loc["custom_cnn_metadata"]
    assert loaded.at[0, "balanced_accuracy"] == pytest.approx(trained["balanced_accuracy"])
    assert loaded.at[0, "ece_after"] == pytest.approx(trained["ece_after"], abs=1e-6)
    assert "No two variants differ only by" in (report / "comparison.md").read_text()
    assert not (report / "seeds.csv").exists()
    second = [r for r in client.search_runs([experiment]) if r.info.run_name == "compare"]
    assert len(second) == 2

    # compare.seeds: the trained variant once per seed, the loaded bundle once, and the spread.
    proc = run(["dermaflow", "compare", "--models", f"custom_cnn,{saved}", "--no-repro",
                "--set", "compare.seeds=[3, 4]"], project)  # fmt: skip
    said = proc.stdout + proc.stderr
    seeded = pd.read_csv(report / "comparison.csv")
    assert list(seeded["model"]) == ["custom_cnn-s3", "custom_cnn-s4", "random_resnet18"]
    spread = pd.read_csv(report / "seeds.csv")
    assert list(spread["variant"]) == ["custom_cnn"] and list(spread["seeds"]) == [2]
    two = seeded["balanced_accuracy"][:2]
    assert spread.at[0, "balanced_accuracy_mean"] == pytest.approx(two.mean(), rel=1e-9)
    assert spread.at[0, "balanced_accuracy_sd"] == pytest.approx(two.std(ddof=1), abs=1e-9)
    ensemble = spread.at[0, "ensemble_balanced_accuracy"]
    assert spread.at[0, "ensemble_ci_low"] <= ensemble <= spread.at[0, "ensemble_ci_high"]
    assert "## Across seeds" in (report / "comparison.md").read_text()
    mean, sd = spread.at[0, "balanced_accuracy_mean"], spread.at[0, "balanced_accuracy_sd"]
    assert f"custom_cnn over 2 seeds: balanced accuracy {mean:.3f} +- {sd:.3f}" in said
    assert f"their ensemble {ensemble:.3f} [" in said
    assert "Across seeds" in (report / "report.html").read_text()
    latest = max(
        (r for r in client.search_runs([experiment]) if r.info.run_name == "compare"),
        key=lambda r: r.info.start_time,
    )
    assert latest.data.metrics["custom_cnn/balanced_accuracy_mean"] == pytest.approx(
        spread.at[0, "balanced_accuracy_mean"]
    )
    assert latest.data.metrics["custom_cnn/ensemble_balanced_accuracy"] == pytest.approx(ensemble)
    seeds = {
        r.info.run_name: r.data.params.get("train.seed")
        for r in client.search_runs([experiment])
        if r.data.tags.get("mlflow.parentRunId") == latest.info.run_id
    }
    assert seeds == {"custom_cnn-s3": "3", "custom_cnn-s4": "4", "random_resnet18": None}
