"""Servers as processes: the dashboard's command line, child processes, free ports, and
waiting until a server answers. Used by `fundus2video ui`, the demo, the end-to-end
tests and the API benchmark.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

import ui
from retrieval.errors import ServerError

APP_PATH = Path(ui.__file__).resolve().parent / "app.py"
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


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """`preferred` when nothing listens there, else (or with 0) a port the OS picks."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise ServerError(f"no free port on {host}")


def wait_http(url: str, *, timeout: float = 60.0, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll `url` until it answers 200; ServerError if `alive()` turns false first (the
    server exited) or nothing answers within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise ServerError(f"the server behind {url} exited before it answered")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        time.sleep(0.3)
    raise ServerError(f"{url} did not answer within {timeout:.0f} s")
