"""Part 5: the whole embedded-default pipeline on the CPU, stage by stage.

``make run`` drives the DVC stages through the Prefect flow, one ``dvc repro --single-item
<stage>`` per stage (:mod:`flows.pipeline`). This part runs exactly those commands, in the
flow's order, in a fresh scratch copy of the project (code, ``dvc.yaml`` and the repository's
``params.yaml`` unchanged, as its own git + DVC repo, the way ``tests.helpers.make_project``
builds one), with CUDA hidden so the numbers are the CPU's, and times each call. Prefect's own
start-up and the promotion gate are not included; they add seconds, not minutes.

It is slow (the default trains and explains for real: about six minutes on two cores), so it
runs only when asked: ``--only pipeline`` or ``--all``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, Part, Settings, Target, judge

#: The first bound for the embedded default on two CPU cores, after the install.
PIPELINE_TARGET_S = 600.0
#: The explanation-engine issue's bounds on two CPU cores: the whole flow and the explain stage.
FLOW_TARGET_S = 240.0
EXPLAIN_TARGET_S = 60.0


def _env() -> dict[str, str]:
    """The caller's environment, the venv first on PATH, tracking local, CUDA hidden."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out.update(
        {
            "CUDA_VISIBLE_DEVICES": "",
            "GX_ANALYTICS_ENABLED": "false",
            "DVC_NO_ANALYTICS": "1",
            "DO_NOT_TRACK": "1",
            "MPLBACKEND": "Agg",
        }
    )
    return out


def _call(cmd: list[str], cwd: Path, cores: int | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; with ``cores``, pinned (and its children) to the first that many cores."""
    pin = None
    if cores:
        allowed = sorted(os.sched_getaffinity(0))[:cores]

        def pin() -> None:
            os.sched_setaffinity(0, allowed)

    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, preexec_fn=pin)


def make_project(root: Path, params: Path) -> Path:
    """A scratch copy of the project (tasks, flows, dvc.yaml, params) as a git + DVC repo."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("tasks", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(params, root / "params.yaml")
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "-c", "user.email=b@b", "-c", "user.name=bench", "commit", "-qm", "bench"],
    ):
        proc = _call(cmd, root)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return root


def run(settings: Settings, part: Part) -> None:
    """Part 5: wall seconds of each ``dvc repro --single-item <stage>`` of the default."""
    from flows.stages import pipeline_stages

    root = make_project(settings.workdir / "project", settings.params)
    stages = pipeline_stages(root)
    part.config.update(
        {
            "params": str(settings.params),
            "stages": stages,
            "command": "dvc repro --single-item <stage>",
            "cuda_visible_devices": "",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cores": settings.pipeline_cores or len(os.sched_getaffinity(0)),
        }
    )
    seconds: dict[str, float] = {}
    for stage in stages:
        start = time.perf_counter()
        proc = _call(["dvc", "repro", "--single-item", stage], root, settings.pipeline_cores)
        seconds[stage] = time.perf_counter() - start
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            part.status = f"error: stage {stage} exited {proc.returncode}"
            part.notes.append(output[-3000:])
            break
        ran = f"Running stage '{stage}'" in output
        part.add(
            f"{stage}_s",
            seconds[stage],
            "s",
            note="ran" if ran else "unchanged (skipped by DVC)",
        )
    total = sum(seconds.values())
    part.add("total_s", total, "s", note=f"{len(seconds)} stages, sum of the dvc repro calls")
    train = root / "metrics" / "train.json"
    if train.exists():
        metrics = json.loads(train.read_text())
        part.config["train_test_balanced_accuracy"] = metrics.get("test", {}).get(
            "balanced_accuracy"
        )
    slowest = sorted(seconds.items(), key=lambda kv: -kv[1])[:3]
    shares = ", ".join(f"{s} {t:.0f} s ({t / total:.0%})" for s, t in slowest) if total else ""
    part.notes.append(f"slowest stages: {shares}")
    complete = part.status == "ok"
    v = judge(
        total if complete else None,
        PIPELINE_TARGET_S,
        "<",
        scope="cpu",
        on_cuda=settings.on_cuda,
        missing=part.status,
    )
    part.targets.append(
        Target(
            "pipeline_cpu_under_10_min",
            "embedded-default pipeline under 10 minutes on the CPU (2 cores), after install",
            total,
            PIPELINE_TARGET_S,
            "<",
            "s",
            "cpu",
            v,
            f"slowest stages: {shares}" if v != "PASS" else "",
        )
    )
    summary = root / "reports" / "explain" / "summary.json"
    explained = json.loads(summary.read_text()) if summary.exists() else {}
    part.targets += speed_targets(
        seconds,
        explained.get("work", {}),
        complete,
        settings.on_cuda,
        part.status,
        precision=explained.get("score_precision"),
    )


