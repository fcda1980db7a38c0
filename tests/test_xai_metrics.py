"""Explanation metrics on hand-made maps and tiny constructed models with known answers."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from tasks import xai_metrics as xm
from tests.tolerances import PROB_ATOL

SIZE = 16


def box(rows: slice, cols: slice, value: float = 1.0, size: int = SIZE) -> np.ndarray:
    out = np.zeros((size, size), np.float32)
    out[rows, cols] = value
    return out


def blob(row: float, col: float, sigma: float = 3.0, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * sigma**2)).astype(np.float32)


MASK = box(slice(4, 8), slice(4, 10)).astype(np.uint8)  # 24 px, 9.375 % of the image
MASK_PERCENT = 100 * 24 / SIZE**2


# --------------------------------------------------------------------------- localisation


@pytest.mark.parametrize(
    ("heatmap", "expected"),
    [
        (MASK.astype(np.float32), 1.0),  # the map is the mask
        (box(slice(10, 14), slice(4, 10)), 0.0),  # same area, entirely outside
    ],
    ids=["equal-to-mask", "outside"],
)
def test_localisation_known_answers(heatmap: np.ndarray, expected: float) -> None:
    assert xm.pointing_game(heatmap, MASK) == expected
    assert xm.energy_pointing_game(heatmap, MASK) == pytest.approx(expected)
    assert xm.heatmap_iou(heatmap, MASK, MASK_PERCENT) == pytest.approx(expected)


@pytest.mark.parametrize(("inside", "outside"), [(1.0, 1.0), (1.0, 0.5), (0.2, 0.6)])
def test_energy_pointing_game_half_in_half_out(inside: float, outside: float) -> None:
    heatmap = box(slice(4, 8), slice(4, 10), inside) + box(slice(10, 14), slice(4, 10), outside)
    expected = 24 * inside / (24 * inside + 24 * outside)
    assert xm.energy_pointing_game(heatmap, MASK) == pytest.approx(expected)


def test_heatmap_iou_partial_overlap() -> None:
    heatmap = box(slice(6, 10), slice(4, 10))  # rows 6-7 overlap: 12 of 24 px
    assert xm.heatmap_iou(heatmap, MASK, MASK_PERCENT) == pytest.approx(12 / 36)


def test_pointing_game_ties_use_the_first_maximum() -> None:
    outside_first = box(slice(0, 1), slice(0, 1)) + box(slice(5, 6), slice(5, 6))
    inside_first = box(slice(5, 6), slice(5, 6)) + box(slice(15, 16), slice(15, 16))
    assert xm.pointing_game(outside_first, MASK) == 0.0
    assert xm.pointing_game(inside_first, MASK) == 1.0


@pytest.mark.parametrize(("tolerance", "expected"), [(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0)])
def test_pointing_game_tolerance(tolerance: int, expected: float) -> None:
    heatmap = blob(9, 6, sigma=1.0)  # peak two rows below the mask's last row (7)
    assert xm.pointing_game(heatmap, MASK, tolerance=tolerance) == expected


def test_localisation_edge_cases() -> None:
    zeros = np.zeros((SIZE, SIZE), np.float32)
    assert xm.pointing_game(zeros, MASK) == 0.0
    assert xm.energy_pointing_game(zeros, MASK) == 0.0
    assert xm.heatmap_iou(zeros, MASK, 10) == 0.0
    assert np.isnan(xm.pointing_game(blob(5, 5), np.zeros_like(MASK)))
    with pytest.raises(ValueError, match="does not match"):
        xm.energy_pointing_game(blob(5, 5), MASK[:8])


# --------------------------------------------------------------------------- agreement


def test_identical_maps_agree_fully() -> None:
    a = blob(5, 10) + 0.5 * blob(12, 3)
    assert xm.agreement(a, a, top_k_percent=20) == pytest.approx(
        {"ssim": 1.0, "pearson": 1.0, "cosine": 1.0, "topk_jaccard": 1.0}
    )


def test_map_versus_its_inverse() -> None:
    a = blob(5, 10)
    assert xm.pearson(a, 1 - a) == pytest.approx(-1.0)
    assert xm.ssim(a, 1 - a) < 0


def test_disjoint_top_regions_have_zero_jaccard() -> None:
    a, b = blob(3, 3, sigma=2), blob(12, 12, sigma=2)
    assert xm.topk_jaccard(a, b, top_k_percent=10) == 0.0
    assert 0 < xm.topk_jaccard(a, blob(4, 4, sigma=2), top_k_percent=10) < 1


def test_undefined_agreement_is_nan() -> None:
    flat = np.full((SIZE, SIZE), 0.5)
    assert np.isnan(xm.pearson(flat, blob(4, 4)))
    assert np.isnan(xm.cosine(np.zeros((SIZE, SIZE)), blob(4, 4)))


# --------------------------------------------------------------------------- faithfulness


class PatchModel(nn.Module):
    """Two classes; the class-0 logit is ``scale`` x the mean of one patch, class 1 is 0."""

    def __init__(self, rows: slice, cols: slice, scale: float = 4.0) -> None:
        super().__init__()
        self.rows, self.cols, self.scale = rows, cols, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = self.scale * x[:, :, self.rows, self.cols].mean(dim=(1, 2, 3))
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)


PATCH = (slice(6, 10), slice(6, 10))


@pytest.fixture(scope="module")
def patch_case() -> tuple[nn.Module, torch.Tensor, np.ndarray, np.ndarray]:
    """A model reading only the central patch, 2 images with bright evidence there, and a map
    on the patch ("good") and one in a corner ("bad")."""
    g = torch.Generator().manual_seed(0)
    images = 0.1 * torch.randn(2, 3, SIZE, SIZE, generator=g)
    images[:, :, PATCH[0], PATCH[1]] = 1.0
    good = np.stack([blob(7.5, 7.5)] * 2)
    bad = np.stack([blob(1, 14)] * 2)
    return PatchModel(*PATCH), images, good, bad


@pytest.mark.parametrize("baseline", ["blur", "mean"])
def test_deletion_insertion_prefers_the_map_on_the_evidence(patch_case, baseline) -> None:
    model, images, good, bad = patch_case
    kwargs = {"steps": 8, "baseline": baseline, "blur_sigma": 3.0}
    on = xm.deletion_insertion(model, images, good, 0, **kwargs)
    off = xm.deletion_insertion(model, images, bad, 0, **kwargs)
    assert np.all(on["deletion_auc"] < off["deletion_auc"] - 0.05)
    assert np.all(on["insertion_auc"] > off["insertion_auc"] + 0.05)
    assert on["deletion_curve"].shape == on["insertion_curve"].shape == (2, 9)
    assert on["fractions"][[0, -1]].tolist() == [0.0, 1.0]
    full = torch.softmax(model(images), 1)[:, 0].numpy()
    # Probabilities of the same images in other batches: float32 kernel-path noise only.
    np.testing.assert_allclose(on["deletion_curve"][:, 0], full, rtol=0, atol=PROB_ATOL)
    np.testing.assert_allclose(on["insertion_curve"][:, -1], full, rtol=0, atol=PROB_ATOL)


def test_deletion_insertion_chunking_and_resizing_do_not_change_results(patch_case) -> None:
    model, images, good, _ = patch_case
    one = xm.deletion_insertion(model, images, good, [0, 0], steps=4, batch_size=3)
    many = xm.deletion_insertion(model, images, good, 0, steps=4, batch_size=64)
    # Batches of 3 and 64: other kernel paths, so float32 noise (tests/tolerances.py).
    np.testing.assert_allclose(one["deletion_curve"], many["deletion_curve"], atol=PROB_ATOL)
    small = good[:, ::2, ::2]  # an 8x8 map, resized to the 16x16 images
    out = xm.deletion_insertion(model, images, small, 0, steps=4)
    assert out["deletion_auc"].shape == (2,)
    with pytest.raises(ValueError, match="baseline"):
        xm.deletion_insertion(model, images, good, 0, baseline="zeros")


def test_road_orders_the_maps(patch_case) -> None:
    model, images, good, bad = patch_case
    on = xm.road_scores(model, images, good, 0, percentiles=(20, 60))
    off = xm.road_scores(model, images, bad, 0, percentiles=(20, 60))
    assert np.all(np.isfinite(on)) and np.all(np.isfinite(off))
    assert np.all(on > off + 0.1)
    morf_on = xm.road_scores(model, images, good, 0, percentiles=(60,), variant="morf")
    morf_off = xm.road_scores(model, images, bad, 0, percentiles=(60,), variant="morf")
    assert np.all(morf_on < morf_off)
    np.testing.assert_array_equal(on, xm.road_scores(model, images, good, 0, percentiles=(20, 60)))


def test_average_drop_is_smaller_when_the_map_covers_the_evidence(patch_case) -> None:
    model, images, _, _ = patch_case
    covering = np.stack([box(*PATCH)] * 2)
    elsewhere = np.stack([box(slice(0, 4), slice(12, 16))] * 2)
    on = xm.average_drop_increase(model, images, covering, 0)
    off = xm.average_drop_increase(model, images, elsewhere, 0)
    np.testing.assert_allclose(on["average_drop"], 0.0, atol=1e-6)
    assert np.all(off["average_drop"] > 0.4)
    assert on["increase"].dtype == bool and not off["increase"].any()


def test_fast_imputer_is_the_library_imputer() -> None:
    """The same system, the same solve, the same noise: the library's imputation exactly."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, SIZE, SIZE, generator=g)
    keep = torch.from_numpy((blob(5, 9) < 0.5).astype(np.float32))  # remove a blob, edges too
    keep[0, :] = 0.0
    outputs = []
    for imputer in (NoisyLinearImputer(), xm.FastNoisyLinearImputer()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            outputs.append(imputer(image, keep))
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(outputs[1][:, keep.bool()], image[:, keep.bool()])  # kept pixels stay
    assert not torch.equal(outputs[1], image)


@pytest.mark.parametrize("kept", ["random", "blob", "border", "none", "all"])
def test_road_system_is_the_library_system_bit_for_bit(kept: str) -> None:
    """The vectorised system (:func:`tasks.xai_metrics._road_system`) and the library's
    ``setup_sparse_system``: the same matrix entries and right-hand side, float for float,
    wherever the removed pixels lie (inside, on the border, everywhere, nowhere)."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer, neighbors_weights

    g = torch.Generator().manual_seed(6)
    image = torch.randn(3, SIZE, SIZE + 5, generator=g).numpy()  # not square
    keep = {
        "random": (torch.rand(SIZE, SIZE + 5, generator=g) > 0.45).float().numpy(),
        "blob": np.pad(blob(5, 9) < 0.5, ((0, 0), (0, 5)), constant_values=True),
        "border": np.pad(np.ones((SIZE - 2, SIZE + 3)), 1),
        "none": np.zeros((SIZE, SIZE + 5)),
        "all": np.ones((SIZE, SIZE + 5)),
    }[kept].astype(np.float32)
    matrix, b = xm._road_system(keep, image)
    expected, expected_b = NoisyLinearImputer.setup_sparse_system(keep, image, neighbors_weights)
    assert b.dtype == expected_b.dtype and np.array_equal(b, expected_b)
    assert matrix.shape == expected.shape == (int((keep == 0).sum()),) * 2
    assert (matrix != expected.tocsc()).nnz == 0


@pytest.mark.parametrize("workers", [1, 3])
def test_imputing_many_equals_one_at_a_time(workers: int) -> None:
    """Solved together (banded Cholesky one after another with one worker, SuperLU in a thread
    pool with three), noise drawn in order: the sequential library imputation. The pool runs
    the library's very solve (bit-equal); the banded solve of the same system agrees to
    float32 rounding of values of order one."""
    g = torch.Generator().manual_seed(2)
    jobs = [
        (torch.randn(3, SIZE, SIZE, generator=g), (torch.rand(SIZE, SIZE, generator=g) > f).float())
        for f in (0.2, 0.4, 0.6, 0.8, 0.5, 0.3)
    ]
    imputer = xm.FastNoisyLinearImputer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        one_by_one = [imputer(image, keep) for image, keep in jobs]
    together = imputer.impute_all(jobs, seed=3, workers=workers)
    assert len(together) == len(jobs)
    for a, b in zip(one_by_one, together, strict=True):
        if workers > imputer.BANDED_MAX_THREADS:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=0, atol=8 * torch.finfo(torch.float32).eps)
    assert not torch.equal(together[0], jobs[0][0])  # something was imputed


def test_imputing_from_threads_at_once_restores_the_blas_threads() -> None:
    """The banded solves run on one BLAS thread, a process-wide setting, and the noise comes
    from a generator per call: callers in several threads at once each get the imputation a
    caller alone gets, and the process keeps the BLAS threads it had."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    g = torch.Generator().manual_seed(5)
    jobs = [
        (torch.randn(3, SIZE, SIZE, generator=g), (torch.rand(SIZE, SIZE, generator=g) > f).float())
        for f in (0.3, 0.5, 0.7)
    ]
    imputer = xm.FastNoisyLinearImputer()
    before = blas_threads()
    alone = [imputer.impute_all(jobs, seed=s, workers=1) for s in range(8)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda s: imputer.impute_all(jobs, seed=s, workers=1), range(8)))
    assert blas_threads() == before
    for a, b in zip(alone, together, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(alone[0][0], alone[1][0])  # the seed reaches the noise


def test_banded_solve_is_the_sparse_solve_and_falls_back_when_refused(monkeypatch) -> None:
    """The banded Cholesky of the negated system equals SuperLU's solution of the library's
    system (float64, values of order one), also when nothing is kept (the singular Laplacian
    with a zero right-hand side: both give zeros); where LAPACK refuses the factorisation
    (a non-positive pivot), the imputer takes the sparse solve's answer instead of failing."""
    from scipy.sparse.linalg import spsolve

    g = torch.Generator().manual_seed(5)
    image = torch.rand(3, SIZE, SIZE, generator=g)
    for keep in ((torch.rand(SIZE, SIZE, generator=g) > 0.7).float(), torch.zeros(SIZE, SIZE)):
        matrix, b = xm._road_system(keep.numpy(), image.numpy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SuperLU's note when the matrix is singular
            expected = spsolve(matrix, b)
        banded = xm._road_banded(keep.numpy(), image.numpy())
        np.testing.assert_allclose(banded, expected, rtol=0, atol=1e-10)

    def refuse(*_: object) -> np.ndarray:
        raise np.linalg.LinAlgError("2-th leading minor not positive definite")

    monkeypatch.setattr(xm, "_road_banded", refuse)
    keep = (torch.rand(SIZE, SIZE, generator=g) > 0.5).float()
    assert torch.equal(
        xm.FastNoisyLinearImputer._solve_banded(image, keep),
        xm.FastNoisyLinearImputer._solve(image, keep),
    )


@pytest.mark.parametrize("variant", xm.ROAD_VARIANTS)
def test_batched_road_equals_the_library(patch_case, variant: str) -> None:
    from pytorch_grad_cam.metrics.road import (
        ROADCombined,
        ROADLeastRelevantFirstAverage,
        ROADMostRelevantFirstAverage,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, images, good, bad = patch_case
    maps = np.stack([good[0], bad[1]])
    library = {
        "combined": ROADCombined,
        "morf": ROADMostRelevantFirstAverage,
        "lerf": ROADLeastRelevantFirstAverage,
    }[variant](percentiles=[20, 60])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        expected = library(images, maps, [ClassifierOutputSoftmaxTarget(0)] * 2, model)
    ours = xm.road_scores(model, images, maps, 0, percentiles=(20, 60), variant=variant, seed=9)
    assert np.abs(expected).max() > 0.01, "a zero score would make the comparison vacuous"
    np.testing.assert_allclose(ours, expected, rtol=0, atol=PROB_ATOL)


def test_perturbations_score_every_map_of_one_batch(patch_case) -> None:
    """One scorer, many maps: the same numbers as the one-shot functions, and a head view."""
    model, images, good, bad = patch_case
    scorer = xm.Perturbations(model, images, [0, 0], batch_size=5)
    for heat in (good, bad):
        together = scorer.deletion_insertion(heat, steps=4)
        alone = xm.deletion_insertion(model, images, heat, 0, steps=4)
        for key in ("deletion_curve", "insertion_curve"):
            np.testing.assert_allclose(together[key], alone[key], rtol=0, atol=PROB_ATOL)
        drop = scorer.average_drop(heat)
        np.testing.assert_allclose(
            drop["average_drop"], xm.average_drop_increase(model, images, heat, 0)["average_drop"]
        )
    first = scorer.head(1)
    assert first.n == 1 and first.clean.shape == (1,)
    one = first.deletion_insertion(good[:1], steps=4)
    np.testing.assert_allclose(
        one["deletion_curve"], scorer.deletion_insertion(good, steps=4)["deletion_curve"][:1]
    )
    with pytest.raises(ValueError, match="heatmaps must be"):
        first.road(good)


def test_maps_that_perturb_alike_are_scored_once(patch_case) -> None:
    """A map ranked like an earlier one swaps the same pixels at every step: its curves come
    from the scorer's memory, with no forward. A map that shares only its top pixels is
    forwarded only for the steps past them, and its curves equal a fresh scorer's."""
    model, images, _, _ = patch_case
    rng = np.random.default_rng(0)
    heat = rng.random((2, SIZE, SIZE)).astype(np.float32)  # no ties
    scorer = xm.Perturbations(model, images, [0, 0], batch_size=5)
    first = scorer.deletion_insertion(heat, steps=8)
    forwarded = scorer.work["scored_images"]
    assert forwarded == 2 * 2 + 2 * 7 * 2 and scorer.work["reused_images"] == 0
    doubled = scorer.deletion_insertion(2 * heat, steps=8)  # exact: the same order
    assert scorer.work["scored_images"] == forwarded  # nothing forwarded
    assert scorer.work["reused_images"] == 2 * 7 * 2
    for key in ("deletion_curve", "insertion_curve"):
        np.testing.assert_array_equal(doubled[key], first[key])

    # The same top quarter of each image (steps 1 and 2 of 8), another order below it.
    flat = heat.reshape(2, -1)
    top = flat >= np.sort(flat, axis=1)[:, [-flat.shape[1] // 4]]
    below = rng.random(flat.shape) * flat[top].min() / 2
    partly = np.where(top, flat, below).reshape(heat.shape).astype(np.float32)
    reused = scorer.work["reused_images"]
    out = scorer.deletion_insertion(partly, steps=8)
    assert scorer.work["reused_images"] - reused == 2 * 2 * 2  # 2 steps x 2 images, both curves
    assert scorer.work["scored_images"] - forwarded == 2 * 5 * 2
    fresh = xm.Perturbations(model, images, [0, 0], batch_size=5).deletion_insertion(partly, 8)
    for key in ("deletion_curve", "insertion_curve"):
        np.testing.assert_allclose(out[key], fresh[key], rtol=0, atol=PROB_ATOL)


# --------------------------------------------------------------------------- sanity


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def gradcam_fn(model: nn.Module, images: torch.Tensor, classes) -> np.ndarray:
    with GradCAM(model=model, target_layers=[model[2]]) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in classes])


def input_gradient_fn(model: nn.Module, images: torch.Tensor, classes) -> np.ndarray:
    x = images.clone().requires_grad_(True)
    model(x)[torch.arange(len(classes)), torch.as_tensor(classes)].sum().backward()
    grad = x.grad.abs().amax(dim=1)
    return (grad / grad.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]).numpy()


def fixed_map_fn(model: nn.Module, images: torch.Tensor, classes) -> np.ndarray:
    return np.stack([blob(5, 9)] * images.shape[0])


@pytest.fixture(scope="module")
def sanity_images() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("explain_fn", [gradcam_fn, input_gradient_fn], ids=["gradcam", "grad"])
def test_randomization_changes_model_dependent_maps(explain_fn, sanity_images) -> None:
    model = small_cnn()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    out = xm.randomization_sanity(explain_fn, model, sanity_images, 0, reinit=["2", "6"])
    assert out["stages"] == ["6", "2"]  # cascading from the head, whatever the given order
    assert out["self_ssim"] == pytest.approx(1.0)
    assert out["ssim_final"] < 0.8 and out["ssim_final"] < out["self_ssim"]
    assert out["spearman_final"] < out["self_spearman"]
    assert out["ssim_per_image"].shape == (2, 3)
    for key, value in model.state_dict().items():  # the caller's model is untouched
        torch.testing.assert_close(value, weights[key])


def test_randomization_check_distinguishes_a_model_blind_method(sanity_images) -> None:
    model = small_cnn()
    blind = xm.randomization_sanity(fixed_map_fn, model, sanity_images, 0, reinit=["2", "6"])
    sane = xm.randomization_sanity(gradcam_fn, model, sanity_images, 0, reinit=["2", "6"])
    assert blind["ssim"] == pytest.approx([1.0, 1.0])
    assert blind["spearman_final"] == pytest.approx(1.0)
    assert sane["ssim_final"] < blind["ssim_final"] - 0.2


def test_randomization_accepts_a_callable_and_rejects_unknown_layers(sanity_images) -> None:
    model = small_cnn()
    out = xm.randomization_sanity(
        input_gradient_fn, model, sanity_images, 0, reinit=lambda m: m[6].reset_parameters()
    )
    assert out["stages"] == ["custom"] and out["ssim_final"] < 1.0
    with pytest.raises(ValueError, match="no module named"):
        xm.randomization_sanity(input_gradient_fn, model, sanity_images, 0, reinit=["head"])


def test_randomization_default_cascades_over_top_level_children(sanity_images) -> None:
    out = xm.randomization_sanity(input_gradient_fn, small_cnn(), sanity_images, [0, 1, 0])
    assert out["stages"] == ["6", "2", "0"]  # the children with parameters, head first
    assert out["ssim"][-1] < out["self_ssim"]


# --------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(0).normal(0.5, 0.2, 40),
        np.random.default_rng(1).integers(0, 2, 25).astype(float),  # 0/1 pointing game
        np.r_[np.random.default_rng(2).exponential(1.0, 30), np.nan, np.nan],
    ],
    ids=["normal", "binary", "skewed-with-nan"],
)
def test_bootstrap_ci_contains_the_mean(values: np.ndarray) -> None:
    mean, low, high = xm.bootstrap_ci(values, n_resamples=500, seed=0)
    assert mean == pytest.approx(np.nanmean(values))
    assert low < mean < high
    assert xm.bootstrap_ci(values, n_resamples=500, seed=0) == (mean, low, high)


