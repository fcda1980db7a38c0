"""The tune flow's engine: an Optuna study whose trials are the train stage's own ``train``.

What runs around the pure pieces in :mod:`tasks.tune` (the space, the sampler and pruner, the
preset, the plots): the study in ``mlruns/optuna.db`` (or ``tune.storage``), the MLflow parent
run with one nested child run per trial, and the report. ``dermaflow tune`` calls
:func:`run_tune`; ``dermaflow tune --worker`` calls :func:`run_worker`, which joins that call's
study from another process or machine and runs trials that Optuna hands out. Every trial is
``tasks.train.train`` on the prepared cache with the trial's ``key=value`` overrides, so what the
search finds is exactly what ``dermaflow preset configs/tuned.yaml && dvc repro`` reproduces.
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from tasks.config import frozen_params, load_params
from tasks.io import atomic_dir
from tasks.prepare import check_cache
from tasks.progress import progress_bar
from tasks.tune import (
    OBJECTIVE,
    REPORT_DIR,
    TuneError,
    check_space,
    make_pruner,
    make_sampler,
    param_importances,
    preset_text,
    redact_url,
    report_epoch,
    storage_uri,
    study_figures,
    study_name,
    suggest,
    trial_overrides,
    write_preset,
)


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
    with frozen_params(params_path) as frozen:  # the base and every trial read this copy
        return _run_tune(
            frozen, overrides, prepared_dir, repo, data_version, show_progress, on_trial
        )


def _run_tune(
    params_path: Path,
    overrides: list[str] | None,
    prepared_dir: str | Path,
    repo: str | Path,
    data_version: str,
    show_progress: bool,
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None,
) -> TuneResult:
    """:func:`run_tune` on its private copy of the params file."""
    overrides = list(overrides or [])
    base = load_params(params_path, overrides)
    cfg = base.tune
    dims = check_space(cfg.space, params_path, overrides)
    repo = Path(repo)
    prepared_dir = Path(prepared_dir)
    check_cache(prepared_dir, base.prepare)  # a --no-repro cache must be the one params name
    # Heavy imports only once the cheap checks passed: a typo in the space fails in a blink.
    import mlflow

    from tasks import tracking

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_tracebacks()

    experiment = base.tracking.experiment or base.dataset.name
    name = study_name(experiment, base.model.arch)
    storage_url = storage_uri(repo, cfg.storage)
    study = optuna.create_study(
        storage=_open_storage(storage_url),
        study_name=name,
        direction="maximize",
        load_if_exists=True,
    )
    before = len(study.trials)
    # Offsetting the seed by the trials already stored keeps a continued random search from
    # replaying the first call's draws.
    study.sampler = make_sampler(cfg.sampler, cfg.seed + before)
    study.pruner = make_pruner(cfg.pruner, cfg.prune_startup_trials, cfg.prune_warmup_epochs)

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

    with (
        mlflow.start_run(
            experiment_id=experiment_id, run_name=f"tune-{base.model.arch}", tags=tags
        ) as parent,
        tempfile.TemporaryDirectory(prefix="dermaflow-tune-") as scratch,
        progress_bar(show_progress) as bar,
    ):
        flat = base.as_flat_dict()
        if cfg.storage:  # a password in the URL stays out of MLflow
            flat["tune.storage"] = redact_url(cfg.storage)
        tracking.log_params({**flat, "study_name": name, "study_storage": redact_url(storage_url)})
        # What `dermaflow tune --worker` processes read to join this call: its parent run and
        # the study size at which every process stops starting trials.
        study.set_user_attr(TARGET_ATTR, before + cfg.trials)
        study.set_user_attr(PARENT_ATTR, parent.info.run_id)
        task = bar.add_task(f"tune {name}", total=cfg.trials)
        objective = _objective(
            params_path, overrides, dims, cfg, prepared_dir, data_version, experiment_id, name,
            parent.info.run_id, Path(scratch),
        )  # fmt: skip

        def after_trial(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
            best = _best_or_none(study)
            bar.update(
                task,
                advance=1,
                description=f"tune {name} (best {'-' if best is None else f'{best:.3f}'})",
            )
            if on_trial is not None:
                on_trial(frozen)

        try:
            study.optimize(
                objective,
                n_trials=cfg.trials,
                timeout=cfg.timeout_s or None,
                catch=_caught(),
                callbacks=[
                    _log_trial_value(parent.info.run_id),
                    after_trial,
                    optuna.study.MaxTrialsCallback(before + cfg.trials, states=None),
                ],
            )
            _wait_for_workers(study)
        finally:
            study.set_user_attr(PARENT_ATTR, "")

        trials = study.get_trials(deepcopy=True)
        states = Counter(t.state.name for t in trials[before:])
        counts = {s: states.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL")}
        best_trial = _best_trial_or_none(study)
        importances, note = param_importances(study, cfg.seed)
        report_dir = repo / REPORT_DIR
        with atomic_dir(report_dir) as tmp:
            study.trials_dataframe().to_csv(tmp / "trials.csv", index=False)
            from tasks.metrics import save_figure

            for file, figure in study_figures(study, bool(importances), cfg.seed).items():
                save_figure(figure, tmp / file)
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
                    f"({redact_url(storage_url)}): trial {best_trial.number}, validation "
                    f"balanced accuracy {best_trial.value:.4f}",
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
        storage=redact_url(storage_url),
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


# ------------------------------------------------------------------ workers on one shared study

PARENT_ATTR = "mlflow_parent_run_id"  # study attr: the open tune call's parent run ("" when none)
TARGET_ATTR = "trial_target"  # study attr: the study size at which every process stops


@dataclass
class WorkerResult:
    """What one ``dermaflow tune --worker`` process did in the study it joined."""

    study_name: str
    storage: str
    parent_run_id: str
    trial_numbers: list[int]  # the trials this process ran, in order
    counts: dict[str, int]  # those trials by final state


def run_worker(
    params_path: str | Path,
    overrides: list[str] | None,
    prepared_dir: str | Path,
    repo: str | Path = ".",
    data_version: str = "",
    wait_s: float = 0.0,
    show_progress: bool = True,
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
) -> WorkerResult:
    """Join the study that a running ``dermaflow tune`` opened and run trials until it is full.

    Optuna hands out the trials: each process asks the shared storage for the next one, so no
    trial runs twice, and the study stops growing at the size the leading ``dermaflow tune``
    recorded (its ``tune.trials`` more than it found). Each trial's MLflow child run goes under
    the leader's parent run, wherever it ran. The leader waits for the workers' last trials,
    then writes the report and the preset; a worker writes neither.

    Args:
        params_path, overrides, prepared_dir, repo, data_version, show_progress, on_trial: as
            for :func:`run_tune`; the params must name the same ``tune.storage``, experiment
            and architecture as the leader's (they name the study).
        wait_s: how long to wait for the leader to open the study (0: it must be open now).

    Raises:
        ConfigError: a bad ``tune.space``.
        FileNotFoundError: no prepared cache.
        TuneError: no open tune call on that study within ``wait_s`` seconds.
    """
    with frozen_params(params_path) as frozen:  # every trial of this process reads this copy
        return _run_worker(
            frozen, overrides, prepared_dir, repo, data_version, wait_s, show_progress, on_trial
        )


def _run_worker(
    params_path: Path,
    overrides: list[str] | None,
    prepared_dir: str | Path,
    repo: str | Path,
    data_version: str,
    wait_s: float,
    show_progress: bool,
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None,
) -> WorkerResult:
    """:func:`run_worker` on its private copy of the params file."""
    import time

    overrides = list(overrides or [])
    base = load_params(params_path, overrides)
    cfg = base.tune
    dims = check_space(cfg.space, params_path, overrides)
    prepared_dir = Path(prepared_dir)
    check_cache(prepared_dir, base.prepare)  # a --no-repro cache must be the one params name
    from tasks import tracking

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_tracebacks()
    experiment = base.tracking.experiment or base.dataset.name
    name = study_name(experiment, base.model.arch)
    storage_url = storage_uri(repo, cfg.storage)
    storage = _open_storage(storage_url)
    deadline = time.monotonic() + wait_s
    while True:
        study = _open_call(storage, name)
        if study is not None or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if study is None:
        raise TuneError(
            f"no open `dermaflow tune` on study {name} in {redact_url(storage_url)}: start "
            "`dermaflow tune` with the same params first (or give --wait more seconds)"
        )
    parent_run_id = study.user_attrs[PARENT_ATTR]
    target = int(study.user_attrs[TARGET_ATTR])
    # Unseeded: workers seeded alike would draw the same start-up params as each other.
    study.sampler = make_sampler(cfg.sampler, None)
    study.pruner = make_pruner(cfg.pruner, cfg.prune_startup_trials, cfg.prune_warmup_epochs)
    experiment_id = tracking.ensure_experiment(experiment, repo)
    mine: list[optuna.trial.FrozenTrial] = []

    def after_trial(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        mine.append(frozen)
        if on_trial is not None:
            on_trial(frozen)
        if study.user_attrs.get(PARENT_ATTR) != parent_run_id:
            study.stop()  # the leader finished (or a new call began): this call is over

    with (
        tempfile.TemporaryDirectory(prefix="dermaflow-tune-") as scratch,
        progress_bar(show_progress) as bar,
    ):
        task = bar.add_task(f"tune worker {name}", total=None)
        objective = _objective(
            params_path, overrides, dims, cfg, prepared_dir, data_version, experiment_id, name,
            parent_run_id, Path(scratch),
        )  # fmt: skip
        if len(study.trials) < target:  # optimize() would start one trial even on a full study
            study.optimize(
                objective,
                timeout=cfg.timeout_s or None,
                catch=_caught(),
                callbacks=[
                    _log_trial_value(parent_run_id),
                    after_trial,
                    lambda *_: bar.update(task, advance=1),
                    optuna.study.MaxTrialsCallback(target, states=None),
                ],
            )
    states = Counter(t.state.name for t in mine)
    return WorkerResult(
        study_name=name,
        storage=redact_url(storage_url),
        parent_run_id=parent_run_id,
        trial_numbers=[t.number for t in mine],
        counts={s: states.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL")},
    )


def _open_call(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study | None:
    """The study, when a ``dermaflow tune`` call on it is running now; else None."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # Optuna's "study not found"
        return None
    attrs = study.user_attrs
    return study if attrs.get(PARENT_ATTR) and TARGET_ATTR in attrs else None


