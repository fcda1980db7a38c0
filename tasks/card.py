"""The model card: one page per registered version, written from the numbers the stages left.

The ``card`` stage reads what the stages before it wrote (data, split and validation reports,
the training metrics, calibration, export, explanation quality and, where those stages ran,
the external evaluation, subgroup, OOD and conformal reports), turns them into one context
dict (:func:`build_context`, pure) and renders it twice from Jinja templates:
``reports/card/model_card.md`` and ``reports/card/model_card.html``. Both are logged to the
lineage run as ``card/`` artifacts, and a short form (:func:`short_form`) becomes the
description of the registered model versions (PyTorch and ONNX), which the MLflow UI shows on
the registry page.

Every section renders from whichever files exist: a stage that has not run, or that a user
switched off, shows as "not run" with the file it would have written, never as an error or a
blank. The known limitations are not boilerplate: :func:`known_limitations` writes them from
the numbers against thresholds in ``params.yaml: card`` (an external set far below test, a
subgroup below its split, conformal coverage under target, an OOD guard that refuses ordinary
cases, ...).

The promotion decision is made after the stages, by the gate in ``flows/pipeline.py``: the
stage's card states the gate's criteria and says the decision is pending; the flow then calls
:func:`record_decision`, which re-renders the card with the verdict into the same MLflow
artifacts and descriptions. The local files stay as the stage wrote them, because they are a
DVC out and a change after the stage would make DVC run it again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from scipy.stats import binomtest, bootstrap

from tasks import paths
from tasks.config import CardConfig, GateConfig, Params, flatten
from tasks.io import atomic_dir
from tasks.stage import console, main

CARD_DIR = Path("reports") / "card"
CONTEXT_FILE = "card.json"  # the rendered context, re-read by record_decision after the gate
MARKDOWN, HTML = "model_card.md", "model_card.html"
TEMPLATES = Path(__file__).parent / "templates"
NOT_RUN = "not run"
UNKNOWN = "unknown"  # the subgroups stage's group of unmeasured values (tasks.skintone.UNKNOWN)
SHORT_LIMITATIONS = 3  # limitations quoted in the registry description; the card has all

# What the card reads. Required: a trained model. The rest renders as "not run" when absent.
INPUTS: dict[str, Path] = {
    "run": paths.MODELS / "run.json",
    "onnx": paths.ONNX_REGISTRATION,
    "ingest": paths.METRICS / "ingest.json",
    "split": paths.METRICS / "split.json",
    "validation": paths.VALIDATION_JSON,
    "train": paths.METRICS / "train.json",
    "calibrate": paths.METRICS / "calibrate.json",
    "export": paths.METRICS / "export.json",
    "explain": paths.EXPLAIN / "summary.json",
    "evaluate": paths.METRICS / "evaluate.json",
    "subgroups": paths.METRICS / "subgroups.json",
    "ood": paths.METRICS / "ood.json",
    "conformal": paths.METRICS / "conformal.json",
}
REQUIRED = ("run", "train")
# Which stage writes each input: the "not run" line names it.
WRITERS = {
    "onnx": "export",
    "ingest": "ingest",
    "split": "split",
    "validation": "validate",
    "calibrate": "calibrate",
    "export": "export",
    "explain": "explain",
    "evaluate": "evaluate",
    "subgroups": "subgroups",
    "ood": "ood",
    "conformal": "conformal",
}


class CardError(ValueError):
    """A file the card reads is not what its stage writes (not JSON, not an object, no test)."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_input(repo: str | Path, key: str) -> dict[str, Any] | None:
    """The input ``key`` of :data:`INPUTS` parsed, or None where its file does not exist.

    Raises:
        CardError: a file that exists but is not a JSON object, named.
    """
    rel = INPUTS[key]
    path = Path(repo) / rel
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CardError(f"{rel}: not valid JSON ({err}); re-run the stage that writes it") from None
    if not isinstance(data, dict):
        raise CardError(f"{rel}: a JSON {type(data).__name__}, not an object; re-run its stage")
    return data


def load_inputs(repo: str | Path = ".") -> dict[str, Any]:
    """Every input of :data:`INPUTS` parsed, or None where the file does not exist.

    Raises:
        FileNotFoundError: no ``models/run.json`` or ``metrics/train.json`` (nothing trained).
        CardError: a file that exists but is not a JSON object, named.
    """
    out = {key: read_input(repo, key) for key in INPUTS}
    for key in REQUIRED:
        if out[key] is None:
            raise FileNotFoundError(
                f"{INPUTS[key]}: not found; the card needs a trained model (dvc repro train)"
            )
    if not isinstance(out["train"].get("test"), dict):
        raise CardError(f"{INPUTS['train']}: has no 'test' metrics; re-run the train stage")
    return out


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, null, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _interval(value: Any) -> tuple[float, float] | None:
    """``[low, high]`` or ``{"low", "high"}`` as a pair of floats, else None."""
    if isinstance(value, Mapping):
        value = [value.get("low"), value.get("high")]
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        low, high = _number(value[0]), _number(value[1])
        if low is not None and high is not None:
            return low, high
    return None


