"""Export: the calibrated classifier as one self-describing ONNX file, proven equal to PyTorch.

The exported graph is the *calibrated* model: :class:`CalibratedClassifier` puts the
temperature and the softmax inside it, so every consumer of the file (the predict stage, a
serving runtime, a colleague with nothing but onnxruntime) gets the same calibrated
probabilities the evaluation reported, without re-implementing the calibration. Everything a
consumer needs to feed the graph (class order, input size, normalisation, resize mode) travels
in the file's ``metadata_props``, so the ``.onnx`` alone is enough to predict.

An export is only trusted after :func:`check_parity` has run onnxruntime and PyTorch on the same
images and found the probabilities equal within a tolerance; otherwise :class:`ParityError`
stops the stage. :func:`benchmark` measures what the export buys (latency, throughput) against
PyTorch eager. The functions here are pure: the CLI entry does the MLflow logging and the
registration.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from tasks import paths
from tasks.config import Params
from tasks.io import atomic_path, write_json
from tasks.models import eval_mode
from tasks.stage import console, main

INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "probabilities")
METADATA_FORMAT = "dermaflow.onnx"
METADATA_VERSION = 1
PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


class ParityError(RuntimeError):
    """onnxruntime and PyTorch disagree on the exported model beyond the tolerance."""


class CalibratedClassifier(nn.Module):
    """A classifier plus its calibration, as one module: ``x -> (logits, probabilities)``.

    Putting ``softmax(logits / T)`` inside the module (and therefore inside the exported graph)
    means the calibration cannot be forgotten or applied twice downstream. ``T`` is a buffer,
    so it is saved with the module and becomes a graph constant on export.

    Args:
        model: the trained classifier returning raw logits ``(N, K)``.
        temperature: a positive scalar (temperature scaling), or ``K`` positive values (one per
            class, vector scaling without bias), dividing the logits.
    """

    def __init__(self, model: nn.Module, temperature: float | Sequence[float] = 1.0) -> None:
        super().__init__()
        t = torch.as_tensor(temperature, dtype=torch.float32)
        if t.ndim > 1 or not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
            raise ValueError(f"temperature must be a positive scalar or vector, got {temperature}")
        self.model = model
        self.register_buffer("temperature", t)
        self.train(model.training)  # a fresh module is in train mode; keep the model's mode

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits / self.temperature, dim=-1)


# --------------------------------------------------------------------------------------------
# Export and metadata
# --------------------------------------------------------------------------------------------


def _side(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int | np.integer):
        return int(input_size), int(input_size)
    h, w = (int(s) for s in input_size)
    return h, w


def export_onnx(
    model: nn.Module,
    meta: Mapping[str, Any],
    path: str | os.PathLike[str],
    opset: int,
    temperature: float | Sequence[float],
    run_id: str | None = None,
    data_version: str | None = None,
    *,
    referral_threshold: float | None = None,
    resize: str = "center_crop",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``model`` with its calibration to ONNX, with the facts needed to use it.

    The graph takes ``input`` (N, 3, H, W) float32, already normalised, and returns ``logits``
    and ``probabilities`` (N, K); the batch axis is dynamic. The file is written to a temp path
    beside ``path``, checked with ``onnx.checker`` and only then renamed onto ``path``, so a
    failed export never leaves a file that looks valid.

    Every metadata value is JSON (``read_metadata`` parses them back): ``arch``, ``classes``,
    ``input_size``, ``normalization`` ({mean, std}), ``resize``, ``temperature``,
    ``data_version``, ``mlflow_run_id``, ``referral_threshold`` (when given), ``opset``,
    ``format``/``format_version``, the bundle's ``metadata_prior`` (when it has one: the graph
    stays image-only, and evaluate and predict add the prior's log-odds to its logits) and the
    ``extra`` keys.

    Args:
        model: the trained classifier (raw logits); exported in eval mode, its own mode is
            restored afterwards.
        meta: the bundle meta from :func:`tasks.models.load_bundle` (arch, classes, input_size,
            normalization, data_version).
        path: target ``.onnx`` file.
        opset: ONNX opset version (18 or later; the graph's own is what the metadata records).
        temperature: the fitted calibration temperature (scalar, or one per class).
        run_id: the MLflow run of this lineage, so a file found anywhere leads back to it.
        data_version: data lineage; defaults to ``meta["data_version"]``.
        referral_threshold: confidence below which a case should go to a clinician; stored so
            that predict needs only the model file.
        resize: how prepare made images square (``center_crop`` | ``squash``); predict must do
            the same, so it travels with the model.
        extra: further JSON-serialisable facts to store.

    Returns:
        The path of the written file.

    Raises:
        ValueError: a bad temperature or resize mode.
        onnx.checker.ValidationError: the exported graph is not valid ONNX.
    """
    if resize not in {"center_crop", "squash"}:
        raise ValueError(f"resize must be center_crop|squash, got {resize!r}")
    classes = [str(c) for c in meta["classes"]]
    h, w = _side(meta["input_size"])
    norm = meta["normalization"]
    wrapped = CalibratedClassifier(model, temperature)
    device = next(model.parameters()).device
    wrapped.to(device)
    dummy = torch.zeros(1, 3, h, w, device=device)
    props: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "format_version": METADATA_VERSION,
        "arch": meta.get("arch"),
        "classes": classes,
        "input_size": meta["input_size"],
        "normalization": {
            "mean": [float(m) for m in norm["mean"]],
            "std": [float(s) for s in norm["std"]],
        },
        "resize": resize,
        "temperature": float(temperature)
        if np.ndim(temperature) == 0
        else [float(t) for t in temperature],
        "data_version": data_version if data_version is not None else meta.get("data_version"),
        "mlflow_run_id": run_id,
        "opset": int(opset),
    }
    if referral_threshold is not None:
        props["referral_threshold"] = float(referral_threshold)
    trained = meta.get("extra") or {}  # preprocessing that predict must repeat, from the bundle
    props["color_constancy"] = trained.get("color_constancy", "none")
    props["tta"] = trained.get("tta", "none")  # already inside the graph (run wraps the model)
    if trained.get("metadata_prior"):  # added to the graph's logits by evaluate and predict
        props["metadata_prior"] = trained["metadata_prior"]
    props.update(extra or {})

    target = Path(path)
    with atomic_path(target) as tmp, eval_mode(wrapped):
        _export_graph(wrapped, dummy, tmp, opset)
        proto = onnx.load(str(tmp))
        props["opset"] = graph_opset(proto)  # what the graph declares
        onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in props.items()})
        proto.doc_string = f"dermaflow {props['arch']} classifier: {', '.join(classes)}"
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return target


