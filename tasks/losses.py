"""Losses and re-balancing for imbalanced lesion classes.

Dermoscopy sets are heavily skewed (ISIC 2019: half naevi, under 1 % dermatofibroma), so the
trainer can counter the imbalance three ways, alone or together: per-class loss weights
(:func:`class_weights`), a loss that focuses on hard examples (:class:`FocalLoss`), and a
sampler that draws classes evenly (:func:`sampler_weights`).

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
LOSSES = ("ce", "focal")


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


def make_loss(
    kind: str,
    weights: torch.Tensor | None = None,
    gamma: float = 2.0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """The training criterion for ``train.loss``: ``ce`` or ``focal`` (``gamma`` ignored by ce)."""
    if kind == "ce":
        return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)
    if kind == "focal":
        return FocalLoss(weight=weights, gamma=gamma, label_smoothing=label_smoothing)
    raise ValueError(f"train.loss must be one of {'|'.join(LOSSES)}, got {kind!r}")


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
