"""The ``dermaflow`` command: the outer edge, which only dispatches.

``dermaflow <stage>`` runs ``tasks/<stage>.py:run`` through :mod:`tasks.stage`, exactly as
``python -m tasks.<stage>`` (the command in dvc.yaml) does. The other commands hand over to a
flow or a ``tasks`` function. Bad input or config always ends in a one-paragraph message and
exit code 2 (:data:`tasks.stage.EXIT_BAD_INPUT`), never a stack trace.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from tasks import paths
from tasks.config import ConfigError, load_params
from tasks.stage import EXIT_BAD_INPUT, known_errors, report_failure

app = typer.Typer(
    help="dermaflow: trustworthy skin-lesion classifiers, from raw images to explained models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file to read")
SetOpt = typer.Option(None, "--set", "-S", help="override a param for this call: key=value")


def _dispatch(name: str, params: Path, overrides: list[str] | None) -> None:
    """Run stage ``name`` through its one home, ``tasks/<name>.py:run``; exit with its code."""
    from tasks.stage import run_entry

    code = run_entry(name, params, overrides)
    if code:
        raise typer.Exit(code)


@app.command()
def synth(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Generate the embedded synthetic dermoscopy set (ISIC 2019 layout, with masks)."""
    _dispatch("synth", params, set_)


