"""Soak test: `fundus2video serve` under a day-like mix of requests for minutes on end.

A locust load (its own process: locust's gevent monkey-patching never reaches this
process, the server or pytest) drives a `fundus2video serve` subprocess on a tmp copy of
an index folder (`--index`; by default a tiny phantom index built on the spot: a 24-case
phantom, a micro generator and embedder, as the tests' `tiny_index`). Each simulated
client waits 0.2-1 s between requests and picks one of `MIX` by weight: searches by case
id and by upload (direct and through synthesis), generation, browsing (pages, cases, CF
PNG, an FFA MP4 byte range), unknown case ids (the expected 404s), and adds of new cases
(a second phantom cohort, disjoint per client) each deleted by a later request.

Reported per route: count, p50/p95/p99 ms, expected 4xx, unexpected 4xx, 5xx and
transport errors (after `--warmup-s`; warm-up requests are counted apart); the server's
RSS and open descriptors (`/proc/PID/status`, `/proc/PID/fd`) every `--sample-every`
seconds. Pass: no 5xx, no unexpected 4xx and no transport error anywhere (warm-up
included); RSS growth from the end of the warm-up to the end at most `--rss-tolerance-mb`
(50 MB: an absolute bound, since most of the RSS is torch's and the model's, which a
percentage would only loosen); descriptors within `--fd-tolerance` (5) of the start
under load (the clients still connected) and, idle, after the load as before it.

    .venv/bin/python benchmarks/soak.py                       # 16 clients, 10 minutes
    .venv/bin/python benchmarks/soak.py --clients 2 --minutes 0.5 --warmup-s 5
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--locust-plan" in sys.argv:
    # the load process only: patch before anything imports socket, ssl or threading
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# route template → (weight, statuses that answer it correctly, expected 4xx statuses)
MIX: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "GET /cases/{case_id}/similar": (30, (200,), ()),
    "POST /search via=direct": (14, (200,), ()),
    "POST /search via=synthesis": (4, (200,), ()),
    "POST /generate": (3, (200,), ()),
    "GET /cases": (8, (200,), ()),
    "GET /cases/{case_id}": (10, (200,), ()),
    "GET /cases/{case_id} unknown": (1, (), (404,)),
    "GET /cases/{case_id}/cf": (8, (200,), ()),
    "GET /cases/{case_id}/ffa Range": (8, (206,), ()),
    "POST /cases": (2, (201,), (409,)),
    "DELETE /cases/{case_id}": (2, (200,), ()),
}
KEY_HEADER = "X-API-Key"  # the write key, sent with every request
POOL_PER_CLIENT = 2  # new cases each client adds (and deletes) in turn


# ---------------------------------------------------------------------------- the index


def build_tiny_index(root: Path) -> Path:
    """The tests' tiny model and its index under `root` (`retrieval.testing.build_micro_index`)."""
    from retrieval.testing import build_micro_index

    return build_micro_index(root)[2]


def add_pool(root: Path, clients: int, seed: int) -> list[list[dict[str, Any]]]:
    """New cases for the adds: a phantom cohort (not in the index), POOL_PER_CLIENT a
    client, so no two clients ever add the same media."""
    from retrieval.data.cohort import Cohort
    from retrieval.data.phantom import write_phantom_cohort

    cases = clients * POOL_PER_CLIENT
    write_phantom_cohort(root, cases=cases, size=64, frames=6, seed=seed, progress=False)
    rows = [
        {
            "cf": str(c.cf_path),
            "ffa": str(c.ffa_path),
            "eye": c.eye,
            "diagnosis": c.diagnosis,
            "times": ",".join(f"{t:g}" for t in c.ffa_times_s or ()),
        }
        for c in Cohort.open(root).cases()
    ]
    return [rows[i::clients] for i in range(clients)]


# --------------------------------------------------------------------------- the server


