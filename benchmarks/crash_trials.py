"""Crash trials: SIGKILL each writer at random moments, then check what it left behind.

Writers (each a real `fundus2video` subprocess):
- `ingest`  a CSV manifest of a phantom cohort's media → a cohort folder;
- `index`   `fundus2video index RUN COHORT --out INDEX` replacing an existing index;
- `train`   `fundus2video train --stage generator` writing a checkpoint every iteration;
- `embed`   `fundus2video train --stage embed --overwrite` replacing a run's embedder
            (`embedder.safetensors` + `config.json`, saved at each better validation);
- `serve`   `POST /cases` / `DELETE /cases/{id}` streamed by a client while the server
            runs; every acknowledged write (201 add, 200 delete) is recorded. The kill
            clock starts at the first acknowledged add (warm-up).

Each trial starts the writer, kills its process group with SIGKILL after a delay (seeded;
the `--kills` delays are spread uniformly over the writer's measured duration), then:
the output loads with the project's own loaders (`Cohort.open`, `load_index_folder` /
`Engine.open`, `load_generator`, `load_embedder` and the training state); it is the old
or the new state, never a mix (catalog rows = vectors of each modality = media files; never empty; a
checkpoint's `config.json` describes the weights beside it); no acknowledged add or
delete is lost; and the next write succeeds (the writer run again to completion, one
more add). Prints a table and writes JSON (`--out`).

    python benchmarks/crash_trials.py --kills 20
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from index import load_index_folder  # noqa: E402

WRITERS = ("ingest", "index", "train", "embed", "serve")
CLI = str(Path(sys.executable).parent / "fundus2video")
WRITE_KEY = "crash-trials-write-key-0123456789"
TRAIN_ITERS = 8  # the trial run: a checkpoint after each iteration
EMBED_ITERS = 12  # the embedder trial run: validated (and maybe saved) every 4 iterations
SERVE_OPS = 30  # writes in the measured serve stream (after its first, warm-up add)


class Inconsistent(Exception):
    """What a writer left is not a loadable old or new state (the message says why)."""


# ---------------------------------------------------------------------------- checkers


def index_problems(path: Path) -> list[str]:
    """Why the index folder at `path` is not one consistent state ([] when it is): it
    loads, is not empty, every modality holds exactly the catalog's rows, and every media
    file the catalog names inside the folder exists."""
    try:
        folder = load_index_folder(path)
    except Exception as err:  # any loader error is a finding
        return [f"does not load: {err}"]
    catalog = folder.catalog
    rows = set(catalog["row_id"].to_list())
    problems = [] if rows else ["the catalog is empty"]
    if catalog["case_id"].n_unique() != catalog.height:
        problems.append("case ids repeat")
    for modality, vi in folder.indexes.items():
        ids = set(vi.ids().tolist())
        if ids != rows:
            problems.append(
                f"{modality} holds {len(ids)} ids, the catalog {len(rows)} rows "
                f"({len(ids ^ rows)} differ)"
            )
    for column in ("cf_path", "ffa_path"):
        for value in catalog[column].to_list():
            if value and not Path(value).is_absolute() and not (path / value).is_file():
                problems.append(f"{column} {value} is missing")
    return problems


def check_index_state(path: Path, old_ids: set[str], new_ids: set[str]) -> str:
    """ "old" or "new": the case ids of a consistent index folder; raises Inconsistent."""
    problems = index_problems(path)
    if problems:
        raise Inconsistent(f"{path}: " + "; ".join(problems))
    ids = set(load_index_folder(path).catalog["case_id"].to_list())
    if ids == new_ids:
        return "new"
    if ids == old_ids:
        return "old"
    raise Inconsistent(f"{path}: {len(ids)} cases, neither the old ({len(old_ids)}) nor the new")


def check_cohort_state(path: Path, expected: int) -> str:
    """ "old" (no folder) or "new" (a cohort of `expected` cases whose media all decode)."""
    from retrieval.data.cohort import Cohort
    from retrieval.data.media import read_cf, read_ffa

    if not path.exists():
        return "old"
    try:
        cases = Cohort.open(path).cases()
        for case in cases:
            read_cf(case.cf_path)
            read_ffa(case.ffa_path)
    except Exception as err:
        raise Inconsistent(f"{path}: {err}") from err
    if len(cases) != expected:
        raise Inconsistent(f"{path}: {len(cases)} cases, the manifest has {expected}")
    return "new"


def checkpoint_iteration(run: Path) -> int | None:
    """The iteration of the run's generator export (None: no export yet); raises
    Inconsistent when it does not load or `config.json` does not describe its weights."""
    from safetensors import safe_open

    from encoder.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_generator

    config, weights = run / CONFIG_NAME, run / WEIGHTS_NAME
    if not config.exists() and not weights.exists():
        return None
    try:
        _, cfg = load_generator(run)
        with safe_open(str(weights), framework="pt") as f:
            embedded = json.loads(f.metadata()["config"])
    except Exception as err:
        raise Inconsistent(f"{run}: the generator does not load: {err}") from err
    if embedded.get("iteration") != cfg.get("iteration"):
        raise Inconsistent(
            f"{run}: {CONFIG_NAME} says iteration {cfg.get('iteration')}, "
            f"the weights are iteration {embedded.get('iteration')}"
        )
    return cfg.get("iteration")


def state_iteration(run: Path) -> int | None:
    """The iteration of the run's resumable state (None: none yet); raises Inconsistent."""
    from safetensors import safe_open

    from encoder.train.state import STATE_NAME, read_training_meta

    path = run / STATE_NAME
    if not path.exists():
        return None
    try:
        meta = read_training_meta(path)
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open API)
                f.get_tensor(key)
    except Exception as err:
        raise Inconsistent(f"{path}: {err}") from err
    return int(meta["iteration"])


