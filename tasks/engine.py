"""The explanation engine: (model, images, targets, methods, layers) -> heatmaps and scores.

The explain stage, ``dermaflow compare`` and ``dermaflow explain-batch`` all explain a batch of
images with several methods at several layers and score the maps; they call :func:`explain`
and only write their own outputs. What the engine does once for all of them:

- **One pass per kind of work.** Every layer-wise CAM of the plan comes from one forward (and
  one backward) pass per chunk of images with the hooks alive for the whole batch
  (:func:`tasks.cams.layer_cams`); Score-CAM's masked inputs and LIME's perturbations are
  scored in device-sized batches; the other methods go through the registry
  (:data:`tasks.cams.METHODS`), so an unknown name is an error.
- **Budgets.** An expensive method can be limited to the first ``budgets[method]`` images
  (the explain stage spends ``scorecam_budget`` / ``lime_budget`` images on them); 0 skips it.
- **Scores batched over the perturbations.** Every map scored on the same images shares one
  :class:`tasks.xai_metrics.Perturbations` (the clean and baseline probabilities computed once;
  deletion, insertion and ROAD copies scored in device-sized passes; a deletion / insertion
  copy another map already made is not scored again), autocast as ``Options.score_amp``
  says (bf16 where the CPU has bf16 instructions: 2.3x faster passes on the default); the
  maps are float32 whatever it says. Localisation against a lesion mask and agreement with a
  reference map are computed per image.
- **Metadata-fusion models** are explained one image at a time through
  :class:`tasks.fusion.ImageOnly` (each case with its own metadata), transparently.

A progress bar covers the maps and then the scoring.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress
from torch import nn

from tasks import xai_metrics as xm
from tasks.cams import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    METHODS,
    Options,
    Pair,
    explain_batch,
    layer_cams,
    method_layers,
)
from tasks.config import ExplainConfig
from tasks.forward import autocast_dtype, device_of, precision_name
from tasks.fusion import ImageOnly, is_fusion

#: Scores :func:`explain` can compute, and the table columns each adds.
SCORES: dict[str, tuple[str, ...]] = {
    "deletion_insertion": ("deletion_auc", "insertion_auc"),
    "average_drop": ("average_drop", "increase_in_confidence"),
    "road": ("road",),
    "localisation": ("pointing_game", "energy_pointing_game", "iou"),
    "agreement": tuple(f"agree_{k}" for k in ("ssim", "pearson", "cosine", "topk_jaccard")),
}
NONDETERMINISTIC = r".*does not have a deterministic implementation"

__all__ = ["SCORES", "Explanations", "Options", "explain", "options", "plan"]


@dataclass(frozen=True)
class Explanations:
    """What :func:`explain` returns.

    Attributes:
        maps: ``(method, layer)`` -> ``(n, H, W)`` float32 heatmaps in ``[0, 1]``, where ``n``
            is the method's budget (``layer`` is None for input-level attributions).
        table: one row per image x (method, layer): ``index`` (the image's position in the
            batch), ``method``, ``layer`` (``"input"`` for attributions), ``flat`` (a constant
            map: it points nowhere), then the columns of the requested :data:`SCORES`.
        work: where the time went: ``maps_s`` and ``scores_s`` (wall seconds of the two
            phases), ``scored_images`` (perturbed copies forwarded by the scores) with their
            ``forward_s``, ``reused_images`` (deletion / insertion copies identical to one
            an earlier map made, answered without a forward) and ``imputation_s`` (ROAD's
            in-filling): what a bench needs to tell the model's own cost from the engine's.
        score_precision: what the faithfulness scores' forwards ran in (``float32``,
            ``bf16 autocast`` or ``fp16 autocast``; ``Options.score_amp`` on this device).
    """

    maps: dict[Pair, np.ndarray]
    table: pd.DataFrame
    work: dict[str, float] = field(default_factory=dict)
    score_precision: str = "float32"


def options(
    cfg: ExplainConfig,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Options:
    """How the methods run, from ``explain.*`` and the model's normalisation."""
    return Options(
        ig_steps=cfg.ig_steps,
        lime_samples=cfg.lime_samples,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        mean=tuple(mean),
        std=tuple(std),
        score_amp=cfg.score_amp,
    )


def plan(
    methods: Sequence[str], layers: Sequence[str], arch: str, fusion: bool = False
) -> list[Pair]:
    """The ``(method, layer)`` pairs a model supports, in config order.

    :func:`tasks.cams.method_layers` (unknown names are errors; exact CAM only where the
    architecture has an exact head), minus exact CAM for a metadata-fusion model, whose
    metadata branch sits between the pooled image features and the logit.
    """
    pairs = method_layers(methods, layers, arch)
    if fusion:
        pairs = [(m, lay) for m, lay in pairs if METHODS[m].kind != "exact_cam"]
    return pairs


