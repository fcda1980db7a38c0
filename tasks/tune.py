"""Tune: an Optuna search over params keys, one MLflow child run per trial, the best as a preset.

The search space lives in ``params.yaml`` (``tune.space``) as plain params keys, so a trial is
nothing but the base params with a few ``key=value`` overrides: the same typed loading, the same
checks and the same :func:`tasks.train.train` as the pipeline's train stage. What the search
finds is therefore exactly reproducible by ``dermaflow preset configs/tuned.yaml`` followed by
``dvc repro``.

The Optuna study is stored in ``mlruns/optuna.db`` beside the MLflow store, so a second
``dermaflow tune`` continues the same study instead of starting over, and MLflow holds the
human-readable side: one parent run per ``tune`` call and one nested child run per trial with
its sampled params, per-epoch validation curves and final state.

Only validation metrics drive and record the search: the test split stays untouched until the
chosen params go through the normal pipeline, so the reported test score is not selected on.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tasks.config import ConfigError, load_params, read_params_tree
from tasks.io import atomic_dir, atomic_path
from tasks.progress import progress_bar

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure
    from rich.table import Table

STUDY_DB = "optuna.db"
REPORT_DIR = Path("reports") / "tune"
# Trials only train, so only these sections can change the objective.
TUNABLE_SECTIONS = ("model", "train")
SPEC_KEYS = {"low", "high", "log", "step", "choices"}
OBJECTIVE = "val_balanced_accuracy"


class TuneError(RuntimeError):
    """The search cannot run or produced nothing usable (data stages failed, no trial done)."""


@dataclass(frozen=True)
class Dimension:
    """One axis of the search: a params key and how Optuna samples it.

    Attributes:
        key: dotted params key, e.g. ``train.lr``.
        kind: ``float``, ``int`` or ``categorical``.
        low, high, log, step: the numeric range (``kind`` float or int).
        choices: the categorical values.
    """

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def candidates(self) -> list[Any]:
        """Values that bound what the sampler can return: type-checking them checks them all."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "categorical":
            return "searched over [" + ", ".join(yaml_scalar(c) for c in self.choices) + "]"
        scale = ", log" if self.log else ""
        return f"searched {yaml_scalar(self.low)}..{yaml_scalar(self.high)}{scale}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_space(space: dict[str, dict[str, Any]]) -> list[Dimension]:
    """Turn ``tune.space`` into dimensions; reject malformed specs, naming the key.

    ``{low, high[, log][, step]}`` is an integer range when both bounds are integers and a float
    range otherwise; ``{choices: [...]}`` is categorical (scalars only, as Optuna stores them).

    Raises:
        ConfigError: a spec that Optuna could not sample, with ``tune.space.<key>`` in the text.
    """
    dims: list[Dimension] = []
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected {{low, high[, log]}} or {{choices: [...]}}")
        unknown = set(spec) - SPEC_KEYS
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {sorted(unknown)}; use {sorted(SPEC_KEYS)}"
            )
        if "choices" in spec:
            choices = spec["choices"]
            if set(spec) != {"choices"}:
                raise ConfigError(f"{where}: choices cannot be combined with low/high/log/step")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: choices must be a non-empty list")
            bad = [
                c for c in choices if c is not None and not isinstance(c, bool | int | float | str)
            ]
            if bad:
                raise ConfigError(
                    f"{where}: choices must be scalars (Optuna stores no lists): {bad}"
                )
            dims.append(Dimension(key, "categorical", choices=tuple(choices)))
            continue
        low, high, log, step = (
            spec.get("low"),
            spec.get("high"),
            spec.get("log", False),
            spec.get("step"),
        )
        if not (_is_number(low) and _is_number(high)) or low > high:
            raise ConfigError(f"{where}: low and high must be numbers with low <= high")
        if not isinstance(log, bool):
            raise ConfigError(f"{where}: log must be true or false")
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0")
        if step is not None and (not _is_number(step) or step <= 0 or log):
            raise ConfigError(f"{where}: step must be a positive number, and not with log")
        kind = "int" if _is_int(low) and _is_int(high) else "float"
        if kind == "int" and step is not None and not _is_int(step):
            raise ConfigError(f"{where}: an integer range needs an integer step")
        if kind == "float":
            low, high = float(low), float(high)
        dims.append(Dimension(key, kind, low=low, high=high, log=log, step=step))
    return dims


