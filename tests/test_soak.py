"""The soak benchmark, shortened: 2 clients for ~20 s against `fundus2video serve`.

It runs `benchmarks/soak.py` as its own process (locust's gevent patching stays out of
pytest's) on the tiny index, and checks its JSON: no server error, no unexpected answer,
every route of the mix exercised, the server sampled.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    # found, never imported: importing locust monkey-patches this process with gevent
    pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs locust"),
]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def soak_report(tiny_index, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "soak.py"),
        *("--index", str(tiny_index.index), "--clients", "2", "--minutes", "0.3"),
        *("--warmup-s", "3", "--sample-every", "5", "--out", str(out), "--quiet"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert out.is_file(), run.stdout + run.stderr
    return json.loads(out.read_text())


def test_soak_gets_no_server_error(soak_report):
    counts = soak_report["verdict"]["counts"]
    assert counts == {"5xx": 0, "unexpected_4xx": 0, "transport_errors": 0, "other": 0}
    assert soak_report["verdict"]["checks"]["no 5xx"] is True


def test_soak_exercises_every_route_of_the_mix(soak_report):
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)  # stdlib imports only: locust is not imported here
    mix = soak.MIX
    assert "locust" not in sys.modules
    routes = soak_report["routes"]
    warmup = soak_report["warmup_routes"]
    assert set(routes) == set(mix)
    for route in mix:
        calls = routes[route]["count"] + warmup[route]["count"]
        assert calls > 0, f"{route} was never called"
    assert (
        routes["GET /cases/{case_id} unknown"]["expected_4xx"]
        + warmup["GET /cases/{case_id} unknown"]["expected_4xx"]
        > 0
    )
    adds = routes["POST /cases"]["ok"] + warmup["POST /cases"]["ok"]
    deletes = routes["DELETE /cases/{case_id}"]["ok"] + warmup["DELETE /cases/{case_id}"]["ok"]
    assert adds > 0 and deletes > 0


def test_soak_samples_the_server(soak_report):
    server = soak_report["server"]
    phases = [s["phase"] for s in server["samples"]]
    assert phases[0] == "before" and {"start", "end"} <= set(phases) and phases[-1] == "after"
    for sample in server["samples"]:
        assert sample["rss_mb"] > 0 and sample["fds"] > 0
