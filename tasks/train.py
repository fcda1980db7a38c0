"""Train: fine-tune a classifier on the prepared cache, resumably, with class reweighting.

Shaped like torchvision's classification reference: :func:`train_one_epoch` and
:func:`evaluate` are the loop bodies and :func:`train` strings them together with the
checkpointing. Nothing here talks to MLflow; the CLI entry passes an ``on_epoch`` callback.

Resuming is exact on the CPU with ``deterministic: true``: every epoch reseeds torch, numpy and
the shuffling generator from ``(seed, epoch)``, so an epoch replayed after a crash draws the same
batches, augmentations and dropout masks as the lost one did.
"""

from __future__ import annotations

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
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2

from tasks.config import ModelConfig, TrainConfig
from tasks.evaluate import classification_metrics
from tasks.fusion import EMBED, FusionNet, feature_names, metadata_features, site_vocabulary
from tasks.io import atomic_path
from tasks.losses import class_weights, make_loss, sampler_weights
from tasks.models import build_model, set_backbone_frozen
from tasks.prepare import PreparedSplit, open_split
from tasks.progress import progress_bar

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
    the label to the model as further inputs.
    """

    def __init__(self, split: PreparedSplit, metadata: np.ndarray | None = None) -> None:
        self.images = split.images
        self.labels = split.labels
        self.metadata = None if metadata is None else torch.from_numpy(metadata)

    def __getstate__(self) -> dict:
        """Loader workers start by forkserver: send the cache's file name, not its pixels."""
        state = self.__dict__.copy()
        images = self.images
        if isinstance(images, np.memmap) and images.filename:
            whole = np.load(images.filename, mmap_mode="r")
            if whole.shape == images.shape:
                state["images"] = ("npy", str(images.filename))
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["images"], tuple):
            state["images"] = np.load(state["images"][1], mmap_mode="r")
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple:
        image = torch.from_numpy(np.array(self.images[i]))
        if self.metadata is None:
            return image, int(self.labels[i])
        return image, self.metadata[i], int(self.labels[i])


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
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def build_augment(cfg: TrainConfig, size: int) -> v2.Transform:
    """The training augmentations, on float images in [0, 1] (on the GPU when present)."""
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
    return v2.Compose(steps) if steps else v2.Identity()


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