def _not_run(key: str) -> dict[str, Any]:
    stage = WRITERS.get(key, key)
    return {
        "run": False,
        "why": f"{NOT_RUN}: no {INPUTS[key]} (the {stage} stage has not run or is switched off)",
    }


# --------------------------------------------------------------------------------------------
# Test metrics with confidence intervals
# --------------------------------------------------------------------------------------------


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray, axis: int = -1) -> np.ndarray:
    """Balanced accuracy over the classes present, vectorised over bootstrap resamples.

    Same value as :func:`sklearn.metrics.balanced_accuracy_score`, but it scores a whole
    ``(resamples, n)`` batch in one call: scipy's bootstrap calling sklearn once per resample
    is about a thousand times slower (seconds per card on a busy machine).
    """
    classes = np.unique(y)
    recalls = []
    for c in classes:
        true = y == c
        count = true.sum(axis=axis)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(count > 0, (true & (pred == c)).sum(axis=axis) / count, np.nan))
    return np.nanmean(np.stack(recalls), axis=0)


def _accuracy(y: np.ndarray, pred: np.ndarray, axis: int = -1) -> np.ndarray:
    return (y == pred).mean(axis=axis)


def test_intervals(
    logits: np.ndarray, labels: np.ndarray, classes: Sequence[str], cfg: CardConfig
) -> dict[str, Any]:
    """Balanced accuracy and accuracy with bootstrap CIs, per-class recall with Wilson CIs.

    The bootstrap is scipy's (percentile intervals, images resampled with their predictions);
    a class's recall is a binomial proportion, so its interval is the Wilson score interval of
    :func:`scipy.stats.binomtest`, which stays sensible for the few images of a rare class.

    Returns:
        ``n``, ``level``, ``metrics`` ({name: {value, low, high}}) and ``per_class``
        ({class: {support, recall, low, high}}; recall None for a class absent from test).
    """
    y = np.asarray(labels)
    pred = np.asarray(logits).argmax(axis=1)
    metrics: dict[str, dict[str, float]] = {}
    for name, statistic in (("balanced_accuracy", _balanced_accuracy), ("accuracy", _accuracy)):
        value = float(statistic(y, pred))
        if y.size > 1:
            result = bootstrap(
                (y, pred), statistic, paired=True, vectorized=True, n_resamples=cfg.bootstrap,
                confidence_level=cfg.confidence, method="percentile",
                random_state=np.random.default_rng(cfg.seed),
            )  # fmt: skip
            low, high = (float(v) for v in result.confidence_interval)
        else:
            low = high = value
        metrics[name] = {"value": value, "low": low, "high": high}
    per_class: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(classes):
        support = int((y == index).sum())
        hits = int(((y == index) & (pred == index)).sum())
        row: dict[str, Any] = {"support": support, "recall": None, "low": None, "high": None}
        if support:
            ci = binomtest(hits, support).proportion_ci(cfg.confidence, method="wilson")
            row.update(recall=hits / support, low=float(ci.low), high=float(ci.high))
        per_class[str(name)] = row
    return {"n": int(y.size), "level": cfg.confidence, "metrics": metrics, "per_class": per_class}


# --------------------------------------------------------------------------------------------
# Sections: each a dict with "run" (False: the template prints "why")
# --------------------------------------------------------------------------------------------


