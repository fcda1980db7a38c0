"""The pipeline flow: every DVC stage as a Prefect task, then the promotion gate.

Each task runs ``dvc repro --single-item <stage>``, so the flow and a plain ``dvc repro``
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

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks import tracking
from tasks.config import GateConfig, apply_overrides, load_params
from tasks.gate import ECE_KEY, decide

STAGES = (
    "synth",
    "ingest",
    "validate",
    "split",
    "prepare",
    "train",
    "calibrate",
    "export",
    "explain",
)


class StageFailed(RuntimeError):
    """A stage exited non-zero; ``bad_input`` when it rejected the data (never retried)."""

    def __init__(self, stage: str, output: str, bad_input: bool) -> None:
        super().__init__(f"stage {stage} failed:\n{output}")
        self.stage, self.output, self.bad_input = stage, output, bad_input


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def run_stage(stage: str, repo: Path) -> dict:
    """``dvc repro --single-item <stage>``; returns whether DVC ran it or found it unchanged."""
    proc = subprocess.run(
        ["dvc", "repro", "--single-item", stage],
        cwd=repo,
        env=_env(),
        capture_output=True,
        text=True,
    )
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        # The CLI turns bad input into "dermaflow <stage> failed" + exit 1: retrying is futile.
        raise StageFailed(stage, output[-6000:], bad_input=f"dermaflow {stage} failed" in output)
    return {"stage": stage, "ran": f"Running stage '{stage}'" in output, "output": output[-6000:]}


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
    """One DVC stage; its output goes to the Prefect log."""
    logger = get_run_logger()
    result = run_stage(stage, Path(repo))
    verb = "ran" if result["ran"] else "unchanged, skipped"
    logger.info("%s: %s\n%s", stage, verb, result["output"])
    return {k: result[k] for k in ("stage", "ran")}


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
    """Compare the new model version with the champion; move the alias or say why not."""
    info = json.loads((Path(repo) / tracking.RUN_FILE).read_text())
    onnx_file = Path(repo) / "models/onnx.json"
    onnx = json.loads(onnx_file.read_text()) if onnx_file.exists() else {}
    name, version = info["registered_model"], str(info["model_version"])
    tracking.configure(repo)
    champion_version = tracking.alias_version(name, cfg.champion_alias)
    candidate = tracking.version_metrics(name, version)
    if champion_version == version:
        decision = {"promote": False, "reason": f"v{version} is already {cfg.champion_alias}"}
    else:
        champion = tracking.version_metrics(name, champion_version) if champion_version else None
        d = decide(candidate, champion, cfg)
        decision = {"promote": d.promote, "reason": d.reason}
    if decision["promote"]:
        tracking.set_alias(name, cfg.champion_alias, version)
        if onnx:
            tracking.set_alias(onnx["registered_model"], cfg.champion_alias, onnx["version"])
    with tracking.resume_lineage_run(repo):
        tags = {
            "promotion": "promoted" if decision["promote"] else "refused",
            "promotion_reason": decision["reason"],
        }
        if flow_run_id:
            tags["prefect_flow_run_id"] = flow_run_id
        tracking.set_tags(tags)
    decision.update(
        model=name,
        candidate_version=version,
        champion_version=champion_version,
        candidate_metric=candidate.get(cfg.metric),
        candidate_ece=candidate.get(ECE_KEY),
        run_id=info["run_id"],
        experiment_id=info["experiment_id"],
    )
    return decision


def report_markdown(stages: list[dict], gate: dict, cfg: GateConfig) -> str:
    """The flow run's summary for the Prefect UI: stages, metrics, decision, MLflow link."""
    rows = "\n".join(f"| {s['stage']} | {'ran' if s['ran'] else 'skipped'} |" for s in stages)
    link = f"http://127.0.0.1:5000/#/experiments/{gate['experiment_id']}/runs/{gate['run_id']}"
    verdict = "**promoted**" if gate["promote"] else "**refused**"
    metric = gate.get("candidate_metric")
    ece = gate.get("candidate_ece")
    return (
        f"# dermaflow pipeline\n\n| stage | status |\n|---|---|\n{rows}\n\n"
        f"| model | version | {cfg.metric} | test ECE (calibrated) | champion before |\n"
        f"|---|---|---|---|---|\n| {gate['model']} | {gate['candidate_version']} | "
        f"{'-' if metric is None else f'{metric:.4f}'} | {'-' if ece is None else f'{ece:.4f}'} "
        f"| {gate['champion_version'] or '-'} |\n\n"
        f"Decision: {verdict} to `{cfg.champion_alias}`: {gate['reason']}\n\n"
        f"MLflow run: [{gate['run_id']}]({link}) (`make ui`)\n"
    )


def dvc_stages(repo: Path) -> list[str]:
    """The stages dvc.yaml defines, in pipeline order."""
    defined = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return [s for s in STAGES if s in defined]


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
    results = [stage(name, repo) for name in dvc_stages(root)]
    gate = promotion_gate(repo, p.gate, str(flow_run.id) if flow_run.id else None)
    create_markdown_artifact(
        markdown=report_markdown(results, gate, p.gate),
        key="dermaflow-pipeline",
        description="stages, metrics and the promotion decision",
    )
    logger.info("gate: %s (%s)", "promoted" if gate["promote"] else "refused", gate["reason"])
    return {"stages": results, "gate": gate}


if __name__ == "__main__":
    pipeline(overrides=sys.argv[1:] or None)
