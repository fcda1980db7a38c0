"""Tune: the search space, its errors, and `dermaflow tune` end to end (MLflow, study, preset)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest

from flows.tune import run_tune
from tasks.config import ConfigError, Params, apply_preset, load_params
from tasks.tune import (
    check_space,
    make_pruner,
    parse_space,
    preset_text,
    report_epoch,
    suggest,
    to_override,
    trial_overrides,
    trials_table,
)
from tests.helpers import REPO, TINY, make_project, run, write_params

REPO_PARAMS = REPO / "params.yaml"

SPACE = (
    "tune.space={train.lr: {low: 0.001, high: 0.01, log: true}, "
    "model.dropout: {low: 0.0, high: 0.5}, train.class_weights: {choices: [none, inverse]}}"
)


def value_at(params: Params, key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        node = getattr(node, part)
    return node


@pytest.fixture
def params_file(tmp_path) -> Path:
    return write_params(tmp_path / "params.yaml", TINY)


@pytest.mark.parametrize(
    ("key", "spec", "fixed", "override", "kind"),
    [
        # 1e-05 printed by str() would load back as a string: the override must keep the float.
        (
            "train.weight_decay",
            {"low": 1e-6, "high": 1e-3, "log": True},
            1e-05,
            "train.weight_decay=1.0e-05",
            "float",
        ),
        ("train.batch_size", {"low": 16, "high": 64, "step": 16}, 48, "train.batch_size=48", "int"),
        ("model.dropout", {"low": 0, "high": 0.5}, 0.25, "model.dropout=0.25", "float"),
        ("train.augment.rotation", {"low": 0, "high": 30}, 15, "train.augment.rotation=15", "int"),
        (
            "train.class_weights",
            {"choices": ["inverse", "sqrt_inverse"]},
            "sqrt_inverse",
            "train.class_weights=sqrt_inverse",
            "categorical",
        ),
        (
            "train.weighted_sampler",
            {"choices": [True, False]},
            False,
            "train.weighted_sampler=false",
            "categorical",
        ),
    ],
)
def test_space_maps_to_typed_overrides(params_file, key, spec, fixed, override, kind):
    (dim,) = check_space({key: spec}, params_file)
    assert dim.kind == kind
    assert suggest(optuna.trial.FixedTrial({key: fixed}), [dim]) == {key: fixed}
    assert to_override(key, fixed) == override
    overrides = trial_overrides({key: fixed}, epochs=3)
    assert overrides == [override, "train.epochs=3"]
    p = load_params(params_file, overrides)
    assert value_at(p, key) == fixed and p.train.epochs == 3

    # What a real sampler draws stays in range, has the right type and loads.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        (value,) = suggest(study.ask(), [dim]).values()
        if kind == "categorical":
            assert value in spec["choices"]
        else:
            assert spec["low"] <= value <= spec["high"]
            assert isinstance(value, int if kind == "int" else float)
        assert value_at(load_params(params_file, [to_override(key, value)]), key) == value


@pytest.mark.parametrize(
    ("space", "match"),
    [
        ({"train.lrr": {"low": 0.1, "high": 0.2}}, r"tune\.space\.train\.lrr: .*not a params key"),
        ({"trian.lr": {"low": 0.1, "high": 0.2}}, r"tune\.space\.trian\.lr: .*only model"),
        ({"train.augment": {"choices": [1, 2]}}, r"tune\.space\.train\.augment: .*section"),
        ({"calibrate.bins": {"low": 5, "high": 20}}, r"tune\.space\.calibrate\.bins: .*only model"),
        ({"train.epochs": {"low": 1, "high": 3}}, r"tune\.space\.train\.epochs: .*tune\.epochs"),
        (
            {"train.batch_size": {"choices": ["small", 32]}},
            r"tune\.space\.train\.batch_size: 'small' is not a valid",
        ),
        (
            {"train.class_weights": {"choices": ["inverted"]}},
            r"tune\.space\.train\.class_weights: .*class_weights must be",
        ),
        ({"train.lr": {"low": 0.0, "high": 0.1, "log": True}}, r"train\.lr: a log range"),
        ({"train.lr": {"low": 0.1, "high": 0.2, "lg": True}}, r"train\.lr: unknown field"),
        ({"train.lr": {"low": 0.2, "high": 0.1}}, r"train\.lr: low and high"),
        ({"train.augment.crop_scale": {"choices": [[0.8, 1.0]]}}, r"crop_scale: choices must be"),
    ],
)
def test_invalid_space_is_rejected_naming_the_key(params_file, space, match):
    with pytest.raises(ConfigError, match=match):
        check_space(space, params_file)


def test_bad_space_fails_before_any_trial_or_store(tmp_path, params_file):
    bad = "tune.space={train.lr: {low: 0.001, high: 0.01}, train.lrr: {low: 0.1, high: 0.2}}"
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.lrr"):
        run_tune(params_file, [bad], tmp_path / "prepared", repo=tmp_path, show_progress=False)
    with pytest.raises(FileNotFoundError, match=r"no prepared cache; run `dvc repro prepare`"):
        run_tune(params_file, [], tmp_path / "prepared", repo=tmp_path, show_progress=False)
    assert not (tmp_path / "mlruns").exists()  # neither a study nor an MLflow run was made


def test_preset_text_applies_to_the_sampled_values(tmp_path, params_file):
    dims = parse_space(
        {
            "train.weight_decay": {"low": 1e-6, "high": 1e-3, "log": True},
            "train.augment.rotation": {"low": 0, "high": 30},
            "model.dropout": {"low": 0.0, "high": 0.5},
            "train.class_weights": {"choices": ["inverse", "effective_number"]},
        }
    )
    best = {
        "train.weight_decay": 3.7312345678912345e-05,
        "train.augment.rotation": 12,
        "model.dropout": 0.123456789012345,
        "train.class_weights": "effective_number",  # params.yaml has sqrt_inverse
    }
    preset = tmp_path / "tuned.yaml"
    preset.write_text(preset_text(best, dims, ["made by a test"]))
    assert preset.read_text().startswith("# made by a test\ntrain:\n")
    changed = apply_preset(params_file, preset)
    assert set(changed) == set(best)
    p = load_params(params_file)
    assert {k: value_at(p, k) for k in best} == best


# `dermaflow tune` that leaves params.yaml unreadable behind each finished trial.
EDIT_MID_RUN = """
import sys
from pathlib import Path

