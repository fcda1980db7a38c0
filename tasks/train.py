"""Train: fine-tune a classifier on the prepared cache, resumably, with class reweighting.

Shaped like torchvision's classification reference: :func:`train_one_epoch` and
:func:`evaluate` are the loop bodies and :func:`train` strings them together with the
checkpointing. Nothing here talks to MLflow; the CLI entry passes an ``on_epoch`` callback.

Resuming is exact on the CPU with ``deterministic: true``: every epoch reseeds torch, numpy and
the shuffling generator from ``(seed, epoch)``, so an epoch replayed after a crash draws the same
batches, augmentations and dropout masks as the lost one did.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from tasks import distributed, forward, paths
from tasks.config import AugmentConfig, ModelConfig, Params, TrainConfig
from tasks.forward import autocast, autocast_dtype
from tasks.fusion import (
    EMBED,
    FusionNet,
    MetadataPrior,
    feature_names,
    fit_metadata_prior,
    metadata_features,
    site_vocabulary,
)
from tasks.io import atomic_path
from tasks.losses import class_weights, epoch_class_weights, make_loss, sampler_weights
from tasks.metrics import classification_metrics
from tasks.models import (
    build_model,
    eval_mode,
    image_part,
    set_backbone_frozen,
    tapped,
    target_layers,
    with_tta,
)
from tasks.prepare import PreparedSplit, check_cache, color_constancy, open_split
from tasks.progress import progress_bar
from tasks.split import data_version, read_split
from tasks.stage import console, main

# ImageNet statistics: the torchvision backbones expect them, and one fixed normalisation
# keeps the bundle, the ONNX graph and the explanation stage in agreement.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, an unusable cache)."""


class CachedImages(Dataset):
    """Items of a prepared split: (uint8 HWC tensor, label index). Decoding happened once.

    With ``metadata`` (an ``(N, D)`` matrix from :func:`tasks.fusion.metadata_features`) the
    items are ``(image, metadata, label)``: the loops pass everything between the image and
    the label to the model as further inputs. With ``masks`` the lesion mask rides along as a
    fourth channel (0 or 255), so the augmentations move it with the image (``train.mask_loss``).
    """

    def __init__(
        self,
        split: PreparedSplit,
        metadata: np.ndarray | None = None,
        color: str = "none",
        masks: bool = False,
    ) -> None:
        self.images = split.images
        self.masks = split.masks if masks else None
        self.labels = split.labels
        self.metadata = None if metadata is None else torch.from_numpy(metadata)
        self.color = color  # colour constancy still to apply (the cache was written without)

    def __getstate__(self) -> dict:
        """Loader workers start by forkserver: send the cache's file names, not its pixels."""
        state = self.__dict__.copy()
        for name in ("images", "masks"):
            array = state[name]
            if isinstance(array, np.memmap) and array.filename:
                whole = np.load(array.filename, mmap_mode="r")
                if whole.shape == array.shape:
                    state[name] = ("npy", str(array.filename))
        return state

    def __setstate__(self, state: dict) -> None:
        for name in ("images", "masks"):
            if isinstance(state.get(name), tuple):
                state[name] = np.load(state[name][1], mmap_mode="r")
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple:
        image = torch.from_numpy(color_constancy(np.array(self.images[i]), self.color))
        if self.masks is not None:
            mask = torch.from_numpy(np.array(self.masks[i]) * np.uint8(255))
            image = torch.cat([image, mask[..., None]], dim=-1)
        if self.metadata is None:
            return image, int(self.labels[i])
        return image, self.metadata[i], int(self.labels[i])


class MaskHead(nn.Module):
    """An auxiliary lesion-mask head: a 1x1 convolution on one layer's features.

    It is trained to predict the lesion mask average-pooled to that layer's grid (binary
    cross-entropy, weighted by ``train.mask_loss``) next to the classification loss. The
    classifier itself is unchanged and the head is not exported: it only steers the features
    towards the lesion: on ham10000-dev it left balanced accuracy level at 96 px, raised it
    in each of three seeds at 160 px, and moved Grad-CAM's deep-layer pointing game onto the
    lesion (see the README). Hand-written because no library
    adds a segmentation side-loss to a torchvision classifier. The features are tapped as the
    explanations tap them (:func:`tasks.models.tapped`: safe from later in-place ops) for as
    long as the ``with`` block lasts, so the trained model leaves without the hook. Calling the
    head returns its loss, so under data parallelism it trains in its own
    DistributedDataParallel wrapper (:func:`tasks.distributed.wrap_model`), which averages its
    gradients over the processes as the classifier's are.

    Args:
        layer: the module whose output (``B x C x h x w``) the head reads.
        channels: ``C``.
        weight: the loss weight.
    """

    def __init__(self, layer: nn.Module, channels: int, weight: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)
        self.weight = weight
        self.layer = [layer]  # a list, so the layer is not a submodule of the head
        self._tap = contextlib.ExitStack()
        self._taps: dict[str, torch.Tensor] = {}

    def __enter__(self) -> MaskHead:
        self._taps = self._tap.enter_context(tapped({"features": self.layer[0]}))
        return self

    def __exit__(self, *exc: object) -> None:
        self._tap.close()
        self._taps = {}

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """The weighted loss of the last forward's features against ``masks`` (B x 1 x H x W).

        Only images whose mask channel marks a lesion count: an image without a mask has an
        all-zero channel (``train.mask_missing: skip``), and validation's ``mask_nonempty``
        rule makes every real mask mark at least one pixel. With every image masked this is
        the plain mean over the batch, bit for bit; the choice is a ``torch.where``, not a
        Python ``if``, so a CUDA step does not wait for the host to read ``known``.
        """
        if "features" not in self._taps:
            raise RuntimeError("MaskHead called before a model forward pass inside its with block")
        bce = nn.functional.binary_cross_entropy_with_logits
        logits = self.conv(self._taps["features"]).float()
        target = nn.functional.adaptive_avg_pool2d(masks.float(), logits.shape[-2:])
        known = masks.flatten(1).amax(dim=1) > 0
        per_image = bce(logits, target, reduction="none").flatten(1).mean(dim=1)
        weights = known.float()
        partial = (per_image * weights).sum() / weights.sum().clamp(min=1.0)
        return self.weight * torch.where(known.all(), bce(logits, target), partial)


