"""DVC as the flows see it: the stage list from dvc.yaml and one way to reproduce a stage.

Every flow (pipeline, compare, tune, recipe) and the pipeline benchmark run stages through
:func:`reproduce`, which calls DVC's own ``Repo.reproduce`` in-process instead of parsing what
``dvc repro`` prints:

- which stages ran is DVC's return value (an unchanged stage is not in it);
- why a stage failed is its command's exit status, carried on DVC's ``StageCmdFailedError``:
  :data:`tasks.stage.EXIT_BAD_INPUT` means bad data or config (never worth a retry), anything
  else a crash.

The stage commands' own output goes straight to this process's stdout and stderr, so a long
training shows its epochs live. A failed stage has already said why on that stream; Prefect's
engine would add an 80-line traceback of its own frames (:func:`_without_engine_traceback`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import yaml

from tasks.stage import EXIT_BAD_INPUT


class StageFailed(RuntimeError):
    """A stage's command failed; ``bad_input`` when it rejected its data or config."""

    def __init__(self, stage: str, output: str, status: int | None) -> None:
        super().__init__(f"stage {stage} failed: {output}")
        self.stage, self.output, self.status = stage, output, status
        self.bad_input = status == EXIT_BAD_INPUT


def _without_engine_traceback(record: logging.LogRecord) -> bool:
    """Keep a :class:`StageFailed` log line, drop the traceback attached to it.

    Prefect's flow engine logs every exception that leaves a flow with ``logger.exception``.
    For a failed stage that traceback is the engine's own frames down to :func:`reproduce`,
    while the cause (a validation rule, a config error, or the stage's own traceback for a
    crash) is in the stage's output just above it and in ``StageFailed.output``. Installed as
    a filter on Prefect's run loggers; every other exception keeps its traceback.
    """
    if record.exc_info and isinstance(record.exc_info[1], StageFailed):
        record.exc_info, record.exc_text = None, None
    return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    if _without_engine_traceback not in logging.getLogger(_name).filters:
        logging.getLogger(_name).addFilter(_without_engine_traceback)


def _venv_first_on_path() -> None:
    """Stage commands are ``python -m tasks.<stage>``: make ``python`` this interpreter."""
    bin_dir = str(Path(sys.executable).parent)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *parts])


def pipeline_stages(repo: str | Path = ".") -> list[str]:
    """The stages dvc.yaml defines, in an order that runs every stage after its deps.

    DVC builds the graph from the stages' deps and outs; among stages that do not depend on
    each other, dvc.yaml's own order decides. A stage added to dvc.yaml alone is therefore
    run by the flows as well.

    Raises:
        StageFailed: DVC cannot build the pipeline (say, dvc.lock is git-ignored), with its
            message and the fix, before any stage runs.
    """
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    defined = list(yaml.safe_load((Path(repo) / "dvc.yaml").read_text())["stages"])
    _dvc_logs_to_current_streams()
    with Repo(str(repo)) as dvc:
        try:
            graph = dvc.index.graph.reverse()  # DVC's edges point from a stage to its deps
        except DvcException as err:  # e.g. dvc.lock git-ignored: DVC will not read it
            hint = (
                "; DVC must track dvc.lock: remove the line that ignores it "
                "(`git check-ignore -v dvc.lock` names the file and line)"
                if "is git-ignored" in str(err)
                else ""
            )
            raise StageFailed(
                "dvc.yaml", f"DVC cannot read the pipeline: {err}{hint}", None
            ) from None
        names = {node: getattr(node, "name", None) for node in graph.nodes}
        pipeline = graph.subgraph([n for n, name in names.items() if name in defined])
        order = nx.lexicographical_topological_sort(
            pipeline, key=lambda node: defined.index(names[node])
        )
        return [names[node] for node in order]


def reproduce(repo: str | Path, target: str, single_item: bool = True) -> list[str]:
    """``dvc repro [--single-item] <target>`` in-process; the names of the stages that ran.

    Args:
        repo: the project folder (a git + DVC repo).
        target: a stage name.
        single_item: run only ``target`` (its deps must be current); False also brings every
            upstream stage up to date, as plain ``dvc repro <target>`` does.

    Raises:
        StageFailed: a stage's command failed (``bad_input`` tells bad data from a crash), or
            DVC refused (e.g. a missing dep), with DVC's message.
    """
    from dvc.exceptions import DvcException, ReproductionError
    from dvc.repo import Repo
    from dvc.stage.exceptions import StageCmdFailedError

    _venv_first_on_path()
    _dvc_logs_to_current_streams()
    # DVC's in-process API resolves some paths against the working directory (an out would
    # otherwise look "external" to the repo): run it from the repo, as `dvc repro` would be.
    with contextlib.chdir(repo), Repo(".") as dvc:
        try:
            ran = dvc.reproduce(target, single_item=single_item)
        except ReproductionError as err:
            cause = err.__cause__
            status = None
            if isinstance(cause, StageCmdFailedError):
                status = _exit_status(cause)
            failed = str(err).rsplit(" ", 1)[-1].strip("'")
            raise StageFailed(failed, f"{err}: {cause}", status) from None
        except DvcException as err:
            raise StageFailed(target, str(err), None) from None
    return [stage.name for stage in ran if hasattr(stage, "name")]


def _dvc_logs_to_current_streams() -> None:
    """Point DVC's console log handlers at the current ``sys.stdout`` / ``sys.stderr``.

    ``import dvc`` installs them once, bound to the streams of that moment. When those streams
    are later replaced and closed (a Prefect or pytest capture that ended, a notebook cell's
    redirect), DVC's handler turns the failed write of its "Running stage" line into an
    exception, and the stage fails before its command starts. Re-pointing them each time the
    flows open the DVC repo keeps DVC's lines where this process prints now; warnings and
    errors go to stderr, as DVC sets them up.
    """
    for handler in dvc_console_handlers():
        stream = sys.stderr if handler.level >= logging.WARNING else sys.stdout
        # Assigned under the handler's lock, not with ``setStream``: that flushes the old
        # stream first, and a closed file raises on flush.
        handler.acquire()
        try:
            handler.stream = stream
        finally:
            handler.release()


def dvc_console_handlers() -> list[logging.StreamHandler]:
    """The console handlers ``import dvc`` installs on its loggers (``dvc.logger.setup``)."""
    from dvc.logger import LoggerHandler

    return [
        handler
        for name in ("dvc", "dvc_objects", "dvc_data")
        for handler in logging.getLogger(name).handlers
        if isinstance(handler, LoggerHandler)
    ]


def _exit_status(err: Exception) -> int | None:
    """The command's exit status from DVC's ``failed to run: <cmd>, exited with <status>``."""
    tail = str(err).rsplit("exited with", 1)
    try:
        return int(tail[1]) if len(tail) == 2 else None
    except ValueError:
        return None