import flows.tune as tune
from flows.cli import app

make_objective = tune._objective


def then_edit_params(*args):
    objective = make_objective(*args)

    def edited(trial):
        try:
            return objective(trial)
        finally:
            Path("params.yaml").write_text("train: {epochs: 3\\n")

    return edited


tune._objective = then_edit_params
sys.argv = ["dermaflow", "tune", *sys.argv[1:]]
app()
"""


@pytest.mark.slow
def test_tune_parent_and_child_runs_report_and_preset(tmp_path):
    from mlflow.tracking import MlflowClient

    project = make_project(tmp_path / "proj", [*TINY, "tune.epochs=2", SPACE])
    run(["dvc", "repro", "prepare"], project)
    out = run(["dermaflow", "tune", "--set", "tune.trials=3"], project)
    assert "Optuna trials" in out.stdout + out.stderr

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("synthetic")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == "tune-custom_cnn"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 == len(runs) - 1
    keys = {"train.lr", "model.dropout", "train.class_weights"}
    for child in children:
        assert child.data.tags["trial_state"] in {"COMPLETE", "PRUNED", "FAIL"}
        assert keys <= set(child.data.params)
        history = client.get_metric_history(child.info.run_id, "val_balanced_accuracy")
        assert [m.step for m in history] == [1, 2]
    assert sorted(c.data.tags["trial_number"] for c in children) == ["0", "1", "2"]
    complete = [c for c in children if c.data.tags["trial_state"] == "COMPLETE"]
    assert complete  # no pruning before 3 complete trials, nor at the last epoch
    best_child = max(complete, key=lambda c: c.data.metrics["best_val_balanced_accuracy"])
    assert parent.data.metrics["best_value"] == max(
        c.data.metrics["best_val_balanced_accuracy"] for c in complete
    )
    assert parent.data.metrics["trials_complete"] == len(complete)
    assert parent.data.params["best_trial"] == best_child.data.tags["trial_number"]
    for key in keys:
        assert parent.data.params[f"best.{key}"] == best_child.data.params[key]
    assert parent.data.params["study_name"] == "synthetic-tune-custom_cnn"
    assert parent.data.params["study_storage"] == f"sqlite:///{project}/mlruns/optuna.db"

    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "tune")}
    assert {
        "tune/optimization_history.png",
        "tune/intermediate_values.png",
        "tune/param_importances.png",
        "tune/trials.csv",
    } <= artifacts
    assert [f.path for f in client.list_artifacts(parent.info.run_id, "preset")] == [
        "preset/tuned.yaml"
    ]
    csv = client.download_artifacts(parent.info.run_id, "tune/trials.csv", str(tmp_path))
    trials = pd.read_csv(csv)
    assert len(trials) == 3 and {f"params_{k}" for k in keys} <= set(trials.columns)
    assert set(trials["user_attrs_mlflow_run_id"]) == {c.info.run_id for c in children}

    storage = f"sqlite:///{project}/mlruns/optuna.db"
    study = optuna.load_study(study_name="synthetic-tune-custom_cnn", storage=storage)
    assert len(study.trials) == 3
    assert study.best_value == parent.data.metrics["best_value"]

    # The preset holds the best trial's values: applying it to a copy of params gives them.
    preset = project / "configs" / "tuned.yaml"
    text = preset.read_text()
    assert "synthetic-tune-custom_cnn" in text and f"trial {study.best_trial.number}," in text
    copy = shutil.copy(project / "params.yaml", tmp_path / "params-copy.yaml")
    apply_preset(copy, preset)
    tuned = load_params(copy)
    assert {k: value_at(tuned, k) for k in keys} == study.best_trial.params

    # A second call continues the same study, under a new parent run. After its first trial
    # someone breaks params.yaml: the second trial runs on the copy the call started with.
    params_text = (project / "params.yaml").read_text()
    run(["python", "-c", EDIT_MID_RUN, "--no-repro", "--set", "tune.trials=2"], project)
    assert (project / "params.yaml").read_text().startswith("train: {epochs: 3")
    (project / "params.yaml").write_text(params_text)
    study = optuna.load_study(study_name="synthetic-tune-custom_cnn", storage=storage)
    assert len(study.trials) == 5
    assert all(t.state.name in {"COMPLETE", "PRUNED"} for t in study.trials[3:])
    runs = client.search_runs([experiment.experiment_id])
    second = [
        r
        for r in runs
        if "mlflow.parentRunId" not in r.data.tags and r.info.run_id != parent.info.run_id
    ]
    assert len(second) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == second[0].info.run_id]
    assert sorted(c.data.tags["trial_number"] for c in children) == ["3", "4"]
    for child in children:  # both trained tune.epochs=2 epochs of the params they started with
        history = client.get_metric_history(child.info.run_id, "val_balanced_accuracy")
        assert [m.step for m in history] == [1, 2] and child.data.params["train.epochs"] == "2"


def _study_of(pruner: optuna.pruners.BasePruner, curves: list[list[float]]) -> optuna.Study:
    """A real in-memory study whose trials report the given per-epoch values, as tune does."""
    study = optuna.create_study(direction="maximize", pruner=pruner)

    def objective(trial: optuna.Trial) -> float:
        curve = curves[trial.number]
        for epoch, value in enumerate(curve, start=1):
            report_epoch(trial, value, epoch, len(curve))
        return curve[-1]

    study.optimize(objective, n_trials=len(curves))
    return study


def test_a_bad_trial_is_pruned_and_shown_as_pruned():
    """Median pruning with no startup trials and no warm-up stops a deliberately bad trial."""
    from rich.console import Console

    good, bad = [0.6, 0.7, 0.8], [0.1, 0.1, 0.1]
    study = _study_of(make_pruner("median", startup_trials=0, warmup_epochs=0), [good, bad])
    first, second = study.trials
    assert (first.state.name, second.state.name) == ("COMPLETE", "PRUNED")
    assert list(second.intermediate_values) == [1]  # stopped after its first epoch
    # The tune report's table shows it: state PRUNED, its last value in parentheses, 1 epoch.
    console = Console(record=True, width=200)
    console.print(trials_table(study.trials, first.number))
    row = next(line for line in console.export_text().splitlines() if "PRUNED" in line)
    assert "(0.1000)" in row and " 1 " in row

    # params.yaml's defaults wait for 3 complete trials: the same bad trial runs to the end.
    waits = _study_of(make_pruner("median"), [good, bad])
    assert [t.state.name for t in waits.trials] == ["COMPLETE", "COMPLETE"]
    # A trial is never pruned at its last epoch, where stopping saves nothing.
    last = _study_of(make_pruner("median", startup_trials=0, warmup_epochs=0), [good, [0.1]])
    assert last.trials[1].state.name == "COMPLETE"
    assert load_params(REPO_PARAMS).tune.prune_startup_trials == 3