def check_run_state(run: Path, final: int) -> str:
    """The state: "new" (the export and the resumable state both at `final`) or "old" (an
    earlier checkpoint, or none yet). The state is written first, then the export, so after
    a kill between the two the export may be one snapshot behind (or absent); `--resume`
    exports again at once. Raises Inconsistent for a checkpoint that does not load, or an
    export ahead of the state (a mix no order of writes explains)."""
    exported, state = checkpoint_iteration(run), state_iteration(run)
    if exported is not None and (state is None or exported > state):
        raise Inconsistent(f"{run}: generator iteration {exported}, training state {state}")
    return "new" if exported == state == final else "old"


# ---------------------------------------------------------------------------- processes


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env |= {
        "FUNDUS2VIDEO_WRITE_KEY": WRITE_KEY,
        "FUNDUS2VIDEO_OPEN_WRITES": "true",
        "FUNDUS2VIDEO_RATE_WRITE": "",
    }
    return env


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """`cmd` in its own process group, its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
        )


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of `proc` and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_to_end(cmd: list[str], log: Path, timeout: float = 600.0) -> None:
    proc = start(cmd, log)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        raise Inconsistent(f"{' '.join(cmd[1:3])} did not finish in {timeout:.0f} s") from None
    if rc != 0:
        tail = log.read_text(errors="replace")[-600:]
        raise Inconsistent(f"{' '.join(cmd[1:3])} exited {rc}: {tail}")


def run_and_kill(cmd: list[str], delay: float, log: Path) -> bool:
    """Start `cmd`, SIGKILL it after `delay` s; True when it had finished by then (exit 0)."""
    proc = start(cmd, log)
    try:
        rc = proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        kill(proc)
        return False
    if rc != 0:
        raise Inconsistent(f"{' '.join(cmd[1:3])} exited {rc} before the kill")
    return True


def timed(fn: Callable[[], None]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


# ---------------------------------------------------------------------------- fixtures


@dataclass
class Fixtures:
    """What every trial starts from (built once, read only)."""

    root: Path
    cohort: Path  # 24 phantom cases, 64 px, 6 frames
    small: Path  # the first 16 of them: the "old" index's cohort
    manifest: Path  # an ingest manifest of `cohort`
    run: Path  # a micro generator + embedder (as the tests' tiny index)
    old_index: Path  # the index of `small`
    index: Path  # the index of `cohort` (the serve trials' starting folder)
    extra: Path  # more phantom cases: the media the serve trials add


def build_fixtures(root: Path, seed: int = 0) -> Fixtures:
    """Phantom cohorts, a micro run and two index folders under `root` (reused when `root`
    already holds them)."""
    from retrieval.data.phantom import write_phantom_cohort
    from retrieval.models.embedding import build_index
    from retrieval.testing import train_micro_run

    f = Fixtures(
        root,
        root / "cohort",
        root / "small",
        root / "cohort" / "manifest.csv",
        root / "run",
        root / "old-index",
        root / "index",
        root / "extra",
    )
    if (f.index / "manifest.json").is_file():  # built by an earlier call (a kept --workdir)
        return f
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    write_phantom_cohort(f.cohort, cases=24, size=64, frames=6, seed=seed, progress=False)
    write_phantom_cohort(f.extra, cases=8, size=64, frames=6, seed=seed + 1, progress=False)
    _subset_cohort(f.cohort, f.small, 16)
    _write_manifest(f.cohort, f.manifest)
    train_micro_run(f.cohort, f.run)
    build_index(f.run, f.small, f.old_index, progress=False)
    build_index(f.run, f.cohort, f.index, progress=False)
    return f


def _subset_cohort(cohort: Path, out: Path, n: int) -> None:
    """A cohort of the first `n` cases of `cohort` (media paths made absolute)."""
    import polars as pl

    from retrieval.data.cohort import CATALOG_NAME, Cohort, write_catalog

    opened = Cohort.open(cohort)
    ids = [c.case_id for c in opened.cases()[:n]]
    catalog = opened.catalog.filter(pl.col("case_id").is_in(ids))
    catalog = catalog.with_columns(
        cf_path=pl.lit(str(cohort.resolve()) + "/") + pl.col("cf_path"),
        ffa_path=pl.lit(str(cohort.resolve()) + "/") + pl.col("ffa_path"),
    )
    out.mkdir(parents=True)
    write_catalog(catalog, out / CATALOG_NAME)


def _write_manifest(cohort: Path, path: Path) -> None:
    from retrieval.data.cohort import Cohort

    columns = ("case_id", "patient_id", "eye", "diagnosis", "split", "cf_path", "ffa_path")
    out = io.StringIO()
    writer = csv.DictWriter(out, columns)
    writer.writeheader()
    for row in Cohort.open(cohort).catalog.iter_rows(named=True):
        writer.writerow({c: row[c] for c in columns})
    path.write_text(out.getvalue())


# ---------------------------------------------------------------------------- one-shot writers


@dataclass
class Trial:
    writer: str
    kill_at_s: float
    state: str  # "old", "new" or "failure"
    finished_before_kill: bool = False
    detail: str = ""
    leftovers: int = 0  # temporaries the killed writer left beside or in its output
    leftovers_after: int = 0  # those still there after the next write (stale ones go)
    acknowledged: dict[str, int] = field(default_factory=dict)  # serve: adds, deletes


class OneShotWriter:
    """A writer that runs to completion: its command, what it replaces, how it is checked."""

    name = ""

    def __init__(self, fx: Fixtures):
        self.fx = fx

    def output(self, trial: Path) -> Path:
        raise NotImplementedError

    def setup(self, trial: Path) -> None:
        """Put the old state in place (default: nothing)."""

    def command(self, trial: Path, again: bool) -> list[str]:
        raise NotImplementedError

    def check(self, trial: Path) -> str:
        raise NotImplementedError

    def prepare_rerun(self, trial: Path, state: str) -> None:
        """Make room for the next write after a kill (default: nothing)."""


class IngestWriter(OneShotWriter):
    name = "ingest"

    def output(self, trial: Path) -> Path:
        return trial / "cohort"

    def command(self, trial: Path, again: bool) -> list[str]:
        out = self.output(trial)
        cmd = [CLI, "ingest", str(self.fx.manifest), str(out), "--allow-duplicates"]
        return cmd + ["--no-register"]  # registration is computed before the write

    def check(self, trial: Path) -> str:
        return check_cohort_state(self.output(trial), 24)

    def prepare_rerun(self, trial: Path, state: str) -> None:
        if state == "new":  # a complete cohort: the user ingests again elsewhere
            self.output(trial).rename(trial / "cohort-first")


class IndexWriter(OneShotWriter):
    name = "index"

    def __init__(self, fx: Fixtures):
        super().__init__(fx)
        ids = (load_index_folder(p).catalog["case_id"].to_list() for p in (fx.old_index, fx.index))
        self.old_ids, self.new_ids = (set(i) for i in ids)

    def output(self, trial: Path) -> Path:
        return trial / "index"

    def setup(self, trial: Path) -> None:
        shutil.copytree(self.fx.old_index, self.output(trial))

    def command(self, trial: Path, again: bool) -> list[str]:
        out = str(self.output(trial))
        return [CLI, "index", str(self.fx.run), str(self.fx.cohort), "--out", out]

    def check(self, trial: Path) -> str:
        return check_index_state(self.output(trial), self.old_ids, self.new_ids)


class TrainWriter(OneShotWriter):
    name = "train"

    def output(self, trial: Path) -> Path:
        return trial / "run"

    def command(self, trial: Path, again: bool) -> list[str]:
        cmd = [CLI, "train", str(self.fx.cohort), "--out", str(self.output(trial))]
        cmd += ["--stage", "generator", "--iters", str(TRAIN_ITERS), "--snapshot-every", "1"]
        return cmd + ["--batch-size", "2"] + (["--resume"] if again else [])

    def check(self, trial: Path) -> str:
        return check_run_state(self.output(trial), TRAIN_ITERS)


class EmbedWriter(OneShotWriter):
    """Retrains the micro run's embedder in place (`--overwrite`): the old state is the
    micro embedder (or a save of the new run before it finished), the new one the
    embedder of a run that finished."""

    name = "embed"

    def output(self, trial: Path) -> Path:
        return trial / "run" / "embedder"

    def setup(self, trial: Path) -> None:
        shutil.copytree(self.fx.run, trial / "run")

    def command(self, trial: Path, again: bool) -> list[str]:
        cmd = [CLI, "train", str(self.fx.cohort), "--out", str(trial / "run"), "--stage", "embed"]
        return cmd + ["--iters", str(EMBED_ITERS), "--overwrite"]

    def check(self, trial: Path) -> str:
        return check_embedder_state(self.output(trial), self.fx.run / "embedder")


def check_embedder_state(folder: Path, old: Path) -> str:
    """ "new" (the embedder of a run that finished: a save of this run, and its log's stop
    line), or "old" (the old embedder, or a save of the run before it finished); raises
    Inconsistent when it does not load or is neither."""
    from encoder import load_embedder

    try:
        _, cfg = load_embedder(folder)
    except Exception as err:
        raise Inconsistent(f"{folder}: the embedder does not load: {err}") from err
    if _same_tensors(folder, old):
        return "old"
    if cfg["training"].get("iters") != EMBED_ITERS:
        raise Inconsistent(f"{folder}: neither the old embedder nor a save of the new run")
    log = folder / "log.txt"
    finished = log.is_file() and f"stopped (iters) at iteration {EMBED_ITERS} " in log.read_text()
    return "new" if finished else "old"


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two embedder folders hold the same weights (their metadata aside: it
    names the run folder)."""
    from safetensors.numpy import load_file

    from encoder.embedder import WEIGHTS_NAME

    x, y = load_file(a / WEIGHTS_NAME), load_file(b / WEIGHTS_NAME)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def leftovers(output: Path) -> int:
    """Temporary siblings (`.NAME.tmp-*`, `.NAME.old-*`) beside `output` and inside it."""
    found = list(output.parent.glob(f".{output.name}.tmp-*"))
    found += list(output.parent.glob(f".{output.name}.old-*"))
    if output.is_dir():
        found += [p for p in output.rglob(".*.tmp-*")]
    return len(found)


