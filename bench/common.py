"""What every part shares: timing, the record of a part, targets, machine facts, the output.

Timing rules, the same for every number in the report:

- every timed call is bracketed by ``torch.cuda.synchronize()`` when CUDA is in use, because
  kernel launches return before the GPU has done the work and a wall clock without the
  synchronisation measures the launch queue, not the computation;
- warm-up calls run first and are not timed (allocator growth, cuDNN autotuning,
  onnxruntime's first-run graph work, torch.compile);
- the reported time is the median of the repeats, because a shared machine makes the mean
  chase outliers; min, max and every sample are kept in the JSON;
- a time budget caps the repeats of slow calls (a ResNet-50 step takes seconds on two CPU
  cores), never below one timed run, and the number of repeats used is recorded;
- calls that are compared with each other are timed round-robin (:func:`measure_many`), so
  load from other processes on a shared machine falls on both sides of a ratio alike.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "dermaflow.bench/1"

#: Verdicts a target can have.
PASS, MISS = "PASS", "MISS"
NA_CPU = "n/a on CPU"
NO_CUDA = "skipped: no CUDA device"

#: Distributions whose versions go into the report (absent ones are recorded as such).
PACKAGES = (
    "dermaflow",
    "torch",
    "torchvision",
    "onnxruntime-gpu",
    "onnxruntime",
    "onnx",
    "grad-cam",
    "captum",
    "numpy",
    "pillow",
    "opencv-python",
    "opencv-python-headless",
    "dvc",
    "mlflow",
    "prefect",
)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued CUDA work; a no-op on the CPU (its calls return when done)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    """Wall seconds of one timed call: the median over repeats plus the spread.

    Attributes:
        median_s: the reported time.
        min_s: fastest repeat.
        max_s: slowest repeat.
        repeats: timed calls actually made (after the budget cap).
        warmup: untimed calls made first.
        samples: every timed repeat, in order.
    """

    median_s: float
    min_s: float
    max_s: float
    repeats: int
    warmup: int
    samples: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median_s,
            "min_s": self.min_s,
            "max_s": self.max_s,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "samples_s": [round(s, 6) for s in self.samples],
        }


def _timed(fn: Callable[[], Any], device: torch.device | str | None) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure_many(
    fns: Mapping[str, Callable[[], Any]],
    device: torch.device | str | None,
    *,
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float | None = None,
) -> dict[str, Timing]:
    """Time several calls that are compared with each other, round-robin.

    One repeat is one round of every call in turn, so a burst of load from another process
    hits all sides of a comparison alike instead of one side's whole series; on a shared
    machine that is what keeps a ratio honest.

    Args:
        fns: name -> the work, with no arguments.
        device: the device it runs on (synchronised around every call when CUDA).
        warmup: untimed rounds first.
        repeats: most timed rounds.
        budget_s: seconds per call: the rounds are cut to fit ``budget_s * len(fns)``,
            estimated from the last warm-up round (or the first timed one); at least one.

    Returns:
        name -> :class:`Timing`.
    """
    estimate: dict[str, float] = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            estimate[name] = _timed(fn, device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    wanted, rounds = max(1, repeats), 0
    while rounds < wanted:
        for name, fn in fns.items():
            samples[name].append(_timed(fn, device))
        rounds += 1
        if budget_s is not None and rounds == 1:
            per_round = sum(estimate.values()) if estimate else sum(v[0] for v in samples.values())
            affordable = int(budget_s * len(fns) // max(per_round, 1e-9))
            wanted = max(1, min(wanted, affordable))
    return {
        name: Timing(
            median_s=statistics.median(v),
            min_s=min(v),
            max_s=max(v),
            repeats=len(v),
            warmup=warmup,
            samples=v,
        )
        for name, v in samples.items()
    }


def measure(
    fn: Callable[[], Any],
    device: torch.device | str | None,
    *,
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float | None = None,
) -> Timing:
    """Time one call: :func:`measure_many` with a single entry."""
    return measure_many({"fn": fn}, device, warmup=warmup, repeats=repeats, budget_s=budget_s)["fn"]


# --------------------------------------------------------------------------------------------
# The record of a part
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One target of the issue and its verdict on this machine.

    Attributes:
        id: stable key (``training_vs_bare``, ``ort_cpu_vs_torch_cpu_b32``, ...).
        description: the target in words.
        measured: the value compared (a ratio, images/s or seconds); None when not measured.
        threshold: the value it must reach.
        comparison: ``>=``, ``>`` or ``<``.
        unit: unit of ``measured`` and ``threshold``.
        scope: ``gpu`` or ``cpu``: where the target applies.
        verdict: PASS, MISS, ``n/a on CPU`` or a ``skipped: ...`` reason.
        bound: what limits the measured value, from measurements (empty when it passes).
    """

    id: str
    description: str
    measured: float | None
    threshold: float
    comparison: str
    unit: str
    scope: str
    verdict: str
    bound: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def judge(
    measured: float | None,
    threshold: float,
    comparison: str = ">=",
    *,
    scope: str,
    on_cuda: bool,
    not_applicable: str | None = None,
    missing: str = NO_CUDA,
) -> str:
    """The verdict of one target.

    Args:
        measured: the value, or None when it could not be measured here.
        threshold: what it must reach.
        comparison: ``>=`` (at least), ``>`` (more than) or ``<`` (under).
        scope: ``gpu`` targets are ``n/a on CPU`` on a machine without CUDA; ``cpu`` targets
            apply everywhere (the CPU runs are made on GPU machines too).
        on_cuda: whether this run has a CUDA device.
        not_applicable: a reason the target does not apply to this configuration (e.g. the
            H100 rate on another GPU); it becomes the verdict.
        missing: verdict when ``measured`` is None.
    """
    if scope == "gpu" and not on_cuda:
        return NA_CPU
    if not_applicable:
        return not_applicable
    if measured is None:
        return missing
    ops = {">=": measured >= threshold, ">": measured > threshold, "<": measured < threshold}
    return PASS if ops[comparison] else MISS


