"""Every explanation method behind one registry: CAMs per layer, exact CAM, input attributions.

Every method turns ``(model, images, class indices)`` into one heatmap per image, ``(N, H, W)``
float32 in ``[0, 1]`` at the input size, so callers can compare, score and plot them without
knowing where each came from. :data:`METHODS` is the registry: each entry carries the callable
that computes the method (:attr:`MethodSpec.compute`), so a name that is not registered is an
error, never a silent fall-through to another method. :func:`explain_batch` runs one method;
:func:`tasks.engine.explain` schedules many over a batch, and is what the stages call.

Three kinds of method:

- ``"cam"``: layer-wise class activation maps from pytorch-grad-cam (Grad-CAM, Grad-CAM++,
  XGrad-CAM, LayerCAM, Eigen-CAM, HiRes-CAM, Score-CAM), at the model's declared ``early``,
  ``middle`` and ``deep`` layers (:func:`tasks.models.target_layers`). :func:`layer_cams`
  computes any set of them from one forward (and one backward) pass per chunk of images, with
  the library's own hook recorder and each method's own ``get_cam_image``; Score-CAM's masked
  forwards are batched by :class:`BatchedScoreCAM`.
- ``"exact_cam"``: the original CAM of Zhou et al. (2016), computed from the head weights at
  the ``deep`` layer. No library offers it, so it is written here; it is exact only where the
  head is global average pooling followed by one linear layer (:data:`EXACT_CAM_ARCHS`).
- ``"attribution"``: input-level attributions from Captum (Integrated Gradients, DeepLIFT,
  LIME), reduced to a heatmap per image.

All heatmaps get pytorch-grad-cam's post-processing (ReLU, per-image min-max, bilinear resize,
min-max again; :func:`to_heatmaps`), so "1" means "the most relevant pixel of this image" for
every method alike. Everything runs on the model's device; the post-processing is NumPy/OpenCV
on the CPU, as in pytorch-grad-cam. Models are explained in eval mode and float32; the training
flag is restored afterwards. Images per pass are sized to the device
(:func:`tasks.forward.batch_size`) unless :attr:`Options.batch_size` fixes them.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
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

from tasks.forward import AMP_MODES, forward_batch, inference_twin, model_key
from tasks.forward import batch_size as sized_batch
from tasks.models import ARCHITECTURES, arch_spec, eval_mode, head_layer, tapped, target_layers

log = logging.getLogger(__name__)

LAYERS = ("early", "middle", "deep")

# The project's one normalisation (tasks.train.MEAN/STD, stored in every bundle); LIME needs it
# to undo normalisation before computing superpixels. Pass the bundle's values when they differ.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Kind = Literal["cam", "exact_cam", "attribution"]
Pair = tuple[str, str | None]

#: Architectures whose head is global average pooling + one Linear (dropout aside), where
#: CAM is exact. custom_cnn (hidden FC 512->128), mobilenet_v3_large (hidden Linear+Hardswish)
#: and convnext_tiny (LayerNorm between pool and Linear) are not.
EXACT_CAM_ARCHS: tuple[str, ...] = tuple(n for n, s in ARCHITECTURES.items() if s.cam_exact)


@dataclass(frozen=True)
class Options:
    """How the methods run (the ``explain.*`` knobs that are not about what to explain).

    Attributes:
        ig_steps: Integrated Gradients path steps.
        lime_samples: perturbed samples per LIME explanation.
        lime_segments: SLIC superpixels asked for per image (LIME's interpretable features).
        seed: LIME's sampling seed (the same for every image, so an image's explanation does
            not depend on the batch it came in).
        batch_size: images per pass (CAM chunks, IG path points, DeepLIFT chunks, Score-CAM
            and LIME masked inputs); ``0`` sizes every pass to the device.
        mean: normalisation mean of the images (LIME's superpixels need the real colours).
        std: normalisation std of the images.
        score_amp: one of :data:`tasks.forward.AMP_MODES`: what the faithfulness scores' forward
            passes autocast to (:func:`tasks.forward.autocast_dtype`'s rule, as
            ``train.amp``); the heatmaps are float32 whatever it says.
    """

    ig_steps: int = 24
    lime_samples: int = 150
    lime_segments: int = 50
    seed: int = 0
    batch_size: int = 0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    score_amp: str = "none"

    def __post_init__(self) -> None:
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 0 (0: sized to the device), got {self}")
        if self.score_amp not in AMP_MODES:
            raise ValueError(f"score_amp must be one of {AMP_MODES}, got {self.score_amp!r}")


#: ``compute(model, arch, images, targets, layer, options) -> (N, H, W) heatmaps``.
Compute = Callable[[nn.Module, str, torch.Tensor, list[int], "str | None", Options], np.ndarray]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: how to compute it and what a scheduler needs to know about it.

    Attributes:
        name: registry key (the name in ``explain.methods``).
        kind: ``"cam"`` (pytorch-grad-cam, at each layer), ``"exact_cam"`` (head weights,
            ``deep`` only) or ``"attribution"`` (Captum, input level, no layer).
        compute: the callable that computes it (see :data:`Compute`); inputs are checked.
        batchable: one pass covers many images. False means the cost is per image (LIME's
            surrogate is fitted per image).
        expensive: cost grows with channels or samples per image (one forward pass per
            channel of the layer for Score-CAM, ``lime_samples`` passes for LIME); the explain
            stage spends ``scorecam_budget`` / ``lime_budget`` images on them.
        class_specific: the map depends on the target class (Eigen-CAM's does not).
        description: one line for reports and plot titles.
        cam_class: the pytorch-grad-cam class for ``kind == "cam"``.
        archs: architectures the method supports (``None``: all).
    """

    name: str
    kind: Kind
    compute: Compute
    batchable: bool
    expensive: bool
    class_specific: bool
    description: str
    cam_class: type[BaseCAM] | None = None
    archs: tuple[str, ...] | None = None


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
) -> list[Pair]:
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
    pairs: list[Pair] = []
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
# One method
# --------------------------------------------------------------------------------------------