def one_shot_trial(writer: OneShotWriter, trial: Path, delay: float) -> Trial:
    """Kill the writer after `delay` s, check, run it again to completion, check again."""
    trial.mkdir(parents=True)
    writer.setup(trial)
    log = trial / "writer.log"
    result = Trial(writer.name, round(delay, 3), "failure")
    try:
        result.finished_before_kill = run_and_kill(writer.command(trial, False), delay, log)
        state = writer.check(trial)
        result.leftovers = leftovers(writer.output(trial))
        writer.prepare_rerun(trial, state)
        run_to_end(writer.command(trial, True), log)
        result.leftovers_after = leftovers(writer.output(trial))
        after = writer.check(trial)
        if after != "new":
            raise Inconsistent(f"after the next write the output is the {after} state")
        result.state = state
    except Inconsistent as err:
        result.detail = str(err)
    return result


# ---------------------------------------------------------------------------- serve


class WriteStream(threading.Thread):
    """Adds and deletes cases through the API until the server dies or `stop` is set;
    records every acknowledged write and the one in flight."""

    def __init__(self, url: str, media: list[tuple[bytes, bytes]], tag: str):
        super().__init__(daemon=True)
        self.url, self.media, self.tag = url, media, tag
        self.stop = threading.Event()
        self.added: list[str] = []  # acknowledged adds (201), in order
        self.deleted: list[str] = []  # acknowledged deletes (200)
        self.in_flight: tuple[str, str] | None = None  # ("add" | "delete", case id)
        self.errors: list[str] = []

    def run(self) -> None:
        import httpx

        headers = {"X-API-Key": WRITE_KEY}
        with httpx.Client(base_url=self.url, headers=headers, timeout=60) as client:
            for i in range(10_000):
                if self.stop.is_set():
                    return
                try:
                    self._one(client, i)
                except httpx.TransportError:
                    return  # the server was killed: the op stays in flight
            return

    def _one(self, client, i: int) -> None:
        live = [c for c in self.added if c not in self.deleted]
        if i % 3 == 2 and live:
            case_id = live[0]
            self.in_flight = ("delete", case_id)
            r = client.delete(f"/cases/{case_id}")
            if r.status_code == 200:
                self.deleted.append(case_id)
        else:
            case_id = f"{self.tag}-{i:04d}"
            cf, ffa = self.media[i % len(self.media)]
            self.in_flight = ("add", case_id)
            files = {"cf": ("cf.png", cf, "image/png"), "ffa": ("ffa.mp4", ffa, "video/mp4")}
            data = {"case_id": case_id, "allow_duplicate": "true", "diagnosis": "normal"}
            r = client.post("/cases", files=files, data=data)
            if r.status_code == 201:
                self.added.append(case_id)
        if r.status_code not in (200, 201):
            self.errors.append(f"{self.in_flight}: {r.status_code} {r.text[:200]}")
        self.in_flight = None


