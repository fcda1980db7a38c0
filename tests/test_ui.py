"""``dermaflow ui`` end to end: a real run in the project's store, served and rendered.

The test logs a run the way the pipeline does (``tasks.tracking``: lineage run, metrics with
steps, a heatmap PNG under ``explain/overlays/``) into a scratch project folder, starts
``dermaflow ui --port <free port>`` there as a user would, and checks what the user sees:

* the UI server's REST API returns the run, its metric and the artifact listing, and its
  ``/get-artifact`` route returns the heatmap's exact bytes;
* headless Chromium renders the run page (metric name, value and run name in the DOM) and the
  artifact view of the heatmap (file name, and the picture loaded as an ``<img>``), and a
  screenshot of the run page is not blank.

The screenshot is kept: ``$DERMAFLOW_TEST_OUTPUT/ui_run_page.png`` when that variable names a
folder, else ``ui_run_page.png`` in pytest's base temp folder (printed, and recorded as the
test's ``ui_screenshot`` property). Chromium comes from Debian's package, installed on first
use (see ``tests/browser.py``); ``DERMAFLOW_SKIP_BROWSER=1`` skips the browser half.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests import browser
from tests.helpers import env

EXPERIMENT = "uitest"
RUN_NAME = "ui-run"
METRIC = "test_balanced_accuracy"
METRIC_VALUE = 0.8123
OVERLAYS = "explain/overlays"
HEATMAP = "gradcam_deep_ISIC_0000001.png"
STARTUP_TIMEOUT_S = 90.0  # 2 shared cores: mlflow starts ~12 processes
SCREENSHOT_NAME = "ui_run_page.png"


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _heatmap_png(path: Path, size: int = 128) -> Path:
    """A small real heatmap: a Gaussian blob through matplotlib's jet colour map.

    Args:
        path: Where the PNG goes.
        size: Side in pixels.

    Returns:
        ``path``.
    """
    from matplotlib import colormaps

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    heat = np.exp(-((xx - 0.62 * size) ** 2 + (yy - 0.38 * size) ** 2) / (2 * (0.12 * size) ** 2))
    rgb = (colormaps["jet"](heat)[..., :3] * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def _log_run(repo: Path, heatmap: Path) -> dict[str, Any]:
    """Log the run as the pipeline does and return ``models/run.json`` of ``repo``.

    Args:
        repo: The scratch project folder (its ``mlruns/`` holds the store).
        heatmap: The PNG to log under ``explain/overlays/``.

    Returns:
        The run file: ``run_id``, ``experiment_id``, ``experiment``, ``tracking_uri``.
    """
    from tasks import tracking

    tags = {"dataset": "synthetic", "stage": "ui-test"}
    with tracking.lineage_run(EXPERIMENT, RUN_NAME, tags, repo=repo):
        curve = [0.61, 0.74, METRIC_VALUE]
        for step, value in enumerate(curve):
            tracking.log_metrics({METRIC: value, "val_loss": 1.2 - 0.3 * step}, step=step)
        tracking.log_artifacts({OVERLAYS: heatmap})
    return json.loads((repo / "models" / "run.json").read_text())


def _get(url: str, timeout: float = 10.0) -> bytes:
    """The body of a GET on the UI server; an HTTP error fails the test with its body."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        pytest.fail(f"GET {url} answered {err.code}: {err.read()[:2000]!r}")