def data_section(
    inputs: Mapping[str, Any], dataset: str, root: str, data_version: str | None
) -> dict[str, Any]:
    """Dataset, data version, class counts per split, validation verdict, skin-tone mix."""
    ingest, split, validation = inputs.get("ingest"), inputs.get("split"), inputs.get("validation")
    per_split = (split or {}).get("per_class") or {}
    totals = (ingest or {}).get("per_class") or {}
    names = list(dict.fromkeys([*totals, *per_split]))
    counts = [
        {
            "class": name,
            "total": totals.get(name, sum((per_split.get(name) or {}).values())),
            **{s: (per_split.get(name) or {}).get(s) for s in ("train", "val", "test")},
        }
        for name in names
    ]
    tones = ((inputs.get("subgroups") or {}).get("train_skin_tone")) or None
    tone_rows = None
    if isinstance(tones, Mapping) and tones:
        total = sum(int(v) for v in tones.values() if _number(v) is not None) or 1
        tone_rows = [
            {"category": str(k), "count": int(v), "share": int(v) / total}
            for k, v in tones.items()
            if _number(v) is not None
        ]
    return {
        "run": True,
        "dataset": dataset,
        "root": root,
        "synthetic": Path(root) == paths.SYNTH_ROOT,
        "data_version": data_version or "unknown",
        "layout": (ingest or {}).get("layout"),
        "images": (ingest or {}).get("images"),
        "lesions": (ingest or {}).get("lesions"),
        "with_mask": (ingest or {}).get("with_mask"),
        "split_images": (split or {}).get("images") or {},
        "split_seed": (split or {}).get("seed"),
        "leakage": (split or {}).get("leakage") or {},
        "class_counts": counts,
        "validation": None
        if validation is None
        else {
            "passed": bool(validation.get("passed")),
            "warnings": len(validation.get("warnings") or []),
            "errors": len(validation.get("errors") or []),
        },
        "skin_tone": tone_rows,
        "skin_tone_why": None if tone_rows else _not_run("subgroups")["why"],
    }


def training_section(p: Params, train: Mapping[str, Any], calibrate: Mapping | None) -> dict:
    """The model and training params as trained, plus what training itself reported."""
    config = {
        **{f"model.{k}": v for k, v in flatten(dataclasses.asdict(p.model)).items()},
        **{f"train.{k}": v for k, v in flatten(dataclasses.asdict(p.train)).items()},
        "calibrate.method": p.calibrate.method,
    }
    reported = {
        "best epoch": train.get("best_epoch"),
        "device": train.get("device"),
        "training precision": train.get("precision"),
        "training seconds": train.get("seconds"),
        "class weights": train.get("class_weights"),
        "temperature": (calibrate or {}).get("temperature"),
    }
    rows = [
        {"key": k, "value": json.dumps(v) if isinstance(v, list | dict) else str(v)}
        for k, v in config.items()
    ]
    rows += [
        {"key": k, "value": json.dumps(v) if isinstance(v, dict) else str(v)}
        for k, v in reported.items()
        if v is not None
    ]
    return {"run": True, "rows": rows}


def test_section(train: Mapping[str, Any], intervals: Mapping[str, Any] | None) -> dict:
    """Test metrics: the intervals where computed, the train stage's numbers beside them."""
    test = train["test"]
    ci = (intervals or {}).get("metrics") or {}
    rows = []
    for name in ("balanced_accuracy", "accuracy", "macro_f1", "auroc_macro", "nll"):
        value = _number(test.get(name))
        bounds = ci.get(name) or {}
        rows.append(
            {"metric": name, "value": value, "low": bounds.get("low"), "high": bounds.get("high")}
        )
    per_class_ci = (intervals or {}).get("per_class") or {}
    per_class = []
    for name, row in (train.get("test_per_class") or {}).items():
        bounds = per_class_ci.get(name) or {}
        per_class.append(
            {
                "class": name,
                "support": row.get("support"),
                "recall": _number(row.get("recall")),
                "low": bounds.get("low"),
                "high": bounds.get("high"),
                "precision": _number(row.get("precision")),
                "auroc": _number(row.get("auroc")),
            }
        )
    return {
        "run": True,
        "n": test.get("n_samples"),
        "level": (intervals or {}).get("level"),
        "balanced_accuracy": _number(test.get("balanced_accuracy")),
        "image_only_balanced_accuracy": _number(
            (train.get("image_only") or {}).get("test_balanced_accuracy")
        ),
        "metrics": rows,
        "per_class": per_class,
    }


def external_section(
    evaluate: Mapping[str, Any] | None, test_ba: float | None, model_classes: Sequence[str]
) -> dict:
    """One row per external set, with its gap to the test split's balanced accuracy.

    ``restricted`` marks a set scored on fewer classes than the model has (its probabilities
    restricted to the shared ones), which the card says beside its numbers.
    """
    if evaluate is None:
        return _not_run("evaluate")
    rows = []
    for name, s in (evaluate.get("sets") or {}).items():
        ba = _number(s.get("balanced_accuracy"))
        melanoma = s.get("melanoma") or {}
        classes, shared = s.get("classes") or [], s.get("shared_classes") or []
        sets = s.get("conformal") or {}  # the model's conformal sets on this set, if any
        rows.append(
            {
                "name": str(name),
                "n": s.get("n"),
                "classes": list(classes),
                "shared_classes": list(shared),
                "restricted": bool(shared) and len(shared) < len(model_classes),
                "balanced_accuracy": ba,
                "ci": _interval(s.get("balanced_accuracy_ci")),
                "gap": None if ba is None or test_ba is None else test_ba - ba,
                "auroc": _number(s.get("auroc")),
                "ece_before": _number(s.get("ece_before")),
                "ece_after": _number(s.get("ece_after")),
                "referred_share": _number(s.get("referred_share")),
                "sensitivity": _number(melanoma.get("sensitivity")),
                "specificity": _number(melanoma.get("specificity")),
                "set_coverage": _number(sets.get("coverage")),
                "set_size": _number(sets.get("mean_set_size")),
                "per_class_recall": {
                    k: _number(v) for k, v in (s.get("per_class_recall") or {}).items()
                },
                "note": s.get("note") or "",
            }
        )
    return {
        "run": True,
        "sets": rows,
        "why": None if rows else "no external sets configured (evaluate.external is empty)",
    }


