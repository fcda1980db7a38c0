"""Part 3: explanations, the engine's batched CAMs against a full pass and the library.

Three comparisons, run side by side in one process, each with the heatmaps checked equal (max
absolute difference reported; the issue's bound is 1e-5):

- batched Grad-CAM and Grad-CAM++ through :func:`tasks.cams.explain_batch` (the engine's
  shared pass, batch sized to the device by :mod:`tasks.forward`) against the bare
  forward+backward rate of the same model at the same batch (what pytorch-grad-cam runs per
  call; the engine's backward stops at the explained layer, so it can run faster than this);
- the same maps from a per-image loop over pytorch-grad-cam (``with GradCAM(model=...,
  target_layers=[...]) as cam`` opened once, one image per call), the way the library's
  examples use it. On the CPU the target is what batching alone would give: bare
  forward+backward at the engine's batch over the same at batch 1;
- Score-CAM through ``explain_batch`` (:class:`tasks.cams.BatchedScoreCAM`: masked inputs in
  device-sized passes on the BatchNorm-folded, channels-last inference twin) against
  ``pytorch_grad_cam.ScoreCAM`` at its defaults, in seconds per image. Score-CAM scores every
  channel of the layer with one masked forward pass, so the bare forward rate gives its floor:
  ``channels / forward rate`` seconds per image.

The model is the architecture built by :func:`tasks.models.build_model`, random-init with its
BatchNorm statistics set from the images (a random-init network in eval mode otherwise gives
near-constant activations, and equal heatmaps would prove nothing). Images come from the
prepared cache, normalised as in training; each is explained for its predicted class, the
explain stage's default target.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from bench.common import Part, Settings, Target, Timing, judge, measure_many
from bench.data import Workload

#: Issue targets for the explanations on a GPU.
BATCHED_VS_LOOP_TARGET = 20.0
SCORECAM_SPEEDUP_TARGET = 5.0
#: On the CPU: Score-CAM at least as fast as the library's; batched Grad-CAM within this share
#: of the batching bound (bare forward+backward at the engine's batch / at batch 1).
SCORECAM_CPU_TARGET = 1.0
BOUND_SHARE = 0.95
#: Max |project - library| for two heatmaps to count as identical (values in [0, 1]); a
#: tighter ``--heatmap-tolerance`` wins.
EQUAL_MAPS = 1e-5


def settle_batchnorm(model: nn.Module, images: torch.Tensor, chunk: int) -> None:
    """Set every BatchNorm's running statistics to the mean over ``images``, then eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            model(images[start : start + chunk])
    for m in norms:
        m.momentum = 0.1
    model.eval()


def _channels(model: nn.Module, module: nn.Module, image: torch.Tensor) -> int:
    shapes: list[torch.Size] = []
    handle = module.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
    try:
        with torch.no_grad():
            model(image)
    finally:
        handle.remove()
    return int(shapes[0][1])


def run(settings: Settings, workload: Workload, part: Part) -> None:
    """Part 3: batched CAMs vs bare forward+backward vs a per-image library loop; Score-CAM.

    Every side runs in float32 without TF32 (:func:`tasks.cams.strict_float32`): on a GPU,
    TF32 convolutions pick batch-dependent algorithms, and the batched and per-image heatmaps
    then differ by 0.1 (0.138 for Grad-CAM on an H200), which would hide a real difference.
    """
    from tasks.cams import strict_float32

    with strict_float32():
        _run(settings, workload, part)