def _media_pool(cohort: Path) -> list[tuple[bytes, bytes]]:
    from retrieval.data.cohort import Cohort
    from retrieval.data.media import read_cf, read_ffa
    from retrieval.data.media_write import mp4_bytes, png_bytes

    cases = Cohort.open(cohort).cases()
    return [(png_bytes(read_cf(c.cf_path)), mp4_bytes(read_ffa(c.ffa_path))) for c in cases]


class Server:
    """`fundus2video serve INDEX` as a subprocess on a free port."""

    def __init__(self, index: Path, log: Path):
        from retrieval.apps.processes import free_port, wait_http

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = start([CLI, "serve", str(index), "--port", str(port)], log)
        wait_http(self.url + "/ready", timeout=120, alive=lambda: self.proc.poll() is None)

    def kill(self) -> None:
        kill(self.proc)


def serve_expected(stream: WriteStream, base: set[str]) -> tuple[set[str], set[str]]:
    """The case ids after every acknowledged write ("old") and with the op in flight too
    ("new")."""
    old = (base | set(stream.added)) - set(stream.deleted)
    new = set(old)
    if stream.in_flight is not None:
        kind, case_id = stream.in_flight
        new = new | {case_id} if kind == "add" else new - {case_id}
    return old, new


def check_serve_state(index: Path, stream: WriteStream, base: set[str]) -> str:
    """ "old" (the write in flight at the kill left no trace) or "new" (it took effect, or none
    was in flight); raises Inconsistent for a mix or a lost acknowledged write."""
    problems = index_problems(index)
    if problems:
        raise Inconsistent(f"{index}: " + "; ".join(problems))
    ids = set(load_index_folder(index).catalog["case_id"].to_list())
    old, new = serve_expected(stream, base)
    lost = [c for c in stream.added if c not in stream.deleted and c not in ids]
    back = [c for c in stream.deleted if c in ids]
    if lost or back:
        raise Inconsistent(f"acknowledged adds lost {lost}, acknowledged deletes back {back}")
    if ids == new:
        return "new"
    if ids == old:
        return "old"
    raise Inconsistent(f"{len(ids)} cases: neither before nor after the write in flight")


