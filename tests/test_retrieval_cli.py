"""Embeddings through the CLI: `train --stage embed`, `index`, `search`, retrieval `evaluate`."""

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from index import load_index_folder, read_manifest
from retrieval.cli import app
from retrieval.cohort import Cohort

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_index_embeds_every_case(tiny_index, tmp_path):
    out = tmp_path / "idx"
    result = invoke("index", tiny_index.run, tiny_index.cohort, "--out", out)
    assert result.exit_code == 0, result.output
    cohort = Cohort.open(tiny_index.cohort)
    manifest = read_manifest(out)
    assert manifest["counts"] == {"cf": len(cohort), "ffa": len(cohort)}
    folder = load_index_folder(out)
    assert folder.catalog["case_id"].sort().to_list() == cohort.catalog["case_id"].sort().to_list()
    # deterministic: the same run and cohort give the same vectors
    again = tmp_path / "idx2"
    assert invoke("index", tiny_index.run, tiny_index.cohort, "--out", again).exit_code == 0
    assert read_manifest(again)["encoder_id"] == manifest["encoder_id"]


def test_index_refuses_a_run_without_embedder(tiny_index, tmp_path):
    result = invoke("index", tmp_path / "nope", tiny_index.cohort, "--out", tmp_path / "idx")
    assert result.exit_code != 0
    assert "no trained embedder" in result.output
    assert not (tmp_path / "idx").exists()


def test_search_by_cf_photo_and_by_video(tiny_index):
    case = Cohort.open(tiny_index.cohort).cases("test")[0]
    result = invoke("search", tiny_index.index, case.cf_path, "--target", "ffa", "--k", 5, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert [r["rank"] for r in out["results"]] == [1, 2, 3, 4, 5]
    assert {r["modality"] for r in out["results"]} == {"ffa"}
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)
    catalog = pl.read_parquet(tiny_index.cohort / "catalog.parquet")
    assert {r["case_id"] for r in out["results"]} <= set(catalog["case_id"])

    video = invoke("search", tiny_index.index, case.ffa_path, "--target", "cf", "--k", 3)
    assert video.exit_code == 0, video.output
    assert "rank" in video.output and len(video.output.strip().splitlines()) == 4

    synth = invoke(
        "search", tiny_index.index, case.cf_path, "--via", "synthesis", "--k", 2, "--json"
    )
    assert synth.exit_code == 0, synth.output
    assert json.loads(synth.output)["synthetic_query"]["synthetic"] is True


def test_search_reports_unreadable_query(tiny_index, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = invoke("search", tiny_index.index, bad)
    assert result.exit_code != 0
    assert "bad.png" in result.output


@pytest.mark.slow
def test_embed_stage_and_retrieval_report(tiny_index, tmp_path):
    pixels = tmp_path / "embedder-pixels"
    trained = invoke(
        "train", tiny_index.cohort, "--out", tiny_index.run, "--stage", "embed",
        "--backbone", "pixels", "--embedder-out", pixels, "--iters", 3,
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert (pixels / "config.json").is_file()
    report_path = tmp_path / "report.json"
    result = invoke(
        "evaluate", tiny_index.run, tiny_index.cohort, "--out", report_path,
        "--metrics", "retrieval", "--embedder", f"pixels={pixels}",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())["retrieval"]
    assert set(report["backbones"]) == {"model", "pixels"}
    n = report["cases"]
    for row in report["backbones"].values():
        for direction in ("cf2ffa", "ffa2cf"):
            m = row[direction]
            assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1
            assert 1 / n <= m["mAP"] <= 1
    via = report["backbones"]["model"]["cf2ffa_via"]
    assert set(via) == {"direct", "synthesis", "fused", "best_by_mAP"}
    assert "pixels" in result.output and "CF→FFA" in result.output


def test_retrieval_evaluate_refuses_an_embedder_trained_on_the_test_patients(tiny_index, tmp_path):
    from encoder.train import embed_training_loop
    from retrieval.training_data import load_paired

    every = load_paired(Cohort.open(tiny_index.cohort), size=32, progress=False)  # all splits
    leaky = tmp_path / "embedder-leaky"
    embed_training_loop(run_dir=tiny_index.run, out_dir=leaky, data=every, backbone="pixels",
                        iters=1, batch_size=2, dim=8, progress=False)  # fmt: skip
    recorded = json.loads((leaky / "training_options.json").read_text())["data"]["patient_ids"]
    assert recorded == sorted(set(every.patient_ids))
    report_path = tmp_path / "leak.json"
    result = invoke(
        "evaluate", tiny_index.run, tiny_index.cohort, "--out", report_path,
        "--metrics", "retrieval", "--embedder", f"leaky={leaky}",
    )  # fmt: skip
    assert result.exit_code == 2 and "shares" in result.output and "embedder-leaky" in result.output
    assert not report_path.exists()