def _get_json(url: str) -> dict[str, Any]:
    """The JSON body of a GET on the UI server."""
    return json.loads(_get(url))


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """End ``dermaflow ui`` and everything it started (mlflow, uvicorn workers, job runners).

    The UI runs in its own session, so its process group holds exactly its descendants:
    SIGTERM to the group, then SIGKILL to whatever is still there after ``grace_s``.
    """
    pgid = proc.pid  # start_new_session=True: the group id is the leader's pid
    with contextlib.suppress(ProcessLookupError):  # the group may be gone
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        proc.poll()
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):  # the group may be gone
            os.killpg(pgid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _wait_until_up(base: str, proc: subprocess.Popen, log: Path) -> float:
    """Poll ``/health`` until it answers OK; fail early if the UI process exits.

    Returns:
        Seconds it took.
    """
    start = time.monotonic()
    while time.monotonic() - start < STARTUP_TIMEOUT_S:
        if proc.poll() is not None:
            pytest.fail(f"dermaflow ui exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(
        f"dermaflow ui did not answer {base}/health within {STARTUP_TIMEOUT_S:.0f} s:\n"
        f"{log.read_text()[-4000:]}"
    )


@pytest.fixture(scope="module")
def chromium() -> Path | None:
    """Debian's Chromium, installed when missing; None when ``DERMAFLOW_SKIP_BROWSER=1``.

    Installation failures raise (the test fails): a missing browser is not a reason to skip.
    """
    if browser.browser_skipped():
        return None
    path = browser.ensure_chromium()
    if browser.last_install_seconds:
        print(f"installed chromium in {browser.last_install_seconds:.1f} s")
    return path


@pytest.fixture
def ui_server(tmp_path: Path) -> Iterator[Callable[[], str]]:
    """A factory that starts ``dermaflow ui`` in ``tmp_path`` and returns its base URL.

    Whatever was started is stopped at teardown, test failure or not.
    """
    started: list[subprocess.Popen] = []
    logs: list[Any] = []

    def start() -> str:
        port = _free_port()
        log_path = tmp_path / "ui.log"
        log = log_path.open("w")
        logs.append(log)
        proc = subprocess.Popen(
            ["dermaflow", "ui", "--port", str(port)],
            cwd=tmp_path,
            env=env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        started.append(proc)
        base = f"http://127.0.0.1:{port}"
        took = _wait_until_up(base, proc, log_path)
        print(f"dermaflow ui answered on {base} after {took:.1f} s")
        return base

    yield start
    for proc in started:
        _stop(proc)
    for log in logs:
        log.close()


def _keep_screenshot(png: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copy the screenshot where it outlives ``tmp_path``: $DERMAFLOW_TEST_OUTPUT or basetemp."""
    folder = os.environ.get("DERMAFLOW_TEST_OUTPUT")
    dest_dir = Path(folder) if folder else tmp_path_factory.getbasetemp()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / SCREENSHOT_NAME
    shutil.copyfile(png, dest)
    return dest


def _dom_with(url: str, needles: list[str]) -> str:
    """The rendered DOM of ``url``, retried with a longer budget until it holds ``needles``."""
    dom = ""
    for wait_ms in (10_000, 30_000):
        dom = browser.dump_dom(url, wait_ms=wait_ms)
        if all(needle in dom for needle in needles):
            break
    return dom


def _visible_text(dom: str) -> str:
    """The text a user reads in ``dom``: tags, scripts and styles removed, spaces collapsed."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


@pytest.mark.slow
def test_ui_serves_and_renders_the_run(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    chromium: Path | None,
    ui_server: Callable[[], str],
    record_property: Callable[[str, object], None],
) -> None:
    """A logged run, its metric and its heatmap are served by ``dermaflow ui`` and rendered."""
    import mlflow

    started = time.monotonic()
    for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(name)
    (tmp_path / "mlruns").mkdir()
    heatmap = _heatmap_png(tmp_path / "reports" / "explain" / "overlays" / HEATMAP)
    previous_uri = mlflow.get_tracking_uri()
    try:
        info = _log_run(tmp_path, heatmap)
    finally:
        mlflow.set_tracking_uri(previous_uri)
    run_id, exp_id = info["run_id"], info["experiment_id"]
    assert info["tracking_uri"] == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"

    base = ui_server()
    up = time.monotonic()

    # The UI server's own REST API: the run, its latest metric value, the artifact and its bytes.
    run = _get_json(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    assert run["info"]["run_name"] == RUN_NAME
    assert run["info"]["experiment_id"] == exp_id
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["artifact_uri"].startswith((tmp_path / "mlruns" / "artifacts").as_uri())
    metrics = {m["key"]: m for m in run["data"]["metrics"]}
    assert metrics[METRIC]["value"] == pytest.approx(METRIC_VALUE)
    assert metrics[METRIC]["step"] == 2
    query = urllib.parse.urlencode({"run_id": run_id, "metric_key": METRIC})
    history = _get_json(f"{base}/api/2.0/mlflow/metrics/get-history?{query}")["metrics"]
    assert [m["step"] for m in sorted(history, key=lambda m: m["step"])] == [0, 1, 2]

    query = urllib.parse.urlencode({"run_id": run_id, "path": OVERLAYS})
    listing = _get_json(f"{base}/api/2.0/mlflow/artifacts/list?{query}")
    files = {f["path"]: f for f in listing.get("files", [])}
    artifact = f"{OVERLAYS}/{HEATMAP}"
    assert artifact in files, listing
    assert int(files[artifact]["file_size"]) == heatmap.stat().st_size

    query = urllib.parse.urlencode({"path": artifact, "run_uuid": run_id})
    assert _get(f"{base}/get-artifact?{query}") == heatmap.read_bytes()

    if chromium is None:
        pytest.skip(f"{browser.SKIP_ENV}=1: REST checks passed, browser checks skipped")

    # The single-page app, rendered by headless Chromium.
    rest = time.monotonic()
    run_page = f"{base}/#/experiments/{exp_id}/runs/{run_id}"
    dom = _dom_with(run_page, [METRIC, RUN_NAME, str(METRIC_VALUE)])
    text = _visible_text(dom)
    assert METRIC in text, f"{run_page} rendered without the metric:\n{text[:3000]}"
    assert str(METRIC_VALUE) in text
    assert RUN_NAME in text

    artifact_page = f"{run_page}/artifacts/{artifact}"
    image_tag = re.compile(rf'<img[^>]*alt="{re.escape(artifact)}"[^>]*src="blob:')
    dom = _dom_with(artifact_page, [HEATMAP, f'alt="{artifact}"'])
    assert HEATMAP in _visible_text(dom), f"{artifact_page} did not list {HEATMAP}"
    assert image_tag.search(dom), f"{artifact_page} did not show {artifact} as an image"

    png = browser.screenshot(run_page, tmp_path / SCREENSHOT_NAME, width=1400, height=1000)
    kept = _keep_screenshot(png, tmp_path_factory)
    record_property("ui_screenshot", str(kept))
    print(f"run page screenshot: {kept}")
    print(
        f"timings: logging + UI start {up - started:.1f} s, REST {rest - up:.1f} s, "
        f"browser {time.monotonic() - rest:.1f} s"
    )
    assert png.stat().st_size > 20_000
    with Image.open(png) as image:
        assert image.size == (1400, 1000)
        gray = np.asarray(image.convert("L"), dtype=np.float64)
        colours = len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])
    assert gray.std() > 10, f"screenshot looks blank (grey-level std {gray.std():.1f})"
    assert colours > 100, f"screenshot has only {colours} colours"
