"""The tune flow's engine: an Optuna study whose trials are the train stage's own ``train``.

What runs around the pure pieces in :mod:`tasks.tune` (the space, the sampler and pruner, the
preset, the plots): the study in ``mlruns/optuna.db``, the MLflow parent run with one nested
child run per trial, and the report. ``dermaflow tune`` calls :func:`run_tune`; every trial is
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

from tasks.config import load_params
from tasks.io import atomic_dir
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
