"""The ``dermaflow`` command: one subcommand per DVC stage, plus the pipeline driver.

Each stage entry is thin: load params.yaml into the typed config, call the stage function from
``tasks/``, write its outputs atomically, and turn a known failure into a one-paragraph message
and a non-zero exit code (never a stack trace for bad input).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import typer
from rich.console import Console

from tasks import paths
from tasks.config import ConfigError, Params, load_params
from tasks.io import write_json, write_parquet

app = typer.Typer(
    help="dermaflow: trustworthy skin-lesion classifiers, from raw images to explained models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file to read")
SetOpt = typer.Option(None, "--set", "-S", help="override a param for this call: key=value")


# Errors that mean bad input or config: a message and exit 1, no traceback. Named, not
# imported: a raised error's module is already loaded, and importing every stage (GX, ONNX,
# torch) just to check would add seconds to each failing command.
KNOWN_ERRORS = (
    ("tasks.export", "ParityError"),
    ("tasks.ingest", "IngestError"),
    ("tasks.models", "WeightsUnavailableError"),
    ("tasks.prepare", "PrepareError"),
    ("tasks.split", "SplitError"),
    ("tasks.train", "TrainingError"),
    ("tasks.tune", "TuneError"),
    ("tasks.validate", "ValidationError"),
)


def is_known_error(err: BaseException) -> bool:
    """True for bad input or config (see ``KNOWN_ERRORS``), False for a bug."""
    return isinstance(err, _known_errors())


def _known_errors() -> tuple[type[BaseException], ...]:
    """The ``KNOWN_ERRORS`` classes whose modules are loaded, for an ``except`` clause."""
    found: list[type[BaseException]] = [ConfigError, FileNotFoundError]
    for module, name in KNOWN_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Run a stage body; a known error becomes a readable message and exit code 1."""
    try:
        yield
    except Exception as err:
        if not is_known_error(err):
            raise
        console.print(f"[bold red]dermaflow {name} failed[/]\n{err}", highlight=False)
        raise typer.Exit(code=1) from None


def _params(path: Path, overrides: list[str] | None) -> Params:
    return load_params(path, overrides)


def _image_only(meta: dict, stage_name: str) -> None:
    """The ONNX graph and the explain stage take one image tensor; a fusion model needs more."""
    if meta.get("fusion"):
        raise ConfigError(
            f"{stage_name}: {paths.BUNDLE} fuses image and metadata (model.metadata: true); "
            f"the {stage_name} stage takes image-only models. Train it with model.metadata: "
            "false, or study the fusion model with `dermaflow compare` (the metadata ablation)"
        )