def subgroup_section(subgroups: Mapping[str, Any] | None) -> dict:
    """Per split: one row per (attribute, group), the largest gaps and the stage's flags.

    A group's ``gap`` is its balanced accuracy below the rest of its split: the stage's own
    ``rest`` value where it reports one, else the n-weighted mean of the attribute's other
    groups (an approximation: balanced accuracy does not average over groups exactly).
    """
    if subgroups is None:
        return _not_run("subgroups")
    splits = []
    for split, report in (subgroups.get("splits") or {}).items():
        rows = []
        for attribute, groups in (report.get("groups") or {}).items():
            for group, g in (groups or {}).items():
                rows.append(
                    {
                        "attribute": str(attribute),
                        "group": str(group),
                        "n": int(g.get("n") or 0),
                        "balanced_accuracy": _number(g.get("balanced_accuracy")),
                        "ci": _interval(g.get("ci")),
                        "rest": _number((g.get("rest") or {}).get("balanced_accuracy")),
                    }
                )
        for row in rows:
            reference = row.pop("rest")
            if reference is None:
                others = [
                    r
                    for r in rows
                    if r["attribute"] == row["attribute"]
                    and r is not row
                    and r["balanced_accuracy"] is not None
                ]
                weight = sum(r["n"] for r in others)
                if weight:
                    reference = sum(r["balanced_accuracy"] * r["n"] for r in others) / weight
            value = row["balanced_accuracy"]
            row["reference"] = reference
            row["gap"] = None if value is None or reference is None else reference - value
        gaps = [
            {
                "metric": str(metric),
                "attribute": str((g or {}).get("attribute")),
                "gap": _number((g or {}).get("gap")),
            }
            for metric, g in (report.get("largest_gap") or {}).items()
        ]
        splits.append(
            {
                "split": str(split),
                "rows": rows,
                "gaps": gaps,
                "flags": [str(f) for f in report.get("flags") or []],
            }
        )
    return {"run": True, "splits": splits, "why": None if splits else "no split was analysed"}


def calibration_section(calibrate: Mapping[str, Any] | None, target_accuracy: float) -> dict:
    """ECE before and after calibration, and the referral rule it sets."""
    if calibrate is None:
        return _not_run("calibrate")
    get = lambda key: _number(calibrate.get(key))  # noqa: E731
    reachable = calibrate.get("referral_reachable")
    return {
        "run": True,
        "ece_before": get("test_ece_before"),
        "ece_after": get("test_ece_after"),
        "nll_before": get("test_nll_before"),
        "nll_after": get("test_nll_after"),
        "temperature": get("temperature"),
        "threshold": get("referral_threshold"),
        "reachable": None if reachable is None else bool(reachable),
        "coverage": get("referral_coverage"),
        "referred": get("referral_referred_fraction"),
        "kept_accuracy": get("referral_accuracy"),
        "target_accuracy": target_accuracy,
    }


def conformal_section(conformal: Mapping[str, Any] | None) -> dict:
    if conformal is None:
        return _not_run("conformal")
    return {
        "run": True,
        "method": conformal.get("method"),
        "target": _number(conformal.get("target_coverage")),
        "coverage": _number(conformal.get("coverage")),
        "per_class": [
            {"class": str(k), "coverage": _number(v)}
            for k, v in (conformal.get("coverage_per_class") or {}).items()
        ],
        "mean_set_size": _number(conformal.get("mean_set_size")),
        "qhat": _number(conformal.get("qhat")),
    }


def ood_section(ood: Mapping[str, Any] | None) -> dict:
    if ood is None:
        return _not_run("ood")
    return {
        "run": True,
        "method": ood.get("method"),
        "threshold": _number(ood.get("threshold")),
        "target_pass_rate": _number(ood.get("target_pass_rate")),
        "test_pass_rate": _number(ood.get("test_pass_rate")),
        "auroc": [
            {"set": str(k), "auroc": _number(v)}
            for k, v in (ood.get("detection_auroc") or {}).items()
        ],
    }


