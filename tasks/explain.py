"""Explain: batch explanation jobs over a sample of the test split, and their quality in numbers.

For every sampled image x method x layer this stage writes the heatmap (float16), an overlay
PNG and one row of a table holding the localisation, faithfulness and agreement metrics and the
plain-language text; then a summary (per-method aggregates with confidence intervals, a method
ranking, the randomisation sanity check, attention inside the lesion per class) and an HTML
gallery. The heatmaps and scores come from the explanation engine (:func:`tasks.engine.explain`,
the methods in :mod:`tasks.cams`, the metrics in :mod:`tasks.xai_metrics`); this module picks
the images, words the maps (:mod:`tasks.explain_text`) and writes the outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tasks import engine, paths
from tasks import xai_metrics as xm
from tasks.cams import explain_batch
from tasks.config import ExplainConfig, Params
from tasks.explain_text import describe_heatmap, explain_text, metadata_text
from tasks.fusion import has_metadata, prior_from_meta
from tasks.gallery import outline, overlay, overlay_name, save_png, write_gallery
from tasks.labels import full_name
from tasks.prepare import PreparedSplit
from tasks.progress import progress_bar
from tasks.stage import console, main
from tasks.train import MEAN, STD, normalize

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


SCORES = ("deletion_insertion", "average_drop", "road", "localisation", "agreement")


def budgets(cfg: ExplainConfig) -> dict[str, int]:
    """Images spent on the expensive methods (the first ones of the sample)."""
    return {"scorecam": cfg.scorecam_budget, "lime": cfg.lime_budget}


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
    image_only: np.ndarray | None = None,
) -> dict:
    """The whole job; writes into ``out_dir`` (a fresh folder) and returns the summary.

    ``image_only`` (a model with a metadata prior): the calibrated probabilities without the
    prior; each row with age, sex or site then gets a sentence on what they changed.
    """
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
        result = engine.explain(
            model,
            arch,
            x,
            targets,
            engine.plan(cfg.methods, cfg.layers, arch),
            options=engine.options(cfg, MEAN, STD),
            budgets=budgets(cfg),
            scores=SCORES,
            masks=np.where(has_mask[:, None, None], masks, 0),
            reference=REFERENCE,
            perturbation_steps=cfg.perturbation_steps,
            top_k_percent=cfg.top_k_percent,
            progress=bar,
        )
    maps, table = result.maps, result.table.drop(columns=["flat"])
    classes = split.classes
    table.insert(0, "image_id", ids[table["index"]])
    table["true"] = [classes[labels[idx][i]] for i in table["index"]]
    table["predicted"] = [classes[preds[idx][i]] for i in table["index"]]
    table["target"] = [classes[targets[i]] for i in table["index"]]
    table["confidence"] = [float(probabilities[idx][i].max()) for i in table["index"]]
    texts, inside, flags = [], [], []
    with_metadata = has_metadata(split.rows) if image_only is not None else None
    for _, r in table.iterrows():
        i, key = r["index"], (r["method"], None if r["layer"] == "input" else r["layer"])
        facts = describe_heatmap(maps[key][i], masks[i] if has_mask[i] else None)
        text = explain_text(r["predicted"], r["confidence"], facts)
        if with_metadata is not None and with_metadata[idx[i]]:
            row, k = split.rows.iloc[idx[i]], classes.index(r["predicted"])
            text += " " + metadata_text(
                r["predicted"], float(image_only[idx[i], k]), r["confidence"],
                row["age"], row["sex"], row["site"],
            )  # fmt: skip
        texts.append(text)
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
            name = overlay_name(ids[i], method, layer)
            arrays[name] = heat[i].astype(np.float16)
            save_png(overlay(raw[i], heat[i]), heat_dir / f"{name}.png", scale=2)
    for i in range(len(ids)):
        picture = outline(raw[i], masks[i]) if has_mask[i] else raw[i]
        save_png(picture, heat_dir / f"{ids[i]}.png", 2)
    np.savez_compressed(out_dir / "heatmaps.npz", **arrays)
    table.drop(columns=["index"]).to_parquet(out_dir / "explanations.parquet", index=False)
    table.drop(columns=["index"]).to_csv(out_dir / "explanations.csv", index=False)

    summary = summarize_table(table, cfg)
    if sanity:
        summary["sanity"] = sanity_check(model, arch, x[: min(4, len(x))], targets[:4], cfg)
    summary["images"] = int(len(ids))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["work"] = {k: round(float(v), 2) for k, v in result.work.items()}  # bench's bound
    summary["score_precision"] = result.score_precision
    write_explain_gallery(out_dir / "gallery.html", table, ids, cfg, classes)
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


def write_explain_gallery(
    path: Path, table: pd.DataFrame, ids: np.ndarray, cfg: ExplainConfig, classes: list[str]
) -> None:
    """The gallery (:func:`tasks.gallery.write_gallery`): per image, the input with its mask
    outlined, every method's map at the deep layer, and the text; misclassified rows shaded."""

    def caption(first: pd.Series) -> list[str]:
        return [
            str(first["image_id"]),
            f"true: {full_name(first['true'])}",
            f"predicted: {full_name(first['predicted'])} ({first['confidence']:.0%})",
        ]

    write_gallery(
        path,
        table,
        "deep",
        heading=f"Explanations ({len(ids)} test images, deep layer; {', '.join(classes)})",
        intro=f"Heatmaps for the {cfg.target} class; misclassified rows are shaded. "
        "Hover a heatmap for its sentence.",
        caption=caption,
        order=[str(i) for i in ids],
        css=lambda first: "ok" if first["true"] == first["predicted"] else "wrong",
    )