def explain(
    model: nn.Module,
    arch: str,
    images: torch.Tensor,
    targets: Sequence[int] | np.ndarray,
    pairs: Sequence[Pair],
    *,
    options: Options | None = None,
    budgets: Mapping[str, int] | None = None,
    scores: Sequence[str] = (),
    masks: np.ndarray | None = None,
    reference: Pair | None = None,
    perturbation_steps: int = 16,
    top_k_percent: float = 20.0,
    metadata: np.ndarray | None = None,
    progress: Progress | None = None,
    label: str = "explaining",
) -> Explanations:
    """Heatmaps of every ``(method, layer)`` in ``pairs`` for ``images``, and their scores.

    Args:
        model: an image-only model, or a metadata-fusion model with ``metadata`` (float32;
            its training flag is restored afterwards).
        arch: its architecture name.
        images: ``(N, 3, H, W)`` normalised images on any device (moved to the model's).
        targets: the class each image is explained for (length ``N``).
        pairs: what to compute, e.g. from :func:`plan`.
        options: how the methods run (:class:`tasks.cams.Options`: IG steps, LIME samples,
            seed, batch size or 0 to size passes to the device, normalisation).
        budgets: method -> most images explained with it (the first ones); 0 skips it.
        scores: names from :data:`SCORES`.
        masks: ``(N, H, W)`` lesion masks, an all-zero mask meaning "no mask"; needed by
            ``localisation``.
        reference: the pair every other map is compared with by ``agreement``.
        perturbation_steps: steps of the deletion / insertion curves.
        top_k_percent: share of pixels kept for the IoU and the top-k Jaccard agreement.
        metadata: ``(N, D)`` metadata rows of a fusion model.
        progress: a live rich display to advance (maps, then scores).
        label: the progress lines' text.

    Raises:
        ValueError: an unknown score, a method or layer the registry does not know, scores
            that need masks or a reference without them.
    """
    unknown = sorted(set(scores) - set(SCORES))
    if unknown:
        raise ValueError(f"unknown score(s) {unknown}; choose from {list(SCORES)}")
    if "localisation" in scores and masks is None:
        raise ValueError("the localisation scores need lesion masks")
    if "agreement" in scores and reference is None:
        raise ValueError("the agreement scores need a reference (method, layer)")
    opts = options or Options()
    targets = [int(t) for t in np.asarray(targets).reshape(-1)]
    batch = _Batch(arch, images, targets, _views(model, len(images), metadata), progress)
    start = time.perf_counter()
    maps = _maps(batch, list(dict.fromkeys(pairs)), opts, budgets, label)
    middle = time.perf_counter()
    dtype = autocast_dtype(device_of(model), opts.score_amp)  # where the scorers run
    scoring = _Scoring(scores, masks, reference, perturbation_steps, top_k_percent, opts, dtype)
    table, work = _scores(batch, maps, scoring, label.replace("explaining", "scoring"))
    work = {"maps_s": middle - start, "scores_s": time.perf_counter() - middle, **work}
    return Explanations(maps, table, work, precision_name(dtype))


def _views(model: nn.Module, n: int, metadata: np.ndarray | None) -> list[tuple[slice, nn.Module]]:
    """The ``model(x)`` callables that cover ``n`` images: the model for all, or one per image.

    A fusion model needs each case's own metadata, so it is explained one image at a time
    through a :class:`tasks.fusion.ImageOnly`; an image-only model takes the whole batch.
    """
    if not is_fusion(model):
        return [(slice(0, n), model)]
    if metadata is None or len(metadata) < n:
        raise ValueError("a metadata-fusion model needs one metadata row per explained image")
    return [(slice(i, i + 1), ImageOnly(model, metadata[i])) for i in range(n)]


@dataclass(frozen=True)
class _Batch:
    """The images being explained, their targets, and the model callable for each slice."""

    arch: str
    images: torch.Tensor
    targets: list[int]
    views: list[tuple[slice, nn.Module]]
    progress: Progress | None


@dataclass(frozen=True)
class _Scoring:
    """What :func:`explain` was asked to score, and with which settings."""

    names: Sequence[str]
    masks: np.ndarray | None
    reference: Pair | None
    steps: int
    top_k_percent: float
    options: Options
    autocast: torch.dtype | None  # of the scoring passes (None: float32)


def _maps(
    batch: _Batch, pairs: list[Pair], opts: Options, budgets: Mapping[str, int] | None, label: str
) -> dict[Pair, np.ndarray]:
    """Every pair's heatmaps: layer-wise CAMs with one budget share one pass per view."""
    counts = {p: _budget(p[0], budgets, len(batch.images)) for p in pairs}
    todo = [p for p in pairs if counts[p] > 0]
    progress = batch.progress
    task = progress.add_task(label, total=len(todo)) if progress is not None else None
    parts: dict[Pair, list[np.ndarray]] = {p: [] for p in todo}
    with warnings.catch_warnings():
        # train() leaves torch's deterministic mode on (warn_only); DeepLIFT's max-unpooling
        # and a few backward kernels then warn on every call, for nothing a user can change.
        warnings.filterwarnings("ignore", message=NONDETERMINISTIC)
        for sl, view in batch.views:
            for group in _groups(todo, counts, sl):
                n = min(counts[group[0]], sl.stop) - sl.start
                x = batch.images[sl.start : sl.start + n]
                t = batch.targets[sl.start : sl.start + n]
                if METHODS[group[0][0]].kind == "cam":
                    got = layer_cams(view, batch.arch, x, t, group, opts)
                else:
                    method, layer = group[0]
                    got = {group[0]: explain_batch(view, batch.arch, method, x, t, layer, opts)}
                for pair in group:
                    parts[pair].append(got[pair])
                    if progress is not None and sl.stop >= counts[pair]:
                        progress.advance(task)  # the pair's last images
    if progress is not None:
        progress.remove_task(task)
    return {p: np.concatenate(parts[p]).astype(np.float32) for p in todo}


