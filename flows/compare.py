"""Compare: several models on the same split, one report, one MLflow parent run.

``dermaflow compare [--models a,b,c] [--set key=value ...] [--no-repro]`` runs this Prefect
flow. It first makes the data current (``dvc repro prepare``, as the pipeline's stage tasks
do), then runs one task per model, one after the other:

- train it on ``data/prepared`` (the base params, ``--set`` and the variant's overrides; its
  own temporary checkpoint), or load an existing bundle / ``models:/`` registry version;
- evaluate it on the test split, fit the calibrator on validation and judge it on test;
- explain the same ``compare.explain_images`` test images with every
  ``compare.agreement_methods`` method, score the maps (deletion / insertion AUC, pointing game,
  energy inside the lesion) and their agreement within the model;
- log a nested MLflow child run (its resolved params, metrics, reliability diagram and bundle);

and a report task that adds the agreement across models and the metadata ablation and writes
``reports/compare/`` (tables, figures, ``report.html``, ``summary.json``) atomically; the flow
logs it to the parent run ``compare``. No model is registered: a comparison must not create
champion candidates (that is the pipeline's promotion gate's job).

Choices:

- Tasks read a copy of the params file taken when the flow starts: a comparison runs for hours,
  and an edit of params.yaml meanwhile (another experiment being set up) must not change the
  later models or fail the report after every model has trained.
- Tasks receive names, params and paths, never an ``nn.Module``, and run sequentially:
  training reseeds torch's global RNG and sets its deterministic mode, which concurrent
  threads would share. Heatmaps travel between tasks as ``.npz`` files in a temp folder.
- The rich progress display is the terminal's, not a task input (Prefect would hash and record
  it), so it reaches the tasks through a context variable.
- Every model shares one split: overrides that change the data sections are refused
  (:func:`tasks.compare.check_same_data`), the cache must be the one params name even with
  ``--no-repro`` (:func:`tasks.prepare.check_cache`), and a loaded bundle must have the
  cache's classes and input size; a bundle trained on another data version is flagged.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import paths
from tasks.config import ConfigError, Params, frozen_params, load_params

if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table

# torch, MLflow and Captum are imported where they are used: flows/cli.py imports this module
# for its command, and `dermaflow --help` must not pay seconds for them.

OUT_DIR = Path("reports/compare")
BUNDLE_NAME = "model.pt"  # the child run's artifact is bundle/model.pt, as the train stage's

_LIVE: contextvars.ContextVar[Progress | None] = contextvars.ContextVar(
    "dermaflow_compare_progress", default=None
)


class CompareError(RuntimeError):
    """The comparison cannot run: the data stage failed, or a bundle does not fit the data."""


@dataclasses.dataclass(frozen=True)
class CompareJob:
    """What every task of one comparison shares (plain values: Prefect records task inputs)."""

    repo: str
    params_path: str  # the flow's own copy of the params file, taken when it started
    overrides: list[str]
    image_indices: list[int]
    work_dir: str
    data_version: str
    experiment_id: str
    parent_run_id: str


@dataclasses.dataclass(frozen=True)
class ComparePlan:
    """The variants, checked before anything runs, and how each is obtained."""

    params: Params
    variants: list[Any]  # tasks.compare.Variant
    bundles: dict[str, str]  # loaded variant -> a local bundle path or runs:/ artifact URI


def plan_compare(
    models: list[str] | None, overrides: list[str] | None, repo: str, params_path: str
) -> ComparePlan:
    """Resolve ``--models`` and type-check every variant's params; resolve registry versions.

    Runs before any training (and, from the CLI, before the flow starts), so a typo costs
    nothing.

    Raises:
        ConfigError: an unknown entry (naming the choices), bad overrides, overrides that change
            the data, unknown agreement methods, or a bundle / registry version that cannot be
            loaded.
    """
    from flows.explain_batch import ExplainBatchError, open_model
    from tasks import tracking
    from tasks.compare import (
        check_methods,
        check_same_data,
        resolve_variants,
        variant_params,
        with_seeds,
    )

    path = Path(repo) / params_path
    overrides = list(overrides or [])
    p = load_params(path, overrides)
    check_same_data(load_params(path), p, "--set")
    check_methods(p.compare.agreement_methods, p.compare.agreement_layer)
    variants = with_seeds(resolve_variants(models, p.compare.variants, repo), p.compare.seeds)
    bundles: dict[str, str] = {}
    for v in variants:
        if v.trained:
            variant_params(path, overrides, v)
            continue
        try:
            ref, _ = open_model(v.source, tracking.configure(repo))
        except ExplainBatchError as err:
            raise ConfigError(f"compare: {err}") from None
        bundles[v.name] = ref.bundle
    return ComparePlan(p, variants, bundles)


@task(name="compare-prepare-data", cache_policy=NO_CACHE)
def prepare_data(repo: str) -> str:
    """``dvc repro prepare``: the split and cache every model trains on, current with params."""
    from flows.stages import StageFailed, reproduce

    try:
        ran = reproduce(repo, "prepare", single_item=False)
    except StageFailed as err:
        raise CompareError(f"`dvc repro prepare` failed at {err.stage}: {err.output}") from None
    get_run_logger().info("data: %s", "ran " + ", ".join(ran) if ran else "unchanged")
    return "ran" if ran else "unchanged"


def _predict(model, split, metadata, batch_size: int, device, color: str) -> np.ndarray:  # noqa: ANN001
    """Logits of a loaded model over a prepared split (with its metadata for fusion models).

    ``color`` is the colour constancy still to apply on load (the bundle's, when the cache
    was written without it), as training applies it.
    """
    from torch.utils.data import DataLoader

    from tasks.train import CachedImages, predict_logits

    data = CachedImages(split, metadata, color)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    logits, _ = predict_logits(model.to(device), loader, device)
    return logits


def _load(bundle: str, name: str, splits: dict, p: Params, job: CompareJob, device) -> dict:  # noqa: ANN001
    """A loaded variant: the model, its logits on val/test, the facts the report needs."""
    from flows.explain_batch import bundle_file
    from tasks import tracking
    from tasks.fusion import metadata_features, prior_from_meta
    from tasks.models import load_bundle
    from tasks.train import MEAN, STD

    local = bundle_file(bundle, tracking.tracking_uri(job.repo))
    model, meta = load_bundle(local)
    classes, size = splits["test"].classes, int(splits["test"].images.shape[1])
    if list(meta["classes"]) != list(classes):
        raise CompareError(
            f"compare: {name} predicts {meta['classes']} but the prepared split has {classes}"
        )
    side = meta["input_size"] if isinstance(meta["input_size"], int) else meta["input_size"][0]
    if side != size:
        raise CompareError(f"compare: {name} takes {side} px images, the prepared cache {size} px")
    norm = meta["normalization"]
    if not (np.allclose(norm["mean"], MEAN) and np.allclose(norm["std"], STD)):
        raise CompareError(f"compare: {name} was trained with another normalisation ({norm})")
    extra = dict(meta.get("extra") or {})
    wanted, cached = extra.get("color_constancy", "none"), splits["test"].color_constancy
    if wanted != cached and cached != "none":
        raise CompareError(
            f"compare: {name} was trained with prepare.color_constancy {wanted} but the prepared "
            f"cache was written with {cached}, which cannot be undone: prepare it with {wanted}"
        )
    todo = wanted if wanted != cached else "none"  # applied on load, as in training
    sites = extra.get("metadata_sites") if meta.get("fusion") else None
    metadata = {
        s: None if sites is None else metadata_features(split.rows, sites)
        for s, split in splits.items()
    }
    from tasks.models import with_tta

    scored = with_tta(model, extra.get("tta"))  # as it was evaluated
    prior = prior_from_meta(extra)  # a metadata prior: its log-odds, as training added them
    logits = {
        s: _predict(scored, splits[s], metadata[s], p.train.batch_size, device, todo)
        + (0.0 if prior is None else prior.log_odds(splits[s].rows))
        for s in ("val", "test")
    }
    return {
        "model": model.eval(),
        "arch": meta["arch"],
        "logits": logits,
        "sites": sites,
        "extra": extra,
        "seconds": float("nan"),
        "best_epoch": None,
        "local": Path(local),
        "data_version_match": meta.get("data_version") == job.data_version,
        "params": None,
    }


def _train(p: Params, name: str, prepared: Path, work: Path, data_version: str) -> dict:
    """A trained variant, on its own fresh checkpoint; epochs advance the live display."""
    from tasks.train import train

    bar = _LIVE.get()
    task_id = bar.add_task(f"{name}: training", total=p.train.epochs) if bar else None

    def on_epoch(record: dict) -> None:
        if bar is not None:
            bar.advance(task_id)

    result = train(
        p.model,
        p.train,
        prepared,
        work / "checkpoint.pt",
        data_version,
        on_epoch=on_epoch,
        show_progress=False,
        color=p.prepare.color_constancy,
    )
    if bar is not None:
        bar.remove_task(task_id)
    return {
        "model": result.model,
        "arch": p.model.arch,
        "logits": {"val": result.val_logits, "test": result.test_logits},
        "sites": result.extra.get("metadata_sites"),
        "extra": result.extra,
        "seconds": result.seconds,
        "best_epoch": result.best_epoch,
        "local": None,
        "data_version_match": True,
        "params": p.as_flat_dict(),
        "result": result,
    }


def _finite(value: Any) -> float:
    return float("nan") if value is None else float(value)


@task(name="compare-variant", cache_policy=NO_CACHE)  # trains and writes: never from cache
def variant_task(variant: dict, bundle: str | None, index: int, job: CompareJob) -> dict:
    """Train or load one model; calibrate, evaluate and explain it; log its MLflow child run.

    Returns:
        ``variant``, ``row`` (its line of comparison.csv), ``bins`` (reliability before /
        after), ``quality`` and ``within`` (records), ``maps`` (path of its heatmaps ``.npz``),
        ``layers`` (method -> layer), ``params`` (flat resolved params; None when loaded),
        ``predicted`` (its predicted class per test image).
    """
    import mlflow
    import torch

    from tasks import compare as cmp
    from tasks import engine, tracking
    from tasks.calibrate import calibrate, flat_calibration_metrics, plot_reliability
    from tasks.fusion import metadata_features
    from tasks.io import write_json
    from tasks.metrics import classification_metrics, flat_metrics, save_figure
    from tasks.models import count_parameters
    from tasks.prepare import open_split
    from tasks.train import normalize, pick_device, save_model_bundle

    log = get_run_logger()
    v = cmp.Variant(
        variant["name"], tuple(variant["overrides"]), variant["source"], variant.get("group")
    )
    root = Path(job.repo)
    prepared = root / paths.PREPARED
    base = load_params(root / job.params_path, job.overrides)
    p = cmp.variant_params(root / job.params_path, job.overrides, v) if v.trained else base
    splits = {s: open_split(prepared, s) for s in ("val", "test")}
    work = Path(job.work_dir) / f"{index:02d}"
    work.mkdir(parents=True, exist_ok=True)
    device = pick_device(p.train.device)
    if v.trained:
        got = _train(p, v.name, prepared, work, job.data_version)
    else:
        got = _load(bundle, v.name, splits, p, job, device)
    model, arch, test = got["model"], got["arch"], splits["test"]
    classes, fusion = test.classes, got["sites"] is not None
    log.info("%s: %s %s", v.name, "trained" if v.trained else f"loaded from {v.source}", arch)

    metrics = classification_metrics(got["logits"]["test"], test.labels, classes)
    c = p.calibrate
    cal = calibrate(
        got["logits"]["val"],
        splits["val"].labels,
        got["logits"]["test"],
        test.labels,
        c.method,
        c.bins,
        c.target_accuracy,
    )

    idx = np.asarray(job.image_indices, dtype=int)
    raw = np.array(test.images[idx])
    color = got["extra"].get("color_constancy", "none")  # the model's own, trained or loaded
    if color != test.color_constancy:  # applied on load, as in training
        from tasks.prepare import color_constancy

        raw = color_constancy(raw, color)
    x = torch.from_numpy(raw).permute(0, 3, 1, 2).float().div(255.0)
    x = normalize(x).to(device)
    targets = test.labels[idx]
    meta_rows = metadata_features(test.rows, got["sites"])[idx] if fusion else None
    model = model.to(device).eval()
    cfg, compare_cfg = p.explain, p.compare
    plan = engine.plan(compare_cfg.agreement_methods, [compare_cfg.agreement_layer], arch, fusion)
    result = engine.explain(
        model, arch, x, targets, plan, options=engine.options(cfg), scores=cmp.SCORES,
        masks=np.where(test.rows["has_mask"].to_numpy()[idx, None, None], test.masks[idx], 0),
        perturbation_steps=cfg.perturbation_steps, top_k_percent=cfg.top_k_percent,
        metadata=meta_rows, progress=_LIVE.get(), label=f"{v.name}: explaining",
    )  # fmt: skip
    layers = dict(plan)
    maps = {method: heat for (method, _layer), heat in result.maps.items()}
    quality = cmp.summarize_quality(result.table, v.name, layers)
    within = cmp.agreement_within(maps, cfg.top_k_percent, v.name)
    np.savez(work / "heatmaps.npz", **maps)

    temperature = cal.calibrator.temperature
    if v.trained:  # exactly as the train stage writes it; the calibrator travels beside it
        save_model_bundle(work / BUNDLE_NAME, got["result"], arch, job.data_version)
    else:
        shutil.copyfile(got["local"], work / BUNDLE_NAME)
    write_json(work / "calibrator.json", cal.calibrator.to_dict())
    title = f"{v.name}: reliability (test)"
    save_figure(plot_reliability(cal.bins_before, cal.bins_after, title), work / "reliability.png")

    row: dict[str, Any] = {
        "model": v.name,
        "source": "trained" if v.trained else v.source,
        "arch": arch,
        "metadata": fusion,
        "metadata_prior": bool(got["extra"].get("metadata_prior")),
        **{k: _finite(metrics[k]) for k in cmp.HEADLINE},
    }
    low, high = cmp.balanced_accuracy_ci(got["logits"]["test"], test.labels)
    row |= {"balanced_accuracy_ci_low": low, "balanced_accuracy_ci_high": high}
    for key in cmp.CALIBRATION:
        row[f"{key}_before"] = float(cal.before[key])
        row[f"{key}_after"] = float(cal.after[key])
    row["temperature"] = _finite(temperature)
    for _, q in quality.iterrows():
        row |= {f"{q['method']}_{k}": float(q[k]) for k in cmp.QUALITY}
    row |= {
        "train_seconds": float(got["seconds"]),
        "train_minutes": float(got["seconds"]) / 60.0,
        "best_epoch": got["best_epoch"] if got["best_epoch"] is not None else float("nan"),
        "parameters": int(count_parameters(model)),
        "data_version_match": bool(got["data_version_match"]),
    }

    flat = {
        **flat_metrics(metrics, "test"),
        **flat_calibration_metrics(cal),
        **{
            f"xai_{q['method']}_{k}": float(q[k])
            for _, q in quality.iterrows()
            for k in cmp.QUALITY
        },
        **{
            f"agree_{w['method_a']}_{w['method_b']}_{k}": float(w[k])
            for _, w in within.iterrows()
            for k in cmp.AGREEMENT
        },
        "parameters": float(row["parameters"]),
    }
    if v.trained:
        flat["train_seconds"] = float(got["seconds"])
    run_params = dict(got["params"] or {"model.arch": arch, "model.metadata": fusion})
    run_params |= {"variant.name": v.name, "variant.overrides": ", ".join(v.overrides)}
    run_params["variant.source"] = v.source or "trained"
    tags = {"job": "compare", "compare_variant": v.name, "data_version": job.data_version}
    tracking.configure(job.repo)
    with mlflow.start_run(
        experiment_id=job.experiment_id,
        run_name=v.name,
        nested=True,
        parent_run_id=job.parent_run_id,
        tags=tags,
    ) as run:
        tracking.log_params(run_params)
        tracking.log_metrics({k: v_ for k, v_ in flat.items() if math.isfinite(v_)})
        tracking.log_artifacts(
            {
                "compare": work / "reliability.png",
                "bundle": work / BUNDLE_NAME,
                "calibrate": work / "calibrator.json",  # where explain-batch looks for it
            }
        )
    row["run_id"] = run.info.run_id
    log.info(
        "%s: balanced accuracy %.3f, ECE %.3f -> %.3f (MLflow run %s)",
        v.name, row["balanced_accuracy"], row["ece_before"], row["ece_after"], run.info.run_id,
    )  # fmt: skip
    return {
        "variant": v.as_dict(),
        "row": row,
        "bins": [cal.bins_before, cal.bins_after],
        "quality": quality.to_dict(orient="records"),
        "within": within.to_dict(orient="records"),
        "maps": str(work / "heatmaps.npz"),
        "layers": {m: layer or "input" for m, layer in layers.items()},
        "params": got["params"],
        "predicted": got["logits"]["test"].argmax(axis=1).tolist(),  # the paired table's input
        "probabilities": cal.probs_after.tolist(),  # calibrated (test): the seeds' ensemble
    }


@task(name="compare-report", cache_policy=NO_CACHE)
def report_task(results: list[dict], job: CompareJob, out_dir: str, info: dict) -> dict:
    """Agreement across models, the ablation, figures and the report, written atomically.

    Returns:
        ``summary.json``'s content.
    """
    from tasks import compare as cmp
    from tasks.io import atomic_dir
    from tasks.prepare import open_split

    root = Path(job.repo)
    p = load_params(root / job.params_path, job.overrides)
    table = pd.DataFrame([r["row"] for r in results])
    quality = pd.DataFrame([q for r in results for q in r["quality"]])
    within = pd.DataFrame([w for r in results for w in r["within"]])
    within = within.reindex(columns=["model", "method_a", "method_b", *cmp.AGREEMENT, "n_images"])
    maps = {}
    for r in results:
        with np.load(r["maps"]) as data:
            maps[r["variant"]["name"]] = {k: data[k] for k in data.files}
    across = cmp.agreement_across(maps, p.explain.top_k_percent)
    layers = {m: lay for r in results for m, lay in r["layers"].items()}
    across.insert(1, "layer", [layers.get(m, "input") for m in across["method"]])
    pairs = cmp.ablation_pairs({r["variant"]["name"]: r["params"] for r in results})
    ablation = cmp.ablation_table(table, pairs)
    test = open_split(root / paths.PREPARED, "test")
    seeds = cmp.seed_summary(
        table,
        [r["variant"]["group"] for r in results],
        {r["row"]["model"]: np.asarray(r["probabilities"]) for r in results},
        test.labels,
    )
    paired = cmp.paired_table(
        test.labels,
        {r["variant"]["name"]: np.asarray(r["predicted"]) for r in results},
        cmp.reference_pairs([r["variant"] for r in results]),
    )

    idx = np.asarray(job.image_indices, dtype=int)
    eces = {r["row"]["model"]: (r["row"]["ece_before"], r["row"]["ece_after"]) for r in results}
    figures = {
        "headline.png": cmp.plot_headline(table),
        "reliability.png": cmp.plot_reliability_all(
            {r["row"]["model"]: tuple(r["bins"]) for r in results}, eces
        ),
        "gallery.png": cmp.plot_gallery(
            np.array(test.images[idx]),
            np.array(test.masks[idx]),
            test.rows["has_mask"].to_numpy()[idx].astype(bool),
            list(test.rows["image_id"].to_numpy()[idx]),
            [test.classes[c] for c in test.labels[idx]],
            maps,
        ),
    }
    if not within.empty:
        figures["agreement_within.png"] = cmp.plot_agreement(
            within, "model", "method_a", "method_b", "Agreement of methods within each model"
        )
    if not across.empty:
        figures["agreement_across.png"] = cmp.plot_agreement(
            across, "method", "model_a", "model_b", "Agreement of models for each method"
        )
    summary = {
        **info,
        "variants": [r["variant"] for r in results],
        "models": table.to_dict(orient="records"),
        "explanation_quality": quality.to_dict(orient="records"),
        "agreement_within": within.to_dict(orient="records"),
        "agreement_across": across.to_dict(orient="records"),
        "ablation": ablation.to_dict(orient="records"),
        "ablation_pairs": [list(pair) for pair in pairs],
        "seeds": seeds.to_dict(orient="records"),
        "paired": paired.to_dict(orient="records"),
        "images": {
            "indices": [int(i) for i in idx],
            "image_ids": [str(i) for i in test.rows["image_id"].to_numpy()[idx]],
        },
    }
    with atomic_dir(Path(out_dir)) as tmp:
        summary["files"] = cmp.write_report(
            tmp, table, quality, within, across, ablation, figures, summary, seeds, paired
        )
    return summary


def data_version(repo: Path) -> str:
    """The train stage's data version (manifest + split files), so bundles compare alike."""
    from tasks.split import data_version as split_data_version

    files = [repo / paths.MANIFEST, repo / paths.SPLITS / "test.parquet"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CompareError(f"compare: no prepared data ({missing}); run `dvc repro prepare`")
    return split_data_version(repo)


@flow(name="dermaflow-compare", log_prints=True)
def compare_flow(
    models: list[str] | None = None,
    overrides: list[str] | None = None,
    repo: str = ".",
    params_path: str = "params.yaml",
    out_dir: str = str(OUT_DIR),
    repro: bool = True,
    show_progress: bool = True,
) -> dict:
    """Compare several models on the same split; write the report; log an MLflow parent run.

    Args:
        models: ``--models`` entries (see :func:`tasks.compare.resolve_variants`); None means
            every ``compare.variants`` entry.
        overrides: ``key=value`` params for every model of this call (not written anywhere).
        repo: the project folder.
        params_path: params file, relative to ``repo``.
        out_dir: the report folder (relative to ``repo`` unless absolute), replaced as a whole.
        repro: run ``dvc repro prepare`` first.
        show_progress: the rich progress display.

    Returns:
        The report's ``summary.json`` content, with ``run_id`` (the parent run) and ``out_dir``.
    """
    with frozen_params(Path(repo) / params_path) as snapshot:  # what every task reads
        return _compare(models, overrides, repo, snapshot, out_dir, repro, show_progress)


def _compare(
    models: list[str] | None,
    overrides: list[str] | None,
    repo: str,
    snapshot: Path,
    out_dir: str,
    repro: bool,
    show_progress: bool,
) -> dict:
    """:func:`compare_flow` on its private copy of the params file (``snapshot``)."""
    import mlflow
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    from tasks import tracking
    from tasks.compare import pick_images
    from tasks.prepare import check_cache, open_split
    from tasks.progress import progress_bar

    start, log, root = time.perf_counter(), get_run_logger(), Path(repo)
    plan = plan_compare(models, overrides, repo, str(snapshot))
    p = plan.params
    names = [v.name for v in plan.variants]
    log.info("comparing %d models: %s", len(names), ", ".join(names))
    if repro:
        prepare_data(repo)
    check_cache(root / paths.PREPARED, p.prepare)  # with --no-repro, the cache as it is
    version = data_version(root)
    test = open_split(root / paths.PREPARED, "test")
    indices = pick_images(test.labels, p.compare.explain_images, p.explain.seed)
    out = Path(out_dir) if Path(out_dir).is_absolute() else root / out_dir
    tracking.configure(repo)
    experiment_id = tracking.ensure_experiment(p.tracking.experiment or p.dataset.name, repo)
    tags = {
        "job": "compare",
        "git_commit": tracking.git_commit(repo),
        "data_version": version,
        "prefect_flow_run_id": str(flow_run.id),
        **tracking.environment_tags(),
    }
    parent_params = {
        "variants": ",".join(names),
        "overrides": ", ".join(overrides or []),
        "explain_images": len(indices),
        "agreement_methods": ",".join(p.compare.agreement_methods),
        "agreement_layer": p.compare.agreement_layer,
        **{
            f"variant.{v.name}": v.source or ", ".join(v.overrides) or "(base params)"
            for v in plan.variants
        },
    }
    with (
        tempfile.TemporaryDirectory(prefix="dermaflow-compare-") as work,
        progress_bar(show_progress) as bar,
        mlflow.start_run(experiment_id=experiment_id, run_name="compare", tags=tags) as parent,
    ):
        token = _LIVE.set(bar)
        try:
            tracking.log_params(parent_params)
            job = CompareJob(
                repo, str(snapshot), list(overrides or []), [int(i) for i in indices], work,
                version, experiment_id, parent.info.run_id,
            )  # fmt: skip
            overall = bar.add_task("models", total=len(plan.variants))
            results = []
            for i, v in enumerate(plan.variants):
                results.append(variant_task(v.as_dict(), plan.bundles.get(v.name), i, job))
                bar.advance(overall)
            info = {
                "dataset": p.dataset.name,
                "experiment": p.tracking.experiment or p.dataset.name,
                "data_version": version,
                "n_images": len(indices),
                "methods": list(p.compare.agreement_methods),
                "layer": p.compare.agreement_layer,
                "run_id": parent.info.run_id,
                "experiment_id": experiment_id,
            }
            summary = report_task(results, job, str(out), info)
        finally:
            _LIVE.reset(token)
        tracking.log_artifacts({"compare": out})
        tracking.log_metrics({"models": len(results), "seconds": time.perf_counter() - start})
        tracking.log_metrics(
            {
                f"{row['variant']}/{key}": value
                for row in summary["seeds"]
                for key, value in row.items()
                if key.endswith(("_mean", "_sd")) or key == "ensemble_balanced_accuracy"
            }
        )
        tracking.log_metrics(
            {
                f"{row['model']}/{key}": row[key]
                for row in summary["paired"]
                for key in ("gain", "ci_low", "ci_high", "p_value")
            }
        )
    create_markdown_artifact(
        markdown=(out / "comparison.md").read_text(),
        key="dermaflow-compare",
        description="models side by side: metrics, calibration, explanations, ablation",
    )
    summary["out_dir"] = str(out)
    log.info("report %s; MLflow parent run %s", out / "report.html", summary["run_id"])
    return summary


def run_compare(
    models: list[str] | None = None,
    overrides: list[str] | None = None,
    repo: str = ".",
    params_path: str = "params.yaml",
    out_dir: str = str(OUT_DIR),
    repro: bool = True,
    show_progress: bool = True,
) -> dict:
    """Check the variants first (a typo starts no flow run and trains nothing), then run."""
    plan_compare(models, overrides, repo, params_path)
    return compare_flow(models, overrides, repo, params_path, out_dir, repro, show_progress)


def results_table(summary: dict) -> Table:
    """The final printed table: one row per model, the headline numbers and its gain in
    balanced accuracy over the first row with the paired verdict (``paired.csv``)."""
    from rich.table import Table

    def num(value: Any, digits: int = 3) -> str:
        return "-" if value is None or value != value else f"{value:.{digits}f}"

    methods = summary.get("methods") or []
    first = methods[0] if methods else None
    table = Table(title=f"dermaflow compare ({summary['dataset']})")
    table.add_column("model", overflow="fold")
    table.add_column("arch", overflow="fold")
    columns = ["meta", "bal. acc", "acc", "macro F1", "AUROC", "ECE before > after"]
    columns += [f"{first} del. AUC" if first else "del. AUC", "train s", "params", "vs first"]
    for name in columns:
        table.add_column(name, justify="right")
    paired = {row["model"]: row for row in summary.get("paired") or []}
    for r in summary["models"]:
        gain = paired.get(r["model"])
        table.add_row(
            str(r["model"]), str(r["arch"]), "yes" if r["metadata"] else "no",
            num(r["balanced_accuracy"]), num(r["accuracy"]), num(r["macro_f1"]),
            num(r["auroc_macro"]), f"{num(r['ece_before'])} > {num(r['ece_after'])}",
            num(r.get(f"{first}_deletion_auc")), num(r["train_seconds"], 1),
            f"{r['parameters']:,}",
            "-" if gain is None else f"{gain['gain']:+.3f} {gain['verdict']}",
        )  # fmt: skip
    return table


if __name__ == "__main__":
    import sys

    compare_flow(models=sys.argv[1].split(",") if len(sys.argv) > 1 else None)
