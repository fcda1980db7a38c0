"""Explanation quality in numbers: localisation, faithfulness, agreement, sanity, aggregation.

A heatmap that looks plausible is not evidence that the model used that region. This module
scores explanations in four independent ways so the explain stage can compare methods (Grad-CAM,
Score-CAM, IG, LIME, ...) and layers on numbers rather than on how pretty the overlays are:

- **Localisation** (needs a lesion mask): does the map point at the lesion? Pointing game
  (Zhang et al. 2016), energy-based pointing game (Wang et al. 2020, Score-CAM) and the IoU of
  the top-k % of the map with the mask.
- **Faithfulness** (needs the model): does removing what the map highlights change the
  prediction? Deletion / insertion (Petsiuk et al. 2018, RISE), ROAD (Rong et al. 2022, via
  pytorch-grad-cam) and Average Drop / Increase in Confidence (Chattopadhyay et al. 2018).
- **Agreement** between two maps (two methods, layers or models): SSIM, Pearson, cosine and the
  Jaccard index of their top-k % regions.
- **Sanity** (Adebayo et al. 2018): a method whose map survives re-initialising the model's
  weights explains the image, not the model.

Everything is a pure function of arrays (and a model it does not modify), so the explain entry,
notebooks and tests all score explanations the same way; the aggregation helpers turn per-image
rows into a per-method table with bootstrap confidence intervals and a ranking.

Conventions: heatmaps are float arrays in [0, 1] of shape (H, W) or (N, H, W); masks are
(H, W) bool / uint8 arrays (non-zero inside the lesion); images are normalised (N, 3, H, W)
float32 tensors and models return logits. Metrics that are undefined for an input (the Pearson
correlation of a constant map, the pointing game against an empty mask) return NaN rather than
an arbitrary number, and the aggregation helpers ignore NaNs.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage, stats
from scipy.sparse import coo_matrix, csc_matrix
from scipy.sparse.linalg import spsolve
from skimage.metrics import structural_similarity

from tasks.forward import autocast_to, forward_batch, inference_twin, run_batched

ClassIndex = int | Sequence[int] | np.ndarray | torch.Tensor
ExplainFn = Callable[[torch.nn.Module, torch.Tensor, ClassIndex], np.ndarray]

BASELINES: tuple[str, ...] = ("blur", "mean")
ROAD_VARIANTS: tuple[str, ...] = ("combined", "morf", "lerf")
# Higher pointing game = better localisation; lower deletion AUC = more faithful.
DEFAULT_RANKING: dict[str, str] = {"pointing_game": "desc", "deletion_auc": "asc"}

# --------------------------------------------------------------------------- input checks


def _as_map(heatmap: Any, what: str = "heatmap") -> np.ndarray:
    """One (H, W) map as float64, or a ValueError saying what was wrong with it."""
    arr = np.asarray(heatmap, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (H, W) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return arr


def _as_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A lesion mask as bool, checked against the heatmap's shape."""
    arr = np.asarray(mask)
    if arr.shape != shape:
        raise ValueError(f"mask shape {arr.shape} does not match heatmap shape {shape}")
    return arr.astype(bool)


def _as_maps(heatmaps: Any, n: int, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) float32 maps at the image size; bilinear resize when a CAM came out smaller."""
    arr = np.asarray(heatmaps, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] != n:
        raise ValueError(f"heatmaps must be (N={n}, H, W), got shape {np.shape(heatmaps)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("heatmaps contain NaN or infinite values")
    if arr.shape[1:] != size:
        resized = F.interpolate(
            torch.from_numpy(arr)[:, None], size=size, mode="bilinear", align_corners=False
        )
        arr = resized[:, 0].numpy()
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as_images(images: Any) -> torch.Tensor:
    """(N, C, H, W) float32 tensor; a single (C, H, W) image gains a batch axis."""
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    return x.float()


def _class_indices(class_idx: ClassIndex, n: int) -> list[int]:
    """One target class per image: an int is broadcast, a sequence must have length N."""
    if isinstance(class_idx, torch.Tensor):
        class_idx = class_idx.detach().cpu().numpy()
    arr = np.atleast_1d(np.asarray(class_idx))
    if arr.size == 1:
        arr = np.repeat(arr, n)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"class_idx must be an int or N={n} ints, got {class_idx!r}")
    return [int(c) for c in arr]


def _on_model_device(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Move the images to the model's device (a parameter-free model keeps them where they are)."""
    param = next(model.parameters(), None)
    return x if param is None else x.to(param.device)