def add_one_more(index: Path, cohort: Path) -> None:
    """Open the index as `serve` does, add one case, reopen: it is there."""
    from retrieval.data.cohort import Cohort
    from retrieval.data.media import read_cf, read_ffa
    from retrieval.search.engine import Engine, NewCase

    case = Cohort.open(cohort).cases()[0]
    engine = Engine.open(index)
    engine.add_case(
        NewCase(case_id="after-restart", diagnosis="normal"),
        read_cf(case.cf_path),
        read_ffa(case.ffa_path),
        allow_duplicate=True,
    )
    engine.close()
    if "after-restart" not in set(load_index_folder(index).catalog["case_id"].to_list()):
        raise Inconsistent("the add after the restart is not in the reopened index")
    problems = index_problems(index)
    if problems:
        raise Inconsistent("after one more add: " + "; ".join(problems))


def serve_trial(fx: Fixtures, media: list, trial: Path, delay: float, base: set[str]) -> Trial:
    """Stream writes at a fresh server, SIGKILL it `delay` s into the stream, check."""
    trial.mkdir(parents=True)
    index = trial / "index"
    shutil.copytree(fx.index, index)
    result = Trial("serve", round(delay, 3), "failure")
    server = Server(index, trial / "serve.log")
    stream = WriteStream(server.url, media, trial.name)
    stream.start()
    try:
        warm_up(stream)
    except Inconsistent as err:
        server.kill()
        result.detail = str(err)
        return result
    stream.join(timeout=delay)
    server.kill()
    stream.stop.set()
    stream.join(timeout=60)
    result.acknowledged = {"adds": len(stream.added), "deletes": len(stream.deleted)}
    try:
        if stream.errors:
            raise Inconsistent("refused writes: " + "; ".join(stream.errors[:3]))
        state = check_serve_state(index, stream, base)
        result.leftovers = leftovers(index)
        add_one_more(index, fx.extra)
        result.leftovers_after = leftovers(index)
        result.state = state
    except Inconsistent as err:
        result.detail = str(err)
    return result