@app.command()
def synth(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Generate the embedded synthetic dermoscopy set (ISIC 2019 layout, with masks)."""
    from tasks.synth import generate

    with stage("synth"):
        p = _params(params, set_)
        summary = generate(p.synth, paths.SYNTH_ROOT)
        write_json(paths.METRICS / "synth.json", summary)
        console.print(f"synth: {summary['count']} images -> {paths.SYNTH_ROOT}")


@app.command()
def ingest(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Read the dataset root through its adapter into data/manifest.parquet."""
    from tasks.ingest import build_manifest, manifest_summary

    with stage("ingest"):
        p = _params(params, set_)
        manifest = build_manifest(
            p.dataset.root,
            p.dataset.layout,
            p.dataset.masks,
            workers=p.ingest.workers,
            label_map=p.dataset.label_map,
        )
        write_parquet(paths.MANIFEST, manifest)
        summary = manifest_summary(manifest)
        write_json(paths.METRICS / "ingest.json", summary)
        console.print(f"ingest: {summary['images']} images, {summary['lesions']} lesions")


@app.command()
def validate(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Check the manifest with great-expectations; exit 1 naming every offending row."""
    from tasks.ingest import label_vocabulary
    from tasks.report import contact_sheet, write_reports
    from tasks.validate import raise_for_errors, validate_manifest

    with stage("validate"):
        p = _params(params, set_)
        manifest = pd.read_parquet(paths.MANIFEST)
        classes = label_vocabulary(p.dataset.label_map)  # None: the source's own vocabulary
        report = validate_manifest(manifest, Path(p.dataset.root), p.validate, classes)
        write_reports(report, paths.VALIDATION_JSON, paths.VALIDATION_MD)
        contact_sheet(manifest, Path(p.dataset.root), paths.CONTACT_SHEET)
        for warning in report.warnings():
            console.print(f"[yellow]warning[/] {warning.message}", highlight=False)
        raise_for_errors(report)
        console.print(f"validate: {report.n_rows} rows passed; report {paths.VALIDATION_MD}")


@app.command()
def split(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Stratified, lesion-grouped, leak-free train/val/test split."""
    from tasks.split import SplitError, split_manifest, write_splits

    with stage("split"):
        p = _params(params, set_)
        verdict = json.loads(paths.VALIDATION_JSON.read_text())
        if not verdict.get("passed"):
            raise SplitError(f"{paths.VALIDATION_JSON} says the data failed validation")
        manifest = pd.read_parquet(paths.MANIFEST)
        frame, report = split_manifest(
            manifest, p.split.fractions, p.split.seed, p.split.small_class
        )
        write_splits(frame, paths.SPLITS)
        write_json(paths.METRICS / "split.json", report)
        leaks = report["leakage"]
        console.print(
            f"split: {report['images']} | shared lesions {leaks['shared_lesions']}, "
            f"shared hashes {leaks['shared_hashes']}"
        )


@app.command()
def prepare(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Decode every image once into the memory-mapped cache (data/prepared)."""
    from tasks.prepare import prepare as run_prepare

    with stage("prepare"):
        p = _params(params, set_)
        metrics = run_prepare(
            paths.SPLITS,
            p.dataset.root,
            paths.PREPARED,
            p.prepare.size,
            p.prepare.resize,
            p.prepare.workers,
        )
        write_json(paths.METRICS / "prepare.json", metrics)
        console.print(
            f"prepare: {metrics['images']} images at {metrics['decode_images_per_s']} images/s"
        )


def data_version(files: list[Path]) -> str:
    """A short content hash of the data a model was trained on (manifest + split files)."""
    import hashlib

    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


@app.command()
def train(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Train on the prepared cache, evaluate, and record the lineage run in MLflow."""
    from tasks import tracking
    from tasks.train import save_outputs
    from tasks.train import train as run_train

    with stage("train"):
        p = _params(params, set_)
        version = data_version([paths.MANIFEST, *sorted(paths.SPLITS.glob("*.parquet"))])
        tags = {
            "git_commit": tracking.git_commit(),
            "data_version": version,
            "dataset": p.dataset.name,
            "arch": p.model.arch,
            **tracking.environment_tags(),
        }
        log_lines: list[str] = []

        def on_epoch(record: dict) -> None:
            line = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
            )
            log_lines.append(line)
            console.print(f"train: {line}", highlight=False)
            metrics = {k: v for k, v in record.items() if k != "epoch"}
            tracking.log_metrics(metrics, step=record["epoch"])

        experiment = p.tracking.experiment or p.dataset.name
        with tracking.lineage_run(experiment, f"{p.dataset.name}-{p.model.arch}", tags) as run:
            tracking.log_params(p.as_flat_dict())
            result = run_train(
                p.model, p.train, paths.PREPARED, paths.CHECKPOINT, version, on_epoch=on_epoch
            )
            final = save_outputs(
                result,
                p.model.arch,
                version,
                paths.BUNDLE,
                paths.PREDICTIONS,
                paths.TRAIN_REPORTS,
                paths.PREPARED,
                log_lines,
            )
            write_json(paths.METRICS / "train.json", final["summary"])
            tracking.set_tags({"device": result.device, "best_epoch": str(result.best_epoch)})
            tracking.log_metrics(final["flat"])
            tracking.log_artifacts(
                {
                    "train": paths.TRAIN_REPORTS,
                    "data": paths.REPORTS,
                    "data/split": paths.METRICS / "split.json",
                    "bundle": paths.BUNDLE,
                }
            )
            model_uri, model_version = tracking.log_pytorch_model(
                result.model, final["input_example"], p.tracking.registered_model
            )
            tracking.update_run_file(
                model_uri=model_uri,
                model_version=model_version,
                registered_model=p.tracking.registered_model,
            )
        console.print(
            f"train: test balanced accuracy {result.test['balanced_accuracy']:.3f} "
            f"(accuracy {result.test['accuracy']:.3f}, chance {1 / len(result.classes):.3f}); "
            f"MLflow run {run.info.run_id}, {p.tracking.registered_model} v{model_version}"
        )


@app.command()
def calibrate(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Fit a calibrator on validation logits; report calibration and the referral rule."""
    from tasks import tracking
    from tasks.calibrate import calibrate as run_calibrate
    from tasks.calibrate import write_outputs
    from tasks.evaluate import load_predictions

    with stage("calibrate"):
        p = _params(params, set_)
        val = load_predictions(paths.PREDICTIONS / "val.npz")
        test = load_predictions(paths.PREDICTIONS / "test.npz")
        if list(val["classes"]) != list(test["classes"]):
            raise ConfigError("val and test predictions disagree on the classes; re-run train")
        c = p.calibrate
        result = run_calibrate(
            val["logits"],
            val["labels"],
            test["logits"],
            test["labels"],
            c.method,
            c.bins,
            c.target_accuracy,
        )
        metrics = write_outputs(result, paths.CALIBRATION)
        write_json(paths.METRICS / "calibrate.json", metrics)
        with tracking.resume_lineage_run():
            tracking.log_metrics(metrics)
            tracking.log_artifacts({"calibrate": paths.CALIBRATION})
        r = result.referral
        console.print(
            f"calibrate ({c.method}): test ECE {metrics['test_ece_before']:.3f} -> "
            f"{metrics['test_ece_after']:.3f}, NLL {metrics['test_nll_before']:.3f} -> "
            f"{metrics['test_nll_after']:.3f}; refer below confidence {r['threshold']:.3f} "
            f"({'reaches' if r['reachable'] else 'cannot reach'} {c.target_accuracy:.0%} "
            f"on validation; keeps {r['coverage']:.0%} of test cases)"
        )


@app.command()
def export(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Export the calibrated model to ONNX, prove parity, benchmark, register as candidate."""
    import json as _json

    from tasks import tracking
    from tasks.calibrate import calibrator_from_dict
    from tasks.export import (
        CalibratedClassifier,
        benchmark,
        check_parity,
        export_onnx,
        ort_session,
    )
    from tasks.models import load_bundle
    from tasks.prepare import open_split

    with stage("export"):
        p = _params(params, set_)
        model, meta = load_bundle(paths.BUNDLE)
        _image_only(meta, "export")
        calibrator = calibrator_from_dict(
            _json.loads((paths.CALIBRATION / "calibrator.json").read_text())
        )
        temperature = calibrator.temperature or 1.0
        if calibrator.method != "temperature":
            console.print(
                f"[yellow]export: calibrate.method={calibrator.method} cannot live in the graph; "
                "the ONNX model applies no calibration (T=1)[/]"
            )
        referral = _json.loads((paths.METRICS / "calibrate.json").read_text())
        run_info = _json.loads(tracking.RUN_FILE.read_text())
        export_onnx(
            model,
            meta,
            paths.ONNX_MODEL,
            p.export.opset,
            temperature,
            run_id=run_info["run_id"],
            data_version=meta.get("data_version"),
            referral_threshold=referral.get("referral_threshold"),
            resize=p.prepare.resize,
        )
        session, provider = ort_session(paths.ONNX_MODEL, p.export.provider)
        images = open_split(paths.PREPARED, "test").images  # normalised batch by batch
        wrapped = CalibratedClassifier(model, temperature).eval()
        parity = check_parity(
            session,
            wrapped,
            images,
            p.export.parity_tolerance,
            mean=meta["normalization"]["mean"],
            std=meta["normalization"]["std"],
        )
        device = "cuda" if provider.startswith("CUDA") else "cpu"
        speed = benchmark(
            session,
            wrapped,
            meta["input_size"],
            p.export.bench_batches,
            p.export.bench_repeats,
            device,
        )
        metrics = {
            "parity_max_abs_diff": float(parity["max_abs_diff"]),
            "parity_images": float(parity["n"]),
            **speed,
        }
        write_json(paths.METRICS / "export.json", {**metrics, "provider": provider})
        with tracking.resume_lineage_run():
            tracking.log_metrics(metrics)
            tracking.set_tags({"onnx_provider": provider})
            version = tracking.log_onnx_model(
                paths.ONNX_MODEL, f"{p.tracking.registered_model}-onnx", p.export.alias
            )
            pytorch_version = run_info.get("model_version")
            if pytorch_version:
                tracking.set_alias(p.tracking.registered_model, p.export.alias, pytorch_version)
        write_json(
            paths.ONNX_REGISTRATION,
            {
                "registered_model": f"{p.tracking.registered_model}-onnx",
                "version": version,
                "alias": p.export.alias,
                "provider": provider,
            },
        )
        console.print(
            f"export: {paths.ONNX_MODEL} on {provider}; parity max |dp| "
            f"{parity['max_abs_diff']:.2e} over {parity['n']} images; registered "
            f"{p.tracking.registered_model}-onnx v{version} @{p.export.alias}"
        )


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(..., help="image files and/or folders (recursive)"),
    model: str = typer.Option(
        str(paths.ONNX_MODEL), "--model", "-m", help="model.onnx, or models:/<name>@<alias>"
    ),
    out: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="CSV to write"),
    batch_size: int = typer.Option(32, help="images per onnxruntime call"),
    provider: str = typer.Option("auto", help="auto | cuda | cpu"),
) -> None:
    """Predict new images with the calibrated ONNX model; one CSV row per file."""
    from tasks import tracking
    from tasks.predict import collect_images, load_predictor, predict_files, write_csv

    with stage("predict"):
        files = collect_images(inputs)
        if not files:
            raise FileNotFoundError(f"no image files under {', '.join(map(str, inputs))}")
        uri = None
        if model.startswith(("models:/", "runs:/")):
            uri = tracking.configure()  # the registry resolves aliases through the global URI
        predictor = load_predictor(model, tracking_uri=uri, provider=provider)
        frame = predict_files(predictor, files, batch_size=batch_size)
        write_csv(frame, out)
        bad = int(frame["error"].notna().sum())
        referred = int(frame["refer"].fillna(False).astype(bool).sum())
        console.print(
            f"predict: {len(frame) - bad} images scored, {bad} unreadable, {referred} to refer "
            f"to a dermatologist -> {out}"
        )


@app.command()
def explain(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Batch explanations of test images: heatmaps, quality metrics, text, gallery."""
    import json as _json

    from tasks import tracking
    from tasks.calibrate import calibrator_from_dict
    from tasks.evaluate import load_predictions
    from tasks.explain import run_explain
    from tasks.io import atomic_dir
    from tasks.models import load_bundle
    from tasks.prepare import open_split
    from tasks.train import pick_device

    with stage("explain"):
        p = _params(params, set_)
        model, meta = load_bundle(paths.BUNDLE)
        _image_only(meta, "explain")
        calibrator = calibrator_from_dict(
            _json.loads((paths.CALIBRATION / "calibrator.json").read_text())
        )
        test = load_predictions(paths.PREDICTIONS / "test.npz")
        probabilities = calibrator.probabilities(test["logits"])
        split = open_split(paths.PREPARED, "test")
        device = pick_device(p.train.device)
        with atomic_dir(paths.EXPLAIN) as tmp:
            summary = run_explain(model, meta["arch"], split, probabilities, p.explain, tmp, device)
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


@app.command("explain-batch")
def explain_batch(
    inputs: list[Path] = typer.Argument(..., help="image files and/or folders"),
    model: str = typer.Option(str(paths.BUNDLE), "--model", "-m", help="bundle or models:/..."),
    methods: str | None = typer.Option(None, help="comma-separated methods"),
    layers: str | None = typer.Option(None, help="comma-separated layers: early,middle,deep"),
    out: Path = typer.Option(Path("reports/explain_batch"), "--out", "-o", help="output folder"),
    chunk_size: int | None = typer.Option(None, help="images per Prefect task"),
    temperature: float | None = typer.Option(None, help="calibration temperature override"),
    dask_address: str | None = typer.Option(None, help="Dask scheduler, tcp://host:8786"),
    local_dask: bool = typer.Option(False, help="run the chunks on a local Dask cluster"),
    params: Path = ParamsOpt,
) -> None:
    """Predict and explain new images: heatmaps, overlays, text, predictions.csv, MLflow run.

    Methods, layers and chunk size default to explain.methods, explain.layers and
    orchestration.chunk_size in the params file. Exits 1 naming the folder or model when
    there are no images or the model cannot be loaded.
    """
    from flows.explain_batch import ExplainBatchError, run_explain_batch  # Prefect: ~1 s

    def split(text: str | None) -> list[str] | None:
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    try:
        result = run_explain_batch(
            list(inputs), model, split(methods), split(layers), out, chunk_size, params,
            temperature, dask_address, local_dask,
        )  # fmt: skip
    except (ExplainBatchError, ConfigError, FileNotFoundError, ValueError) as err:
        console.print(f"[bold red]dermaflow explain-batch failed[/]\n{err}", highlight=False)
        raise typer.Exit(code=1) from None
    s = result.summary
    console.print(
        f"explain-batch: {s['images']} images explained, {s['errors']} unreadable, in "
        f"{s['seconds']} s -> {result.out_dir} (gallery.html); MLflow run {result.mlflow_run_id}"
    )


def explain_metrics(summary: dict) -> dict[str, float]:
    """Flat per-method means for MLflow and DVC (``<method>_<layer>_<metric>``)."""
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


@app.command()
def tune(
    params: Path = ParamsOpt,
    set_: list[str] = SetOpt,
    no_repro: bool = typer.Option(
        False, "--no-repro", help="skip `dvc repro prepare`; tune on data/prepared as it is"
    ),
) -> None:
    """Optuna search over tune.space: an MLflow child run per trial, the best as a preset.

    Running it again continues the study (mlruns/optuna.db). `dvc repro prepare` runs first.
    """
    from tasks import tune as tuning

    with stage("tune"):
        p = _params(params, set_)
        tuning.check_space(p.tune.space, params, set_)  # a bad key fails before DVC runs
        try:
            if not no_repro:
                console.print("tune: dvc repro prepare (the data stages)")
                tuning.repro_data(".")
            version = ""
            if paths.MANIFEST.exists():
                version = data_version([paths.MANIFEST, *sorted(paths.SPLITS.glob("*.parquet"))])
            result = tuning.run_tune(params, set_, paths.PREPARED, data_version=version)
        except tuning.TuneError as err:
            console.print(f"[bold red]dermaflow tune failed[/]\n{err}", highlight=False)
            raise typer.Exit(code=1) from None
        console.print(tuning.trials_table(result.trials, result.best_number))
        c = result.counts
        console.print(
            f"tune: best validation balanced accuracy {result.best_value:.4f} (trial "
            f"{result.best_number} of study {result.study_name}; this call: {c['COMPLETE']} "
            f"complete, {c['PRUNED']} pruned, {c['FAIL']} failed); report {result.report_dir}; "
            f"MLflow run {result.parent_run_id}\n"
            f"tune: best params -> {result.preset}; apply with `dermaflow preset {result.preset}`",
            highlight=False,
        )


@app.command()
def compare(
    models: str | None = typer.Option(
        None,
        "--models",
        "-m",
        help="comma-separated: compare.variants names, architectures, bundle files or "
        "models:/ URIs (default: every compare.variants entry)",
    ),
    set_: list[str] = SetOpt,
    no_repro: bool = typer.Option(False, "--no-repro", help="skip `dvc repro prepare`"),
    out: Path = typer.Option(Path("reports/compare"), "--out", "-o", help="report folder"),
    params: Path = ParamsOpt,
) -> None:
    """Train or load several models on one split; compare metrics, calibration, explanations."""
    from flows.compare import CompareError, results_table, run_compare  # Prefect: ~1 s

    entries = [m for m in models.split(",") if m.strip()] if models else None
    try:
        summary = run_compare(
            entries, set_ or None, params_path=str(params), out_dir=str(out), repro=not no_repro
        )
    except (CompareError, *_known_errors()) as err:
        console.print(f"[bold red]dermaflow compare failed[/]\n{err}", highlight=False)
        raise typer.Exit(code=1) from None
    console.print(results_table(summary))
    console.print(
        f"compare: report {out / 'report.html'}; MLflow parent run {summary['run_id']} "
        f"(experiment {summary['experiment']})"
    )


@app.command(
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
)
def bench(ctx: typer.Context) -> None:
    """Benchmarks (training, data path, explanations, inference, pipeline): python -m bench."""
    from bench.__main__ import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)))


@app.command()
def preset(
    preset_file: Path = typer.Argument(..., exists=True, help="a partial params file"),
    params: Path = ParamsOpt,
) -> None:
    """Merge a preset from configs/ into params.yaml (comments kept) for dvc repro to see."""
    from tasks.config import apply_preset

    with stage("preset"):
        changed = apply_preset(params, preset_file)
        console.print(f"{params}: {len(changed)} key(s) changed: {', '.join(changed) or '-'}")


@app.command()
def recipe(
    recipe_file: Path = typer.Argument(..., help="a recipe from configs/recipes/"),
    set_: list[str] = SetOpt,
    no_refresh: bool = typer.Option(False, "--no-refresh", help="skip dvc update / dvc pull"),
) -> None:
    """Run a reference study: write its preset into params.yaml, then its steps in order.

    Without the recipe's dataset on this machine it runs on the embedded synthetic default at
    the recipe's small size. --set overrides apply to every model the recipe trains.
    """
    from flows.pipeline import StageFailed
    from flows.recipe import RecipeError
    from flows.recipe import recipe as recipe_flow

    try:
        result = recipe_flow(str(recipe_file), overrides=set_ or None, refresh=not no_refresh)
    except (ConfigError, RecipeError) as err:
        console.print(f"[bold red]dermaflow recipe failed[/]\n{err}", highlight=False)
        raise typer.Exit(1) from None
    except StageFailed as err:
        console.print(f"[bold red]recipe stopped at stage {err.stage}[/]\n{err.output}")
        raise typer.Exit(1) from None
    plan = result["plan"]
    data = "embedded synthetic default (small)" if plan["embedded"] else "its dataset"
    console.print(
        f"\n[bold green]recipe {plan['name']} done[/] on {data}: {' -> '.join(plan['steps'])}"
    )
    if "compare" in plan["steps"]:
        console.print("  comparison       reports/compare/report.html")
    if "pipeline" in plan["steps"]:
        console.print(f"  gallery          {paths.EXPLAIN / 'gallery.html'}")
    console.print("  MLflow UI        make ui   (or: dermaflow ui) -> http://127.0.0.1:5000")


@app.command()
def run(
    set_: list[str] = SetOpt,
    no_refresh: bool = typer.Option(False, "--no-refresh", help="skip dvc update / dvc pull"),
) -> None:
    """Run the pipeline flow (every stage through DVC, then the promotion gate)."""
    from flows.pipeline import StageFailed, pipeline

    try:
        result = pipeline(overrides=set_ or None, refresh=not no_refresh)
    except StageFailed as err:
        console.print(f"[bold red]pipeline stopped at {err.stage}[/]\n{err.output}")
        raise typer.Exit(1) from None
    gate = result["gate"]
    ran = [s["stage"] for s in result["stages"] if s["ran"]]
    console.print(f"\n[bold green]done.[/] Stages run: {', '.join(ran) or 'none (all unchanged)'}")
    console.print(
        f"  promotion gate   {'promoted' if gate['promote'] else 'refused'}: {gate['reason']}"
    )
    console.print("Where to look:")
    console.print(f"  data report      {paths.VALIDATION_MD}, {paths.CONTACT_SHEET}")
    train_json = paths.METRICS / "train.json"
    if train_json.exists():
        test = json.loads(train_json.read_text())["test"]
        console.print(
            f"  test metrics     balanced accuracy {test['balanced_accuracy']:.3f}, "
            f"accuracy {test['accuracy']:.3f}, macro F1 {test['macro_f1']:.3f} ({train_json})"
        )
    console.print(f"  pictures         {paths.TRAIN_REPORTS}/*.png, {paths.CALIBRATION}/*.png")
    console.print(f"  gallery          {paths.EXPLAIN / 'gallery.html'}")
    console.print("  MLflow UI        make ui   (or: dermaflow ui) -> http://127.0.0.1:5000")


@app.command()
def schedule(
    cron: str = typer.Option("0 3 * * 1", help="cron schedule (default: Mondays 03:00)"),
    name: str = typer.Option("scheduled-retraining", help="deployment name"),
) -> None:
    """Serve the pipeline on a cron schedule (needs `prefect server start` and PREFECT_API_URL)."""
    from flows.pipeline import pipeline

    if not os.environ.get("PREFECT_API_URL"):
        console.print(
            "[bold red]dermaflow schedule needs a Prefect server[/]: run `prefect server start`, "
            "then export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
        raise typer.Exit(1)
    pipeline.serve(name=name, cron=cron)


@app.command()
def ui(
    port: int = typer.Option(5000, help="port on 127.0.0.1"),
    workers: int = typer.Option(1, help="server worker processes"),
) -> None:
    """Serve the MLflow UI over the project's store (mlruns/mlflow.db) on 127.0.0.1."""
    from tasks.tracking import tracking_uri

    uri = tracking_uri()
    console.print(f"MLflow UI on http://127.0.0.1:{port} over {uri}")
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    # One person browsing a local store needs no job runner or task-queue consumers.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    raise typer.Exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    app()
