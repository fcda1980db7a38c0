"""Forward passes sized to the device: how many images per pass, and a fast no-grad twin.

Explanations are mostly forward passes: Score-CAM scores every channel with one masked
forward, and deletion / insertion / ROAD score every perturbed copy of every image. How many
images to put in one pass is not a constant: on a GPU a bigger batch is nearly free until
memory runs out, while on a CPU a batch that no longer fits the caches is *slower* per image
(ResNet-50 at 224 px on two cores: 35 images/s at batch 16, 20 at batch 64). So the batch is

- **measured once** on the CPU: the candidates of :data:`CPU_CANDIDATES` are timed on the
  model itself, each on the same number of images, and the fastest per image wins (a few
  hundred forwards, cached per process);
- **derived from free memory** on CUDA: the peak memory of a one- and a two-image pass gives
  the cost per image, and the batch takes :data:`CUDA_MEMORY_SHARE` of what is free.

:func:`inference_twin` is the model the no-grad passes run on: a copy in eval mode with every
BatchNorm folded into the convolution before it (``torch.nn.utils.fusion``), each ReLU that a
max-pool follows moved after the pool (the same values, a quarter of the work) and the weights
in channels-last layout, which the oneDNN and cuDNN convolutions prefer. Its logits equal the
model's to float32 rounding (about 1e-7), and the gradient-based methods keep using the
original model, whose hooks they need.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Batches timed on the CPU, smallest first.
CPU_CANDIDATES: tuple[int, ...] = (8, 16, 32, 64)
#: Images each CPU candidate runs per round (so every candidate is timed on the same work).
CPU_PROBE_IMAGES = 64
#: A first round longer than this (seconds) is not repeated (big models at big inputs).
CPU_PROBE_SECONDS = 10.0
#: Candidates within this share of the fastest time per image count as tied.
CPU_TIE = 0.03
#: Timing runs only for work at least this many times the images it would time: the candidates
#: differ by about 30 % per image, so a probe on less work costs more than it can save.
CPU_PROBE_PAYOFF = 4
#: The batch for CPU work too small to be worth timing (within 15 % of the fastest candidate
#: in every measurement so far: ResNet-50 at 224 px, the custom CNN at 64 px, either pass).
CPU_UNTIMED = 16
#: Share of the free CUDA memory one batch may take (the rest: hooks, copies, other work).
CUDA_MEMORY_SHARE = 0.5
#: Never more images per pass than this (beyond it no device gets faster).
MAX_BATCH = 1024

_SIZES: dict[tuple, int] = {}  # CUDA: the batch per question
_TIMES: dict[tuple, dict[int, float]] = {}  # CPU: seconds per image per candidate batch
_TWINS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a parameter-free model)."""
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX tiles).

    Only then does bf16 autocast pay on the CPU: a training step of the default model at 64 px
    took 0.31 s against 0.54 s in float32 on a Zen 4 core pair, while with oneDNN held to
    AVX512-core (bf16 emulated) it took 1.15 s and to AVX2 7.1 s, 2x and 11x slower than float32.
    torch exposes the CPUID bits only as private helpers, hence the guarded lookup; the answer
    is cached, since every training step's autocast asks.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


#: The autocast settings (``train.amp``, ``explain.score_amp``) :func:`autocast_dtype` knows.
AMP_MODES: tuple[str, ...] = ("none", "bf16", "fp16")