@app.command()
def ingest(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Read the dataset root through its adapter into data/manifest.parquet."""
    _dispatch("ingest", params, set_)


@app.command()
def validate(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Check the manifest with great-expectations; exit 2 naming every offending row."""
    _dispatch("validate", params, set_)


@app.command()
def split(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Stratified, lesion-grouped, leak-free train/val/test split."""
    _dispatch("split", params, set_)


@app.command()
def prepare(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Decode every image once into the memory-mapped cache (data/prepared)."""
    _dispatch("prepare", params, set_)


@app.command()
def train(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Train on the prepared cache, evaluate, and record the lineage run in MLflow."""
    _dispatch("train", params, set_)


@app.command()
def calibrate(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Fit a calibrator on validation logits; report calibration and the referral rule."""
    _dispatch("calibrate", params, set_)


@app.command()
def ood(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Fit the out-of-distribution guard on validation; its detection AUROC on other sets."""
    _dispatch("ood", params, set_)


@app.command()
def conformal(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Fit split-conformal prediction sets; coverage and set size on test."""
    _dispatch("conformal", params, set_)


@app.command()
def export(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Export the calibrated model to ONNX, prove parity, benchmark, register as candidate."""
    _dispatch("export", params, set_)


@app.command()
def explain(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Batch explanations of test images: heatmaps, quality metrics, text, gallery."""
    _dispatch("explain", params, set_)


@app.command()
def card(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """The model card of the registered version: reports/card/model_card.{md,html} + registry."""
    _dispatch("card", params, set_)


@contextlib.contextmanager
def command(name: str) -> Iterator[None]:
    """Run a non-stage command body; a known error becomes a message and the bad-input code."""
    from tasks.stage import is_known_error, report_failure

    try:
        yield
    except Exception as err:
        if not is_known_error(err):
            raise
        raise typer.Exit(report_failure(name, err)) from None


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(..., help="image files and/or folders (recursive)"),
    model: str = typer.Option(
        str(paths.ONNX_MODEL), "--model", "-m", help="model.onnx, or models:/<name>@<alias>"
    ),
    out: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="CSV to write"),
    batch_size: int = typer.Option(32, help="images per onnxruntime call"),
    provider: str = typer.Option("auto", help="auto | cuda | cpu"),
    metadata: Path | None = typer.Option(
        None,
        "--metadata",
        help="CSV of image_id, age, sex, site (HAM10000 / ISIC metadata files work as they are) "
        "for a model trained with model.metadata_prior",
    ),
) -> None:
    """Predict new images with the calibrated ONNX model; one CSV row per file.

    Every file named or found in a folder gets one row (an error row when it does not decode);
    segmentation masks and hidden files are skipped and counted (tasks.predict.scan_inputs).
    """
    from tasks.predict import run_predict

    with command("predict"):
        result = run_predict(
            inputs, model, out, batch_size=batch_size, provider=provider, metadata=metadata
        )
        console.print(result.summary(), highlight=False)


@app.command("evaluate")
def evaluate(
    root: Path | None = typer.Argument(
        None, help="labelled set (any layout ingest reads); none: the evaluate stage's sets"
    ),
    model: str = typer.Option(
        str(paths.BUNDLE),
        "--model",
        "-m",
        help="model.pt bundle, model.onnx or models:/<name>@<alias>",
    ),
    name: str | None = typer.Option(None, help="the set's name (default: the root's folder name)"),
    layout: str = typer.Option("auto", help="auto | isic2019 | isic2018 | ham10000 | ph2 | folder"),
    label_map: str | None = typer.Option(
        None, help="set label -> model class, e.g. common_nevus=NV,atypical_nevus=NV,melanoma=MEL"
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="report folder (reports/external/<name>)"
    ),
    log: bool = typer.Option(True, help="log the evaluation to the model's MLflow run"),
    params: Path = ParamsOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Score a model on a labelled set it never saw: balanced accuracy (CI), recall, AUROC, ECE,
    referral share and melanoma sensitivity/specificity (tasks/evaluate.py).

    Without ROOT it runs the evaluate stage on every set of evaluate.external.
    """
    if root is None:
        _dispatch("evaluate", params, set_)
        return
    from tasks.evaluate import run_cli

    with command("evaluate"):
        run_cli(
            root, model, load_params(params, set_ or []), name=name, layout=layout,
            label_map=label_map, out=out, log=log,
        )  # fmt: skip


@app.command()
def subgroups(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Metrics per sex, age band, site and skin tone (ITA) on test and the external sets."""
    _dispatch("subgroups", params, set_)


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
    metadata: Path | None = typer.Option(
        None, "--metadata", help="CSV of image_id, age, sex, site, as for predict"
    ),
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
            temperature, dask_address, local_dask, metadata,
        )  # fmt: skip
    except (ExplainBatchError, ConfigError, FileNotFoundError, ValueError) as err:
        raise typer.Exit(report_failure("explain-batch", err)) from None
    s = result.summary
    console.print(
        f"explain-batch: {s['images']} images explained, {s['errors']} unreadable, in "
        f"{s['seconds']} s -> {result.out_dir} (gallery.html); MLflow run {result.mlflow_run_id}"
    )


@app.command()
def tune(
    params: Path = ParamsOpt,
    set_: list[str] = SetOpt,
    no_repro: bool = typer.Option(
        False, "--no-repro", help="skip `dvc repro prepare`; tune on data/prepared as it is"
    ),
    worker: bool = typer.Option(
        False, "--worker", help="join the study a running `dermaflow tune` opened; run trials"
    ),
    wait: float = typer.Option(
        0.0, "--wait", help="with --worker: seconds to wait for that `dermaflow tune` to start"
    ),
) -> None:
    """Optuna search over tune.space: an MLflow child run per trial, the best as a preset.

    Running it again continues the study (mlruns/optuna.db, or tune.storage). `dvc repro
    prepare` runs first. With tune.storage on a database server, `dermaflow tune --worker`
    on other machines or processes joins the running call's study: Optuna hands out its trials.
    """
    from flows.tune import run_tune, run_worker
    from tasks import tune as tuning
    from tasks.split import data_version

    with command("tune"):
        p = load_params(params, set_)
        tuning.check_space(p.tune.space, params, set_)  # a bad key fails before DVC runs
        try:
            if not no_repro:
                console.print("tune: dvc repro prepare (the data stages)")
                from flows.stages import StageFailed, reproduce

                try:
                    reproduce(".", "prepare", single_item=False)
                except StageFailed as err:
                    raise tuning.TuneError(
                        "`dvc repro prepare` failed, so the data stages are not current (fix "
                        f"them, or pass --no-repro to tune on data/prepared as it is): {err}"
                    ) from None
            version = ""
            if paths.MANIFEST.exists():
                version = data_version()
            if worker:
                done = run_worker(params, set_, paths.PREPARED, data_version=version, wait_s=wait)
            else:
                result = run_tune(params, set_, paths.PREPARED, data_version=version)
        except tuning.TuneError as err:
            raise typer.Exit(report_failure("tune", err)) from None
        if worker:
            c = done.counts
            console.print(
                f"tune worker: ran trials {done.trial_numbers or 'none'} of study "
                f"{done.study_name} ({c['COMPLETE']} complete, {c['PRUNED']} pruned, "
                f"{c['FAIL']} failed); MLflow parent run {done.parent_run_id}",
                highlight=False,
            )
            return
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
    except (CompareError, *known_errors()) as err:
        raise typer.Exit(report_failure("compare", err)) from None
    console.print(results_table(summary))
    for row in summary.get("seeds") or []:
        console.print(
            f"  {row['variant']} over {row['seeds']} seeds: balanced accuracy "
            f"{row['balanced_accuracy_mean']:.3f} +- {row['balanced_accuracy_sd']:.3f} "
            f"({row['balanced_accuracy_min']:.3f} to {row['balanced_accuracy_max']:.3f}); "
            f"their ensemble {row['ensemble_balanced_accuracy']:.3f} "
            f"[{row['ensemble_ci_low']:.3f}, {row['ensemble_ci_high']:.3f}]",
            soft_wrap=True,
        )
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

    with command("preset"):
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
    from flows.recipe import RecipeError, plan_recipe
    from flows.recipe import recipe as recipe_flow

    with command("recipe"):  # a bad recipe or --set stops here, before the flow starts
        plan_recipe(recipe_file, ".", set_ or None)
    try:
        result = recipe_flow(str(recipe_file), overrides=set_ or None, refresh=not no_refresh)
    except (ConfigError, RecipeError) as err:
        raise typer.Exit(report_failure("recipe", err)) from None
    except StageFailed as err:
        console.print(f"[bold red]recipe stopped at stage {err.stage}[/]\n{escape(err.output)}")
        raise typer.Exit(EXIT_BAD_INPUT if err.bad_input else 1) from None
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

    with command("run"):  # bad params or --set values stop here, before the flow starts
        load_params(Path("params.yaml"), set_ or [])
    try:
        result = pipeline(overrides=set_ or None, refresh=not no_refresh)
    except StageFailed as err:
        console.print(f"[bold red]pipeline stopped at {err.stage}[/]\n{escape(err.output)}")
        raise typer.Exit(EXIT_BAD_INPUT if err.bad_input else 1) from None
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
    if result.get("card"):  # the local card; the registry's copy carries the gate's decision
        where = result["card"]
        console.print(
            f"  model card       {where['card']} (with the decision: {where['registry_url']})"
        )
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
