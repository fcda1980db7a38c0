"""One interface over every explanation method: CAMs per layer, exact CAM, input attributions.

Every method turns ``(model, images, class indices)`` into one heatmap per image, ``(N, H, W)``
float32 in ``[0, 1]`` at the input size, so the explain stage can compare, score and plot them
without knowing where each came from. :data:`METHODS` is the registry of names (the names
``explain.methods`` in params.yaml uses) and :func:`explain_batch` the single entry.

Three kinds of method:

- ``"cam"``: layer-wise class activation maps from pytorch-grad-cam (Grad-CAM, Grad-CAM++,
  XGrad-CAM, LayerCAM, Eigen-CAM, HiRes-CAM, Score-CAM), at the model's declared ``early``,
  ``middle`` and ``deep`` layers (:func:`tasks.models.target_layers`). The library's own
  objects hold the hooks and are used as context managers; gradient methods take a whole batch
  in one call.
- ``"exact_cam"``: the original CAM of Zhou et al. (2016), computed from the head weights at
  the ``deep`` layer. No library offers it, so it is written here; it is exact only where the
  head is global average pooling followed by one linear layer (:data:`EXACT_CAM_ARCHS`).
- ``"attribution"``: input-level attributions from Captum (Integrated Gradients, DeepLIFT,
  LIME), reduced to a heatmap per image.

All heatmaps get pytorch-grad-cam's post-processing (ReLU, per-image min-max, bilinear resize,
min-max again; :func:`to_heatmaps`), so "1" means "the most relevant pixel of this image" for
every method alike. Everything runs on the model's device; the post-processing is NumPy/OpenCV
on the CPU, as in pytorch-grad-cam. Models are explained in eval mode and float32; the training
flag is restored afterwards.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.fx
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr import DeepLift, IntegratedGradients, Lime
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from skimage.segmentation import slic
from torch import nn

from tasks.models import ARCHITECTURES, arch_spec, eval_mode, head_layer, target_layers

log = logging.getLogger(__name__)

LAYERS = ("early", "middle", "deep")

# The project's one normalisation (tasks.train.MEAN/STD, stored in every bundle); LIME needs it
# to undo normalisation before computing superpixels. Pass the bundle's values when they differ.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Kind = Literal["cam", "exact_cam", "attribution"]

#: Architectures whose head is global average pooling + one Linear (dropout aside), where
#: CAM is exact. custom_cnn (hidden FC 512->128), mobilenet_v3_large (hidden Linear+Hardswish)
#: and convnext_tiny (LayerNorm between pool and Linear) are not.
EXACT_CAM_ARCHS: tuple[str, ...] = tuple(n for n, s in ARCHITECTURES.items() if s.cam_exact)


@dataclass(frozen=True)
class MethodSpec:
    """What the explain stage needs to know about one method to schedule and budget it.

    Attributes:
        name: registry key (the name in ``explain.methods``).
        kind: ``"cam"`` (pytorch-grad-cam, at each layer), ``"exact_cam"`` (head weights,
            ``deep`` only) or ``"attribution"`` (Captum, input level, no layer).
        batchable: one call vectorises over the batch. False means the cost is per image
            (Score-CAM, LIME): :func:`explain_batch` still takes a batch but loops over it.
        expensive: cost grows with channels or samples per image (one forward pass per
            channel of the layer for Score-CAM, ``lime_samples`` passes for LIME); the stage
            spends ``scorecam_budget`` / ``lime_budget`` images on them.
        class_specific: the map depends on the target class (Eigen-CAM's does not).
        cam_class: the pytorch-grad-cam class for ``kind == "cam"``.
        archs: architectures the method supports (``None``: all).
        description: one line for reports and plot titles.
    """

    name: str
    kind: Kind
    batchable: bool
    expensive: bool
    class_specific: bool
    description: str
    cam_class: type[BaseCAM] | None = None
    archs: tuple[str, ...] | None = None


def _cam(name: str, cls: type[BaseCAM], description: str, **flags: bool) -> MethodSpec:
    return MethodSpec(
        name=name,
        kind="cam",
        batchable=flags.get("batchable", True),
        expensive=flags.get("expensive", False),
        class_specific=flags.get("class_specific", True),
        description=description,
        cam_class=cls,
    )


METHODS: dict[str, MethodSpec] = {
    "gradcam": _cam("gradcam", GradCAM, "Grad-CAM: channels weighted by mean gradient"),
    "gradcampp": _cam(
        "gradcampp", GradCAMPlusPlus, "Grad-CAM++: positive higher-order gradient weights"
    ),
    "xgradcam": _cam("xgradcam", XGradCAM, "XGrad-CAM: activation-normalised gradient weights"),
    "layercam": _cam("layercam", LayerCAM, "LayerCAM: per-location positive gradient weights"),
    "eigencam": _cam(
        "eigencam",
        EigenCAM,
        "Eigen-CAM: first principal component of the activations (class-agnostic)",
        class_specific=False,
    ),
    "hirescam": _cam("hirescam", HiResCAM, "HiRes-CAM: element-wise gradient x activation"),
    "scorecam": _cam(
        "scorecam",
        ScoreCAM,
        "Score-CAM: channels weighted by the score of the input masked with them",
        batchable=False,
        expensive=True,
    ),
    "cam": MethodSpec(
        name="cam",
        kind="exact_cam",
        batchable=True,
        expensive=False,
        class_specific=True,
        description="CAM (Zhou et al. 2016): deep features weighted by the head's weights",
        archs=EXACT_CAM_ARCHS,
    ),
    "ig": MethodSpec(
        name="ig",
        kind="attribution",
        batchable=True,
        expensive=False,
        class_specific=True,
        description="Integrated Gradients from the mean image, |attribution| summed over RGB",
    ),
    "deeplift": MethodSpec(
        name="deeplift",
        kind="attribution",
        batchable=True,
        expensive=False,
        class_specific=True,
        description="DeepLIFT (rescale rule) from the mean image, |attribution| summed over RGB",
    ),
    "lime": MethodSpec(
        name="lime",
        kind="attribution",
        batchable=False,
        expensive=True,
        class_specific=True,
        description="LIME on SLIC superpixels, positive surrogate weights",
    ),
}


def method_spec(method: str) -> MethodSpec:
    """The registry entry, or a ValueError listing the valid names (config typos land here)."""
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(
            f"unknown explanation method {method!r} (explain.methods); "
            f"choose from: {', '.join(METHODS)}"
        ) from None


def method_layers(
    methods: Sequence[str], layers: Sequence[str], arch: str | None = None
) -> list[tuple[str, str | None]]:
    """The ``(method, layer)`` pairs to compute, in config order.

    Layer-wise CAMs run at every configured layer; exact CAM is defined at the ``deep`` layer
    only, so it is scheduled there whatever ``layers`` says; attributions are input-level and
    run once with ``layer=None``.

    Args:
        methods: names from :data:`METHODS` (``explain.methods``).
        layers: a subset of ``early``, ``middle``, ``deep`` (``explain.layers``).
        arch: when given, methods that do not support it (exact CAM on an architecture
            without a GAP + Linear head) are left out and logged, instead of failing the
            stage later; without it every requested method is scheduled.

    Raises:
        ValueError: an unknown method or layer name, or a duplicate.
    """
    for name in layers:
        if name not in LAYERS:
            raise ValueError(f"unknown layer {name!r} (explain.layers); choose from {LAYERS}")
    for names, what in ((methods, "explain.methods"), (layers, "explain.layers")):
        dupes = sorted({n for n in names if list(names).count(n) > 1})
        if dupes:
            raise ValueError(f"{what} lists {dupes} more than once")
    pairs: list[tuple[str, str | None]] = []
    for method in methods:
        spec = method_spec(method)
        if arch is not None and spec.archs is not None and arch not in spec.archs:
            log.info("skipping %s: not supported for %s (supported: %s)", method, arch, spec.archs)
            continue
        if spec.kind == "cam":
            pairs.extend((method, layer) for layer in layers)
        elif spec.kind == "exact_cam":
            pairs.append((method, "deep"))
        else:
            pairs.append((method, None))
    return pairs


# --------------------------------------------------------------------------------------------
# The one entry
# --------------------------------------------------------------------------------------------


def explain_batch(
    model: nn.Module,
    arch: str,
    method: str,
    images: torch.Tensor,
    class_idx: Sequence[int],
    layer: str | None = None,
    *,
    ig_steps: int = 24,
    lime_samples: int = 150,
    seed: int = 0,
    batch_size: int = 16,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    lime_segments: int = 50,
    perturbation_batch: int = 64,
) -> np.ndarray:
    """Heatmaps of ``method`` for a batch: ``(N, H, W)`` float32 in ``[0, 1]``.

    Gradients are enabled inside, so calling this under ``torch.no_grad()`` still works; the
    model is put in eval mode and its training flag restored afterwards.

    Args:
        model: a model built by :func:`tasks.models.build_model` for ``arch`` (float32, on
            any device; the images are moved to it).
        arch: its architecture name (resolves the target layers and the head).
        method: a key of :data:`METHODS`.
        images: ``(N, 3, H, W)`` normalised float images.
        class_idx: the class each image is explained for (length ``N``).
        layer: ``early`` / ``middle`` / ``deep`` for layer-wise CAMs; exact CAM accepts
            ``None`` or ``deep``; attributions ignore it.
        ig_steps: Integrated Gradients path steps.
        lime_samples: perturbed samples per LIME explanation.
        seed: LIME's sampling seed (the same for every image, so an image's explanation does
            not depend on the batch it came in).
        batch_size: most images per forward/backward pass (CAM chunks, IG's
            ``internal_batch_size``, DeepLIFT chunks): it bounds memory.
        mean: normalisation mean of ``images`` (LIME's superpixels need the real colours).
        std: normalisation std of ``images``.
        lime_segments: SLIC superpixels asked for per image (LIME's interpretable features).
        perturbation_batch: masked inputs per forward pass for Score-CAM and LIME.

    Returns:
        One heatmap per image at the input resolution.

    Raises:
        ValueError: unknown method or layer, a class index out of range, a shape mismatch,
            or exact CAM on an architecture without an exact head.
    """
    spec = method_spec(method)
    images, targets = _check_inputs(model, arch, images, class_idx)
    if batch_size < 1 or perturbation_batch < 1:
        raise ValueError("batch_size and perturbation_batch must be >= 1")
    size = (images.shape[-2], images.shape[-1])
    if len(images) == 0:
        return np.zeros((0, *size), dtype=np.float32)
    if spec.kind == "cam":
        return grad_cam(
            model,
            arch,
            method,
            images,
            targets,
            _check_layer(layer, method),
            batch_size=batch_size,
            perturbation_batch=perturbation_batch,
        )
    if spec.kind == "exact_cam":
        if layer not in (None, "deep"):
            raise ValueError(f"{method} is defined at the deep layer only, got layer={layer!r}")
        return exact_cam(model, arch, images, targets)
    if method == "ig":
        attributions, _ = integrated_gradients(
            model, images, targets, steps=ig_steps, internal_batch_size=batch_size
        )
        return to_heatmaps(attributions.abs().sum(dim=1), size)
    if method == "deeplift":
        attributions, _ = deeplift(model, images, targets, batch_size=batch_size)
        return to_heatmaps(attributions.abs().sum(dim=1), size)
    attributions = lime(
        model,
        images,
        targets,
        samples=lime_samples,
        seed=seed,
        mean=mean,
        std=std,
        segments=lime_segments,
        perturbation_batch=perturbation_batch,
    )
    return to_heatmaps(attributions[:, 0].clamp(min=0), size)


def to_heatmaps(maps: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's post-processing, so every method's maps mean the same thing.

    It is exactly what ``BaseCAM`` does for one target layer: ReLU, per-image min-max with
    :func:`~pytorch_grad_cam.utils.image.scale_cam_image` while resizing bilinearly (OpenCV)
    to the input size, then ReLU and min-max again. An all-zero map stays all zero.

    Args:
        maps: ``(N, h, w)`` raw maps (any sign, any scale).
        size: ``(H, W)`` of the input.

    Returns:
        ``(N, H, W)`` float32 in ``[0, 1]``; non-finite values (a diverged model) become 0.
    """
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().float().cpu().numpy()
    maps = _finite(np.asarray(maps, dtype=np.float32))
    height, width = size
    scaled = scale_cam_image(np.maximum(maps, 0), (width, height))  # OpenCV takes (W, H)
    return np.clip(scale_cam_image(np.maximum(scaled, 0)), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Layer-wise CAMs (pytorch-grad-cam)
# --------------------------------------------------------------------------------------------


def grad_cam(
    model: nn.Module,
    arch: str,
    method: str,
    images: torch.Tensor,
    class_idx: Sequence[int],
    layer: str,
    *,
    batch_size: int = 16,
    perturbation_batch: int = 64,
) -> np.ndarray:
    """A pytorch-grad-cam method at one of the model's declared layers.

    The library object is opened once (it registers the hooks) and released on exit.
    Batchable methods get one call per chunk of ``batch_size`` images (no per-image loop);
    Score-CAM is called per image, because it builds ``channels x 3 x H x W`` masked copies of
    every image it is given, and scores them ``perturbation_batch`` at a time.

    The input is made to require grad so the hooked activations carry gradients even when
    the caller froze the parameters; otherwise pytorch-grad-cam would record no gradient.
    Activations are snapshotted (cloned) in the hook: pytorch-grad-cam keeps
    ``activation.cpu()``, which on the CPU is the live tensor, so an in-place op later in the
    forward (DenseNet's ``F.relu(..., inplace=True)`` after ``norm5``) would change what it
    sees, and the same model would give different maps on the CPU and on a GPU.

    Returns:
        ``(N, H, W)`` float32 heatmaps in ``[0, 1]``.
    """
    spec = method_spec(method)
    if spec.kind != "cam" or spec.cam_class is None:
        raise ValueError(f"{method} is not a pytorch-grad-cam method")
    images, targets = _check_inputs(model, arch, images, class_idx)
    module = target_layers(model, arch)[_check_layer(layer, method)]
    step = 1 if not spec.batchable else batch_size
    out: list[np.ndarray] = []
    with (
        _explaining(model),
        spec.cam_class(model=model, target_layers=[module], reshape_transform=_snapshot) as cam,
    ):
        if spec.expensive:
            cam.batch_size = perturbation_batch
        for start in range(0, len(images), step):
            chunk = images[start : start + step].detach().clone().requires_grad_(True)
            try:
                out.append(
                    cam(
                        input_tensor=chunk,
                        targets=[ClassifierOutputTarget(c) for c in targets[start : start + step]],
                    )
                )
            except IndexError as exc:
                # BaseCAM.__exit__ swallows IndexError (it prints and returns True): re-raise
                # as another type so a failure cannot pass silently as a missing result.
                raise RuntimeError(f"{method} failed at layer {layer}: {exc}") from exc
    return _finite(np.concatenate(out).astype(np.float32))


def _snapshot(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone()


# --------------------------------------------------------------------------------------------
# Exact CAM (Zhou et al. 2016)
# --------------------------------------------------------------------------------------------


def class_activation_maps(
    model: nn.Module, arch: str, images: torch.Tensor, class_idx: Sequence[int]
) -> torch.Tensor:
    """Raw CAMs ``sum_k w[c, k] * A_k`` at the deep layer, ``(N, h, w)``, before any ReLU.

    With a GAP + Linear head, ``logit_c = mean_ij(cam_c[i, j]) + b_c``: the map decomposes
    the logit over locations exactly, which is what makes this method faithful (and what the
    tests check). Features are read with a forward hook (cloned, since an in-place op after
    the layer, like DenseNet's ReLU, would otherwise change them under us); DenseNet's
    ``norm5`` then gets the ReLU its forward applies before pooling.

    Raises:
        ValueError: ``arch`` has no exact CAM (see :data:`EXACT_CAM_ARCHS`).
    """
    spec = arch_spec(arch)
    if hasattr(model, "fusion_head"):
        raise ValueError(
            "exact CAM ('cam') needs the logit to be a linear function of the deep layer's "
            "pooled maps; a metadata-fusion model adds a feature layer and the metadata branch "
            "in between. Use gradcam/hirescam for it"
        )
    if not spec.cam_exact:
        raise ValueError(
            f"exact CAM ('cam') needs a head that is global average pooling + one Linear; "
            f"{arch} has {_inexact_reason(arch)}, so sum_k w_ck A_k is not its logit. "
            f"Use gradcam/hirescam for {arch}, or one of: {', '.join(EXACT_CAM_ARCHS)}"
        )
    images, targets = _check_inputs(model, arch, images, class_idx)
    captured: list[torch.Tensor] = []
    layer = target_layers(model, arch)["deep"]
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
    try:
        with _explaining(model), torch.no_grad():
            model(images)
    finally:
        handle.remove()
    features = captured[0]
    if spec.deep_relu:
        features = torch.relu(features)
    weights = head_layer(model, arch).weight.detach()[torch.as_tensor(targets)]  # N x K
    return torch.einsum("nkhw,nk->nhw", features, weights.to(features))


def exact_cam(
    model: nn.Module, arch: str, images: torch.Tensor, class_idx: Sequence[int]
) -> np.ndarray:
    """CAM (Zhou et al. 2016) computed exactly from the head weights, ``(N, H, W)`` in [0, 1].

    Hand-written because no library computes CAM from the head weights: pytorch-grad-cam's
    ``GradCAM`` equals it only up to scale, and only for a GAP + Linear head. Here the map is
    :func:`class_activation_maps` with the same post-processing as pytorch-grad-cam
    (:func:`to_heatmaps`: ReLU, per-image min-max, bilinear upsampling), so the two are
    directly comparable; on a GAP + Linear head it coincides with Grad-CAM at the deep layer
    (Grad-CAM's weights are ``w[c, k] / (h * w)``).

    It needs no gradients and one forward pass. Only :data:`EXACT_CAM_ARCHS` support it: a
    hidden layer after the pool (custom_cnn's FC 512->128, MobileNetV3's Linear+Hardswish) or
    a LayerNorm (ConvNeXt) breaks the linear link between the maps and the logit.

    Raises:
        ValueError: ``arch`` has no exact CAM.
    """
    images = images if isinstance(images, torch.Tensor) else torch.as_tensor(images)
    cams = class_activation_maps(model, arch, images, class_idx)
    return to_heatmaps(cams, (images.shape[-2], images.shape[-1]))


def _inexact_reason(arch: str) -> str:
    reasons = {
        "custom_cnn": "a hidden FC 512->128 + ReLU between the pool and the last Linear",
        "mobilenet_v3_large": "a hidden Linear + Hardswish between the pool and the last Linear",
        "convnext_tiny": "a LayerNorm between the pool and the Linear",
    }
    return reasons.get(arch, "more than a linear map between the pooled features and the logits")


# --------------------------------------------------------------------------------------------
# Input attributions (Captum)
# --------------------------------------------------------------------------------------------


def integrated_gradients(
    model: nn.Module,
    images: torch.Tensor,
    class_idx: Sequence[int],
    *,
    steps: int = 24,
    internal_batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated Gradients of the target logits, from the mean image.

    The baseline is zero in normalised space, i.e. the dataset mean colour: a "no lesion"
    reference that lies inside the training distribution's colour range (black would be an
    extreme input). ``internal_batch_size`` bounds memory at ``N * steps`` path points.

    Returns:
        ``(attributions (N, 3, H, W), delta (N,))``: Captum's convergence delta, the gap in
        completeness ``sum(attr) - (f(x) - f(baseline))``; small when ``steps`` suffices.
    """
    images = _on_model(model, images)
    targets = [int(c) for c in class_idx]
    with _explaining(model):
        attributions, delta = IntegratedGradients(model).attribute(
            images,
            baselines=torch.zeros_like(images),
            target=targets,
            n_steps=steps,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
    return attributions.detach(), delta.detach()


def deeplift_ready(model: nn.Module) -> nn.Module:
    """A DeepLIFT-safe view of ``model``: every ReLU call is its own non-inplace module.

    Captum's DeepLIFT overrides gradients only of non-linear *modules*, and needs each to be
    called once per forward with distinct input and output tensors. torchvision breaks both:
    ReLUs are ``inplace=True``, ResNet blocks call one ``self.relu`` two or three times, and
    DenseNet applies a functional ``F.relu`` after ``norm5``. The model is traced with
    ``torch.fx`` and every ReLU call site (module or functional) is pointed at a fresh
    ``nn.ReLU()``; max-pool modules are de-duplicated the same way. The returned
    ``GraphModule`` shares parameters with ``model``, which is left untouched.

    Where tracing fails (a model with data-dependent control flow), it falls back to a deep
    copy with ``inplace=False`` on every ReLU module, which handles in-place but not reuse.
    """
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        log.warning("fx tracing failed (%s); DeepLIFT falls back to a non-inplace copy", exc)
        fallback = copy.deepcopy(model)
        for module in fallback.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
        return fallback
    relu_functions = {torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu_}
    for i, node in enumerate(list(traced.graph.nodes)):
        fresh: nn.Module | None = None
        if node.op == "call_module":
            original = traced.get_submodule(node.target)
            if isinstance(original, nn.ReLU):
                fresh = nn.ReLU()
            elif isinstance(original, nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d):
                fresh = copy.deepcopy(original)
        elif (node.op == "call_function" and node.target in relu_functions) or (
            node.op == "call_method" and node.target in ("relu", "relu_")
        ):
            fresh = nn.ReLU()
        if fresh is None:
            continue
        name = f"deeplift_{i}"
        traced.add_submodule(name, fresh)
        with traced.graph.inserting_after(node):
            replacement = traced.graph.call_module(name, args=(node.args[0],))
        node.replace_all_uses_with(replacement)
        traced.graph.erase_node(node)
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def deeplift(
    model: nn.Module,
    images: torch.Tensor,
    class_idx: Sequence[int],
    *,
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepLIFT (rescale rule) of the target logits, from the mean image (zero baseline).

    Runs on :func:`deeplift_ready`'s view of the model. Summation-to-delta is exact where all
    non-linearities are ReLU/max-pool modules (ResNet, DenseNet, custom CNN); SiLU, Hardswish
    and GELU (EfficientNet, MobileNetV3, ConvNeXt) get plain gradients, so there it is only
    approximate.

    Returns:
        ``(attributions (N, 3, H, W), delta (N,))``: delta is Captum's summation-to-delta gap.
    """
    images = _on_model(model, images)
    targets = [int(c) for c in class_idx]
    safe = deeplift_ready(model)
    explainer = DeepLift(safe)
    attributions, deltas = [], []
    with _explaining(model), _explaining(safe), warnings.catch_warnings():
        # Captum warns on every call that it sets hooks, and that the delta uses the model.
        warnings.filterwarnings("ignore", message=r"(?s).*Setting forward, backward hooks")
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size].clone().requires_grad_(True)
            attr, delta = explainer.attribute(
                chunk,
                baselines=torch.zeros_like(chunk),
                target=targets[start : start + batch_size],
                return_convergence_delta=True,
            )
            attributions.append(attr.detach())
            deltas.append(delta.detach())
    return torch.cat(attributions), torch.cat(deltas)


def superpixels(
    image: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    segments: int = 50,
) -> np.ndarray:
    """SLIC superpixel labels ``(H, W)``, ``0..K-1``, of one normalised ``(3, H, W)`` image.

    SLIC works in Lab colour, so the image is un-normalised to its real RGB first; superpixels
    of the normalised tensor would follow the normalisation's colour distortion. Where SLIC
    finds a single segment (a flat image, or pixel noise, whose fragments its connectivity
    step merges into one), a regular grid of about ``segments`` cells is used instead, so
    LIME still has features to switch off.
    """
    m = torch.as_tensor(mean, dtype=image.dtype, device=image.device)[:, None, None]
    s = torch.as_tensor(std, dtype=image.dtype, device=image.device)[:, None, None]
    rgb = (image.detach() * s + m).clamp(0, 1).permute(1, 2, 0).cpu().numpy().astype(np.float64)
    labels = slic(rgb, n_segments=segments, compactness=10.0, start_label=0, channel_axis=-1)
    if labels.max() == labels.min():
        height, width = labels.shape
        side = max(1, round(segments**0.5))
        rows = np.arange(height) * side // height
        cols = np.arange(width) * side // width
        labels = rows[:, None] * side + cols[None, :]
    return np.unique(labels, return_inverse=True)[1].reshape(labels.shape)


def lime(
    model: nn.Module,
    images: torch.Tensor,
    class_idx: Sequence[int],
    *,
    samples: int = 150,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    segments: int = 50,
    perturbation_batch: int = 64,
) -> torch.Tensor:
    """LIME on SLIC superpixels: each pixel gets its superpixel's surrogate weight.

    Captum's ``Lime`` with a superpixel feature mask and its default exponential cosine
    kernel; switched-off superpixels take the mean colour (zero in normalised space, as for
    IG). The surrogate is ridge regression (``alpha=1``), the reference LIME
    implementation's choice, not Captum's default Lasso (``alpha=0.01``): with a few hundred
    samples and logits that move by less than ``alpha`` when one superpixel goes, Lasso zeroes
    every weight and the explanation is blank. One surrogate per image, each sampled from the
    same seed in a forked RNG, so results are reproducible and the global RNG is left alone.

    Returns:
        ``(N, 3, H, W)`` attributions (the weight repeated over channels and pixels of each
        superpixel).
    """
    images = _on_model(model, images)
    explainer = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0))
    out = []
    with _explaining(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*Minimum element in feature mask")
        for image, target in zip(images, class_idx, strict=True):
            mask = torch.as_tensor(superpixels(image, mean, std, segments), device=image.device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                attr = explainer.attribute(
                    image[None],
                    baselines=0.0,
                    target=int(target),
                    feature_mask=mask[None, None].expand(1, image.shape[0], -1, -1),
                    n_samples=samples,
                    perturbations_per_eval=perturbation_batch,
                )
            out.append(attr.detach())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _finite(maps: np.ndarray) -> np.ndarray:
    """Zero out NaN/inf (a diverged model) with a warning, so the [0, 1] contract holds."""
    if np.isfinite(maps).all():
        return maps
    warnings.warn("non-finite values in explanation maps were set to 0", stacklevel=3)
    return np.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)


@contextmanager
def _explaining(model: nn.Module) -> Iterator[None]:
    """Eval mode with gradients on; restores the training flag and drops the parameter grads.

    pytorch-grad-cam switches the model to eval itself (and never back) and leaves ``.grad``
    filled by its backward pass; both would leak into a caller that explains mid-training.
    """
    try:
        with eval_mode(model), torch.enable_grad():
            yield
    finally:
        model.zero_grad(set_to_none=True)


def _on_model(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images as float32 on the model's device, outside inference mode (autograd needs it)."""
    param = next(model.parameters())
    if param.dtype != torch.float32:
        raise ValueError(
            f"explanations run in float32 (pytorch-grad-cam breaks under fp16/autocast); "
            f"the model is {param.dtype}: call model.float() first"
        )
    images = images.detach().to(device=param.device, dtype=torch.float32)
    return images.clone() if images.is_inference() else images


def _check_inputs(
    model: nn.Module, arch: str, images: torch.Tensor, class_idx: Sequence[int]
) -> tuple[torch.Tensor, list[int]]:
    """Validate shapes and class indices up front, naming the culprit."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
        raise ValueError(f"images must be an (N, 3, H, W) tensor, got {shape}")
    targets = [int(c) for c in class_idx]
    if len(targets) != len(images):
        raise ValueError(f"{len(targets)} class indices for {len(images)} images")
    classes = head_layer(model, arch).out_features
    bad = [(i, c) for i, c in enumerate(targets) if not 0 <= c < classes]
    if bad:
        raise ValueError(f"class indices out of range [0, {classes}) (image, class): {bad[:5]}")
    return _on_model(model, images), targets


def _check_layer(layer: str | None, method: str) -> str:
    if layer not in LAYERS:
        raise ValueError(f"{method} needs layer in {LAYERS}, got {layer!r}")
    return layer