def _run(settings: Settings, workload: Workload, part: Part) -> None:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from tasks.cams import explain_batch, grad_batch
    from tasks.forward import forward_batch, inference_twin
    from tasks.models import build_model, target_layers
    from tasks.prepare import open_split
    from tasks.train import to_input

    device = torch.device(settings.device)
    split = open_split(workload.prepared, "train")
    n = min(settings.explain_images, len(split.labels))
    chunk = min(settings.batch, n)
    arch = settings.arch
    torch.manual_seed(0)
    model = build_model(arch, len(split.classes), "none", None, 0.2).to(device)
    images = to_input(torch.from_numpy(np.array(split.images[:n])), device)
    settle_batchnorm(model, images, chunk)
    with torch.no_grad():
        targets = torch.cat([model(images[s : s + chunk]) for s in range(0, n, chunk)]).argmax(1)
    targets = targets.tolist()
    deep = target_layers(model, arch)["deep"]
    engine_batch = grad_batch(model, images)  # sized to the device (timed once / free memory)
    tolerance = min(settings.heatmap_tolerance, EQUAL_MAPS)
    part.config.update(
        {
            "arch": arch,
            "size": settings.size,
            "images": n,
            "batch": engine_batch,
            "batch_source": "tasks.forward (measured once on the CPU, free memory on CUDA)",
            "layer": "deep",
            "device": device.type,
            "precision": "float32, TF32 off (tasks.cams.strict_float32)",
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "heatmap_tolerance": tolerance,
            "target_class": "predicted",
        }
    )
    kw = {"warmup": 1, "repeats": settings.repeats, "budget_s": settings.budget_s}
    on_cuda = device.type == "cuda"
    methods = (("gradcam", GradCAM, "Grad-CAM"), ("gradcampp", GradCAMPlusPlus, "Grad-CAM++"))
    maps: dict[str, np.ndarray] = {}

    def bare(batch: int) -> None:
        for s in range(0, n, batch):
            x = images[s : s + batch].detach().clone().requires_grad_(True)
            out = model(x)
            idx = torch.as_tensor(targets[s : s + batch], device=device)[:, None]
            out.gather(1, idx).sum().backward()
            model.zero_grad(set_to_none=True)

    def batched(method: str) -> None:
        maps[f"{method}_batched"] = explain_batch(model, arch, method, images, targets, "deep")

    def loop(method: str, cls: type) -> None:
        out = []
        with cls(model=model, target_layers=[deep]) as cam:
            for i in range(n):
                target = [ClassifierOutputTarget(targets[i])]
                out.append(cam(input_tensor=images[i : i + 1], targets=target))
        model.eval()  # the library switches to eval itself; keep it explicit
        maps[f"{method}_loop"] = np.concatenate(out)

    fns = {"bare": lambda: bare(engine_batch), "bare1": lambda: bare(1)}
    for method, cls, _ in methods:
        fns[f"{method}_batched"] = lambda method=method: batched(method)
        fns[f"{method}_loop"] = lambda method=method, cls=cls: loop(method, cls)
    timings = measure_many(fns, device, **kw)
    host = _host_share(model, images[:engine_batch], targets[:engine_batch], deep, methods, kw)
    r = {name: n / t.median_s for name, t in timings.items()}
    r_bare, r_bare1 = r["bare"], r["bare1"]
    batching_bound = r_bare / r_bare1
    part.add(
        "forward_backward_images_per_s",
        r_bare,
        "images/s",
        timing=timings["bare"],
        note=f"bare forward + backward of the target logits, batch {engine_batch} "
        "(what the library runs per call)",
    )
    part.add(
        "forward_backward_b1_images_per_s",
        r_bare1,
        "images/s",
        timing=timings["bare1"],
        note="the same at batch 1: what a per-image loop could reach at most",
    )
    part.add(
        "host_copy_ms_per_batch",
        1000.0 * host["copy"].median_s,
        "ms",
        timing=host["copy"],
        note=f"the deep layer's activations and gradients of {engine_batch} images to host "
        "NumPy arrays (a no-op on the CPU)",
    )
    for method, cls, label in methods:
        r_batched, r_loop = r[f"{method}_batched"], r[f"{method}_loop"]
        diff = float(np.abs(maps[f"{method}_batched"] - maps[f"{method}_loop"]).max())
        speedup = r_batched / r_loop
        part.add(
            f"{method}_batched_images_per_s",
            r_batched,
            "images/s",
            reference="forward_backward_images_per_s",
            ratio=r_batched / r_bare,
            timing=timings[f"{method}_batched"],
            note=f"tasks.cams.explain_batch, {label}, batch {engine_batch}",
        )
        part.add(
            f"{method}_loop_images_per_s",
            r_loop,
            "images/s",
            reference=f"{method}_batched_images_per_s",
            ratio=speedup,
            timing=timings[f"{method}_loop"],
            note=f"pytorch-grad-cam {cls.__name__}, one image per call; ratio = batched / loop",
        )
        part.add(
            f"{method}_max_abs_diff",
            diff,
            "",
            note="max |batched - per-image loop| over all heatmaps (values in [0, 1])",
        )
        per_batch_ms = 1000.0 * engine_batch / r_batched
        host_ms = 1000.0 * (host["copy"].median_s + host[method].median_s)
        part.add(
            f"{method}_host_ms_per_batch",
            1000.0 * host[method].median_s,
            "ms",
            timing=host[method],
            note=f"the library's NumPy get_cam_image + to_heatmaps for {engine_batch} images "
            "on the host, alone (the batched call's host work after the device's)",
        )
        equal = diff <= tolerance
        bound = (
            f"batched runs at {r_batched / r_bare:.0%} of the bare forward+backward at batch "
            f"{engine_batch} ({r_bare:.4g} img/s) and the loop at {r_loop / r_bare1:.0%} of the "
            f"batch-1 forward+backward ({r_bare1:.4g} img/s): batching alone gives "
            f"{batching_bound:.3g}x here (bare batch {engine_batch} / bare batch 1); of the "
            f"batched {per_batch_ms:.4g} ms per batch, {host_ms:.3g} ms are host work (copy of "
            f"the activations and gradients + NumPy / OpenCV maps)"
        )
        if not equal:
            bound = f"heatmaps differ (max {diff:.3g} > {tolerance:g}); " + bound
        measured = (speedup, equal)
        _target(
            part, f"{method}_batched_vs_loop", measured, BATCHED_VS_LOOP_TARGET, "gpu", on_cuda,
            f"batched {label} >= 20x a per-image pytorch-grad-cam loop, equal maps (GPU)", bound,
        )  # fmt: skip
        _target(
            part, f"{method}_batched_vs_loop_cpu", measured, BOUND_SHARE * batching_bound, "cpu",
            on_cuda, f"batched {label} vs the per-image loop at the batching bound (>= "
            f"{BOUND_SHARE:.0%} of bare batch {engine_batch} / bare batch 1), equal maps", bound,
        )  # fmt: skip

    # Score-CAM: the project's against pytorch-grad-cam's at its defaults.
    layer_name = settings.scorecam_layer
    module = target_layers(model, arch)[layer_name]
    m = min(settings.scorecam_images, n)
    channels = _channels(model, module, images[:1])
    twin = inference_twin(model)
    own_batch = forward_batch(twin, images, work=len(images))
    sc_out: dict[str, np.ndarray] = {}

    def project() -> None:
        sc_out["project"] = explain_batch(
            model, arch, "scorecam", images[:m], targets[:m], layer_name
        )

    def library() -> None:
        out = []
        with ScoreCAM(model=model, target_layers=[module]) as cam:
            for i in range(m):
                target = [ClassifierOutputTarget(targets[i])]
                out.append(cam(input_tensor=images[i : i + 1], targets=target))
        model.eval()
        sc_out["library"] = np.concatenate(out)

    # A Score-CAM call is long (one forward per channel): on the CPU the first call is timed.
    sc_timings = measure_many(
        {"project": project, "library": library}, device, **{**kw, "warmup": 1 if on_cuda else 0}
    )
    t_project, t_library = sc_timings["project"], sc_timings["library"]
    s_project, s_library = t_project.median_s / m, t_library.median_s / m
    sc_diff = float(np.abs(sc_out["project"] - sc_out["library"]).max())
    speedup = s_library / s_project

    sizes = sorted({own_batch, 64, 16})
    inputs = {b: torch.randn(b, 3, settings.size, settings.size, device=device) for b in sizes}

    def fwd(net: nn.Module, b: int) -> None:
        with torch.no_grad():
            net(
                inputs[b].contiguous(memory_format=torch.channels_last)
                if net is twin
                else inputs[b]
            )

    fwd_fns = {("eager", b): (lambda b=b: fwd(model, b)) for b in sizes}
    fwd_fns |= {("twin", b): (lambda b=b: fwd(twin, b)) for b in sizes}
    fwd_timings = measure_many(fwd_fns, device, **kw)
    forward_rates = {key: key[1] / t.median_s for key, t in fwd_timings.items()}
    for (net, b), rate in forward_rates.items():
        part.add(
            f"forward_{net}_b{b}_images_per_s",
            rate,
            "images/s",
            timing=fwd_timings[(net, b)],
            note="bare no-grad forward (Score-CAM's unit of work): "
            + ("the model as the library runs it" if net == "eager" else "the inference twin"),
        )
    best = max(forward_rates, key=forward_rates.get)
    floor = channels / forward_rates[best]
    part.config.update(
        {
            "scorecam_layer": layer_name,
            "scorecam_channels": channels,
            "scorecam_images": m,
            "scorecam_project_batch": own_batch,
            "scorecam_library_batch": 16,
        }
    )
    part.add(
        "scorecam_project_s_per_image",
        s_project,
        "s/image",
        reference="scorecam_library_s_per_image",
        ratio=speedup,
        timing=t_project,
        note=f"explain_batch('scorecam') at the {layer_name} layer ({channels} channels, "
        f"{own_batch} masked inputs per pass); ratio = library / project",
    )
    part.add(
        "scorecam_library_s_per_image",
        s_library,
        "s/image",
        timing=t_library,
        note="pytorch_grad_cam.ScoreCAM at its defaults (16 masked inputs per forward), one "
        "image per call",
    )
    part.add(
        "scorecam_forward_floor_s_per_image",
        floor,
        "s/image",
        reference="scorecam_project_s_per_image",
        ratio=floor / s_project,
        note=f"{channels} masked forwards at the best measured forward rate ({best[0]}, batch "
        f"{best[1]}): no Score-CAM that scores every channel that way is faster",
    )
    part.add(
        "scorecam_max_abs_diff",
        sc_diff,
        "",
        note="max |project - library| over the Score-CAM heatmaps",
    )
    sc_equal = sc_diff <= tolerance
    library_floor = channels / forward_rates[("eager", 16)]
    sc_bound = (
        f"Score-CAM is {channels} masked forwards per image: the library's eager forward at "
        f"batch 16 predicts {library_floor:.3g} s/image (measured {s_library:.3g}); the "
        f"project's twin at batch {own_batch} predicts "
        f"{channels / forward_rates[('twin', own_batch)]:.3g} s/image (measured "
        f"{s_project:.3g}); at the best rate ({floor:.3g} s/image, {best[0]} batch {best[1]}) "
        f"the speed-up over the library is at most {s_library / floor:.3g}x"
    )
    if not sc_equal:
        sc_bound = f"heatmaps differ (max {sc_diff:.3g} > {tolerance:g}); " + sc_bound
    device_word = "GPU" if on_cuda else "CPU"
    other = "CPU" if on_cuda else "GPU"
    gc = r["gradcam_batched"] / r["gradcam_loop"]
    part.notes.append(
        "issue 15 table (this run): "
        f"Score-CAM vs pytorch-grad-cam ({device_word}) {speedup:.2f}x "
        f"(target {'>= 5' if on_cuda else '>= 1.0'}x; bound {s_library / floor:.2f}x; "
        f"max |diff| {sc_diff:.1e}); batched Grad-CAM vs the per-image loop ({device_word}) "
        f"{gc:.2f}x (target {'>= 20x' if on_cuda else f'the {batching_bound:.2f}x bound'}; "
        f"max |diff| {float(np.abs(maps['gradcam_batched'] - maps['gradcam_loop']).max()):.1e}); "
        f"{other} rows: not measured in this run"
    )
    for target_id, threshold, scope, text in (
        ("scorecam_vs_library", SCORECAM_SPEEDUP_TARGET, "gpu", ">= 5x faster than"),
        ("scorecam_vs_library_cpu", SCORECAM_CPU_TARGET, "cpu", "at least as fast as"),
    ):
        _target(
            part, target_id, (speedup, sc_equal), threshold, scope, on_cuda,
            f"project Score-CAM {text} pytorch-grad-cam's ScoreCAM, equal maps ({scope})",
            sc_bound,
        )  # fmt: skip

    _road_infill(part, images.cpu(), maps["gradcam_batched"][: min(n, ROAD_IMAGES)], kw)


