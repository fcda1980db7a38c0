"""Class weights, focal loss and the class-balancing sampler, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import WeightedRandomSampler

from tasks.losses import (
    WEIGHT_MODES,
    FocalLoss,
    class_counts,
    class_weights,
    make_loss,
    sampler_weights,
)

COUNTS = [100, 10, 1]  # 111 samples, a 100:1 imbalance


@pytest.mark.parametrize("mode", WEIGHT_MODES)
def test_mean_weight_per_sample_is_one(mode: str) -> None:
    w = class_weights(COUNTS, mode)
    assert w.dtype == torch.float32 and w.shape == (3,)
    assert float((w.double() * torch.tensor(COUNTS, dtype=torch.float64)).sum()) == pytest.approx(
        111.0, rel=1e-6
    )


def test_none_is_uniform() -> None:
    assert torch.equal(class_weights(COUNTS, "none"), torch.ones(3))


def test_inverse_by_hand() -> None:
    # raw 1/n = [0.01, 0.1, 1]; sum(raw * n) = 3; scale 111 / 3 = 37
    w = class_weights(COUNTS, "inverse")
    assert w.tolist() == pytest.approx([0.37, 3.7, 37.0], rel=1e-6)


def test_sqrt_inverse_by_hand() -> None:
    # raw 1/sqrt(n) = [0.1, 1/sqrt(10), 1]; sum(raw * n) = 11 + sqrt(10); scale 111 / that
    scale = 111 / (11 + math.sqrt(10))  # 7.83772...
    w = class_weights(COUNTS, "sqrt_inverse")
    assert w.tolist() == pytest.approx([0.1 * scale, scale / math.sqrt(10), scale], rel=1e-6)
    assert float(w[2] / w[0]) == pytest.approx(10.0, rel=1e-6)


def test_effective_number_by_hand() -> None:
    # beta 0.9: raw (1 - 0.9) / (1 - 0.9**n) = [0.1000026562, 0.1 / 0.6513215599, 1.0]
    w = class_weights(COUNTS, "effective_number", beta=0.9)
    assert w.tolist() == pytest.approx([0.885501286, 1.359509374, 8.854777659], rel=1e-6)


def test_effective_number_limits() -> None:
    assert class_weights(COUNTS, "effective_number", beta=0.0).tolist() == pytest.approx([1.0] * 3)
    assert class_weights(COUNTS, "effective_number", beta=1e-9).tolist() == pytest.approx([1.0] * 3)
    near_one = class_weights(COUNTS, "effective_number", beta=1 - 1e-9)
    assert near_one.tolist() == pytest.approx(class_weights(COUNTS, "inverse").tolist(), rel=1e-5)


def test_weight_errors_name_the_culprit() -> None:
    with pytest.raises(ValueError, match="class index 1 has 0 training samples"):
        class_weights([5, 0, 3], "inverse")
    with pytest.raises(ValueError, match="none|inverse"):
        class_weights(COUNTS, "balanced")
    with pytest.raises(ValueError, match="beta"):
        class_weights(COUNTS, "effective_number", beta=1.0)


def test_class_counts() -> None:
    assert class_counts([0, 2, 2, 2], 4) == [1, 0, 3, 0]
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        class_counts([0, 2], 2)


# ---------------------------------------------------------------------------------------------
# Focal loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_with_gamma_zero_is_cross_entropy(smoothing: float, weighted: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 5, requires_grad=True)
    target = torch.randint(0, 5, (16,))
    weight = class_weights([40, 20, 10, 5, 1], "sqrt_inverse") if weighted else None

    focal = FocalLoss(weight=weight, gamma=0.0, label_smoothing=smoothing)(logits, target)
    ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)(logits, target)
    assert focal.item() == pytest.approx(ce.item(), rel=1e-6)
    (grad_focal,) = torch.autograd.grad(focal, logits)
    (grad_ce,) = torch.autograd.grad(ce, logits)
    # Gradients of O(1/N) computed through two op sequences: a few float32 ulps apart.
    torch.testing.assert_close(grad_focal, grad_ce, rtol=1e-5, atol=1e-6)


def test_focal_downweights_easy_examples() -> None:
    easy = torch.tensor([[4.0, 0.0, 0.0]])  # p(target) = 0.96
    hard = torch.tensor([[0.0, 2.0, 0.0]])  # p(target) = 0.11
    target = torch.tensor([0])
    ce_easy = float(nn.functional.cross_entropy(easy, target))
    ce_hard = float(nn.functional.cross_entropy(hard, target))

    easy_losses = [float(FocalLoss(gamma=g)(easy, target)) for g in (0.0, 0.5, 1.0, 2.0, 5.0)]
    assert easy_losses[0] == pytest.approx(ce_easy)
    assert all(a > b for a, b in zip(easy_losses, easy_losses[1:], strict=False))
    assert easy_losses[3] < 0.01 * ce_easy  # (1 - 0.96)**2 = 0.0016
    assert float(FocalLoss(gamma=2.0)(hard, target)) > 0.75 * ce_hard  # (1 - 0.11)**2 = 0.79


def test_focal_gradient_is_finite_when_certain() -> None:
    logits = torch.tensor([[60.0, 0.0, 0.0]], requires_grad=True)
    loss = FocalLoss(gamma=0.5, label_smoothing=0.1)(logits, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_focal_reductions_and_weight_shape() -> None:
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    per_sample = FocalLoss(gamma=2.0, reduction="none")(logits, target)
    assert per_sample.shape == (4,)
    assert float(FocalLoss(gamma=2.0, reduction="sum")(logits, target)) == pytest.approx(
        float(per_sample.sum())
    )
    with pytest.raises(ValueError, match="2 class weights for 3"):
        FocalLoss(weight=torch.ones(2))(logits, target)


def test_make_loss() -> None:
    weight = torch.tensor([1.0, 2.0])
    ce = make_loss("ce", weight, label_smoothing=0.1)
    assert isinstance(ce, nn.CrossEntropyLoss) and ce.label_smoothing == 0.1
    assert torch.equal(ce.weight, weight)
    focal = make_loss("focal", weight, gamma=3.0)
    assert isinstance(focal, FocalLoss) and focal.gamma == 3.0
    with pytest.raises(ValueError, match="ce|focal"):
        make_loss("hinge")


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------


def test_sampler_weights_by_hand() -> None:
    labels = [0, 0, 0, 1, 2, 2]
    w = sampler_weights(labels, [3, 1, 2])
    assert w.dtype == torch.float64
    assert w.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5])
    assert torch.equal(sampler_weights(labels), w)
    with pytest.raises(ValueError, match="class index 1"):
        sampler_weights(labels, [3, 0, 2])


def test_sampler_draws_classes_evenly() -> None:
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    sampler = WeightedRandomSampler(
        sampler_weights(labels), num_samples=6000, generator=torch.Generator().manual_seed(0)
    )
    drawn = np.bincount(labels[list(sampler)], minlength=3) / 6000
    assert drawn.tolist() == pytest.approx([1 / 3] * 3, abs=0.03)
