"""Losses and re-balancing for imbalanced lesion classes.

Dermoscopy sets are heavily skewed (ISIC 2019: half naevi, under 1 % dermatofibroma), so the
trainer can counter the imbalance several ways, alone or together: per-class loss weights
(:func:`class_weights`), switched on late (deferred re-weighting, :func:`epoch_class_weights`),
a loss that focuses on hard examples (:class:`FocalLoss`), a loss that shifts the logits by the
class prior (:class:`LogitAdjustedLoss`), and a sampler that draws classes evenly
(:func:`sampler_weights`).

Targets are class indices ``(N,)`` or, after Mixup / CutMix, class probabilities ``(N, C)``;
cross-entropy and the logit-adjusted loss take both, the focal loss only indices.

Class weights are normalised so that the mean weight per *training sample* is 1. The loss
therefore keeps the scale of the unweighted loss, and ``train.lr`` means the same whichever
weighting mode is chosen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_MODES = ("none", "inverse", "sqrt_inverse", "effective_number")
LOSSES = ("ce", "focal", "logit_adjusted")


def class_counts(labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int) -> list[int]:
    """Samples per class index (``0 .. num_classes-1``), zeros included."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    return np.bincount(labels, minlength=num_classes).tolist()


def class_weights(counts: Sequence[int], mode: str, beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights for ``train.class_weights``.

    Modes: ``none`` (all 1), ``inverse`` (proportional to 1/n_c), ``sqrt_inverse`` (1/sqrt(n_c),
    a milder correction that over-fits rare classes less) and ``effective_number``
    ((1 - beta) / (1 - beta**n_c), Cui et al. 2019: repeated views of a rare class add less
    than new samples; beta -> 0 gives uniform weights, beta -> 1 gives inverse frequency).

    Args:
        counts: training samples per class, in class-index order.
        mode: one of :data:`WEIGHT_MODES`.
        beta: effective_number only; in [0, 1).

    Returns:
        float32 tensor ``w`` with ``sum(w * counts) == sum(counts)``.

    Raises:
        ValueError: unknown mode, beta outside [0, 1), or a class with no samples (its weight
            would be infinite; upstream, the class is missing from the training split).
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(
            f"class weights mode must be one of {'|'.join(WEIGHT_MODES)}, got {mode!r}"
        )
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError(f"counts must be a non-empty list of per-class counts, got {counts!r}")
    for index, count in enumerate(n):
        if count <= 0:
            raise ValueError(
                f"class index {index} has {int(count)} training samples; every class needs at "
                "least one to be weighted (check the split, or drop the class)"
            )
    if mode == "none":
        raw = np.ones_like(n)
    elif mode == "inverse":
        raw = 1.0 / n
    elif mode == "sqrt_inverse":
        raw = 1.0 / np.sqrt(n)
    else:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"effective_number needs 0 <= beta < 1, got {beta}")
        # 1 - beta**n, computed as -expm1(n log beta) so beta near 1 keeps its precision
        raw = (1.0 - beta) / -np.expm1(n * np.log(beta)) if beta > 0 else np.ones_like(n)
    weights = raw * n.sum() / (raw * n).sum()
    return torch.as_tensor(weights, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017) with per-class weights and label smoothing.

    Each class term of the (smoothed) cross-entropy is scaled by ``(1 - p_c) ** gamma``, so
    examples the model already gets right with confidence contribute little and training
    concentrates on the hard, often rare-class, ones. Smoothing and weighting follow
    ``nn.CrossEntropyLoss`` exactly (target mass ``1 - eps`` on the label and ``eps / C`` spread
    over all classes; the mean divides by the summed weight of the targets), so with
    ``gamma = 0`` this *is* ``nn.CrossEntropyLoss(weight, label_smoothing)``.

    Args:
        weight: per-class weights (Lin et al.'s alpha), shape ``(C,)``; None for all ones.
        gamma: focusing parameter (>= 0); 2 is the paper's default.
        label_smoothing: eps in [0, 1).
        reduction: ``mean`` | ``sum`` | ``none``.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        gamma: float = 2.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if reduction not in {"mean", "sum", "none"}:
            raise ValueError(f"reduction must be mean|sum|none, got {reduction!r}")
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        # a buffer so that .to(device) moves it with the module; not part of any checkpoint
        self.register_buffer(
            "weight",
            None if weight is None else torch.as_tensor(weight, dtype=torch.float32),
            persistent=False,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits``: (N, C) raw scores; ``target``: (N,) class indices."""
        if target.ndim != 1:
            raise ValueError(
                "train.loss=focal takes class indices, not the soft targets of Mixup / CutMix; "
                "set train.mixup_alpha=0 and train.cutmix_alpha=0, or use train.loss=ce | "
                "logit_adjusted"
            )
        num_classes = logits.shape[1]
        log_p = F.log_softmax(logits.float(), dim=1)
        per_class = -log_p  # (N, C): cross-entropy of each class as the target
        if self.gamma > 0:
            # clamp: (1 - p)**gamma has an infinite slope at p = 1 for gamma < 1
            focus = (1.0 - log_p.exp()).clamp(min=torch.finfo(log_p.dtype).eps)
            per_class = per_class * focus.pow(self.gamma)
        weight = (
            torch.ones(num_classes, device=logits.device)
            if self.weight is None
            else self.weight.to(logits.device)
        )
        if weight.numel() != num_classes:
            raise ValueError(f"focal loss has {weight.numel()} class weights for {num_classes}")
        target_weight = weight[target]
        loss = target_weight * per_class.gather(1, target[:, None]).squeeze(1)
        if self.label_smoothing > 0:
            eps = self.label_smoothing
            loss = (1.0 - eps) * loss + eps / num_classes * (per_class * weight).sum(dim=1)
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        return loss.sum() / target_weight.sum()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, label_smoothing={self.label_smoothing}"


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted cross-entropy (Menon et al. 2021, "Long-tail learning via logit adjustment").

    The loss is cross-entropy on ``logits + tau * log(prior)``: rare classes must win by a
    margin that grows as their prior shrinks, which makes the *unadjusted* logits (used at
    inference, unchanged) consistent for the balanced error. ``tau = 1`` is the balanced
    softmax of Ren et al. (2020). Hand-written because torch has no prior-shifted
    cross-entropy; the shift is one addition before ``F.cross_entropy``, which keeps class
    weights, label smoothing and soft (Mixup / CutMix) targets exactly as torch defines them.

    Args:
        prior: training class frequencies ``(C,)`` (counts or probabilities; normalised here).
        tau: strength of the adjustment (>= 0); 0 is plain cross-entropy.
        weight: optional per-class weights, as in ``nn.CrossEntropyLoss``.
        label_smoothing: eps in [0, 1).
    """

    def __init__(
        self,
        prior: torch.Tensor | Sequence[float],
        tau: float = 1.0,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        prior = torch.as_tensor(prior, dtype=torch.float32)
        if tau < 0:
            raise ValueError(f"logit adjustment tau must be >= 0, got {tau}")
        if prior.ndim != 1 or bool((prior <= 0).any()):
            raise ValueError(f"the class prior must be positive for every class, got {prior}")
        self.tau = float(tau)
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("shift", tau * torch.log(prior / prior.sum()), persistent=False)
        self.register_buffer(
            "weight",
            None if weight is None else torch.as_tensor(weight, dtype=torch.float32),
            persistent=False,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits``: (N, C); ``target``: (N,) indices or (N, C) probabilities."""
        return F.cross_entropy(
            logits.float() + self.shift.to(logits.device),
            target,
            weight=None if self.weight is None else self.weight.to(logits.device),
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return f"tau={self.tau}, label_smoothing={self.label_smoothing}"


def make_loss(
    kind: str,
    weights: torch.Tensor | None = None,
    gamma: float = 2.0,
    label_smoothing: float = 0.0,
    prior: torch.Tensor | Sequence[float] | None = None,
    tau: float = 1.0,
) -> nn.Module:
    """The training criterion for ``train.loss``: ``ce``, ``focal`` or ``logit_adjusted``.

    ``gamma`` is the focal loss's; ``prior`` (the training class counts) and ``tau`` are the
    logit-adjusted loss's, which needs ``prior``.
    """
    if kind == "ce":
        return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)
    if kind == "focal":
        return FocalLoss(weight=weights, gamma=gamma, label_smoothing=label_smoothing)
    if kind == "logit_adjusted":
        if prior is None:
            raise ValueError("train.loss=logit_adjusted needs the training class counts")
        return LogitAdjustedLoss(prior, tau, weights, label_smoothing)
    raise ValueError(f"train.loss must be one of {'|'.join(LOSSES)}, got {kind!r}")


def epoch_class_weights(weights: torch.Tensor, epoch: int, drw_epoch: int) -> torch.Tensor:
    """Deferred re-weighting (Cao et al. 2019): uniform weights first, class weights later.

    The features are learnt on the natural distribution, where they are best, and the
    re-weighting only moves the decision boundaries in the last epochs.

    Args:
        weights: the class weights of ``train.class_weights``.
        epoch: 0-based epoch index.
        drw_epoch: ``train.drw_epoch``; the weights apply from this 0-based epoch on (the
            epoch numbered ``drw_epoch + 1`` in the logs); 0 = always on (no deferral).
    """
    if drw_epoch > 0 and epoch < drw_epoch:
        return torch.ones_like(weights)
    return weights


def sampler_weights(
    labels: Sequence[int] | np.ndarray | torch.Tensor, counts: Sequence[int] | None = None
) -> torch.Tensor:
    """Per-sample weights for ``WeightedRandomSampler`` that draw every class equally often.

    Each sample gets ``1 / n_c`` of its class, so every class has total weight 1. ``counts``
    defaults to the counts of ``labels`` themselves.

    Returns:
        float64 tensor of ``len(labels)`` weights (the sampler's native dtype).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if counts is None:
        counts = np.bincount(labels) if labels.size else np.zeros(0)
    n = np.asarray(counts, dtype=np.float64)
    if labels.size and (labels.min() < 0 or labels.max() >= n.size):
        raise ValueError(f"labels must lie in [0, {n.size}) to match {n.size} class counts")
    per_sample = n[labels]
    if (per_sample <= 0).any():
        bad = int(labels[np.argmax(per_sample <= 0)])
        raise ValueError(f"class index {bad} occurs in labels but has count 0 in counts")
    return torch.as_tensor(1.0 / per_sample, dtype=torch.float64)