def explanation_section(summary: Mapping[str, Any] | None, top: int = 5) -> dict:
    """The explain stage's method ranking and its attention-outside-the-lesion findings."""
    if summary is None:
        return _not_run("explain")
    ranking = []
    for row in (summary.get("ranking") or [])[:top]:
        layer = row.get("layer")
        ranking.append(
            {
                "rank": row.get("rank"),
                "method": str(row.get("method")),
                "layer": layer if isinstance(layer, str) and layer else "input",
                "pointing_game": _number(row.get("pointing_game_mean")),
                "deletion_auc": _number(row.get("deletion_auc_mean")),
                "insertion_auc": _number(row.get("insertion_auc_mean")),
            }
        )
    inside = [
        {"class": str(k), "share": _number(v)}
        for k, v in (summary.get("inside_share_by_class") or {}).items()
    ]
    return {
        "run": True,
        "images": summary.get("images"),
        "ranking": ranking,
        "inside_share": inside,
        "outside_flag_rate": _number(summary.get("outside_flag_rate")),
        "sanity_ssim": _number((summary.get("sanity") or {}).get("ssim_final")),
    }


def pending_decision(gate: GateConfig) -> dict[str, Any]:
    """The decision before the gate has run: its criteria, in words."""
    return {
        "status": "pending",
        "reason": "decided by the promotion gate after the stages (dermaflow run)",
        "criteria": (
            f"The gate re-scores the current {gate.champion_alias} on this test split and "
            f"promotes this version only when its balanced-accuracy gain exceeds "
            f"{gate.min_gain:+.3f} with p < {1 - gate.confidence:.2g} (paired bootstrap, "
            f"{gate.bootstrap} resamples) and its calibrated ECE rises by at most "
            f"{gate.max_ece_increase:.3f}; the first model becomes {gate.champion_alias}."
        ),
        "champion_version": None,
    }


def with_decision(context: Mapping[str, Any], gate: Mapping[str, Any]) -> dict[str, Any]:
    """The context with the gate's verdict (``flows.pipeline.promotion_gate``'s dict) in."""
    decision = {
        **context["decision"],
        "status": "promoted" if gate.get("promote") else "refused",
        "reason": str(gate.get("reason", "")),
        "champion_version": gate.get("champion_version"),
    }
    return {**context, "decision": decision}