def _budget(method: str, budgets: Mapping[str, int] | None, n: int) -> int:
    if budgets is None or method not in budgets:
        return n
    return max(0, min(int(budgets[method]), n))


def _groups(pairs: list[Pair], counts: dict[Pair, int], sl: slice) -> list[list[Pair]]:
    """Pairs computed together on the images of ``sl``: all layer-wise CAMs with the same
    budget share one pass; every other pair is its own group. Pairs whose budget ends before
    ``sl`` are left out."""
    shared: dict[int, list[Pair]] = {}
    groups: list[list[Pair]] = []
    for pair in pairs:
        if counts[pair] <= sl.start:
            continue
        if METHODS[pair[0]].kind == "cam":
            if counts[pair] not in shared:
                shared[counts[pair]] = []
                groups.append(shared[counts[pair]])
            shared[counts[pair]].append(pair)
        else:
            groups.append([pair])
    return groups


def _scores(
    batch: _Batch, maps: Mapping[Pair, np.ndarray], scoring: _Scoring, label: str
) -> tuple[pd.DataFrame, dict[str, float]]:
    """The table of :func:`explain` (a map with a budget is scored on its first images), and
    the scorers' work summed (see :attr:`Explanations.work`)."""
    progress, scores, masks = batch.progress, scoring.names, scoring.masks
    reference, top_k_percent = scoring.reference, scoring.top_k_percent
    targets = np.asarray(batch.targets)
    task = progress.add_task(label, total=len(maps)) if progress is not None else None
    scorers: list[xm.Perturbations | None] = [None] * len(batch.views)
    need_model = {"deletion_insertion", "average_drop", "road"} & set(scores)
    ref = maps.get(reference) if reference is not None else None
    rows = []
    for (method, layer), heat in maps.items():
        n = len(heat)
        faith: dict[str, np.ndarray] = {}
        for k, (sl, view) in enumerate(batch.views):
            if sl.start >= n or not need_model:
                continue
            stop = min(sl.stop, n)
            if scorers[k] is None:
                scorers[k] = xm.Perturbations(
                    view,
                    batch.images[sl],
                    targets[sl],
                    batch_size=scoring.options.batch_size,
                    autocast=scoring.autocast,
                )
            scorer = scorers[k].head(stop - sl.start)
            for name, values in _faithfulness(scorer, heat[sl.start : stop], scoring).items():
                faith.setdefault(name, []).append(values)
        faith = {name: np.concatenate(parts) for name, parts in faith.items()}
        for i in range(n):
            row = {"index": i, "method": method, "layer": layer or "input"}
            row["flat"] = bool(heat[i].max() == heat[i].min())
            row |= {name: values[i].item() for name, values in faith.items()}
            if "localisation" in scores and masks[i].any():
                row["pointing_game"] = xm.pointing_game(heat[i], masks[i])
                row["energy_pointing_game"] = xm.energy_pointing_game(heat[i], masks[i])
                row["iou"] = xm.heatmap_iou(heat[i], masks[i], top_k_percent)
            compared = ref is not None and i < len(ref) and (method, layer) != reference
            if "agreement" in scores and compared:
                agree = xm.agreement(heat[i], ref[i], top_k_percent)
                row |= {f"agree_{k}": float(v) for k, v in agree.items()}
            rows.append(row)
        if progress is not None:
            progress.advance(task)
    if progress is not None:
        progress.remove_task(task)
    columns = ["index", "method", "layer", "flat"]
    columns += [c for name in scores for c in SCORES[name]]
    table = pd.DataFrame(rows)
    used = [s.work for s in scorers if s is not None]
    kinds = ("scored_images", "reused_images", "forward_s", "imputation_s")
    work = {k: sum(w[k] for w in used) for k in kinds}
    return (table[[c for c in columns if c in table.columns]] if rows else table), work


def _faithfulness(
    scorer: xm.Perturbations, heat: np.ndarray, scoring: _Scoring
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    seed = scoring.options.seed
    if "deletion_insertion" in scoring.names:
        curves = scorer.deletion_insertion(heat, scoring.steps, seed)
        out["deletion_auc"], out["insertion_auc"] = curves["deletion_auc"], curves["insertion_auc"]
    if "average_drop" in scoring.names:
        drop = scorer.average_drop(heat)
        out["average_drop"] = drop["average_drop"]
        out["increase_in_confidence"] = drop["increase"].astype(float)
    if "road" in scoring.names:
        out["road"] = scorer.road(heat, seed=seed)
    return out
