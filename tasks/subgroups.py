"""Subgroups: the same metrics per sex, age band, anatomical site and skin tone.

A model can be good on average and poor for a group: older patients, a body site the data
rarely shows, darker skin (dermatology datasets are mostly light skin). This stage splits the
test split and every external set (``evaluate.external``, scored by the evaluate stage) by
each attribute of ``subgroups.attributes`` and reports, per group, balanced accuracy, accuracy
and melanoma sensitivity with n and a bootstrap CI; the largest gap between groups for each
metric; and a flag for every group with n >= ``subgroups.min_group_n`` whose metric falls more
than ``subgroups.max_gap`` below the rest of its split. It also reports the skin-tone
distribution of the training split.

Point estimates per group come from fairlearn's ``MetricFrame`` (the usual tool for
disaggregated metrics); the CIs from :func:`tasks.evaluate.bootstrap_ci` (vectorised; see
there why not ``MetricFrame``'s own bootstrap). Skin tone is the ITA category of the skin
around the lesion (:mod:`tasks.skintone`), measured on the cached test images here and on
the decoded external images by the evaluate stage. Groups with no value (``unknown``: no sex
recorded, too little skin to measure) are shown but never flagged nor counted in a gap:
they are not a population.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tasks import paths
from tasks.calibrate import read_calibrator
from tasks.config import Params, SubgroupsConfig
from tasks.evaluate import GROUP_METRICS, MELANOMA, TABLES, bootstrap_ci
from tasks.io import atomic_dir, write_json
from tasks.metrics import DPI, load_predictions, save_figure
from tasks.prepare import open_split
from tasks.skintone import UNKNOWN, ita_angle, ita_category, tone_distribution
from tasks.stage import console, main

REPORTS = Path("reports") / "subgroups"
METRICS_FILE = paths.METRICS / "subgroups.json"


class SubgroupError(ValueError):
    """The inputs of the subgroup analysis do not fit together (e.g. a missing external set)."""


def age_band(ages: Sequence[Any], edges: Sequence[float]) -> list[str]:
    """``<30``, ``30-44``, ..., ``75+`` for the band edges; ``unknown`` for a missing age."""
    edges = [float(e) for e in edges]
    names = [f"<{edges[0]:g}"]
    names += [f"{lo:g}-{hi - 1:g}" for lo, hi in zip(edges, edges[1:], strict=False)]
    names.append(f"{edges[-1]:g}+")
    out = []
    for age in pd.to_numeric(pd.Series(list(ages), dtype=object), errors="coerce"):
        out.append(UNKNOWN if pd.isna(age) else names[int(np.searchsorted(edges, age, "right"))])
    return out


def _text(values: Sequence[Any]) -> list[str]:
    return [
        UNKNOWN if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values
    ]


def attribute_columns(frame: pd.DataFrame, cfg: SubgroupsConfig) -> pd.DataFrame:
    """The group of every row for each attribute of ``cfg.attributes`` (strings)."""
    out = pd.DataFrame(index=frame.index)
    for attribute in cfg.attributes:
        if attribute == "age_band":
            out[attribute] = age_band(frame["age"], cfg.age_bands)
        elif attribute == "skin_tone":
            out[attribute] = _text(frame["skin_tone"])
        else:
            out[attribute] = _text(frame[attribute])
    return out


def _metrics_present(labels: Sequence[str]) -> list[str]:
    return [m for m in GROUP_METRICS if m != "melanoma_sensitivity" or MELANOMA in set(labels)]


def _point_metrics(metrics: list[str]) -> dict[str, Any]:
    """sklearn-style ``f(y_true, y_pred)`` for MetricFrame, one per metric name."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    def melanoma_sensitivity(y: Any, p: Any) -> float:
        y, p = np.asarray(y), np.asarray(p)
        mel = y == MELANOMA
        return float((p[mel] == MELANOMA).mean()) if mel.any() else float("nan")

    known = {
        "balanced_accuracy": balanced_accuracy_score,
        "accuracy": accuracy_score,
        "melanoma_sensitivity": melanoma_sensitivity,
    }
    return {m: known[m] for m in metrics}