def yaml_scalar(value: Any) -> str:
    """A value as YAML text that ``yaml.safe_load`` reads back as the same value and type.

    ``str(1e-05)`` would come back as a string (YAML 1.1 floats need a dot) and ``yes`` as a
    bool, so the text is made by PyYAML's own representer.
    """
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def to_override(key: str, value: Any) -> str:
    """``train.lr`` and ``0.001`` -> ``"train.lr=0.001"``, the form load_params applies."""
    return f"{key}={yaml_scalar(value)}"


def trial_overrides(sampled: dict[str, Any], epochs: int) -> list[str]:
    """A trial's overrides on top of the base params: its sampled values and the trial length."""
    return [*(to_override(k, v) for k, v in sampled.items()), f"train.epochs={epochs}"]


def check_space(
    space: dict[str, dict[str, Any]], params_path: str | Path, overrides: list[str] | None = None
) -> list[Dimension]:
    """Parse the space and prove every key and bound loads, before any trial starts.

    A typo in a key would otherwise surface only as the first trial's crash (or worse, as a
    sampled value nobody reads), after the data stages and the study were set up.

    Raises:
        ConfigError: naming the offending ``tune.space`` key.
    """
    dims = parse_space(space)
    overrides = list(overrides or [])
    tree = read_params_tree(params_path, overrides)
    for d in dims:
        where = f"tune.space.{d.key}"
        parts = d.key.split(".")
        if parts[0] not in TUNABLE_SECTIONS:
            raise ConfigError(
                f"{where}: trials only train, so only model.* and train.* keys can change the "
                "objective"
            )
        if d.key == "train.epochs":
            raise ConfigError(f"{where}: the trial length is tune.epochs; remove it from the space")
        node: Any = tree
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{where}: {d.key} is not a params key (see {params_path})")
            node = node[part]
        if isinstance(node, dict) and node:
            raise ConfigError(f"{where}: {d.key} is a section; name one of its keys")
        for value in d.candidates():
            try:
                load_params(params_path, [*overrides, to_override(d.key, value)])
            except ConfigError as err:
                raise ConfigError(f"{where}: {value!r} is not a valid {d.key}: {err}") from None
    return dims


def suggest(trial: optuna.trial.BaseTrial, dims: list[Dimension]) -> dict[str, Any]:
    """Sample one value per dimension; Optuna records them under the params keys."""
    out: dict[str, Any] = {}
    for d in dims:
        if d.kind == "categorical":
            out[d.key] = trial.suggest_categorical(d.key, list(d.choices))
        elif d.kind == "int":
            out[d.key] = trial.suggest_int(d.key, d.low, d.high, step=d.step or 1, log=d.log)
        else:
            out[d.key] = trial.suggest_float(d.key, d.low, d.high, step=d.step, log=d.log)
    return out


def storage_uri(repo: str | Path = ".") -> str:
    """``sqlite:///<repo>/mlruns/optuna.db``: the study lives beside the MLflow store."""
    from tasks import tracking

    db = (Path(repo) / tracking.STORE_DIR / STUDY_DB).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def study_name(experiment: str, arch: str) -> str:
    """One study per experiment and architecture: good params for one rarely suit another."""
    return f"{experiment}-tune-{arch}"


def make_sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    """TPE (or random) seeded; TPE starts modelling after 5 random trials.

    Optuna's default of 10 random start-up trials would leave TPE almost idle in a budget of a
    dozen trials, which is what a CPU or a single GPU affords.
    """
    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)


def make_pruner(kind: str) -> optuna.pruners.BasePruner:
    """Median pruning once 3 trials completed, never on the first epoch (too noisy to judge)."""
    import optuna

    if kind == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)


def preset_text(best_params: dict[str, Any], dims: list[Dimension], header: list[str]) -> str:
    """The best params as a nested partial params file, like the presets in configs/.

    Written by hand rather than by a YAML dumper so each key carries the range it was chosen
    from as a comment, and every value goes through :func:`yaml_scalar` so it loads back
    exactly (a float keeps all its digits).
    """
    described = {d.key: d.describe() for d in dims}
    # A continued study's best trial may predate the current space: keep its keys too.
    order = [d.key for d in dims if d.key in best_params]
    order += [k for k in best_params if k not in described]
    tree: dict[str, Any] = {}
    for key in order:
        node = tree
        *sections, leaf = key.split(".")
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = best_params[key]
    lines = [f"# {h}" for h in header]

    def emit(node: dict[str, Any], depth: int, prefix: str) -> None:
        for k, v in node.items():
            indent = "  " * depth
            if isinstance(v, dict):
                lines.append(f"{indent}{k}:")
                emit(v, depth + 1, f"{prefix}{k}.")
            else:
                note = described.get(prefix + k, "from an earlier search space")
                lines.append(f"{indent}{k}: {yaml_scalar(v)}  # {note}")

    emit(tree, 0, "")
    return "\n".join(lines) + "\n"