ExplainFn = Callable[[torch.nn.Module, torch.Tensor, np.ndarray], np.ndarray]


def explain_metrics(summary: dict) -> dict[str, float]:
    """Flat per-method means for MLflow and DVC (``xai_<method>_<layer>_<metric>``)."""
    out: dict[str, float] = {}
    for row in summary["methods"]:
        for key, value in row.items():
            if key.endswith("_mean") and value is not None and value == value:
                out[f"xai_{row['method']}_{row['layer']}_{key[:-5]}"] = float(value)
    for label, share in summary["inside_share_by_class"].items():
        out[f"xai_inside_share_{label}"] = share
    sanity = summary.get("sanity") or {}
    if "ssim_final" in sanity:
        out["xai_sanity_ssim_after_randomisation"] = float(sanity["ssim_final"])
    return out


def run(p: Params) -> dict:
    """The ``explain`` stage: explain sampled test images; heatmaps, metrics, text, gallery."""
    from tasks import tracking
    from tasks.calibrate import read_calibrator
    from tasks.io import atomic_dir, write_json
    from tasks.metrics import load_predictions
    from tasks.models import load_image_bundle
    from tasks.prepare import open_split
    from tasks.train import pick_device

    model, meta = load_image_bundle(paths.BUNDLE, "explain")
    calibrator = read_calibrator()
    test = load_predictions(paths.PREDICTIONS / "test.npz")
    probabilities = calibrator.probabilities(test["logits"])
    split = open_split(paths.PREPARED, "test")
    prior = prior_from_meta(meta.get("extra"))
    image_only = (
        None
        if prior is None
        else calibrator.probabilities(test["logits"] - prior.log_odds(split.rows))
    )
    device = pick_device(p.train.device)
    with atomic_dir(paths.EXPLAIN) as tmp:
        summary = run_explain(
            model, meta["arch"], split, probabilities, p.explain, tmp, device,
            image_only=image_only,
        )  # fmt: skip
        write_json(tmp / "summary.json", summary)
    flat = explain_metrics(summary)
    write_json(paths.METRICS / "explain.json", flat)
    with tracking.resume_lineage_run():
        tracking.log_metrics(flat)
        tracking.log_artifacts({"explain": paths.EXPLAIN})
    best = summary["ranking"][0] if summary["ranking"] else {}
    console.print(
        f"explain: {summary['images']} images in {summary['seconds']} s; best-ranked "
        f"{best.get('method')}@{best.get('layer')}; gallery {paths.EXPLAIN / 'gallery.html'}"
    )
    return flat


if __name__ == "__main__":
    raise SystemExit(main("explain"))