def _float(value: Any) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def analyse_split(
    labels: Sequence[str],
    predicted: Sequence[str],
    groups: pd.DataFrame,
    cfg: SubgroupsConfig,
    split: str,
) -> dict[str, Any]:
    """Per-group metrics, largest gaps and flags of one split (see the module docstring).

    Args:
        labels, predicted: true and predicted class names per image.
        groups: one column per attribute, the group of each image.
        cfg: ``subgroups`` params.
        split: the split's name, for the flag text.
    """
    from fairlearn.metrics import MetricFrame

    y, p = np.asarray(labels, dtype=object), np.asarray(predicted, dtype=object)
    metrics = _metrics_present(list(y))
    out_groups: dict[str, dict[str, Any]] = {}
    flags: list[str] = []
    gaps: dict[str, dict[str, Any]] = {}
    for attribute in groups.columns:
        column = groups[attribute].to_numpy(dtype=object)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a group without some class the model predicts
            frame = MetricFrame(
                metrics=_point_metrics(metrics),
                y_true=y,
                y_pred=p,
                sensitive_features=pd.Series(column, name=attribute),
            )
        table: dict[str, dict[str, Any]] = {}
        for group, row in frame.by_group.iterrows():
            members = column == group
            seed = cfg.seed + len(table)
            entry: dict[str, Any] = {"n": int(members.sum())}
            for metric in metrics:
                entry[metric] = _float(row[metric])
                entry[f"{metric}_ci"] = bootstrap_ci(
                    y[members], p[members], cfg.bootstrap, cfg.confidence, seed, metric
                )
            entry["ci"] = entry["balanced_accuracy_ci"]
            rest = ~members
            entry["rest"] = {}
            for metric in metrics:
                value = _rest_value(metric, y[rest], p[rest])
                entry["rest"][metric] = value
                gap = None if entry[metric] is None or value is None else value - entry[metric]
                if (
                    group != UNKNOWN
                    and entry["n"] >= cfg.min_group_n
                    and gap is not None
                    and gap > cfg.max_gap
                ):
                    flags.append(
                        f"{split}: {attribute}={group} (n={entry['n']}) {metric} "
                        f"{entry[metric]:.3f} vs {value:.3f} for the rest "
                        f"(gap {gap:.3f} > {cfg.max_gap:g})"
                    )
            table[str(group)] = entry
        out_groups[attribute] = table
        for metric in metrics:
            eligible = [
                e[metric]
                for g, e in table.items()
                if g != UNKNOWN and e["n"] >= cfg.min_group_n and e[metric] is not None
            ]
            if len(eligible) >= 2:
                gap = float(max(eligible) - min(eligible))
                if metric not in gaps or gap > gaps[metric]["gap"]:
                    gaps[metric] = {"attribute": attribute, "gap": gap}
    return {"n": len(y), "groups": out_groups, "largest_gap": gaps, "flags": flags}


def _rest_value(metric: str, y: np.ndarray, p: np.ndarray) -> float | None:
    if y.size == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = _point_metrics([metric])[metric](y, p)
    return _float(value)


