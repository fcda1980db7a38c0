"""A private PostgreSQL server in a tmp dir, and an MLflow tracking server on it, for tests.

The team stores (MLflow's backend, Optuna's study, Prefect's API database) run on PostgreSQL.
The tests start a real server with the distribution's own ``initdb`` and ``pg_ctl``.

Written here rather than taken from pytest-postgresql: that plugin runs ``initdb`` as the
current user, and PostgreSQL refuses to run as root, which is how CI containers run the
suite. :func:`postgres_server` runs the server binaries as the ``postgres`` system account
(``runuser``) when the tests run as root, and as the current user otherwise.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
SUPERUSER = "dermaflow"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: ``$PG_BIN``, PATH, or Debian's layout.

    Debian installs the server binaries in ``/usr/lib/postgresql/<major>/bin``, off PATH; the
    newest major version there wins.
    """
    candidates = [os.environ.get("PG_BIN", "")]
    found = shutil.which("pg_ctl")
    candidates.append(str(Path(found).resolve().parent) if found else "")  # symlinks too
    majors = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(majors, key=lambda p: int(Path(p).parent.name), reverse=True)
    for folder in filter(None, candidates):
        if all((Path(folder) / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


@dataclass(frozen=True)
class PostgresServer:
    """A running server: host, port and a trust-authenticated superuser on 127.0.0.1."""

    host: str
    port: int
    user: str

    def url(self, database: str, driver: str = "psycopg") -> str:
        """A SQLAlchemy URL: ``postgresql+psycopg://`` (MLflow, Optuna), ``asyncpg`` (Prefect)."""
        return f"postgresql+{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        dsn = f"host={self.host} port={self.port} user={self.user} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def query(self, database: str, sql: str) -> list[tuple]:
        import psycopg

        dsn = f"host={self.host} port={self.port} user={self.user} dbname={database}"
        with psycopg.connect(dsn) as conn:
            return conn.execute(sql).fetchall()


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """initdb + pg_ctl start on a free localhost port in a fresh tmp dir; stop and remove it.

    Skips the calling test (with the reason) only when the PostgreSQL server binaries are
    absent. As root the binaries run as the ``postgres`` account, which then owns the tmp dir.
    """
    bindir = pg_bin_dir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql-15 or "
            "set PG_BIN to their folder"
        )
    prefix: list[str] = []
    owner = None
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")  # KeyError: root without the postgres account
        prefix = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="dermaflow-pg-"))
    data, log = root / "data", root / "server.log"
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    port = free_port()

    def pg(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [*prefix, *args],
            cwd=root,  # a folder the postgres account may enter
            capture_output=True,
            text=True,
            env={**os.environ, "LC_ALL": "C"},
        )
        if proc.returncode != 0:
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} exited {proc.returncode}: {proc.stderr}\n{tail}")
        return proc

    pg(
        str(bindir / "initdb"),
        "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync",
    )  # fmt: skip
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
    pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
    try:
        yield PostgresServer("127.0.0.1", port, SUPERUSER)
    finally:
        with contextlib.suppress(RuntimeError):
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it dies or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout_s} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path) -> Iterator[str]:
    """``mlflow server`` on ``backend_uri`` serving artifacts from ``artifacts``; yields its URL.

    The same command a team runs (README, "Running for a team"): one worker, no job runner.
    """
    port = free_port()
    cmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(log, "w") as out:
        # Its own process group: `mlflow server` runs uvicorn as a child, which must stop too.
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc, log)
        yield url
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the process group ``proc`` leads (started with ``start_new_session``), then
    SIGKILL it if it outlives ``grace_s``."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