def autocast_dtype(
    device: torch.device, amp: str, native_bf16: bool | None = None
) -> torch.dtype | None:
    """The dtype passes with the setting ``amp`` autocast to on ``device``, or None for float32.

    One rule for the two settings that use it, ``train.amp`` (the training steps) and
    ``explain.score_amp`` (the faithfulness scores' forward passes). CUDA honours ``bf16`` and
    ``fp16``. The CPU honours ``bf16`` only where the CPU has bf16 instructions
    (``native_bf16``, probed when None) and runs float32 elsewhere; CPU fp16 has no fast
    kernels, so it always runs float32. Passes stay deterministic either way, so a resumed CPU
    run still equals an uninterrupted one on the same machine. Heatmaps, evaluation and export
    always run float32.

    Raises:
        ValueError: ``amp`` is not one of :data:`AMP_MODES` (a typo would otherwise run
            float32 without a word).
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if device.type == "cuda" and amp in {"bf16", "fp16"}:
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cpu" and amp == "bf16":
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        return torch.bfloat16 if native else None
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """How passes autocast to ``dtype`` are named in logs and reports."""
    return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(dtype, "float32")


def autocast_to(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; a no-op context for None (float32)."""
    return torch.autocast(
        device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
    )


def autocast(device: torch.device, amp: str):
    """Autocast to :func:`autocast_dtype`'s choice; a no-op context for float32."""
    return autocast_to(device, autocast_dtype(device, amp))


def model_key(model: nn.Module) -> tuple:
    """What names ``model`` in a batch-size question: its class and parameter count.

    An ``ImageOnly`` view sizes like the model it wraps. Callers key forward passes on the
    inference twin (BatchNorm folded, so fewer parameters than the model): Score-CAM, LIME and
    the perturbation scores ask the same question and share one measurement.
    """
    inner = getattr(model, "model", model)
    return type(inner).__name__, sum(p.numel() for p in model.parameters())


def inference_twin(model: nn.Module) -> nn.Module:
    """A faster copy of ``model`` for no-grad forward passes (the module docstring says how).

    The copy shares no storage with ``model`` and carries none of its hooks (an explainer's
    recorder on the original must not see the twin's passes). It is made once per model and
    state: the cache is keyed by the model and the version counters of its parameters and
    buffers, so an optimiser step (or ``load_state_dict``) in between makes a fresh twin.
    """
    state = tuple(t._version for t in (*model.parameters(), *model.buffers()))
    state = (*state, str(device_of(model)))
    cached = _TWINS.get(model)
    if cached is not None and cached[0] == state:
        return cached[1]
    twin = copy.deepcopy(model).eval()
    for module in twin.modules():  # a copied CAM hook would record every masked pass
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks):
            hooks.clear()
    _fold_batchnorm(twin)
    _pool_before_relu(twin)
    for p in twin.parameters():
        p.requires_grad_(False)
    twin = twin.to(memory_format=torch.channels_last)
    _TWINS[model] = (state, twin)
    return twin


def _fold_batchnorm(module: nn.Module) -> None:
    """Fold each BatchNorm into the convolution right before it in a ``Sequential``, in place.

    torch's own ``fuse_conv_bn_eval`` does the arithmetic. The pairs are found by walking the
    ``Sequential`` containers rather than by tracing with ``torch.fx``: fx tracing patches
    ``nn.Module.__call__`` for every thread while it runs, and explain-batch explains chunks in
    concurrent threads. A BatchNorm elsewhere (a ResNet block's ``bn1`` attribute, a
    pre-activation DenseNet layer) stays as it is.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for seq, first, second in _neighbours(module):
        conv, norm = seq._modules[first], seq._modules[second]
        if (
            isinstance(conv, nn.Conv2d)
            and isinstance(norm, nn.BatchNorm2d)
            and norm.track_running_stats
            and norm.running_mean is not None
        ):
            seq._modules[first] = fuse_conv_bn_eval(conv, norm)
            seq._modules[second] = nn.Identity()


def _pool_before_relu(module: nn.Module) -> None:
    """Swap each ReLU that a max-pool follows in a ``Sequential`` for pool-then-ReLU, in place.

    ReLU is monotone, so the largest of the rectified values is the rectified largest value:
    ``maxpool(relu(x)) == relu(maxpool(x))`` exactly, padding included (a max-pool pads with
    -inf, which never wins a window holding a real value) and NaN too (both orders keep it).
    After the swap the ReLU touches a quarter of the values (2x2 pools): the default's bf16
    scoring passes ran 12 % faster at 64 px (float32 passes: no measurable change). A pool
    that returns its indices is left alone, its indices would change.
    """
    for seq, first, second in _neighbours(module):
        relu, pool = seq._modules[first], seq._modules[second]
        if isinstance(relu, nn.ReLU) and isinstance(pool, nn.MaxPool2d) and not pool.return_indices:
            seq._modules[first], seq._modules[second] = pool, relu


def _neighbours(module: nn.Module) -> Iterator[tuple[nn.Sequential, str, str]]:
    """``(sequential, name, next name)`` for each two neighbouring children of every
    ``Sequential`` in ``module``, the innermost first. The names are read when a container is
    reached, so a rewrite may replace the modules of a pair it was handed (not add or remove
    any): a fold or a swap sees its neighbours' latest modules."""
    for child in module.children():
        yield from _neighbours(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names, names[1:], strict=False):
            yield module, first, second