def write_preset(path: str | Path, text: str) -> Path:
    """Atomically: a preset half-written by a killed run would break ``dermaflow preset``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _last_intermediate(trial: optuna.trial.FrozenTrial) -> float | None:
    values = trial.intermediate_values
    return values[max(values)] if values else None


def plot_history(trials: list[optuna.trial.FrozenTrial], title: str) -> Figure:
    """Value per trial and the running best; pruned trials at the last value they reported."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [(t.number, _last_intermediate(t)) for t in trials if t.state.name == "PRUNED"]
    pruned = [(n, v) for n, v in pruned if v is not None]
    if done:
        numbers = [t.number for t in done]
        values = [t.value for t in done]
        running = [max(values[: i + 1]) for i in range(len(values))]
        ax.scatter(numbers, values, color="tab:blue", label="complete trial", zorder=3)
        ax.step(numbers, running, where="post", color="tab:red", label="best so far")
    if pruned:
        ax.scatter(*zip(*pruned, strict=True), marker="x", color="grey", label="pruned (last)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("validation balanced accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend(loc="lower right")
    return fig


def param_importances(study: optuna.Study, seed: int) -> tuple[dict[str, float] | None, str]:
    """fANOVA importances, or None and the reason (too few trials, a constant space, ...).

    Importances are a nice-to-have on a small study: their failure must not lose the search.
    """
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"{len(complete)} complete trial(s); importances need 2"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        return None, f"{type(err).__name__}: {err}"
    if not found:
        return None, "no parameter varied across the complete trials"
    return dict(found), ""


def plot_importances(importances: dict[str, float], title: str) -> Figure:
    from matplotlib.figure import Figure

    names = list(importances)[::-1]  # most important on top
    fig = Figure(figsize=(7, 0.5 * len(names) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fANOVA, share of the variance of the objective)")
    ax.set_title(title)
    return fig


def trials_table(trials: list[optuna.trial.FrozenTrial], best_number: int | None) -> Table:
    """A rich table of every trial of the study; the best one in bold."""
    from rich.table import Table

    keys = list(dict.fromkeys(k for t in trials for k in t.params))
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    # The last part of the key names a column unless two keys share it (80-column terminals).
    labels = [
        leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(keys, leaves, strict=True)
    ]
    table = Table(title="Optuna trials (objective: validation balanced accuracy)")
    for col in ("trial", "state", "value", "epochs", "seconds"):
        table.add_column(col, justify="left" if col == "state" else "right", no_wrap=True)
    for label in labels:
        table.add_column(label, overflow="fold")
    for t in trials:
        seconds = t.duration.total_seconds() if t.duration else None
        epochs = max(t.intermediate_values) if t.intermediate_values else None
        row = [
            str(t.number),
            t.state.name,
            _value(t),
            "-" if epochs is None else str(epochs),
            "-" if seconds is None else f"{seconds:.1f}",
            *(_short(t.params.get(k)) for k in keys),
        ]
        table.add_row(*row, style="bold" if t.number == best_number else None)
    return table


def _value(trial: optuna.trial.FrozenTrial) -> str:
    """The objective; a pruned trial's (the last value it reported) in parentheses."""
    if trial.value is None:
        return "-"
    return f"{trial.value:.4f}" if trial.state.name == "COMPLETE" else f"({trial.value:.4f})"


def _short(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def repro_data(repo: str | Path = ".") -> str:
    """``dvc repro prepare``: bring synth/ingest/validate/split/prepare up to date first.

    Tuning on a stale cache would pick params for data the pipeline no longer trains on. The
    venv's bin folder goes first on PATH so the stage commands (``dermaflow <stage>``) resolve
    to this install, as in :func:`flows.pipeline.run_stage`.

    Raises:
        TuneError: with DVC's output when a data stage fails.
    """
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        ["dvc", "repro", "prepare"], cwd=repo, env=env, capture_output=True, text=True
    )
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise TuneError(
            "`dvc repro prepare` failed, so the data stages are not current (fix them, or pass "
            f"--no-repro to tune on data/prepared as it is):\n{output[-4000:]}"
        )
    return output


@dataclass
class TuneResult:
    """What a finished search hands to the CLI: the study's outcome and where it was written."""

    study_name: str
    storage: str
    best_number: int
    best_value: float
    best_params: dict[str, Any]
    counts: dict[str, int]  # this call's trials by final state
    trials: list[Any]  # every FrozenTrial of the study, this call's and earlier ones
    parent_run_id: str
    preset: Path
    report_dir: Path
    importance_note: str = ""
    importances: dict[str, float] = field(default_factory=dict)


def run_tune(
    params_path: str | Path,
    overrides: list[str] | None,
    prepared_dir: str | Path,
    repo: str | Path = ".",
    data_version: str = "",
    show_progress: bool = True,
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
) -> TuneResult:
    """Run (or continue) the study; log it to MLflow; write the report and the best preset.

    The parent run's ``trials_*`` counts are this call's trials; ``best_value``, the
    ``best.*`` params, the report and the preset describe the whole study, whose best trial
    may come from an earlier call.

    Args:
        params_path: the base params file; trials override the ``tune.space`` keys on it.
        overrides: ``key=value`` overrides for this call (the CLI's ``--set``).
        prepared_dir: the prepare stage's cache; every trial trains on it.
        repo: the project folder: ``mlruns/`` (MLflow store and the study), ``tune.preset``
            and ``reports/tune/`` are relative to it.
        data_version: recorded on the runs (and in the trials' checkpoint fingerprints).
        show_progress: a rich progress bar over the trials.
        on_trial: called with each finished trial (e.g. to print it).

    Raises:
        ConfigError: a bad ``tune.space`` (before any trial starts).
        FileNotFoundError: no prepared cache.
        TuneError: no trial of the study completed.
    """
    overrides = list(overrides or [])
    base = load_params(params_path, overrides)
    cfg = base.tune
    dims = check_space(cfg.space, params_path, overrides)
    repo = Path(repo)
    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / "meta.json").exists():
        raise FileNotFoundError(
            f"{prepared_dir}: no prepared cache; run `dvc repro prepare` (or `dermaflow tune` "
            "without --no-repro) first"
        )
    # Heavy imports only once the cheap checks passed: a typo in the space fails in a blink.
    import mlflow
    import optuna
    import torch

    from tasks import tracking
    from tasks.train import TrainingError, train

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_tracebacks()

    experiment = base.tracking.experiment or base.dataset.name
    name = study_name(experiment, base.model.arch)
    storage_url = storage_uri(repo)
    # A killed run leaves its trial RUNNING; the heartbeat lets the next call mark it FAIL.
    with warnings.catch_warnings():  # the heartbeat is flagged experimental; it is what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=60, grace_period=180)
    study = optuna.create_study(
        storage=storage, study_name=name, direction="maximize", load_if_exists=True
    )
    before = len(study.trials)
    # Offsetting the seed by the trials already stored keeps a continued random search from
    # replaying the first call's draws.
    study.sampler = make_sampler(cfg.sampler, cfg.seed + before)
    study.pruner = make_pruner(cfg.pruner)

    experiment_id = tracking.ensure_experiment(experiment, repo)
    tags = {
        "dermaflow_command": "tune",
        "optuna_study": name,
        "dataset": base.dataset.name,
        "arch": base.model.arch,
        "data_version": data_version,
        "git_commit": tracking.git_commit(repo),
        **tracking.environment_tags(),
    }
    catch = (TrainingError, torch.cuda.OutOfMemoryError)  # a bad corner of the space, not a bug

    with (
        mlflow.start_run(
            experiment_id=experiment_id, run_name=f"tune-{base.model.arch}", tags=tags
        ) as parent,
        tempfile.TemporaryDirectory(prefix="dermaflow-tune-") as scratch,
        progress_bar(show_progress) as bar,
    ):
        tracking.log_params(
            {**base.as_flat_dict(), "study_name": name, "study_storage": storage_url}
        )
        task = bar.add_task(f"tune {name}", total=cfg.trials)

        def objective(trial: optuna.Trial) -> float:
            sampled = suggest(trial, dims)
            p = load_params(params_path, [*overrides, *trial_overrides(sampled, cfg.epochs)])
            # A fresh path per trial: train() resumes from a checkpoint whose configs match.
            checkpoint = Path(scratch) / f"trial-{trial.number}.pt"
            child = mlflow.start_run(
                experiment_id=experiment_id,
                run_name=f"trial-{trial.number}",
                nested=True,
                tags={"optuna_study": name, "trial_number": str(trial.number)},
            )
            trial.set_user_attr("mlflow_run_id", child.info.run_id)
            state, status = "FAIL", "FAILED"

            def on_epoch(record: dict) -> None:
                step = record["epoch"]
                tracking.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step)
                trial.report(record[OBJECTIVE], step)
                # Pruning at the last epoch saves nothing and would only discard its value.
                if step < cfg.epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {step}")

            try:
                tracking.log_params({**sampled, "train.epochs": cfg.epochs})
                result = train(
                    p.model,
                    p.train,
                    prepared_dir,
                    checkpoint,
                    data_version,
                    on_epoch=on_epoch,
                    show_progress=False,
                )
                value = float(result.val["balanced_accuracy"])
                if not math.isfinite(value):
                    raise TrainingError(f"validation balanced accuracy is {value}")
                tracking.log_metrics({f"best_{OBJECTIVE}": value, "train_seconds": result.seconds})
                mlflow.set_tag("best_epoch", str(result.best_epoch))
                state, status = "COMPLETE", "FINISHED"
                return value
            except optuna.TrialPruned:
                state, status = "PRUNED", "FINISHED"  # a normal outcome, not a failed run
                raise
            except Exception as err:
                mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
                raise
            finally:
                mlflow.set_tag("trial_state", state)
                mlflow.end_run(status)
                checkpoint.unlink(missing_ok=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

        def after_trial(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
            if frozen.state == optuna.trial.TrialState.COMPLETE:
                tracking.log_metrics({"trial_value": frozen.value}, step=frozen.number)
            best = _best_or_none(study)
            bar.update(
                task,
                advance=1,
                description=f"tune {name} (best {'-' if best is None else f'{best:.3f}'})",
            )
            if on_trial is not None:
                on_trial(frozen)

        study.optimize(
            objective,
            n_trials=cfg.trials,
            timeout=cfg.timeout_s or None,
            catch=catch,
            callbacks=[after_trial],
        )

        trials = study.get_trials(deepcopy=True)
        states = Counter(t.state.name for t in trials[before:])
        counts = {s: states.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL")}
        best_trial = _best_trial_or_none(study)
        importances, note = param_importances(study, cfg.seed)
        report_dir = repo / REPORT_DIR
        with atomic_dir(report_dir) as tmp:
            study.trials_dataframe().to_csv(tmp / "trials.csv", index=False)
            from tasks.evaluate import save_figure

            save_figure(plot_history(trials, name), tmp / "optimization_history.png")
            if importances:
                save_figure(plot_importances(importances, name), tmp / "param_importances.png")
        tracking.log_metrics(
            {
                "trials_complete": counts["COMPLETE"],
                "trials_pruned": counts["PRUNED"],
                "trials_failed": counts["FAIL"],
                "study_trials": len(trials),
            }
        )
        if note:
            mlflow.set_tag("importance_note", note[:5000])
        if best_trial is None:
            tracking.log_artifacts({"tune": report_dir})
            raise TuneError(
                f"no trial of study {name} completed ({counts['PRUNED']} pruned, "
                f"{counts['FAIL']} failed in this call); see the MLflow run "
                f"{parent.info.run_id} and {report_dir / 'trials.csv'}"
            )
        preset = write_preset(
            repo / cfg.preset,
            preset_text(
                best_trial.params,
                dims,
                [
                    f"Written by `dermaflow tune`: the best trial of Optuna study {name}",
                    f"({storage_url}): trial {best_trial.number}, validation balanced accuracy "
                    f"{best_trial.value:.4f}",
                    f"after up to {cfg.epochs} epochs per trial; train.epochs is left as it is.",
                    f"Apply with `dermaflow preset {cfg.preset}`; keys not listed keep "
                    "params.yaml's values.",
                ],
            ),
        )
        tracking.log_metrics({"best_value": best_trial.value})
        tracking.log_params(
            {
                "best_trial": best_trial.number,
                **{f"best.{k}": v for k, v in best_trial.params.items()},
            }
        )
        tracking.log_artifacts({"tune": report_dir, "preset": preset})

    return TuneResult(
        study_name=name,
        storage=storage_url,
        best_number=best_trial.number,
        best_value=float(best_trial.value),
        best_params=dict(best_trial.params),
        counts=counts,
        trials=trials,
        parent_run_id=parent.info.run_id,
        preset=preset,
        report_dir=report_dir,
        importance_note=note,
        importances=importances or {},
    )


class _NoTraceback(logging.Filter):
    """Keep Optuna's one-line "trial failed ... because of TrainingError('...')" warning but
    drop the stack trace it attaches: a diverging corner of the space is a result, not a bug.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def _quiet_tracebacks() -> None:
    root = logging.getLogger("optuna")
    for handler in root.handlers:
        if not any(isinstance(f, _NoTraceback) for f in handler.filters):
            handler.addFilter(_NoTraceback())


def _best_trial_or_none(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """``study.best_trial`` raises when nothing completed; the report wants None instead."""
    try:
        return study.best_trial
    except ValueError:
        return None


def _best_or_none(study: optuna.Study) -> float | None:
    best = _best_trial_or_none(study)
    return None if best is None else best.value
