"""`fundus2video demo`: every stage runs once, a second run reuses them all."""

from __future__ import annotations

import json

import pytest

from retrieval.apps import demo, processes


def _fake_stages(monkeypatch, calls: list[str]) -> None:
    """Stand-ins for the heavy stages that write what the real ones would."""
    import retrieval.data.phantom as phantom
    import retrieval.models.embedding as embedding
    import retrieval.models.generation as generation

    class Summary:
        iterations, elapsed_s = 7, 0.1

    def cohort(out, **kwargs):
        calls.append("cohort")
        out.mkdir(parents=True)
        (out / "catalog.parquet").write_bytes(b"x")

    def train_run(cohort, out, **kwargs):
        calls.append("generator")
        out.mkdir(parents=True, exist_ok=True)
        return Summary()

    def train_embedder(run, cohort, **kwargs):
        calls.append("embedder")
        (run / "embedder").mkdir(parents=True)
        (run / "embedder" / "config.json").write_text("{}")
        return Summary()

    def build_index(run, cohort, out, **kwargs):
        calls.append("index")
        out.mkdir(parents=True)
        (out / "manifest.json").write_text("{}")
        return {"counts": {"cf": 1, "ffa": 1}}

    def evaluate(paths, progress):
        calls.append("evaluate")
        paths.report.write_text("{}")

    monkeypatch.setattr(phantom, "write_phantom_cohort", cohort)
    monkeypatch.setattr(generation, "train_run", train_run)
    monkeypatch.setattr(embedding, "train_embedder", train_embedder)
    monkeypatch.setattr(embedding, "build_index", build_index)
    monkeypatch.setattr(demo, "_evaluate", evaluate)


def test_prepare_demo_builds_once_then_reuses_everything(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_stages(monkeypatch, calls)
    said: list[str] = []
    paths = demo.prepare_demo(tmp_path / "d", say=said.append, progress=False)
    assert calls == ["cohort", "generator", "embedder", "index"]
    assert not demo.has_report(paths)
    demo.ensure_report(paths, progress=False, say=said.append)
    assert calls[-1] == "evaluate" and demo.has_report(paths)
    state = json.loads((paths.workdir / demo.STATE_FILE).read_text())
    assert state["generator"]["iterations"] == 7 and set(state) >= {"index", "report"}

    calls.clear()
    said.clear()
    paths = demo.prepare_demo(tmp_path / "d", say=said.append, progress=False)
    demo.ensure_report(paths, progress=False, say=said.append)
    assert calls == []
    assert sum("reusing" in line for line in said) == 4


def test_an_interrupted_stage_is_redone_with_everything_built_on_it(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_stages(monkeypatch, calls)
    paths = demo.prepare_demo(tmp_path / "d", say=lambda _: None, progress=False)
    demo.ensure_report(paths, progress=False, say=lambda _: None)
    state = json.loads((paths.workdir / demo.STATE_FILE).read_text())
    del state["embedder"]  # as if Ctrl-C hit while the embedder trained
    (paths.workdir / demo.STATE_FILE).write_text(json.dumps(state))

    calls.clear()
    demo.prepare_demo(tmp_path / "d", say=lambda _: None, progress=False)
    assert calls == ["embedder", "index"]
    assert not paths.report.exists() and not demo.has_report(paths)  # of the old model


def test_free_port_moves_off_a_taken_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert processes.free_port(taken) != taken
    assert processes.free_port() > 0  # any port the OS picks


def test_wait_http_names_a_server_that_exited_or_never_answered():
    from retrieval.errors import ServerError

    url = f"http://127.0.0.1:{processes.free_port()}/health"  # nothing listens there
    with pytest.raises(ServerError, match="exited before it answered"):
        processes.wait_http(url, alive=lambda: False)
    with pytest.raises(ServerError, match="did not answer within"):
        processes.wait_http(url, timeout=0.5)


def test_a_workdir_that_cannot_be_created_is_named(tmp_path):
    from retrieval.errors import Fundus2VideoError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(Fundus2VideoError, match="demo work folder .*file/d"):
        demo.prepare_demo(blocker / "d", say=lambda _: None, progress=False)


def test_the_dashboard_command_serves_ui_app():
    command = processes.dashboard_command("http://api:1", 8600, host="0.0.0.0")
    assert command[command.index("run") + 1] == str(processes.APP_PATH)
    assert processes.APP_PATH.parts[-2:] == ("ui", "app.py") and processes.APP_PATH.is_file()
    assert command[-2:] == ["--api", "http://api:1"] and "8600" in command


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path):
    """The real stages on a 40-case cohort with seconds of training, then a reuse."""
    said: list[str] = []
    kwargs = {"cases": 40, "generator_minutes": 0.2, "embed_minutes": 0.3, "progress": False}
    paths = demo.prepare_demo(tmp_path / "d", say=said.append, **kwargs)
    assert (paths.index / "manifest.json").is_file()
    api = demo.ApiThread(demo.demo_app(paths)).start()
    try:
        import httpx

        assert httpx.get(f"{api.url}/model", timeout=30).json()["report"] is None
        report = demo.start_report(paths)  # as serve_demo does: a child process
        report.join(600)
        assert report.exitcode == 0 and demo.has_report(paths)
        model = httpx.get(f"{api.url}/model", timeout=30).json()
        assert "models" in model["report"] and "backbones" in model["report"]["retrieval"]
        assert "generator" in model["curves"]
    finally:
        api.stop()

    said.clear()
    demo.prepare_demo(tmp_path / "d", say=said.append, **kwargs)
    assert sum("reusing" in line for line in said) == 4
