"""Headless Chromium for browser tests: install it once, then screenshot or dump a page.

Debian's ``chromium`` package is the browser (no test tool downloads its own). The tests call
:func:`ensure_chromium`, which installs it with apt-get when it is missing; where that is
impossible (not root, no apt-get, no package registry) it raises :class:`RuntimeError` and the
browser test FAILS. Set ``DERMAFLOW_SKIP_BROWSER=1`` to skip the browser tests instead, on a
machine that cannot have Chromium (see :func:`browser_skipped`).

Every call starts a fresh Chromium process with its own empty profile and the flags that keep
it off the (closed) network: no background networking, no component updates, no sync, no QUIC.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
SKIP_ENV = "DERMAFLOW_SKIP_BROWSER"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
]
INSTALL_TIMEOUT_S = 900
# Seconds the last ensure_chromium() spent installing (0.0 when Chromium was already there).
last_install_seconds = 0.0


def browser_skipped() -> bool:
    """Whether the user asked to skip browser tests (``DERMAFLOW_SKIP_BROWSER=1``)."""
    return os.environ.get(SKIP_ENV, "").strip().lower() in {"1", "true", "yes"}


def _apt_get(args: list[str]) -> subprocess.CompletedProcess:
    """Run apt-get quietly and non-interactively; output is captured for the error message."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", "-q", "-y", "-o", "DPkg::Lock::Timeout=300", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def ensure_chromium() -> Path:
    """Return the Chromium binary, installing Debian's ``chromium`` package when it is missing.

    The install runs ``apt-get install -y --no-install-recommends chromium``; when that fails
    (for instance an empty package list on a fresh machine) it runs ``apt-get update`` and tries
    once more. The time spent is kept in ``last_install_seconds``.

    Returns:
        ``/usr/bin/chromium``.

    Raises:
        RuntimeError: Chromium is missing and cannot be installed here (not root, no apt-get,
            or the install failed). Set ``DERMAFLOW_SKIP_BROWSER=1`` to skip browser tests.
    """
    global last_install_seconds
    last_install_seconds = 0.0
    if CHROMIUM.exists():
        return CHROMIUM
    hint = f"install Debian's chromium package, or set {SKIP_ENV}=1 to skip browser tests"
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"{CHROMIUM} is missing and apt-get is not available: {hint}")
    if os.geteuid() != 0:
        raise RuntimeError(f"{CHROMIUM} is missing and installing it needs root: {hint}")
    start = time.monotonic()
    install = ["install", "--no-install-recommends", "chromium"]
    try:
        proc = _apt_get(install)
        if proc.returncode != 0:
            update = _apt_get(["update"])
            if update.returncode != 0:
                raise RuntimeError(
                    f"apt-get update failed ({update.returncode}): {hint}\n{update.stderr[-2000:]}"
                )
            proc = _apt_get(install)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"installing chromium took over {err.timeout} s: {hint}") from err
    last_install_seconds = time.monotonic() - start
    if proc.returncode != 0 or not CHROMIUM.exists():
        tail = f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
        raise RuntimeError(f"apt-get install chromium failed ({proc.returncode}): {hint}\n{tail}")
    return CHROMIUM


def _run_chromium(args: list[str], url: str, timeout_s: float) -> subprocess.CompletedProcess:
    """One headless Chromium process with a fresh, throwaway profile.

    Args:
        args: Extra flags (``--screenshot=...``, ``--dump-dom``, ...).
        url: The page to load.
        timeout_s: Seconds before the process is killed.

    Returns:
        The finished process (stdout holds the DOM for ``--dump-dom``).

    Raises:
        RuntimeError: Chromium exited non-zero or ran past ``timeout_s``.
    """
    binary = ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="dermaflow-chromium-") as profile:
        cmd = [str(binary), *FLAGS, f"--user-data-dir={profile}", *args, url]
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "HOME": profile},
            )
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"chromium ran past {timeout_s} s on {url}") from err
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode} on {url}\n{proc.stderr[-3000:]}")
    return proc


def screenshot(
    url: str,
    out_png: str | Path,
    width: int = 1400,
    height: int = 1000,
    wait_ms: int = 10000,
    timeout_s: float = 120,
) -> Path:
    """Render ``url`` headless and save a PNG of the window.

    Args:
        url: The page (a single-page app's hash route included).
        out_png: Where the PNG goes; its folder is created.
        width: Window width in CSS pixels.
        height: Window height in CSS pixels.
        wait_ms: Virtual time the page gets to load its scripts and data before the capture.
        timeout_s: Wall-clock limit on the Chromium process.

    Returns:
        The path of the PNG.

    Raises:
        RuntimeError: Chromium failed, timed out, or wrote no image.
    """
    out = Path(out_png).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    args = [
        f"--window-size={width},{height}",
        f"--virtual-time-budget={wait_ms}",
        f"--screenshot={out}",
    ]
    _run_chromium(args, url, timeout_s)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {url} to {out}")
    return out


def dump_dom(url: str, wait_ms: int = 10000, timeout_s: float = 120) -> str:
    """Render ``url`` headless and return the DOM as serialized after ``wait_ms``.

    Args:
        url: The page (a single-page app's hash route included).
        wait_ms: Virtual time the page gets to load its scripts and data first.
        timeout_s: Wall-clock limit on the Chromium process.

    Returns:
        The rendered document's HTML.

    Raises:
        RuntimeError: Chromium failed or timed out.
    """
    args = ["--window-size=1400,1000", f"--virtual-time-budget={wait_ms}", "--dump-dom"]
    return _run_chromium(args, url, timeout_s).stdout
