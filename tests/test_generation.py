"""Cohort-level generator jobs through the CLI: train, resume, generate, evaluate."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from encoder import create_generator, synthesize
from encoder.testing import micro_scale
from encoder.train import GeneratorTrainOptions
from retrieval.apps import cli
from retrieval.apps.cli import app
from retrieval.data.cohort import Cohort
from retrieval.data.media import read_cf, read_ffa
from retrieval.data.media_write import mark_synthetic
from retrieval.data.phantom import write_phantom_cohort
from retrieval.data.registration import register_cohort
from retrieval.models.generation import VARIANTS, train_run

runner = CliRunner()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "cohort"
    write_phantom_cohort(path, cases=16, size=64, frames=5, seed=2, progress=False)
    return path


@pytest.fixture(scope="module")
def run(cohort):
    path = cohort.parent / "run"
    result = runner.invoke(
        app, ["train", str(cohort), "--out", str(path), "--iters", "2", "--stage", "generator"]
    )
    assert result.exit_code == 0, result.output
    return path


def test_train_records_training_patients_and_resumes(cohort, run):
    info = json.loads((run / "training_options.json").read_text())["data"]
    assert info["frames"] == 5 and len(info["median_times_s"]) == 5
    assert info["patient_ids"] and (run / "generator.safetensors").is_file()
    again = runner.invoke(
        app,
        [
            "train",
            str(cohort),
            "--out",
            str(run),
            "--iters",
            "3",
            "--resume",
            "--stage",
            "generator",
        ],
    )
    assert again.exit_code == 0, again.output
    assert "3 iterations" in again.output
    refused = runner.invoke(
        app, ["train", str(cohort), "--out", str(run), "--iters", "3", "--stage", "generator"]
    )
    assert refused.exit_code == 2 and "already holds files" in refused.output


def test_train_variant_sets_the_runs_flags(cohort, tmp_path):
    """--variant names a set of GeneratorTrainOptions flags, recorded in the run; the
    per-frame generator saves no knowledge-aware D when that is dropped too."""
    out = tmp_path / "pfnk"
    result = runner.invoke(
        app,
        ["train", str(cohort), "--out", str(out), "--iters", "1", "--stage", "generator",
         "--variant", "per-frame-no-knowledge-discriminator"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    opts = json.loads((out / "training_options.json").read_text())
    assert opts["autoregressive"] is False and opts["knowledge_discriminator"] is False
    assert opts["knowledge_mask"] is True and create_generator(out).config.autoregressive is False
    state = load_file(str(out / "training-state.safetensors"))
    assert not any(k.startswith("D_knowledge.") for k in state)
    bad = runner.invoke(
        app, ["train", str(cohort), "--out", str(tmp_path / "x"), "--iters", "1",
              "--stage", "generator", "--variant", "per-frame-no-mask"],
    )  # fmt: skip
    assert bad.exit_code == 2 and "--variant must be one of" in bad.output


def test_the_default_variant_is_the_options_defaults():
    """`train` without --variant, `train_run` without flags and `make demo` train the same
    generator: the CLI's default variant's flags are GeneratorTrainOptions' defaults."""
    defaults = GeneratorTrainOptions(iters=1)
    default = VARIANTS[inspect.signature(cli.train).parameters["variant"].default]
    for name, flags in VARIANTS.items():
        assert flags.keys() == default.keys(), name  # every flag explicit
    assert all(getattr(defaults, k) == v for k, v in default.items())
    # a run recorded before the flag existed had the knowledge-aware discriminator
    assert GeneratorTrainOptions.from_dict({"iters": 1}).knowledge_discriminator is True


def test_generate_writes_a_marked_video(cohort, run, tmp_path):
    cf_path = sorted((cohort / "cf").iterdir())[0]
    out = tmp_path / "fake.mp4"
    result = runner.invoke(
        app, ["generate", str(run), str(cf_path), "--out", str(out), "--times", "5,20,60"]
    )
    assert result.exit_code == 0, result.output
    frames = read_ffa(out)  # (T, H, W)
    assert frames.shape[0] == 3
    plain = synthesize(create_generator(run), read_cf(cf_path), [5, 20, 60])
    marked = mark_synthetic(plain)
    assert not np.array_equal(marked, plain)
    changed = np.any(marked != plain, axis=0)  # (H, W): only the label band
    assert changed[: plain.shape[1] // 4, : plain.shape[2] // 2].sum() == changed.sum()
    assert np.abs(frames.astype(int) - marked.astype(int)).mean() < 6  # H.264 is lossy


def test_generate_refuses_unreadable_input(run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    result = runner.invoke(app, ["generate", str(run), str(bad), "--out", str(tmp_path / "x.mp4")])
    assert result.exit_code == 2 and "bad.png" in result.output
    assert not (tmp_path / "x.mp4").exists()


def test_evaluate_reports_models_and_baselines_on_held_out_patients(cohort, run, tmp_path):
    out = tmp_path / "report.json"
    args = ["evaluate", str(run), str(cohort), "--out", str(out), "--compare", f"again={run}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"model", "again"}
    assert set(report["baselines"]) == {"train_mean", "cf_green"}
    assert report["models"]["model"] == report["models"]["again"]  # deterministic synthesis
    assert report["distribution_metric"] == "fvd_proxy" and "psnr" in result.output
    assert {"vessel_auc", "vessel_dice", "curve_mae"} <= set(report["baselines"]["cf_green"])
    assert "vessel_auc" in result.output and "curve_mae" in result.output  # the printed table
    curves = report["brightness_curves"]
    assert set(curves["models"]) == {"model", "again"} and len(curves["real"]) == report["frames"]
    leak = runner.invoke(
        app,
        [
            "evaluate",
            str(run),
            str(cohort),
            "--split",
            "train",
            "--out",
            str(tmp_path / "leak.json"),
        ],
    )
    assert leak.exit_code == 2 and "shares" in leak.output
    assert not (tmp_path / "leak.json").exists()


def test_train_records_how_many_pairs_are_registered(tmp_path, caplog):
    cohort = write_phantom_cohort(
        tmp_path / "c", cases=6, size=64, frames=5, seed=2, progress=False
    )
    kw = {"scale": micro_scale(32), "iters": 1, "preview_every": 0, "progress": False}

    def trained(out):
        caplog.clear()
        train_run(cohort, tmp_path / out, **kw)
        warned = any("never registered" in r.getMessage() for r in caplog.records)
        info = json.loads((tmp_path / out / "training_options.json").read_text())["data"]
        return info["registered_pairs"], warned, (tmp_path / out / "log.txt").read_text()

    with caplog.at_level("WARNING", logger="retrieval"):
        registered, warned, log_text = trained("before")
        assert registered == 0 and warned and "registered_pairs" in log_text
        register_cohort(cohort, progress=False)
        train = Cohort.open(cohort).cases("train")
        ok = sum(case.registration_status == "ok" for case in train)
        assert ok > 0
        registered, warned, _ = trained("after")
    assert registered == ok and not warned  # a pair whose registration failed is not news
