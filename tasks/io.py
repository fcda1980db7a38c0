"""Atomic outputs: every stage writes to a temp path beside the target and renames.

A crash or kill therefore leaves either the previous output or none, never half of one, so DVC
never hashes a truncated file and a rerun starts clean. Temp names carry the writer's process
id (``.<name>.<pid>.<random>.tmp``), so that a later stage start can tell the leftovers of a
killed writer (:func:`clean_stale_temps`) from the temp files of one still running.

Outputs get the permissions of any other file the user creates (the umask), not the 0600/0700
of ``mkstemp``/``mkdtemp``: ``data/prepared`` and ``data/splits`` are shared folders.

Also here, because every entry needs them before any work: checks that an output path can be
written (:func:`check_output_file`, :func:`check_output_dir`) and the lineage check between
``models/run.json`` and the bundle it describes (:func:`lineage_problem`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.)?[^.]*\.tmp$")
_OLD = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")


class OutputPathError(ValueError):
    """An output path that cannot be written (a folder where a file goes, a read-only place)."""


class LineageError(RuntimeError):
    """``models/run.json`` and the files it describes are not from one successful training."""


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp file path in the target's folder; rename it onto ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are shared files
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``target``; swap it in for ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    )
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs are shared folders
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _stale(entry: Path, name: str | None = None) -> bool:
    """A temp or swapped-out folder of ``name`` whose writer is gone (no pid: an old format)."""
    match = _TEMP.match(entry.name) or _OLD.match(entry.name)
    if match is None or (name is not None and match["name"] != name):
        return False
    pid = match["pid"]
    return pid is None or not _alive(int(pid))


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def clean_stale_temps(targets: Iterable[str | Path]) -> list[Path]:
    """Remove what killed writers of ``targets`` left behind; return what was removed.

    For each target: ``.<name>.<pid>.*.tmp`` and ``.<name>.old-<pid>`` beside it whose process
    is gone, and, inside a target folder, any such temp file of a dead writer. Temp files of a
    live process (another stage running now) are kept.
    """
    removed: list[Path] = []
    for target in map(Path, targets):
        parent = target.parent
        if parent.is_dir():
            for entry in parent.iterdir():
                if entry.name.startswith(f".{target.name}.") and _stale(entry, target.name):
                    _remove(entry)
                    removed.append(entry)
        if target.is_dir() and not target.is_symlink():
            for dirpath, dirnames, filenames in os.walk(target):
                for name in [*filenames, *dirnames]:
                    entry = Path(dirpath) / name
                    if name.startswith(".") and _stale(entry):
                        _remove(entry)
                        removed.append(entry)
    return removed


def _writable_ancestor(path: Path) -> Path:
    """The nearest existing folder above (or at) ``path``, which must hold the new entries."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    return probe


def check_output_file(path: str | Path, what: str = "output") -> Path:
    """Refuse, before any work, an output file path that the final rename could not write.

    Raises:
        OutputPathError: ``path`` is a folder, sits below a file, or in a read-only folder.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(
            f"{path}: is a folder; the {what} needs a file name (e.g. {path / 'predictions.csv'})"
        )
    holder = _writable_ancestor(path.parent)
    if not holder.is_dir():
        raise OutputPathError(f"{path}: {holder} is a file, not a folder; choose another {what}")
    if not os.access(holder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{path}: cannot write into {holder} (permission denied)")
    return path


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Refuse, before any work, an output folder path that is a file or cannot be created.

    Raises:
        OutputPathError: ``path`` is an existing file, sits below a file, or is read-only.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path}: is a file; the {what} must be a folder")
    holder = _writable_ancestor(path.parent)
    if not holder.is_dir():
        raise OutputPathError(f"{path}: {holder} is a file, not a folder; choose another {what}")
    if not os.access(holder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{path}: cannot write into {holder} (permission denied)")
    return path


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (bundles reach hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lineage_problem(run_file: str | Path, bundle: str | Path) -> str | None:
    """Why ``run_file`` and ``bundle`` are not one training's outputs, or None.

    Train writes ``models/run.json`` (with the bundle's sha256) only after it succeeded, so a
    bundle whose hash differs was written by a training that failed or was killed later, and
    the run named in the file is not the one that made the weights. A run file without a
    hash (written before hashes were recorded) cannot be checked and passes.
    """
    run_file, bundle = Path(run_file), Path(bundle)
    if not run_file.is_file():
        return f"{run_file}: missing; run the train stage first"
    try:
        info = json.loads(run_file.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"{run_file}: not valid JSON; re-run the train stage"
    if not isinstance(info, dict) or "run_id" not in info:
        return f"{run_file}: has no run_id; re-run the train stage"
    if bundle.is_file() and not zipfile.is_zipfile(bundle):
        return (
            f"{bundle}: corrupt or truncated (not a PyTorch archive); re-run the train stage "
            "(dvc repro train)"
        )
    expected = info.get("bundle_sha256")
    if expected is None or not bundle.is_file():
        return None
    if file_digest(bundle) != expected:
        return (
            f"{bundle} and {run_file} come from different trainings: {run_file} names MLflow "
            f"run {info['run_id']}, whose bundle had sha256 {expected[:12]}, but {bundle} has "
            "another (a later training failed or was killed after writing it). Re-run the "
            "train stage (dvc repro train) so that both describe one run"
        )
    return None


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(path: str | Path, frame: Any) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
