"""Explain: batch explanation jobs over a sample of the test split, and their quality in numbers.

For every sampled image x method x layer this stage writes the heatmap (float16), an overlay
PNG and one row of a table holding the localisation, faithfulness and agreement metrics and the
plain-language text; then a summary (per-method aggregates with confidence intervals, a method
ranking, the randomisation sanity check, attention inside the lesion per class) and an HTML
gallery. The methods themselves live in :mod:`tasks.cams`, the metrics in
:mod:`tasks.xai_metrics` and the sentences in :mod:`tasks.explain_text`.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from PIL import Image
from rich.progress import Progress
from skimage.segmentation import find_boundaries

from tasks import xai_metrics as xm
from tasks.cams import METHODS, explain_batch, method_layers
from tasks.config import ExplainConfig
from tasks.explain_text import describe_heatmap, explain_text
from tasks.labels import full_name
from tasks.prepare import PreparedSplit
from tasks.progress import progress_bar
from tasks.train import normalize

REFERENCE = ("gradcam", "deep")  # the map every other one is compared with


def sample_indices(
    labels: np.ndarray, preds: np.ndarray, per_class: int, misclassified_cap: int, seed: int
) -> np.ndarray:
    """N images per true class plus every misclassified one (up to a cap), sorted, unique."""
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        chosen.update(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    wrong = np.flatnonzero(labels != preds)
    chosen.update(rng.permutation(wrong)[:misclassified_cap].tolist())
    return np.array(sorted(chosen), dtype=int)


def explained_classes(
    target: str, preds: np.ndarray, labels: np.ndarray, classes: list[str]
) -> np.ndarray:
    """The class each map explains: ``predicted``, ``true``, or one named class for all."""
    if target == "predicted":
        return preds
    if target == "true":
        return labels
    if target in classes:
        return np.full_like(preds, classes.index(target))
    raise ValueError(f"explain.target {target!r}: use predicted, true or one of {classes}")


def _budget(method: str, cfg: ExplainConfig, n: int) -> int:
    if method == "scorecam":
        return min(cfg.scorecam_budget, n)
    if method == "lime":
        return min(cfg.lime_budget, n)
    return n


def compute_heatmaps(
    model: torch.nn.Module,
    arch: str,
    images: torch.Tensor,
    targets: np.ndarray,
    cfg: ExplainConfig,
    progress: Progress | None = None,
) -> dict[tuple[str, str | None], np.ndarray]:
    """All (method, layer) maps for the batch; expensive methods stop at their budgets."""
    maps: dict[tuple[str, str | None], np.ndarray] = {}
    pairs = method_layers(cfg.methods, cfg.layers, arch)
    task = progress.add_task("explaining", total=len(pairs)) if progress else None
    for method, layer in pairs:
        n = _budget(method, cfg, len(images))
        if n == 0:  # a budget of 0 switches an expensive method off
            continue
        batches = []
        step = cfg.batch_size if METHODS[method].batchable else 1
        for start in range(0, n, step):
            sl = slice(start, min(start + step, n))
            batches.append(
                explain_batch(
                    model,
                    arch,
                    method,
                    images[sl],
                    targets[sl].tolist(),
                    layer,
                    ig_steps=cfg.ig_steps,
                    lime_samples=cfg.lime_samples,
                    seed=cfg.seed,
                    batch_size=cfg.batch_size,
                )
            )
        maps[(method, layer)] = np.concatenate(batches).astype(np.float32)
        if progress is not None:
            progress.advance(task)
    return maps


def score_maps(
    model: torch.nn.Module,
    images: torch.Tensor,
    masks: np.ndarray,
    has_mask: np.ndarray,
    targets: np.ndarray,
    maps: dict[tuple[str, str | None], np.ndarray],
    cfg: ExplainConfig,
) -> pd.DataFrame:
    """One row per image x (method, layer): localisation, faithfulness, agreement metrics."""
    rows = []
    reference = maps.get(REFERENCE)
    for (method, layer), heat in maps.items():
        n = len(heat)
        x, t = images[:n], targets[:n]
        faith = xm.deletion_insertion(model, x, heat, t, steps=cfg.perturbation_steps)
        drop = xm.average_drop_increase(model, x, heat, t)
        road = xm.road_scores(model, x, heat, t, seed=cfg.seed)
        for i in range(n):
            row = {
                "index": i,
                "method": method,
                "layer": layer or "input",
                "deletion_auc": float(faith["deletion_auc"][i]),
                "insertion_auc": float(faith["insertion_auc"][i]),
                "average_drop": float(drop["average_drop"][i]),
                "increase_in_confidence": float(drop["increase"][i]),
                "road": float(road[i]),
            }
            if has_mask[i]:
                m = masks[i]
                row["pointing_game"] = xm.pointing_game(heat[i], m)
                row["energy_pointing_game"] = xm.energy_pointing_game(heat[i], m)
                row["iou"] = xm.heatmap_iou(heat[i], m, cfg.top_k_percent)
            if reference is not None and i < len(reference) and (method, layer) != REFERENCE:
                agree = xm.agreement(heat[i], reference[i], cfg.top_k_percent)
                row.update({f"agree_{k}": float(v) for k, v in agree.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Heatmap (jet) over the image, as uint8 RGB."""
    colour = colormaps["jet"](heat)[..., :3]
    mixed = (1 - alpha) * image.astype(np.float32) / 255.0 + alpha * colour
    return (np.clip(mixed, 0, 1) * 255).astype(np.uint8)