def plot_groups(result: Mapping[str, Any], split: str, metric: str = "balanced_accuracy") -> Figure:
    """One panel per attribute: the metric per group with its CI and n."""
    attributes = list(result["groups"])
    fig = Figure(figsize=(4.2 * max(1, len(attributes)), 4.2), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(attributes))))
    for ax, attribute in zip(axes, attributes, strict=False):
        table = result["groups"][attribute]
        names = list(table)
        values = [table[g][metric] if table[g][metric] is not None else np.nan for g in names]
        lows = [
            v - (table[g][f"{metric}_ci"][0] if table[g][f"{metric}_ci"][0] is not None else v)
            for g, v in zip(names, values, strict=True)
        ]
        highs = [
            (table[g][f"{metric}_ci"][1] if table[g][f"{metric}_ci"][1] is not None else v) - v
            for g, v in zip(names, values, strict=True)
        ]
        pos = np.arange(len(names))
        ax.barh(pos, values, xerr=[lows, highs], color="tab:blue", alpha=0.75, capsize=3)
        ax.set_yticks(pos, [f"{g} (n={table[g]['n']})" for g in names], fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel(metric.replace("_", " "))
        ax.set_title(attribute)
    fig.suptitle(f"{split}: {metric.replace('_', ' ')} per group (bootstrap CI)")
    return fig


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def cached_skin_tones(prepared_dir: str | Path, split: str) -> tuple[pd.DataFrame, list[str]]:
    """The prepared split's rows and the ITA category of each cached image (with its mask)."""
    cached = open_split(prepared_dir, split)
    has_mask = cached.rows["has_mask"].to_numpy(dtype=bool)
    tones = [
        ita_category(
            ita_angle(np.asarray(cached.images[i]), cached.masks[i] if has_mask[i] else None)
        )
        for i in range(len(cached.rows))
    ]
    return cached.rows, tones


def test_split_frame(p: Params) -> pd.DataFrame:
    """Label, calibrated prediction and attributes of every test image."""
    preds = load_predictions(paths.PREDICTIONS / "test.npz")
    classes = list(preds["classes"])
    calibrator = read_calibrator()
    predicted = calibrator.probabilities(preds["logits"]).argmax(axis=1)
    rows, tones = cached_skin_tones(paths.PREPARED, "test")
    meta = rows.assign(skin_tone=tones).drop_duplicates("image_id").set_index("image_id")
    ids = [str(i) for i in preds["image_ids"]]
    missing = [i for i in ids if i not in meta.index]
    if missing:
        raise SubgroupError(
            f"{paths.PREDICTIONS / 'test.npz'}: image {missing[0]} is not in the prepared test "
            "split; re-run train"
        )
    frame = meta.loc[ids, ["sex", "age", "site", "skin_tone"]].reset_index()
    frame["label"] = [classes[i] for i in preds["labels"]]
    frame["predicted"] = [classes[i] for i in predicted]
    return frame


def run(p: Params) -> dict:
    """The ``subgroups`` stage: test split and every external set, by each attribute."""
    from tasks import tracking

    cfg = p.subgroups
    frames = {"test": test_split_frame(p)}
    for ext in p.evaluate.external:
        table = TABLES / f"{ext.name}.parquet"
        if not table.is_file():
            raise SubgroupError(f"{table}: missing; run the evaluate stage first (dvc repro)")
        frames[ext.name] = pd.read_parquet(table)
    _, train_tones = cached_skin_tones(paths.PREPARED, "train")
    splits = {
        name: analyse_split(
            list(frame["label"]), list(frame["predicted"]), attribute_columns(frame, cfg), cfg, name
        )
        for name, frame in frames.items()
    }
    result = {"splits": splits, "train_skin_tone": tone_distribution(train_tones)}
    with atomic_dir(REPORTS) as out:
        for name, split in splits.items():
            save_figure(plot_groups(split, name), out / f"{_safe(name)}_balanced_accuracy.png")
        write_json(out / "subgroups.json", result)
    write_json(METRICS_FILE, result)
    flat: dict[str, float] = {}
    for name, split in splits.items():
        flat[f"subgroups/{_safe(name)}/flags"] = float(len(split["flags"]))
        for metric, gap in split["largest_gap"].items():
            flat[f"subgroups/{_safe(name)}/largest_gap_{metric}"] = gap["gap"]
    total = sum(result["train_skin_tone"].values()) or 1
    for tone, count in result["train_skin_tone"].items():
        flat[f"subgroups/train_skin_tone_share_{tone}"] = count / total
    with tracking.resume_lineage_run():
        tracking.log_metrics(flat)
        tracking.log_artifacts({"subgroups": REPORTS})
    for name, split in splits.items():
        gaps = ", ".join(
            f"{m} {g['gap']:.3f} ({g['attribute']})" for m, g in split["largest_gap"].items()
        )
        console.print(
            f"subgroups {name}: {split['n']} images; largest gap "
            f"{gaps or 'none (groups too small)'}; {len(split['flags'])} flag(s)",
            highlight=False,
        )
        for flag in split["flags"]:
            console.print(f"[yellow]  {flag}[/]", highlight=False)
    shares = ", ".join(f"{t} {c}" for t, c in result["train_skin_tone"].items() if c)
    console.print(f"subgroups: training skin tones (ITA): {shares}", highlight=False)
    return flat


if __name__ == "__main__":
    raise SystemExit(main("subgroups"))
