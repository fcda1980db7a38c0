"""The training augmentations: the batched (GPU) path draws from the CPU path's distributions.

The CPU path is torchvision v2 one image at a time (its exact RNG use is what a resumed run
replays); the batched path (``tasks.train.batched_augment``) draws per-sample parameters on
the batch's device, the one CUDA runs. Each batched step is checked against torchvision's
function with the same parameters; then both paths run here on the CPU over many copies of
one asymmetric test image, and two-sample Kolmogorov-Smirnov tests compare what the
augmentations change: the position of a bright marker (crop, flips, rotation), the brightness
and the contrast (colour jitter) and the share of pixels a rotation fills with black. A
deliberately wrong batched pipeline fails the same comparison.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms.v2 import functional as F

from tasks.config import load_params
from tasks.train import (
    BatchAugment,
    _color_jitter,
    _resized_crop,
    _rotate,
    batched_augment,
    build_augment,
    crop_boxes,
)
from tests.helpers import REPO

SIZE = 32
COPIES = 400
P_MIN = 1e-3  # KS p-value below which two samples count as different distributions


def _image() -> torch.Tensor:
    """A mid-grey image with a bright square off-centre (top-left) and a colour gradient."""
    x = torch.full((3, SIZE, SIZE), 0.45)
    x[0] += torch.linspace(-0.2, 0.2, SIZE)[None, :]
    x[2] += torch.linspace(-0.2, 0.2, SIZE)[:, None]
    x[:, 5:11, 7:13] = 0.95
    return x.clamp(0, 1)


def _statistics(out: torch.Tensor) -> dict[str, np.ndarray]:
    bright = (out.mean(dim=1) > 0.8).float()  # the marker
    weight = bright.sum(dim=(1, 2)).clamp(min=1)
    rows = torch.arange(SIZE, dtype=torch.float32)[None, :, None]
    cols = torch.arange(SIZE, dtype=torch.float32)[None, None, :]
    return {
        "marker_row": ((bright * rows).sum(dim=(1, 2)) / weight).numpy(),
        "marker_col": ((bright * cols).sum(dim=(1, 2)) / weight).numpy(),
        "brightness": out.mean(dim=(1, 2, 3)).numpy(),
        "contrast": out.std(dim=(1, 2, 3)).numpy(),
        "black": (out.amax(dim=1) < 0.02).float().mean(dim=(1, 2)).numpy(),
    }


def _both(augment: BatchAugment) -> tuple[dict, dict]:
    batch = _image()[None].repeat(COPIES, 1, 1, 1)
    torch.manual_seed(0)
    per_image = augment(batch, batched=False)
    torch.manual_seed(1)
    batched = augment(batch, batched=True)
    assert per_image.shape == batched.shape == batch.shape
    assert batched.min() >= 0 and batched.max() <= 1
    return _statistics(per_image), _statistics(batched)


@pytest.fixture(scope="module")
def cfg():
    return load_params(REPO / "params.yaml").train  # rotation 20, crop 0.75-1, flips, jitter 0.1


@pytest.mark.parametrize("flip", [False, True])
def test_batched_crop_is_resized_crop_of_each_box(flip: bool) -> None:
    # not square, so swapped axes would show; never wider or taller than the output, as in
    # training (the cache is at the output size), where a resize only enlarges
    x = torch.rand(6, 3, SIZE, SIZE - 6)
    torch.manual_seed(0)
    boxes = crop_boxes(x.shape, (0.3, 1.0), "cpu")
    hflip = torch.tensor([flip, False, flip, True, False, flip])
    out = _resized_crop(x, SIZE, boxes, hflip, None)
    for i, (top, left, h, w) in enumerate(zip(*(b.int().tolist() for b in boxes), strict=True)):
        assert top >= 0 and top + h <= SIZE and left >= 0 and left + w <= SIZE - 6
        ref = F.resized_crop(x[i], top, left, h, w, [SIZE, SIZE], antialias=True)
        ref = F.horizontal_flip(ref) if hflip[i] else ref
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_crop_boxes_fall_back_to_torchvision_s_centre_crop() -> None:
    """A wide image at a scale no box of ratio <= 4/3 can reach: the centred 4:3 box."""
    top, left, h, w = crop_boxes((50, 3, 20, 60), (0.9, 1.0), "cpu")
    assert torch.equal(h, torch.full((50,), 20.0)) and torch.equal(w, torch.full((50,), 27.0))
    assert torch.equal(top, torch.zeros(50)) and torch.equal(left, torch.full((50,), 16.0))


def test_batched_rotation_is_torchvision_s_rotate() -> None:
    x = torch.rand(5, 3, SIZE, SIZE)
    angles = torch.tensor([-20.0, -7.5, 3.0, 13.0, 90.0])
    out = _rotate(x, angles)
    for i, angle in enumerate(angles.tolist()):
        ref = F.rotate(x[i], angle, interpolation=F.InterpolationMode.NEAREST)
        # nearest neighbour: a coordinate on a half-pixel tie may round the other way
        assert (out[i] != ref).float().mean() < 0.01, angle


def test_batched_jitter_is_torchvision_s_adjustments_in_each_image_s_order() -> None:
    x = torch.rand(6, 3, 16, 16)
    factors = torch.empty(3, 6).uniform_(0.6, 1.4)
    order = torch.stack([torch.randperm(3) for _ in range(6)])
    out = _color_jitter(x.clone(), factors, order)
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    for i in range(6):
        ref = x[i]
        for k in order[i].tolist():
            ref = adjust[k](ref, factors[k, i].item())
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)


def test_batched_augmentations_match_the_per_image_distributions(cfg) -> None:
    cpu, gpu = _both(build_augment(cfg, SIZE))
    for name in cpu:
        p = ks_2samp(cpu[name], gpu[name]).pvalue
        assert p > P_MIN, f"{name}: KS p = {p:.2g}"
    assert cpu["marker_col"].std() > 3  # flips move the marker: the test sees the geometry
    assert cpu["brightness"].std() > 0.01  # and the jitter


def test_a_different_pipeline_fails_the_comparison(cfg) -> None:
    """Power check: the batched path without rotation is told apart from the real one."""
    no_rotation = dataclasses.replace(cfg.augment, rotation=0.0)
    wrong = BatchAugment(dataclasses.replace(cfg, augment=no_rotation), SIZE)
    right = build_augment(cfg, SIZE)
    batch = _image()[None].repeat(COPIES, 1, 1, 1)
    torch.manual_seed(0)
    reference = _statistics(right(batch, batched=False))
    torch.manual_seed(1)
    changed = _statistics(wrong(batch, batched=True))
    assert ks_2samp(reference["black"], changed["black"]).pvalue < P_MIN


def test_the_cpu_path_is_the_per_image_loop_and_reproducible(cfg) -> None:
    augment = build_augment(cfg, SIZE)
    batch = _image()[None].repeat(4, 1, 1, 1)
    torch.manual_seed(5)
    expected = torch.stack([augment.per_image(img) for img in batch])
    torch.manual_seed(5)
    assert torch.equal(augment(batch), expected)  # a CPU tensor takes the per-image path


def _centroids(bright: torch.Tensor) -> torch.Tensor:
    """Row and column centroid of each image's set pixels, ``(N, 2)``; NaN where none."""
    rows = torch.arange(SIZE, dtype=torch.float32)[None, :, None]
    cols = torch.arange(SIZE, dtype=torch.float32)[None, None, :]
    weight = bright.sum(dim=(1, 2))
    return torch.stack(
        [(bright * rows).sum(dim=(1, 2)) / weight, (bright * cols).sum(dim=(1, 2)) / weight], 1
    )