@dataclass
class Part:
    """Everything one part measured, with its settings, targets and how long it ran.

    Measurements are keyed by name; each is ``{value, unit, reference, ratio, note, status,
    timing}``. ``reference`` names the measurement it is compared with (the limit) and
    ``ratio`` is ``value / reference value`` (or as stated in the note).
    """

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    measurements: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    status: str = "ok"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        name: str,
        value: float,
        unit: str,
        *,
        reference: str | None = None,
        ratio: float | None = None,
        timing: Timing | None = None,
        note: str = "",
        **extra: Any,
    ) -> float:
        """Record a measurement; returns ``value`` so it can be used inline."""
        self.measurements[name] = {
            "value": float(value),
            "unit": unit,
            "reference": reference,
            "ratio": None if ratio is None else float(ratio),
            "note": note,
            "status": "ok",
            "timing": timing.as_dict() if timing else None,
            **extra,
        }
        return float(value)

    def skip(self, name: str, unit: str, reason: str, note: str = "") -> None:
        """Record a measurement that was not made here, and why."""
        self.measurements[name] = {
            "value": None,
            "unit": unit,
            "reference": None,
            "ratio": None,
            "note": note,
            "status": reason,
            "timing": None,
        }

    def value(self, name: str) -> float | None:
        m = self.measurements.get(name)
        return None if m is None else m["value"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "seconds": round(self.seconds, 2),
            "config": self.config,
            "notes": self.notes,
            "measurements": self.measurements,
            "targets": [t.as_dict() for t in self.targets],
        }


# --------------------------------------------------------------------------------------------
# Machine facts
# --------------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    """Python and the installed versions of the packages the numbers depend on."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["torch_cuda"] = torch.version.cuda
    out["cudnn"] = (
        str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    )
    try:
        import onnxruntime as ort

        out["onnxruntime_providers"] = ",".join(ort.get_available_providers())
    except ImportError:  # pragma: no cover - a dependency of the project
        out["onnxruntime_providers"] = None
    return {k: v for k, v in out.items() if v is not None or k in {"torch_cuda", "cudnn"}}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs of /proc/cpuinfo; None where it is not there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores = set()
    phys = core = None
    for line in [*text.splitlines(), ""]:
        if line.startswith("physical id"):
            phys = line.split(":", 1)[1].strip()
        elif line.startswith("core id"):
            core = line.split(":", 1)[1].strip()
        elif not line.strip():
            if core is not None:
                cores.add((phys, core))
            phys = core = None
    return len(cores) or None