def warm_up(stream: WriteStream, timeout: float = 120.0) -> None:
    """Wait for the stream's first acknowledged add (the server's first add also decodes
    every indexed case's media for the near-duplicate check): the kill clock starts then."""
    end = time.monotonic() + timeout
    while not stream.added and stream.is_alive() and time.monotonic() < end:
        time.sleep(0.01)
    if not stream.added:
        raise Inconsistent(f"the serve stream's first add failed: {stream.errors[:3]}")


def measure_serve(fx: Fixtures, media: list, work: Path) -> float:
    """Seconds a fresh server takes for SERVE_OPS writes of the stream after its first."""
    index = work / "index"
    shutil.copytree(fx.index, index)
    server = Server(index, work / "serve.log")
    stream = WriteStream(server.url, media, "measure")
    stream.start()
    try:
        warm_up(stream)
    except Inconsistent as err:
        server.kill()
        raise SystemExit(str(err)) from err
    t0 = time.monotonic()
    while len(stream.added) + len(stream.deleted) < SERVE_OPS + 1 and stream.is_alive():
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    stream.stop.set()
    stream.join(timeout=60)
    server.kill()
    if stream.errors:
        raise SystemExit(f"the serve stream was refused: {stream.errors[:3]}")
    return elapsed


# ---------------------------------------------------------------------------- driver