def speed_targets(
    seconds: dict[str, float],
    work: dict[str, float],
    complete: bool,
    on_cuda: bool,
    status: str,
    precision: str | None = None,
) -> list[Target]:
    """The flow (<= 4 min) and explain-stage (<= 60 s) targets, with what bounds each.

    Args:
        seconds: wall seconds per stage.
        work: the explain stage's ``summary.json`` ``work`` (the engine's own account).
        complete: every stage ran.
        on_cuda: this run has a CUDA device (the targets are the CPU's either way).
        status: the part's status, the verdict when incomplete.
        precision: the summary's ``score_precision`` (what the scoring passes ran in), if any.
    """
    total = sum(seconds.values())
    stage = seconds.get("explain")
    slowest = ", ".join(
        f"{s} {t:.0f} s" for s, t in sorted(seconds.items(), key=lambda kv: -kv[1])[:4]
    )
    out = []
    for id_, what, value, threshold, bound in (
        ("flow_cpu_under_4_min", "the embedded default's stages on 2 CPU cores",
         total if complete else None, FLOW_TARGET_S, f"slowest stages: {slowest}"),
        ("explain_stage_cpu_under_60_s", "the explain stage of the default on 2 CPU cores",
         stage if complete else None, EXPLAIN_TARGET_S, explain_bound(stage, work, precision)),
    ):  # fmt: skip
        v = judge(value, threshold, "<", scope="cpu", on_cuda=on_cuda, missing=status)
        out.append(
            Target(id_, what, value, threshold, "<", "s", "cpu", v, bound if v != "PASS" else "")
        )
    return out


def explain_bound(
    stage_s: float | None, work: dict[str, float], precision: str | None = None
) -> str:
    """What the explain stage's seconds are made of, from the engine's account of its work.

    The scores forward every perturbed copy (deletion, insertion, ROAD, Average Drop) through
    the model's inference twin, and ROAD in-fills each removed region with a linear solve;
    with the same images, methods, layers and scores that work is fixed at a given precision
    (``explain.score_amp``: the summary's ``score_precision``), so its seconds are the floor no
    scheduling of the engine can go under.
    """
    if stage_s is None or not work.get("forward_s"):
        return ""
    maps, scores = work["maps_s"], work["scores_s"]
    rate = work["scored_images"] / work["forward_s"]
    floor = work["forward_s"] + work["imputation_s"]
    reused = work.get("reused_images", 0)
    again = f", {reused:,.0f} identical copies reused" if reused else ""
    ran_in = f" in {precision}" if precision else ""
    return (
        f"maps {maps:.0f} s + scores {scores:.0f} s (forwarding {work['scored_images']:,.0f} "
        f"perturbed images at {rate:.0f} img/s{ran_in}: {work['forward_s']:.0f} s{again}; "
        f"ROAD's in-filling: {work['imputation_s']:.0f} s) + process start, loading and outputs "
        f"{stage_s - maps - scores:.0f} s; the scoring forwards and in-filling alone take "
        f"{floor:.0f} s of the {EXPLAIN_TARGET_S:.0f} s"
    )