def _nvidia_smi(query: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        proc = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout else None


def hardware() -> dict[str, Any]:
    """CPU model and cores, memory, and the GPU (name, memory, capability, driver) if any."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    out: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cores": usable,
        "memory_gib": None if memory is None else round(memory, 1),
        "cuda_available": torch.cuda.is_available(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "driver": _nvidia_smi("driver_version"),
        }
    return out


def torch_settings() -> dict[str, Any]:
    """Thread counts and the numerics switches that move the numbers."""
    return {
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "mkldnn": torch.backends.mkldnn.is_available(),
    }


def git_info(repo: Path = REPO) -> dict[str, Any]:
    """The commit the code was measured at, and whether the working tree had changes."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


class CpuLoad:
    """How much of the machine's CPU other processes used while a part ran.

    Benchmarks on a shared machine are only as good as its quiet: this reads the machine's
    busy time from ``/proc/stat`` and this process's own CPU time (children included, for the
    pipeline's subprocesses) at the start and the end, and reports the difference as a share
    of the machine's capacity over the wall time, with the load averages. ``None`` where
    ``/proc/stat`` does not exist.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        ticks = [int(v) for v in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        busy = (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return time.monotonic(), busy, own

    def stop(self) -> dict[str, Any]:
        end = self._sample()
        out: dict[str, Any] = {"loadavg_1m": round(os.getloadavg()[0], 2)}
        if self.start is None or end is None:
            return {**out, "other_processes_cpu_share": None}
        wall = max(end[0] - self.start[0], 1e-9)
        cores = len(os.sched_getaffinity(0))
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        out["other_processes_cpu_share"] = round(min(max(other / (wall * cores), 0.0), 1.0), 3)
        return out


#: Seconds of each reference-speed probe (a part is probed before and after it runs).
SPEED_PROBE_S = 0.5
#: A part whose reference speed moved by more than this share between its probes gets a note.
SPEED_DRIFT = 0.10


def reference_speed(seconds: float = SPEED_PROBE_S) -> float:
    """The machine's speed now: float32 GFLOP/s of a 512 x 512 matmul on this process's threads.

    :class:`CpuLoad` sees the other processes of this machine, not a host that slows the
    whole machine down: on a shared two-core sandbox the default model's float32 forward went
    from 506 to 397 images/s within 36 minutes while other processes used under 1 % of the
    CPU. Probing a fixed piece of arithmetic before and after each part puts its numbers on
    a scale that runs of other hours (and machines) can be compared with.
    """
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    torch.mm(a, a)  # warm-up: the BLAS's threads and buffers
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count == 0:
        torch.mm(a, a)
        count += 1
    return round(2 * 512**3 * count / elapsed / 1e9, 2)


def speed_drift_note(before: float, after: float) -> str | None:
    """A note when the reference speed moved by more than :data:`SPEED_DRIFT` during a part."""
    change = after / before - 1 if before > 0 else 0.0
    if abs(change) <= SPEED_DRIFT:
        return None
    return (
        f"the machine's reference speed moved by {change:+.0%} while this part ran "
        f"({before:.0f} -> {after:.0f} GFLOP/s): its numbers mix two speeds of the machine"
    )


def device_slug() -> str:
    """``cpu``, or the GPU's name as a file-name slug (``nvidia-h100-80gb-hbm3``)."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def now_utc() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def command_line(argv: list[str] | None) -> str:
    """The invocation as a shell line: ``python -m bench ...`` (or the dermaflow entry)."""
    args = sys.argv[1:] if argv is None else argv
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    head = "dermaflow bench" if prog == "dermaflow" else "python -m bench"
    return " ".join([head, *args]).strip()


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def fmt(value: float | None, unit: str = "") -> str:
    """A number for the table: 3-4 significant digits, the unit appended."""
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.3g}x" if abs(value) < 1000 else f"{value:,.0f}x"
    a = abs(value)
    if a == 0:
        text = "0"
    elif a >= 1000:
        text = f"{value:,.0f}"
    elif a >= 1:
        text = f"{value:.4g}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def render(report: dict[str, Any], console: Any) -> None:
    """Print the measurements and the targets as two rich tables."""
    from rich.table import Table

    hw = report["hardware"]
    gpu = hw.get("gpu") or {}
    console.print(
        f"[bold]dermaflow bench[/] on {report['device']}: {gpu.get('name') or hw['cpu_model']}, "
        f"{hw['usable_cores']} cores, torch {report['versions'].get('torch')}, "
        f"{report['settings']['torch']['num_threads']} threads"
    )
    table = Table(title="measurements", show_lines=False, title_justify="left")
    for col, justify in (
        ("part", "left"),
        ("measurement", "left"),
        ("value", "right"),
        ("reference (limit)", "left"),
        ("ratio", "right"),
        ("note", "left"),
    ):
        table.add_column(col, justify=justify, overflow="fold")
    for part_name, part in report["parts"].items():
        if not part["measurements"]:
            table.add_row(part_name, "-", "-", "-", "-", part["status"])
        for name, m in part["measurements"].items():
            value = fmt(m["value"], m["unit"]) if m["status"] == "ok" else m["status"]
            table.add_row(
                part_name,
                name,
                value,
                m["reference"] or "",
                fmt(m["ratio"], "x") if m["ratio"] is not None else "",
                m["note"],
            )
    console.print(table)
    speeds = [
        f"{name} {part['config']['machine_speed']['before_gflops']:.0f} -> "
        f"{part['config']['machine_speed']['after_gflops']:.0f}"
        for name, part in report["parts"].items()
        if "machine_speed" in part.get("config", {})
    ]
    if speeds:
        console.print(f"reference speed (GFLOP/s) before -> after each part: {', '.join(speeds)}")
    loads = [
        f"{name} {part['config']['machine_load'].get('other_processes_cpu_share', 0) or 0:.0%}"
        for name, part in report["parts"].items()
        if "machine_load" in part.get("config", {})
    ]
    if loads:
        console.print(f"CPU used by other processes while each part ran: {', '.join(loads)}")
    for name, part in report["parts"].items():
        for note in part.get("notes", []):
            if note.startswith(("other processes used", "the machine's reference speed")):
                console.print(f"[yellow]warning[/] {name}: {note}")
    targets = Table(title="targets", title_justify="left")
    for col in ("target", "measured", "threshold", "verdict"):
        targets.add_column(col, overflow="fold")
    style = {PASS: "green", MISS: "red"}
    bounds: list[str] = []
    for part in report["parts"].values():
        for t in part["targets"]:
            colour = style.get(t["verdict"], "yellow")
            targets.add_row(
                f"{t['id']}: {t['description']}",
                fmt(t["measured"], t["unit"]),
                f"{t['comparison']} {fmt(t['threshold'], t['unit'])}",
                f"[{colour}]{t['verdict']}[/]",
            )
            if t["bound"]:
                bounds.append(f"[bold]{t['id']}[/] ({t['verdict']}): {t['bound']}")
    console.print(targets)
    if bounds:
        console.print("[bold]What bounds each target not met (measured):[/]")
        for line in bounds:
            console.print(f"  - {line}", highlight=False)