def autocast(device: torch.device, amp: str):
    """bf16/fp16 autocast on CUDA; the CPU always runs float32 (exact, resumable)."""
    enabled = device.type == "cuda" and amp in {"bf16", "fp16"}
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    cfg: TrainConfig,
    augment: v2.Transform,
    epoch: int,
    scaler: torch.amp.GradScaler | None = None,
    progress: Progress | None = None,
) -> float:
    """One pass over ``loader``; returns the mean training loss. Stops on a non-finite loss."""
    model.train()
    channels_last = cfg.channels_last and device.type == "cuda"
    total, count = 0.0, 0
    task = progress.add_task(f"epoch {epoch + 1} train", total=len(loader)) if progress else None
    for step, (images, *extra, labels) in enumerate(loader):
        x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        x = torch.stack([augment(img) for img in x])
        x = normalize(x, channels_last)
        y = labels.to(device, non_blocking=True)
        extra = [e.to(device, non_blocking=True) for e in extra]  # metadata of fusion models
        with autocast(device, cfg.amp):
            loss = loss_fn(model(x, *extra).float(), y)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                "lower train.lr, check the inputs, or switch train.amp to bf16/none"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        total += loss.item() * len(y)
        count += len(y)
        if progress is not None:
            progress.advance(task)
    if progress is not None:
        progress.remove_task(task)
    return total / max(count, 1)


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: str = "none"
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and labels over a loader, in loader order."""
    model.eval()
    logits, labels = [], []
    for images, *extra, y in loader:
        with autocast(device, amp):
            out = model(to_input(images, device), *[e.to(device) for e in extra])
        logits.append(out.float().cpu())
        labels.append(y)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


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
    seconds: float = 0.0
    image_size: int = 0
    extra: dict = field(default_factory=dict)


def fingerprint(model_cfg: ModelConfig, train_cfg: TrainConfig, data_version: str) -> str:
    """What a checkpoint must match to be resumed: the configs and the data version."""
    blob = json.dumps([asdict(model_cfg), asdict(train_cfg), data_version], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _loader(
    split: PreparedSplit,
    cfg: TrainConfig,
    device: torch.device,
    metadata: np.ndarray | None = None,
    **kw,
) -> DataLoader:
    # forkserver, not fork: a forked worker inherits the parent's threads and handlers (a
    # Prefect task's, for one) and can die on start; the cache re-opens by file name.
    context = "forkserver" if cfg.workers > 0 else None
    return DataLoader(
        CachedImages(split, metadata),
        batch_size=cfg.batch_size,
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
) -> TrainResult:
    """Train on the prepared cache, resuming from ``checkpoint`` when it matches.

    Args:
        model_cfg: architecture and weights.
        train_cfg: optimisation, imbalance handling, augmentation, device.
        prepared_dir: the prepare stage's output.
        checkpoint: written after every epoch (atomically); resumed from when its fingerprint
            (configs + data version) matches, ignored otherwise.
        data_version: identifies the data (e.g. the manifest hash) for the fingerprint.
        on_epoch: called with each epoch's record (for live MLflow logging).
        show_progress: rich progress bars.
    """
    start = time.perf_counter()
    device = pick_device(train_cfg.device)
    seed_everything(train_cfg.seed, train_cfg.deterministic)
    splits = {s: open_split(prepared_dir, s) for s in ("train", "val", "test")}
    classes = splits["train"].classes
    size = splits["train"].images.shape[1]
    counts = np.bincount(splits["train"].labels, minlength=len(classes))
    weights = class_weights(counts, train_cfg.class_weights, train_cfg.beta)
    loss_fn = make_loss(
        train_cfg.loss, weights, train_cfg.focal_gamma, train_cfg.label_smoothing
    ).to(device)
    eval_loss = make_loss(train_cfg.loss, weights, train_cfg.focal_gamma, 0.0)

    metadata, extra = build_metadata(splits) if model_cfg.metadata else ({}, {})
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
    if train_cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, train_cfg)
    probe = _loader(splits["train"], train_cfg, device, metadata.get("train"), shuffle=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train_cfg, len(probe)))
    scaler = (
        torch.amp.GradScaler("cuda") if device.type == "cuda" and train_cfg.amp == "fp16" else None
    )

    key = fingerprint(model_cfg, train_cfg, data_version)
    history: list[dict] = []
    best = {"score": -1.0, "epoch": -1, "state": None}
    first_epoch, resumed_from = 0, None
    checkpoint = Path(checkpoint)
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("fingerprint") == key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            history = state["history"]
            best = state["best"]
            first_epoch = resumed_from = state["epoch"] + 1

    runner = model
    if train_cfg.compile:
        runner = torch.compile(model)
    augment = build_augment(train_cfg, size)
    val_loader = _loader(splits["val"], train_cfg, device, metadata.get("val"), shuffle=False)
    stale = 0
    with progress_bar(show_progress) as bar:
        for epoch in range(first_epoch, train_cfg.epochs):
            if train_cfg.patience and history:
                stale = epoch - 1 - best["epoch"]
                if stale >= train_cfg.patience:
                    break
            seed_everything(train_cfg.seed * 1000 + epoch, train_cfg.deterministic)
            gen = torch.Generator().manual_seed(train_cfg.seed * 1000 + epoch)
            if train_cfg.weighted_sampler:
                sw = sampler_weights(torch.as_tensor(splits["train"].labels), counts)
                sampler = WeightedRandomSampler(sw, len(sw), replacement=True, generator=gen)
                loader = _loader(
                    splits["train"], train_cfg, device, metadata.get("train"), sampler=sampler
                )
            else:
                loader = _loader(
                    splits["train"],
                    train_cfg,
                    device,
                    metadata.get("train"),
                    shuffle=True,
                    generator=gen,
                )
            set_backbone_frozen(model, model_cfg.arch, epoch < train_cfg.freeze_backbone_epochs)
            lr = optimizer.param_groups[0]["lr"]
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
            )
            seconds = time.perf_counter() - t0
            val_metrics, _, _ = evaluate(runner, val_loader, eval_loss, device, classes)
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
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                }
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
                },
            )
            if on_epoch is not None:
                on_epoch(record)

    if best["state"] is not None:
        model.load_state_dict(best["state"])
    set_backbone_frozen(model, model_cfg.arch, False)
    test_loader = _loader(splits["test"], train_cfg, device, metadata.get("test"), shuffle=False)
    val, val_logits, val_labels = evaluate(model, val_loader, eval_loss, device, classes)
    test, test_logits, test_labels = evaluate(model, test_loader, eval_loss, device, classes)
    return TrainResult(
        model=model.cpu().eval(),
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
        best_epoch=best["epoch"] + 1,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - start,
        image_size=size,
        extra=extra,
    )


def build_metadata(splits: dict[str, PreparedSplit]) -> tuple[dict[str, np.ndarray], dict]:
    """Metadata matrices per split, one-hot over the training split's sites.

    Returns:
        ``{split: (N, D) float32}`` and the facts the bundle keeps (feature names, sites).
    """
    sites = site_vocabulary(splits["train"].rows)
    features = {name: metadata_features(s.rows, sites) for name, s in splits.items()}
    return features, {"metadata_features": feature_names(sites), "metadata_sites": sites}


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
    from tasks import evaluate as ev
    from tasks.io import write_json, write_text
    from tasks.models import save_bundle

    save_bundle(
        bundle,
        result.model,
        arch,
        result.classes,
        result.image_size,
        MEAN,
        STD,
        temperature=1.0,
        data_version=data_version,
        extra=result.extra,
    )
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
        f"device={result.device} best_epoch={result.best_epoch} "
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
        "seconds": round(result.seconds, 1),
    }
    test_images = np.array(open_split(prepared_dir, "test").images[:2])
    example = to_input(torch.from_numpy(test_images), torch.device("cpu")).numpy()
    return {"summary": summary, "flat": flat, "input_example": example.astype(np.float32)}
