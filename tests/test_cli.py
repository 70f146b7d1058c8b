"""The command line: phantom → info, and errors that name what was wrong."""

from __future__ import annotations

import json

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