#: Images whose ROAD masks (4 percentiles, most and least relevant first) time the in-filling.
ROAD_IMAGES = 4


def _host_share(
    model: nn.Module,
    images: torch.Tensor,
    targets: list[int],
    layer: nn.Module,
    methods: tuple[tuple[str, type, str], ...],
    kw: dict,
) -> dict[str, Timing]:
    """The host half of a batched layer CAM, timed alone: what a faster device cannot shrink.

    One forward and the shortened backward record the layer's activations and gradients, as
    :func:`tasks.cams.layer_cams` does; then ``copy`` times moving them to NumPy, and each
    method its library ``get_cam_image`` plus :func:`tasks.cams.to_heatmaps` on those arrays.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from tasks.cams import Options, _cam_object, to_heatmaps
    from tasks.models import tapped

    x = images.detach().clone().requires_grad_(True)
    with tapped({"layer": layer}) as taps:
        out = model(x)
        index = torch.as_tensor(targets, device=x.device)[:, None]
        (grads,) = torch.autograd.grad(out.gather(1, index).sum(), [taps["layer"]])
        activations = taps["layer"].detach()
    arrays = (activations.cpu().numpy(), grads.cpu().numpy())
    chosen = [ClassifierOutputTarget(t) for t in targets]
    size = (x.shape[-2], x.shape[-1])

    def maps(cam: object) -> np.ndarray:
        return to_heatmaps(cam.get_cam_image(x.detach(), layer, chosen, *arrays, False), size)

    cams = {method: _cam_object(method, model, Options()) for method, _cls, _label in methods}
    fns: dict[str, object] = {"copy": lambda: (activations.cpu().numpy(), grads.cpu().numpy())}
    fns |= {method: functools.partial(maps, cam) for method, cam in cams.items()}
    return measure_many(fns, x.device, **kw)


def _road_infill(part: Part, images: torch.Tensor, heatmaps: np.ndarray, kw: dict) -> None:
    """ROAD's in-filling: the library's ``NoisyLinearImputer`` against the project's solves.

    The masks are the library's own (``RemoveMostRelevantFirst`` / ``RemoveLeastRelevantFirst``
    at 20, 40, 60, 80 % of the Grad-CAM maps above), the systems the same; the project solves
    them either as banded Cholesky systems one after another or with the library's sparse
    solve in a thread pool (:class:`tasks.xai_metrics.FastNoisyLinearImputer` picks by threads
    and width). All three in-fills are compared: ms per system and max |difference|.
    """
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    from tasks.xai_metrics import FastNoisyLinearImputer

    jobs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        jobs.append((img, mask))
        return img

    for remover in (RemoveLeastRelevantFirst, RemoveMostRelevantFirst):
        for percentile in (20, 40, 60, 80):
            for image, heatmap in zip(images, heatmaps, strict=False):
                remover(percentile, record)(image, torch.from_numpy(heatmap))
    fast = FastNoisyLinearImputer()
    threads = torch.get_num_threads()
    out: dict[str, list[torch.Tensor]] = {}

    def library() -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out["library"] = [NoisyLinearImputer()(img, mask) for img, mask in jobs]

    fns = {
        "library": library,
        "banded": lambda: out.__setitem__("banded", fast.impute_all(jobs, 0, workers=1)),
        "pool": lambda: out.__setitem__("pool", fast.impute_all(jobs, 0, workers=threads + 2)),
    }
    # workers=1 takes the banded solves up to BANDED_MAX_WIDTH; more threads than the banded
    # rule allows take the sparse pool (threads + 2 workers: the pool is capped by the jobs).
    timings = measure_many(fns, None, **{**kw, "warmup": 0})
    width = int(images.shape[-1])
    banded_used = width <= fast.BANDED_MAX_WIDTH
    per_system = {name: 1000 * t.median_s / len(jobs) for name, t in timings.items()}
    for name, note in (
        ("library", "pytorch_grad_cam NoisyLinearImputer, one system at a time (lil_matrix)"),
        ("banded", "banded Cholesky one after another" if banded_used
         else f"width {width} > {fast.BANDED_MAX_WIDTH}: sparse solves, one worker"),
        ("pool", f"the library's sparse solve in a thread pool ({threads} threads)"),
    ):  # fmt: skip
        diff = float(
            max((a - b).abs().max() for a, b in zip(out[name], out["library"], strict=True))
        )
        part.add(
            f"road_infill_{name}_ms_per_system",
            per_system[name],
            "ms",
            reference=None if name == "library" else "road_infill_library_ms_per_system",
            ratio=None if name == "library" else per_system["library"] / per_system[name],
            timing=timings[name],
            note=f"{note}; {len(jobs)} systems at {width} px; max |diff| vs library {diff:.1e}",
            max_abs_diff=diff,
            systems=len(jobs),
        )


def _target(
    part: Part,
    target_id: str,
    measured: tuple[float, bool],
    threshold: float,
    scope: str,
    on_cuda: bool,
    description: str,
    bound: str,
) -> None:
    """A ``>=`` target in ``x`` on ``(value, maps equal)``; unequal maps count as a miss.

    The part runs on the GPU when there is one, so its CPU targets do not apply there.
    """
    value, equal = measured
    na = "n/a: this part ran on CUDA" if scope == "cpu" and on_cuda else None
    verdict = judge(
        value if equal else None, threshold, scope=scope, on_cuda=on_cuda, not_applicable=na
    )
    if verdict.startswith("skipped"):
        verdict = "MISS"
    shown = bound if verdict != "PASS" else ""
    part.targets.append(
        Target(target_id, description, value, threshold, ">=", "x", scope, verdict, shown)
    )