def batch_size(
    fn: Callable[[torch.Tensor], object],
    sample: torch.Tensor,
    key: tuple,
    *,
    requested: int | None = None,
    work: int | None = None,
) -> int:
    """Images per pass of ``fn`` on inputs shaped like ``sample`` (``(1, C, H, W)``).

    Args:
        fn: the pass to size (e.g. a model's no-grad forward); called on random inputs.
        sample: one input, on the device the passes run on.
        key: what makes two calls the same question (model, input shape, kind of pass); the
            answer is cached for the process under ``key`` plus device and threads.
        requested: a fixed batch from the config; ``None`` or ``0`` means size it.
        work: how many inputs the caller will pass in all, when known. A batch never exceeds
            it; work that fits the smallest CPU candidate is one pass, and CPU work under
            :data:`CPU_PROBE_PAYOFF` times the probe's own images is not timed (the candidates
            timed so far decide, else :data:`CPU_UNTIMED`): a probe costs hundreds of passes of
            ``fn``, more than Grad-CAM on 23 images or Integrated Gradients on 552 path points.

    Returns:
        A batch in ``[1, MAX_BATCH]``.
    """
    if requested:
        return int(requested)
    if work is not None and work <= CPU_CANDIDATES[0]:
        return max(1, int(work))
    device = sample.device
    question = (*key, tuple(sample.shape[1:]), str(device), torch.get_num_threads())
    if device.type == "cuda":  # sized from free memory alone, whatever the work
        if question not in _SIZES:
            with torch.no_grad():
                _SIZES[question] = _from_free_memory(fn, sample)
            log.info("batch %d for %s on %s", _SIZES[question], key, device)
        return _SIZES[question] if work is None else max(1, min(_SIZES[question], int(work)))
    # On the CPU the work limits which candidates count; each is timed once per question, so a
    # second caller with more work times only the candidates the first one did not need.
    candidates = tuple(b for b in CPU_CANDIDATES if work is None or b <= work)
    if len(candidates) == 1:
        return candidates[0]
    times = _TIMES.setdefault(question, {})
    missing = tuple(b for b in candidates if b not in times)
    probe_images = 2 * CPU_PROBE_IMAGES * len(missing)  # two rounds of each missing candidate
    if missing and work is not None and work < CPU_PROBE_PAYOFF * probe_images:
        known = {b: times[b] for b in candidates if b in times}
        return _fastest(known) if known else max(b for b in candidates if b <= CPU_UNTIMED)
    if missing:
        with torch.no_grad():
            times.update(_per_image_seconds(fn, sample, missing))
        log.info("batch timings %s for %s on %s", times, key, device)
    return _fastest({b: times[b] for b in candidates})


