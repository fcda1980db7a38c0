"""The pipeline flow: every DVC stage as a Prefect task, then the promotion gate.

The stages and their order come from dvc.yaml (:func:`flows.stages.pipeline_stages`); each task
runs ``dvc repro --single-item <stage>`` through DVC's API, so the flow and a plain ``dvc repro``
execute the same commands and leave the same ``dvc.lock``: an unchanged stage is skipped by
DVC, whichever of the two drives it. Prefect adds what DVC lacks: retries of transient
failures (never of bad data), per-run parameter overrides, run history, and the gate that
moves the ``champion`` alias with a reason a person can read.

Run it with ``dermaflow run [--set key=value ...]`` or ``python -m flows.pipeline``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from flows.stages import StageFailed, pipeline_stages, reproduce
from tasks import card, gate, paths, tracking
from tasks.config import GateConfig, apply_overrides, load_params


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def _retry_unless_bad_input(task, task_run, state) -> bool:  # noqa: ANN001 (Prefect's hook)
    try:
        state.result()
    except StageFailed as err:
        return not err.bad_input
    except Exception:  # noqa: BLE001 - anything else (a crash, a kill) may be transient
        return True
    return False


@task(name="dvc-stage", retry_condition_fn=_retry_unless_bad_input)
def stage_task(stage: str, repo: str) -> dict:
    """One DVC stage (``dvc repro --single-item``); its output streams to the terminal."""
    ran = stage in reproduce(repo, stage)
    get_run_logger().info("%s: %s", stage, "ran" if ran else "unchanged, skipped")
    return {"stage": stage, "ran": ran}


@task(name="refresh-data")
def refresh_data(repo: str, dataset_root: str) -> str:
    """``dvc update`` an imported dataset, ``dvc pull`` where a remote exists; else nothing."""
    logger = get_run_logger()
    root = Path(repo) / dataset_root
    tracked = root.with_name(root.name + ".dvc")
    remotes = subprocess.run(
        ["dvc", "remote", "list"], cwd=repo, env=_env(), capture_output=True, text=True
    ).stdout.strip()
    if tracked.exists() and "deps:" in tracked.read_text():
        cmd = ["dvc", "update", str(tracked)]
    elif tracked.exists() and remotes:
        cmd = ["dvc", "pull", str(tracked)]
    else:
        logger.info("data refresh skipped: %s is not a DVC import and has no remote", root)
        return "skipped"
    proc = subprocess.run(cmd, cwd=repo, env=_env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return " ".join(cmd)


@task(name="promotion-gate")
def promotion_gate(repo: str, cfg: GateConfig, flow_run_id: str | None) -> dict:
    """Re-score the champion on the candidate's test split; promote only a significant gain.

    The champion's stored metrics may come from another test split, or another dataset, so
    its registered bundle is run again on the candidate's prepared test images, with its own
    calibrator; the two are then compared on the same images (see :mod:`tasks.gate`). The
    decision, both scores, the test-set version and the p-value go to the returned dict, the
    lineage run and the candidate's model version.
    """
    root = Path(repo)
    info = json.loads((root / tracking.RUN_FILE).read_text())
    onnx_file = root / paths.ONNX_REGISTRATION
    onnx = json.loads(onnx_file.read_text()) if onnx_file.exists() else {}
    name, version = info["registered_model"], str(info["model_version"])
    uri = tracking.configure(repo)
    bins = load_params(root / "params.yaml").calibrate.bins  # the ECE as calibrate measured it
    test = gate.load_candidate(root)
    candidate = gate.score(test.logits, test.labels, test.classes, test.calibrator, bins)
    champion_version = tracking.alias_version(name, cfg.champion_alias)
    champion = None
    if champion_version == version:
        decision = gate.Decision(False, f"v{version} is already {cfg.champion_alias}")
    elif champion_version is None:
        decision = gate.judge(candidate, None, test.labels, cfg)
    else:
        # The classes recorded on the version settle a task mismatch without loading weights.
        known = tracking.version_classes(name, champion_version)
        refusal = gate.class_mismatch(test.classes, known)
        if refusal is None:
            # Loading a model needs torch and the registry helpers (2.6 s of imports on two
            # cores): only here, not on a first run that has no champion to re-score.
            from flows.explain_batch import (
                ExplainBatchError,
                bundle_file,
                resolve_calibration,
                resolve_model,
            )
            from tasks.calibrate import calibrator_from_dict
            from tasks.models import load_bundle

            try:
                ref = resolve_model(f"models:/{name}/{champion_version}", uri)
                model, meta = load_bundle(bundle_file(ref.bundle, uri))
                calibration = resolve_calibration(ref, meta, None, uri)
                logits = gate.model_logits(model, meta, test.split)
                calibrator = calibrator_from_dict(calibration["calibrator"])
                champion = gate.score(logits, test.labels, test.classes, calibrator, bins)
            except (ExplainBatchError, gate.Incomparable) as err:
                refusal = str(err)
        if refusal is None:
            decision = gate.judge(candidate, champion, test.labels, cfg)
        else:
            reason = f"{cfg.champion_alias} v{champion_version} cannot be re-scored: {refusal}"
            decision = gate.Decision(False, reason)
    if decision.promote:
        tracking.set_alias(name, cfg.champion_alias, version)
        if onnx:
            tracking.set_alias(onnx["registered_model"], cfg.champion_alias, onnx["version"])
    result = gate.summary(decision, candidate, champion, test)
    result.update(
        model=name,
        candidate_version=version,
        champion_version=champion_version,
        run_id=info["run_id"],
        experiment_id=info["experiment_id"],
    )
    tags, metrics = gate.mlflow_record(result, flow_run_id)
    tracking.record_gate(name, version, tags, metrics, test.classes, repo)
    return result


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def report_markdown(
    stages: list[dict], gate: dict, cfg: GateConfig, model_card: dict | None = None
) -> str:
    """The flow run's summary for the Prefect UI: stages, both scores, decision, MLflow link,
    and where the model card is (:func:`tasks.card.record_decision`)."""
    rows = "\n".join(f"| {s['stage']} | {'ran' if s['ran'] else 'skipped'} |" for s in stages)
    link = tracking.ui_url(gate["experiment_id"], gate["run_id"])
    local_hint = " (`make ui`)" if link.startswith("http://127.0.0.1:") else ""
    verdict = "**promoted**" if gate["promote"] else "**refused**"
    champion = gate["champion_version"]
    significance = (
        f"Gain {gate['gain']:+.4f} ({cfg.confidence:.0%} CI [{gate['gain_ci_low']:+.4f}, "
        f"{gate['gain_ci_high']:+.4f}]), bootstrap p = {gate['p_value']:.3g} for gain <= "
        f"{cfg.min_gain:+.4f}, McNemar p = {gate['mcnemar_p_value']:.3g}\n\n"
        if gate.get("p_value") is not None
        else ""
    )
    return (
        f"# dermaflow pipeline\n\n| stage | status |\n|---|---|\n{rows}\n\n"
        f"Test set `{gate['test_set_version']}` ({gate['n_images']} images), both models "
        f"scored on it:\n\n"
        "| model | version | balanced accuracy | test ECE (calibrated) |\n|---|---|---|---|\n"
        f"| candidate {gate['model']} | {gate['candidate_version']} | "
        f"{_number(gate['candidate_balanced_accuracy'])} | {_number(gate['candidate_ece'])} |\n"
        f"| {cfg.champion_alias} before (re-scored) | {champion or '-'} | "
        f"{_number(gate['champion_balanced_accuracy'])} | {_number(gate['champion_ece'])} |\n\n"
        f"{significance}"
        f"Decision: {verdict} to `{cfg.champion_alias}`: {gate['reason']}\n\n"
        f"MLflow run: [{gate['run_id']}]({link}){local_hint}\n"
        + (
            f"\nModel card: `{model_card['card']}`; with the decision: artifact "
            f"`{model_card['artifact']}` of the run and the [registry page]"
            f"({model_card['registry_url']})\n"
            if model_card
            else ""
        )
    )


def _ci(record: dict, key: str) -> str:
    low, high = record.get(f"{key}_ci") or (None, None)
    return f"{_number(record.get(key))} [{_number(low)}, {_number(high)}]"


def _set_cell(record: dict) -> str:
    sets = record.get("conformal")
    return f"{sets['coverage']:.1%} / {sets['mean_set_size']:.2f}" if sets else "n/a"


def trust_markdown(repo: str | Path) -> str:
    """The trust checks of this run for the Prefect artifact, read from the stages' metrics.

    External sets (``metrics/evaluate.json``), subgroup flags and largest gaps
    (``subgroups.json``), the OOD guard (``ood.json``) and conformal sets
    (``conformal.json``), read as the card reads them (:func:`tasks.card.read_input`); a
    check whose stage has not run is left out.
    """
    parts: list[str] = []
    sets = (card.read_input(repo, "evaluate") or {}).get("sets") or {}
    if sets:
        rows = "\n".join(
            f"| {name} | {r['n']} | {_ci(r, 'balanced_accuracy')} | {_number(r.get('auroc'))} | "
            f"{_number(r.get('ece_after'))} | {r['referred_share']:.1%} | {_set_cell(r)} |"
            for name, r in sets.items()
        )
        parts.append(
            "## External evaluation\n\n| set | n | balanced accuracy [CI] | AUROC | ECE "
            "(calibrated) | referred | conformal coverage / set size |\n"
            f"|---|---|---|---|---|---|---|\n{rows}\n"
        )
    subgroups = (card.read_input(repo, "subgroups") or {}).get("splits") or {}
    if subgroups:
        lines = []
        for split, record in subgroups.items():
            gaps = ", ".join(
                f"{metric} {g['gap']:.3f} ({g['attribute']})"
                for metric, g in (record.get("largest_gap") or {}).items()
            )
            flags = record.get("flags") or []
            lines.append(
                f"- {split} ({record['n']} images): largest gap {gaps or 'none (groups too small)'}"
                f"; {len(flags)} flag(s)"
            )
            lines += [f"  - {flag}" for flag in flags]
        parts.append("## Subgroups\n\n" + "\n".join(lines) + "\n")
    ood = card.read_input(repo, "ood")
    if ood:
        aurocs = ", ".join(f"{k} {_number(v)}" for k, v in ood["detection_auroc"].items())
        parts.append(
            f"## Out-of-distribution guard\n\n{ood['method']}: test pass rate "
            f"{ood['test_pass_rate']:.1%} (target {ood['target_pass_rate']:.0%}); "
            f"detection AUROC: {aurocs or 'no other set'}\n"
        )
    conformal = card.read_input(repo, "conformal")
    if conformal:
        parts.append(
            f"## Conformal sets\n\n{conformal['method']}: coverage "
            f"{conformal['coverage']:.1%} (target {conformal['target_coverage']:.0%}), mean "
            f"set size {conformal['mean_set_size']:.2f}, singletons "
            f"{conformal['singleton_rate']:.1%}\n"
        )
    return "\n".join(parts)


@task(name="save-experiment")
def save_experiment(repo: str, name: str | None = None) -> str:
    """Save the workspace as a DVC experiment, so ``dvc exp show`` lists this run beside others.

    ``--set`` overrides go into params.yaml, which nobody commits after a run: without this,
    the next run would overwrite them and DVC would keep no trace of what this one tried.
    ``dvc exp save`` writes a hidden git ref (HEAD and the workspace stay as they are) holding
    params.yaml, dvc.lock and the small ``cache: false`` outputs (metrics, plot data, run ids:
    passed with ``--include-untracked``, as a fresh project has not committed them yet, with
    the .gitignore files DVC wrote), and puts every cached output in DVC's cache.

    It runs as a command in ``repo`` (DVC's experiment code works on the current directory).
    Only the stages dvc.lock records are saved: one never run (the synthetic set when the data
    is real) has no outputs, and ``dvc exp save`` would stop on it; when every stage has run,
    ``dvc.yaml`` stands for them all. The resume checkpoint (``persist``) stays out. Call it
    once the stages are current, as the flow's last step.

    Args:
        repo: the project folder (a git + DVC repo with at least one commit).
        name: the experiment's name (the flow run's name); characters git refuses in a ref
            become ``-``. A second save under one name replaces the first (``--force``: a
            retried run). None lets DVC make one up.

    Returns:
        The experiment's name (or, when DVC chose it, its commit).

    Raises:
        RuntimeError: DVC refused, with its message (e.g. a repo without a git commit).
    """
    import re

    import yaml

    root = Path(repo)
    lock = root / "dvc.lock"
    ran = yaml.safe_load(lock.read_text())["stages"] if lock.exists() else {}
    defined = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    stages = [stage for stage in defined if stage in ran]
    untracked: set[str] = set()
    for stage in stages:
        for section in ("outs", "metrics", "plots"):
            for entry in defined[stage].get(section) or []:
                path, flags = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
                flags = flags or {}
                if flags.get("cache", True):
                    untracked.add(str(Path(path).parent / ".gitignore"))
                elif not flags.get("persist", False):
                    untracked.add(path)
    cmd = ["dvc", "exp", "save", "--json", "--force"]
    ref_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") if name else ""
    if ref_name:
        cmd += ["--name", ref_name]
    for path in sorted(untracked):
        if (root / path).is_file():
            cmd += ["--include-untracked", path]
    # DVC commits target by target, reading and rewriting dvc.lock for each: naming the file
    # when every stage has run commits them all in one pass (9.8 -> 3.8 s for the default's
    # 14 stages on two cores).
    targets = ["dvc.yaml"] if stages == list(defined) else stages
    proc = subprocess.run(cmd + targets, cwd=root, env=_env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed in {repo}:\n{proc.stdout}{proc.stderr}")
    return ref_name or json.loads(proc.stdout)["ref"]


PROGRESS_KEY = "dermaflow-pipeline-progress"  # the flow run's progress artifact


@flow(name="dermaflow-pipeline", log_prints=True)
def pipeline(
    overrides: list[str] | None = None,
    repo: str = ".",
    params_path: str = "params.yaml",
    refresh: bool = True,
) -> dict:
    """Run every stage through DVC, then the promotion gate.

    Args:
        overrides: ``key=value`` params for this run, written into params.yaml as
            ``dvc exp run -S`` would (so DVC sees them and re-runs only what they affect).
        repo: the project folder (a git + DVC repo).
        params_path: params file, relative to ``repo``.
        refresh: update or pull the dataset first where it is a DVC import or has a remote.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root = Path(repo)
    if overrides:
        changed = apply_overrides(root / params_path, overrides)
        logger.info("params overridden: %s", ", ".join(changed) or "none changed")
    p = load_params(root / params_path)
    if refresh:
        refresh_data(repo, p.dataset.root)
    stage = stage_task.with_options(
        retries=p.orchestration.retries, retry_delay_seconds=p.orchestration.retry_delay_s
    )
    names = pipeline_stages(root)
    # The flow run's page shows how far the stages are (one step per stage).
    progress = create_progress_artifact(
        progress=0.0, key=PROGRESS_KEY, description=f"stages done, of {len(names)}"
    )
    results = []
    for done, name in enumerate(names, start=1):
        results.append(stage(name, repo))
        update_progress_artifact(
            progress, 100.0 * done / len(names), description=f"{done}/{len(names)}: {name}"
        )
    gate = promotion_gate(repo, p.gate, str(flow_run.id) if flow_run.id else None)
    model_card = card.record_decision(repo, gate)  # the verdict into the version's card
    create_markdown_artifact(
        markdown=report_markdown(results, gate, p.gate, model_card) + "\n" + trust_markdown(repo),
        key="dermaflow-pipeline",
        description="stages, metrics and the promotion decision",
    )
    logger.info("gate: %s (%s)", "promoted" if gate["promote"] else "refused", gate["reason"])
    if model_card:
        where = (model_card["card"], model_card["artifact"], model_card["registry_url"])
        logger.info("model card: %s (with the decision: MLflow artifact %s, %s)", *where)
    experiment = None
    if p.orchestration.save_experiment:
        try:
            experiment = save_experiment(repo, flow_run.name)
            logger.info("saved as DVC experiment %s (compare runs: dvc exp show)", experiment)
        except RuntimeError as err:  # e.g. no git commit yet: the run itself succeeded
            logger.warning("not saved as a DVC experiment: %s", str(err).splitlines()[-1])
    return {"stages": results, "gate": gate, "experiment": experiment, "card": model_card}


if __name__ == "__main__":
    pipeline(overrides=sys.argv[1:] or None)
