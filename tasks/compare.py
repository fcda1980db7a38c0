"""Compare: several models on one split, side by side, in one report.

``dermaflow compare`` (:mod:`flows.compare`) trains or loads a handful of models on the same
prepared split and asks the questions a single pipeline run cannot answer: which architecture
is better on the test split, which is better calibrated before and after temperature scaling,
whose explanations are more faithful and better localised, and whether different explanation
methods (within a model) and different models (for one method) point at the same pixels. When
two variants differ only by ``model.metadata``, the report shows the metadata ablation.

Everything here is a pure function of configs, arrays, models it does not modify and tables,
so the flow's tasks stay thin and the tests can check each piece without training:

- variant resolution (:func:`resolve_variants`, :func:`variant_params`) and the same-split
  guard (:func:`check_same_data`);
- the explanation sample (:func:`pick_images`); heatmaps and their quality come from the
  explanation engine (:func:`tasks.engine.explain`), summarised per method
  (:func:`summarize_quality`), and their agreement (:func:`agreement_within`,
  :func:`agreement_across`);
- the ablation pairing (:func:`ablation_pairs`, :func:`ablation_table`);
- figures and the markdown / HTML report (:func:`write_report`).

Explained class: the TRUE class of each image, for every model. Agreement across models is only
meaningful when every model answers the same question; with the predicted class, two models
that disagree on the label would be compared on maps for different classes.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import balanced_accuracy_score

from tasks import xai_metrics as xm
from tasks.cams import method_layers
from tasks.config import ConfigError, Params, flatten, load_params
from tasks.gate import mcnemar_p_value, paired_bootstrap
from tasks.io import write_json, write_text
from tasks.metrics import DPI, save_figure
from tasks.models import ARCHITECTURES, arch_spec

# Sections that define the images and the split: every model of a comparison must share them.
DATA_SECTIONS: tuple[str, ...] = ("dataset", "synth", "ingest", "validate", "split", "prepare")
HEADLINE: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro")
CALIBRATION: tuple[str, ...] = ("ece", "nll", "brier")
QUALITY: tuple[str, ...] = (
    "deletion_auc",
    "insertion_auc",
    "pointing_game",
    "energy_pointing_game",
)
#: What the engine scores for the comparison (tasks.engine.SCORES names).
SCORES: tuple[str, ...] = ("deletion_insertion", "localisation")
AGREEMENT: tuple[str, ...] = ("ssim", "pearson", "cosine", "topk_jaccard")
GALLERY_IMAGES = 4  # images in the model x method gallery (2-4 keep it readable)
MODEL_URI = "models:/"


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One model of the comparison: trained from overrides, or loaded from ``source``.

    Attributes:
        name: the model's name in the report and its MLflow child run.
        overrides: ``key=value`` params applied after the base params (trained variants).
        source: a bundle path or ``models:/`` URI to load instead of training; None trains.
    """

    name: str
    overrides: tuple[str, ...] = ()
    source: str | None = None
    group: str | None = None  # the variant this is one seed of (compare.seeds), else None

    @property
    def trained(self) -> bool:
        return self.source is None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for Prefect task inputs, MLflow params and summary.json."""
        return {
            "name": self.name,
            "overrides": list(self.overrides),
            "source": self.source,
            "group": self.group or self.name,
        }


def _uri_name(uri: str) -> str:
    """``models:/m@champion`` -> ``m@champion``; ``models:/m/3`` -> ``m-v3``."""
    name, at, alias = uri.removeprefix(MODEL_URI).partition("@")
    if at:
        return f"{name}@{alias}"
    base, _, version = name.rpartition("/")
    return f"{base}-v{version}" if base else name


def resolve_variants(
    entries: Sequence[str] | None,
    variants: Mapping[str, Sequence[str]],
    base_dir: str | Path = ".",
) -> list[Variant]:
    """Turn ``--models`` entries into variants, before anything is trained.

    An entry is, in this order: a name from ``compare.variants`` (its overrides), an
    architecture of :data:`tasks.models.ARCHITECTURES` (``model.arch=<name>``), a
    ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` URI, or an existing bundle file
    (relative to ``base_dir``); the last two are loaded, not trained. Without entries, every
    configured variant is compared.

    Raises:
        ConfigError: an entry that is none of these (the message lists the choices), an entry
            given twice, or nothing to compare.
    """
    items = [e.strip() for e in entries or [] if e.strip()] or list(variants)
    if not items:
        raise ConfigError("compare: compare.variants is empty and no --models were given")
    out: list[Variant] = []
    seen: set[str] = set()
    for entry in items:
        if entry in seen:
            raise ConfigError(f"compare: {entry!r} is listed twice")
        seen.add(entry)
        if entry in variants:
            variant = Variant(entry, tuple(variants[entry]))
        elif entry in ARCHITECTURES:
            variant = Variant(entry, (f"model.arch={entry}",))
        elif entry.startswith(MODEL_URI):
            variant = Variant(_uri_name(entry), (), entry)
        elif (Path(base_dir) / entry).is_file():
            path = (Path(base_dir) / entry).resolve()
            variant = Variant(path.stem, (), str(path))
        else:
            raise ConfigError(
                f"compare: unknown model {entry!r}. Choose a variant of compare.variants "
                f"({', '.join(variants) or 'none configured'}), an architecture "
                f"({', '.join(ARCHITECTURES)}), a model bundle file, or "
                "models:/<name>@<alias> | models:/<name>/<version>"
            )
        out.append(variant)
    return _unique_names(out)


def _unique_names(variants: list[Variant]) -> list[Variant]:
    """Two loaded bundles both called ``model.pt`` become ``model`` and ``model-2``."""
    taken: dict[str, int] = {}
    out = []
    for v in variants:
        count = taken.get(v.name, 0) + 1
        taken[v.name] = count
        out.append(v if count == 1 else dataclasses.replace(v, name=f"{v.name}-{count}"))
    return out


def with_seeds(variants: Sequence[Variant], seeds: Sequence[int]) -> list[Variant]:
    """Each trained variant once per seed of ``compare.seeds``: ``<name>-s<seed>``.

    From scratch on a few thousand images, the test balanced accuracy of one recipe moves by a
    few points from seed to seed (initialisation, batch order, augmentation draws): as much as
    many ingredients change it. Repeats turn one draw per variant into a mean and a spread
    (:func:`seed_summary`). ``train.seed=<seed>`` comes last, so it wins over the variant's
    own. A loaded bundle has its weights already and appears once.
    """
    if not seeds:
        return list(variants)
    out: list[Variant] = []
    for v in variants:
        if not v.trained:
            out.append(v)
            continue
        out += [
            Variant(f"{v.name}-s{s}", (*v.overrides, f"train.seed={s}"), None, v.name)
            for s in seeds
        ]
    return _unique_names(out)


SEED_METRICS: tuple[str, ...] = ("balanced_accuracy", "auroc_macro", "ece_after", "train_minutes")


def seed_summary(
    table: pd.DataFrame,
    groups: Sequence[str],
    probabilities: Mapping[str, np.ndarray] | None = None,
    labels: np.ndarray | None = None,
) -> pd.DataFrame:
    """Mean and sample standard deviation across the seeds of each variant (``groups``: the
    variant each row of ``table`` is a seed of), with the lowest and highest balanced accuracy.

    With ``probabilities`` (model -> calibrated test probabilities) and the test ``labels``,
    each variant also gets its seeds' ensemble: the balanced accuracy of the class with the
    highest mean probability, with its bootstrap interval. Averaging seeds is the cheapest
    ensemble there is, and from scratch on a few thousand images it is worth a point or two
    (preset A's three seeds at 160 px on ham10000-dev: 0.614, 0.604, 0.618 alone, 0.631
    together), so the table shows what the seeds would score as one model beside what each
    scores alone. The price is one training and one forward pass per seed (the minutes column).

    Variants with a single row are left out: they have no spread to report.
    """
    frame = table.assign(variant=list(groups))
    rows = []
    for name, part in frame.groupby("variant", sort=False):
        if len(part) < 2:
            continue
        row: dict[str, Any] = {"variant": name, "seeds": len(part)}
        for metric in (m for m in SEED_METRICS if m in part.columns):
            values = part[metric].astype(float)
            row[f"{metric}_mean"], row[f"{metric}_sd"] = values.mean(), values.std(ddof=1)
        row["balanced_accuracy_min"] = float(part["balanced_accuracy"].min())
        row["balanced_accuracy_max"] = float(part["balanced_accuracy"].max())
        if probabilities is not None and labels is not None:
            mean = np.mean([probabilities[m] for m in part["model"]], axis=0)
            score = balanced_accuracy_score(labels, mean.argmax(axis=1))
            low, high = balanced_accuracy_ci(mean, labels)
            row |= {"ensemble_balanced_accuracy": float(score)}
            row |= {"ensemble_ci_low": low, "ensemble_ci_high": high}
        rows.append(row)
    return pd.DataFrame(rows)


# Data keys a variant may change: training applies them on top of the shared cache (colour
# constancy is a pure function of the cached pixels, see tasks.train.train).
PER_MODEL_DATA_KEYS: tuple[str, ...] = ("prepare.color_constancy",)
BOOTSTRAP = 1000  # resamples of the test images for the balanced-accuracy interval
BOOTSTRAP_SEED = 0


def _data_keys(p: Params) -> dict[str, Any]:
    keys = flatten({name: dataclasses.asdict(getattr(p, name)) for name in DATA_SECTIONS})
    return {k: v for k, v in keys.items() if k not in PER_MODEL_DATA_KEYS}


def balanced_accuracy_ci(
    logits: np.ndarray,
    labels: np.ndarray,
    resamples: int = BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the balanced accuracy over the test images.

    Vectorised over resamples (one bincount for all of them): sklearn's scorer in a Python
    loop would cost seconds per model. As sklearn's balanced accuracy, each resample averages
    the recall of the classes present in it.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n, k = len(labels), int(max(labels.max(initial=0) + 1, logits.shape[1]))
    hit = np.asarray(logits).argmax(axis=1) == labels
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    flat = (labels[idx] + k * np.arange(resamples)[:, None]).ravel()
    total = np.bincount(flat, minlength=resamples * k).reshape(resamples, k)
    correct = np.bincount(flat, weights=hit[idx].ravel(), minlength=resamples * k)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(total > 0, correct.reshape(resamples, k) / total, np.nan)
    scores = np.nanmean(recall, axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(scores, [tail, 100 - tail])
    return float(low), float(high)


def check_same_data(base: Params, other: Params, what: str) -> None:
    """Refuse params whose data sections differ from the base: all models share one split.

    ``dvc repro prepare`` builds ``data/prepared`` from params.yaml; an override of, say,
    ``prepare.size`` for one model would not change the cache it trains on, so it is an error
    rather than a silently ignored wish. Overrides that repeat the base value are fine (recipes
    pin their small-size settings into every variant).

    Raises:
        ConfigError: naming the keys that differ.
    """
    a, b = _data_keys(base), _data_keys(other)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if changed:
        raise ConfigError(
            f"compare: {what} changes the data ({', '.join(changed)}); every model of a "
            "comparison trains on the same prepared split. Change the data in params.yaml "
            "(or `dermaflow run --set`) and compare again"
        )


def variant_params(params_path: str | Path, overrides: Sequence[str], variant: Variant) -> Params:
    """The base params plus ``--set`` overrides plus the variant's own, type-checked.

    Raises:
        ConfigError: a bad key or value, an unknown architecture, or changed data sections.
    """
    base = load_params(params_path, list(overrides))
    p = load_params(params_path, [*overrides, *variant.overrides])
    try:
        arch_spec(p.model.arch)
    except ValueError as err:
        raise ConfigError(f"compare variant {variant.name}: {err}") from None
    check_same_data(base, p, f"variant {variant.name}")
    return p


def check_methods(methods: Sequence[str], layer: str) -> None:
    """``compare.agreement_methods`` / ``agreement_layer`` are known names (a ConfigError)."""
    if not methods:
        raise ConfigError("compare.agreement_methods is empty")
    try:
        method_layers(methods, [layer])
    except ValueError as err:
        raise ConfigError(f"compare.agreement_methods / agreement_layer: {err}") from None


# --------------------------------------------------------------------------- ablation


def ablation_pairs(params: Mapping[str, Mapping[str, Any] | None]) -> list[tuple[str, str]]:
    """Pairs of variants whose resolved params differ only by ``model.metadata``.

    Args:
        params: variant name -> its flat resolved params (``Params.as_flat_dict()``), or None
            for a loaded model (its training params are unknown, so it pairs with nothing).

    Returns:
        ``(without, with)`` name pairs, in the order the variants were given.
    """
    pairs = []
    for (a, pa), (b, pb) in itertools.combinations(params.items(), 2):
        if pa is None or pb is None:
            continue
        differ = {k for k in pa.keys() | pb.keys() if pa.get(k) != pb.get(k)}
        if differ == {"model.metadata"}:
            pairs.append((b, a) if pa["model.metadata"] else (a, b))
    return pairs


def ablation_table(table: pd.DataFrame, pairs: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """Every numeric metric of each pair: without, with, and the delta (with minus without).

    Returns:
        Long format: ``without, with, metric, value_without, value_with, delta``.
    """
    rows = []
    indexed = table.set_index("model")
    numeric = [
        c
        for c in table.columns
        if pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])
    ]
    for without, with_ in pairs:
        for metric in numeric:
            a, b = float(indexed.at[without, metric]), float(indexed.at[with_, metric])
            rows.append(
                {
                    "without": without,
                    "with": with_,
                    "metric": metric,
                    "value_without": a,
                    "value_with": b,
                    "delta": b - a,
                }
            )
    columns = ["without", "with", "metric", "value_without", "value_with", "delta"]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- paired


PAIRED_TEXT = (
    "Each model against the first row, on the same test images: the balanced-accuracy gain "
    "with a paired bootstrap 95 % interval (both models scored on the same resamples, so the "
    "images' difficulty cancels and only their disagreements count), the one-sided p-value of "
    "a gain <= 0, and the exact McNemar p-value (plain accuracy, images where one model alone "
    "is right). `verdict`: better or worse when the interval excludes 0, else within noise. "
    "With `compare.seeds` each seed meets the first row's same seed: this interval is the test "
    "images' luck only, so an ingredient earns its place when its seeds agree (Across seeds)."
)
PAIRED_COLUMNS: tuple[str, ...] = (
    "model",
    "reference",
    "balanced_accuracy",
    "reference_balanced_accuracy",
    "gain",
    "ci_low",
    "ci_high",
    "p_value",
    "mcnemar_p_value",
    "verdict",
)


def reference_pairs(variants: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``(model, reference)`` for every model outside the first variant's group.

    The first row is the reference: an ablation recipe puts its baseline there, so each
    ingredient is read against it. With ``compare.seeds`` a model ``x-s<k>`` meets
    ``<first>-s<k>`` when the first variant has that seed (the same initialisation and batch
    order), else the first variant's first model.

    Args:
        variants: :meth:`Variant.as_dict` of each model, in the comparison's order.
    """
    if not variants:
        return []
    reference = variants[0]["group"]  # as_dict: the variant's own name when it has no seeds
    members = [v["name"] for v in variants if v["group"] == reference]
    pairs = []
    for v in variants:
        if v["group"] == reference:
            continue
        same_seed = reference + v["name"][len(v["group"]) :]
        pairs.append((v["name"], same_seed if same_seed in members else members[0]))
    return pairs


def paired_table(
    labels: np.ndarray,
    predicted: Mapping[str, np.ndarray],
    pairs: Sequence[tuple[str, str]],
    resamples: int = BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """The paired significance of each ``(model, reference)`` pair on the test images.

    The gate's own tests (:func:`tasks.gate.paired_bootstrap`, :func:`tasks.gate.
    mcnemar_p_value`) with a gain threshold of 0: one definition of "better than luck" for
    the promotion gate and the comparison.

    Args:
        labels: true class per test image.
        predicted: model name -> its predicted class per test image (same order).
        pairs: from :func:`reference_pairs`.

    Returns:
        One row per pair, :data:`PAIRED_COLUMNS`.
    """
    rows = []
    for model, reference in pairs:
        new, old = predicted[model], predicted[reference]
        s = paired_bootstrap(labels, new, old, 0.0, confidence, resamples, seed)
        verdict = "better" if s.ci_low > 0 else "worse" if s.ci_high < 0 else "within noise"
        rows.append(
            {
                "model": model,
                "reference": reference,
                "balanced_accuracy": float(balanced_accuracy_score(labels, new)),
                "reference_balanced_accuracy": float(balanced_accuracy_score(labels, old)),
                "gain": s.gain,
                "ci_low": s.ci_low,
                "ci_high": s.ci_high,
                "p_value": s.p_value,
                "mcnemar_p_value": mcnemar_p_value(labels, new, old),
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))


# --------------------------------------------------------------------------- explanations


def pick_images(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` test indices, stratified: one per class in turn, seeded, the same for every model.

    Round-robin over the classes keeps rare classes in a small sample; the order is kept (not
    sorted), so the first few, which the gallery shows, already cover the classes.
    """
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < min(n, len(labels)):
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(int(pool.pop(0)))
    return np.asarray(chosen, dtype=int)


def summarize_quality(
    rows: pd.DataFrame, model: str, layers: Mapping[str, str | None]
) -> pd.DataFrame:
    """Per method of one model: the image means of the engine's scores.

    ``pointing_game`` is the hit of the hottest pixel on the lesion, ``energy_pointing_game``
    the share of the map's heat inside it; images without a mask do not count. ``flat`` marks
    a constant map (e.g. Grad-CAM at a layer that is 1 x 1 at a small input size): it points
    nowhere and has no correlation to measure.

    Args:
        rows: :func:`tasks.engine.explain`'s table for one model (scores :data:`SCORES`).
        model: the model's name in the report.
        layers: method -> its layer (None for attributions).

    Returns:
        Columns ``model, method, layer, deletion_auc, insertion_auc, pointing_game,
        energy_pointing_game, flat_maps, n_images`` (``layer`` is ``input`` for attributions;
        ``flat_maps`` counts the constant maps).
    """
    out = []
    for method, part in rows.groupby("method", sort=False):
        record = {"model": model, "method": method, "layer": layers.get(method) or "input"}
        record |= {k: _nanmean(part[k]) if k in part else float("nan") for k in QUALITY}
        record["flat_maps"] = int(part["flat"].sum())
        record["n_images"] = len(part)
        out.append(record)
    columns = ["model", "method", "layer", *QUALITY, "flat_maps", "n_images"]
    return pd.DataFrame(out, columns=columns)


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    if not np.isfinite(arr).any():
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(arr))


def _mean_agreement(a: np.ndarray, b: np.ndarray, top_k_percent: float) -> dict[str, float]:
    """The four agreement scores of two stacks of maps, each averaged over the images."""
    scores = [xm.agreement(x, y, top_k_percent) for x, y in zip(a, b, strict=True)]
    out = {k: _nanmean([s[k] for s in scores]) for k in AGREEMENT}
    out["n_images"] = len(scores)
    return out


def agreement_within(
    maps: Mapping[str, np.ndarray], top_k_percent: float, model: str = ""
) -> pd.DataFrame:
    """Every method pair of one model: SSIM, Pearson, cosine, top-k Jaccard (image means).

    Returns:
        Columns ``model, method_a, method_b, ssim, pearson, cosine, topk_jaccard, n_images``.
    """
    rows = [
        {
            "model": model,
            "method_a": a,
            "method_b": b,
            **_mean_agreement(maps[a], maps[b], top_k_percent),
        }
        for a, b in itertools.combinations(maps, 2)
    ]
    return pd.DataFrame(rows, columns=["model", "method_a", "method_b", *AGREEMENT, "n_images"])


def agreement_across(
    maps_by_model: Mapping[str, Mapping[str, np.ndarray]], top_k_percent: float
) -> pd.DataFrame:
    """Every model pair for each method, on the same images (where both have the method).

    Returns:
        Columns ``method, model_a, model_b, ssim, pearson, cosine, topk_jaccard, n_images``.
    """
    methods = list(dict.fromkeys(m for maps in maps_by_model.values() for m in maps))
    rows = []
    for method in methods:
        having = [name for name, maps in maps_by_model.items() if method in maps]
        for a, b in itertools.combinations(having, 2):
            ma, mb = maps_by_model[a][method], maps_by_model[b][method]
            rows.append(
                {"method": method, "model_a": a, "model_b": b}
                | _mean_agreement(ma, mb, top_k_percent)
            )
    return pd.DataFrame(rows, columns=["method", "model_a", "model_b", *AGREEMENT, "n_images"])


# --------------------------------------------------------------------------- figures


def _model_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_headline(table: pd.DataFrame) -> Figure:
    """Grouped bars: the test metrics per model (left) and ECE before/after calibration."""
    models = list(table["model"])
    fig = Figure(figsize=(max(9.0, 1.6 * len(models) + 6.0), 4.4), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[2, 1])
    width = 0.8 / max(len(models), 1)
    colors = _model_colors(len(models))
    x = np.arange(len(HEADLINE))
    for i, (model, color) in enumerate(zip(models, colors, strict=True)):
        values = table.loc[table["model"] == model, list(HEADLINE)].iloc[0].astype(float)
        left.bar(x + (i - (len(models) - 1) / 2) * width, values, width, color=color, label=model)
    left.set_xticks(x, labels=[h.replace("_", " ") for h in HEADLINE])
    left.set_ylim(0.0, 1.0)
    left.set_ylabel("test score (higher is better)")
    left.set_title("Test metrics")
    left.grid(axis="y", alpha=0.3)
    left.legend(fontsize=8)
    xe = np.arange(len(models))
    right.bar(xe - 0.2, table["ece_before"], 0.4, color="tab:grey", label="before")
    right.bar(xe + 0.2, table["ece_after"], 0.4, color="tab:blue", label="after")
    right.set_xticks(xe, labels=models, rotation=30, ha="right")
    right.set_ylabel("test ECE (lower is better)")
    right.set_title("Calibration")
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=8)
    return fig


def plot_reliability_all(
    bins: Mapping[str, tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]],
    eces: Mapping[str, tuple[float, float]],
) -> Figure:
    """Reliability curves of every model on one figure: before (left) and after calibration.

    Each point is a non-empty confidence bin (accuracy over mean confidence), its size the
    bin's count; the diagonal is perfect calibration. Bars per model (as in the calibrate
    stage) would hide each other, lines do not.
    """
    fig = Figure(figsize=(11.0, 5.2), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    colors = _model_colors(len(bins))
    for k, (ax, stage) in enumerate(zip(axes, ("before", "after"), strict=True)):
        for (model, pair), color in zip(bins.items(), colors, strict=True):
            rows = [r for r in pair[k] if r["count"]]
            conf = [r["confidence"] for r in rows]
            acc = [r["accuracy"] for r in rows]
            size = [12 + 4 * r["count"] ** 0.5 for r in rows]
            ece = eces[model][k]
            ax.plot(conf, acc, color=color, lw=1.4, label=f"{model} (ECE {ece:.3f})")
            ax.scatter(conf, acc, s=size, color=color, zorder=3)
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1.0)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence (max probability)")
        ax.set_title(f"{stage} calibration (test)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("accuracy")
    return fig


def _matrix(frame: pd.DataFrame, names: list[str], a: str, b: str, metric: str) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    mat = np.full((len(names), len(names)), np.nan)
    np.fill_diagonal(mat, 1.0)
    for _, r in frame.iterrows():
        i, j = index[r[a]], index[r[b]]
        mat[i, j] = mat[j, i] = r[metric]
    return mat


def plot_agreement(frame: pd.DataFrame, group: str, a: str, b: str, title: str) -> Figure:
    """One symmetric matrix per group (model or method) and agreement measure.

    Rows of panels are the groups (the models for within-model agreement, the methods for
    across-model agreement), columns the four measures; the diagonal is a map with itself (1).
    """
    groups = list(dict.fromkeys(frame[group]))
    fig = Figure(
        figsize=(3.2 * len(AGREEMENT), 2.9 * max(len(groups), 1) + 0.6),
        dpi=DPI,
        layout="constrained",
    )
    axes = np.atleast_2d(fig.subplots(max(len(groups), 1), len(AGREEMENT), squeeze=False))
    image = None
    for r, name in enumerate(groups):
        part = frame[frame[group] == name]
        names = list(dict.fromkeys([*part[a], *part[b]]))
        for c, metric in enumerate(AGREEMENT):
            ax = axes[r, c]
            mat = _matrix(part, names, a, b, metric)
            image = ax.imshow(mat, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
            for i in range(len(names)):
                for j in range(len(names)):
                    text = "-" if np.isnan(mat[i, j]) else f"{mat[i, j]:.2f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(names)), labels=names, rotation=30, ha="right", fontsize=7)
            ax.set_yticks(range(len(names)), labels=names, fontsize=7)
            ax.set_title(f"{name}: {metric}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6)
    fig.suptitle(title)
    return fig


def plot_gallery(
    raw: np.ndarray,
    masks: np.ndarray,
    has_mask: np.ndarray,
    ids: Sequence[str],
    labels: Sequence[str],
    maps_by_model: Mapping[str, Mapping[str, np.ndarray]],
    n_images: int = GALLERY_IMAGES,
) -> Figure:
    """Rows: the first ``n_images`` explained images; columns: the input, then model x method."""
    from tasks.gallery import outline, overlay

    n = min(n_images, len(raw))
    columns = [(m, meth) for m, maps in maps_by_model.items() for meth in maps]
    fig = Figure(
        figsize=(1.5 * (len(columns) + 1), 1.6 * max(n, 1) + 0.4), dpi=DPI, layout="constrained"
    )
    axes = fig.subplots(max(n, 1), len(columns) + 1, squeeze=False)
    for i in range(n):
        base = outline(raw[i], masks[i]) if has_mask[i] else raw[i]
        axes[i, 0].imshow(base)
        axes[i, 0].set_title(f"{ids[i]}\n{labels[i]}", fontsize=6)
        for c, (model, method) in enumerate(columns, start=1):
            axes[i, c].imshow(overlay(raw[i], maps_by_model[model][method][i]))
            if i == 0:
                axes[i, c].set_title(f"{model}\n{method}", fontsize=6)
    for ax in axes.ravel():
        ax.set_axis_off()
    return fig


# --------------------------------------------------------------------------- report


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            return "-"
        if abs(value) >= 1e4 and float(value).is_integer():
            return f"{value:,.0f}"
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    if isinstance(value, int | np.integer):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured markdown table (pandas' ``to_markdown`` needs tabulate, not a dep)."""
    if frame.empty:
        return "_(none)_\n"
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = [
        "| " + " | ".join(_cell(v, digits) for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([head, rule, *body]) + "\n"


SEEDS_TEXT = (
    "Each variant trained once per seed of `compare.seeds` (rows `<variant>-s<seed>` above): "
    "the mean and sample standard deviation across seeds. A difference between two variants "
    "smaller than their standard deviations is training noise. `ensemble_*`: the seeds as one "
    "model (the class with the highest mean calibrated probability), with its 95 % interval."
)

MAIN_COLUMNS = [
    "model",
    "arch",
    "metadata",
    "metadata_prior",
    "source",
    *HEADLINE,
    "balanced_accuracy_ci_low",
    "balanced_accuracy_ci_high",
    "ece_before",
    "ece_after",
    "nll_after",
    "train_seconds",
    "train_minutes",
    "parameters",
]


def _main_table(table: pd.DataFrame) -> pd.DataFrame:
    return table[[c for c in MAIN_COLUMNS if c in table.columns]]


def _quality_long(quality: pd.DataFrame) -> pd.DataFrame:
    return quality[["model", "method", "layer", *QUALITY, "flat_maps", "n_images"]]


def report_markdown(
    table: pd.DataFrame,
    quality: pd.DataFrame,
    within: pd.DataFrame,
    across: pd.DataFrame,
    ablation: pd.DataFrame,
    info: Mapping[str, Any],
    seeds: pd.DataFrame | None = None,
    paired: pd.DataFrame | None = None,
) -> str:
    """``comparison.md``: the tables of the report, in reading order."""
    parts = [
        f"# Model comparison ({info['dataset']})\n",
        f"{len(table)} models on the same split (data version {info['data_version']}), "
        f"{info['n_images']} test images explained for the true class; CAM methods at the "
        f"{info['layer']} layer, attributions at the input.\n",
        "## Models\n",
        markdown_table(_main_table(table)),
    ]
    if seeds is not None and not seeds.empty:
        parts += [
            "## Across seeds\n",
            f"{SEEDS_TEXT}\n",
            markdown_table(seeds),
        ]
    if paired is not None and not paired.empty:
        parts += ["## Against the first row\n", f"{PAIRED_TEXT}\n", markdown_table(paired, 4)]
    parts += [
        "## Explanation quality\n",
        "Deletion AUC: lower is more faithful; insertion AUC, pointing game and energy pointing "
        "game (the share of heat inside the lesion): higher is better. `flat_maps`: images whose "
        "map is constant (a CAM layer of 1 x 1 at a small input size, or no positive gradient): "
        "they point nowhere.\n",
        markdown_table(_quality_long(quality)),
        "## Ablation: metadata\n",
    ]
    if ablation.empty:
        parts.append("No two variants differ only by `model.metadata`.\n")
    for (without, with_), part in ablation.groupby(["without", "with"], sort=False):
        parts.append(f"### {with_} (with metadata) minus {without} (without)\n")
        view = part[["metric", "value_without", "value_with", "delta"]].rename(
            columns={"value_without": without, "value_with": with_}
        )
        parts.append(markdown_table(view, digits=4))
    parts += [
        "## Agreement within each model\n",
        "Mean over the explained images of each method pair's agreement.\n",
        markdown_table(within),
        "## Agreement across models\n",
        "Mean over the same images of each model pair's maps for one method.\n",
        markdown_table(across),
    ]
    return "\n".join(parts)


def report_html(
    table: pd.DataFrame,
    quality: pd.DataFrame,
    within: pd.DataFrame,
    across: pd.DataFrame,
    ablation: pd.DataFrame,
    figures: Sequence[str],
    info: Mapping[str, Any],
    seeds: pd.DataFrame | None = None,
    paired: pd.DataFrame | None = None,
) -> str:
    """``report.html``: the tables and the figures on one page (files beside it), from the
    ``compare_report.html.j2`` template (:func:`tasks.gallery.render`)."""
    from tasks.gallery import html_table, render

    return render(
        "compare_report.html.j2",
        info=info,
        n_models=len(table),
        figures=list(figures),
        links=[f for f in info["files"] if f.endswith((".csv", ".md", ".json"))],
        seeds_text=SEEDS_TEXT,
        paired_text=PAIRED_TEXT,
        tables={
            "models": html_table(_main_table(table)),
            "seeds": None if seeds is None or seeds.empty else html_table(seeds),
            "paired": None if paired is None or paired.empty else html_table(paired),
            "quality": html_table(_quality_long(quality)),
            "ablation": None if ablation.empty else html_table(ablation),
            "within": html_table(within),
            "across": html_table(across),
        },
    )


def write_report(
    out: Path,
    table: pd.DataFrame,
    quality: pd.DataFrame,
    within: pd.DataFrame,
    across: pd.DataFrame,
    ablation: pd.DataFrame,
    figures: Mapping[str, Figure],
    summary: dict[str, Any],
    seeds: pd.DataFrame | None = None,
    paired: pd.DataFrame | None = None,
) -> list[str]:
    """Write every report file into ``out`` (the flow's atomic staging folder).

    Files: ``comparison.{csv,md}``, ``explanation_quality.csv``, ``agreement_within.csv``,
    ``agreement_across.csv``, ``ablation.csv``, ``seeds.csv`` (with ``compare.seeds``),
    ``paired.csv`` (with two variants or more), the figures (PNG), ``report.html`` and
    ``summary.json``.

    Returns:
        The file names written.
    """
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.csv", index=False)
    quality.to_csv(out / "explanation_quality.csv", index=False)
    within.to_csv(out / "agreement_within.csv", index=False)
    across.to_csv(out / "agreement_across.csv", index=False)
    ablation.to_csv(out / "ablation.csv", index=False)
    has_seeds = seeds is not None and not seeds.empty
    if has_seeds:
        seeds.to_csv(out / "seeds.csv", index=False)
    has_paired = paired is not None and not paired.empty
    if has_paired:
        paired.to_csv(out / "paired.csv", index=False)
    for name, fig in figures.items():
        save_figure(fig, out / name)
    files = [
        "comparison.csv",
        "comparison.md",
        "explanation_quality.csv",
        "agreement_within.csv",
        "agreement_across.csv",
        "ablation.csv",
        *(["seeds.csv"] if has_seeds else []),
        *(["paired.csv"] if has_paired else []),
        *figures,
        "report.html",
        "summary.json",
    ]
    info = {**summary, "files": files}
    write_text(
        out / "comparison.md",
        report_markdown(table, quality, within, across, ablation, info, seeds, paired),
    )
    write_text(
        out / "report.html",
        report_html(table, quality, within, across, ablation, list(figures), info, seeds, paired),
    )
    write_json(out / "summary.json", summary)
    return files
