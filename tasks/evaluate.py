"""External evaluation: score a trained model on labelled sets it never saw.

A test split comes from the same hospital, camera and annotators as the training data, so it
flatters the model. This stage scores the model on other sets (``evaluate.external`` in
params.yaml; ``dermaflow evaluate ROOT --model ...`` for one set by hand) and reports what the
test split gets: balanced accuracy with a bootstrap CI, per-class recall, AUROC, ECE before and
after the model's own calibrator, the share the referral rule sends to a dermatologist, and
melanoma-vs-rest sensitivity / specificity at the referral threshold, and, when the model
carries conformal sets (the conformal stage's ``models/conformal.json`` or the ONNX metadata),
their coverage and size on the set: the coverage guarantee holds only for data exchangeable with
the calibration split, so another hospital's images are where it is worth checking.

The set is read by the ingest adapters (:func:`tasks.ingest.build_manifest`, label map
included) and checked by the validation rules (:func:`tasks.validate.validate_manifest`)
before anything is scored, so a bad row is named exactly as ingest and validate name it. Its
images are decoded by the prepare stage's :func:`tasks.prepare.decode_one`, with the model's
own size, resize mode and colour constancy.

When the set has fewer classes than the model, the probabilities are restricted to the shared
classes and renormalised (the model's answer given that the case is one of them); the report
says which classes were left out. A set class the model does not know stops the evaluation
with a message naming it: map it (or drop it with ``null``) in the set's label map.

Metrics come from :mod:`tasks.metrics` and :mod:`tasks.calibrate`, the calibrator and
referral threshold from the calibrate stage (or the ONNX metadata); the bootstrap CI is
:func:`bootstrap_ci`, which the subgroup stage uses for every group too.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks import paths
from tasks.calibrate import (
    Calibrator,
    expected_calibration_error,
    plot_reliability,
    read_calibrator,
    reliability_bins,
)
from tasks.config import ExternalSetConfig, Params
from tasks.ingest import build_manifest, label_vocabulary
from tasks.io import atomic_dir, write_json
from tasks.metrics import classification_metrics, plot_confusion_matrix, save_figure, softmax
from tasks.prepare import class_names, decode_one
from tasks.skintone import ita_angle, ita_category
from tasks.stage import console, main

REPORTS = Path("reports") / "evaluate"
CLI_REPORTS = Path("reports") / "external"  # `dermaflow evaluate`: outside the stage's outs
TABLES = paths.DATA / "evaluate"  # per-image results, read by the subgroups stage
METRICS_FILE = paths.METRICS / "evaluate.json"
MELANOMA = "MEL"
_URI_SCHEMES = ("models:/", "runs:/")


class EvaluateError(ValueError):
    """An external set or model that cannot be evaluated (unknown class, bad option)."""


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass
class ScoringModel:
    """What evaluation needs of a model, whichever form it came in.

    Attributes:
        classes: class names in output order.
        input_size: square side in pixels.
        resize: ``center_crop`` | ``squash``, as prepare made the training images.
        color: ``prepare.color_constancy`` the model was trained with.
        mean, std: input normalisation.
        logits: normalised float32 NCHW batch -> raw logits (N, K).
        calibrator: the model's own calibrator (raw logits -> calibrated probabilities).
        referral_threshold: refer a case whose top calibrated probability is below it; None
            when the model carries none.
        source: the reference it was loaded from.
        run_id: the MLflow run that trained it, when known (the evaluation is logged there).
        conformal: its conformal set predictor (:class:`tasks.conformal.ConformalSets`), None
            when it carries none.
        set_probabilities: raw logits -> the probabilities the sets were fitted on (those of
            the ONNX graph: :func:`tasks.conformal.graph_probabilities`); set with ``conformal``.
        prior: the :class:`tasks.fusion.MetadataPrior` the model was trained with (its log-odds
            are added to the image logits of every row with age, sex or site), or None.
    """

    classes: list[str]
    input_size: int
    resize: str
    color: str
    mean: list[float]
    std: list[float]
    logits: Callable[[np.ndarray], np.ndarray]
    calibrator: Calibrator
    referral_threshold: float | None
    source: str
    run_id: str | None = None
    conformal: Any = None
    set_probabilities: Callable[[np.ndarray], np.ndarray] = softmax
    prior: Any = None


def _torch_logits(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def forward(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).float().numpy()

    return forward


def load_bundle_model(
    bundle: str | Path,
    calibration_dir: str | Path = paths.CALIBRATION,
    calibrate_metrics: str | Path = paths.METRICS / "calibrate.json",
    run_file: str | Path = paths.MODELS / "run.json",
    conformal_file: str | Path = paths.MODELS / "conformal.json",
) -> ScoringModel:
    """A PyTorch bundle with its calibrator, referral threshold and conformal sets.

    The calibrate stage's calibrator (``calibrator.json``, any method), threshold
    (``metrics/calibrate.json``) and the conformal stage's sets (``conformal_file``) are used
    only when ``run_file`` records this very bundle (same sha256), so a stray bundle is never
    judged with another training's calibration; otherwise the bundle's own temperature applies
    and there is no referral threshold and no sets.
    """
    from tasks.conformal import graph_probabilities, read_sets
    from tasks.fusion import prior_from_meta
    from tasks.io import lineage_problem
    from tasks.models import load_image_bundle, with_tta

    model, meta = load_image_bundle(bundle, "evaluate")
    extra = meta.get("extra") or {}
    tta = extra.get("tta")
    if tta and tta != "none":
        model = with_tta(model, tta).eval()
    calibrator = Calibrator("temperature", temperature=float(meta.get("temperature") or 1.0))
    threshold, run_id = None, None
    same = Path(run_file).is_file() and lineage_problem(run_file, bundle) is None
    if same:
        run_info = json.loads(Path(run_file).read_text())
        recorded = run_info.get("bundle_sha256")
        same = recorded is not None
        run_id = run_info.get("run_id") if same else None
    if same and (Path(calibration_dir) / "calibrator.json").is_file():
        calibrator = read_calibrator(calibration_dir)
    if same and Path(calibrate_metrics).is_file():
        threshold = json.loads(Path(calibrate_metrics).read_text()).get("referral_threshold")
    sets = read_sets(conformal_file) if same and Path(conformal_file).is_file() else None
    size = meta["input_size"]
    return ScoringModel(
        classes=[str(c) for c in meta["classes"]],
        input_size=int(size if isinstance(size, int) else size[0]),
        resize=str(extra.get("resize", "center_crop")),
        color=str(extra.get("color_constancy", "none")),
        mean=[float(m) for m in meta["normalization"]["mean"]],
        std=[float(s) for s in meta["normalization"]["std"]],
        logits=_torch_logits(model),
        calibrator=calibrator,
        referral_threshold=None if threshold is None else float(threshold),
        source=str(bundle),
        run_id=run_id,
        conformal=sets,
        set_probabilities=lambda logits: graph_probabilities(logits, calibrator),
        prior=prior_from_meta(extra),
    )


def load_onnx_model(ref: str, tracking_uri: str | None = None) -> ScoringModel:
    """An exported ONNX model (file, folder or ``models:/`` URI) through :mod:`tasks.predict`.

    The graph returns raw logits beside its calibrated probabilities; the calibrator is the
    temperature stored in its metadata (the same one the graph applies).
    """
    from tasks.fusion import prior_from_meta
    from tasks.predict import load_predictor

    predictor = load_predictor(ref, tracking_uri=tracking_uri)
    t = predictor.metadata.get("temperature", 1.0)
    calibrator = (
        Calibrator("temperature", temperature=float(t))
        if np.ndim(t) == 0
        else Calibrator(
            "vector", w=1.0 / np.asarray(t, dtype=np.float64), b=np.zeros(len(predictor.classes))
        )
    )
    return ScoringModel(
        classes=predictor.classes,
        input_size=predictor.input_size,
        resize=predictor.resize,
        color=str(predictor.metadata.get("color_constancy", "none")),
        mean=predictor.mean,
        std=predictor.std,
        logits=lambda batch: predictor.predict(batch)[0],
        calibrator=calibrator,
        referral_threshold=predictor.referral_threshold,
        source=ref,
        run_id=predictor.metadata.get("mlflow_run_id"),
        conformal=predictor.conformal,
        set_probabilities=calibrator.probabilities,  # the graph's own calibration
        prior=prior_from_meta(predictor.metadata),
    )


def load_scoring_model(
    ref: str | os.PathLike[str], tracking_uri: str | None = None
) -> ScoringModel:
    """``--model``: a bundle (``.pt``), an ONNX file or folder, or a ``models:/`` URI.

    Raises:
        FileNotFoundError: a local path that does not exist.
        tasks.predict.PredictError: an unreadable ONNX model or unknown registry reference.
        ValueError: an unreadable bundle.
    """
    text = str(ref)
    if text.startswith(_URI_SCHEMES):
        return load_onnx_model(text, tracking_uri)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model file not found")
    if path.is_file() and path.suffix in (".pt", ".pth"):
        try:
            return load_bundle_model(path)
        except ValueError as err:
            raise EvaluateError(f"{path}: cannot load the model bundle ({err})") from None
    return load_onnx_model(text)


# --------------------------------------------------------------------------------------------
# The set
# --------------------------------------------------------------------------------------------


def parse_label_map(text: str | None) -> dict[str, str | None]:
    """``--label-map "common_nevus=NV,atypical_nevus=NV,melanoma=MEL,other="`` -> a dict.

    An empty target (``other=``) drops that class's images, as ``null`` does in params.yaml.

    Raises:
        EvaluateError: an entry without ``=`` or with an empty source, naming it.
    """
    out: dict[str, str | None] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        source, sep, target = item.partition("=")
        if not sep or not source.strip():
            raise EvaluateError(
                f"--label-map entry {item.strip()!r}: expected SOURCE=TARGET (e.g. melanoma=MEL)"
            )
        out[source.strip()] = target.strip() or None
    return out


def read_external_set(
    root: str | Path,
    layout: str,
    label_map: Mapping[str, str | None],
    validate_cfg: Any,
    workers: int = 1,
    progress: bool = False,
) -> pd.DataFrame:
    """Ingest and validate an external set exactly as the pipeline does its own data.

    Raises:
        tasks.ingest.IngestError: unreadable layout or CSV (file, line and cause).
        tasks.validate.ValidationError: an error-severity rule broken (rule, rows, file).
    """
    # Imported here: great-expectations costs seconds, and the subgroups stage (which imports
    # this module for its tables) and a pipeline with no external set never validate a set.
    from tasks.validate import raise_for_errors, validate_manifest

    manifest = build_manifest(
        root,
        layout,
        workers=workers,
        progress=progress,
        label_map=dict(label_map),
        max_pixels=validate_cfg.max_pixels,
    )
    report = validate_manifest(manifest, root, validate_cfg, label_vocabulary(dict(label_map)))
    raise_for_errors(report)
    return manifest


def shared_classes(model_classes: Sequence[str], set_labels: Sequence[str]) -> list[str]:
    """The model's classes that the set holds, in the model's order.

    Raises:
        EvaluateError: a set class the model cannot predict (named, with its count).
    """
    counts = pd.Series(list(set_labels)).value_counts()
    unknown = [c for c in counts.index if c not in model_classes]
    if unknown:
        listed = ", ".join(f"{c} ({counts[c]} images)" for c in sorted(unknown))
        raise EvaluateError(
            f"the set has classes the model does not know: {listed}; the model predicts "
            f"{', '.join(model_classes)}. Map them in the set's label map (or map them to "
            "null to drop their images)"
        )
    return [c for c in model_classes if c in counts.index]


def score_set(
    model: ScoringModel,
    manifest: pd.DataFrame,
    root: str | Path,
    batch_size: int = 64,
) -> tuple[np.ndarray, list[float | None]]:
    """Raw logits (N, K) of every manifest row, and the ITA of the skin around each lesion.

    The logits are the model's answer: the image logits plus, for a model trained with a
    metadata prior, the log-odds of each row's age, sex and site (zero for a row with none).

    The skin tone is measured here, on the very pixels (and mask) the model sees, so the
    subgroup stage needs no second decode.
    """
    from tasks.export import normalize  # onnx + onnxruntime: only when a set is scored

    root = Path(root)
    logits: list[np.ndarray] = []
    angles: list[float | None] = []
    rows = list(zip(manifest["path"], manifest["mask_path"], strict=True))
    for start in range(0, len(rows), batch_size):
        images = []
        for path, mask in rows[start : start + batch_size]:
            mask_file = root / mask if isinstance(mask, str) and mask else None
            rgb, mask_px, has_mask = decode_one(
                root / path, mask_file, model.input_size, model.resize, model.color
            )
            images.append(rgb)
            angles.append(ita_angle(rgb, mask_px if has_mask else None))
        batch = normalize(np.stack(images), model.mean, model.std)
        logits.append(np.asarray(model.logits(batch), dtype=np.float64))
    out = np.concatenate(logits)
    if model.prior is not None:
        out += model.prior.log_odds(manifest)
    return out, angles


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def restrict(probs: np.ndarray, columns: Sequence[int]) -> np.ndarray:
    """Probabilities over a subset of classes, renormalised to sum to 1.

    For temperature and vector scaling this equals the softmax of the kept logits, i.e. the
    model's answer given that the case is one of the kept classes.
    """
    kept = np.asarray(probs, dtype=np.float64)[:, list(columns)]
    return kept / np.clip(kept.sum(axis=1, keepdims=True), 1e-300, None)


def _codes(labels: Sequence[Any], predicted: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, list]:
    names = sorted({*map(str, labels), *map(str, predicted)})
    index = {n: i for i, n in enumerate(names)}
    y = np.asarray([index[str(v)] for v in labels], dtype=np.int64)
    p = np.asarray([index[str(v)] for v in predicted], dtype=np.int64)
    return y, p, names


def resampled_balanced_accuracy(y: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    """Balanced accuracy of every row of (B, n) resampled class codes: (B,).

    The mean recall over the classes present in each resample, as sklearn's
    ``balanced_accuracy_score`` computes it (a test checks they agree), vectorised over the
    resamples.
    """
    recalls = []
    for c in range(k):
        support = (y == c).sum(axis=-1)
        hits = ((y == c) & (p == c)).sum(axis=-1)
        recalls.append(np.where(support > 0, hits / np.maximum(support, 1), np.nan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample of one absent class
        return np.nanmean(np.stack(recalls, axis=-1), axis=-1)


def _sensitivity(y: np.ndarray, p: np.ndarray, positive: int) -> np.ndarray:
    support = (y == positive).sum(axis=-1)
    hits = ((y == positive) & (p == positive)).sum(axis=-1)
    return np.where(support > 0, hits / np.maximum(support, 1), np.nan)


GROUP_METRICS = ("balanced_accuracy", "accuracy", "melanoma_sensitivity")


def resampled_metric(metric: str, y: np.ndarray, p: np.ndarray, names: list) -> np.ndarray:
    """One of :data:`GROUP_METRICS` on (..., n) class codes; NaN where undefined."""
    if metric == "balanced_accuracy":
        return resampled_balanced_accuracy(y, p, len(names))
    if metric == "accuracy":
        return (y == p).mean(axis=-1)
    if metric == "melanoma_sensitivity":
        if MELANOMA not in names:
            return np.full(y.shape[:-1], np.nan)
        return _sensitivity(y, p, names.index(MELANOMA))
    raise ValueError(f"unknown metric {metric!r}; expected one of {GROUP_METRICS}")


def bootstrap_ci(
    labels: Sequence[Any],
    predicted: Sequence[Any],
    resamples: int,
    confidence: float,
    seed: int,
    metric: str = "balanced_accuracy",
) -> list[float | None]:
    """Percentile bootstrap CI of one of :data:`GROUP_METRICS` over the images.

    Hand-written and vectorised: fairlearn's ``MetricFrame(n_boot=...)`` recomputes the whole
    frame per resample (45 s for 200 resamples of 300 images on a 2-core machine), and the
    subgroup stage needs a CI per group, per metric, per split. ``[None, None]`` when the
    metric is undefined (melanoma sensitivity without a melanoma).
    """
    y, p, names = _codes(labels, predicted)
    if y.size == 0:
        return [None, None]
    idx = np.random.default_rng(seed).integers(0, y.size, size=(resamples, y.size))
    values = resampled_metric(metric, y[idx], p[idx], names)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [None, None]
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return [float(low), float(high)]


def melanoma_at_referral(
    labels: Sequence[str], predicted: Sequence[str], referred: np.ndarray
) -> dict[str, float | None]:
    """Melanoma vs rest where a case counts as flagged when it is called MEL *or* referred.

    That is what the referral rule means for a patient: a melanoma is caught if the model
    names it or sends it to a dermatologist, and a benign lesion is spared only when neither
    happens. None where the set has no melanoma (sensitivity) or no other lesion (specificity).
    """
    y = np.asarray(labels) == MELANOMA
    flagged = (np.asarray(predicted) == MELANOMA) | np.asarray(referred, dtype=bool)
    sens = float(flagged[y].mean()) if y.any() else None
    spec = float((~flagged[~y]).mean()) if (~y).any() else None
    return {"sensitivity": sens, "specificity": spec}


@dataclass
class SetResult:
    """One evaluated set: the JSON record, per-image table and what the figures need."""

    record: dict[str, Any]
    table: pd.DataFrame
    probs_before: np.ndarray
    probs_after: np.ndarray
    label_index: np.ndarray
    classes: list[str]
    confusion: np.ndarray


def evaluate_set(
    model: ScoringModel,
    manifest: pd.DataFrame,
    logits: np.ndarray,
    angles: Sequence[float | None],
    bins: int,
    resamples: int,
    confidence: float,
    seed: int,
) -> SetResult:
    """Every metric of the external-evaluation record for one scored set.

    Args:
        model: the model (classes, calibrator, referral threshold).
        manifest: the set's validated manifest (one row per image, in ``logits`` order).
        logits: raw logits (N, K) over the model's classes.
        angles: ITA per image (None where too little skin shows).
        bins: equal-width bins of the ECE (``calibrate.bins``, as on test).
        resamples, confidence, seed: the bootstrap of the balanced-accuracy CI.
    """
    labels = [str(v) for v in manifest["label"]]
    set_classes = class_names(pd.Series(labels))
    shared = shared_classes(model.classes, labels)
    columns = [model.classes.index(c) for c in shared]
    full_before = softmax(logits)
    full_after = model.calibrator.probabilities(logits)
    before, after = restrict(full_before, columns), restrict(full_after, columns)
    y = np.asarray([shared.index(label) for label in labels], dtype=np.int64)
    scored = classification_metrics(np.log(np.clip(after, 1e-300, None)), y, shared)
    predicted_idx = after.argmax(axis=1)
    predicted = [shared[i] for i in predicted_idx]
    confidence_full = full_after.max(axis=1)
    threshold = model.referral_threshold
    referred = (
        confidence_full < threshold if threshold is not None else np.zeros(len(y), dtype=bool)
    )
    left_out = [c for c in model.classes if c not in shared]
    note = (
        f"all {len(shared)} model classes present"
        if not left_out
        else f"probabilities restricted to the {len(shared)} shared classes "
        f"({', '.join(shared)}) of the model's {len(model.classes)} and renormalised; "
        f"not in the set: {', '.join(left_out)}"
    )
    if threshold is None:
        note += "; the model carries no referral threshold, so nothing is referred"
    with_metadata = None
    if model.prior is not None:
        from tasks.fusion import has_metadata  # torch: only for a model with a prior

        with_metadata = int(has_metadata(manifest).sum())
    if with_metadata is not None:
        note += (
            f"; the metadata prior used age, sex or site for {with_metadata} of {len(y)} "
            "images (the others: the image alone)"
        )
    mel = (
        melanoma_at_referral(labels, predicted, referred)
        if MELANOMA in shared
        else {"sensitivity": None, "specificity": None}
    )
    record = {
        "n": len(y),
        "classes": set_classes,
        "model_classes": list(model.classes),
        "shared_classes": shared,
        "balanced_accuracy": scored["balanced_accuracy"],
        "balanced_accuracy_ci": bootstrap_ci(labels, predicted, resamples, confidence, seed),
        "confidence": confidence,
        "accuracy": scored["accuracy"],
        "macro_f1": scored["macro_f1"],
        "per_class_recall": {c: scored["per_class"][c]["recall"] for c in shared},
        "auroc": scored["auroc_macro"],
        "ece_before": expected_calibration_error(before, y, bins),
        "ece_after": expected_calibration_error(after, y, bins),
        "referral_threshold": threshold,
        "referred_share": float(referred.mean()),
        "melanoma": {**mel, "rule": "flagged = predicted MEL or referred"},
        "calibrator": model.calibrator.method,
        "metadata_prior_images": with_metadata,
        "model": model.source,
        "note": note,
    }
    member = None
    if model.conformal is not None:
        member = model.conformal.sets(model.set_probabilities(logits))
        full_y = np.asarray([model.classes.index(label) for label in labels], dtype=np.int64)
        record["conformal"] = conformal_record(model, member, full_y, full_after)
    else:
        record["conformal"] = None
    table = pd.DataFrame(
        {
            "image_id": manifest["image_id"].astype(str).to_numpy(),
            "label": labels,
            "predicted": predicted,
            "confidence": after.max(axis=1),
            "refer": referred,
            "sex": manifest["sex"].to_numpy(),
            "age": pd.to_numeric(manifest["age"], errors="coerce").to_numpy(),
            "site": manifest["site"].to_numpy(),
            "ita": [np.nan if a is None else float(a) for a in angles],
            "skin_tone": [ita_category(a) for a in angles],
        }
    )
    if member is not None:
        from tasks.conformal import set_labels

        table["prediction_set"] = set_labels(member, model.classes)
    for i, c in enumerate(shared):
        table[f"p_{c}"] = after[:, i]
    return SetResult(
        record, table, before, after, y, shared, np.asarray(scored["confusion_matrix"])
    )


def conformal_record(
    model: ScoringModel, member: np.ndarray, labels: np.ndarray, probs: np.ndarray
) -> dict[str, Any]:
    """Coverage and size of the model's conformal sets on the set (over all model classes).

    A set is built over every class the model knows, also on a set restricted to fewer: the
    question is whether the set the model would hand a clinician holds the true diagnosis.
    """
    from tasks.conformal import ambiguous, coverage_report

    report = coverage_report(member, labels, model.classes)
    sets = model.conformal
    return {
        "method": sets.method + (" (class-conditional)" if sets.class_conditional else ""),
        "target_coverage": float(sets.coverage),
        "coverage": report["coverage"],
        "coverage_per_class": report["coverage_per_class"],
        "mean_set_size": report["mean_set_size"],
        "singleton_rate": report["singleton_rate"],
        "ambiguous_rate": float(ambiguous(member, probs, model.classes).mean()),
    }


def flat_set_metrics(name: str, record: Mapping[str, Any]) -> dict[str, float]:
    """``<set>/<metric>`` floats for MLflow (undefined values left out)."""
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", name) + "/"
    flat: dict[str, Any] = {
        "n": record["n"],
        "balanced_accuracy": record["balanced_accuracy"],
        "balanced_accuracy_ci_low": record["balanced_accuracy_ci"][0],
        "balanced_accuracy_ci_high": record["balanced_accuracy_ci"][1],
        "auroc": record["auroc"],
        "ece_before": record["ece_before"],
        "ece_after": record["ece_after"],
        "referred_share": record["referred_share"],
        "melanoma_sensitivity": record["melanoma"]["sensitivity"],
        "melanoma_specificity": record["melanoma"]["specificity"],
    }
    sets = record.get("conformal") or {}
    if sets:
        flat |= {"set_coverage": sets["coverage"], "mean_set_size": sets["mean_set_size"]}
    for c, r in record["per_class_recall"].items():
        flat[f"recall_{re.sub(r'[^A-Za-z0-9_.-]', '_', c)}"] = r
    return {
        prefix + k: float(v) for k, v in flat.items() if v is not None and np.isfinite(float(v))
    }


def write_set_reports(result: SetResult, out_dir: Path, bins: int, name: str) -> None:
    """``confusion_matrix.png``, ``reliability.png`` and ``evaluate.json`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_figure(
        plot_confusion_matrix(result.confusion, result.classes, normalize=True),
        out_dir / "confusion_matrix.png",
    )
    save_figure(
        plot_reliability(
            reliability_bins(result.probs_before, result.label_index, bins),
            reliability_bins(result.probs_after, result.label_index, bins),
            title=f"Reliability ({name})",
        ),
        out_dir / "reliability.png",
    )
    write_json(out_dir / "evaluate.json", result.record)


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------


def evaluate_external(
    model: ScoringModel,
    ext: ExternalSetConfig,
    p: Params,
    progress: bool = False,
) -> SetResult:
    """Read, validate, score and measure one external set."""
    root = Path(ext.root)
    manifest = read_external_set(
        root, ext.layout, ext.label_map, p.validate, p.ingest.workers, progress
    )
    shared_classes(model.classes, [str(v) for v in manifest["label"]])  # fail before decoding
    logits, angles = score_set(model, manifest, root, p.evaluate.batch_size)
    e = p.evaluate
    return evaluate_set(
        model, manifest, logits, angles, p.calibrate.bins, e.bootstrap, e.confidence, e.seed
    )


def _evaluations(
    results: Mapping[str, SetResult], sources: Mapping[str, str]
) -> dict[str, tuple[pd.DataFrame, str, dict[str, float]]]:
    return {
        name: (r.table, sources[name], flat_set_metrics(name, r.record))
        for name, r in results.items()
    }


def run(p: Params) -> dict:
    """The ``evaluate`` stage: every set of ``evaluate.external`` against the trained bundle."""
    sets = p.evaluate.external
    names = [s.name for s in sets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvaluateError(f"evaluate.external: set name(s) {dupes} used twice")
    results: dict[str, SetResult] = {}
    model = load_bundle_model(paths.BUNDLE) if sets else None
    for ext in sets:
        results[ext.name] = evaluate_external(model, ext, p)
    with atomic_dir(REPORTS) as reports, atomic_dir(TABLES) as tables:
        for name, r in results.items():
            write_set_reports(r, reports / name, p.calibrate.bins, name)
            r.table.to_parquet(tables / f"{name}.parquet", index=False)
    write_json(METRICS_FILE, {"sets": {name: r.record for name, r in results.items()}})
    if results:
        from tasks import tracking

        run_info = json.loads(tracking.RUN_FILE.read_text())
        version = run_info.get("registered_model"), run_info.get("model_version")
        with tracking.resume_lineage_run():
            logged = tracking.log_evaluations(
                _evaluations(results, {s.name: str(s.root) for s in sets}),
                version=version if all(version) else None,
            )
        console.print(f"evaluate: {logged}", highlight=False)
    for name, r in results.items():
        _print(name, r.record)
    if not sets:
        console.print("evaluate: evaluate.external lists no sets; nothing to score")
    return {name: r.record["balanced_accuracy"] for name, r in results.items()}


def _print(name: str, rec: Mapping[str, Any]) -> None:
    lo, hi = rec["balanced_accuracy_ci"]
    sets = rec.get("conformal")
    coverage = (
        f", conformal coverage {sets['coverage']:.1%} (target {sets['target_coverage']:.0%}) "
        f"with {sets['mean_set_size']:.2f} classes a set"
        if sets
        else ""
    )
    console.print(
        f"evaluate {name}: {rec['n']} images, balanced accuracy {rec['balanced_accuracy']:.3f} "
        f"[{lo:.3f}, {hi:.3f}], ECE {rec['ece_before']:.3f} -> {rec['ece_after']:.3f}, "
        f"referred {rec['referred_share']:.0%}{coverage}; {rec['note']}",
        highlight=False,
    )


def run_cli(
    root: str | Path,
    model_ref: str,
    p: Params,
    name: str | None = None,
    layout: str = "auto",
    label_map: str | None = None,
    out: str | Path | None = None,
    log: bool = True,
) -> dict[str, Any]:
    """``dermaflow evaluate ROOT --model ...``: one set, reports under ``out``.

    Everything the user controls is checked before the first image is decoded: the root, the
    label map, the layout, the model, then the set's rows (ingest and validation rules).

    Raises:
        EvaluateError, FileNotFoundError, IngestError, ValidationError, PredictError: one line
        naming the culprit.
    """
    from tasks.config import LAYOUTS
    from tasks.io import check_output_dir

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: external set root does not exist or is not a folder")
    if layout not in LAYOUTS:
        raise EvaluateError(f"--layout {layout!r}: unknown layout; choose one of {LAYOUTS}")
    mapping = parse_label_map(label_map)
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", root.resolve().name).lstrip("._-") or "external"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise EvaluateError(
            f"--name {name!r}: use letters, digits, _ . - only (it names a folder and metrics)"
        )
    target = check_output_dir(out or CLI_REPORTS / name, "-o/--out folder")
    ext = ExternalSetConfig(name=name, root=str(root), layout=layout, label_map=mapping)
    uri = None
    if str(model_ref).startswith(_URI_SCHEMES):
        from tasks import tracking

        uri = tracking.configure()
    model = load_scoring_model(model_ref, tracking_uri=uri)
    result = evaluate_external(model, ext, p, progress=True)
    with atomic_dir(target) as tmp:
        write_set_reports(result, tmp, p.calibrate.bins, name)
        result.table.to_parquet(tmp / "predictions.parquet", index=False)
    logged = "not logged (--no-log)"
    if log:
        from tasks import tracking

        tracking.configure()
        logged = tracking.log_evaluations(
            _evaluations({name: result}, {name: str(root)}), run_id=model.run_id
        )
    _print(name, result.record)
    console.print(f"evaluate: reports in {target}; {logged}", highlight=False)
    return result.record


if __name__ == "__main__":
    raise SystemExit(main("evaluate"))
