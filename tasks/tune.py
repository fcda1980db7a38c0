"""Tune's pure pieces: the search space, sampler and pruner, the best trial as a preset, plots.

The study itself (Optuna storage, MLflow parent and child runs, the report) is orchestration
and lives in :mod:`flows.tune`.

The search space lives in ``params.yaml`` (``tune.space``) as plain params keys, so a trial is
nothing but the base params with a few ``key=value`` overrides: the same typed loading, the same
checks and the same :func:`tasks.train.train` as the pipeline's train stage. What the search
finds is therefore exactly reproducible by ``dermaflow preset configs/tuned.yaml`` followed by
``dvc repro``.

The Optuna study is stored in ``mlruns/optuna.db`` beside the MLflow store (or in the
database server of ``tune.storage``, where several ``dermaflow tune --worker`` processes join
it), so a second ``dermaflow tune`` continues the same study instead of starting over, and
MLflow holds the human-readable side: one parent run per ``tune`` call and one nested child
run per trial (whichever worker ran it) with its sampled params, per-epoch validation curves
and final state.

Only validation metrics drive and record the search: the test split stays untouched until the
chosen params go through the normal pipeline, so the reported test score is not selected on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from tasks.config import ConfigError, load_params, read_params_tree
from tasks.io import atomic_path

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


def storage_uri(repo: str | Path = ".", configured: str | None = None) -> str:
    """Where the study lives: ``tune.storage`` when set, else beside the MLflow store.

    The default, ``sqlite:///<repo>/mlruns/optuna.db``, suits one machine. A team (or several
    ``dermaflow tune --worker`` processes) points ``tune.storage`` at a database server, e.g.
    ``postgresql+psycopg://user@host:5432/optuna``, so that every process joins one study.
    """
    if configured:
        return configured
    from tasks import tracking

    db = (Path(repo) / tracking.STORE_DIR / STUDY_DB).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def redact_url(url: str) -> str:
    """A storage URL with its password replaced by ``***``: fit for logs and MLflow params."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def study_name(experiment: str, arch: str) -> str:
    """One study per experiment and architecture: good params for one rarely suit another."""
    return f"{experiment}-tune-{arch}"


def make_sampler(kind: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """TPE (or random) seeded (None: from the OS); TPE models after 5 random trials.

    Optuna's default of 10 random start-up trials would leave TPE almost idle in a budget of a
    dozen trials, which is what a CPU or a single GPU affords.
    """
    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)


def make_pruner(
    kind: str, startup_trials: int = 3, warmup_epochs: int = 2
) -> optuna.pruners.BasePruner:
    """Median pruning: a trial whose validation balanced accuracy at an epoch is below the
    median of the earlier trials at that epoch stops there.

    The defaults (``tune.prune_startup_trials`` 3, ``tune.prune_warmup_epochs`` 2) wait for
    three complete trials and never judge the first epochs, which are too noisy to rank.

    Args:
        kind: ``median`` | ``none``.
        startup_trials: complete trials before any trial is judged.
        warmup_epochs: epochs a trial runs before it can be pruned (Optuna's steps are the
            epochs, from 1): the earliest judgement is at the end of epoch ``warmup_epochs``
            (0 or 1: after the first).
    """
    import optuna

    if kind == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs
    )


def report_epoch(trial: optuna.Trial, value: float, epoch: int, epochs: int) -> None:
    """Report a trial's objective after ``epoch`` and stop the trial if the pruner says so.

    Raises:
        optuna.TrialPruned: the pruner judged the trial worse than the median; never at the
            last epoch, where stopping saves nothing and would only discard the value.
    """
    import optuna

    trial.report(value, epoch)
    if epoch < epochs and trial.should_prune():
        raise optuna.TrialPruned(f"pruned after epoch {epoch}")


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


def study_figures(study: optuna.Study, with_importances: bool, seed: int) -> dict[str, Figure]:
    """Optuna's own matplotlib plots of the study: file name -> figure.

    ``optimization_history.png`` (every trial and the best so far), ``intermediate_values.png``
    (each trial's validation curve per epoch: pruned trials are the curves that stop early) and,
    when importances could be computed, ``param_importances.png`` (fANOVA, seeded).
    """
    import matplotlib
    import optuna
    from optuna.visualization import matplotlib as plots

    # Optuna's plots switch pyplot to its ggplot style for good: keep that inside this call.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        figures = {
            "optimization_history.png": plots.plot_optimization_history(study).figure,
            "intermediate_values.png": plots.plot_intermediate_values(study).figure,
        }
        if with_importances:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
            axes = plots.plot_param_importances(study, evaluator=evaluator)
            figures["param_importances.png"] = axes.figure
    for fig in figures.values():
        fig.set_size_inches(7, 4.5)
        fig.set_layout_engine("constrained")
    return figures


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