def explain_batch(
    model: nn.Module,
    arch: str,
    method: str,
    images: torch.Tensor,
    class_idx: Sequence[int],
    layer: str | None = None,
    options: Options | None = None,
    **overrides: object,
) -> np.ndarray:
    """Heatmaps of one registered ``method`` for a batch: ``(N, H, W)`` float32 in ``[0, 1]``.

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
        options: how the methods run (:class:`Options`).
        **overrides: fields of :class:`Options` to replace (``ig_steps=8``, ``batch_size=4``).

    Returns:
        One heatmap per image at the input resolution.

    Raises:
        ValueError: unknown method, layer or option, a class index out of range, a shape
            mismatch, or exact CAM on an architecture without an exact head.
    """
    spec = method_spec(method)
    opts = _options(options, overrides)
    images, targets = _check_inputs(model, arch, images, class_idx)
    if spec.kind == "cam":
        layer = _check_layer(layer, method)
    elif spec.kind == "exact_cam" and layer not in (None, "deep"):
        raise ValueError(f"{method} is defined at the deep layer only, got layer={layer!r}")
    if len(images) == 0:
        return np.zeros((0, *images.shape[-2:]), dtype=np.float32)
    return spec.compute(model, arch, images, targets, layer, opts)


def _options(options: Options | None, overrides: dict[str, object]) -> Options:
    opts = options or Options()
    unknown = sorted(set(overrides) - set(Options.__dataclass_fields__))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown}; choose from {list(Options.__dataclass_fields__)}"
        )
    return Options(**{**opts.__dict__, **overrides}) if overrides else opts


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