def _top_region(heatmap: np.ndarray, top_k_percent: float) -> np.ndarray:
    """The top-k % of a map as a bool mask.

    The cut is the value of the k-th hottest pixel and every pixel tied with it is kept, so the
    region never depends on pixel order (a raster-order tie-break would favour the top of the
    image). Pixels with no heat are never part of the region: a map that is zero almost
    everywhere highlights only its non-zero part, and an all-zero map highlights nothing.
    """
    if not 0 < top_k_percent <= 100:
        raise ValueError(f"top_k_percent must be in (0, 100], got {top_k_percent}")
    flat = heatmap.ravel()
    k = max(1, int(round(top_k_percent / 100.0 * flat.size)))
    cut = np.partition(flat, flat.size - k)[flat.size - k]
    return (heatmap >= cut) & (heatmap > 0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; NaN when both are empty."""
    union = np.logical_or(a, b).sum()
    if union == 0:
        return float("nan")
    return float(np.logical_and(a, b).sum() / union)


# --------------------------------------------------------------------------- localisation


def pointing_game(heatmap: np.ndarray, mask: np.ndarray, tolerance: int = 0) -> float:
    """Whether the hottest pixel of the map lies on the lesion (Zhang et al. 2016).

    Ties: the *first* maximum in row-major order (``np.argmax``) is the point, so a map with
    several equal peaks is not rewarded for having one of them inside by luck. A flat map (no
    peak at all, e.g. all zeros) points nowhere and scores 0.

    Args:
        heatmap: (H, W) map.
        mask: (H, W) lesion mask, non-zero inside.
        tolerance: radius in pixels around the mask that still counts as a hit. The original
            protocol uses 15 px at 224 px to forgive boundary errors of hand-drawn masks and
            upsampled CAMs; 0 is the strict game.

    Returns:
        1.0 for a hit, 0.0 for a miss, NaN when the mask is empty (no lesion to point at).
    """
    h = _as_map(heatmap)
    m = _as_mask(mask, h.shape)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    if not m.any():
        return float("nan")
    if h.max() == h.min():
        return 0.0
    row, col = np.unravel_index(int(np.argmax(h)), h.shape)
    if tolerance > 0:
        distance_to_lesion = ndimage.distance_transform_edt(~m)
        return float(distance_to_lesion[row, col] <= tolerance)
    return float(m[row, col])


def energy_pointing_game(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's total heat that falls inside the lesion: sum(h * m) / sum(h).

    Unlike the pointing game it uses the whole map, so a map with a lucky peak on the lesion and
    most of its mass on a ruler still scores low (Wang et al. 2020). Negative values are clipped
    to 0 first, since heat cannot be negative mass.

    Returns:
        A share in [0, 1]; 0 for an all-zero map.
    """
    h = np.clip(_as_map(heatmap), 0, None)
    m = _as_mask(mask, h.shape)
    total = h.sum()
    if total <= 0:
        return 0.0
    return float(h[m].sum() / total)


def heatmap_iou(heatmap: np.ndarray, mask: np.ndarray, top_k_percent: float) -> float:
    """IoU of the map's top-k % pixels with the lesion mask.

    Choosing k near the typical lesion area share makes a perfect map score 1; ties at the cut
    are all kept and zero-heat pixels never count (see ``_top_region``).

    Returns:
        IoU in [0, 1]; NaN when both the region and the mask are empty.
    """
    h = _as_map(heatmap)
    m = _as_mask(mask, h.shape)
    return _iou(_top_region(h, top_k_percent), m)


# --------------------------------------------------------------------------- faithfulness


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, the RISE insertion canvas."""
    radius = max(1, int(np.ceil(3 * sigma)))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    if radius < 1:
        return x.clone()
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _baseline(x: torch.Tensor, kind: str, blur_sigma: float | None) -> torch.Tensor:
    """What a removed pixel becomes: a blurred copy of the image or its per-channel mean."""
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    if kind == "blur":
        sigma = blur_sigma if blur_sigma is not None else max(1.0, min(x.shape[-2:]) / 32.0)
        return _gaussian_blur(x, sigma)
    raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}")


class Perturbations:
    """Target-class probabilities of perturbed copies of one batch of images, scored in bulk.

    Every faithfulness metric asks the same question many times: the softmax probability of
    the target class on a perturbed copy of an image. This object holds what all the maps
    scored on one batch share: the images on the model's device, the target classes, the
    probability on each clean image (deletion's first point, insertion's last, ROAD's and
    Average Drop's reference) and on its baseline (deletion's last point, insertion's first),
    each computed once instead of once per map and metric. Every perturbed copy of every map
    is then scored in passes of a device-sized batch (:func:`tasks.forward.batch_size`) on the
    model's inference twin (BatchNorm folded, channels-last; :func:`tasks.forward.
    inference_twin`), whose probabilities equal the model's to float32 rounding, or autocast
    to ``autocast`` when given.

    Args:
        model: classifier returning logits; it is not modified.
        images: (N, 3, H, W) normalised images (a single (3, H, W) image gains a batch axis).
        class_idx: target class, one int for all images or one per image.
        baseline: what a removed pixel becomes for deletion / insertion: ``"blur"`` (RISE's
            Gaussian-blurred image) or ``"mean"`` (the per-image, per-channel mean colour).
        blur_sigma: Gaussian sigma in pixels; default ``max(1, min(H, W) / 32)``.
        batch_size: images per forward pass; 0 sizes it to the device.
        autocast: the dtype every scoring pass autocasts to (the clean and baseline
            probabilities too, so a curve is never half in one precision); None: float32.
            The scores are averages of probabilities, so bfloat16's 8-bit mantissa moves them
            little: on the default's explain stage (22 images, 24 method x layer pairs) a
            per-image deletion or insertion AUC moved by at most 0.008 (mean 0.002) and a
            method's mean by at most 0.002, against bootstrap intervals 0.15-0.26 wide, while
            the passes ran 2.3x faster on a two-core Intel Xeon with AMX. Heatmaps never
            depend on it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        images: torch.Tensor,
        class_idx: ClassIndex,
        *,
        baseline: str = "blur",
        blur_sigma: float | None = None,
        batch_size: int = 0,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.x = _on_model_device(model, _as_images(images))
        self.autocast = autocast
        self.n, _, self.height, self.width = self.x.shape
        self.classes = torch.tensor(_class_indices(class_idx, self.n), device=self.x.device)
        self.model = inference_twin(model)
        self.base = _baseline(self.x, baseline, blur_sigma)
        #: Work done so far, shared with every :meth:`head` view: images forwarded and the
        #: seconds of those passes, the seconds of ROAD's imputation (the bench's bound), and
        #: the deletion / insertion copies answered from :attr:`curve_points` instead.
        self.work = {"scored_images": 0, "forward_s": 0.0, "imputation_s": 0.0, "reused_images": 0}
        #: ``(image, digest of the pixel set)`` -> the (deletion, insertion) probabilities of
        #: that inner curve point, shared with every :meth:`head` view. Two maps that rank an
        #: image's top pixels alike perturb it identically at that step, so the copies are
        #: scored once: in the default's explain stage XGrad-CAM and HiResCAM at the deep
        #: layer rank every image as Grad-CAM does, and 1,418 of 14,460 copies are reused.
        self.curve_points: dict[tuple[int, bytes], tuple[float, float]] = {}

        # The twin's forward question, timed once per precision (in float32 it is the one
        # Score-CAM and LIME ask too).
        self.batch = forward_batch(self.model, self.x, batch_size, dtype=autocast) if self.n else 1
        clean_and_base = self.probabilities(
            torch.cat([self.x, self.base]), torch.cat([self.classes, self.classes])
        )
        self.clean, self.at_baseline = clean_and_base[: self.n], clean_and_base[self.n :]

    def head(self, n: int) -> Perturbations:
        """The same scorer restricted to the first ``n`` images (nothing is recomputed)."""
        if n == self.n:
            return self
        part = copy.copy(self)
        part.n = n
        for name in ("x", "classes", "base", "clean", "at_baseline"):
            setattr(part, name, getattr(self, name)[:n])
        return part

    def maps(self, heatmaps: Any) -> np.ndarray:
        """(N, H, W) float32 maps at the image size (see ``_as_maps``)."""
        return _as_maps(heatmaps, self.n, (self.height, self.width))

    def probabilities(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Softmax probability of ``classes[i]`` on ``x[i]``, in device-sized passes (CPU)."""
        out = torch.empty(len(x))

        def keep(logits: torch.Tensor, rows: slice) -> None:
            probs = torch.softmax(logits.float(), dim=1)
            out[rows] = probs.gather(1, classes[rows, None].to(probs.device))[:, 0].cpu()

        start = time.perf_counter()
        with autocast_to(self.x.device, self.autocast):
            run_batched(self.model, x, self.batch, keep)  # ends on .cpu(): the device is done
        self.work["scored_images"] += len(x)
        self.work["forward_s"] += time.perf_counter() - start
        return out

    def deletion_insertion(
        self, heatmaps: Any, steps: int = 16, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Deletion and insertion curves of one map per image (:func:`deletion_insertion`)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        n, height, width = self.n, self.height, self.width
        maps = self.maps(heatmaps)
        pixels = height * width
        # Sort by heat, ties in a seeded random order: CAMs are often exactly 0 over much of
        # the image, and a row-major tie-break would always remove the top rows first.
        tie_break = np.random.default_rng(seed).random((n, pixels))
        order = np.lexsort((tie_break, -maps.reshape(n, pixels)), axis=-1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(pixels), (n, pixels)), axis=1)
        rank_t = torch.from_numpy(rank).to(self.x.device)
        fractions = np.linspace(0.0, 1.0, steps + 1)
        count = np.round(fractions * pixels).astype(np.int64)
        counts = torch.from_numpy(count).to(self.x.device)

        # The first and last points are the clean image and the baseline, scored once for
        # every map; row r of the inner (steps - 1) * N perturbed copies is step 1 + r // N of
        # image r % N. A row whose pixel set an earlier map already perturbed is answered from
        # `curve_points`; the others are scored in passes, each built with one vectorised
        # `where`.
        curves = {
            name: torch.empty(steps + 1, n, dtype=torch.float32)
            for name in ("deletion", "insertion")
        }
        curves["deletion"][0], curves["deletion"][steps] = self.clean, self.at_baseline
        curves["insertion"][0], curves["insertion"][steps] = self.at_baseline, self.clean
        inner = np.arange((steps - 1) * n)
        inner_step, inner_image = 1 + inner // n, inner % n
        keys = _pixel_set_keys(rank, inner_image, count[inner_step])
        known = np.array([key in self.curve_points for key in keys], dtype=bool)
        for r in np.flatnonzero(known):
            cell = (inner_step[r], inner_image[r])
            curves["deletion"][cell], curves["insertion"][cell] = self.curve_points[keys[r]]
        self.work["reused_images"] += 2 * int(known.sum())
        todo = torch.from_numpy(inner[~known]).to(self.x.device)
        with torch.no_grad():
            for start in range(0, len(todo), self.batch):
                rows = todo[start : start + self.batch]
                step, image = 1 + rows // n, rows % n
                chosen = (rank_t[image] < counts[step, None]).view(-1, 1, height, width)
                both = torch.cat(
                    [
                        torch.where(chosen, self.base[image], self.x[image]),
                        torch.where(chosen, self.x[image], self.base[image]),
                    ]
                )
                probs = self.probabilities(both, torch.cat([self.classes[image]] * 2))
                cells = (step.cpu(), image.cpu())
                deleted, inserted = probs[: len(rows)], probs[len(rows) :]
                curves["deletion"][cells], curves["insertion"][cells] = deleted, inserted
                pairs = zip(deleted.tolist(), inserted.tolist(), strict=True)
                self.curve_points.update(zip([keys[r] for r in rows.tolist()], pairs, strict=True))
        out = {name: c.T.numpy().astype(np.float64) for name, c in curves.items()}
        return {
            "deletion_auc": np.trapezoid(out["deletion"], fractions, axis=1),
            "insertion_auc": np.trapezoid(out["insertion"], fractions, axis=1),
            "deletion_curve": out["deletion"],
            "insertion_curve": out["insertion"],
            "fractions": fractions,
        }

    def road(
        self,
        heatmaps: Any,
        percentiles: Sequence[float] = (20, 40, 60, 80),
        variant: str = "combined",
        seed: int = 0,
    ) -> np.ndarray:
        """ROAD scores of one map per image (:func:`road_scores`)."""
        from pytorch_grad_cam.metrics.perturbation_confidence import (
            RemoveLeastRelevantFirst,
            RemoveMostRelevantFirst,
        )

        if variant not in ROAD_VARIANTS:
            raise ValueError(f"variant must be one of {ROAD_VARIANTS}, got {variant!r}")
        maps = self.maps(heatmaps)
        # The library's order (ROADCombined: every LeRF percentile, then every MoRF one; image
        # by image inside each), so the imputer's noise comes out of the RNG identically.
        kinds = {"combined": ("lerf", "morf"), "lerf": ("lerf",), "morf": ("morf",)}[variant]
        removers = {"lerf": RemoveLeastRelevantFirst, "morf": RemoveMostRelevantFirst}
        images = self.x.cpu()
        jobs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (image, kept-pixel mask)

        def record(img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            jobs.append((img, mask))
            return img

        for kind in kinds:
            for p in percentiles:
                remove = removers[kind](p, record)  # the library's masks, in its order
                for i in range(self.n):
                    remove(images[i], torch.from_numpy(maps[i]))
        start = time.perf_counter()
        perturbed = FastNoisyLinearImputer().impute_all(jobs, seed)
        self.work["imputation_s"] += time.perf_counter() - start
        x = torch.stack(perturbed).to(self.x.device)
        classes = self.classes.repeat(len(kinds) * len(percentiles))
        after = self.probabilities(x, classes).numpy().astype(np.float32)
        change = after.reshape(len(kinds), len(percentiles), self.n) - self.clean.numpy()
        mean = np.mean(change, axis=1)  # per kind, over the percentiles (the averagers)
        if variant == "combined":
            return ((mean[0] - mean[1]) / 2).astype(np.float64)
        return mean[0].astype(np.float64)

    def average_drop(self, heatmaps: Any) -> dict[str, np.ndarray]:
        """Average Drop and Increase in Confidence of one map per image."""
        from pytorch_grad_cam.metrics.cam_mult_image import multiply_tensor_with_cam

        maps = torch.from_numpy(self.maps(heatmaps)).to(self.x.device)
        masked = multiply_tensor_with_cam(self.x, maps[:, None])
        y = self.clean.numpy().astype(np.float64)
        o = self.probabilities(masked, self.classes).numpy().astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            drop = np.where(y > 0, np.maximum(0.0, y - o) / y, 0.0)
        return {"average_drop": drop, "increase": o > y, "score": y, "masked_score": o}


def _pixel_set_keys(
    rank: np.ndarray, image: np.ndarray, count: np.ndarray
) -> list[tuple[int, bytes]]:
    """``(image, digest)`` of each perturbed copy's pixel set ``rank[image] < count``.

    A deletion or insertion copy is fully determined by its image and the set of pixels it
    swaps for the baseline; the 128-bit BLAKE2 digest of the packed set stands for it (the
    chance that two of a billion different sets share one is below 1e-20).
    """
    chosen = np.packbits(rank[image] < count[:, None], axis=1)
    return [
        (int(i), hashlib.blake2b(row.tobytes(), digest_size=16).digest())
        for i, row in zip(image, chosen, strict=True)
    ]


def _road_entries(
    mask: np.ndarray, img: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The entries of pytorch-grad-cam's ROAD equation system, vectorised over the neighbours.

    ``NoisyLinearImputer.setup_sparse_system`` fills a ``lil_matrix`` entry group by entry
    group and converts it, which is most of ROAD's time; this computes the same entries with
    all eight neighbour offsets as one ``(8, equations)`` array. Only the right-hand side and
    the diagonal are still summed offset by offset, in the library's order, so every float is
    the library's (``tests/test_xai_metrics.py`` compares them bit for bit). Arguments as the
    library's: ``mask`` (H, W), 1 where the pixel is kept; ``img`` (C, H, W). One equation per
    removed pixel: ``-sum_neighbors`` on the diagonal, the neighbour's weight at each removed
    neighbour, the kept neighbours' weighted values (negated) on the right-hand side.

    Returns:
        ``(rows, cols, values, diagonal, b)``: the off-diagonal entries (each (row, column)
        once, offset by offset as the library lists them), the diagonal ``-sum_neighbors`` and
        ``b`` (equations, C).
    """
    from pytorch_grad_cam.metrics.road import neighbors_weights

    height, width = mask.shape
    maskflt = mask.reshape(-1)
    imgflat = img.reshape((img.shape[0], -1))
    indices = np.flatnonzero(maskflt == 0)
    coords_to_vidx = np.zeros(len(maskflt), dtype=int)
    coords_to_vidx[indices] = np.arange(len(indices))
    row, col = np.divmod(indices, width)
    offsets = np.array([offset for offset, _ in neighbors_weights])
    r, c = row + offsets[:, :1], col + offsets[:, 1:]  # (8, equations)
    valid = (r >= 0) & (c >= 0) & (r < height) & (c < width)
    coords = np.where(valid, r * width + c, 0)  # 0 stands in where the neighbour is outside
    neighbour = maskflt[coords]
    known = valid & (neighbour > 0.5)
    b = np.zeros((len(indices), img.shape[0]))
    sum_neighbors = np.ones(len(indices))
    for k, (_, weight) in enumerate(neighbors_weights):
        ids = np.flatnonzero(known[k])
        b[ids] -= weight * imgflat[:, coords[k, ids]].T
        sum_neighbors[~valid[k]] -= weight
    which, rows = np.nonzero(valid & (neighbour < 0.5))  # offset-major, as the library's
    weights = np.array([weight for _, weight in neighbors_weights])
    return rows, coords_to_vidx[coords[which, rows]], weights[which], -sum_neighbors, b


def _road_system(mask: np.ndarray, img: np.ndarray) -> tuple[csc_matrix, np.ndarray]:
    """The library's ROAD system as one COO -> CSC matrix (the diagonal last), so ``spsolve``
    sees the identical system the library's ``lil_matrix`` builds (:func:`_road_entries`)."""
    rows, cols, values, diagonal, b = _road_entries(mask, img)
    index = np.arange(len(diagonal))
    matrix = coo_matrix(
        (
            np.concatenate([values, diagonal]),
            (np.concatenate([rows, index]), np.concatenate([cols, index])),
        ),
        shape=(len(diagonal), len(diagonal)),
    )
    return matrix.tocsc(), b


def _road_banded(mask: np.ndarray, img: np.ndarray) -> np.ndarray:
    """The library's ROAD system solved as the banded symmetric positive-definite system it is.

    Every neighbour pair carries one weight both ways, so the matrix is symmetric; negated it
    is diagonally dominant with positive diagonal, hence positive definite whenever a pixel is
    kept. Numbered in raster order, a removed pixel's neighbours lie at most ``W + 1``
    equations away, so the matrix is banded and LAPACK's banded Cholesky
    (``scipy.linalg.solveh_banded``) solves it without a sparse factorisation's ordering and
    bookkeeping: on two cores, with one BLAS thread (:meth:`FastNoisyLinearImputer.impute_all`),
    1.9 ms a system at 64 px against SuperLU's 3.7 ms in a two-thread pool, level at 128 px
    (12.5 against 12.0 ms), slower at 224 px (62 against 40 ms). The solution
    equals ``spsolve``'s to about 1e-14 (float64), so the float32 in-fill to rounding. scipy
    has no sparse Cholesky, hence this function.

    Raises:
        numpy.linalg.LinAlgError: the factorisation met a non-positive pivot. Only a system
            with no pixel kept is singular, and rounding decides whether LAPACK notices (with
            a zero right-hand side it usually returns zeros, as ``spsolve`` does).
    """
    from scipy.linalg import solveh_banded

    rows, cols, values, diagonal, b = _road_entries(mask, img)
    upper = rows < cols
    width = int((cols[upper] - rows[upper]).max()) if upper.any() else 0
    band = np.zeros((width + 1, len(diagonal)))
    band[width] = -diagonal
    band[width + rows[upper] - cols[upper], cols[upper]] = -values[upper]
    return solveh_banded(band, -b, check_finite=False)


_BLAS_LIMIT = threading.Lock()  # one caller at a time changes the process's BLAS threads


class FastNoisyLinearImputer:
    """pytorch-grad-cam's ``NoisyLinearImputer`` with :func:`_road_system` building the system.

    ``__call__`` is the library's line for line (the library names its own class for the
    system setup, so a subclass overriding only that would not take effect): the same solve
    and the same noise draws from torch's RNG, so ROAD scores equal the library's.
    :meth:`impute_all` does many images at once: the solves (most of ROAD's time, and
    independent of each other) run either as banded Cholesky solves one after another
    (:func:`_road_banded`; LAPACK keeps the GIL, so threads would not help) or as sparse solves
    in a thread pool (SuperLU releases the GIL), whichever is faster for the threads and image
    size at hand; the noise is then drawn image by image in the given order, from a generator
    seeded as the library's global RNG would be, so the result equals calling the imputer on
    each in turn, to float32 rounding of the solve.
    """

    #: Banded solves, one after another, when the solving threads are at most this many ...
    BANDED_MAX_THREADS = 2
    #: ... and the image at most this wide (the banded cost grows with the width squared).
    BANDED_MAX_WIDTH = 128

    def __init__(self, noise: float = 0.01) -> None:
        self.noise = noise

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._fill(img, mask, self._solve(img, mask))

    def impute_all(
        self, jobs: Sequence[tuple[torch.Tensor, torch.Tensor]], seed: int, workers: int = 0
    ) -> list[torch.Tensor]:
        """Each ``(image, mask)`` imputed, noise seeded once with ``seed`` (a torch generator).

        ``workers``: solving threads; 0 means torch's thread count (the CPU share the process
        was given).
        """
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        workers = max(1, min(workers or torch.get_num_threads(), len(jobs)))
        width = jobs[0][0].shape[-1] if jobs else 0
        if workers <= self.BANDED_MAX_THREADS and width <= self.BANDED_MAX_WIDTH:
            # One BLAS thread: OpenBLAS splits each small banded solve over its threads and
            # spends more on handing it over than on the arithmetic (3x slower at 64 px on
            # two cores). Same result bits. The limit is process-wide, hence the lock (the
            # solves hold the GIL anyway, so callers in threads lose nothing by queueing).
            with _BLAS_LIMIT, threadpool_limits(1, user_api="blas"):
                solved = [self._solve_banded(*job) for job in jobs]
        else:
            with ThreadPoolExecutor(workers) as pool:
                solved = list(pool.map(lambda job: self._solve(*job), jobs))
        # A generator of its own, seeded as the library's global one would be: the same draws,
        # and callers in other threads (or their global RNG) neither see nor move them.
        generator = torch.Generator().manual_seed(seed)  # the imputer runs on the CPU
        pairs = zip(jobs, solved, strict=True)
        return [self._fill(img, mask, res, generator) for (img, mask), res in pairs]

    @staticmethod
    def _solve(img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        matrix, b = _road_system(mask.numpy(), img.numpy())
        return torch.tensor(spsolve(matrix, b), dtype=torch.float)

    @classmethod
    def _solve_banded(cls, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        try:
            return torch.tensor(_road_banded(mask.numpy(), img.numpy()), dtype=torch.float)
        except np.linalg.LinAlgError:  # singular (nothing kept): the sparse solve's answer
            return cls._solve(img, mask)

    def _fill(
        self,
        img: torch.Tensor,
        mask: torch.Tensor,
        res: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The library's in-fill; ``generator`` draws the noise where torch's global RNG would
        (``empty_like(...).normal_`` is what ``randn_like`` runs: the same numbers)."""
        imgflt = img.reshape(img.shape[0], -1)
        indices_linear = np.argwhere(mask.reshape(-1) == 0).flatten()
        img_infill = imgflt.clone()
        noise = torch.empty_like(res.t()).normal_(generator=generator)
        img_infill[:, indices_linear] = res.t() + self.noise * noise
        return img_infill.reshape_as(img)


def deletion_insertion(
    model: torch.nn.Module,
    images: torch.Tensor,
    heatmaps: np.ndarray,
    class_idx: ClassIndex,
    steps: int = 16,
    baseline: str = "blur",
    blur_sigma: float | None = None,
    batch_size: int = 0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Deletion and insertion curves and their AUCs (Petsiuk et al. 2018, RISE).

    Deletion replaces pixels with the baseline in order of decreasing heat; a faithful map
    removes the evidence first, so the class probability falls fast and the AUC is LOW.
    Insertion starts from the baseline and reveals pixels in the same order; a faithful map
    restores the evidence first, so the AUC is HIGH. pytorch-grad-cam has no deletion /
    insertion metric (its ROAD removes one fixed percentile per call), hence this is written
    here.

    Pixels are ranked per image by decreasing heat, ties in a random order drawn from
    ``seed``; step ``s`` of ``steps`` has ``round(s / steps * H * W)`` pixels removed (deletion)
    or revealed (insertion), all channels at once. The inner steps of both curves are built
    chunk by chunk with a vectorised ``where`` (no per-pixel Python loops) and scored in
    device-sized passes; the end points (the clean image and the baseline) are scored once.
    To score many maps of the same images, use one :class:`Perturbations`.

    Args:
        model: classifier returning logits; it is not modified.
        images: (N, 3, H, W) normalised images.
        heatmaps: (N, H, W) maps; resized bilinearly when their size differs from the images.
        class_idx: target class, one int for all images or one per image.
        steps: number of perturbation steps (the curves have ``steps + 1`` points).
        baseline: ``"blur"`` (Gaussian-blurred image, RISE's choice: it removes detail without
            adding the sharp edges a constant fill would) or ``"mean"`` (per-image, per-channel
            mean colour).
        blur_sigma: Gaussian sigma in pixels; default ``max(1, min(H, W) / 32)``.
        batch_size: images per forward pass; 0 sizes it to the device.
        seed: seeds the order among pixels of equal heat.

    Returns:
        ``deletion_auc`` and ``insertion_auc`` (N,), ``deletion_curve`` and ``insertion_curve``
        (N, steps + 1) of target-class softmax probabilities, and ``fractions`` (steps + 1,),
        the share of pixels removed / revealed at each point. AUCs are trapezoids over the
        fraction axis, so they lie in [0, 1].
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scorer = Perturbations(
        model,
        images,
        class_idx,
        baseline=baseline,
        blur_sigma=blur_sigma,
        batch_size=batch_size,
    )
    return scorer.deletion_insertion(heatmaps, steps, seed)


def road_scores(
    model: torch.nn.Module,
    images: torch.Tensor,
    heatmaps: np.ndarray,
    class_idx: ClassIndex,
    percentiles: Sequence[float] = (20, 40, 60, 80),
    variant: str = "combined",
    seed: int = 0,
) -> np.ndarray:
    """ROAD scores (Rong et al. 2022) as pytorch-grad-cam computes them, batched.

    ROAD removes pixels by noisy linear imputation from their neighbours instead of a constant
    fill, so the score measures lost information rather than the model's reaction to an
    out-of-distribution grey patch. Each percentile ``p`` removes the pixels above (MoRF) or
    below (LeRF) the p-th percentile of the map; the scores are averaged over ``percentiles``.

    Sign conventions (all differences of the target-class probability, after - before):

    - ``"morf"``: removing the most relevant pixels; more negative = more faithful.
    - ``"lerf"``: removing the least relevant pixels; closer to 0 = more faithful.
    - ``"combined"``: ``(lerf - morf) / 2``; HIGHER = more faithful (the library's score).

    The perturbations are the library's own (``RemoveMostRelevantFirst`` /
    ``RemoveLeastRelevantFirst``, its imputation with a faster system setup, in the order of
    its ``ROADCombined``); what changes is the scoring: the library runs one forward pass of
    the clean images and one of the imputed ones per percentile and direction, here the clean
    probabilities are computed once and every imputed copy goes through one batched stream
    (:class:`Perturbations`). The imputer draws the library's noise from a torch generator of
    its own seeded with ``seed``, so scores are reproducible and the caller's RNG state is
    left alone. Maps with many equal values (e.g. a large all-zero area) make the percentile
    cuts degenerate, as in the library.

    Returns:
        (N,) float array of scores.
    """
    scorer = Perturbations(model, images, class_idx)
    return scorer.road(heatmaps, percentiles, variant, seed)


def average_drop_increase(
    model: torch.nn.Module,
    images: torch.Tensor,
    heatmaps: np.ndarray,
    class_idx: ClassIndex,
) -> dict[str, np.ndarray]:
    """Average Drop and Increase in Confidence (Chattopadhyay et al. 2018, Grad-CAM++).

    The image is multiplied by its map (pytorch-grad-cam's ``multiply_tensor_with_cam``, what
    its ``CamMultImageConfidenceChange`` does), keeping only what the map highlights. Because
    images are normalised, a zeroed pixel becomes the dataset's mean colour. ``Y`` is the
    target-class softmax probability on the image and ``O`` on the masked image; a map that
    keeps the evidence loses little confidence.

    Returns:
        ``average_drop``: (N,) per-image ``max(0, Y - O) / Y`` as a fraction (the paper reports
        the mean x 100; lower is better), and ``increase``: (N,) bool, ``O > Y`` (the paper
        reports the share of True; higher is better). ``score`` (N,) and ``masked_score`` (N,)
        carry Y and O.
    """
    return Perturbations(model, images, class_idx).average_drop(heatmaps)


# --------------------------------------------------------------------------- agreement


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two (H, W) maps of the same shape."""
    a_arr, b_arr = _as_map(a, "a"), _as_map(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"maps differ in shape: {a_arr.shape} vs {b_arr.shape}")
    return a_arr, b_arr


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two maps in [0, 1] (skimage, ``data_range=1``).

    SSIM compares local structure, so two maps that highlight the same blob with a slightly
    different spread still score high, unlike pixel-wise correlation. The window shrinks to
    the largest odd size that fits maps smaller than skimage's default 7 px.
    """
    a_arr, b_arr = _pair(a, b)
    win = min(7, *a_arr.shape)
    win = win if win % 2 == 1 else win - 1
    if win < 3:
        raise ValueError(f"maps of shape {a_arr.shape} are too small for SSIM (need >= 3 px)")
    return float(structural_similarity(a_arr, b_arr, data_range=1.0, win_size=win))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the two maps' pixels; NaN when either map is constant."""
    a_arr, b_arr = _pair(a, b)
    return _correlation(a_arr.ravel(), b_arr.ravel())


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two vectors, NaN (not a warning) when either has no variance."""
    a_c, b_c = a - a.mean(), b - b.mean()
    denom = np.sqrt((a_c**2).sum() * (b_c**2).sum())
    if denom == 0:
        return float("nan")
    return float(np.clip((a_c * b_c).sum() / denom, -1.0, 1.0))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: Pearson r of the average ranks (Adebayo et al.'s choice)."""
    return _correlation(stats.rankdata(a.ravel()), stats.rankdata(b.ravel()))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the maps as vectors; NaN when either map is all zero."""
    a_arr, b_arr = _pair(a, b)
    denom = np.linalg.norm(a_arr) * np.linalg.norm(b_arr)
    if denom == 0:
        return float("nan")
    return float(np.clip((a_arr * b_arr).sum() / denom, -1.0, 1.0))


def topk_jaccard(a: np.ndarray, b: np.ndarray, top_k_percent: float) -> float:
    """Jaccard index of the two maps' top-k % regions: do they point at the same pixels?

    Returns:
        Jaccard in [0, 1]; NaN when both regions are empty (two all-zero maps).
    """
    a_arr, b_arr = _pair(a, b)
    return _iou(_top_region(a_arr, top_k_percent), _top_region(b_arr, top_k_percent))


def agreement(a: np.ndarray, b: np.ndarray, top_k_percent: float = 20.0) -> dict[str, float]:
    """All four agreement measures of two maps: ``ssim``, ``pearson``, ``cosine``,
    ``topk_jaccard``."""
    return {
        "ssim": ssim(a, b),
        "pearson": pearson(a, b),
        "cosine": cosine(a, b),
        "topk_jaccard": topk_jaccard(a, b, top_k_percent),
    }


# --------------------------------------------------------------------------- sanity


def _reset_module(module: torch.nn.Module) -> int:
    """Call ``reset_parameters()`` on the module and its submodules; return how many had it."""
    count = 0
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
            count += 1
    return count


def _cascade(model: torch.nn.Module, layers: Sequence[str]) -> list[str]:
    """The named layers ordered from the head down (reverse of their definition order)."""
    names = [name for name, _ in model.named_modules()]
    missing = [layer for layer in layers if layer not in names or layer == ""]
    if missing:
        raise ValueError(
            f"no module named {missing} in the model; available: {[n for n in names if n]}"
        )
    return sorted(dict.fromkeys(layers), key=names.index, reverse=True)


def _map_similarity(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image SSIM and Spearman correlation of two (N, H, W) stacks of maps."""
    s = np.array([ssim(b, a) for b, a in zip(before, after, strict=True)])
    r = np.array([_spearman(b, a) for b, a in zip(before, after, strict=True)])
    return s, r


def _explain(explain_fn: ExplainFn, model: torch.nn.Module, x: torch.Tensor, c: Any) -> np.ndarray:
    """Run the explainer and check it returned one (H, W) map per image."""
    maps = np.asarray(explain_fn(model, x, c), dtype=np.float64)
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3 or maps.shape[0] != x.shape[0]:
        raise ValueError(f"explain_fn must return (N={x.shape[0]}, H, W) maps, got {maps.shape}")
    return maps


def randomization_sanity(
    explain_fn: ExplainFn,
    model: torch.nn.Module,
    images: torch.Tensor,
    class_idx: ClassIndex,
    reinit: Callable[[torch.nn.Module], Any] | Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Model-parameter randomisation test (Adebayo et al. 2018, "Sanity Checks for Saliency
    Maps").

    If a method's map barely changes when the model's learned weights are replaced by random
    ones, the map reflects the image (edges, the lesion's contrast) and not what the model
    learned, so it cannot explain the model. The test re-initialises layers of a *deepcopy* of
    the model (the caller's model is untouched) and compares the maps before and after by SSIM
    and Spearman rank correlation. A sane method's similarity drops well below the similarity of
    two repeated runs on the unchanged model (``self_ssim`` / ``self_spearman``, 1 for a
    deterministic method).

    Args:
        explain_fn: ``explain_fn(model, images, class_idx) -> (N, H, W) maps``; it receives the
            randomised copy, so it must find its target layers on the model it is given (e.g.
            by name), not capture the original model's modules. Its ``class_idx`` is a list of
            N ints.
        model: the trained classifier.
        images: (N, 3, H, W) normalised images.
        class_idx: target class, one int or one per image; kept fixed across the cascade.
        reinit: either a callable that randomises the copy in place (one stage, named
            ``"custom"``), or module names (as in ``model.named_modules()``). Names are
            re-initialised cascading from the head: whatever order they are given in, they are
            sorted from the last-defined module backwards and randomised cumulatively, one stage
            per name, via ``reset_parameters()`` on the module and its submodules. None (the
            default) cascades over the model's top-level children that hold parameters (for a
            ResNet: fc, layer4, ..., conv1), a handful of stages rather than one per layer.
        seed: seeds the re-initialisation (in a forked RNG) for a reproducible check.

    Returns:
        ``stages`` (names, head first; each stage includes all earlier ones), ``ssim`` and
        ``spearman`` (the NaN-ignoring mean over images at each stage), ``ssim_per_image`` and
        ``spearman_per_image`` (stages x N), ``ssim_final`` / ``spearman_final`` (the last,
        fully cascaded stage) and ``self_ssim`` / ``self_spearman`` (before vs a repeat run).
    """
    x = _as_images(images)
    classes = _class_indices(class_idx, x.shape[0])
    before = _explain(explain_fn, model, x, classes)
    self_s, self_r = _map_similarity(before, _explain(explain_fn, model, x, classes))

    randomised = copy.deepcopy(model)
    if reinit is None:
        reinit = [
            name for name, child in model.named_children() if any(True for _ in child.parameters())
        ]
    if callable(reinit):
        stages: list[tuple[str, Callable[[torch.nn.Module], Any]]] = [("custom", reinit)]
    else:
        if isinstance(reinit, str):
            reinit = [reinit]
        modules = dict(randomised.named_modules())

        def stage(name: str) -> Callable[[torch.nn.Module], Any]:
            def run(_: torch.nn.Module) -> None:
                if _reset_module(modules[name]) == 0:
                    raise ValueError(f"module {name!r} has no reset_parameters() to re-initialise")

            return run

        stages = [(name, stage(name)) for name in _cascade(model, list(reinit))]
    if not stages:
        raise ValueError("reinit names no layers to re-initialise")

    ssim_rows, spearman_rows = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, randomise in stages:
            with torch.no_grad():
                randomise(randomised)
            after = _explain(explain_fn, randomised, x, classes)
            s, r = _map_similarity(before, after)
            ssim_rows.append(s)
            spearman_rows.append(r)

    ssim_per_image = np.stack(ssim_rows)
    spearman_per_image = np.stack(spearman_rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ssim_mean = np.nanmean(ssim_per_image, axis=1)
        spearman_mean = np.nanmean(spearman_per_image, axis=1)
        self_ssim, self_spearman = float(np.nanmean(self_s)), float(np.nanmean(self_r))
    return {
        "stages": [name for name, _ in stages],
        "ssim": ssim_mean.tolist(),
        "spearman": spearman_mean.tolist(),
        "ssim_per_image": ssim_per_image,
        "spearman_per_image": spearman_per_image,
        "ssim_final": float(ssim_mean[-1]),
        "spearman_final": float(spearman_mean[-1]),
        "self_ssim": self_ssim,
        "self_spearman": self_spearman,
    }


# --------------------------------------------------------------------------- aggregation


def _percentile_ci(
    values: np.ndarray, n_resamples: int, level: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Plain percentile bootstrap of the mean, vectorised over resamples."""
    idx = rng.integers(0, values.size, size=(n_resamples, values.size))
    means = values[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean and bootstrap confidence interval of the mean, ignoring NaNs.

    Uses ``scipy.stats.bootstrap`` (BCa, which corrects for the skew of bounded scores such as
    a 0/1 pointing game). BCa is undefined for degenerate samples (every value equal, or too
    few distinct values); scipy then warns and may return NaN, and this falls back to a numpy
    percentile bootstrap.

    Returns:
        ``(mean, low, high)``; all NaN when no finite value is left, ``(v, v, v)`` for a single
        value or a constant sample (no spread to resample).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(arr.mean())
    if arr.size == 1 or np.all(arr == arr[0]):
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # DegenerateDataWarning is one
        try:
            result = stats.bootstrap(
                (arr,),
                np.mean,
                n_resamples=n_resamples,
                confidence_level=level,
                method="BCa",
                vectorized=True,
                rng=rng,
            )
            low, high = (
                float(result.confidence_interval.low),
                float(result.confidence_interval.high),
            )
        except (RuntimeWarning, ValueError):
            low = high = float("nan")
    if not (np.isfinite(low) and np.isfinite(high)):
        low, high = _percentile_ci(arr, n_resamples, level, np.random.default_rng(seed))
    return mean, low, high


def summarize(
    rows: pd.DataFrame,
    metrics: Sequence[str],
    by: Sequence[str] = ("method", "layer"),
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Per-group mean and bootstrap CI of each metric, one row per group.

    Args:
        rows: one row per explained image (and method / layer), one column per metric.
        metrics: metric columns to summarise.
        by: grouping columns; groups with a missing key (e.g. no layer for IG) are kept.
        n_resamples, seed, level: passed to :func:`bootstrap_ci` (same seed for every cell, so
            the table is reproducible).

    Returns:
        Columns ``*by``, ``n`` (rows in the group), then for each metric ``<m>_mean``,
        ``<m>_low``, ``<m>_high`` and ``<m>_n`` (finite values used).
    """
    by = list(by)
    missing = [c for c in [*by, *metrics] if c not in rows.columns]
    if missing:
        raise ValueError(f"summarize: columns {missing} not in the table {list(rows.columns)}")
    records = []
    groups = rows.groupby(by, dropna=False, sort=True) if by else [((), rows)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        record: dict[str, Any] = dict(zip(by, key, strict=True))
        record["n"] = len(group)
        for m in metrics:
            values = pd.to_numeric(group[m], errors="coerce").to_numpy(dtype=np.float64)
            mean, low, high = bootstrap_ci(values, n_resamples, level, seed)
            record.update(
                {
                    f"{m}_mean": mean,
                    f"{m}_low": low,
                    f"{m}_high": high,
                    f"{m}_n": int(np.isfinite(values).sum()),
                }
            )
        records.append(record)
    return pd.DataFrame.from_records(records)


def rank_methods(
    summary: pd.DataFrame,
    by_metrics: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Rank the rows of a :func:`summarize` table on several metrics and combine the ranks.

    Each metric is ranked on its ``<m>_mean`` column (or ``<m>`` itself for a plain table):
    ``"desc"`` when higher is better (pointing game, insertion AUC, ROAD), ``"asc"`` when lower
    is better (deletion AUC, average drop). Ties share the best rank and a NaN ranks last. The
    combined rank orders the mean of the per-metric ranks, so no metric's scale dominates.

    Args:
        summary: a :func:`summarize` table (or any table with one row per method).
        by_metrics: metric -> "asc" | "desc". None ranks on :data:`DEFAULT_RANKING` (pointing
            game, deletion AUC), keeping those the table has; named metrics must exist.

    Returns:
        The summary sorted best first with ``<m>_rank`` per metric, ``mean_rank`` and ``rank``
        (1 = best) added.
    """
    out = summary.copy()
    if by_metrics is None:
        # The default ranks on what the table has: without masks there is no pointing game.
        by_metrics = {
            m: d
            for m, d in DEFAULT_RANKING.items()
            if f"{m}_mean" in out.columns or m in out.columns
        }
    by_metrics = dict(by_metrics)
    if not by_metrics:
        raise ValueError("rank_methods needs at least one metric present in the summary")
    rank_cols = []
    for metric, direction in by_metrics.items():
        if direction not in ("asc", "desc"):
            raise ValueError(f"direction for {metric!r} must be 'asc' or 'desc', got {direction!r}")
        col = f"{metric}_mean" if f"{metric}_mean" in out.columns else metric
        if col not in out.columns:
            raise ValueError(f"rank_methods: no column {metric}_mean or {metric} in the summary")
        values = pd.to_numeric(out[col], errors="coerce")
        out[f"{metric}_rank"] = values.rank(
            method="min", ascending=direction == "asc", na_option="bottom"
        )
        rank_cols.append(f"{metric}_rank")
    out["mean_rank"] = out[rank_cols].mean(axis=1)
    out["rank"] = out["mean_rank"].rank(method="min").astype(int)
    return out.sort_values(["rank", "mean_rank"], kind="stable").reset_index(drop=True)