def server_env(key: str) -> dict[str, str]:
    """The server's environment: `key` as its write key (which also reads), no rate limits
    (an empty limit is none), one OpenMP thread; no other FUNDUS2VIDEO_* setting."""
    from retrieval.api.settings import Settings

    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNDUS2VIDEO_")}
    env["OMP_NUM_THREADS"] = "1"
    for name in Settings.model_fields:
        if name == "write_key":
            env["FUNDUS2VIDEO_WRITE_KEY"] = key
        elif name.startswith("rate_"):
            env[f"FUNDUS2VIDEO_{name.upper()}"] = ""
    return env


def start_server(index: Path, log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`fundus2video serve INDEX` on a free port; the process and its base URL once /ready
    answers."""
    from retrieval.apps.processes import free_port, wait_http

    port = free_port()
    cli = Path(sys.executable).parent / "fundus2video"
    command = [str(cli), "serve", str(index), "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(  # in the log's folder: no stray .env file read
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent
        )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ready", timeout=180, alive=lambda: proc.poll() is None)
    return proc, url


def server_log_tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def process_sample(pid: int) -> dict[str, float]:
    """The resident memory (MB, VmRSS) and the open file descriptors of process `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line[:6] == "VmRSS:")
    return {"rss_mb": round(rss_kb / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def query_files(url: str, ids: list[str], folder: Path, headers: dict[str, str]) -> list[str]:
    """Up to 8 of the served cases' CF photos, fetched over HTTP, as query PNG files."""
    import httpx

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for case_id in ids[:8]:
        r = httpx.get(f"{url}/cases/{case_id}/cf", headers=headers, timeout=60)
        r.raise_for_status()
        path = folder / f"{len(paths)}.png"
        path.write_bytes(r.content)
        paths.append(str(path))
    return paths


def case_ids(url: str, headers: dict[str, str]) -> list[str]:
    import httpx

    r = httpx.get(f"{url}/cases", params={"limit": 500}, headers=headers, timeout=60)
    r.raise_for_status()
    ids = [item["case_id"] for item in r.json()["items"]]
    if not ids:
        raise SystemExit("--index: the index holds no case")
    return ids


# ----------------------------------------------------------------------------- the load


class Sampler(threading.Thread):
    """Samples the server's RSS and descriptors every `every` seconds, and on demand."""

    def __init__(self, pid: int, every: float):
        super().__init__(daemon=True)
        self.pid, self.every, self.t0 = pid, every, time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self.phase = "warmup"
        self._halt = threading.Event()

    def sample(self, phase: str | None = None) -> dict[str, Any]:
        row = {"t_s": round(time.monotonic() - self.t0, 1), "phase": phase or self.phase}
        row.update(process_sample(self.pid))
        self.samples.append(row)
        return row

    def run(self) -> None:
        while not self._halt.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_load(plan: dict[str, Any], workdir: Path, sampler: Sampler) -> dict[str, Any]:
    """Run the locust process on `plan`; sample the server at the end of its warm-up."""
    from tqdm import tqdm

    plan_path = workdir / "plan.json"
    plan_path.write_text(json.dumps(plan))
    command = [sys.executable, str(Path(__file__).resolve()), "--locust-plan", str(plan_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    total = plan["warmup_s"] + plan["seconds"]
    with tqdm(total=round(total), unit="s", desc="soak", disable=not plan["progress"]) as bar:
        for line in proc.stdout:
            event = line.strip()
            if event == "warm":
                sampler.phase = "load"
                sampler.sample("start")
            elif event == "ending":  # the last moment of the load: clients still connected
                sampler.sample("end")
            elif event.startswith("tick "):
                bar.n = min(round(float(event.split()[1])), bar.total)
                bar.refresh()
    if proc.wait() != 0:
        raise RuntimeError(f"the locust process failed (exit {proc.returncode})")
    return json.loads(Path(plan["records"]).read_text())


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return round(float(np.percentile(values, q)), 1) if values else None


def route_rows(records: dict[str, Any], phase: str) -> dict[str, dict[str, Any]]:
    """Per route of MIX: count, p50/p95/p99 ms and the answers by kind for one phase."""
    rows = {}
    for route, (_, good, expected) in MIX.items():
        calls = records[phase].get(route, [])
        statuses = Counter(status for status, _ in calls)
        ms = [t for _, t in calls]
        rows[route] = {
            "count": len(calls),
            "p50_ms": percentile(ms, 50),
            "p95_ms": percentile(ms, 95),
            "p99_ms": percentile(ms, 99),
            "ok": sum(n for s, n in statuses.items() if s in good),
            "expected_4xx": sum(n for s, n in statuses.items() if s in expected),
            "unexpected_4xx": sum(
                n for s, n in statuses.items() if 400 <= s < 500 and s not in expected
            ),
            "5xx": sum(n for s, n in statuses.items() if s >= 500),
            "transport_errors": statuses.get(0, 0),
            "other": sum(n for s, n in statuses.items() if 0 < s < 400 and s not in good),
            "statuses": {str(s): n for s, n in sorted(statuses.items())},
        }
    return rows


def verdict(report: dict[str, Any], rules: dict[str, float]) -> dict[str, Any]:
    """The pass/fail rules over the report's routes and samples."""
    rows = [*report["routes"].values(), *report["warmup_routes"].values()]
    bad = {k: sum(r[k] for r in rows) for k in ("5xx", "unexpected_4xx", "transport_errors")}
    bad["other"] = sum(r["other"] for r in rows)
    start, end = report["server"]["start"], report["server"]["end"]
    growth = end["rss_mb"] - start["rss_mb"]
    allowed = rules["rss_tolerance_mb"]
    fd_change = end["fds"] - start["fds"]
    idle_fd_change = report["server"]["after"]["fds"] - report["server"]["before"]["fds"]
    fds = rules["fd_tolerance"]
    load = [x for x in report["server"]["samples"] if x["phase"] in ("start", "load", "end")]
    middle = min(load, key=lambda x: abs(x["t_s"] - (start["t_s"] + end["t_s"]) / 2))
    checks = {
        "no 5xx": bad["5xx"] == 0,
        "no unexpected 4xx or other status": bad["unexpected_4xx"] + bad["other"] == 0,
        "no transport error": bad["transport_errors"] == 0,
        f"RSS growth <= {allowed:.0f} MB": growth <= allowed,
        f"descriptors within +/-{fds:.0f} (under load)": abs(fd_change) <= fds,
        f"descriptors within +/-{fds:.0f} (idle, before and after)": abs(idle_fd_change) <= fds,
    }
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "counts": bad,
        "rss_growth_mb": round(growth, 1),
        "rss_growth_second_half_mb": round(end["rss_mb"] - middle["rss_mb"], 1),
        "rss_allowed_mb": round(allowed, 1),
        "fd_change": fd_change,
        "idle_fd_change": idle_fd_change,
    }


def prepare_index(index: Path | None, workdir: Path) -> Path:
    """A writable copy of `index`, or a freshly built tiny index."""
    if index is None:
        print("building a tiny phantom index (phantom, micro generator, embedder) ...")
        return build_tiny_index(workdir / "tiny")
    if not (index / "manifest.json").is_file():
        raise SystemExit(f"--index: {index} is not an index folder (no manifest.json)")
    shutil.copytree(index, workdir / "index")
    return workdir / "index"


def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Build or copy the index, serve it, run the load and collect the report."""
    index = prepare_index(args.index, workdir)
    pools = add_pool(workdir / "pool", args.clients, seed=args.seed + 1000)
    write_key = f"soak-{random.Random(args.seed).getrandbits(64):016x}"
    headers = {KEY_HEADER: write_key}
    proc, url = start_server(index, workdir / "server.log", server_env(write_key))
    try:
        ids = case_ids(url, headers)
        plan = {
            "url": url,
            "case_ids": ids,
            "queries": query_files(url, ids, workdir / "queries", headers),
            "pools": pools,
            "clients": args.clients,
            "seconds": args.minutes * 60,
            "warmup_s": args.warmup_s,
            "wait_s": [0.2, 1.0],
            "seed": args.seed,
            "headers": headers,
            "records": str(workdir / "records.json"),
            "progress": not args.quiet,
        }
        sampler = Sampler(proc.pid, args.sample_every)
        sampler.sample("before")
        load_before = os.getloadavg()
        sampler.start()
        records = run_load(plan, workdir, sampler)
        sampler.stop()
        time.sleep(1.0)  # the clients' connections closed
        sampler.sample("after")
    except Exception:
        print(f"server log (tail):\n{server_log_tail(workdir / 'server.log')}", file=sys.stderr)
        raise
    finally:
        from retrieval.apps.processes import stop_process

        stop_process(proc)
    samples = sampler.samples
    start, end = (next(s for s in samples if s["phase"] == p) for p in ("start", "end"))
    return {
        "clients": args.clients,
        "minutes": args.minutes,
        "warmup_s": args.warmup_s,
        "index": str(args.index or "tiny phantom index (built)"),
        "cases": len(ids),
        "mix": {route: weight for route, (weight, _, _) in MIX.items()},
        "routes": route_rows(records, "load"),
        "warmup_routes": route_rows(records, "warmup"),
        "server": {
            "start": start,
            "end": end,
            "before": samples[0],
            "after": samples[-1],
            "samples": samples,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m_before": round(load_before[0], 2),
            "load_average_1m_end": round(os.getloadavg()[0], 2),
        },
        "server_log_tail": server_log_tail(workdir / "server.log"),
        "requests_per_s": round(sum(len(v) for v in records["load"].values()) / plan["seconds"], 2),
    }


def print_table(report: dict[str, Any]) -> None:
    head = f"{'route':34} {'count':>6} {'p50':>7} {'p95':>7} {'p99':>7} {'4xx exp':>7} "
    print(head + f"{'4xx unexp':>9} {'5xx':>4} {'transport':>9}")
    for route, r in report["routes"].items():
        ms = " ".join(
            f"{r[k] if r[k] is not None else '-':>7}" for k in ("p50_ms", "p95_ms", "p99_ms")
        )
        print(
            f"{route:34} {r['count']:>6} {ms} {r['expected_4xx']:>7} "
            f"{r['unexpected_4xx']:>9} {r['5xx']:>4} {r['transport_errors']:>9}"
        )
    s, v = report["server"], report["verdict"]
    print(
        f"server RSS {s['start']['rss_mb']} MB after warm-up → {s['end']['rss_mb']} MB at the end "
        f"(growth {v['rss_growth_mb']} MB, allowed {v['rss_allowed_mb']} MB; second half "
        f"{v['rss_growth_second_half_mb']} MB); descriptors "
        f"{s['start']['fds']} → {s['end']['fds']} under load, {s['before']['fds']} → "
        f"{s['after']['fds']} idle; {report['requests_per_s']} requests/s"
    )
    for check, ok in v["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {check}")
    print("PASSED" if v["passed"] else "FAILED")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` through a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--index", type=Path, help="An index folder (copied; default: build a tiny one)."
    )
    p.add_argument("--clients", type=int, default=16, help="Concurrent simulated clients.")
    p.add_argument("--minutes", type=float, default=10.0, help="Load after the warm-up.")
    p.add_argument("--warmup-s", type=float, default=180.0, help="Load before the start sample.")
    p.add_argument("--sample-every", type=float, default=30.0, help="Seconds between samples.")
    p.add_argument(
        "--rss-tolerance-mb", type=float, default=50.0, help="Most RSS growth after warm-up."
    )
    p.add_argument("--fd-tolerance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    args = p.parse_args(argv)
    for name in ("clients", "minutes", "sample_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.warmup_s < 0:
        p.error(f"--warmup-s must be >= 0 (got {args.warmup_s})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        report = soak(args, Path(tmp))
    report["verdict"] = verdict(report, vars(args))
    report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report["command"] = " ".join(
        ["benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])]
    )
    write_json(args.out, report)
    print_table(report)
    print(f"wrote {args.out}")
    return 0 if report["verdict"]["passed"] else 1


# ------------------------------------------------------- the load process (gevent, locust)


class SoakTasks:
    """The simulated client's requests, one method per route of MIX (the locust user class
    is built on it in the load process: `user_class`)."""

    plan: dict[str, Any] = {}
    query_bytes: list[bytes] = []
    started = 0

    def on_start(self) -> None:
        cls = type(self)
        self.uid, cls.started = cls.started, cls.started + 1
        self.rng = random.Random(self.plan["seed"] * 1000 + self.uid)
        self.pool = self.plan["pools"][self.uid % len(self.plan["pools"])]
        self.added: str | None = None
        self.adds = 0
        self.tour = list(TOUR)
        self.client.headers.update(self.plan["headers"])

    def next_request(self) -> None:
        """Each client first makes every request of the mix once (an add first, its delete
        last), then picks them by weight."""
        if self.tour:
            name = self.tour.pop(0)
        else:
            name = self.rng.choices(list(TASKS), weights=list(TASKS.values()))[0]
        getattr(self, name)()

    def call(self, route: str, method: str, path: str, **kw) -> int:
        with self.client.request(method, path, name=route, catch_response=True, **kw) as r:
            r.success()  # the answer is classified by the report, per route
            return r.status_code

    def case(self) -> str:
        return self.rng.choice(self.plan["case_ids"])

    def upload(self) -> dict:
        return {"file": ("query.png", self.rng.choice(self.query_bytes), "image/png")}

    def similar(self) -> None:
        params = {"k": 10, "target": self.rng.choice(["cf", "ffa", "both"])}
        path = f"/cases/{self.case()}/similar"
        self.call("GET /cases/{case_id}/similar", "GET", path, params=params)

    def search_direct(self) -> None:
        data = {"target": self.rng.choice(["cf", "ffa"]), "k": "10", "via": "direct"}
        self.call("POST /search via=direct", "POST", "/search", data=data, files=self.upload())

    def search_synthesis(self) -> None:
        data = {"target": "ffa", "k": "10", "via": "synthesis"}
        self.call("POST /search via=synthesis", "POST", "/search", data=data, files=self.upload())

    def generate(self) -> None:
        self.call("POST /generate", "POST", "/generate", files=self.upload())

    def list_cases(self) -> None:
        params = {"offset": self.rng.randrange(len(self.plan["case_ids"])), "limit": 20}
        self.call("GET /cases", "GET", "/cases", params=params)

    def get_case(self) -> None:
        self.call("GET /cases/{case_id}", "GET", f"/cases/{self.case()}")

    def unknown_case(self) -> None:
        path = f"/cases/no-such-case-{self.rng.randrange(10**6)}"
        self.call("GET /cases/{case_id} unknown", "GET", path)

    def cf(self) -> None:
        self.call("GET /cases/{case_id}/cf", "GET", f"/cases/{self.case()}/cf")

    def ffa(self) -> None:
        path, byte_range = f"/cases/{self.case()}/ffa", {"Range": "bytes=0-4095"}
        self.call("GET /cases/{case_id}/ffa Range", "GET", path, headers=byte_range)

    def write(self) -> None:
        """Add a new case when this client holds none, else delete the one it added."""
        if self.added is not None:
            path, self.added = f"/cases/{self.added}", None
            self.call("DELETE /cases/{case_id}", "DELETE", path)
            return
        new = self.pool[self.adds % len(self.pool)]
        case_id = f"soak-{self.uid}-{self.adds}"
        self.adds += 1
        data = {"case_id": case_id, "split": "train", "ffa_times_s": new["times"]}
        data.update({k: new[k] for k in ("eye", "diagnosis") if new[k]})
        files = {
            "cf": ("cf.png", Path(new["cf"]).read_bytes(), "image/png"),
            "ffa": ("ffa.mp4", Path(new["ffa"]).read_bytes(), "video/mp4"),
        }
        status = self.call("POST /cases", "POST", "/cases", data=data, files=files)
        if status == 201:
            self.added = case_id


TASKS = {  # SoakTasks method → weight (write: the adds and the deletes, alternating)
    "similar": MIX["GET /cases/{case_id}/similar"][0],
    "search_direct": MIX["POST /search via=direct"][0],
    "search_synthesis": MIX["POST /search via=synthesis"][0],
    "generate": MIX["POST /generate"][0],
    "list_cases": MIX["GET /cases"][0],
    "get_case": MIX["GET /cases/{case_id}"][0],
    "unknown_case": MIX["GET /cases/{case_id} unknown"][0],
    "cf": MIX["GET /cases/{case_id}/cf"][0],
    "ffa": MIX["GET /cases/{case_id}/ffa Range"][0],
    "write": MIX["POST /cases"][0] + MIX["DELETE /cases/{case_id}"][0],
}
TOUR = ("write", *(name for name in TASKS if name != "write"), "write")  # add, ..., delete


def user_class(plan: dict[str, Any]) -> type:
    """The locust user class of `plan` (locust is imported here: the load process only)."""
    from locust import HttpUser, between

    attrs = {
        "host": plan["url"],
        "wait_time": between(*plan["wait_s"]),
        "tasks": [SoakTasks.next_request],
        "plan": plan,
        "query_bytes": [Path(q).read_bytes() for q in plan["queries"]],
    }
    return type("SoakUser", (SoakTasks, HttpUser), attrs)


def locust_main(plan_path: str) -> int:
    """The load process: `plan["clients"]` users for warm-up + seconds; every request's
    status and time (ms) by route and phase, written to `plan["records"]`."""
    import gevent
    from locust.env import Environment

    plan = json.loads(Path(plan_path).read_text())
    records: dict[str, dict[str, list]] = {"warmup": defaultdict(list), "load": defaultdict(list)}
    phase = {"now": "warmup" if plan["warmup_s"] > 0 else "load"}
    env = Environment(user_classes=[user_class(plan)], events=None)

    def on_request(name, response_time, response, exception, **_) -> None:
        if phase["now"] == "done":  # requests cut short by the stop
            return
        status = 0 if response is None or exception else int(response.status_code or 0)
        records[phase["now"]][name].append((status, round(response_time, 2)))

    env.events.request.add_listener(on_request)
    runner = env.create_local_runner()
    runner.start(plan["clients"], spawn_rate=plan["clients"])
    t0 = time.monotonic()
    if plan["warmup_s"] <= 0:
        print("warm", flush=True)
    while (elapsed := time.monotonic() - t0) < plan["warmup_s"] + plan["seconds"]:
        if phase["now"] == "warmup" and elapsed >= plan["warmup_s"]:
            phase["now"] = "load"
            print("warm", flush=True)
        print(f"tick {elapsed:.0f}", flush=True)
        gevent.sleep(1.0)
    print("ending", flush=True)
    gevent.sleep(1.0)  # the load goes on while the server is sampled
    phase["now"] = "done"
    runner.quit()
    write_json(Path(plan["records"]), records)
    return 0


if __name__ == "__main__":
    if "--locust-plan" in sys.argv:
        sys.exit(locust_main(sys.argv[sys.argv.index("--locust-plan") + 1]))
    sys.exit(main())