def kill_moments(duration: float, kills: int, rng: np.random.Generator) -> list[float]:
    """`kills` moments in (0, duration): one uniform draw in each of `kills` equal slices."""
    return [float((i + rng.uniform()) * duration / kills) for i in range(kills)]


def one_shot_writer(name: str, fx: Fixtures) -> OneShotWriter:
    writers = {"ingest": IngestWriter, "index": IndexWriter, "train": TrainWriter}
    return {**writers, "embed": EmbedWriter}[name](fx)


def writer_trials(name: str, fx: Fixtures, kills: int, seed: int, work: Path) -> dict:
    """Measure the writer's duration, then `kills` killed runs; the writer's record."""
    from tqdm import tqdm

    rng = np.random.default_rng([seed, WRITERS.index(name)])
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if name == "serve":
        media = _media_pool(fx.extra)
        base = set(load_index_folder(fx.index).catalog["case_id"].to_list())
        duration = measure_serve(fx, media, work / "measure")

        def trial_fn(path: Path, delay: float) -> Trial:
            return serve_trial(fx, media, path, delay, base)
    else:
        writer = one_shot_writer(name, fx)
        measure = work / "measure"
        measure.mkdir()
        writer.setup(measure)
        duration = timed(lambda: run_to_end(writer.command(measure, False), measure / "log"))

        def trial_fn(path: Path, delay: float) -> Trial:
            return one_shot_trial(writer, path, delay)

    trials = []
    for i, delay in enumerate(tqdm(kill_moments(duration, kills, rng), desc=name, unit="kill")):
        trials.append(trial_fn(work / f"kill-{i:03d}", delay))
    return {"writer": name, "duration_s": round(duration, 2), "trials": trials}


def summary_row(record: dict) -> dict:
    trials = record["trials"]
    return {
        "writer": record["writer"],
        "duration_s": record["duration_s"],
        "kills": len(trials),
        "old": sum(t.state == "old" for t in trials),
        "new": sum(t.state == "new" for t in trials),
        "failures": sum(t.state == "failure" for t in trials),
        "leftovers": sum(t.leftovers for t in trials),
        "leftovers_after": sum(t.leftovers_after for t in trials),
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"{'writer':<8} {'duration s':>10} {'kills':>5} {'old-state loads':>15} "
        f"{'new-state loads':>15} {'failures':>8} {'temporaries left':>16} {'after next write':>16}"
    )
    for r in rows:
        print(
            f"{r['writer']:<8} {r['duration_s']:>10.1f} {r['kills']:>5} {r['old']:>15} "
            f"{r['new']:>15} {r['failures']:>8} {r['leftovers']:>16} {r['leftovers_after']:>16}"
        )


def run_trials(
    writers: tuple[str, ...], kills: int, seed: int, work: Path, fixtures: Fixtures | None = None
) -> dict:
    """Every writer's trials under `work`; the JSON-ready report."""
    fx = fixtures or build_fixtures(work / "fixtures", seed)
    records = [writer_trials(w, fx, kills, seed, work / w) for w in writers]
    rows = [summary_row(r) for r in records]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": seed,
        "kills_per_writer": kills,
        "summary": rows,
        "trials": [asdict(t) for r in records for t in r["trials"]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs per writer.")
    p.add_argument("--writers", default=",".join(WRITERS), help="Comma-separated subset.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/crash_trials.json")
    p.add_argument("--workdir", type=Path, default=None, help="Kept when given.")
    args = p.parse_args(argv)
    writers = tuple(w.strip() for w in args.writers.split(",") if w.strip())
    bad = [w for w in writers if w not in WRITERS]
    if bad or args.kills < 1:
        p.error(f"--writers must be among {', '.join(WRITERS)} and --kills >= 1 (got {bad})")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="crash-trials-"))
    try:
        report = run_trials(writers, args.kills, args.seed, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(report["summary"])
    for t in report["trials"]:
        if t["state"] == "failure":
            print(f"FAILED {t['writer']} at {t['kill_at_s']} s: {t['detail']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 1 if any(r["failures"] for r in report["summary"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