def make_mask_head(
    model: nn.Module, arch: str, layer: str, weight: float, size: int, device: torch.device
) -> MaskHead:
    """A :class:`MaskHead` on ``model``'s ``layer`` (early | middle | deep), sized by a probe."""
    target = target_layers(model, arch)[layer]
    with eval_mode(model), torch.no_grad(), tapped({"features": target}) as taps:
        image_part(model)(torch.zeros(1, 3, size, size, device=device))
    return MaskHead(target, taps["features"].shape[1], weight).to(device)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is cuda but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN, in case a kernel reads
        # memory it never wrote (none of ours does): 9 % of a CPU step of the custom CNN at
        # 64 px, 4 % of the default's fit (83.0 -> 79.9 s). The weights are bit-identical.
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


class BatchAugment:
    """The training augmentations of a batch of float images in [0, 1], ``(N, 3, H, W)``.

    On the CPU: torchvision v2, one image at a time, as before; each image draws its own
    parameters from torch's global RNG in a fixed order, which the bit-exact resume relies on.
    On CUDA: the same transforms batched on the device with per-sample random parameters
    (:func:`batched_augment`). A per-image loop costs ~10 small kernel launches and a Python
    round-trip per image (about 830 images/s on two CPU cores, 98 % of the cache path), which
    cannot feed a GPU that trains ResNet-50 at ~2,600 images/s. Each image's distribution is
    the same on both paths; ``tests/test_augment.py`` compares their outputs on the CPU.

    Args:
        cfg: ``train.augment`` and the rest of the training config.
        size: the side of the output images.
    """

    def __init__(self, cfg: TrainConfig, size: int) -> None:
        self.cfg, self.size = cfg, size
        steps: list[v2.Transform] = []
        a = cfg.augment
        if tuple(a.crop_scale) != (1.0, 1.0):
            steps.append(v2.RandomResizedCrop(size, scale=tuple(a.crop_scale), antialias=True))
        if a.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if a.vflip:
            steps.append(v2.RandomVerticalFlip())
        if a.rotation:
            steps.append(v2.RandomRotation(a.rotation))
        if a.color_jitter:
            j = a.color_jitter
            steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
        self.per_image: v2.Transform = v2.Compose(steps) if steps else v2.Identity()

    def __call__(self, x: torch.Tensor, batched: bool | None = None) -> torch.Tensor:
        """Augment ``x``; ``batched`` forces a path (default: batched exactly on CUDA).

        A fourth channel is a lesion mask: it takes the image's geometry (crop, flips,
        rotation) and no colour jitter. On the per-image path it goes in as a v2
        ``tv_tensors.Mask``, which draws the same random parameters as the image alone, so
        the image channels are the same bytes with or without it.
        """
        use_batched = x.is_cuda if batched is None else batched
        if use_batched:
            return batched_augment(x, self.cfg.augment, self.size)
        if x.shape[1] == 4:
            pairs = [self.per_image(img[:3], tv_tensors.Mask(img[3:])) for img in x]
            return torch.stack(
                [torch.cat([image, mask.as_subclass(torch.Tensor)]) for image, mask in pairs]
            )
        return torch.stack([self.per_image(img) for img in x])


#: torchvision's RandomResizedCrop aspect-ratio range and its number of tries per image.
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10


def batched_augment(x: torch.Tensor, a: AugmentConfig, size: int) -> torch.Tensor:
    """The per-image v2 pipeline of :class:`BatchAugment` for a whole batch at once.

    Written here rather than taken from kornia: kornia's pipeline of the same five transforms
    measured 2,481 images/s at 224 px (batch 64) on an H200, a quarter of what the GPU data
    path needs, and 319 on two CPU cores, half the per-image loop's 680. This draws every
    parameter on the batch's device with torchvision's formulas and does the geometry in at
    most two ``grid_sample`` calls (bilinear crop + resize with the flips folded in;
    nearest-neighbour rotation, fill 0) and the jitter in a few elementwise ops: no ``.item()``,
    no boolean indexing, so nothing waits for the device. The crop's resize has no antialias:
    the prepared cache is already at the output size, so crops are only ever enlarged, where
    antialias does nothing. ``tests/test_augment.py`` checks each step against torchvision's
    own function with the same parameters.

    Args:
        x: float images in [0, 1], ``(N, 3, H, W)``, on any device; a fourth channel (a lesion
            mask) takes the geometry and not the jitter.
        a: the augmentation switches (``train.augment``).
        size: the output side when a crop is on (otherwise the input's size is kept).

    Returns:
        The augmented batch, ``(N, 3, size, size)`` with a crop, else ``x``'s shape.
    """
    n, device = x.shape[0], x.device
    crop = tuple(a.crop_scale) != (1.0, 1.0)
    hflip = torch.rand(n, device=device) < 0.5 if a.hflip else None
    vflip = torch.rand(n, device=device) < 0.5 if a.vflip else None
    if crop:
        x = _resized_crop(x, size, crop_boxes(x.shape, a.crop_scale, device), hflip, vflip)
    else:
        if hflip is not None:
            x = torch.where(hflip[:, None, None, None], x.flip(-1), x)
        if vflip is not None:
            x = torch.where(vflip[:, None, None, None], x.flip(-2), x)
    if a.rotation:
        x = _rotate(x, torch.empty(n, device=device).uniform_(-a.rotation, a.rotation))
    if a.color_jitter:
        j = a.color_jitter  # ColorJitter's factors: U(max(0, 1 - j), 1 + j)
        factors = torch.empty(3, n, device=device).uniform_(max(0.0, 1 - j), 1 + j)
        order = torch.rand(n, 3, device=device).argsort(dim=1)
        x = torch.cat([_color_jitter(x[:, :3], factors, order), x[:, 3:]], dim=1)
    return x


