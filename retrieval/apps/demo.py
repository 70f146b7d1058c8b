"""`fundus2video demo`: phantom cohort → tiny model → index → API + dashboard, cached.

Everything lives in one work folder (default `.demo/`):

    cohort/           the phantom cohort                     (kept once written)
    run/              the tiny generator, run/embedder/      (kept once its stage finished)
    run/report.json   the evaluation report (Model page)     (computed while serving)
    index/            the index folder                       (kept unless the model changed)
    demo.json         which stages finished, with their summaries

A second run finds every stage done and goes straight to serving. A stage interrupted
half-way is redone (the generator resumes from its last snapshot), and every stage
built on it too. The evaluation runs in the background once the servers are up, so
it does not delay the URLs.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index.atomic import atomic_write_text
from retrieval.apps.processes import (
    dashboard_command,
    free_port,
    sigterm_as_interrupt,
    stop_process,
    wait_http,
)
from retrieval.errors import Fundus2VideoError

log = logging.getLogger(__name__)

DEMO_SIZE, DEMO_FRAMES = 128, 16
STATE_FILE = "demo.json"


@dataclass(frozen=True)
class DemoPaths:
    workdir: Path
    cohort: Path
    run: Path
    index: Path
    report: Path

    @classmethod
    def under(cls, workdir: str | Path) -> DemoPaths:
        w = Path(workdir)
        return cls(w, w / "cohort", w / "run", w / "index", w / "run" / "report.json")


def _read_state(paths: DemoPaths) -> dict[str, Any]:
    try:
        return json.loads((paths.workdir / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_state(paths: DemoPaths, state: dict[str, Any]) -> None:
    atomic_write_text(paths.workdir / STATE_FILE, json.dumps(state, indent=2) + "\n")


def _invalidate(paths: DemoPaths, state: dict[str, Any], *stages: str) -> None:
    """Forget stages built from something about to be redone, and remove their files."""
    from retrieval.models.embedding import default_embedder_dir

    files = {"embedder": default_embedder_dir(paths.run), "index": paths.index}
    for stage in stages:
        state.pop(stage, None)
        if stage == "report":
            paths.report.unlink(missing_ok=True)
        elif stage in files:
            shutil.rmtree(files[stage], ignore_errors=True)
    _write_state(paths, state)


def prepare_demo(
    workdir: str | Path = ".demo",
    *,
    cases: int = 128,
    seed: int = 0,
    generator_minutes: float = 3.0,
    embed_minutes: float = 1.5,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> DemoPaths:
    """Build (or reuse) the demo's cohort, model and index (the report: `ensure_report`)."""
    from retrieval.data.phantom import write_phantom_cohort
    from retrieval.models.embedding import build_index

    paths = DemoPaths.under(workdir)
    try:
        paths.workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Fundus2VideoError(f"demo work folder {paths.workdir}: {e.strerror or e}") from e
    state = _read_state(paths)
    started = time.monotonic()

    if (paths.cohort / "catalog.parquet").is_file():
        say(f"[1/4] phantom cohort: reusing {paths.cohort}")
    else:
        say(f"[1/4] phantom cohort: writing {cases} cases to {paths.cohort}")
        write_phantom_cohort(
            paths.cohort, cases=cases, size=DEMO_SIZE, frames=DEMO_FRAMES, seed=seed, workers=2
        )
    _generator_stage(paths, state, generator_minutes, seed=seed, progress=progress, say=say)
    _embedder_stage(paths, state, embed_minutes, seed=seed, progress=progress, say=say)

    if "index" in state and (paths.index / "manifest.json").is_file():
        say(f"[4/4] index: reusing {paths.index}")
    else:
        say(f"[4/4] index: embedding the cohort into {paths.index}")
        _invalidate(paths, state, "index")
        manifest = build_index(paths.run, paths.cohort, paths.index, progress=progress)
        state["index"] = {"counts": manifest.get("counts")}
        _write_state(paths, state)
    say(f"      ready in {time.monotonic() - started:.0f} s")
    return paths


def _generator_stage(
    paths: DemoPaths,
    state: dict[str, Any],
    minutes: float,
    *,
    seed: int,
    progress: bool,
    say: Callable[[str], None],
) -> None:
    """Train the tiny generator (resuming a half-trained one) unless it finished before."""
    from retrieval.models.generation import train_run

    if "generator" in state:
        say(f"[2/4] generator: reusing {paths.run}")
        return
    say(f"[2/4] generator: training the tiny model for {minutes:g} min")
    _invalidate(paths, state, "embedder", "index", "report")
    summary = train_run(
        paths.cohort,
        paths.run,
        scale="tiny",
        minutes=minutes,
        seed=seed,
        resume=paths.run.exists(),
        progress=progress,
    )
    state["generator"] = {"iterations": summary.iterations, "elapsed_s": summary.elapsed_s}
    _write_state(paths, state)


def _embedder_stage(
    paths: DemoPaths,
    state: dict[str, Any],
    minutes: float,
    *,
    seed: int,
    progress: bool,
    say: Callable[[str], None],
) -> None:
    """Train the embedding heads (from scratch) unless they finished before."""
    from retrieval.models.embedding import default_embedder_dir, train_embedder

    embedder_dir = default_embedder_dir(paths.run)
    if "embedder" in state:
        say(f"[3/4] embedder: reusing {embedder_dir}")
        return
    say(f"[3/4] embedder: training the embedding heads for {minutes:g} min")
    _invalidate(paths, state, "embedder", "index", "report")  # a half-trained one too
    summary = train_embedder(paths.run, paths.cohort, minutes=minutes, seed=seed, progress=progress)
    if not (embedder_dir / "config.json").is_file():
        raise Fundus2VideoError(
            f"the embedder trained {summary.iterations} iterations in {minutes:g} "
            "min and saved nothing: give it more time (--embed-minutes)"
        )
    state["embedder"] = {"iterations": summary.iterations, "elapsed_s": summary.elapsed_s}
    _write_state(paths, state)


