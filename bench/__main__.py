"""``python -m bench`` (also ``dermaflow bench``): run the parts, print the tables, write JSON.

Defaults depend on the machine, because one configuration cannot suit both: on CUDA the
headline set-up of the issue (ResNet-50, 224 px, batch 64, 20 steps per repeat, Score-CAM at
the deep layer); on the CPU the same model and size with the repeats and the slow items cut to
fit minutes (one 64-image training step per repeat, Score-CAM on one image at the early
layer). Every resolved value is written to the JSON's ``settings``, and any of them can be set
explicitly.
``--quick`` shrinks everything (ResNet-18 at 64 px) so a test can run all parts in seconds.
"""

from __future__ import annotations

import os

# Before torch / pytorch-grad-cam are imported: the library's Score-CAM draws a tqdm bar per
# image, and these read their switches at import time.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench import DEFAULT_PARTS, PARTS  # noqa: E402
from bench.common import (  # noqa: E402
    REPO,
    SCHEMA,
    SPEED_PROBE_S,
    CpuLoad,
    Part,
    Settings,
    command_line,
    device_slug,
    git_info,
    hardware,
    now_utc,
    reference_speed,
    render,
    speed_drift_note,
    torch_settings,
    versions,
    write_report,
)

#: Share of the machine's CPU used by other processes above which a part is flagged.
BUSY_SHARE = 0.10


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="dermaflow benchmarks: training, data path, explanations, inference, "
        "pipeline. Prints a table and writes <out>/<device>.json.",
    )
    p.add_argument(
        "--only",
        default=None,
        help=f"comma-separated parts from {','.join(PARTS)} (default: {','.join(DEFAULT_PARTS)})",
    )
    p.add_argument("--all", action="store_true", help="every part, the slow pipeline included")
    p.add_argument("--arch", default=None, help="architecture (default resnet50)")
    p.add_argument("--size", type=int, default=None, help="input side in px (default 224)")
    p.add_argument("--batch", type=int, default=None, help="training/CAM batch (default 64)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per repeat")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed training steps")
    p.add_argument("--repeats", type=int, default=None, help="most timed repeats per number")
    p.add_argument("--budget", type=float, default=None, help="seconds per measurement (cap)")
    p.add_argument("--threads", type=int, default=None, help="torch/onnxruntime CPU threads")
    p.add_argument("--explain-images", type=int, default=None, help="images per CAM method")
    p.add_argument("--scorecam-images", type=int, default=None, help="images for Score-CAM")
    p.add_argument(
        "--scorecam-layer", choices=("early", "middle", "deep"), default=None, help="layer"
    )
    p.add_argument("--batches", type=_ints, default=None, help="CUDA inference batches")
    p.add_argument("--cpu-batches", type=_ints, default=None, help="CPU inference batches")
    p.add_argument("--cpu-compile", action="store_true", help="also time torch.compile on CPU")
    p.add_argument("--jpeg-size", type=_size, default=None, help="source JPEG WxH (600x450)")
    p.add_argument("--heatmap-tolerance", type=float, default=1e-3, help="equal-map tolerance")
    p.add_argument("--pipeline-cores", type=int, default=None, help="pin the pipeline to N cores")
    p.add_argument("--params", type=Path, default=REPO / "params.yaml", help="params file")
    p.add_argument("--quick", action="store_true", help="tiny configuration (smoke test)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="JSON folder")
    p.add_argument("--fresh", action="store_true", help="do not keep parts from an older JSON")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    return p


def resolve(args: argparse.Namespace, workdir: Path) -> Settings:
    """Fill every unset knob from the machine's defaults (see the module docstring)."""
    cuda = torch.cuda.is_available()
    if args.quick:
        d = {
            "arch": "resnet18",
            "size": 64,
            "batch": 8,
            "steps": 2,
            "warmup_steps": 1,
            "repeats": 2,
            "budget_s": 5.0,
            "explain_images": 8,
            "scorecam_images": 1,
            "scorecam_layer": "early",
            "cuda_batches": (1, 8, 32),
            "cpu_batches": (1, 8),
            "jpeg_size": (96, 96),
        }
    else:
        d = {
            "arch": "resnet50",
            "size": 224,
            "batch": 64,
            "steps": 20 if cuda else 1,
            "warmup_steps": 5 if cuda else 1,
            "repeats": 5 if cuda else 3,
            "budget_s": 60.0,
            "explain_images": 256 if cuda else 16,
            "scorecam_images": 8 if cuda else 1,
            "scorecam_layer": "deep" if cuda else "early",
            "cuda_batches": (1, 32, 256),
            "cpu_batches": (1, 32),
            "jpeg_size": (600, 450),
        }
    given = {
        "arch": args.arch,
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "budget_s": args.budget,
        "explain_images": args.explain_images,
        "scorecam_images": args.scorecam_images,
        "scorecam_layer": args.scorecam_layer,
        "cuda_batches": args.batches,
        "cpu_batches": args.cpu_batches,
        "jpeg_size": args.jpeg_size,
    }
    d.update({k: v for k, v in given.items() if v is not None})
    threads = args.threads or len(os.sched_getaffinity(0))
    return Settings(
        threads=threads,
        device="cuda" if cuda else "cpu",
        quick=args.quick,
        cpu_compile=args.cpu_compile,
        heatmap_tolerance=args.heatmap_tolerance,
        pipeline_cores=args.pipeline_cores,
        params=args.params.resolve(),
        workdir=workdir,
        **d,
    )


def selected_parts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    if args.all:
        return list(PARTS)
    if not args.only:
        return list(DEFAULT_PARTS)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    return [n for n in PARTS if n in names]


def run_part(name: str, settings: Settings, workload_fn) -> Part:
    """One part, timed; an exception becomes the part's status instead of ending the run."""
    part = Part(name)
    probe_s = 0.05 if settings.quick else SPEED_PROBE_S
    before = reference_speed(probe_s)
    load = CpuLoad()
    start = time.perf_counter()
    try:
        if name == "training":
            from bench import training

            training.run(settings, workload_fn(), part)
        elif name == "data":
            from bench import data

            data.run(settings, workload_fn(), part)
        elif name == "explain":
            from bench import explain

            explain.run(settings, workload_fn(), part)
        elif name == "inference":
            from bench import inference

            inference.run(settings, part)
        elif name == "ddp":
            from bench import ddp

            ddp.run(settings, part)
        else:
            from bench import pipeline

            pipeline.run(settings, part)
    except Exception as err:  # noqa: BLE001 - one part's failure must not lose the others
        part.status = f"error: {type(err).__name__}: {err}"
        part.notes.append(traceback.format_exc()[-4000:])
    part.seconds = time.perf_counter() - start
    part.config["machine_load"] = load.stop()
    after = reference_speed(probe_s)
    part.config["machine_speed"] = {"before_gflops": before, "after_gflops": after}
    drift = speed_drift_note(before, after)
    if drift:
        part.notes.append(drift)
    share = part.config["machine_load"].get("other_processes_cpu_share") or 0.0
    if share > BUSY_SHARE:
        part.notes.append(
            f"other processes used {share:.0%} of the machine's CPU while this part ran: its "
            "numbers are not those of an idle machine; run it again when the machine is quiet"
        )
    return part


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts; returns 0, or 1 when a part failed (its error is in the JSON)."""
    from rich.console import Console

    parser = build_parser()
    args = parser.parse_args(argv)
    parts = selected_parts(args, parser)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: wide enough for the notes
        console = Console(width=max(console.width, 180))
    workdir = Path(tempfile.mkdtemp(prefix="dermaflow-bench-"))
    settings = resolve(args, workdir)
    torch.set_num_threads(settings.threads)
    command = command_line(argv)
    git = git_info()
    report = {
        "schema": SCHEMA,
        "command": command,
        "argv": sys.argv[:1] + (sys.argv[1:] if argv is None else list(argv)),
        "timestamp": now_utc(),
        "device": device_slug(),
        "settings": {**settings.as_dict(), "parts": parts, "torch": torch_settings()},
        "versions": versions(),
        "hardware": hardware(),
        "git": git,
        "parts": {},
    }
    workload = None

    def get_workload():
        nonlocal workload
        if workload is None:
            from bench.data import make_workload

            rows = max(
                settings.batch * max(settings.steps, settings.warmup_steps),
                settings.explain_images,
                0 if settings.quick else 256,  # enough images for a steady data-path rate
            )
            workload = make_workload(settings, rows, 8 if settings.quick else 16)
        return workload

    failed = False
    try:
        for name in parts:
            console.print(f"[bold]{name}[/] ...")
            part = run_part(name, settings, get_workload)
            failed |= part.status != "ok"
            report["parts"][name] = {
                **part.as_dict(),
                "command": command,
                "timestamp": now_utc(),
                "git_commit": git["commit"],
                "hardware": report["hardware"],  # a part carried into a later file keeps it
            }
            console.print(f"  {name}: {part.status} in {part.seconds:.1f} s")
    finally:
        if args.keep:
            console.print(f"scratch folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    suffix = "-quick" if settings.quick else ""
    path = args.out / f"{report['device']}{suffix}.json"
    report["settings"]["torch"] = torch_settings()
    written = write_report(path, report, merge=not args.fresh)
    render(written, console)
    console.print(f"JSON: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
