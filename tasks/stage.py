"""The entry every stage shares: ``python -m tasks.<stage>`` (dvc.yaml) and ``dermaflow <stage>``.

A stage module ``tasks/<stage>.py`` holds its pure functions and ``run(params) -> dict``, which
reads the stage's deps, calls those functions, writes its outs atomically and logs through
``tasks/tracking.py``. This module only turns a command line into that call and a known failure
into a readable message with exit code :data:`EXIT_BAD_INPUT`, so that callers (the Prefect
flow, a shell script) can tell bad input from a crash by the exit code alone:

- 0: the stage finished;
- 2 (:data:`EXIT_BAD_INPUT`): bad data, config or arguments; retrying cannot help;
- anything else (1 for an uncaught exception, negative for a signal): a crash.

dvc.yaml runs ``python -m tasks.<stage>`` rather than the ``dermaflow`` console script, so a
stage depends only on the modules it imports (listed as its deps and checked by a test), not on
the CLI and every other command in it.

Before the stage's ``run`` does any work, the entry:

- validates the whole params tree (:func:`tasks.config.load_params`), so a bad value of any
  stage stops the first stage of a ``dvc repro`` within seconds;
- removes what a killed earlier run of this stage left beside its outs (temp files and
  folders of dead processes, :func:`tasks.io.clean_stale_temps`), saying so;
- for the stages that extend the training's lineage (calibrate, export, explain, card),
  refuses when ``models/run.json`` and ``models/model.pt`` are not from one successful training;
- sets PIL's decompression-bomb limit to ``validate.max_pixels``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

from tasks import paths
from tasks.config import ConfigError, Params, load_params
from tasks.io import LineageError, clean_stale_temps, lineage_problem

EXIT_BAD_INPUT = 2

# Stage name -> the module that is its whole home; dvc.yaml's stages run exactly these.
STAGE_MODULES = {
    "synth": "tasks.synth",
    "ingest": "tasks.ingest",
    "validate": "tasks.validate",
    "split": "tasks.split",
    "prepare": "tasks.prepare",
    "train": "tasks.train",
    "calibrate": "tasks.calibrate",
    "ood": "tasks.ood",
    "conformal": "tasks.conformal",
    "export": "tasks.export",
    "evaluate": "tasks.evaluate",
    "subgroups": "tasks.subgroups",
    "explain": "tasks.explain",
    "card": "tasks.card",
}

# Errors that mean bad input or config. Named, not imported: a raised error's module is already
# loaded, and importing every stage (GX, ONNX, torch) only to classify an error costs seconds.
KNOWN_ERRORS = (
    ("tasks.card", "CardError"),
    ("tasks.evaluate", "EvaluateError"),
    ("tasks.conformal", "ConformalError"),
    ("tasks.distributed", "DistributedError"),
    ("tasks.export", "ParityError"),
    ("tasks.fusion", "MetadataPriorError"),
    ("tasks.ingest", "IngestError"),
    ("tasks.io", "LineageError"),
    ("tasks.io", "OutputPathError"),
    ("tasks.models", "WeightsUnavailableError"),
    ("tasks.ood", "OodError"),
    ("tasks.predict", "PredictError"),
    ("tasks.prepare", "PrepareError"),
    ("tasks.split", "SplitError"),
    ("tasks.subgroups", "SubgroupError"),
    ("tasks.train", "TrainingError"),
    ("tasks.tune", "TuneError"),
    ("tasks.validate", "ManifestError"),
    ("tasks.validate", "ValidationError"),
)
# Stages that append to the training's MLflow run and read its bundle or predictions.
LINEAGE_STAGES = (
    "calibrate",
    "ood",
    "conformal",
    "export",
    "evaluate",
    "subgroups",
    "explain",
    "card",
)
RUN_FILE = paths.MODELS / "run.json"  # tasks.tracking.RUN_FILE (not imported: MLflow is slow)

console = Console(stderr=True, soft_wrap=True)  # one-line messages stay one line


def known_errors() -> tuple[type[BaseException], ...]:
    """The ``KNOWN_ERRORS`` classes whose modules are loaded, for an ``except`` clause."""
    found: list[type[BaseException]] = [ConfigError, FileNotFoundError]
    for module, name in KNOWN_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


def is_known_error(err: BaseException) -> bool:
    """True for bad input or config (see ``KNOWN_ERRORS``), False for a bug."""
    return isinstance(err, known_errors())


def describe(err: BaseException) -> str:
    """The error's message; a bare missing-file error becomes ``<file>: not found; ...``.

    The OS and pyarrow raise FileNotFoundError with only ``[Errno 2] ...: 'path'`` or the
    path itself; the reader is told which file and what writes it.
    """
    text = str(err)
    if isinstance(err, FileNotFoundError):
        name = err.filename or (text if text and " " not in text else None)
        if name:
            return f"{name}: not found; run the stage that writes it first (dvc repro)"
    return text


def report_failure(name: str, err: BaseException) -> int:
    """Print ``dermaflow <name> failed`` and the error's message; return the bad-input code.

    The message is printed as text, never as Rich markup: ``[error] min_images: ...`` must
    keep its ``[error]``.
    """
    console.print(f"[bold red]dermaflow {name} failed[/]\n{escape(describe(err))}", highlight=False)
    return EXIT_BAD_INPUT


def run_entry(
    name: str,
    params_path: str | Path = "params.yaml",
    overrides: Sequence[str] | None = None,
    run: Callable[[Params], dict[str, Any]] | None = None,
) -> int:
    """Load the params and call the stage's ``run``; a known error becomes a message and a code.

    Args:
        name: the stage name (a key of :data:`STAGE_MODULES`).
        params_path: the params file.
        overrides: ``key=value`` overrides for this call only.
        run: the stage's entry; imported from :data:`STAGE_MODULES` when None.

    Returns:
        0 on success, :data:`EXIT_BAD_INPUT` for bad input. Bugs propagate as exceptions.
    """
    try:
        params = load_params(params_path, list(overrides or []))
        prepare_stage(name, params)
        if run is None:
            run = importlib.import_module(STAGE_MODULES[name]).run
        run(params)
    except Exception as err:
        if not is_known_error(err):
            raise
        return report_failure(name, err)
    return 0


def stage_outs(name: str, dvc_file: str | Path = "dvc.yaml") -> list[Path]:
    """The outs, metrics and plots dvc.yaml declares for ``name`` (none without dvc.yaml)."""
    dvc_file = Path(dvc_file)
    try:
        stage = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}).get(name) or {}
    except (OSError, yaml.YAMLError):
        return []
    found: list[Path] = []
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind) or []:
            for path in entry if isinstance(entry, dict) else [entry]:
                if isinstance(path, str) and "${" not in path:
                    found.append(Path(path))
    return found


def prepare_stage(name: str, params: Params) -> None:
    """What every stage does before its own work (see the module docstring).

    Raises:
        LineageError: a lineage stage found run.json and the bundle from different trainings.
    """
    extra = [paths.CHECKPOINT] if name == "train" else []  # written every epoch, not an out
    removed = clean_stale_temps([*stage_outs(name), *extra])
    if removed:
        shown = ", ".join(str(p) for p in removed[:5]) + (" ..." if len(removed) > 5 else "")
        console.print(
            f"{name}: removed {len(removed)} leftover(s) of an interrupted earlier run: {shown}",
            highlight=False,
        )
    if name in LINEAGE_STAGES:
        problem = lineage_problem(RUN_FILE, paths.BUNDLE)
        if problem:
            raise LineageError(f"{name} refuses to run: {problem}")
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = params.validate.max_pixels


def fail_fast(orig_argv: list[str]) -> None:
    """``python -m tasks.<stage> ...``: exit 2 on bad params before the stage module loads.

    Called from ``tasks/__init__.py`` while Python locates the stage module, that is before
    its imports (seconds for torch or great-expectations). Anything but a params problem is
    left to :func:`run_entry`, which validates again and reports it.
    """
    if "-m" not in orig_argv[:-1]:
        return
    at = orig_argv.index("-m")
    stages = {module: stage for stage, module in STAGE_MODULES.items()}
    name = stages.get(orig_argv[at + 1])
    if name is None or {"-h", "--help"} & set(orig_argv[at + 2 :]):
        return
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", "-p", default="params.yaml")
    parser.add_argument("--set", "-S", action="append", dest="overrides")
    args, _ = parser.parse_known_args(orig_argv[at + 2 :])
    try:
        load_params(args.params, list(args.overrides or []))
    except ConfigError as err:
        raise SystemExit(report_failure(name, err)) from None


def main(name: str, argv: list[str] | None = None) -> int:
    """``python -m tasks.<name> [--params FILE] [--set key=value ...]``.

    The stage is imported by its package name, not used as ``__main__``: under ``python -m`` the
    module runs twice (as ``__main__`` and as ``tasks.<name>``), and only the package copy's
    error classes are the ones :func:`is_known_error` and other modules see.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m {STAGE_MODULES[name]}", description=f"the {name} stage of dermaflow"
    )
    parser.add_argument("--params", "-p", default="params.yaml", help="params file to read")
    parser.add_argument(
        "--set", "-S", action="append", dest="overrides", help="override a param: key=value"
    )
    args = parser.parse_args(argv)
    return run_entry(name, args.params, args.overrides)