def _export_graph(wrapped: nn.Module, example: torch.Tensor, out: Path, opset: int) -> None:
    """torch.onnx's dynamo exporter (``torch.export`` + onnxscript), the batch axis dynamic.

    The example batch has two images: ``torch.export`` specialises a dimension of size 0 or 1
    into a constant, which would pin the graph's batch to one. The weights stay inside the
    file (``external_data=False``): the file is written under a temp name and renamed, so a
    side file named after the temp name would be lost. The exporter's own progress lines
    (``[torch.onnx] Obtain model graph ...``) are kept off the stage's output.
    """
    example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's notes on the traced code, not ours
        torch.onnx.export(
            wrapped,
            (example,),
            str(out),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            optimize=True,
        )


def graph_opset(proto: onnx.ModelProto) -> int:
    """The default-domain (``ai.onnx``) opset a graph declares."""
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def graph_stats(path: str | os.PathLike[str]) -> dict[str, int]:
    """Opset, file size (bytes) and node count of an exported graph, for metrics/export.json."""
    proto = onnx.load(str(path), load_external_data=False)
    return {
        "onnx_opset": graph_opset(proto),
        "onnx_bytes": Path(path).stat().st_size,
        "onnx_nodes": len(proto.graph.node),
    }


def decode_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    """``metadata_props`` strings -> Python values (JSON where it parses, else the string)."""
    out: dict[str, Any] = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of an exported file, parsed back into Python types (weights not loaded)."""
    proto = onnx.load(str(path), load_external_data=False)
    return decode_metadata({p.key: p.value for p in proto.metadata_props})


# --------------------------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------------------------


def _cuda_present() -> bool:
    """Whether asking onnxruntime for CUDA can work here.

    onnxruntime-gpu lists ``CUDAExecutionProvider`` even on machines without a GPU and then
    logs an error while falling back; asking only when a CUDA device exists keeps ``auto``
    quiet on CPU machines.
    """
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def ort_session(
    path: str | os.PathLike[str], provider: str = "auto", threads: int | None = None
) -> tuple[ort.InferenceSession, str]:
    """Open an onnxruntime session on the best provider asked for.

    ``auto`` takes CUDA when a GPU and the CUDA provider are present, else the CPU; ``cuda``
    insists on CUDA. onnxruntime silently falls back to the CPU when a provider fails to load,
    so the provider reported is the one the session actually runs on
    (``session.get_providers()[0]``), never the one requested.

    Args:
        path: the ``.onnx`` file.
        provider: ``auto`` | ``cuda`` | ``cpu``.
        threads: intra-op threads (None: onnxruntime's default, one per physical core).

    Returns:
        ``(session, provider_used)``, e.g. ``"CPUExecutionProvider"``.

    Raises:
        ValueError: unknown provider.
        FileNotFoundError: no such file.
        RuntimeError: ``cuda`` was asked for but onnxruntime could not use it.
    """
    if provider not in {"auto", *PROVIDERS}:
        raise ValueError(f"export.provider must be auto|cuda|cpu, got {provider!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX model not found")
    want_cuda = provider == "cuda" or (provider == "auto" and _cuda_present())
    providers = [PROVIDERS["cuda"], PROVIDERS["cpu"]] if want_cuda else [PROVIDERS["cpu"]]
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    used = session.get_providers()[0]
    if provider == "cuda" and used != PROVIDERS["cuda"]:
        raise RuntimeError(
            f"{path}: export.provider is cuda but onnxruntime runs on {used} "
            f"(available: {ort.get_available_providers()}; CUDA device: "
            f"{torch.cuda.is_available()}). Use provider: auto or cpu on this machine."
        )
    return session, used


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC (the prepared cache) -> normalised float32 NCHW, as in training.

    Same operations in the same float32 order as :func:`tasks.train.to_input`, so the arrays are
    bit-identical to what the model saw during training and evaluation.
    """
    x = np.asarray(images, dtype=np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - m) / s)