def outline(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[find_boundaries(mask.astype(bool), mode="inner")] = (0, 255, 255)
    return out


def _png(array: np.ndarray, path: Path, scale: int) -> None:
    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(path)


def run_explain(
    model: torch.nn.Module,
    arch: str,
    split: PreparedSplit,
    probabilities: np.ndarray,
    cfg: ExplainConfig,
    out_dir: Path,
    device: torch.device,
    sanity: bool = True,
    show_progress: bool = True,
) -> dict:
    """The whole job; writes into ``out_dir`` (a fresh folder) and returns the summary."""
    start = time.perf_counter()
    labels = split.labels
    preds = probabilities.argmax(axis=1)
    idx = sample_indices(labels, preds, cfg.per_class, cfg.misclassified_cap, cfg.seed)
    raw = np.array(split.images[idx])
    masks = np.array(split.masks[idx])
    has_mask = split.rows["has_mask"].to_numpy()[idx].astype(bool)
    ids = split.rows["image_id"].to_numpy()[idx]
    x = torch.from_numpy(raw).to(device).permute(0, 3, 1, 2).float().div(255.0)
    x = normalize(x)
    targets = explained_classes(cfg.target, preds[idx], labels[idx], split.classes)
    model = model.to(device).eval()
    with progress_bar(show_progress) as bar:
        maps = compute_heatmaps(model, arch, x, targets, cfg, bar)
    table = score_maps(model, x, masks, has_mask, targets, maps, cfg)
    classes = split.classes
    table.insert(0, "image_id", ids[table["index"]])
    table["true"] = [classes[labels[idx][i]] for i in table["index"]]
    table["predicted"] = [classes[preds[idx][i]] for i in table["index"]]
    table["target"] = [classes[targets[i]] for i in table["index"]]
    table["confidence"] = [float(probabilities[idx][i].max()) for i in table["index"]]
    texts, inside, flags = [], [], []
    for _, r in table.iterrows():
        i, key = r["index"], (r["method"], None if r["layer"] == "input" else r["layer"])
        facts = describe_heatmap(maps[key][i], masks[i] if has_mask[i] else None)
        texts.append(explain_text(r["predicted"], r["confidence"], facts))
        inside.append(facts.get("inside_share"))
        flags.append(bool(facts.get("outside_flag", False)))
    table["inside_share"] = inside
    table["outside_flag"] = flags
    table["text"] = texts

    heat_dir = out_dir / "overlays"
    heat_dir.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for (method, layer), heat in maps.items():
        for i in range(len(heat)):
            name = f"{ids[i]}__{method}__{layer or 'input'}"
            arrays[name] = heat[i].astype(np.float16)
            _png(overlay(raw[i], heat[i]), heat_dir / f"{name}.png", scale=2)
    for i in range(len(ids)):
        _png(outline(raw[i], masks[i]) if has_mask[i] else raw[i], heat_dir / f"{ids[i]}.png", 2)
    np.savez_compressed(out_dir / "heatmaps.npz", **arrays)
    table.drop(columns=["index"]).to_parquet(out_dir / "explanations.parquet", index=False)
    table.drop(columns=["index"]).to_csv(out_dir / "explanations.csv", index=False)

    summary = summarize_table(table, cfg)
    if sanity:
        summary["sanity"] = sanity_check(model, arch, x[: min(4, len(x))], targets[:4], cfg)
    summary["images"] = int(len(ids))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_gallery(out_dir / "gallery.html", table, ids, cfg, classes)
    return summary


METRICS = [
    "pointing_game",
    "energy_pointing_game",
    "iou",
    "deletion_auc",
    "insertion_auc",
    "average_drop",
    "increase_in_confidence",
    "road",
    "agree_ssim",
    "agree_pearson",
]


def summarize_table(table: pd.DataFrame, cfg: ExplainConfig) -> dict:
    """Per (method, layer) means with bootstrap CIs, the ranking, and per-class attention."""
    present = [m for m in METRICS if m in table.columns]
    agg = xm.summarize(table, present, ("method", "layer"), cfg.bootstrap, cfg.seed)
    ranking = xm.rank_methods(agg)
    per_class = (
        table.dropna(subset=["inside_share"]).groupby("true")["inside_share"].mean().to_dict()
        if table["inside_share"].notna().any()
        else {}
    )
    return {
        "methods": agg.to_dict(orient="records"),
        "ranking": ranking.to_dict(orient="records"),
        "inside_share_by_class": {k: float(v) for k, v in per_class.items()},
        "outside_flag_rate": float(table["outside_flag"].mean()),
    }


def sanity_check(
    model: torch.nn.Module, arch: str, x: torch.Tensor, targets: np.ndarray, cfg: ExplainConfig
) -> dict:
    """Model-parameter randomisation (Adebayo et al.) for Grad-CAM at the deep layer."""

    def gradcam(m: torch.nn.Module, images: torch.Tensor, t) -> np.ndarray:
        return explain_batch(m, arch, "gradcam", images, list(t), "deep")

    return xm.randomization_sanity(gradcam, model, x, np.asarray(targets), None)


def write_gallery(
    path: Path, table: pd.DataFrame, ids: np.ndarray, cfg: ExplainConfig, classes: list[str]
) -> None:
    """An HTML page: per image, the input (mask outlined), every method's map, and the text."""
    deep = table[table["layer"].isin(["deep", "input"])]
    methods = list(dict.fromkeys(deep["method"]))
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    body = []
    for image_id in ids:
        rows = deep[deep["image_id"] == image_id]
        if rows.empty:
            continue
        first = rows.iloc[0]
        cells = []
        for m in methods:
            hit = rows[rows["method"] == m]
            if hit.empty:
                cells.append("<td>-</td>")
                continue
            layer = hit.iloc[0]["layer"]
            cells.append(
                f'<td><img src="overlays/{image_id}__{m}__{layer}.png" '
                f'title="{html.escape(hit.iloc[0]["text"])}"></td>'
            )
        text = html.escape(rows[rows["method"] == methods[0]].iloc[0]["text"])
        verdict = "ok" if first["true"] == first["predicted"] else "wrong"
        body.append(
            f'<tr class="{verdict}"><td><img src="overlays/{image_id}.png"><br>'
            f"{html.escape(str(image_id))}<br>true: {html.escape(full_name(first['true']))}"
            f"<br>predicted: {html.escape(full_name(first['predicted']))} "
            f"({first['confidence']:.0%})</td>{''.join(cells)}<td class='text'>{text}</td></tr>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>dermaflow explanations</title><style>body{{font-family:sans-serif}}
td{{vertical-align:top;text-align:center;padding:4px}}
tr.wrong td:first-child{{background:#fdd}} td.text{{text-align:left;max-width:28em}}
img{{image-rendering:pixelated}}</style></head><body>
<h1>Explanations ({len(ids)} test images, deep layer; {", ".join(classes)})</h1>
<p>Heatmaps for the {html.escape(cfg.target)} class; misclassified rows are shaded.
Hover a heatmap for its sentence.</p>
<table><tr><th>image</th>{head}<th>explanation</th></tr>{"".join(body)}</table></body></html>"""
    path.write_text(page)


ExplainFn = Callable[[torch.nn.Module, torch.Tensor, np.ndarray], np.ndarray]