def crop_boxes(
    shape: torch.Size | tuple[int, ...],
    scale: tuple[float, float] | list[float],
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop's boxes for a batch: ten tries per image, then its centre fallback.

    Returns:
        ``(top, left, height, width)`` in pixels, float tensors of whole numbers, ``(N,)``.
    """
    n, _, height, width = shape
    r0, r1 = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    area = height * width * torch.empty(n, CROP_ATTEMPTS, device=device).uniform_(*scale)
    ratio = torch.exp(torch.empty(n, CROP_ATTEMPTS, device=device).uniform_(r0, r1))
    w_try = torch.round(torch.sqrt(area * ratio))
    h_try = torch.round(torch.sqrt(area / ratio))
    ok = (w_try > 0) & (w_try <= width) & (h_try > 0) & (h_try <= height)
    first = ok.int().argmax(dim=1, keepdim=True)  # the first try that fits (0 if none does)
    found = ok.any(dim=1)
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        fallback = (float(width), float(round(width / CROP_RATIO[0])))
    elif in_ratio > CROP_RATIO[1]:
        fallback = (float(round(height * CROP_RATIO[1])), float(height))
    else:
        fallback = (float(width), float(height))
    w = torch.where(found, w_try.gather(1, first)[:, 0], fallback[0])
    h = torch.where(found, h_try.gather(1, first)[:, 0], fallback[1])
    # torch.randint(0, height - h + 1) per image; the fallback box is centred
    top = torch.where(found, torch.floor(torch.rand(n, device=device) * (height - h + 1)),
                      torch.floor((height - h) / 2))  # fmt: skip
    left = torch.where(found, torch.floor(torch.rand(n, device=device) * (width - w + 1)),
                       torch.floor((width - w) / 2))  # fmt: skip
    return top, left, h, w


def _resized_crop(
    x: torch.Tensor,
    size: int,
    boxes: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    hflip: torch.Tensor | None,
    vflip: torch.Tensor | None,
) -> torch.Tensor:
    """Each image's box resized bilinearly to ``size``, as ``resized_crop`` does one image.

    A flip after the crop only reverses the order in which the box is sampled, so it is folded
    into the same grid.
    """
    n, _, height, width = x.shape
    top, left, h, w = boxes
    t = (torch.arange(size, device=x.device, dtype=x.dtype) + 0.5) / size  # output centres
    tx = t.expand(n, size) if hflip is None else torch.where(hflip[:, None], 1 - t, t)
    ty = t.expand(n, size) if vflip is None else torch.where(vflip[:, None], 1 - t, t)
    # the source pixel left + t * w - 0.5, kept inside the box as a resize of the cropped
    # image does (edge pixels repeat), then in grid_sample's [-1, 1] (align_corners=False)
    sx = torch.clamp(left[:, None] + tx * w[:, None] - 0.5, left[:, None], (left + w - 1)[:, None])
    sy = torch.clamp(top[:, None] + ty * h[:, None] - 0.5, top[:, None], (top + h - 1)[:, None])
    gx, gy = (2 * sx + 1) / width - 1, (2 * sy + 1) / height - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    out = nn.functional.grid_sample(x, grid, "bilinear", "border", align_corners=False)
    return out.clamp_(0, 1)


def _rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """RandomRotation's map about the image centre: nearest neighbour, fill 0, same size.

    An output pixel ``p`` (relative to the centre) reads the source at ``R(angle) p``, the
    inverse of torchvision's counter-clockwise rotation.
    """
    n, _, height, width = x.shape
    theta = torch.deg2rad(degrees)
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    xs = torch.arange(width, device=x.device, dtype=x.dtype) - (width - 1) / 2
    ys = torch.arange(height, device=x.device, dtype=x.dtype) - (height - 1) / 2
    px, py = xs[None, None, :], ys[None, :, None]
    sx = cos * px - sin * py
    sy = sin * px + cos * py
    grid = torch.stack((2 * sx / width, 2 * sy / height), dim=-1)
    return nn.functional.grid_sample(x, grid, "nearest", "zeros", align_corners=False)


def _color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter's brightness, contrast and saturation: torchvision's blends, per image.

    Args:
        x: images in [0, 1], ``(N, 3, H, W)``.
        factors: ``(3, N)``, each image's brightness, contrast and saturation factor.
        order: ``(N, 3)``, each image's order of the three (0 brightness, 1 contrast,
            2 saturation), as ColorJitter's ``randperm`` draws it.

    Each adjustment is a blend ``f * x + (1 - f) * other`` (other: 0 for brightness, the mean
    grey level for contrast, the grey image for saturation), so one step for the whole batch
    is ``f * x + b * mean + c * grey`` with per-image ``b`` and ``c`` set by the adjustment the
    image's order names, then torchvision's clamp to [0, 1].
    """
    grey_w = torch.tensor([0.2989, 0.587, 0.114], device=x.device, dtype=x.dtype)[:, None, None]
    for step in range(3):
        op = order[:, step]
        f = factors.gather(0, op[None])[0]
        b = torch.where(op == 1, 1 - f, 0.0)[:, None, None, None]
        c = torch.where(op == 2, 1 - f, 0.0)[:, None, None, None]
        grey = (x * grey_w).sum(dim=1, keepdim=True)
        x = f[:, None, None, None] * x + b * grey.mean(dim=(1, 2, 3), keepdim=True) + c * grey
        x = x.clamp_(0, 1)
    return x


def build_augment(cfg: TrainConfig, size: int) -> BatchAugment:
    """The training augmentations, on float images in [0, 1] (batched on the GPU when present)."""
    return BatchAugment(cfg, size)


def build_mix(cfg: TrainConfig, num_classes: int) -> v2.Transform | None:
    """Mixup and / or CutMix on a batch (``train.mixup_alpha``, ``cutmix_alpha``), or None.

    torchvision's batch transforms: ``(images, labels) -> (mixed images, soft labels (N, C))``.
    With both on, each mixed batch gets one of the two, chosen at random (as in the timm and
    torchvision references).
    """
    steps: list[v2.Transform] = []
    if cfg.mixup_alpha > 0:
        steps.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        steps.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not steps or cfg.mix_prob == 0:
        return None
    if cfg.loss == "focal":
        raise TrainingError(
            "train.loss=focal takes class indices, but Mixup / CutMix make soft targets; use "
            "train.loss ce | logit_adjusted, or set train.mixup_alpha and cutmix_alpha to 0"
        )
    return steps[0] if len(steps) == 1 else v2.RandomChoice(steps)


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of EMA update number ``updates`` (0-based): ``min(decay, (1 + n) / (10 + n))``.

    A fixed decay of 0.999 averages over about 1,000 steps, while a CPU recipe takes a few
    hundred (12 epochs of 55 steps): the average would still be mostly the random
    initialisation. The warm-up of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``
    and timm's ``ModelEmaV3(use_warmup=True)`` lets early updates count more, so the average
    follows the weights from the start and reaches ``decay`` only when there are enough steps
    to average over.
    """
    return min(decay, (1.0 + updates) / (10.0 + updates))


def _ema_with_warmup(decay: float) -> Callable:
    """``AveragedModel``'s ``multi_avg_fn`` with :func:`ema_decay_at`.

    torch's ``get_ema_multi_avg_fn`` is the same lerp at a fixed decay; it has no warm-up,
    hence this one (torch passes the number of updates so far as the third argument).
    """

    @torch.no_grad()
    def update(averaged: list, current: list, num_averaged: torch.Tensor | int) -> None:
        get_ema_multi_avg_fn(ema_decay_at(decay, int(num_averaged)))(
            averaged, current, num_averaged
        )

    return update


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """The exponential moving average of the weights for ``train.ema_decay`` (None when 0).

    ``use_buffers=True`` averages the BatchNorm running statistics with the weights, so the
    averaged model needs no extra pass over the data to re-estimate them; the decay warms up
    (:func:`ema_decay_at`).
    """
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=_ema_with_warmup(decay), use_buffers=True)


def to_input(
    batch: torch.Tensor, device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """uint8 NHWC from the cache -> normalised float NCHW on ``device``."""
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    return normalize(x, channels_last)


def normalize(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step LR factor: linear warm-up, then cosine to zero or step decay."""
    warm = cfg.warmup_epochs * steps_per_epoch
    total = max(cfg.epochs * steps_per_epoch, 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            progress = (step - warm) / max(total - warm, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "step":
            return cfg.gamma ** ((step // steps_per_epoch) // max(cfg.step_size, 1))
        return 1.0

    return factor


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    raise TrainingError(f"train.optimizer {cfg.optimizer!r}: choose adam, adamw or sgd")


def precision_name(device: torch.device, amp: str) -> str:
    """What the training steps run in, as logged: bf16 autocast, fp16 autocast or float32."""
    return forward.precision_name(autocast_dtype(device, amp))


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """A loss scaler when the steps autocast to float16, else None.

    float16's 5-bit exponent underflows small gradients, so fp16 steps scale the loss up and
    the gradients back down; bf16 keeps float32's exponent and needs no scaling. Derived from
    :func:`autocast_dtype`, so the scaler never disagrees with the precision that runs.
    """
    if autocast_dtype(device, amp) is torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    cfg: TrainConfig,
    augment: BatchAugment,
    epoch: int,
    scaler: torch.amp.GradScaler | None = None,
    progress: Progress | None = None,
    mix: v2.Transform | None = None,
    ema: AveragedModel | None = None,
    mask_head: nn.Module | None = None,
) -> float:
    """One pass over ``loader``; returns the mean training loss. Stops on a non-finite loss.

    ``mix`` (:func:`build_mix`) mixes a share ``cfg.mix_prob`` of the batches into soft
    targets; ``ema`` (:func:`make_ema`) is updated after every optimiser step; ``mask_head``
    (a :class:`MaskHead`, or its DistributedDataParallel wrapper) adds its lesion-mask loss,
    read from the batches' fourth channel (``masks=True`` loader).

    The host never waits for the step it has just queued: the loss sum stays on the device,
    and a step's loss is checked for finiteness only once the next step is queued (or at the
    end of the epoch). A check of the current loss would stall the host until the GPU
    finishes each step, and only then would it load and augment the next batch, so data and
    model work would run in series (``bench/training.py`` measured exactly that: 0.79x of
    the bare loop on an H200). A non-finite loss therefore stops training one step later
    than it appears, before the epoch ends and anything is saved.
    """
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    queued: tuple[int, torch.Tensor] | None = None  # the latest step and its loss, unchecked
    task = progress.add_task(f"epoch {epoch + 1} train", total=len(loader)) if progress else None
    for step, (images, *extra, labels) in enumerate(loader):
        x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        x = augment(x)
        x, masks = (x[:, :3], x[:, 3:]) if x.shape[1] == 4 else (x, None)
        y = labels.to(device, non_blocking=True)
        if mix is not None and (cfg.mix_prob >= 1 or float(torch.rand(())) < cfg.mix_prob):
            x, y = mix(x, y)
        x = normalize(x, cfg.channels_last)
        extra = [e.to(device, non_blocking=True) for e in extra]  # metadata of fusion models
        with autocast(device, cfg.amp):
            loss = loss_fn(model(x, *extra).float(), y)
            if mask_head is not None and masks is not None:
                loss = loss + mask_head(masks)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        scheduler.step()
        if queued is not None:
            _check_finite(*queued, epoch)
        queued = (step, loss.detach())
        total += queued[1].double() * len(y)
        count += len(y)
        if progress is not None:
            progress.advance(task)
    if queued is not None:
        _check_finite(*queued, epoch)
    if progress is not None:
        progress.remove_task(task)
    return distributed.mean_over_ranks(float(total), count, device)


def _check_masks(split: PreparedSplit, missing_policy: str) -> int:
    """Check ``train.mask_loss`` can hold, and return how many training images have a mask.

    A training image without its mask is refused with ``train.mask_missing: error``; with
    ``skip`` it adds no mask loss (:meth:`MaskHead.forward`) and the console says how many
    images that is, so a preset that turns the loss on still trains a set that came without
    masks, and a set with masks for part of its images (ISIC 2019: the ISIC 2018 Task 1 ones)
    uses those it has.
    """
    missing = split.rows.loc[~split.rows["has_mask"].astype(bool), "image_id"]
    n, first = len(split.rows), (missing.iloc[0] if len(missing) else None)
    if len(missing) and missing_policy == "error":
        raise TrainingError(
            f"train.mask_loss needs every training image's lesion mask: {len(missing)} of {n} "
            f"have none (first: {first}); give dataset.masks, set train.mask_missing: skip, or "
            "set train.mask_loss: 0"
        )
    if len(missing):
        console.print(
            f"[yellow]train: {len(missing)} of {n} training images have no lesion mask (first: "
            f"{first}); they add no mask loss (train.mask_missing: skip)"
            + (", so the mask loss is off" if len(missing) == n else "")
            + "[/]"
        )
    return n - len(missing)


def _check_finite(step: int, loss: torch.Tensor, epoch: int) -> None:
    """Raise :class:`TrainingError` naming the step whose loss is NaN or infinite."""
    if not torch.isfinite(loss):
        raise TrainingError(
            f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
            "lower train.lr, check the inputs, or switch train.amp to bf16/none"
        )


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: str = "none"
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and labels over a loader, in loader order.

    A loader sharded over data-parallel ranks gives every rank's predictions, in dataset order.
    """
    model.eval()
    logits, labels = [], []
    for images, *extra, y in loader:
        with autocast(device, amp):
            out = model(to_input(images, device), *[e.to(device) for e in extra])
        logits.append(out.float().cpu())
        labels.append(y)
    return distributed.gather_predictions(
        loader, torch.cat(logits).numpy(), torch.cat(labels).numpy()
    )


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    device: torch.device,
    classes: list[str],
    amp: str = "none",
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics (incl. the weighted loss) plus the raw logits and labels for calibration."""
    logits, labels = predict_logits(model, loader, device, amp)
    metrics = classification_metrics(logits, labels, classes)
    metrics["loss"] = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(labels)).item())
    return metrics, logits, labels


@dataclass
class TrainResult:
    """What a finished training hands to the entry: the model and everything to report."""

    model: nn.Module
    classes: list[str]
    history: list[dict]
    val: dict
    test: dict
    val_logits: np.ndarray
    val_labels: np.ndarray
    test_logits: np.ndarray
    test_labels: np.ndarray
    class_weights: list[float]
    device: str
    best_epoch: int
    resumed_from: int | None = None
    precision: str = "float32"
    seconds: float = 0.0
    image_size: int = 0
    extra: dict = field(default_factory=dict)


def fingerprint(model_cfg: ModelConfig, train_cfg: TrainConfig, data_version: str) -> str:
    """What a checkpoint must match to be resumed: the configs and the data version.

    The process count is left out: the global batch is the same under any count, so a run
    resumes on fewer or more GPUs than it started on.
    """
    train = {k: v for k, v in asdict(train_cfg).items() if k != "distributed"}
    blob = json.dumps([asdict(model_cfg), train, data_version], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


CHECKPOINT_KEYS = ("fingerprint", "epoch", "model", "optimizer", "scheduler", "history", "best")


def quarantine(path: Path) -> Path:
    """Move an unusable file aside (``<name>.corrupt-<time>``) so that it never blocks a run."""
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    path.replace(target)
    return target


def load_checkpoint(path: Path, key: str, device: torch.device) -> dict | None:
    """The checkpoint to resume from, or None to start fresh (saying why).

    A checkpoint written for other configs or data is ignored. One that cannot be read
    (truncated by a kill during the write of an older version, emptied, not a checkpoint) is
    quarantined rather than left to fail every later run until deleted by hand.
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
            raise ValueError("not a dermaflow training checkpoint")
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for a broken file
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        moved = quarantine(path)
        console.print(
            f"[yellow]train: {path} is unreadable ({reason}); moved it to {moved} and training "
            "starts fresh from epoch 1[/]",
            highlight=False,
        )
        return None
    if state["fingerprint"] != key:
        console.print(
            f"train: {path} was written for other configs or data; training starts fresh",
            highlight=False,
        )
        return None
    return state


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _loader(
    split: PreparedSplit,
    cfg: TrainConfig,
    device: torch.device,
    metadata: np.ndarray | None = None,
    color: str = "none",
    masks: bool = False,
    **kw,
) -> DataLoader:
    # forkserver, not fork: a forked worker inherits the parent's threads and handlers (a
    # Prefect task's, for one) and can die on start; the cache re-opens by file name.
    context = "forkserver" if cfg.workers > 0 else None
    dataset = CachedImages(split, metadata, color, masks)
    # Under data parallelism: this rank's share of the global order and of the global batch.
    batch_size, kw = distributed.shard_loader_args(dataset, cfg.batch_size, kw)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=cfg.workers,
        multiprocessing_context=context,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        **kw,
    )


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    prepared_dir: str | Path,
    checkpoint: str | Path,
    data_version: str = "",
    on_epoch: Callable[[dict], None] | None = None,
    show_progress: bool = True,
    color: str | None = None,
) -> TrainResult:
    """Train on the prepared cache, resuming from ``checkpoint`` when it matches.

    With ``train.ema_decay`` the exponential moving average of the weights is what is
    validated each epoch, kept as the best state and returned (so saved and exported); with
    ``train.tta`` the final validation and test logits are those of :class:`TTAClassifier`
    (log of the mean softmax over the views), so calibration is fitted on the model that is
    exported. The per-epoch validation (early stopping) runs without TTA.

    Args:
        model_cfg: architecture and weights.
        train_cfg: optimisation, imbalance handling, augmentation, device.
        prepared_dir: the prepare stage's output.
        checkpoint: written after every epoch (atomically); resumed from when its fingerprint
            (configs + data version) matches, ignored otherwise.
        data_version: identifies the data (e.g. the manifest hash) for the fingerprint.
        on_epoch: called with each epoch's record (for live MLflow logging).
        show_progress: rich progress bars.
        color: ``prepare.color_constancy`` wanted; None takes the cache's. A cache written
            without it gets it applied on load (the same function on the same resized pixels,
            so the same bytes), which lets a comparison share one cache across the setting.

    Raises:
        TrainingError: ``color`` is ``none`` but the cache was colour-corrected (irreversible).
    """
    start = time.perf_counter()
    device = distributed.rank_device(pick_device(train_cfg.device))
    show_progress = show_progress and distributed.is_main()
    seed_everything(train_cfg.seed, train_cfg.deterministic)
    splits = {s: open_split(prepared_dir, s) for s in ("train", "val", "test")}
    classes = splits["train"].classes
    size = splits["train"].images.shape[1]
    cached = splits["train"].color_constancy
    color = cached if color is None else color
    if color != cached and cached != "none":
        raise TrainingError(
            f"prepare.color_constancy is {color} but {prepared_dir} was written with {cached}; "
            "run the prepare stage again (dvc repro prepare)"
        )
    todo = color if color != cached else "none"  # applied on load, on top of the cache
    counts = np.bincount(splits["train"].labels, minlength=len(classes))
    weights = class_weights(counts, train_cfg.class_weights, train_cfg.beta)

    def criterion(w: torch.Tensor, smoothing: float) -> nn.Module:
        return make_loss(
            train_cfg.loss, w, train_cfg.focal_gamma, smoothing, prior=counts.clip(min=1),
            tau=train_cfg.logit_tau,
        )  # fmt: skip

    eval_loss = criterion(weights, 0.0)
    mix = build_mix(train_cfg, len(classes))

    metadata, extra = build_metadata(splits) if model_cfg.metadata else ({}, {})
    prior = None
    if model_cfg.metadata_prior and not model_cfg.metadata:  # config refuses both
        # Fitted first, so a class without metadata is refused before any training.
        train_rows = splits["train"].rows
        prior = fit_metadata_prior(
            train_rows, splits["train"].labels, classes, model_cfg.metadata_prior_c
        )
        if prior is None:
            console.print(
                "[yellow]train: model.metadata_prior is on but no training image has age, sex "
                "or site, so the prior is p(class) and adds nothing; the model is image-only[/]"
            )
    model = build_model(
        model_cfg.arch,
        EMBED if model_cfg.metadata else len(classes),
        model_cfg.pretrained,
        model_cfg.weights_path,
        model_cfg.dropout,
    )
    if model_cfg.metadata:
        dim = metadata["train"].shape[1]
        model = FusionNet(model, dim, len(classes), model_cfg.dropout)
    model = model.to(device)
    if train_cfg.channels_last:  # NHWC: faster convolutions with cuDNN and with oneDNN on the CPU
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, train_cfg)
    mask_head, mask_images = None, 0
    if train_cfg.mask_loss:
        mask_images = _check_masks(splits["train"], train_cfg.mask_missing)
    if mask_images:  # no mask at all (skip): no head, no fourth channel, as with the loss off
        mask_head = make_mask_head(
            model, model_cfg.arch, train_cfg.mask_layer, train_cfg.mask_loss, size, device
        )
        optimizer.add_param_group({"params": list(mask_head.parameters())})
    ema = make_ema(model, train_cfg.ema_decay)
    scored = ema.module if ema is not None else model  # what is validated, kept and saved
    probe = _loader(splits["train"], train_cfg, device, metadata.get("train"), shuffle=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train_cfg, len(probe)))
    scaler = grad_scaler(device, train_cfg.amp)

    key = fingerprint(
        model_cfg, train_cfg, data_version if color == "none" else f"{data_version}|{color}"
    )
    history: list[dict] = []
    best = {"score": -1.0, "epoch": -1, "state": None}
    first_epoch, resumed_from = 0, None
    checkpoint = Path(checkpoint)
    state = distributed.main_first(lambda: load_checkpoint(checkpoint, key, device))
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        best = state["best"]
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        if mask_head is not None and "mask_head" in state:
            mask_head.load_state_dict(state["mask_head"])
        first_epoch = resumed_from = state["epoch"] + 1

    runner = distributed.wrap_model(
        model,
        device,
        train_cfg.distributed.sync_batchnorm,
        find_unused=train_cfg.freeze_backbone_epochs > 0,  # a frozen backbone has no gradients
    )
    if train_cfg.compile:
        runner = torch.compile(runner)
    # The head in its own DDP wrapper (after the resume, so rank 0's state is what it
    # broadcasts): its gradients are averaged over the processes, as the classifier's are.
    head_runner = None if mask_head is None else distributed.wrap_model(mask_head, device, False)
    augment = build_augment(train_cfg, size)
    val_loader = _loader(splits["val"], train_cfg, device, metadata.get("val"), todo, shuffle=False)
    stale = 0
    with mask_head or contextlib.nullcontext(), progress_bar(show_progress) as bar:
        for epoch in range(first_epoch, train_cfg.epochs):
            if train_cfg.patience and history:
                stale = epoch - 1 - best["epoch"]
                if stale >= train_cfg.patience:
                    break
            seed_everything(
                distributed.rank_seed(train_cfg.seed * 1000 + epoch), train_cfg.deterministic
            )
            gen = torch.Generator().manual_seed(train_cfg.seed * 1000 + epoch)
            if train_cfg.weighted_sampler:
                sw = sampler_weights(torch.as_tensor(splits["train"].labels), counts)
                sampler = WeightedRandomSampler(sw, len(sw), replacement=True, generator=gen)
                loader = _loader(
                    splits["train"], train_cfg, device, metadata.get("train"), todo,
                    mask_head is not None, sampler=sampler,
                )  # fmt: skip
            else:
                loader = _loader(
                    splits["train"],
                    train_cfg,
                    device,
                    metadata.get("train"),
                    todo,
                    mask_head is not None,
                    shuffle=True,
                    generator=gen,
                )
            set_backbone_frozen(model, model_cfg.arch, epoch < train_cfg.freeze_backbone_epochs)
            lr = optimizer.param_groups[0]["lr"]
            w = epoch_class_weights(weights, epoch, train_cfg.drw_epoch)
            loss_fn = criterion(w, train_cfg.label_smoothing).to(device)
            t0 = time.perf_counter()
            train_loss = train_one_epoch(
                runner,
                loader,
                loss_fn,
                optimizer,
                scheduler,
                device,
                train_cfg,
                augment,
                epoch,
                scaler,
                bar,
                mix,
                ema,
                head_runner,
            )
            seconds = time.perf_counter() - t0
            # The bare module under DDP: each rank predicts its own shard, with no collectives.
            judged = ema.module if ema is not None else model if distributed.active() else runner
            val_metrics, _, _ = evaluate(judged, val_loader, eval_loss, device, classes)
            record = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_loss": val_metrics["loss"],
                "val_accuracy": val_metrics["accuracy"],
                "val_balanced_accuracy": val_metrics["balanced_accuracy"],
                "val_macro_f1": val_metrics["macro_f1"],
                "lr": lr,
                "images_per_s": len(loader.dataset) / seconds if seconds else 0.0,
            }
            history.append(record)
            if record["val_balanced_accuracy"] > best["score"]:
                best = {
                    "score": record["val_balanced_accuracy"],
                    "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in scored.state_dict().items()},
                }
            if distributed.is_main():
                save_checkpoint(
                    checkpoint,
                    {
                        "fingerprint": key,
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "history": history,
                        "best": best,
                        **({"ema": ema.state_dict()} if ema is not None else {}),
                        **({"mask_head": mask_head.state_dict()} if mask_head is not None else {}),
                    },
                )
            if on_epoch is not None:
                on_epoch(record)

    if train_cfg.distributed.sync_batchnorm:
        distributed.revert_sync_batchnorm(model)
    if best["state"] is not None:
        scored.load_state_dict(best["state"])
    set_backbone_frozen(scored, model_cfg.arch, False)
    test_loader = _loader(
        splits["test"], train_cfg, device, metadata.get("test"), todo, shuffle=False
    )
    final = with_tta(scored, train_cfg.tta)
    val, val_logits, val_labels = evaluate(final, val_loader, eval_loss, device, classes)
    test, test_logits, test_labels = evaluate(final, test_loader, eval_loss, device, classes)
    if prior is not None:
        extra["metadata_prior"] = prior.to_dict()
        extra["image_only"] = {
            "val_balanced_accuracy": val["balanced_accuracy"],
            "test_balanced_accuracy": test["balanced_accuracy"],
        }
        val, val_logits = with_prior(prior, splits["val"], val_logits, eval_loss, classes)
        test, test_logits = with_prior(prior, splits["test"], test_logits, eval_loss, classes)
    extra = {
        **extra,
        "color_constancy": color,
        "resize": splits["train"].resize,
        "tta": train_cfg.tta,
        "ema_decay": float(train_cfg.ema_decay),
        **({"mask_images": mask_images} if train_cfg.mask_loss else {}),
    }
    return TrainResult(
        model=scored.cpu().eval(),
        classes=classes,
        history=history,
        val=val,
        test=test,
        val_logits=val_logits,
        val_labels=val_labels,
        test_logits=test_logits,
        test_labels=test_labels,
        class_weights=[round(float(w), 6) for w in weights],
        device=str(device),
        precision=precision_name(device, train_cfg.amp),
        best_epoch=best["epoch"] + 1,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - start,
        image_size=size,
        extra=extra,
    )


def with_prior(
    prior: MetadataPrior,
    split: PreparedSplit,
    logits: np.ndarray,
    loss_fn: nn.Module,
    classes: list[str],
) -> tuple[dict, np.ndarray]:
    """A split's image logits plus the metadata prior, and the metrics of the sum.

    The sum is what the train stage writes to ``data/predictions``, so calibration, conformal
    sets, subgroups and the card all judge the fused answer, as ``dermaflow evaluate`` does.
    """
    fused = logits + prior.log_odds(split.rows)
    metrics = classification_metrics(fused, split.labels, classes)
    metrics["loss"] = float(loss_fn(torch.from_numpy(fused), torch.tensor(split.labels)).item())
    return metrics, fused


def build_metadata(splits: dict[str, PreparedSplit]) -> tuple[dict[str, np.ndarray], dict]:
    """Metadata matrices per split, one-hot over the training split's sites.

    Returns:
        ``{split: (N, D) float32}`` and the facts the bundle keeps (feature names, sites).
    """
    sites = site_vocabulary(splits["train"].rows)
    features = {name: metadata_features(s.rows, sites) for name, s in splits.items()}
    return features, {"metadata_features": feature_names(sites), "metadata_sites": sites}


def save_model_bundle(path: Path, result: TrainResult, arch: str, data_version: str) -> None:
    """The trained model as a bundle, the same for the train stage, compare and tune.

    The bundle holds the raw model (temperature 1.0): calibration is fitted afterwards on the
    validation logits and travels as ``calibrator.json`` beside it (the calibrate stage's out,
    or the ``calibrate/`` artifact of the model's MLflow run), never baked into the weights.
    """
    from tasks.models import save_bundle

    save_bundle(
        path, result.model, arch, result.classes, result.image_size, MEAN, STD, temperature=1.0,
        data_version=data_version, extra=result.extra,
    )  # fmt: skip


def save_outputs(
    result: TrainResult,
    arch: str,
    data_version: str,
    bundle: Path,
    predictions_dir: Path,
    report_dir: Path,
    prepared_dir: Path,
    log_lines: list[str],
) -> dict:
    """Write the model bundle, val/test predictions, pictures, plot data and the log.

    Returns:
        ``summary`` (the DVC metrics JSON), ``flat`` (scalars for MLflow) and
        ``input_example`` (two normalised test images, for the MLflow model signature).
    """
    from tasks import metrics as ev
    from tasks.io import write_json, write_text

    save_model_bundle(bundle, result, arch, data_version)
    for split, logits, labels in (
        ("val", result.val_logits, result.val_labels),
        ("test", result.test_logits, result.test_labels),
    ):
        ids = open_split(prepared_dir, split).rows["image_id"].to_numpy()
        ev.save_predictions(predictions_dir / f"{split}.npz", logits, labels, ids, result.classes)
    cm = np.asarray(result.test["confusion_matrix"])
    figures = {
        "confusion_matrix.png": ev.plot_confusion_matrix(cm, result.classes, normalize=False),
        "confusion_matrix_normalized.png": ev.plot_confusion_matrix(
            cm, result.classes, normalize=True
        ),
        "roc_curves.png": ev.plot_roc_curves(
            result.test_logits, result.test_labels, result.classes
        ),
        "training_curves.png": ev.plot_training_curves(result.history),
    }
    for name, fig in figures.items():
        ev.save_figure(fig, report_dir / name)
    preds = result.test_logits.argmax(axis=1)
    write_json(report_dir / "history.json", result.history)
    write_json(
        report_dir / "confusion.json", ev.confusion_rows(result.test_labels, preds, result.classes)
    )
    write_json(
        report_dir / "roc.json",
        ev.roc_points(result.test_logits, result.test_labels, result.classes),
    )
    weights = dict(zip(result.classes, result.class_weights, strict=True))
    log_lines = [
        *log_lines,
        f"class_weights={weights}",
        f"device={result.device} precision={result.precision} best_epoch={result.best_epoch} "
        f"resumed_from_epoch={result.resumed_from}",
    ]
    write_text(report_dir / "train.log", "\n".join(log_lines) + "\n")
    flat = {**ev.flat_metrics(result.val, "best_val"), **ev.flat_metrics(result.test, "test")}
    flat.update({f"class_weight_{c}": w for c, w in weights.items()})
    flat["train_seconds"] = result.seconds
    summary = {
        "val": {k: v for k, v in result.val.items() if k != "per_class"},
        "test": {k: v for k, v in result.test.items() if k != "per_class"},
        "test_per_class": result.test["per_class"],
        "class_weights": weights,
        "best_epoch": result.best_epoch,
        "device": result.device,
        "precision": result.precision,
        "seconds": round(result.seconds, 1),
    }
    image_only = result.extra.get("image_only")
    if image_only:  # the metadata prior's gain, next to the fused numbers above
        summary["image_only"] = image_only
        flat.update({f"image_only_{k}": v for k, v in image_only.items()})
    test_images = np.array(open_split(prepared_dir, "test").images[:2])
    example = to_input(torch.from_numpy(test_images), torch.device("cpu")).numpy()
    return {"summary": summary, "flat": flat, "input_example": example.astype(np.float32)}


def run(p: Params) -> dict:
    """The ``train`` stage: train on the cache, write the outs, open the MLflow lineage run.

    The run holds the resolved params, the data version, per-epoch curves, the final metrics,
    the data and split reports, the figures, the log and the registered model; calibrate,
    export and explain append to it (its id is in ``models/run.json``).

    With ``train.distributed`` asking for several processes, the stage re-launches itself
    under torchrun (:func:`tasks.distributed.launch`); in each worker, rank 0 does all of the
    above and the other ranks only train beside it (:mod:`tasks.distributed`).
    """
    check_cache(paths.PREPARED, p.prepare)  # a hand-run stage trains on the cache as it is
    if distributed.wants_launch(p.train.distributed):
        d = p.train.distributed
        processes = d.nproc_per_node * d.nnodes
        console.print(
            f"train: {processes} processes ({d.nnodes} node(s)) under torchrun; global batch "
            f"{p.train.batch_size}, {p.train.batch_size // processes} per process",
            highlight=False,
        )
        launched = time.time()
        distributed.launch(p, "tasks.train")
        summary = paths.METRICS / "train.json"  # on the node of rank 0 only
        fresh = summary.exists() and summary.stat().st_mtime >= launched
        return json.loads(summary.read_text()) if fresh else {}
    with distributed.process_group(p.train.distributed, p.train.device):
        if not distributed.is_main():
            train(
                p.model, p.train, paths.PREPARED, paths.CHECKPOINT, data_version(),
                show_progress=False, color=p.prepare.color_constancy,
            )  # fmt: skip
            return {}
        return _run_main(p)


def _run_main(p: Params) -> dict:
    """:func:`run` in its one process, or on rank 0 of several."""
    from tasks import tracking
    from tasks.io import write_json, write_text

    version = data_version()
    tags = {
        "git_commit": tracking.git_commit(),
        "data_version": version,
        "dataset": p.dataset.name,
        "arch": p.model.arch,
        **tracking.environment_tags(),
    }
    log_lines: list[str] = []
    started, first_epoch = time.perf_counter(), []

    def on_epoch(record: dict) -> None:
        """One line per epoch, live: the console, the MLflow run and ``train.log`` as it goes."""
        first_epoch.append(first_epoch[0] if first_epoch else record["epoch"])
        done = record["epoch"] - first_epoch[0] + 1  # epochs run by this call (after a resume)
        eta = (time.perf_counter() - started) / done * (p.train.epochs - record["epoch"])
        line = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
        )
        log_lines.append(line)
        write_text(paths.TRAIN_REPORTS / "train.log", "\n".join(log_lines) + "\n")
        console.print(
            f"train: epoch {record['epoch']}/{p.train.epochs} (ETA {eta / 60:.1f} min) {line}",
            highlight=False,
        )
        tracking.log_metrics(
            {k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"]
        )

    experiment = p.tracking.experiment or p.dataset.name
    run_name = f"{p.dataset.name}-{p.model.arch}"
    # run.json (with the bundle's hash) is written only when this block succeeds.
    with tracking.lineage_run(experiment, run_name, tags, bundle=paths.BUNDLE) as mlrun:
        tracking.log_params(p.as_flat_dict())
        tracking.log_data_lineage(
            {
                "train": read_split(paths.SPLITS, "train"),
                "validation": read_split(paths.SPLITS, "val"),
                "test": read_split(paths.SPLITS, "test"),
            },
            source=str(Path(p.dataset.root).resolve()),
            version=version,
            name=p.dataset.name,
        )
        result = train(
            p.model, p.train, paths.PREPARED, paths.CHECKPOINT, version, on_epoch,
            color=p.prepare.color_constancy,
        )  # fmt: skip
        final = save_outputs(
            result, p.model.arch, version, paths.BUNDLE, paths.PREDICTIONS, paths.TRAIN_REPORTS,
            paths.PREPARED, log_lines,
        )  # fmt: skip
        write_json(paths.METRICS / "train.json", final["summary"])
        model_name = tracking.registered_model_name(
            p.tracking.registered_model, p.dataset.name, result.classes
        )
        tracking.set_tags(
            {
                "device": result.device,
                "precision": result.precision,
                "best_epoch": str(result.best_epoch),
                "processes": str(distributed.world_size()),
            }
        )
        tracking.log_metrics(final["flat"])
        tracking.log_artifacts(
            {
                "train": paths.TRAIN_REPORTS,
                "data": paths.REPORTS,
                "data/split": paths.METRICS / "split.json",
                "bundle": paths.BUNDLE,
            }
        )
        model_uri, model_version = tracking.log_pytorch_model(
            result.model, final["input_example"], model_name
        )
        if model_version:  # the gate refuses a task mismatch from this tag, weights unloaded
            tracking.set_version_classes(model_name, model_version, result.classes)
            tracking.set_version_tags(
                model_name, model_version, {"data_version": version, "dataset": p.dataset.name}
            )
            tracking.describe_version(
                model_name,
                model_version,
                f"{p.model.arch} trained on {p.dataset.name} (data version {version}), "
                f"{len(result.classes)} classes: {', '.join(result.classes)}. Test balanced "
                f"accuracy {result.test['balanced_accuracy']:.3f}, accuracy "
                f"{result.test['accuracy']:.3f} (uncalibrated; see the run for calibration, "
                "export and explanations).",
            )
        tracking.update_run_file(
            model_uri=model_uri, model_version=model_version, registered_model=model_name
        )
    console.print(
        f"train: test balanced accuracy {result.test['balanced_accuracy']:.3f} "
        f"(accuracy {result.test['accuracy']:.3f}, chance {1 / len(result.classes):.3f}); "
        f"MLflow run {mlrun.info.run_id}, {model_name} v{model_version}"
    )
    return final["summary"]


if __name__ == "__main__":
    raise SystemExit(main("train"))