def check_parity(
    session: ort.InferenceSession,
    wrapped_model: nn.Module,
    images: np.ndarray,
    tolerance: float,
    batch_size: int = 64,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    tie_margin: float = 1e-6,
) -> dict[str, Any]:
    """Run onnxruntime and PyTorch on the same images; fail unless they agree.

    Agreement means max |p_onnx - p_torch| <= ``tolerance`` over all images and classes, and
    the same predicted class for every image. The one exception is a numerical tie: an image
    whose top two PyTorch probabilities are within ``tie_margin`` of each other may flip
    between runtimes on float rounding alone, so it is counted (``argmax_ties``) but does not
    fail. The margin is absolute and tiny by default, so a real class swap always fails even
    when the probability tolerance is loose.

    Args:
        session: onnxruntime session of the exported file.
        wrapped_model: the :class:`CalibratedClassifier` that was exported (run in eval mode).
        images: either normalised float32 NCHW, or uint8 NHWC straight from the prepared
            cache (then ``mean`` and ``std`` are required and batches are normalised lazily,
            so a memory-mapped test split is never expanded to float at once).
        tolerance: max allowed absolute probability difference.
        batch_size: images per forward pass.
        mean: normalisation mean, for uint8 NHWC images.
        std: normalisation std, for uint8 NHWC images.
        tie_margin: top-2 probability gap below which an argmax flip is a tie.

    Returns:
        ``max_abs_diff``, ``mean_abs_diff``, ``max_abs_diff_logits``, ``argmax_equal``
        (strict), ``argmax_mismatches`` (real ones), ``argmax_ties``, ``n``, ``tolerance``.

    Raises:
        ParityError: beyond the tolerance or a real argmax difference; the message has the
            numbers and the first differing image indices.
        ValueError: no images, or uint8 images without mean/std.
    """
    n = len(images)
    if n == 0:
        raise ValueError("check_parity needs at least one image")
    raw = images.dtype == np.uint8
    if raw and (mean is None or std is None):
        raise ValueError("uint8 NHWC images need the normalisation mean and std")
    device = _device(wrapped_model)
    max_diff = max_logit_diff = total_diff = 0.0
    mismatches: list[int] = []
    ties: list[int] = []
    with eval_mode(wrapped_model), torch.inference_mode():
        for start in range(0, n, batch_size):
            chunk = np.asarray(images[start : start + batch_size])
            x = normalize(chunk, mean, std) if raw else np.ascontiguousarray(chunk, np.float32)
            logits_o, probs_o = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
            logits_t, probs_t = (
                t.float().cpu().numpy() for t in wrapped_model(torch.from_numpy(x).to(device))
            )
            diff = np.abs(probs_o - probs_t)
            max_diff = max(max_diff, float(diff.max()))
            total_diff += float(diff.sum())
            max_logit_diff = max(max_logit_diff, float(np.abs(logits_o - logits_t).max()))
            top2 = np.sort(probs_t, axis=1)[:, -2:] if probs_t.shape[1] > 1 else None
            for i in np.flatnonzero(probs_o.argmax(1) != probs_t.argmax(1)):
                tie = top2 is not None and top2[i, 1] - top2[i, 0] <= tie_margin
                (ties if tie else mismatches).append(start + int(i))
    result = {
        "max_abs_diff": max_diff,
        "mean_abs_diff": total_diff / (n * int(probs_t.shape[1])),
        "max_abs_diff_logits": max_logit_diff,
        "argmax_equal": not mismatches and not ties,
        "argmax_mismatches": len(mismatches),
        "argmax_ties": len(ties),
        "n": n,
        "tolerance": float(tolerance),
    }
    if max_diff > tolerance or mismatches:
        raise ParityError(
            f"ONNX parity failed on {n} images: max |p_onnx - p_torch| = {max_diff:.3g} "
            f"(tolerance {tolerance:g}), max logit difference {max_logit_diff:.3g}, predicted "
            f"class differs on {len(mismatches)} image(s)"
            + (f" (first indices {mismatches[:10]})" if mismatches else "")
            + ". The exported graph does not compute what the PyTorch model computes; do not "
            "ship it."
        )
    return result


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def _median_ms(run: Any, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def _ort_runner(session: ort.InferenceSession, x: np.ndarray) -> Any:
    """A no-argument callable running one batch; on CUDA through IOBinding.

    With CUDA, a plain ``session.run`` copies the input host->device and every output back
    inside the timed call; binding the input once on the device and the outputs to device
    memory measures the graph, as PyTorch's timing (input already on the GPU) does.
    """
    if session.get_providers()[0] != PROVIDERS["cuda"]:
        feed = {INPUT_NAME: x}
        return lambda: session.run(list(OUTPUT_NAMES), feed)
    binding = session.io_binding()
    binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for name in OUTPUT_NAMES:
        binding.bind_output(name, "cuda", 0)

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def benchmark(
    session: ort.InferenceSession,
    model: nn.Module,
    input_size: int | Sequence[int],
    batches: Sequence[int],
    repeats: int,
    device: str | torch.device = "cpu",
    warmup: int = 3,
) -> dict[str, float]:
    """Latency and throughput of onnxruntime vs PyTorch eager on random inputs.

    Each batch size is warmed up first (allocators, cuDNN autotuning, onnxruntime's first-run
    graph work), then timed ``repeats`` times one run at a time; the median is reported because
    a shared machine makes the mean chase outliers. PyTorch runs in eval mode under
    ``inference_mode`` on ``device`` (a copy of the model is moved there if needed, the caller's
    model stays put), with a CUDA synchronize inside each timed run.

    Args:
        session: onnxruntime session of the exported file.
        model: the PyTorch model to compare with (the :class:`CalibratedClassifier`).
        input_size: square side, or (height, width).
        batches: batch sizes, e.g. ``[1, 32]``.
        repeats: timed runs per batch size and runtime.
        device: PyTorch device (``cpu`` / ``cuda``).
        warmup: untimed runs before timing.

    Returns:
        Flat metrics: ``latency_ms_{ort,torch}_b{B}`` (median ms per batch),
        ``throughput_{ort,torch}_b{B}`` (images/s) and ``speedup_b{B}`` (torch / ort latency).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    h, w = _side(input_size)
    torch_model = model if _device(model) == device else copy.deepcopy(model).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    with eval_mode(torch_model), torch.inference_mode():
        for b in batches:
            x = rng.standard_normal((int(b), 3, h, w), dtype=np.float32)
            xt = torch.from_numpy(x).to(device)

            def torch_run(xt: torch.Tensor = xt) -> None:
                torch_model(xt)
                sync()

            ms = {
                "ort": _median_ms(_ort_runner(session, x), repeats, warmup),
                "torch": _median_ms(torch_run, repeats, warmup),
            }
            for runtime, value in ms.items():
                out[f"latency_ms_{runtime}_b{b}"] = round(value, 4)
                out[f"throughput_{runtime}_b{b}"] = round(b / (value / 1000.0), 2)
            out[f"speedup_b{b}"] = round(ms["torch"] / ms["ort"], 3)
    return out


def guard_metadata() -> dict[str, Any]:
    """The OOD guard and the conformal sets, as the ``ood`` / ``conformal`` metadata keys.

    Predict reads both from the file (threshold, class means and precision; the conformal
    quantile), so the ``.onnx`` alone can flag out-of-distribution images and build sets.
    """
    from tasks.conformal import read_sets
    from tasks.ood import read_guard

    return {"ood": read_guard().to_dict(), "conformal": read_sets().to_dict()}


def run(p: Params) -> dict:
    """The ``export`` stage: ONNX with calibration inside, parity, speed, registry alias."""
    from tasks import tracking
    from tasks.calibrate import read_calibrator
    from tasks.models import load_image_bundle, with_tta
    from tasks.prepare import open_split

    model, meta = load_image_bundle(paths.BUNDLE, "export")
    model = with_tta(model, (meta.get("extra") or {}).get("tta"))  # the evaluated model
    calibrator = read_calibrator()
    temperature = calibrator.temperature or 1.0
    if calibrator.method != "temperature":
        console.print(
            f"[yellow]export: calibrate.method={calibrator.method} cannot live in the graph; "
            "the ONNX model applies no calibration (T=1)[/]"
        )
    referral = json.loads((paths.METRICS / "calibrate.json").read_text())
    run_info = json.loads(tracking.RUN_FILE.read_text())
    export_onnx(
        model, meta, paths.ONNX_MODEL, p.export.opset, temperature, run_id=run_info["run_id"],
        data_version=meta.get("data_version"),
        referral_threshold=referral.get("referral_threshold"), resize=p.prepare.resize,
        extra=guard_metadata(),
    )  # fmt: skip
    session, provider = ort_session(paths.ONNX_MODEL, p.export.provider)
    images = open_split(paths.PREPARED, "test").images  # normalised batch by batch
    wrapped = CalibratedClassifier(model, temperature).eval()
    norm = meta["normalization"]
    parity = check_parity(
        session, wrapped, images, p.export.parity_tolerance, mean=norm["mean"], std=norm["std"]
    )
    device = "cuda" if provider.startswith("CUDA") else "cpu"
    speed = benchmark(
        session, wrapped, meta["input_size"], p.export.bench_batches, p.export.bench_repeats,
        device,
    )  # fmt: skip
    metrics = {
        "parity_max_abs_diff": float(parity["max_abs_diff"]),
        "parity_images": float(parity["n"]),
        **graph_stats(paths.ONNX_MODEL),
        **speed,
    }
    write_json(paths.METRICS / "export.json", {**metrics, "provider": provider})
    model_name = run_info["registered_model"]
    onnx_name = f"{model_name}-onnx"
    with tracking.resume_lineage_run():
        tracking.log_metrics(metrics)
        tracking.set_tags({"onnx_provider": provider})
        example = normalize(np.asarray(images[:2]), norm["mean"], norm["std"])
        version = tracking.log_onnx_model(paths.ONNX_MODEL, onnx_name, p.export.alias, example)
        pytorch_version = run_info.get("model_version")
        if pytorch_version:
            tracking.set_alias(model_name, p.export.alias, pytorch_version)
    registration = {
        "registered_model": onnx_name, "version": version, "alias": p.export.alias,
        "provider": provider,
    }  # fmt: skip
    write_json(paths.ONNX_REGISTRATION, registration)
    console.print(
        f"export: {paths.ONNX_MODEL} on {provider}; parity max |dp| "
        f"{parity['max_abs_diff']:.2e} over {parity['n']} images; registered "
        f"{onnx_name} v{version} @{p.export.alias}"
    )
    return {**metrics, **registration}


if __name__ == "__main__":
    raise SystemExit(main("export"))
