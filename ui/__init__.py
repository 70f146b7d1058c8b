"""The Streamlit dashboard: an HTTP client of the fundus2video API.

`ui` imports neither `encoder`, `index` nor `retrieval`; it only speaks HTTP
(`ui.client`). Start it with `fundus2video ui --api URL` or
`streamlit run ui/app.py -- --api URL`.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

APP_PATH = Path(__file__).resolve().parent / "app.py"
MAX_UPLOAD_MB = 64  # the API's default request limit (FUNDUS2VIDEO_MAX_UPLOAD_BYTES)


def dashboard_command(
    api_url: str, port: int = 8501, *, host: str = "127.0.0.1", headless: bool = True
) -> list[str]:
    """The `streamlit run` command line that serves the dashboard against `api_url`."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_PATH),
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--server.headless",
        "true" if headless else "false",
        "--browser.gatherUsageStats",
        "false",
        "--server.maxUploadSize",
        str(MAX_UPLOAD_MB),
        "--",
        "--api",
        api_url,
    ]


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (so `kill` cleans up like Ctrl-C)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a child process, killing it if it does not exit within `timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_dashboard(api_url: str, port: int = 8501, *, host: str = "127.0.0.1") -> int:
    """Serve the dashboard in the foreground until it exits, Ctrl-C or SIGTERM; its status."""
    proc = subprocess.Popen(dashboard_command(api_url, port, host=host))
    with sigterm_as_interrupt():
        try:
            return proc.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            stop_process(proc)