def _open_storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """The study's storage, with a heartbeat: a killed process leaves its trial RUNNING, and
    the heartbeat lets the next process (or the waiting leader) mark it FAIL.

    Opening creates Optuna's tables in an empty database. Two processes doing that at the
    same instant (a leader and a worker started together on a fresh PostgreSQL database)
    collide on the catalog; the loser retries and finds the tables made.
    """
    import time

    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # the heartbeat is flagged experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _caught() -> tuple[type[BaseException], ...]:
    """Trial errors that are a bad corner of the space, not a bug: the search goes on."""
    import torch

    from tasks.train import TrainingError

    return (TrainingError, torch.cuda.OutOfMemoryError)


def _log_trial_value(parent_run_id: str) -> Callable[[optuna.Study, Any], None]:
    """A callback that logs each complete trial's value on the parent run, step = its number.

    Through the client and the run id, not the active run: a worker process has no active
    parent run, yet its trials belong on the leader's curve.
    """
    from mlflow.tracking import MlflowClient

    def log(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        if frozen.state == optuna.trial.TrialState.COMPLETE:
            MlflowClient().log_metric(
                parent_run_id, "trial_value", float(frozen.value), step=frozen.number
            )

    return log


def _wait_for_workers(study: optuna.Study, poll_s: float = 1.0) -> None:
    """Wait until no trial of the study is RUNNING, so the report counts the workers' too.

    A worker killed mid-trial would leave its trial RUNNING for ever; the storage's heartbeat
    marks such a trial FAIL once it is stale (``fail_stale_trials``), which ends the wait.
    """
    import time

    running = (optuna.trial.TrialState.RUNNING,)
    while study.get_trials(deepcopy=False, states=running):
        optuna.storages.fail_stale_trials(study)
        time.sleep(poll_s)


def _objective(
    params_path: str | Path,
    overrides: list[str],
    dims: list[Any],
    cfg: Any,
    prepared_dir: Path,
    data_version: str,
    experiment_id: str,
    name: str,
    parent_run_id: str,
    scratch: Path,
) -> Callable[[optuna.Trial], float]:
    """One trial: ``tasks.train.train`` with the sampled overrides, in an MLflow child run of
    ``parent_run_id`` (the leader's, also in a worker process that has no active run)."""
    import os
    import socket

    import mlflow
    import torch

    from tasks import tracking
    from tasks.train import TrainingError, train

    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial: optuna.Trial) -> float:
        sampled = suggest(trial, dims)
        p = load_params(params_path, [*overrides, *trial_overrides(sampled, cfg.epochs)])
        # A fresh path per trial: train() resumes from a checkpoint whose configs match.
        checkpoint = scratch / f"trial-{trial.number}.pt"
        child = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"trial-{trial.number}",
            nested=True,
            parent_run_id=parent_run_id,
            tags={
                "optuna_study": name,
                "trial_number": str(trial.number),
                "dermaflow.tune_worker": worker,
            },
        )
        trial.set_user_attr("mlflow_run_id", child.info.run_id)
        state, status = "FAIL", "FAILED"

        def on_epoch(record: dict) -> None:
            step = record["epoch"]
            tracking.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step)
            report_epoch(trial, record[OBJECTIVE], step, cfg.epochs)

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

    return objective