def write_report(path: Path, report: dict[str, Any], merge: bool = True) -> dict[str, Any]:
    """Write the JSON atomically; parts not run now are kept from an earlier file when merging.

    Merging lets the slow ``pipeline`` part be run on its own (``--only pipeline``) without
    losing the other parts' results in the same ``<device>.json``: every part carries its own
    command line, timestamp, commit and hardware, so a carried-over part stays attributable
    (the file's top-level ``hardware`` is the latest run's machine; parts written before parts
    recorded their hardware have none).

    Returns:
        The report as written.
    """
    from tasks.io import write_json

    if merge and path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("schema") == SCHEMA:
            carried = {k: v for k, v in old.get("parts", {}).items() if k not in report["parts"]}
            report = {**report, "parts": {**carried, **report["parts"]}}
            order = ("training", "data", "explain", "inference", "pipeline")
            report["parts"] = {
                k: report["parts"][k]
                for k in sorted(report["parts"], key=lambda k: order.index(k) if k in order else 99)
            }
    report["targets"] = [
        {"part": name, **t} for name, part in report["parts"].items() for t in part["targets"]
    ]
    write_json(path, report)
    return report


# --------------------------------------------------------------------------------------------
# Settings shared by the parts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The resolved knobs of one run (``auto`` values already decided), as the parts see them.

    Attributes:
        arch: architecture for training, explanations and inference.
        size: input side in pixels (the prepared cache's size).
        batch: training batch, and the chunk of the batched explanation calls.
        steps: timed training steps per repeat.
        warmup_steps: untimed training steps first.
        repeats: most timed repeats per measurement.
        budget_s: time budget per measurement (caps the repeats; at least one).
        threads: torch intra-op threads and onnxruntime intra-op threads.
        device: ``cuda`` when present, else ``cpu``.
        quick: the shrunken smoke-test configuration.
        explain_images: images explained per method.
        scorecam_images: images explained with Score-CAM (each costs one forward per channel).
        scorecam_layer: ``early`` / ``middle`` / ``deep``.
        cuda_batches: inference batch sizes on CUDA.
        cpu_batches: inference batch sizes on the CPU.
        cpu_compile: also time torch.compile on the CPU.
        jpeg_size: (width, height) of the source JPEGs of the data-path part.
        heatmap_tolerance: max |a - b| for two heatmaps to count as equal.
        pipeline_cores: pin the pipeline's stages to this many cores (None: all usable), so a
            big machine can reproduce the two-core target.
        params: the params.yaml the training config is read from.
        workdir: scratch folder (the prepared cache, the ONNX file).
    """

    arch: str
    size: int
    batch: int
    steps: int
    warmup_steps: int
    repeats: int
    budget_s: float
    threads: int
    device: str
    quick: bool
    explain_images: int
    scorecam_images: int
    scorecam_layer: str
    cuda_batches: tuple[int, ...]
    cpu_batches: tuple[int, ...]
    cpu_compile: bool
    jpeg_size: tuple[int, int]
    heatmap_tolerance: float
    pipeline_cores: int | None
    params: Path
    workdir: Path

    @property
    def on_cuda(self) -> bool:
        return self.device == "cuda"

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["params"] = str(self.params)
        out.pop("workdir")
        return out