# --------------------------------------------------------------------------------------------
# Known limitations, from the numbers
# --------------------------------------------------------------------------------------------


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def known_limitations(context: Mapping[str, Any], cfg: CardConfig) -> list[str]:
    """The card's limitations, each a sentence written from one number against a threshold.

    A missing analysis is a limitation too (what it would measure is unknown), and says so.
    The order is the card's: data, test, external, subgroups, calibration and referral,
    conformal sets, OOD, explanations.
    """
    out: list[str] = []
    data, test = context["data"], context["test"]
    if data.get("synthetic"):
        out.append(
            "Trained and tested on the embedded synthetic set only: the numbers say nothing "
            "about real lesions."
        )
    ba = test.get("balanced_accuracy")
    bounds = next((r for r in test["metrics"] if r["metric"] == "balanced_accuracy"), {})
    if bounds.get("low") is not None and bounds["high"] - bounds["low"] > 2 * cfg.external_gap:
        out.append(
            f"The test split has only {test.get('n')} images: the balanced accuracy "
            f"{_f(ba)} has a {test['level']:.0%} CI of [{_f(bounds['low'])}, {_f(bounds['high'])}]."
        )
    image_only = test.get("image_only_balanced_accuracy")
    if image_only is not None:
        out.append(
            f"The test numbers include the metadata prior: with each case's age, sex and site "
            f"the balanced accuracy is {_f(ba)}, from the image alone {_f(image_only)}. A case "
            "scored without metadata gets the image alone."
        )
    for row in test["per_class"]:
        if row["recall"] is not None and row["recall"] < cfg.min_recall:
            ci = f", CI [{_f(row['low'])}, {_f(row['high'])}]" if row["low"] is not None else ""
            out.append(
                f"Test recall for {row['class']} is {_f(row['recall'])} (n={row['support']}{ci}), "
                f"below {cfg.min_recall:.2f}."
            )
    external = context["external"]
    if not external["run"] or not external["sets"]:
        out.append(
            "No external evaluation: performance on another clinic's or device's images is unknown."
        )
    else:
        for s in external["sets"]:
            if s["gap"] is not None and s["gap"] > cfg.external_gap:
                shared = " (scored on its shared classes only)" if s["restricted"] else ""
                out.append(
                    f"Balanced accuracy on {s['name']} is {s['gap']:.3f} below test "
                    f"({_f(s['balanced_accuracy'])} vs {_f(ba)}, n={s['n']}){shared}."
                )
    subgroups = context["subgroups"]
    if not subgroups["run"]:
        out.append(
            "No subgroup analysis: performance by sex, age, anatomical site and skin tone is "
            "unknown."
        )
    else:
        for split in subgroups["splits"]:
            for row in split["rows"]:
                if (
                    row["group"] != UNKNOWN  # not measured (e.g. no skin visible): no group
                    and row["n"] >= cfg.min_group_n
                    and row["gap"] is not None
                    and row["gap"] > cfg.subgroup_gap
                ):
                    out.append(
                        f"On {split['split']}, {row['attribute']} = {row['group']} falls "
                        f"{row['gap']:.3f} below the rest (balanced accuracy "
                        f"{_f(row['balanced_accuracy'])} vs {_f(row['reference'])}, n={row['n']})."
                    )
    tones = data.get("skin_tone") or []
    rare = [t for t in tones if t["share"] < cfg.min_tone_share and t["category"] != UNKNOWN]
    if rare:
        listed = ", ".join(f"{t['category']} {t['share']:.1%} (n={t['count']})" for t in rare)
        out.append(
            f"Skin tones barely present in the training data: {listed}; results on them rest "
            "on very few images."
        )
    calibration = context["calibration"]
    if calibration["run"]:
        if calibration["ece_after"] is not None and calibration["ece_after"] > cfg.max_ece:
            out.append(
                f"Calibrated test ECE is {_f(calibration['ece_after'])} (above {cfg.max_ece:.3f}): "
                "stated confidences are off by that much on average."
            )
        referred = calibration["referred"]
        if referred is not None and referred > cfg.max_referred:
            out.append(
                f"To reach {calibration['target_accuracy']:.0%} accuracy the referral rule sends "
                f"{referred:.1%} of test cases to a dermatologist."
            )
        if calibration["reachable"] is False:
            out.append(
                f"No confidence threshold reaches {calibration['target_accuracy']:.0%} accuracy "
                "on validation: referral cannot deliver the target accuracy."
            )
    conformal = context["conformal"]
    if not conformal["run"]:
        out.append("No conformal prediction sets: predictions carry no coverage guarantee.")
    else:
        target = conformal["target"]
        if target is not None:
            floor = target - cfg.coverage_tolerance
            if conformal["coverage"] is not None and conformal["coverage"] < floor:
                out.append(
                    f"Conformal coverage on test is {_f(conformal['coverage'])}, below the "
                    f"{target:.2f} target."
                )
            low = [
                r
                for r in conformal["per_class"]
                if r["coverage"] is not None and r["coverage"] < floor
            ]
            if low:
                listed = ", ".join(f"{r['class']} ({_f(r['coverage'])})" for r in low)
                out.append(f"Conformal coverage below the {target:.2f} target for class {listed}.")
            for s in external["sets"] if external["run"] else []:
                if s["set_coverage"] is not None and s["set_coverage"] < floor:
                    out.append(
                        f"On {s['name']} the conformal sets hold the true class for only "
                        f"{s['set_coverage']:.1%} of cases (target {target:.0%}): the coverage "
                        "guarantee does not carry over to these images."
                    )
    ood = context["ood"]
    if not ood["run"]:
        out.append(
            "No out-of-distribution guard: photos that are not dermoscopy, or not skin, get "
            "answers as confident as lesions do."
        )
    else:
        rate, target = ood["test_pass_rate"], ood["target_pass_rate"]
        if rate is not None and target is not None and rate < target - cfg.coverage_tolerance:
            out.append(
                f"The OOD guard passes only {rate:.1%} of test (target {target:.0%}): it refers "
                f"{1 - rate:.1%} of ordinary in-distribution cases."
            )
        for row in ood["auroc"]:
            if row["auroc"] is not None and row["auroc"] < cfg.min_ood_auroc:
                out.append(
                    f"The OOD guard tells {row['set']} from the training images poorly "
                    f"(detection AUROC {_f(row['auroc'])})."
                )
    explanations = context["explanations"]
    if explanations["run"]:
        rate = explanations["outside_flag_rate"]
        if rate is not None and rate > cfg.max_outside_share:
            out.append(
                f"{rate:.0%} of the explanation maps lie mostly outside the lesion: the model "
                "may use shortcuts (markers, rulers, borders) rather than the lesion."
            )
        for row in explanations["inside_share"]:
            if row["share"] is not None and row["share"] < 0.5:
                out.append(
                    f"For {row['class']}, only {row['share']:.0%} of the attention falls inside "
                    "the lesion: a possible shortcut."
                )
    return out


# --------------------------------------------------------------------------------------------
# The context, the short form and rendering
# --------------------------------------------------------------------------------------------