def has_report(paths: DemoPaths) -> bool:
    return "report" in _read_state(paths) and paths.report.is_file()


def ensure_report(
    paths: DemoPaths, *, progress: bool = True, say: Callable[[str], None] = print
) -> None:
    """The Model page's evaluation report (generation with baselines, and retrieval on the
    held-out split), unless the current model already has one."""
    if has_report(paths):
        return
    started = time.monotonic()
    _evaluate(paths, progress=progress)
    state = _read_state(paths)
    state["report"] = {"elapsed_s": round(time.monotonic() - started, 1)}
    _write_state(paths, state)
    say(f"evaluation report written to {paths.report} ({time.monotonic() - started:.0f} s)")


def _evaluate(paths: DemoPaths, *, progress: bool) -> None:
    from retrieval.evaluation.generation import evaluate_runs, write_report
    from retrieval.evaluation.retrieval import evaluate_retrieval, write_reliability

    report = evaluate_runs({"model": paths.run}, paths.cohort, split="test", progress=progress)
    report["retrieval"] = evaluate_retrieval(
        {"model": (paths.run, None)},
        paths.cohort,
        split="test",
        synthesis_for="model",
        progress=progress,
    )
    write_reliability(report, paths.report)
    write_report(report, paths.report)


# -- serving -------------------------------------------------------------------------------
class ApiThread:
    """An ASGI app served by uvicorn from a background thread of this process."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.url = f"http://{host}:{port or free_port(0, host)}"
        config = uvicorn.Config(
            app,
            host=host,
            port=int(self.url.rsplit(":", 1)[1]),
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="api", daemon=True)

    def start(self, timeout: float = 120.0) -> ApiThread:
        self.thread.start()
        wait_http(f"{self.url}/health", timeout=timeout, alive=self.thread.is_alive)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def demo_app(paths: DemoPaths) -> Any:
    """The API over the demo's index; /model finds the run's report.json once written.

    A local playground: adding and deleting cases is open unless FUNDUS2VIDEO_WRITE_KEY
    is set (then writes need it); the default rate limits apply."""
    from retrieval.api import Settings, create_app

    return create_app(Settings(index=paths.index, open_writes=True))


def _report_quietly(paths: DemoPaths) -> None:
    try:
        ensure_report(paths, progress=False, say=print)
    except Exception as e:  # a background nicety: never take the servers down
        log.warning("evaluation report failed: %s", e, exc_info=True)


def start_report(paths: DemoPaths) -> multiprocessing.Process:
    """The evaluation report in a child process, so stopping the demo can end it at once
    (the report is written atomically: a stopped one leaves nothing behind)."""
    proc = multiprocessing.get_context("spawn").Process(
        target=_report_quietly, args=(paths,), name="evaluate", daemon=True
    )
    proc.start()
    return proc


def start_dashboard(api_url: str, host: str, port: int) -> tuple[subprocess.Popen, str]:
    """`streamlit run ui/app.py -- --api api_url` as a child process, once it answers."""
    proc = subprocess.Popen(dashboard_command(api_url, port, host=host))
    url = f"http://{host}:{port}"
    try:
        wait_http(f"{url}/_stcore/health", timeout=90, alive=lambda: proc.poll() is None)
    except BaseException:
        stop_process(proc)
        raise
    return proc, url


def serve_demo(
    paths: DemoPaths,
    *,
    host: str = "127.0.0.1",
    api_port: int = 8000,
    ui_port: int = 8501,
    say: Callable[[str], None] = print,
) -> None:
    """Start the API and the dashboard, print both URLs, run until Ctrl-C, stop both."""
    api_port, ui_port = free_port(api_port, host), free_port(ui_port, host)
    for noisy in ("httpx", "fundus2video.api"):  # health polls, one line per request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with sigterm_as_interrupt():
        say("starting the API (loading the model and the index)…")
        api = ApiThread(demo_app(paths), host, api_port).start()
        dashboard = report = None
        try:
            say("starting the dashboard…")
            dashboard, ui_url = start_dashboard(api.url, host, ui_port)
            say("")
            say(f"  API        {api.url}   (OpenAPI: {api.url}/docs)")
            say(f"  dashboard  {ui_url}")
            say("")
            say(
                f"Open the dashboard, upload a CF photo from {paths.cohort / 'cf'} and press "
                "Search. Ctrl-C stops both."
            )
            if not has_report(paths):
                say(
                    "Computing the evaluation report in the background (a few minutes); "
                    "the Model page shows it once written."
                )
                report = start_report(paths)
            while dashboard.poll() is None and api.thread.is_alive():
                time.sleep(0.5)
            say("the dashboard exited" if dashboard.poll() is not None else "the API stopped")
        except KeyboardInterrupt:
            say("stopping…")
        finally:
            if report is not None and report.is_alive():
                report.terminate()
                report.join(10)
            if dashboard is not None:
                stop_process(dashboard)
            api.stop()