def forward_batch(
    twin: nn.Module,
    images: torch.Tensor,
    requested: int = 0,
    work: int | None = None,
    dtype: torch.dtype | None = None,
) -> int:
    """Images per no-grad forward pass of an inference twin (the config's, else sized).

    The one forward question of the explanations: Score-CAM's masked inputs, LIME's samples
    and the perturbation scores all ask it of the same twin, so it is timed once per process
    and precision.

    Args:
        twin: an :func:`inference_twin` (channels-last weights).
        images: inputs shaped like the ones to pass, on the device the passes run on.
        requested: a fixed batch from the config; 0 sizes it.
        work: how many inputs will be passed in all; ``None`` when unbounded or unknown.
        dtype: the autocast dtype the passes will run in (None: float32). It is part of the
            question: bf16 passes of the default model at 64 px run 2.9x faster than float32
            at batch 16 and only 2.2x at batch 64, so each precision has its own best batch.
    """
    device = images.device

    def step(x: torch.Tensor) -> None:
        with autocast_to(device, dtype):
            twin(x.contiguous(memory_format=torch.channels_last))

    key = ("forward", *model_key(twin), *((str(dtype),) if dtype is not None else ()))
    return batch_size(step, images[:1], key, requested=requested, work=work)


def _batch_of(sample: torch.Tensor, n: int) -> torch.Tensor:
    generator = torch.Generator(device=sample.device).manual_seed(0)
    shape = (n, *sample.shape[1:])
    return torch.randn(shape, generator=generator, device=sample.device, dtype=sample.dtype)


def _per_image_seconds(
    fn: Callable[[torch.Tensor], object], sample: torch.Tensor, candidates: tuple[int, ...]
) -> dict[int, float]:
    """Seconds per image of each CPU candidate batch.

    Each candidate runs :data:`CPU_PROBE_IMAGES` images (several passes for a small batch),
    twice, interleaved, and keeps its best round: on a machine shared with other work a
    single pass per candidate is mostly noise. A second round is skipped when the first took
    longer than :data:`CPU_PROBE_SECONDS` (a big model at a big input).
    """
    fn(_batch_of(sample, candidates[0]))  # warm-up: allocator, oneDNN primitives
    inputs = {b: _batch_of(sample, b) for b in candidates}
    per_image = dict.fromkeys(candidates, math.inf)
    for round_ in range(2):
        started = time.perf_counter()
        for b in candidates:
            passes = max(1, CPU_PROBE_IMAGES // b)
            start = time.perf_counter()
            for _ in range(passes):
                fn(inputs[b])
            per_image[b] = min(per_image[b], (time.perf_counter() - start) / (passes * b))
        if round_ == 0 and time.perf_counter() - started > CPU_PROBE_SECONDS:
            break
    return per_image


def _fastest(per_image: dict[int, float]) -> int:
    """The candidate with the least time per image; within :data:`CPU_TIE` of it, the larger
    batch wins (fewer passes, less Python per image)."""
    fastest = min(per_image.values())
    return max(b for b, t in per_image.items() if t <= (1 + CPU_TIE) * fastest)


def _from_free_memory(fn: Callable[[torch.Tensor], object], sample: torch.Tensor) -> int:
    """``CUDA_MEMORY_SHARE`` of the free memory over the measured memory per image."""
    device = sample.device
    peaks = []
    for n in (1, 2):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(_batch_of(sample, n))
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_image = max(peaks[1] - peaks[0], peaks[0] // 2, 1)
    free, _total = torch.cuda.mem_get_info(device)
    fit = int(CUDA_MEMORY_SHARE * free // per_image)
    return max(1, min(MAX_BATCH, 2 ** int(math.log2(max(fit, 1)))))


def run_batched(
    model: nn.Module, x: torch.Tensor, batch: int, out: Callable[[torch.Tensor, slice], None]
) -> None:
    """``model`` over ``x`` in passes of ``batch`` rows (channels-last, no grad).

    ``out(logits, rows)`` receives each pass's logits and the rows of ``x`` they belong to,
    so callers reduce on the device (gather a target, a softmax) before anything moves.
    """
    with torch.no_grad():
        for start in range(0, len(x), batch):
            rows = slice(start, min(start + batch, len(x)))
            out(model(x[rows].contiguous(memory_format=torch.channels_last)), rows)