@pytest.mark.parametrize("batched", [False, True])
def test_a_mask_channel_takes_the_geometry_and_not_the_jitter(cfg, batched: bool) -> None:
    """train.mask_loss: the lesion mask rides as a fourth channel through both paths."""
    image = _image()
    marker = (image.mean(dim=0, keepdim=True) > 0.8).float()  # the mask marks the marker
    batch = torch.cat([image, marker])[None].repeat(128, 1, 1, 1)
    augment = build_augment(cfg, SIZE)
    torch.manual_seed(2)
    out = augment(batch, batched=batched)
    torch.manual_seed(2)
    alone = augment(batch[:, :3], batched=batched)
    assert out.shape == (128, 4, SIZE, SIZE)
    assert torch.equal(out[:, :3], alone)  # the same random draws: the image is unchanged
    mask = out[:, 3]
    if not batched:  # v2 resamples a tv_tensors.Mask by nearest neighbour and never jitters it
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    seen = _centroids((mask > 0.5).float())
    bright = _centroids((out[:, :3].mean(dim=1) > 0.7).float())
    both = ~(seen.isnan().any(1) | bright.isnan().any(1))
    assert both.sum() > 100  # the marker stays in view in most copies
    assert (seen[both] - bright[both]).abs().max() < 1.5  # and the mask moved with it
    assert seen[both][:, 1].std() > 3  # flips moved both: the geometry was exercised


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_batch_takes_the_batched_path(cfg) -> None:
    augment = build_augment(cfg, SIZE)
    batch = _image()[None].repeat(64, 1, 1, 1).cuda()
    torch.manual_seed(3)
    out = augment(batch)
    torch.manual_seed(3)
    assert torch.equal(out, batched_augment(batch, cfg.augment, SIZE))  # the batched path
    assert out.is_cuda and out.shape == batch.shape
    assert out.min() >= 0 and out.max() <= 1
    assert (out - batch).abs().flatten(1).amax(1).min() > 0  # every image was changed