def test_bootstrap_ci_degenerate_inputs() -> None:
    assert xm.bootstrap_ci([0.3, 0.3, 0.3], 100) == (0.3, 0.3, 0.3)
    assert xm.bootstrap_ci([0.7, np.nan], 100) == (0.7, 0.7, 0.7)
    assert all(np.isnan(xm.bootstrap_ci([np.nan], 100)))


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    """Method A localises and is faithful, B is in the middle, C is worst at both."""
    rng = np.random.default_rng(0)
    frames = []
    for method, pg, deletion in [("A", 0.9, 0.2), ("B", 0.6, 0.4), ("C", 0.2, 0.7)]:
        frames.append(
            pd.DataFrame(
                {
                    "method": method,
                    "layer": "deep",
                    "pointing_game": (rng.random(20) < pg).astype(float),
                    "deletion_auc": deletion + 0.02 * rng.standard_normal(20),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def test_summarize_gives_mean_and_ci_per_group(rows: pd.DataFrame) -> None:
    summary = xm.summarize(rows, ["pointing_game", "deletion_auc"], n_resamples=200)
    assert summary["method"].tolist() == ["A", "B", "C"]
    assert summary["n"].tolist() == [20, 20, 20]
    expected = rows.groupby("method")["deletion_auc"].mean().to_numpy()
    np.testing.assert_allclose(summary["deletion_auc_mean"], expected)
    assert (summary["deletion_auc_low"] < summary["deletion_auc_mean"]).all()
    assert (summary["deletion_auc_mean"] < summary["deletion_auc_high"]).all()
    positional = xm.summarize(rows, ["deletion_auc"], ("method",), 200, 0)  # n_resamples, seed
    pd.testing.assert_series_equal(positional["deletion_auc_low"], summary["deletion_auc_low"])
    with pytest.raises(ValueError, match="not in the table"):
        xm.summarize(rows, ["road"], n_resamples=10)


def test_rank_methods_orders_by_combined_rank(rows: pd.DataFrame) -> None:
    summary = xm.summarize(rows, ["pointing_game", "deletion_auc"], n_resamples=200)
    ranked = xm.rank_methods(summary.iloc[::-1])
    assert ranked["method"].tolist() == ["A", "B", "C"]
    assert ranked["rank"].tolist() == [1, 2, 3]
    assert ranked["deletion_auc_rank"].tolist() == [1, 2, 3]


def test_rank_methods_combines_conflicting_metrics() -> None:
    table = pd.DataFrame(
        {
            "method": ["X", "Y", "Z"],
            "pointing_game": [0.9, 0.5, 0.1],  # X best localisation
            "deletion_auc": [0.5, 0.1, 0.9],  # Y most faithful
        }
    )
    ranked = xm.rank_methods(table, {"pointing_game": "desc", "deletion_auc": "asc"})
    assert ranked["method"].tolist() == ["X", "Y", "Z"]
    assert ranked["rank"].tolist() == [1, 1, 3]  # X and Y tie on mean rank 1.5
    with pytest.raises(ValueError, match="direction"):
        xm.rank_methods(table, {"pointing_game": "up"})
    without_masks = xm.rank_methods(table.drop(columns="pointing_game"))  # default skips it
    assert without_masks["method"].tolist() == ["Y", "X", "Z"]
    with pytest.raises(ValueError, match="no column"):
        xm.rank_methods(table, {"road": "desc"})