def grad_batch(
    model: nn.Module, images: torch.Tensor, requested: int = 0, work: int | None = None
) -> int:
    """Images per forward + backward pass of ``model`` (the config's, else sized to the device).

    ``work``: the inputs to pass in all (default: ``len(images)``), which caps the batch.
    """

    def step(x: torch.Tensor) -> None:
        with torch.enable_grad():
            model(x.requires_grad_(True)).sum().backward()
        model.zero_grad(set_to_none=True)

    with eval_mode(model):
        key = ("grad", *model_key(model))
        work = len(images) if work is None else work
        return sized_batch(step, images[:1], key, requested=requested, work=work)


def layer_cams(
    model: nn.Module,
    arch: str,
    images: torch.Tensor,
    class_idx: Sequence[int],
    pairs: Sequence[Pair],
    options: Options | None = None,
) -> dict[Pair, np.ndarray]:
    """Every layer-wise CAM in ``pairs`` from one forward (and one backward) pass per chunk.

    pytorch-grad-cam hooks one set of layers per object and runs its own forward and backward
    on every call, so five gradient methods at three layers would cost fifteen passes over the
    images. The passes are the same every time: the activations and gradients of one target
    logit per image. So every layer stays tapped for the whole batch (:func:`tapped`), each
    chunk gets one forward and, when any method needs gradients, one backward, and each
    method's own ``get_cam_image`` turns the recorded arrays into its map, followed by
    :func:`to_heatmaps` (the library's post-processing). The maps are the ones each library
    class computes on the same chunk (the tests compare them). Score-CAM reuses the recorded
    activations and scores its masked inputs in batches (:class:`BatchedScoreCAM`).

    The backward is ``torch.autograd.grad`` of the target logits with respect to the tapped
    activations alone, where the library calls ``backward()``: autograd then runs only the
    part of the graph between the logits and the earliest tapped layer, with no gradients for
    the weights or for the layers below it (at ResNet-50's deep layer, the head alone). The
    gradients are the same numbers. The input requires grad so the activations are part of a
    graph even when the caller froze the parameters.

    Args:
        model, arch, images, class_idx: as for :func:`explain_batch`.
        pairs: ``(method, layer)`` with a ``"cam"``-kind method and a layer of :data:`LAYERS`.
        options: ``batch_size`` (0: sized to the device) is the one that matters here.

    Returns:
        ``(N, H, W)`` float32 heatmaps in ``[0, 1]`` per pair.
    """
    opts = options or Options()
    images, targets = _check_inputs(model, arch, images, class_idx)
    pairs = list(dict.fromkeys(pairs))
    for method, layer in pairs:
        if method_spec(method).kind != "cam":
            raise ValueError(f"{method} is not a pytorch-grad-cam method")
        _check_layer(layer, method)
    size = (images.shape[-2], images.shape[-1])
    if len(images) == 0 or not pairs:
        return {p: np.zeros((len(images), *size), dtype=np.float32) for p in pairs}
    modules = target_layers(model, arch)
    layers = list(dict.fromkeys(layer for _, layer in pairs))
    methods = list(dict.fromkeys(method for method, _ in pairs))
    parts: dict[Pair, list[np.ndarray]] = {p: [] for p in pairs}
    with _explaining(model), tapped({lay: modules[lay] for lay in layers}) as taps:
        cams = {m: _cam_object(m, model, opts) for m in methods}
        needs_grads = any(cam.uses_gradients for cam in cams.values())
        step = grad_batch(model, images, opts.batch_size)
        try:
            for start in range(0, len(images), step):
                chunk = images[start : start + step].detach().clone().requires_grad_(needs_grads)
                chunk_targets = [ClassifierOutputTarget(c) for c in targets[start : start + step]]
                outputs = model(chunk)
                activations = [taps[lay] for lay in layers]
                tapped_grads: Sequence[torch.Tensor | None] = [None] * len(layers)
                if needs_grads:
                    target = sum(t(o) for t, o in zip(chunk_targets, outputs, strict=True))
                    tapped_grads = torch.autograd.grad(target, activations)
                recorded = {
                    lay: (a.detach().cpu().numpy(), None if g is None else g.cpu().numpy())
                    for lay, a, g in zip(layers, activations, tapped_grads, strict=True)
                }
                for method, layer in pairs:
                    acts, grads = recorded[layer]
                    raw = cams[method].get_cam_image(
                        chunk.detach(), modules[layer], chunk_targets, acts, grads, False
                    )
                    parts[(method, layer)].append(to_heatmaps(raw, size))
        except IndexError as exc:
            # BaseCAM.__exit__ would swallow an IndexError (it prints and returns True): name it.
            raise RuntimeError(f"layer CAMs {pairs} failed: {exc}") from exc
        finally:
            for cam in cams.values():
                cam.activations_and_grads.release()
    return {p: _finite(np.concatenate(maps).astype(np.float32)) for p, maps in parts.items()}


