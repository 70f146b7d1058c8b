"""The command line: phantom → info, and errors that name what was wrong."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from retrieval.apps.cli import app

runner = CliRunner()


def test_phantom_then_info(tmp_path):
    out, sheet = tmp_path / "cohort", tmp_path / "sheet.png"
    args = ["phantom", str(out), "--cases", "6", "--size", "64", "--frames", "4", "--seed", "1"]
    result = runner.invoke(app, [*args, "--preview", str(sheet)])
    assert result.exit_code == 0, result.output
    assert sheet.stat().st_size > 0
    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.output)
    assert summary["cases"] == 6 and sum(summary["by_split"].values()) == 6
    assert summary["ffa_frames"] == {"min": 4, "median": 4.0, "max": 4}
    assert summary["cf_sizes"] == {"64x64": 6}
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output


def test_bad_parameters_are_named(tmp_path):
    result = runner.invoke(app, ["phantom", str(tmp_path / "c"), "--size", "8"])
    assert result.exit_code == 2 and "--size" in result.output
    result = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not a folder" in result.output


def test_bad_input_exits_2_with_one_line_naming_it(tmp_path):
    missing = tmp_path / "missing.png"
    result = runner.invoke(app, ["search", str(tmp_path / "index"), str(missing)])
    assert result.exit_code == 2 and "missing.png" in result.output
    assert "no such file" in result.output and "Traceback" not in result.output
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = tmp_path / "cohort"
    args = ["phantom", str(out), "--cases", "2", "--size", "32", "--frames", "2"]
    result = runner.invoke(app, [*args, "--preview", str(blocker / "sheet.png")])
    assert result.exit_code == 2 and "--preview" in result.output and "sheet.png" in result.output
    result = runner.invoke(app, ["evaluate", "run", str(out), "--out", "r.json", "--split", "x"])
    assert result.exit_code == 2 and "split must be one of train, val, test" in result.output


@pytest.mark.parametrize("bug", [RuntimeError, ValueError, OSError, KeyError])
def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, bug):
    """Only the project's error classes are bad input: anything else is not turned into
    exit 2 and a one-line message."""
    import retrieval.data.info as info

    def broken(*args, **kwargs):
        raise bug("a bug in the library")

    monkeypatch.setattr(info, "cohort_summary", broken)
    out = tmp_path / "cohort"
    args = ["phantom", str(out), "--cases", "2", "--size", "32", "--frames", "2"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code not in (0, 2)
    assert isinstance(result.exception, bug) and "error:" not in result.output


def test_demo_reports_a_server_that_did_not_start_but_not_a_bug(tmp_path, monkeypatch):
    from retrieval.apps import demo
    from retrieval.errors import ServerError

    def no_server(*args, **kwargs):
        raise ServerError("http://127.0.0.1:1/health did not answer within 60 s")

    monkeypatch.setattr(demo, "prepare_demo", no_server)
    result = runner.invoke(app, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and "did not answer within 60 s" in result.output

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(demo, "prepare_demo", bug)
    result = runner.invoke(app, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)
