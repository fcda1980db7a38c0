"""Classifier architectures: one registry, one builder, one bundle format.

Every architecture is described by an :class:`ArchSpec` in :data:`ARCHITECTURES`: how to build
it, which module is the classification head, and which layers explanations look at. Everything
else (head replacement, freezing, target layers, weight loading, bundles) is written once
against that spec, so adding an architecture is one registry entry.

Weights are never downloaded implicitly by torchvision. ``pretrained="imagenet"`` takes the
torchvision default weights from the torch hub cache (``$TORCH_HOME/hub/checkpoints``), fetches
them only after a quick reachability check, and otherwise fails with
:class:`WeightsUnavailableError` naming the two offline remedies: pre-download the file into the
cache, or point ``model.weights_path`` at a local state_dict. Both paths go through the same
loader, which reads with ``weights_only=True`` and refuses files that do not fit the backbone.

The head is always fresh (``num_classes`` outputs) and always preceded by a dropout whose ``p``
is the configured ``model.dropout``: ResNet, DenseNet, ConvNeXt and the custom CNN get a new
``nn.Sequential(nn.Dropout(p), nn.Linear(...))``; EfficientNet and MobileNetV3 keep their own
dropout module with ``p`` set to the configured value, so one knob means the same everywhere.
The module structure therefore never depends on ``dropout`` and a bundle's state_dict always
fits a freshly built model.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import re
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from tasks.io import atomic_path

BUNDLE_FORMAT = "dermaflow.model-bundle"
BUNDLE_VERSION = 1
_REACHABILITY_TIMEOUT_S = 10.0


class WeightsUnavailableError(RuntimeError):
    """Usable pretrained weights cannot be had (offline and not cached, or no such file).

    It is the base of every weights error, so the CLI's one ``except`` turns them all into a
    readable stage failure instead of a stack trace.
    """


class WeightsFileError(WeightsUnavailableError):
    """A weights file that exists but cannot be used: unreadable, or not this architecture."""


# --------------------------------------------------------------------------------------------
# The custom CNN
# --------------------------------------------------------------------------------------------


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class CustomCNN(nn.Module):
    """The small CNN of the HAM10000 study, made input-size agnostic.

    Four blocks (conv3x3 + BatchNorm + ReLU + 2x2 max-pool; 64, 128, 256, 512 channels), then
    global average pooling instead of a flatten, so any input side >= 16 px works and the last
    block's map can be used for CAMs. The classifier is FC 512->128, ReLU, dropout, FC ->
    classes.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.0) -> None:
        super().__init__()
        self.block1 = _conv_block(3, 64)
        self.block2 = _conv_block(64, 128)
        self.block3 = _conv_block(128, 256)
        self.block4 = _conv_block(256, 512)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(512, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """What the rest of the code needs to know about one architecture.

    Module paths are dotted ``get_submodule`` paths; a negative index counts from the end of a
    ``Sequential`` (``"layer4.-1"`` is ResNet's last block whatever the depth).

    Attributes:
        build: returns the bare model (random init, its original head).
        head: the module replaced by the fresh head; its keys are skipped when loading weights
            and its parameters are the only ones trained while the backbone is frozen.
        dropout: the arch's own dropout before ``head`` (its ``p`` is set to the configured
            dropout); ``None`` means ``head`` becomes ``Sequential(Dropout, Linear)``.
        targets: "early" / "middle" / "deep" layers for Grad-CAM-style explanations.
        cam_exact: the global-average-pooled output of ``targets["deep"]`` feeds
            :func:`head_layer` directly (only dropout in between), so the classic CAM
            ``sum_k w_ck A_k`` is exact. False where a hidden FC or LayerNorm sits after the pool.
        deep_relu: the forward applies a ReLU to the deep layer's output before pooling
            (DenseNet's ``norm5``); an exact CAM must apply it too.
        imagenet: torchvision ships ImageNet weights for it.
    """

    build: Callable[[], nn.Module]
    head: str
    dropout: str | None
    targets: Mapping[str, str]
    cam_exact: bool
    deep_relu: bool = False
    imagenet: bool = True


def _tv(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return torchvision.models.get_model(name, weights=None)

    build.__name__ = f"build_{name}"
    return build


_RESNET_TARGETS = {"early": "layer2", "middle": "layer3", "deep": "layer4.-1"}
_DENSENET_TARGETS = {
    "early": "features.denseblock2",
    "middle": "features.denseblock3",
    "deep": "features.norm5",
}

ARCHITECTURES: dict[str, ArchSpec] = {
    **{
        name: ArchSpec(_tv(name), head="fc", dropout=None, targets=_RESNET_TARGETS, cam_exact=True)
        for name in ("resnet18", "resnet34", "resnet50")
    },
    "efficientnet_b0": ArchSpec(
        _tv("efficientnet_b0"),
        head="classifier.1",
        dropout="classifier.0",
        targets={"early": "features.3", "middle": "features.5", "deep": "features.-1"},
        cam_exact=True,
    ),
    **{
        name: ArchSpec(
            _tv(name),
            head="classifier",
            dropout=None,
            targets=_DENSENET_TARGETS,
            cam_exact=True,
            deep_relu=True,
        )
        for name in ("densenet121", "densenet201")
    },
    "mobilenet_v3_large": ArchSpec(
        _tv("mobilenet_v3_large"),
        head="classifier.3",
        dropout="classifier.2",
        targets={"early": "features.6", "middle": "features.12", "deep": "features.-1"},
        cam_exact=False,
    ),
    "convnext_tiny": ArchSpec(
        _tv("convnext_tiny"),
        head="classifier.2",
        dropout=None,
        targets={"early": "features.3", "middle": "features.5", "deep": "features.7"},
        cam_exact=False,
    ),
    "custom_cnn": ArchSpec(
        CustomCNN,
        head="classifier.3",
        dropout="classifier.2",
        targets={"early": "block2", "middle": "block3", "deep": "block4"},
        cam_exact=False,
        imagenet=False,
    ),
}


def arch_spec(arch: str) -> ArchSpec:
    """The registry entry, or a ValueError that lists the valid names (config typos land here)."""
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(
            f"unknown model.arch {arch!r}; choose one of: {', '.join(ARCHITECTURES)}"
        ) from None


def _resolve(model: nn.Module, path: str) -> nn.Module:
    """``get_submodule`` that also accepts negative indices into containers."""
    module = model
    for part in path.split("."):
        if part.lstrip("-").isdigit() and isinstance(module, nn.Sequential | nn.ModuleList):
            module = module[int(part)]
        else:
            module = getattr(module, part)
    return module


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_resolve(model, parent) if parent else model, name, new)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_model(
    arch: str,
    num_classes: int,
    pretrained: str = "none",
    weights_path: str | os.PathLike[str] | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """Build ``arch`` with a fresh ``num_classes`` head and, optionally, pretrained backbone.

    Args:
        arch: a key of :data:`ARCHITECTURES`.
        num_classes: outputs of the new head (>= 2).
        pretrained: ``"none"`` (random init) or ``"imagenet"`` (torchvision's default weights
            from the hub cache, else the network). Ignored when ``weights_path`` is given: an
            explicit local file is the offline way to the same weights.
        weights_path: a local state_dict (or a dict holding one under ``"state_dict"`` or
            ``"model"``, e.g. a dermaflow bundle) loaded into the backbone.
        dropout: ``p`` of the dropout right before the head (see the module docstring).

    Raises:
        ValueError: unknown arch or pretrained mode, bad num_classes or dropout.
        WeightsUnavailableError: ImageNet weights neither cached nor downloadable, or a
            ``weights_path`` that does not exist.
        WeightsFileError: a weights file that is unreadable or does not fit the backbone.
    """
    spec = arch_spec(arch)
    if pretrained not in {"none", "imagenet"}:
        raise ValueError(f"model.pretrained must be none|imagenet, got {pretrained!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")

    model = spec.build()
    state: Mapping[str, torch.Tensor] | None = None
    source = ""
    if weights_path is not None:
        state, source = _read_state_dict(Path(weights_path)), str(weights_path)
    elif pretrained == "imagenet":
        if not spec.imagenet:
            raise ValueError(
                f"{arch} has no ImageNet weights; use model.pretrained: none, or set "
                "model.weights_path to a state_dict of this architecture"
            )
        cached = _imagenet_file(arch)
        state, source = _read_state_dict(cached), str(cached)
    if state is not None:
        _load_backbone(model, arch, state, source)
    _replace_head(model, spec, num_classes, dropout)
    return model


def _replace_head(model: nn.Module, spec: ArchSpec, num_classes: int, dropout: float) -> None:
    old = _resolve(model, spec.head)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{spec.head} is a {type(old).__name__}, expected nn.Linear")
    linear = nn.Linear(old.in_features, num_classes)
    if spec.dropout is None:
        _set_module(model, spec.head, nn.Sequential(nn.Dropout(dropout), linear))
    else:
        _set_module(model, spec.head, linear)
        drop = _resolve(model, spec.dropout)
        if not isinstance(drop, nn.Dropout):
            raise TypeError(f"{spec.dropout} is a {type(drop).__name__}, expected nn.Dropout")
        drop.p = dropout


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

# Old DenseNet checkpoints (torchvision's ImageNet files among them) name layers "norm.1";
# modules may no longer contain dots, so torchvision renames them on load. So do we.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile


def imagenet_weights_file(arch: str) -> Path:
    """Where torch hub caches ``arch``'s default ImageNet weights (``$TORCH_HOME`` aware)."""
    spec = arch_spec(arch)
    if not spec.imagenet:
        raise ValueError(f"{arch} has no ImageNet weights")
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _imagenet_file(arch: str) -> Path:
    """The cached ImageNet weights file, downloading it first when the network answers.

    torch hub would retry a dead network with no timeout, so reachability is probed first with
    a short timeout; an offline machine fails in well under a second.
    """
    target = imagenet_weights_file(arch)
    if target.is_file():
        return target
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, method="HEAD"), timeout=_REACHABILITY_TIMEOUT_S
        ):
            pass
        target.parent.mkdir(parents=True, exist_ok=True)
        match = re.search(torch.hub.HASH_REGEX, target.name)
        torch.hub.download_url_to_file(
            url, str(target), match.group(1) if match else None, progress=False
        )
    except (OSError, urllib.error.URLError, RuntimeError) as exc:
        raise WeightsUnavailableError(
            f"ImageNet weights for {arch} are not in the local cache ({target}) and could not be "
            f"downloaded from {url} ({type(exc).__name__}: {exc}). Either pre-download that "
            f"file on a machine with network into $TORCH_HOME/hub/checkpoints/{target.name} "
            f"(here: {target}), or set model.weights_path to a local state_dict file (that "
            "same file works) and keep model.pretrained: none."
        ) from None
    return target


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict safely (``weights_only=True``) and unwrap the usual containers."""
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file not found (model.weights_path)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file: report them uniformly
        raise WeightsFileError(
            f"{path}: not a readable weights file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Expected a torch.save'd "
            "state_dict of tensors; delete or replace the file."
        ) from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsFileError(f"{path}: expected a state_dict (name -> tensor), got {type(obj)}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsFileError(f"{path}: entries that are not tensors: {bad[:5]}")
    out: dict[str, torch.Tensor] = OrderedDict()
    for key, value in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        match = _DENSENET_OLD_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _is_head_key(key: str, spec: ArchSpec) -> bool:
    return key == spec.head or key.startswith(spec.head + ".")


def _load_backbone(
    model: nn.Module, arch: str, state: Mapping[str, torch.Tensor], source: str
) -> None:
    """Load every non-head tensor; any missing, extra or misshapen backbone key is an error.

    The head is replaced afterwards, so head keys (any shape, e.g. ImageNet's 1000 classes)
    are dropped here; everything else must match exactly, because a silently half-loaded
    backbone trains, but badly, and nobody notices.
    """
    spec = ARCHITECTURES[arch]
    own = model.state_dict()
    backbone = {k: v for k, v in state.items() if not _is_head_key(k, spec)}
    shapes = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in backbone.items()
        if k in own and v.shape != own[k].shape
    ]
    result = model.load_state_dict(
        {k: v for k, v in backbone.items() if k not in own or v.shape == own[k].shape},
        strict=False,
    )
    missing = [k for k in result.missing_keys if not _is_head_key(k, spec)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{len(keys)} {what}: {', '.join(keys[:5])}{more}")
        raise WeightsFileError(
            f"{source}: weights do not fit the {arch} backbone ({'; '.join(parts)}). "
            f"Is model.arch right for this file?"
        )


# --------------------------------------------------------------------------------------------
# Layers and parameters
# --------------------------------------------------------------------------------------------


def image_part(model: nn.Module) -> nn.Module:
    """The architecture's own module: itself, or the image backbone of a metadata-fusion model."""
    return getattr(model, "image_backbone", model)


def target_layers(model: nn.Module, arch: str) -> dict[str, nn.Module]:
    """The "early", "middle" and "deep" layers explanations hook (all give B x C x H x W)."""
    image = image_part(model)
    return {name: _resolve(image, path) for name, path in arch_spec(arch).targets.items()}


def head_layer(model: nn.Module, arch: str) -> nn.Linear:
    """The final linear layer (weights ``num_classes x features``), e.g. for exact CAM."""
    fused = getattr(model, "fusion_head", None)
    head = fused if fused is not None else _resolve(model, arch_spec(arch).head)
    return head[-1] if isinstance(head, nn.Sequential) else head


def head_parameters(model: nn.Module, arch: str) -> Iterator[nn.Parameter]:
    """Parameters of the fresh head: what trains while the backbone is frozen.

    For a metadata-fusion model: the image feature layer, the metadata branch and the fused
    classifier (everything but the pretrained image backbone).
    """
    own = _resolve(image_part(model), arch_spec(arch).head).parameters()
    if not hasattr(model, "fusion_head"):
        return own
    extra = [*model.meta_branch.parameters(), *model.fusion_head.parameters()]
    return iter([*own, *extra])


def backbone_parameters(model: nn.Module, arch: str) -> Iterator[nn.Parameter]:
    """Every parameter outside the head (pretrained or not)."""
    head = {id(p) for p in head_parameters(model, arch)}
    return (p for p in model.parameters() if id(p) not in head)


def param_groups(model: nn.Module, arch: str) -> list[dict[str, Any]]:
    """Optimizer groups ``[{"name": "backbone", ...}, {"name": "head", ...}]``.

    Separate groups let the trainer give the new head a larger learning rate than a pretrained
    backbone without rebuilding the optimizer when the backbone is unfrozen.
    """
    return [
        {"name": "backbone", "params": list(backbone_parameters(model, arch))},
        {"name": "head", "params": list(head_parameters(model, arch))},
    ]


def set_backbone_frozen(model: nn.Module, arch: str, frozen: bool) -> None:
    """Stop (or restart) gradients into the backbone for ``train.freeze_backbone_epochs``.

    Only ``requires_grad`` changes: BatchNorm layers still update their running statistics in
    train mode, which lets a pretrained backbone adapt to dermoscopy colour statistics while
    the head warms up. The head always stays trainable.
    """
    for p in backbone_parameters(model, arch):
        p.requires_grad_(not frozen)
    for p in head_parameters(model, arch):
        p.requires_grad_(True)


@contextlib.contextmanager
def tapped(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Each module's output in the latest forward, by name, kept out of reach of in-place ops.

    The hook keeps the output and hands the rest of the network a clone, so an in-place op
    further on (DenseNet's ``F.relu(..., inplace=True)`` after ``norm5``) changes the clone:
    the kept tensor stays the activation the layer produced, and the graph node whose
    gradient is asked for. (pytorch-grad-cam keeps ``activation.cpu()``, which on the CPU is
    the live tensor, so there the same model would give other maps than on a GPU.)
    """
    taps: dict[str, torch.Tensor] = {}
    names: dict[int, list[str]] = {}
    for name, module in modules.items():
        names.setdefault(id(module), []).append(name)

    def keep(module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        for name in names[id(module)]:
            taps[name] = output
        return output.clone()

    unique = {id(m): m for m in modules.values()}
    handles = [m.register_forward_hook(keep) for m in unique.values()]
    try:
        yield taps
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (dropout off, BatchNorm running stats) for the duration, then the flag back.

    Scoring, export and explanation may run mid-training (a callback, a comparison); leaving
    the model in eval would silently freeze BatchNorm for the rest of the training run.
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


TTA_VIEWS = {"none": 1, "flips": 4, "flips_rot90": 8}


class TTAClassifier(nn.Module):
    """Test-time augmentation as a module: the mean softmax over flipped / rotated views.

    ``flips`` averages the identity, horizontal, vertical and both flips; ``flips_rot90`` the
    eight symmetries of the square (those four, each also turned by 90 degrees). Lesions have
    no up, down, left or right, so each view is as valid as the original. The views are
    stacked into one batch (one forward pass). The output is ``log(mean softmax)``: log-
    probabilities that the rest of the project treats as logits (argmax, cross-entropy,
    temperature scaling and the ONNX graph's softmax give back the averaged probabilities),
    so the exported graph, the calibrated evaluation and the training report score the same
    model. Hand-written: torchvision has the transforms but no view-averaging wrapper.

    Args:
        model: the classifier (raw logits), fed square ``(N, 3, S, S)`` images.
        mode: ``flips`` | ``flips_rot90`` (``none`` is not wrapped: see :func:`with_tta`).
    """

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        if mode not in TTA_VIEWS or mode == "none":
            raise ValueError(f"tta mode must be flips | flips_rot90, got {mode!r}")
        self.model = model
        self.mode = mode
        self.train(model.training)

    @staticmethod
    def views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
        """The transformed copies of ``x`` (NCHW) that are averaged, identity first."""
        flips = [x, x.flip(-1), x.flip(-2), x.flip(-2, -1)]
        if mode == "flips":
            return flips
        return [*flips, *(v.transpose(-2, -1) for v in flips)]

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """``x``: images; ``extra``: the further inputs of a fusion model, repeated per view."""
        views = self.views(x, self.mode)
        repeated = [e.repeat(len(views), *([1] * (e.ndim - 1))) for e in extra]
        logits = self.model(torch.cat(views), *repeated)
        probs = torch.softmax(logits.float(), dim=-1).reshape(len(views), x.shape[0], -1)
        return probs.mean(dim=0).clamp_min(torch.finfo(torch.float32).tiny).log()


def with_tta(model: nn.Module, mode: str | None) -> nn.Module:
    """``model`` wrapped in :class:`TTAClassifier` for ``train.tta``; unchanged for none."""
    if mode in (None, "none"):
        return model
    return TTAClassifier(model, mode)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (all, or only those that require grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------
# Bundle
# --------------------------------------------------------------------------------------------

_BUNDLE_KEYS = ("arch", "classes", "input_size", "normalization", "state_dict")


def save_bundle(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: str,
    classes: Sequence[str],
    input_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    temperature: float = 1.0,
    data_version: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the model bundle atomically: weights plus every fact needed to use them.

    Everything is tensors, numbers, strings, lists and dicts, so :func:`load_bundle` can read
    it with ``weights_only=True`` (no pickled code runs on load). ``extra`` (e.g. metrics,
    the resolved config) is stored under ``"extra"`` and must follow the same rule.

    Args:
        path: target file (e.g. ``models/model.pt``).
        model: a model built by :func:`build_model` for ``arch``.
        arch: its architecture name.
        classes: class names in output order.
        input_size: square side in pixels, or ``(height, width)``.
        mean: per-channel normalization mean the model was trained with.
        std: per-channel normalization std.
        temperature: calibration temperature (logits are divided by it).
        data_version: the data lineage (e.g. DVC hash of the prepared data).
        extra: further plain facts to carry.

    Returns:
        The bundle path.
    """
    spec = arch_spec(arch)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: save the real module
    head = head_layer(model, arch)
    if head.out_features != len(classes):
        raise ValueError(f"model has {head.out_features} outputs but {len(classes)} classes")
    image = image_part(model)
    dropout = _resolve(image, spec.dropout if spec.dropout else spec.head + ".0")
    fusion = None
    if image is not model:  # metadata fusion: what rebuilding needs besides the arch
        fusion = {
            "meta_dim": int(model.meta_branch[0].in_features),
            "dropout": float(model.fusion_head[1].p),
            "features": list((extra or {}).get("metadata_features", [])),
        }
    bundle: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "arch": arch,
        "classes": [str(c) for c in classes],
        "input_size": int(input_size)
        if isinstance(input_size, numbers.Integral)
        else [int(s) for s in input_size],
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "temperature": float(temperature),
        "data_version": data_version,
        "dropout": float(dropout.p),
        "fusion": fusion,
        "extra": dict(extra or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    _check_plain(bundle["extra"], "extra")
    target = Path(path)
    with atomic_path(target) as tmp:
        torch.save(bundle, tmp)
    return target


def load_bundle(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a bundle; returns ``(model in eval mode on CPU, meta)``.

    ``meta`` is the bundle without ``state_dict``: arch, classes, input_size, normalization,
    temperature, data_version, dropout, extra.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model bundle not found")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable model bundle ({type(exc).__name__})") from None
    missing = [k for k in _BUNDLE_KEYS if not isinstance(bundle, dict) or k not in bundle]
    if missing:
        raise ValueError(f"{path}: not a model bundle (missing {missing})")
    meta = {k: v for k, v in bundle.items() if k != "state_dict"}
    fusion = meta.get("fusion")
    if fusion:
        from tasks.fusion import EMBED, FusionNet

        image = build_model(meta["arch"], EMBED, dropout=meta.get("dropout", 0.0))
        model = FusionNet(image, fusion["meta_dim"], len(meta["classes"]), fusion["dropout"])
    else:
        model = build_model(meta["arch"], len(meta["classes"]), dropout=meta.get("dropout", 0.0))
    try:
        model.load_state_dict(bundle["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit {meta['arch']}: {exc}") from None
    return model.eval(), meta


def _check_plain(value: Any, where: str) -> None:
    """Fail at save time, not at load time, on values ``weights_only`` loading would reject."""
    if value is None or isinstance(value, bool | int | float | str | torch.Tensor):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"bundle {where}: key {key!r} is not a string")
            _check_plain(item, f"{where}.{key}")
    else:
        raise TypeError(
            f"bundle {where}: {type(value).__name__} cannot be loaded with weights_only=True; "
            "convert it to numbers, strings, lists or dicts"
        )


def load_image_bundle(path: str | Path, stage_name: str) -> tuple[nn.Module, dict]:
    """:func:`load_bundle` for the stages that feed the model one image tensor."""
    model, meta = load_bundle(path)
    require_image_only(meta, stage_name)
    return model, meta


def require_image_only(meta: dict, stage_name: str) -> None:
    """The ONNX graph and the explain stage take one image tensor; a fusion model needs more.

    Raises:
        ConfigError: the bundle fuses image and metadata (``model.metadata: true``).
    """
    from tasks.config import ConfigError

    if meta.get("fusion"):
        raise ConfigError(
            f"{stage_name}: the model bundle fuses image and metadata (model.metadata: true); "
            f"the {stage_name} stage takes image-only models. Train it with model.metadata: "
            "false, or study the fusion model with `dermaflow compare` (the metadata ablation)"
        )
