"""Embeddings through the CLI: `train --stage embed`, `index`, `search` (similarity and
the diagnosis suggestion too), retrieval `evaluate`."""

import dataclasses
import json
import re

import polars as pl
import pytest
from typer.testing import CliRunner

from index import load_index_folder, read_manifest
from retrieval.apps.cli import app
from retrieval.data.cohort import Cohort

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


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_index_precision_is_kept_for_its_queries(tiny_index, tmp_path, precision):
    from retrieval.search.engine import Engine

    out = tmp_path / "idx"
    result = invoke(
        "index", tiny_index.run, tiny_index.cohort, "--out", out, "--precision", precision
    )
    assert result.exit_code == 0 and precision in result.output, result.output
    assert read_manifest(out)["extra"]["precision"] == precision
    engine = Engine.open(out)
    assert engine.encoder.precision == precision  # queries run the backbone as the index did


def test_bfloat16_vectors_stay_close_to_float32(tiny_index, tmp_path):
    vectors = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        assert invoke("index", tiny_index.run, tiny_index.cohort, "--out", out,
                      "--precision", precision).exit_code == 0  # fmt: skip
        folder = load_index_folder(out)
        vectors[precision] = {m: s.reconstruct(s.ids()) for m, s in folder.indexes.items()}
    for modality in ("cf", "ffa"):
        a, b = vectors["float32"][modality], vectors["bfloat16"][modality]
        assert (a * b).sum(1).min() > 0.99 and not (a == b).all()  # close, not the same path
    bad = invoke("index", tiny_index.run, tiny_index.cohort, "--out", tmp_path / "x",
                 "--precision", "float16")  # fmt: skip
    assert bad.exit_code == 2 and "precision must be one of" in bad.output, bad.output


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
    assert out["similarity"] == out["query"]["similarity"] == "clinical"  # the default
    suggestion = out["suggestion"]  # from the index's model, by the photo in the CF index
    assert suggestion["label"].endswith("(decision support, not a diagnosis)")
    assert sum(suggestion["probabilities"].values()) == pytest.approx(1.0)
    assert set(suggestion["supporting_case_ids"]) <= set(
        pl.read_parquet(tiny_index.cohort / "catalog.parquet")["case_id"]
    )
    catalog = pl.read_parquet(tiny_index.cohort / "catalog.parquet")
    assert {r["case_id"] for r in out["results"]} <= set(catalog["case_id"])

    video = invoke("search", tiny_index.index, case.ffa_path, "--target", "cf", "--k", 3)
    assert video.exit_code == 0, video.output
    lines = video.output.strip().splitlines()
    assert "rank" in lines[0] and len(lines) == 5  # header, 3 rows, the suggestion
    assert lines[-1].startswith("suggestion from similar cases: ")

    same = invoke(
        "search",
        tiny_index.index,
        case.cf_path,
        "--target",
        "cf",
        "--k",
        1,
        "--json",
        "--similarity",
        "pair",
    )
    assert same.exit_code == 0, same.output
    assert json.loads(same.output)["similarity"] == "pair"
    default = invoke("search", tiny_index.index, case.cf_path, "--target", "cf", "--json")
    assert json.loads(default.output)["similarity"] == "clinical"  # CF → CF

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
        "train",
        tiny_index.cohort,
        "--out",
        tiny_index.run,
        "--stage",
        "embed",
        "--backbone",
        "pixels",
        "--embedder-out",
        pixels,
        "--iters",
        3,
    )
    assert trained.exit_code == 0, trained.output
    assert (pixels / "config.json").is_file()
    report_path = tmp_path / "report.json"
    result = invoke(
        "evaluate",
        tiny_index.run,
        tiny_index.cohort,
        "--out",
        report_path,
        "--metrics",
        "retrieval",
        "--embedder",
        f"pixels={pixels}",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())["retrieval"]
    assert set(report["backbones"]) == {"model", "pixels"}
    n = report["cases"]
    for row in report["backbones"].values():
        for direction in ("cf2ffa", "ffa2cf"):
            for m in (row[direction], row["pair"]["pair+vessels"][direction]):
                assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1
                assert 1 / n <= m["mAP"] <= 1
    assert "pair+vessels" in result.output
    via = report["backbones"]["model"]["cf2ffa_via"]
    assert set(via) == {"direct", "synthesis", "fused", "best_by_mAP"}
    assert "pixels" in result.output and "CF→FFA" in result.output
    # clinical metrics: held-out queries against the archive (train + val), per similarity
    assert report["archive"]["splits"] == ["train", "val"]
    model = report["backbones"]["model"]
    assert model["similarities"] == ["combined", "pair", "clinical"]
    for kind in model["similarities"]:
        for direction in ("cf2cf", "cf2ffa", "ffa2ffa", "ffa2cf"):
            m = model["clinical"][kind][direction]
            assert 0 <= m["P@10"] <= 1 and 0 <= m["hit@5"] <= 1 and 0 <= m["mAP@R"] <= 1
            assert 0 <= m["lesion_jaccard@10"] <= 1 and 0 <= m["same_eye@10"] <= 1
    suggestion = model["suggestion"]["cf"]
    assert suggestion["queries"] == n and suggestion["model"]["fitted_on"]["split"] == "val"
    assert 0 <= suggestion["ece"] <= 1 and "accuracy" in result.output
    png = report_path.with_name("report.reliability.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(report_path.read_text())["reliability_png"] == png.name


def test_retrieval_evaluate_refuses_an_embedder_trained_on_the_test_patients(tiny_index, tmp_path):
    from encoder.train import embed_training_loop
    from retrieval.data.training_data import load_paired

    every = load_paired(Cohort.open(tiny_index.cohort), size=32, progress=False)  # all splits
    leaky = tmp_path / "embedder-leaky"
    embed_training_loop(
        run_dir=tiny_index.run,
        out_dir=leaky,
        data=every,
        backbone="pixels",
        iters=1,
        batch_size=2,
        dim=8,
        progress=False,
    )
    recorded = json.loads((leaky / "training_options.json").read_text())["data"]["patient_ids"]
    assert recorded == sorted(set(every.patient_ids))
    report_path = tmp_path / "leak.json"
    result = invoke(
        "evaluate",
        tiny_index.run,
        tiny_index.cohort,
        "--out",
        report_path,
        "--metrics",
        "retrieval",
        "--embedder",
        f"leaky={leaky}",
    )
    assert result.exit_code == 2 and "shares" in result.output and "embedder-leaky" in result.output
    assert not report_path.exists()


# -- over the pixel index (no model): Engine.open gets the PixelEncoder --------------------
@pytest.fixture
def pixel_cli(pixel_index, monkeypatch):
    from retrieval.search.engine import Engine
    from retrieval.testing import PixelEncoder

    opened = []
    original = Engine.open.__func__

    def open_with_pixels(cls, path, **kwargs):
        engine = original(cls, path, encoder=PixelEncoder())
        opened.append(engine)
        return engine

    monkeypatch.setattr(Engine, "open", classmethod(open_with_pixels))
    return pixel_index, opened


def test_search_prints_the_suggestion_line(pixel_cli, monkeypatch):
    from retrieval.search.engine import Engine

    index, _ = pixel_cli
    case = Engine.open(index).cases(0, 1)[1][0]
    result = invoke("search", index, case.cf_path, "--target", "cf", "--k", 2)
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    found = re.fullmatch(
        r"suggestion from similar cases: (?:(\S+) \(p=(\d\.\d\d), (\d+) of 10 neighbours\)"
        r"|abstained \(top (\S+) p=(\d\.\d\d)\))",
        line,
    )
    assert found, line
    as_json = json.loads(invoke("search", index, case.cf_path, "--target", "cf", "--json").output)
    suggestion = as_json["suggestion"]
    assert as_json["similarity"] == "pair" and suggestion["neighbours"] == 10
    assert sum(suggestion["probabilities"].values()) == pytest.approx(1.0)
    if found[1]:
        assert found[1] == suggestion["diagnosis"] and not suggestion["abstained"]
        assert int(found[3]) == len(suggestion["supporting_case_ids"])
    else:
        assert found[4] == suggestion["diagnosis"] and suggestion["abstained"]
    assert line.count(f"{suggestion['probability']:.2f}") == 1


@pytest.mark.parametrize("abstain_below,expected", [(1.0, "abstained (top "), (0.0, "neighbours)")])
def test_search_suggestion_abstains_or_answers(pixel_cli, monkeypatch, abstain_below, expected):
    from retrieval.search.engine import Engine

    index, _ = pixel_cli
    original = Engine._suggestion_models

    def strict(self, folder):
        models = original(self, folder)
        return {m: dataclasses.replace(v, abstain_below=abstain_below) for m, v in models.items()}

    monkeypatch.setattr(Engine, "_suggestion_models", strict)
    case = Engine.open(index).cases(0, 1)[1][0]
    result = invoke("search", index, case.ffa_path, "--target", "ffa")
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("suggestion from similar cases: ") and expected in last
    out = json.loads(invoke("search", index, case.ffa_path, "--target", "ffa", "--json").output)
    assert out["suggestion"]["abstained"] is (abstain_below == 1.0)


def test_search_refuses_an_unknown_or_unsupported_similarity(pixel_cli):
    index, _ = pixel_cli
    photo = next((index.parent / "cohort" / "cf").iterdir())
    bad = invoke("search", index, photo, "--similarity", "colour")
    assert bad.exit_code != 0 and "--similarity must be one of" in bad.output
    unsupported = invoke("search", index, photo, "--similarity", "clinical")
    assert unsupported.exit_code == 2
    assert "similarity must be one of pair" in unsupported.output


def test_search_through_synthesis_is_scored_by_the_pair_similarity(monkeypatch) -> None:
    """The synthesized video's pair part points at its own case, its clinical part at the
    next one: scored by the pair similarity (as the engine does), synthesis finds each."""
    from types import SimpleNamespace

    import numpy as np

    from retrieval.evaluation import retrieval as module

    n = 4
    eye = np.eye(n, dtype=np.float32)
    ffa = np.concatenate([eye, np.roll(eye, 1, axis=1)], axis=1)  # (n, 2n)
    synth = np.concatenate([eye, 2 * np.roll(eye, 2, axis=1)], axis=1)  # clinical: case i+1
    pair_weights = np.concatenate([np.ones(n), np.zeros(n)]).astype(np.float32)
    enc = SimpleNamespace(
        embedder=None,
        synthesize_unmarked=lambda im, t: (np.zeros((2, 8, 8), np.uint8), t),
        similarity_weights=lambda kind: pair_weights if kind == "pair" else np.ones(2 * n),
    )
    monkeypatch.setattr(module, "embed_ffa_array", lambda *a: synth.copy())

    class Held(SimpleNamespace):
        def __len__(self) -> int:
            return n

    test = Held(cf=[None] * n, times_s=[np.zeros(2)] * n)
    rows = module.via_synthesis(enc, test, ffa * pair_weights, ffa, progress=False)
    assert rows["synthesis"]["R@1"] == 1.0 and rows["direct"]["R@1"] == 1.0
