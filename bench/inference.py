"""Part 4: inference, the exported ONNX graph in onnxruntime against PyTorch.

The model is exported with the project's own :func:`tasks.export.export_onnx` (temperature and
softmax inside the graph) and run through :func:`tasks.export.ort_session` and the export
stage's runner (:func:`tasks.export._ort_runner`: plain ``session.run`` on the CPU, IOBinding
with the input already on the GPU and outputs left there on CUDA). PyTorch runs the very module
that was exported (:class:`tasks.export.CalibratedClassifier`) in eval mode under
``inference_mode``, eager and, on CUDA, ``torch.compile``d.

All runtimes get the same float32 input already where they compute (host memory for the CPU,
device memory for CUDA), so the numbers compare the graphs, not the copies. The ONNX graph is
float32, so PyTorch runs float32 too (TF32 settings as PyTorch's defaults, recorded). Where
onnxruntime loses, one profiled run of each runtime at that batch gives the share of time per
operator type, which is what bounds it.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import NO_CUDA, Part, Settings, Target, judge, measure_many
from bench.data import CLASSES


def _top_ops(shares: dict[str, float], k: int = 3) -> str:
    total = sum(shares.values()) or 1.0
    top = sorted(shares.items(), key=lambda kv: -kv[1])[:k]
    return ", ".join(f"{name} {value / total:.0%}" for name, value in top)


def ort_op_shares(path: Path, x: np.ndarray, provider: str, threads: int) -> dict[str, float]:
    """Microseconds per ONNX operator type over one profiled run (after one warm-up)."""
    import onnxruntime as ort

    from tasks.export import INPUT_NAME, OUTPUT_NAMES, PROVIDERS

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    providers = (
        [PROVIDERS[provider], PROVIDERS["cpu"]] if provider == "cuda" else ["CPUExecutionProvider"]
    )
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    trace = Path(session.end_profiling())
    shares: Counter[str] = Counter()
    try:
        events = json.loads(trace.read_text())
        runs = [e for e in events if e.get("name") == "model_run"]
        last_start = runs[-1]["ts"] if runs else 0
        for e in events:
            if (
                e.get("cat") == "Node"
                and e.get("ts", 0) >= last_start
                and e["name"].endswith("_kernel_time")
            ):
                shares[e.get("args", {}).get("op_name", "?")] += float(e.get("dur", 0))
    finally:
        trace.unlink(missing_ok=True)
    return dict(shares)


def torch_op_shares(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Self time (microseconds) per aten operator over one profiled run."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if x.is_cuda:
        activities.append(ProfilerActivity.CUDA)
    with torch.inference_mode():
        model(x)
        with profile(activities=activities) as prof:
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        if x.is_cuda:  # the name changed from self_cuda_time_total in torch 2.4
            t = getattr(event, "self_device_time_total", None)
            t = t if t is not None else getattr(event, "self_cuda_time_total", 0)
        else:
            t = event.self_cpu_time_total
        if t > 0:
            shares[event.key] = float(t)
    return shares


def _add_pair(
    part: Part,
    prefix: str,
    b: int,
    rates: dict[str, float],
    timings: dict[str, Any],
    names: dict[str, str],
) -> None:
    base = f"{prefix}_torch_eager_b{b}_images_per_s"
    for runtime in sorted(rates, key=("ort", "torch_eager", "torch_compile").index):
        rate = rates[runtime]
        name = f"{prefix}_{runtime}_b{b}_images_per_s"
        ref = None if name == base else base
        part.add(
            name,
            rate,
            "images/s",
            reference=ref,
            ratio=None if ref is None else rate / rates["torch_eager"],
            timing=timings[runtime],
            note=f"{names[runtime]}, batch {b}, median latency "
            f"{timings[runtime].median_s * 1000:.4g} ms",
        )


def run(settings: Settings, part: Part) -> None:
    """Part 4: onnxruntime (CPU; CUDA with IOBinding) vs PyTorch eager / compiled."""
    import onnxruntime as ort

    from bench.explain import settle_batchnorm
    from tasks.config import load_params
    from tasks.export import (
        INPUT_NAME,
        CalibratedClassifier,
        _cuda_present,
        _ort_runner,
        export_onnx,
        ort_session,
    )
    from tasks.models import build_model
    from tasks.train import MEAN, STD

    size, arch = settings.size, settings.arch
    opset = load_params(settings.params).export.opset
    torch.manual_seed(0)
    model = build_model(arch, len(CLASSES), "none", None, 0.2)
    settle_batchnorm(model, torch.randn(16, 3, size, size), 16)
    meta = {
        "arch": arch,
        "classes": list(CLASSES),
        "input_size": size,
        "normalization": {"mean": list(MEAN), "std": list(STD)},
        "data_version": "bench",
    }
    path = settings.workdir / "model.onnx"
    start = time.perf_counter()
    export_onnx(model, meta, path, opset, temperature=1.0)
    export_s = time.perf_counter() - start
    wrapped = CalibratedClassifier(model, 1.0).eval()
    part.config.update(
        {
            "arch": arch,
            "size": size,
            "opset": opset,
            "export_seconds": round(export_s, 2),
            "onnx_mib": round(path.stat().st_size / 2**20, 1),
            "precision": "float32 (the exported graph is float32)",
            "cpu_batches": list(settings.cpu_batches),
            "cuda_batches": list(settings.cuda_batches),
            "threads": settings.threads,
            "onnxruntime": ort.__version__,
        }
    )
    kw = {"warmup": 1, "repeats": settings.repeats, "budget_s": settings.budget_s}
    rng = np.random.default_rng(0)

    # ---- CPU: onnxruntime CPU vs PyTorch CPU (eager; compiled on request) ----
    session, used = ort_session(path, "cpu", threads=settings.threads)
    part.config["cpu_provider"] = used
    compiled_cpu = None
    if settings.cpu_compile:
        compiled_cpu = torch.compile(wrapped)
    for b in settings.cpu_batches:
        x = rng.standard_normal((b, 3, size, size), dtype=np.float32)
        xt = torch.from_numpy(x)

        def eager(xt: torch.Tensor = xt) -> None:
            with torch.inference_mode():
                wrapped(xt)

        fns = {"ort": _ort_runner(session, x), "torch_eager": eager}
        names = {"ort": "onnxruntime CPU", "torch_eager": "PyTorch eager CPU"}
        if compiled_cpu is not None:
            start = time.perf_counter()
            with torch.inference_mode():
                compiled_cpu(xt)
            part.config[f"cpu_compile_seconds_b{b}"] = round(time.perf_counter() - start, 1)

            def comp(xt: torch.Tensor = xt) -> None:
                with torch.inference_mode():
                    compiled_cpu(xt)

            fns["torch_compile"] = comp
            names["torch_compile"] = "torch.compile CPU"
        timings = measure_many(fns, "cpu", **kw)
        rates = {k: b / t.median_s for k, t in timings.items()}
        _add_pair(part, "cpu", b, rates, timings, names)
        probs_o = session.run(["probabilities"], {INPUT_NAME: x})[0]
        with torch.inference_mode():
            probs_t = wrapped(xt)[1].numpy()
        part.add(
            f"cpu_b{b}_max_abs_diff",
            float(np.abs(probs_o - probs_t).max()),
            "",
            note="max |p_onnxruntime - p_torch| on this batch",
        )
        speedup = rates["ort"] / rates["torch_eager"]
        v = judge(speedup, 1.0, ">", scope="cpu", on_cuda=settings.on_cuda)
        bound = ""
        if v != "PASS":
            o = ort_op_shares(path, x, "cpu", settings.threads)
            t = torch_op_shares(wrapped, xt)
            bound = (
                f"latency ort {timings['ort'].median_s * 1000:.4g} ms vs torch "
                f"{timings['torch_eager'].median_s * 1000:.4g} ms; ort time by op: {_top_ops(o)}; "
                f"torch: {_top_ops(t)}"
            )
        part.targets.append(
            Target(
                f"ort_cpu_vs_torch_cpu_b{b}",
                f"onnxruntime CPU faster than PyTorch CPU at batch {b}",
                speedup,
                1.0,
                ">",
                "x",
                "cpu",
                v,
                bound,
            )
        )
    if compiled_cpu is None:
        part.skip(
            "cpu_torch_compile",
            "images/s",
            "skipped: off on the CPU (--cpu-compile)",
            note="inductor's C++ compile of the model takes minutes on two cores",
        )

    # ---- CUDA: onnxruntime CUDA (IOBinding) vs PyTorch eager vs torch.compile ----
    if not settings.on_cuda:
        for b in settings.cuda_batches:
            for runtime in ("ort", "torch_eager", "torch_compile"):
                part.skip(f"cuda_{runtime}_b{b}_images_per_s", "images/s", NO_CUDA)
            verdict = judge(None, 1.0, scope="gpu", on_cuda=False, missing=NO_CUDA)
            part.targets.append(_cuda_target(b, None, verdict))
        return
    device = torch.device("cuda")
    on_gpu = copy.deepcopy(wrapped).to(device).eval()
    # Without onnxruntime's CUDA provider (a CPU-only onnxruntime build) the PyTorch rows are
    # still timed; only the onnxruntime rows and the target they feed are skipped.
    session_cuda, ort_failed = None, "skipped: no onnxruntime CUDA provider in this install"
    if _cuda_present():
        try:
            session_cuda, part.config["cuda_provider"] = ort_session(path, "cuda")
        except RuntimeError as err:  # the provider listed but not loadable (libraries missing)
            ort_failed = f"skipped: onnxruntime CUDA unusable ({str(err)[:200]})"
    if session_cuda is None:
        part.notes.append(ort_failed)
    compiled = torch.compile(on_gpu)
    compile_failed = ""
    for b in settings.cuda_batches:
        x = rng.standard_normal((b, 3, size, size), dtype=np.float32)
        xt = torch.from_numpy(x).to(device)

        def eager_gpu(xt: torch.Tensor = xt) -> None:
            with torch.inference_mode():
                on_gpu(xt)

        def compiled_gpu(xt: torch.Tensor = xt) -> None:
            with torch.inference_mode():
                compiled(xt)

        fns = {"torch_eager": eager_gpu}
        names = {
            "ort": "onnxruntime CUDA, IOBinding",
            "torch_eager": "PyTorch eager CUDA",
            "torch_compile": "torch.compile CUDA",
        }
        if session_cuda is not None:
            fns["ort"] = _ort_runner(session_cuda, x)
        else:
            part.skip(f"cuda_ort_b{b}_images_per_s", "images/s", ort_failed)
        if not compile_failed:
            try:
                start = time.perf_counter()
                compiled_gpu()
                torch.cuda.synchronize()
                part.config[f"cuda_compile_seconds_b{b}"] = round(time.perf_counter() - start, 1)
                fns["torch_compile"] = compiled_gpu
            except Exception as err:  # noqa: BLE001 - inductor/triton failures are many types
                compile_failed = f"skipped: torch.compile failed ({type(err).__name__}: {err})"
                compile_failed = compile_failed[:300]
        if compile_failed:
            part.skip(f"cuda_torch_compile_b{b}_images_per_s", "images/s", compile_failed)
        timings = measure_many(fns, device, **kw)
        rates = {k: b / t.median_s for k, t in timings.items()}
        _add_pair(part, "cuda", b, rates, timings, names)
        if session_cuda is None:
            part.targets.append(_cuda_target(b, None, ort_failed))
            continue
        probs_o = session_cuda.run(["probabilities"], {INPUT_NAME: x})[0]
        with torch.inference_mode():
            probs_t = on_gpu(xt)[1].float().cpu().numpy()
        part.add(
            f"cuda_b{b}_max_abs_diff",
            float(np.abs(probs_o - probs_t).max()),
            "",
            note="max |p_onnxruntime - p_torch| on this batch (CUDA)",
        )
        speedup = rates["ort"] / rates["torch_eager"]
        v = judge(speedup, 1.0, scope="gpu", on_cuda=True)
        bound = ""
        if v != "PASS":
            o = ort_op_shares(path, x, "cuda", settings.threads)
            t = torch_op_shares(on_gpu, xt)
            bound = (
                f"latency ort {timings['ort'].median_s * 1000:.4g} ms vs eager "
                f"{timings['torch_eager'].median_s * 1000:.4g} ms; ort time by op: {_top_ops(o)}; "
                f"torch kernels: {_top_ops(t)}"
            )
        part.targets.append(_cuda_target(b, speedup, v, bound))


def _cuda_target(batch: int, measured: float | None, verdict: str, bound: str = "") -> Target:
    """The GPU inference target at one batch size (onnxruntime CUDA vs PyTorch eager)."""
    return Target(
        f"ort_cuda_vs_eager_b{batch}",
        f"onnxruntime CUDA (IOBinding) >= PyTorch eager at batch {batch} (GPU)",
        measured,
        1.0,
        ">=",
        "x",
        "gpu",
        verdict,
        bound,
    )