def _cam_object(method: str, model: nn.Module, opts: Options) -> BaseCAM:
    """The library object whose ``get_cam_image`` computes ``method`` (hooks: none of its own)."""
    cls = METHODS[method].cam_class
    if cls is ScoreCAM:
        return BatchedScoreCAM(model, [], batch_size=opts.batch_size)
    if cls is EigenCAM:
        return ThinEigenCAM(model, [])
    return cls(model, [])


def first_component(activations: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's ``get_2d_projection`` with the thin SVD: the same maps, far sooner.

    Eigen-CAM projects each image's centred ``(h*w, channels)`` activation matrix on its first
    right singular vector. The library asks NumPy for the full SVD (``full_matrices=True``),
    so LAPACK also builds the square ``U`` of side ``h*w`` (3,136 at ResNet-50's early layer at
    224 px) or the square ``V`` of side ``channels`` (2,048 at its deep layer), only to keep
    one row of ``V``. The thin SVD runs the same LAPACK routine without the unused
    columns; the first singular vector comes out bit for bit the same (the tests compare it
    with the library's on shapes on both sides of ``h*w = channels``). Measured on 2 CPU
    cores, 8 images: 1.11 -> 0.049 s at 2,048 x 7 x 7, 7.8 -> 1.3 s at 256 x 56 x 56.
    """
    activations = np.nan_to_num(activations, nan=0.0, posinf=np.inf, neginf=-np.inf)
    projections = []
    for a in activations:
        centred = a.reshape(a.shape[0], -1).T
        centred = centred - centred.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        projections.append((centred @ vt[0, :]).reshape(a.shape[1:]))
    return np.float32(projections)


class ThinEigenCAM(EigenCAM):
    """pytorch-grad-cam's ``EigenCAM`` projecting with :func:`first_component`."""

    def get_cam_image(self, *args: object) -> np.ndarray:
        """The library's positional ``(input_tensor, target_layer, targets, activations, grads,
        eigen_smooth)``: the projection needs the activations alone."""
        return first_component(args[3])


class BatchedScoreCAM(ScoreCAM):
    """pytorch-grad-cam's Score-CAM with its channel scoring batched on the device.

    Score-CAM masks the input with every channel of the layer (upsampled, min-max normalised)
    and weights the channel by the softmax, over channels, of the target logit on the masked
    input. The library's ``ScoreCAM`` builds all ``N x channels x 3 x H x W`` masked copies at
    once (300 MB per 224-px image at ResNet-50's early layer), runs them 16 at a time with its
    hooks still recording every pass, and moves each logit to the host with ``.item()`` (one
    device synchronisation per masked input). Only :meth:`get_cam_weights` is replaced: here
    the masked inputs of all ``(image, channel)`` pairs of the batch are built chunk by chunk
    (one image's upsampled maps at a time), scored by the hook-free inference twin
    (:func:`tasks.forward.inference_twin`, BatchNorm folded, channels-last) in passes sized to
    the device, with the target logit gathered on the device. The products, the logits and the
    softmax are the library's, so the maps equal its maps to float32 rounding.

    Args:
        model: the model; its hooks (via the base class) record the layer activations.
        target_layers: as for the library (``[]`` when the caller supplies the activations).
        reshape_transform: as for the library.
        batch_size: masked inputs per forward pass; 0 sizes it to the device.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layers: list[nn.Module],
        reshape_transform: Callable | None = None,
        *,
        batch_size: int = 0,
    ) -> None:
        super().__init__(model, target_layers, reshape_transform=reshape_transform)
        self.requested = batch_size

    def get_cam_weights(
        self,
        input_tensor: torch.Tensor,
        target_layer: nn.Module,
        targets: list[Callable],
        activations: np.ndarray,
        grads: np.ndarray | None,
    ) -> np.ndarray:
        with torch.no_grad():
            images = input_tensor.detach().to(self.device)
            n, k = activations.shape[:2]
            twin = inference_twin(self.model)
            step = forward_batch(twin, images, self.requested, work=n * k)
            upsample = torch.nn.UpsamplingBilinear2d(size=images.shape[-2:])
            scores = torch.empty(n * k, device=self.device)
            current: dict[int, torch.Tensor] = {}

            def masks(i: int) -> torch.Tensor:
                if i not in current:
                    current.clear()
                    up = upsample(torch.from_numpy(activations[i : i + 1]).to(self.device))
                    flat = up.view(1, k, -1)
                    maxs = flat.max(dim=-1)[0][:, :, None, None]
                    mins = flat.min(dim=-1)[0][:, :, None, None]
                    current[i] = ((up - mins) / (maxs - mins + 1e-8))[0]
                return current[i]

            for start in range(0, n * k, step):
                stop = min(start + step, n * k)
                pieces, row_targets, row = [], [], start
                while row < stop:  # the rows of one image at a time, as one broadcast product
                    i, first = divmod(row, k)
                    end = min(stop, (i + 1) * k)
                    pieces.append(images[i][None] * masks(i)[first : first + end - row, None])
                    row_targets += [targets[i]] * (end - row)
                    row = end
                batch = torch.cat(pieces).contiguous(memory_format=torch.channels_last)
                scores[start:stop] = _target_values(twin(batch), row_targets)
            weights = torch.nn.Softmax(dim=-1)(scores.cpu().view(n, k))
            return weights.numpy()


def _target_values(outputs: torch.Tensor, targets: Sequence[Callable]) -> torch.Tensor:
    """Each row's target value: one gather for class targets, else the callables row by row."""
    if all(isinstance(t, ClassifierOutputTarget) for t in targets):
        index = torch.as_tensor([t.category for t in targets], device=outputs.device)
        return outputs.gather(1, index[:, None])[:, 0].float()
    return torch.stack([t(o) for t, o in zip(targets, outputs, strict=True)]).float()


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
    The perturbed inputs run through the model's inference twin (no gradients are needed).

    Returns:
        ``(N, 3, H, W)`` attributions (the weight repeated over channels and pixels of each
        superpixel).
    """
    images = _on_model(model, images)
    explainer = Lime(inference_twin(model), interpretable_model=SkLearnRidge(alpha=1.0))
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
# The registry
# --------------------------------------------------------------------------------------------


def _cam_method(name: str) -> Compute:
    def compute(
        model: nn.Module,
        arch: str,
        images: torch.Tensor,
        targets: list[int],
        layer: str | None,
        opts: Options,
    ) -> np.ndarray:
        return layer_cams(model, arch, images, targets, [(name, layer)], opts)[(name, layer)]

    return compute


def _exact(
    model: nn.Module,
    arch: str,
    images: torch.Tensor,
    targets: list[int],
    _: str | None,
    __: Options,
) -> np.ndarray:
    return exact_cam(model, arch, images, targets)


def _ig(
    model: nn.Module, arch: str, images: torch.Tensor, targets: list[int], _: str | None, o: Options
) -> np.ndarray:
    rows = grad_batch(model, images, o.batch_size, work=len(images) * o.ig_steps)
    attr, _delta = integrated_gradients(
        model, images, targets, steps=o.ig_steps, internal_batch_size=rows
    )
    return to_heatmaps(attr.abs().sum(dim=1), (images.shape[-2], images.shape[-1]))


def _deeplift(
    model: nn.Module, arch: str, images: torch.Tensor, targets: list[int], _: str | None, o: Options
) -> np.ndarray:
    rows = grad_batch(model, images, o.batch_size)
    attr, _delta = deeplift(model, images, targets, batch_size=rows)
    return to_heatmaps(attr.abs().sum(dim=1), (images.shape[-2], images.shape[-1]))


def _lime(
    model: nn.Module, arch: str, images: torch.Tensor, targets: list[int], _: str | None, o: Options
) -> np.ndarray:
    work = len(images) * o.lime_samples
    rows = forward_batch(inference_twin(model), images, o.batch_size, work=work)
    attr = lime(
        model,
        images,
        targets,
        samples=o.lime_samples,
        seed=o.seed,
        mean=o.mean,
        std=o.std,
        segments=o.lime_segments,
        perturbation_batch=rows,
    )
    return to_heatmaps(attr[:, 0].clamp(min=0), (images.shape[-2], images.shape[-1]))


def _cam_spec(name: str, cls: type[BaseCAM], description: str, **flags: bool) -> MethodSpec:
    return MethodSpec(
        name=name,
        kind="cam",
        compute=_cam_method(name),
        batchable=True,
        expensive=flags.get("expensive", False),
        class_specific=flags.get("class_specific", True),
        description=description,
        cam_class=cls,
    )


def _attribution(name: str, compute: Compute, description: str, **flags: bool) -> MethodSpec:
    return MethodSpec(
        name=name,
        kind="attribution",
        compute=compute,
        batchable=flags.get("batchable", True),
        expensive=flags.get("expensive", False),
        class_specific=True,
        description=description,
    )


METHODS: dict[str, MethodSpec] = {
    "gradcam": _cam_spec("gradcam", GradCAM, "Grad-CAM: channels weighted by mean gradient"),
    "gradcampp": _cam_spec(
        "gradcampp", GradCAMPlusPlus, "Grad-CAM++: positive higher-order gradient weights"
    ),
    "xgradcam": _cam_spec(
        "xgradcam", XGradCAM, "XGrad-CAM: activation-normalised gradient weights"
    ),
    "layercam": _cam_spec("layercam", LayerCAM, "LayerCAM: per-location positive gradient weights"),
    "eigencam": _cam_spec(
        "eigencam",
        EigenCAM,
        "Eigen-CAM: first principal component of the activations (class-agnostic)",
        class_specific=False,
    ),
    "hirescam": _cam_spec("hirescam", HiResCAM, "HiRes-CAM: element-wise gradient x activation"),
    "scorecam": _cam_spec(
        "scorecam",
        ScoreCAM,
        "Score-CAM: channels weighted by the score of the input masked with them",
        expensive=True,
    ),
    "cam": MethodSpec(
        name="cam",
        kind="exact_cam",
        compute=_exact,
        batchable=True,
        expensive=False,
        class_specific=True,
        description="CAM (Zhou et al. 2016): deep features weighted by the head's weights",
        archs=EXACT_CAM_ARCHS,
    ),
    "ig": _attribution(
        "ig", _ig, "Integrated Gradients from the mean image, |attribution| summed over RGB"
    ),
    "deeplift": _attribution(
        "deeplift",
        _deeplift,
        "DeepLIFT (rescale rule) from the mean image, |attribution| summed over RGB",
    ),
    "lime": _attribution(
        "lime",
        _lime,
        "LIME on SLIC superpixels, positive surrogate weights",
        batchable=False,
        expensive=True,
    ),
}


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
def strict_float32() -> Iterator[None]:
    """Float32 convolutions and matrix products without TF32, restored afterwards.

    PyTorch lets cuDNN convolutions use TF32 on Ampere and later GPUs by default (10-bit
    mantissas), and the algorithm it picks depends on the batch size, so one image explained
    alone and in a batch of 64 can differ by 0.1 after a CAM's min-max scaling. Comparisons of
    heatmaps that must agree to float32 rounding (tests, the bench's equal-maps checks) run
    inside this. A no-op on the CPU.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


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