def build_context(
    inputs: Mapping[str, Any],
    p: Params,
    intervals: Mapping[str, Any] | None,
    facts: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything the templates show, from the inputs (:func:`load_inputs`) and the params.

    Args:
        inputs: the parsed files, None where absent.
        p: the params (dataset, model, train, calibrate, gate and card sections).
        intervals: :func:`test_intervals` of the test predictions, or None.
        facts: what only the MLflow run knows: ``data_version``, ``git_commit``, ``run_url``,
            ``registry_url`` (each optional).
    """
    run, train, onnx = inputs["run"], inputs["train"], inputs.get("onnx") or {}
    test = test_section(train, intervals)
    classes = [row["class"] for row in test["per_class"]]
    external = external_section(inputs.get("evaluate"), test["balanced_accuracy"], classes)
    export = inputs.get("export")
    context: dict[str, Any] = {
        "model": {
            "name": run.get("registered_model"),
            "version": run.get("model_version"),
            "onnx_name": onnx.get("registered_model"),
            "onnx_version": onnx.get("version"),
            "alias": onnx.get("alias"),
            "arch": p.model.arch,
            "classes": classes,
            "run_id": run.get("run_id"),
            "experiment": run.get("experiment"),
            "run_url": facts.get("run_url"),
            "registry_url": facts.get("registry_url"),
            "git_commit": facts.get("git_commit") or "unknown",
            "provider": (export or {}).get("provider"),
            "parity": _number((export or {}).get("parity_max_abs_diff")),
            "created": facts.get("created") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "use": {"intended": p.card.intended_use, "out_of_scope": list(p.card.out_of_scope)},
        "data": data_section(inputs, p.dataset.name, p.dataset.root, facts.get("data_version")),
        "training": training_section(p, train, inputs.get("calibrate")),
        "test": test,
        "external": external,
        "subgroups": subgroup_section(inputs.get("subgroups")),
        "calibration": calibration_section(inputs.get("calibrate"), p.calibrate.target_accuracy),
        "conformal": conformal_section(inputs.get("conformal")),
        "ood": ood_section(inputs.get("ood")),
        "explanations": explanation_section(inputs.get("explain")),
        "decision": pending_decision(p.gate),
    }
    context["limitations"] = known_limitations(context, p.card)
    sections = ("external", "subgroups", "calibration", "conformal", "ood", "explanations")
    context["not_run"] = [name for name in sections if not context[name]["run"]]
    return context


def short_form(context: Mapping[str, Any]) -> str:
    """The registry description: a few Markdown lines (the MLflow UI renders Markdown)."""
    data, test, model = context["data"], context["test"], context["model"]
    bounds = next((r for r in test["metrics"] if r["metric"] == "balanced_accuracy"), {})
    ci = (
        f" ({test['level']:.0%} CI {_f(bounds['low'])}-{_f(bounds['high'])})"
        if bounds.get("low") is not None
        else ""
    )
    calibration = context["calibration"]
    ece = f", calibrated ECE {_f(calibration['ece_after'])}" if calibration["run"] else ""
    external = context["external"]
    if external["run"] and external["sets"]:
        ext = "; ".join(
            f"{s['name']} {_f(s['balanced_accuracy'])} (n={s['n']})" for s in external["sets"]
        )
    else:
        ext = NOT_RUN
    ood = context["ood"]
    if ood["run"]:
        aurocs = ", ".join(f"{r['set']} {_f(r['auroc'])}" for r in ood["auroc"]) or "-"
        rate = ood["test_pass_rate"]
        ood_text = (
            f"passes {'-' if rate is None else f'{rate:.1%}'} of test; detection AUROC {aurocs}"
        )
    else:
        ood_text = NOT_RUN
    conformal = context["conformal"]
    if conformal["run"]:
        conf = (
            f"coverage {_f(conformal['coverage'])} (target {_f(conformal['target'])}), "
            f"mean set size {_f(conformal['mean_set_size'])}"
        )
    else:
        conf = NOT_RUN
    decision = context["decision"]
    limits = context["limitations"]
    more = (
        f" (+{len(limits) - SHORT_LIMITATIONS} more in the card)"
        if len(limits) > SHORT_LIMITATIONS
        else ""
    )
    lines = [
        f"**Model card (short form)**: {model['arch']} on {data['dataset']}, data version "
        f"`{data['data_version']}`, classes {', '.join(model['classes'])}.",
        f"- Test balanced accuracy {_f(test['balanced_accuracy'])}{ci}, n={test['n']}{ece}",
        f"- External: {ext}",
        f"- OOD guard: {ood_text}",
        f"- Conformal sets: {conf}",
        f"- Promotion: {decision['status']}: {decision['reason']}",
        f"- Key limitations: {' '.join(limits[:SHORT_LIMITATIONS]) or 'none found'}{more}",
        f"Full card: artifacts `card/{HTML}` and `card/{MARKDOWN}` of run `{model['run_id']}`.",
    ]
    return "\n".join(lines)


def _num(value: Any, digits: int = 3) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.{digits}f}"


def _pct(value: Any) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.1%}"


def _ci(low: Any, high: Any = None) -> str:
    pair = _interval(low) if high is None else _interval([low, high])
    return "-" if pair is None else f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def _cell(value: Any) -> str:
    """A Markdown table cell: a pipe or a line break would end the cell or the row."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(template: str, context: Mapping[str, Any]) -> str:
    """One of the card's templates; HTML autoescaped, Markdown verbatim (cells via ``cell``)."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html.j2"], default_for_string=False, default=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(num=_num, pct=_pct, ci=_ci, cell=_cell)
    return env.get_template(template).render(card=context, not_run=NOT_RUN)


def write_card(context: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``model_card.md``, ``model_card.html`` and the context (``card.json``) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": out / MARKDOWN, "html": out / HTML, "context": out / CONTEXT_FILE}
    files["md"].write_text(render(f"{MARKDOWN}.j2", context))
    files["html"].write_text(render(f"{HTML}.j2", context))
    files["context"].write_text(json.dumps(context, indent=2) + "\n")
    return files


def _describe(context: Mapping[str, Any]) -> list[str]:
    """Set the short form on the PyTorch and ONNX versions; returns ``name vN`` of each."""
    from tasks import tracking

    text = short_form(context)
    model = context["model"]
    done = []
    for name, version in (
        (model["name"], model["version"]),
        (model["onnx_name"], model["onnx_version"]),
    ):
        if name and version:
            tracking.describe_version(name, str(version), text)
            done.append(f"{name} v{version}")
    return done


def run(p: Params) -> dict:
    """The ``card`` stage: render the card, log it to the lineage run, describe the versions."""
    from tasks import tracking
    from tasks.metrics import load_predictions

    inputs = load_inputs()
    predictions = paths.PREDICTIONS / "test.npz"
    intervals = None
    if predictions.is_file():
        test = load_predictions(predictions)
        intervals = test_intervals(test["logits"], test["labels"], test["classes"], p.card)
    info = inputs["run"]
    tracking.configure()
    tags = tracking.run_tags(info["run_id"])
    name, version = info.get("registered_model"), info.get("model_version")
    facts = {
        "data_version": tags.get("data_version"),
        "git_commit": tags.get("git_commit"),
        "run_url": tracking.ui_url(info["experiment_id"], info["run_id"]),
        "registry_url": tracking.version_url(name, version) if name and version else None,
    }
    context = build_context(inputs, p, intervals, facts)
    with atomic_dir(CARD_DIR) as tmp:
        write_card(context, tmp)
    with tracking.resume_lineage_run():
        tracking.log_artifacts({"card": CARD_DIR})
    described = _describe(context)
    console.print(
        f"card: {CARD_DIR / HTML} and {CARD_DIR / MARKDOWN}; {len(context['limitations'])} "
        f"limitation(s); not run: {', '.join(context['not_run']) or 'none'}; description set on "
        f"{', '.join(described) or 'no registered version'}"
    )
    return {
        "card": str(CARD_DIR / HTML),
        "limitations": len(context["limitations"]),
        "described": described,
    }


def record_decision(repo: str | Path, gate: Mapping[str, Any]) -> dict[str, Any] | None:
    """After the gate: the card with its verdict, into the run's artifacts and the registry.

    The local ``reports/card`` files stay as the stage wrote them (a DVC out); the verdict
    goes to the ``card/`` artifacts of the lineage run (replacing the stage's copies) and to
    the versions' descriptions. Returns where the card is, or None when no card was made
    (the stage is not in this pipeline).
    """
    from tasks import tracking

    root = Path(repo)
    stored = root / CARD_DIR / CONTEXT_FILE
    if not stored.is_file():
        return None
    context = with_decision(json.loads(stored.read_text()), gate)
    tracking.configure(repo)
    with tempfile.TemporaryDirectory(prefix="card.") as tmp:
        write_card(context, tmp)
        with tracking.resume_lineage_run(repo):
            tracking.log_artifacts({"card": Path(tmp)})
        described = _describe(context)
    model = context["model"]
    return {
        "card": str(CARD_DIR / HTML),
        "artifact": f"card/{HTML}",
        "run_id": model["run_id"],
        "registry_url": model["registry_url"],
        "described": described,
        "decision": context["decision"]["status"],
    }


if __name__ == "__main__":
    raise SystemExit(main("card"))
