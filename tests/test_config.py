"""The params tree is validated whole when it is loaded: every bad key in one message.

Each case below passed loading before the pydantic config and failed only in its own stage, in a
``dvc repro`` hours later (after training). Real files throughout: the repo's params.yaml and
presets, ruamel round-trips through ``update_params``, real DVC in a tmp git repo.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import time
import tomllib
from importlib.metadata import packages_distributions

import pytest
import yaml

from tasks import config
from tasks.config import (
    ConfigError,
    Params,
    apply_preset,
    load_params,
    params_from_dict,
    read_params_tree,
    update_params,
)
from tests.helpers import REPO, make_project, run


def _tree() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _errors(tree: dict) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        params_from_dict(tree, "params.yaml")
    return caught.value


def _set(tree: dict, dotted: str, value) -> dict:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return tree


def test_the_repo_params_and_every_preset_load():
    base = load_params(REPO / "params.yaml")
    assert isinstance(base, Params) and base.validate.min_images == 10
    presets = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(presets) >= 8
    for preset in presets:
        merged = config.deep_merge(_tree(), yaml.safe_load(preset.read_text()))
        params_from_dict(merged, str(preset))  # raises naming the preset if one went stale


# The cases: each passed loading; each must now fail at load, naming path, value, choices.
ENUMS = [
    ("train.optimizer", "foo", ["adam", "adamw", "sgd"]),
    ("model.arch", "resnet999", ["resnet18", "custom_cnn", "convnext_tiny"]),
    ("calibrate.method", "bar", ["temperature", "vector", "isotonic"]),
    ("dataset.layout", "isic", ["auto", "isic2019", "ham10000", "folder"]),
    ("train.class_weights", "inverted", ["sqrt_inverse", "effective_number"]),
    ("export.provider", "gpu9", ["auto", "cuda", "cpu"]),
    ("train.device", "tpu", ["auto", "cpu", "cuda"]),
]


@pytest.mark.parametrize(("key", "value", "allowed"), ENUMS)
def test_enum_values_fail_at_load(key, value, allowed):
    err = _errors(_set(_tree(), key, value))
    text = str(err)
    assert text.startswith("params.yaml: ")
    assert f"unknown {key} {value!r}" in text
    assert all(a in text for a in allowed)
    assert len(err.problems) == 1 and "\n" not in text  # one problem: one line


def test_explain_methods_list_names_every_unknown_method():
    err = _errors(_set(_tree(), "explain.methods", ["gradcam", "foocam", "gradcamm"]))
    (line,) = err.problems
    assert "explain.methods has unknown methods ['foocam', 'gradcamm']" in line
    assert "gradcamm -> gradcam" in line and "deeplift" in line  # did you mean, and the choices


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("train.epochs", -3, "train.epochs: -3; must be > 0"),
        ("train.batch_size", 0, "train.batch_size: 0; must be > 0"),
        ("prepare.size", 0, "prepare.size: 0; must be >= 8"),
        ("train.lr", 0.0, "train.lr: 0.0; must be > 0"),
        ("calibrate.target_accuracy", 1.5, "calibrate.target_accuracy: 1.5; must be <= 1"),
        ("gate.confidence", 1.0, "gate.confidence: 1.0; must be < 1"),
        ("synth.marker.fraction", -0.1, "synth.marker.fraction: -0.1; must be >= 0"),
        ("model.dropout", 1.0, "model.dropout: 1.0; must be < 1"),
        ("validate.min_classes", 1, "validate.min_classes: 1; must be >= 2"),
        ("train.epochs", "8", "train.epochs: '8' is not an integer (quoted"),
        ("train.epochs", 2.5, "train.epochs: 2.5 is not an integer"),
        ("train.augment.hflip", "sometimes", "is not true or false"),
        ("train.lr", "1e-4", "YAML reads 1e-4 as text"),
        ("train.lr", float("nan"), "train.lr: nan is not a finite number"),
        ("dataset.name", "", "dataset.name: ''"),
        ("validate.age_range", [120, 0], "first bound must not exceed the second"),
        ("train.augment.crop_scale", [0.5], "train.augment.crop_scale: too few values"),
        ("explain.layers", [], "explain.layers: []; empty"),
        ("synth", 5, "synth: 5 is not a mapping"),
    ],
)
def test_types_and_ranges_fail_at_load(key, value, says):
    err = _errors(_set(_tree(), key, value))
    assert any(says in p for p in err.problems), err.problems


def test_split_fractions_must_sum_to_one_with_every_split():
    bad = _errors(_set(_tree(), "split.fractions", {"train": 0.7, "val": 0.1, "test": 0.1}))
    assert "0.7 + 0.1 + 0.1 = 0.9; the fractions must sum to 1" in str(bad)
    zero = _errors(_set(_tree(), "split.fractions", {"train": 1.0, "val": 0.0, "test": 0.0}))
    assert "['val', 'test'] must be > 0" in str(zero)
    typo = _errors(_set(_tree(), "split.fractions", {"train": 0.7, "vall": 0.15, "test": 0.15}))
    assert "split.fractions has unknown keys ['vall']" in str(typo)


def test_every_problem_in_one_message_with_did_you_mean():
    tree = _tree()
    tree["synth"]["cuont"] = tree["synth"].pop("count")
    tree["tuen"] = tree.pop("tune")
    _set(tree, "calibrate.method", "bar")
    _set(tree, "train.epochs", -3)
    _set(tree, "validate.severity", {**tree["validate"]["severity"], "min_sise": "off"})
    err = _errors(tree)
    text = str(err)
    assert text.startswith("params.yaml: 7 invalid params:\n")
    assert len(err.problems) == 7 and text.count("\n  - ") == 7
    assert "synth: unknown key(s) ['cuont']; did you mean cuont -> count?" in text
    assert "synth.count: missing" in text and "tune: missing" in text
    assert "params: unknown key(s) ['tuen']; did you mean tuen -> tune?" in text
    assert (
        "validate.severity has unknown rules ['min_sise']; did you mean min_sise -> min_size?"
        in text
    )
    assert "unknown calibrate.method 'bar'" in text and "train.epochs: -3" in text


def test_unquoted_off_is_the_severity_off(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        (REPO / "params.yaml").read_text().replace("min_size: error", "min_size: off")
    )
    assert yaml.safe_load(params.read_text())["validate"]["severity"]["min_size"] is False
    assert load_params(params).validate.severity["min_size"] == "off"


def test_overrides_inside_params_are_validated_at_load():
    tree = _tree()
    tree["compare"]["variants"] = {"big": ["model.arch=resnet19", "train.lrr=0.1"]}
    tree["recipe"]["small"] = ["train.epochs=0", "nonsense"]
    tree["tune"]["space"] = {
        "train.lrr": {"low": 0.1, "high": 0.2},
        "train.class_weights": {"choices": ["inverse", "inverted"]},
        "calibrate.bins": {"low": 5, "high": 20},
    }
    _set(tree, "synth.marker.label", "SCC")  # not a class of the default mix: never drawn
    _set(tree, "synth.class_mix", {"NV": 0.5, "MEL": 0.5})
    text = str(_errors(tree))
    for expected in (
        "compare.variants.big: 'model.arch=resnet19': unknown model.arch 'resnet19'",
        "compare.variants.big: 'train.lrr=0.1': unknown key train.lrr; did you mean 'lr'?",
        "recipe.small: 'train.epochs=0': train.epochs: 0; must be > 0",
        "recipe.small: override 'nonsense': expected key=value",
        "tune.space.train.lrr: not a params key",
        "tune.space.train.class_weights: 'inverted' is not valid",
        "tune.space.calibrate.bins: trials only train",
        "synth.marker.label: 'SCC' is not a class of synth.class_mix",
    ):
        assert expected in text, text


def test_cli_overrides_name_the_key_with_did_you_mean(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    with pytest.raises(ConfigError, match=r"unknown key synth.cuont; did you mean 'count'\?"):
        load_params(params, ["synth.cuont=5"])
    with pytest.raises(
        ConfigError, match=r"trian is not a section of params; did you mean 'train'"
    ):
        load_params(params, ["trian.epochs=5"])
    with pytest.raises(ConfigError, match=r"the value is not valid YAML"):
        load_params(params, ["train.epochs=[1,"])


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("train:\n  epochs: [1,\n", "not valid YAML at line"),
        ("- a\n- b\n", "expected a mapping of sections, got list"),
    ],
)
def test_unreadable_params_file_is_one_line(tmp_path, text, says):
    params = tmp_path / "params.yaml"
    params.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(says)):
        read_params_tree(params)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("dataset:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.yaml: not UTF-8 text"):
        load_params(latin)


@pytest.mark.parametrize(
    ("preset", "says"),
    [
        ("train: {optimizer: foo}\n", "unknown train.optimizer 'foo'"),
        ("train: {epochs: -3}\ncalibrate: {method: bar}\n", "2 invalid params"),
        ("trian: {epochs: 3}\n", "unknown key trian; did you mean 'train'?"),
        ("explain: {methods: [foocam]}\n", "explain.methods has unknown methods ['foocam']"),
        ("[1, 2]\n", "a preset is a partial params mapping"),
    ],
)
def test_preset_refuses_an_invalid_tree_and_changes_nothing(tmp_path, preset, says):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    before = params.read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text(preset)
    with pytest.raises(ConfigError) as caught:
        apply_preset(params, bad)
    assert says in str(caught.value) and str(bad) in str(caught.value)
    assert params.read_bytes() == before  # byte for byte: nothing landed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "params.yaml"]


def test_update_params_lists_unknown_keys_and_bad_values_together(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    with pytest.raises(ConfigError) as caught:
        update_params(params, {"train": {"epochz": 3, "epochs": 0}}, where="test")
    assert caught.value.problems[0] == "unknown key train.epochz; did you mean 'epochs'?"
    assert "train.epochs: 0; must be > 0" in caught.value.problems[1]


def test_sections_are_still_dataclasses_that_validate_on_replace():
    p = load_params(REPO / "params.yaml")
    assert dataclasses.is_dataclass(p.train)
    assert dataclasses.replace(p.train, epochs=3).epochs == 3
    with pytest.raises(ValueError, match="epochs"):
        dataclasses.replace(p.train, epochs=0)
    flat = p.as_flat_dict()
    assert flat["train.epochs"] == p.train.epochs and flat["validate.max_pixels"] == 178956970
    assert isinstance(p.train.lr, float) and p.train.augment.crop_scale == (0.75, 1.0)


def test_allowed_names_match_their_implementations():
    """The Literal lists live in config (no torch/GX at load); each equals its registry."""
    from tasks.calibrate import METHODS as CALIBRATION
    from tasks.cams import LAYERS, METHODS
    from tasks.forward import AMP_MODES
    from tasks.losses import LOSSES, WEIGHT_MODES
    from tasks.models import ARCHITECTURES
    from tasks.validate import RULE_NAMES

    assert set(config.ARCHS) == set(ARCHITECTURES)
    assert set(config.EXPLAIN_METHODS) == set(METHODS)
    assert tuple(config.LAYERS) == tuple(LAYERS)
    assert tuple(config.CALIBRATION_METHODS) == tuple(CALIBRATION)
    assert set(config.CLASS_WEIGHTS) == set(WEIGHT_MODES) and set(config.LOSSES) == set(LOSSES)
    assert set(config.VALIDATION_RULES) == set(RULE_NAMES)
    assert tuple(config.AMP_MODES) == AMP_MODES
    assert set(load_params(REPO / "params.yaml").validate.severity) == set(RULE_NAMES)


def test_params_yaml_comments_every_key():
    """One comment per key, including the new validate keys."""
    for number, line in enumerate((REPO / "params.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "[", "palms", "genital")):
            continue
        if line.startswith(" ") and re.match(r"^[A-Za-z_.]+:", stripped):  # keys, not sections
            assert "#" in line, f"params.yaml line {number} has no comment: {line}"


def test_dvc_repro_fails_on_a_bad_enum_before_any_stage_works(tmp_path):
    """calibrate.method: bar stops the first stage of `dvc repro` within seconds, not hours."""
    project = make_project(tmp_path / "proj", [])
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("method: temperature", "method: bar"))
    started = time.perf_counter()
    proc = run(["dvc", "repro"], project, check=False)
    seconds = time.perf_counter() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exited with 2" in out
    assert "unknown calibrate.method 'bar'" in out and "Traceback" not in out
    assert "Running stage 'synth'" in out and "Running stage 'train'" not in out
    assert not (project / "data").exists() and not (project / "models").exists()
    # The property is asserted above: the first stage refuses at its params check and no
    # stage works. ~3 s of this is DVC's own start-up, which a busy 2-core CI machine can
    # stretch past 5 s, so the bound only guards against work done before the check
    # (importing torch and training take far longer).
    assert seconds < 60.0, f"dvc repro took {seconds:.1f} s to refuse"


# Distributions that are declared without a direct import, each for a stated reason.
NOT_IMPORTED = {
    "pyarrow": "pandas' parquet engine",
    "fastapi": "a version pin that keeps Prefect's server working",
    "distributed": "the Dask cluster behind prefect-dask (--local-dask)",
    "annotated-types": "ships with pydantic; declared because config imports it",
    "onnxscript": "torch.onnx.export(dynamo=True) builds the graph with it",
    "psycopg": "SQLAlchemy's driver for postgresql+psycopg:// (tune.storage, MLflow server)",
}


def _third_party_imports() -> set[str]:
    found: set[str] = set()
    for folder in ("tasks", "flows", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module.split(".")[0])
    import sys

    return {
        m
        for m in found
        if m not in sys.stdlib_module_names and m not in ("tasks", "flows", "bench")
    }


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_pyproject_declares_exactly_the_direct_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_norm(re.split(r"[<>=!~;\[ ]", d)[0]) for d in project["dependencies"]}
    dists = packages_distributions()
    # A module may ship in several distributions (mlflow, mlflow-skinny): one must be declared.
    providers = {m: {_norm(d) for d in dists.get(m, [m])} for m in _third_party_imports()}
    missing = sorted(m for m, names in providers.items() if not names & declared)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    imported = set().union(*providers.values())
    unused = declared - imported - {_norm(d) for d in NOT_IMPORTED}
    assert not unused, f"declared but never imported: {sorted(unused)}"
    assert "tqdm" not in declared and {"scipy", "ruamel-yaml", "pydantic", "networkx"} <= declared


def test_stage_module_refuses_bad_params_before_its_heavy_imports(tmp_path):
    """`python -m tasks.train` (dvc.yaml's command) fails before torch is even imported."""
    import subprocess
    import sys

    from tests.helpers import env

    params = tmp_path / "params.yaml"
    params.write_text(
        (REPO / "params.yaml").read_text().replace("method: temperature", "method: x")
    )
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tasks.train"],
        cwd=tmp_path, env={**env(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown calibrate.method 'x'" in proc.stderr and "Traceback" not in proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "tasks.config" in imported and "torch" not in imported and "tasks.train" not in imported


def test_frozen_params_is_one_read_and_names_the_users_file(tmp_path):
    """A long job reads the copy taken on entry; errors inside name the user's file."""
    src = tmp_path / "params.yaml"
    src.write_text("train:\n  epochs: 3\n")
    with pytest.raises(config.ConfigError) as err, config.frozen_params(src) as frozen:
        assert frozen != src and frozen.read_bytes() == src.read_bytes()
        src.write_text("train: [broken\n")  # an edit mid-job does not reach the copy
        assert config.read_params_tree(frozen)["train"]["epochs"] == 3
        config.load_params(frozen, ["train.epochs=abc"])  # names the file it read
    assert str(src) in str(err.value) and str(frozen) not in str(err.value)
    assert not frozen.exists()  # the copy goes with the block
    missing = r"missing\.yaml: params file not found"
    with (
        pytest.raises(config.ConfigError, match=missing),
        config.frozen_params(tmp_path / "missing.yaml"),
    ):
        pass
