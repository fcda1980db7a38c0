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


def _known_errors() -> tuple[type[Exception], ...]:
    from tasks.ingest import IngestError
    from tasks.models import WeightsUnavailableError
    from tasks.prepare import PrepareError
    from tasks.split import SplitError
    from tasks.train import TrainingError
    from tasks.validate import ValidationError

    return (
        ConfigError,
        IngestError,
        ValidationError,
        SplitError,
        PrepareError,
        TrainingError,
        WeightsUnavailableError,
        FileNotFoundError,
    )


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Run a stage body; a known error becomes a readable message and exit code 1."""
    try:
        yield
    except _known_errors() as err:
        console.print(f"[bold red]dermaflow {name} failed[/]\n{err}", highlight=False)
        raise typer.Exit(code=1) from None


def _params(path: Path, overrides: list[str] | None) -> Params:
    return load_params(path, overrides)


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
            p.dataset.root, p.dataset.layout, p.dataset.masks, workers=p.ingest.workers
        )
        write_parquet(paths.MANIFEST, manifest)
        summary = manifest_summary(manifest)
        write_json(paths.METRICS / "ingest.json", summary)
        console.print(f"ingest: {summary['images']} images, {summary['lesions']} lesions")


@app.command()
def validate(params: Path = ParamsOpt, set_: list[str] = SetOpt) -> None:
    """Check the manifest with great-expectations; exit 1 naming every offending row."""
    from tasks.report import contact_sheet, write_reports
    from tasks.validate import raise_for_errors, validate_manifest

    with stage("validate"):
        p = _params(params, set_)
        manifest = pd.read_parquet(paths.MANIFEST)
        report = validate_manifest(manifest, Path(p.dataset.root), p.validate)
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
def run(
    stage_name: str = typer.Argument(None, metavar="[STAGE]", help="run up to this stage only"),
) -> None:
    """Run the pipeline on the current params (dvc repro) and say where to look."""
    cmd = ["dvc", "repro"] + ([stage_name] if stage_name else [])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    code = subprocess.call(cmd, env=env)
    if code:
        raise typer.Exit(code)
    console.print("\n[bold green]done.[/] Where to look:")
    console.print(f"  data report      {paths.VALIDATION_MD}, {paths.CONTACT_SHEET}")
    console.print(f"  split report     {paths.METRICS / 'split.json'}")
    train_json = paths.METRICS / "train.json"
    if train_json.exists():
        test = json.loads(train_json.read_text())["test"]
        console.print(
            f"  test metrics     balanced accuracy {test['balanced_accuracy']:.3f}, "
            f"accuracy {test['accuracy']:.3f}, macro F1 {test['macro_f1']:.3f} ({train_json})"
        )
        console.print(f"  pictures         {paths.TRAIN_REPORTS}/*.png")
    console.print("  MLflow UI        make ui   (or: dermaflow ui) -> http://127.0.0.1:5000")


@app.command()
def ui(
    port: int = typer.Option(5000, help="port on 127.0.0.1"),
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
    ]
    raise typer.Exit(subprocess.call(cmd))


if __name__ == "__main__":
    app()
