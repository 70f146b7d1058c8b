"""Near-duplicates: the descriptor, pair finding, ingest, the engine, the API, the CLI and
the dashboard's client."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from retrieval.api import Settings, create_app
from retrieval.apps.cli import app as cli_app
from retrieval.data import duplicates as dup
from retrieval.data.cohort import Cohort
from retrieval.data.ingest import ingest
from retrieval.data.media import read_cf, read_ffa
from retrieval.data.media_write import mp4_bytes, png_bytes
from retrieval.data.phantom import write_phantom_cohort
from retrieval.errors import DuplicateCase, ManifestError, NearDuplicate
from retrieval.search.engine import Engine, NewCase
from retrieval.testing import PixelEncoder
from ui.client import ApiClient, ApiError, NearDuplicateError


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    """Ten distinct phantom eye-visits at 128 px (some patients give both eyes)."""
    root = tmp_path_factory.mktemp("dups") / "cohort"
    write_phantom_cohort(root, cases=10, size=128, frames=8, seed=1, progress=False)
    return Cohort.open(root)


@pytest.fixture(scope="module")
def media(cohort) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        c.case_id: (read_cf(cohort.root / c.cf_path), read_ffa(cohort.root / c.ffa_path))
        for c in cohort.cases()
    }


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return read_cf(buf.getvalue(), name="copy.jpg")


def _resize(image: np.ndarray, factor: float) -> np.ndarray:
    pic = Image.fromarray(image)
    return np.asarray(pic.resize((round(pic.width * factor), round(pic.height * factor))))


def _edited(image: np.ndarray) -> dict[str, np.ndarray]:
    h, w = image.shape[:2]
    crop = image[round(0.07 * h) : round(0.97 * h), round(0.02 * w) : round(0.92 * w)]
    bright = np.clip(image * 1.1, 0, 255).astype(np.uint8)
    return {
        "jpeg q30": _jpeg(image, 30),
        "resize 0.5": _resize(image, 0.5),
        "crop 90 %": np.ascontiguousarray(crop),
        "brightness +10 %": bright,
        "all": _jpeg(_resize(np.ascontiguousarray(crop), 0.7), 50),
    }


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(dup.distances(a[None], b[None])[0, 0])


def test_edited_copies_are_near_and_distinct_eyes_are_far(cohort, media):
    ids = list(media)
    cf, ffa = media[ids[0]]
    own = dup.image_descriptor(cf)
    assert own.shape == (dup.VARIANTS, dup.DIM)
    assert np.allclose(np.linalg.norm(own, axis=1), 1, atol=1e-4)
    assert _distance(own, own) < 1e-4
    for name, copy in _edited(cf).items():
        assert _distance(own, dup.image_descriptor(copy)) <= dup.THRESHOLDS["cf"], name
    for other in ids[1:]:
        assert _distance(own, dup.image_descriptor(media[other][0])) > dup.THRESHOLDS["cf"]
    # the two eyes of one phantom patient are distinct cases
    by_patient: dict[str, list[str]] = {}
    for c in cohort.cases():
        by_patient.setdefault(c.patient_id, []).append(c.case_id)
    fellows = [v for v in by_patient.values() if len(v) == 2]
    assert fellows, "the fixture should hold a patient with both eyes"
    for a, b in fellows:
        d = dup.case_descriptor(*media[a]), dup.case_descriptor(*media[b])
        for m in dup.MODALITIES:
            assert _distance(d[0][m], d[1][m]) > dup.THRESHOLDS[m]


def test_reencoded_resized_video_is_a_near_duplicate(media):
    ids = list(media)
    ffa = media[ids[0]][1]
    small = np.stack([_resize(f, 0.6) for f in ffa])
    small = small[:, : small.shape[1] // 2 * 2, : small.shape[2] // 2 * 2]
    copy = read_ffa(mp4_bytes(np.ascontiguousarray(small), crf=30), name="copy.mp4")
    own = dup.case_descriptor(media[ids[0]][0], ffa)["ffa"]
    again = dup.case_descriptor(media[ids[0]][0], copy)["ffa"]
    assert _distance(own, again) <= dup.THRESHOLDS["ffa"]
    others = [dup.case_descriptor(*media[i])["ffa"] for i in ids[1:]]
    assert min(_distance(own, o) for o in others) > dup.THRESHOLDS["ffa"]


def test_find_pairs_and_thresholds(media):
    ids = list(media)
    descs = [dup.case_descriptor(*media[i]) for i in ids]
    assert dup.find_pairs(ids, descs) == []  # distinct cases only
    cf, ffa = media[ids[2]]
    descs.append(dup.case_descriptor(_jpeg(cf, 40), ffa))
    pairs = dup.find_pairs([*ids, "copy"], descs)
    assert {(p.a, p.b, p.modality) for p in pairs} == {
        (ids[2], "copy", "cf"),
        (ids[2], "copy", "ffa"),
    }
    assert all(0 <= p.distance <= dup.THRESHOLDS[p.modality] for p in pairs)
    assert pairs[0].record().keys() == {"a", "b", "modality", "distance"}
    assert dup.find_pairs([*ids, "copy"], descs, {"cf": 0.0, "ffa": 1e-4}) == [
        p
        for p in pairs
        if p.modality == "ffa"  # the very same video: distance 0
    ]
    with pytest.raises(Exception, match="threshold: unknown modality 'oct'"):
        dup.find_pairs(ids, descs, {"oct": 0.1})
    with pytest.raises(Exception, match="threshold cf: must be in"):
        dup.check_thresholds({"cf": 3})


def test_duplicate_index_add_find_remove(media):
    ids = list(media)
    index = dup.DuplicateIndex()
    for row, case_id in enumerate(ids):
        index.add(row, case_id, dup.case_descriptor(*media[case_id]))
    assert len(index) == len(ids)
    cf, ffa = media[ids[4]]
    query = dup.case_descriptor(_resize(cf, 0.7), ffa)
    found = index.find(query)
    assert [(p.a, p.modality) for p in found] == [(ids[4], "ffa"), (ids[4], "cf")]
    assert index.find(query, exclude=4) == []
    index.remove(4)
    assert index.find(query) == [] and len(index) == len(ids) - 1
    assert index.of_row(4) is None and index.of_row(3) is not None


# --------------------------------------------------------------------------- ingest


def _manifest(tmp: Path, cohort: Cohort, copy_of: int) -> Path:
    """A manifest of the cohort's first four cases plus a recompressed copy of one."""
    cases = cohort.cases()[:4]
    lines = ["case_id,patient_id,cf_path,ffa_path"]
    for c in cases:
        lines.append(
            f"{c.case_id},{c.patient_id},{cohort.root / c.cf_path},{cohort.root / c.ffa_path}"
        )
    source = cases[copy_of]
    image = read_cf(cohort.root / source.cf_path)
    Image.fromarray(image).save(tmp / "copy.jpg", quality=45)
    lines.append(f"copy,copy-patient,copy.jpg,{cohort.root / source.ffa_path}")
    manifest = tmp / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_ingest_reports_skips_or_keeps_duplicates(cohort, tmp_path):
    manifest = _manifest(tmp_path, cohort, copy_of=1)
    source = cohort.cases()[1].case_id
    with pytest.raises(ManifestError) as err:
        ingest(manifest, tmp_path / "a", allow_outside=True, progress=False, register=False)
    (problem,) = err.value.problems
    assert problem.row == 5 and problem.case_id == "copy"
    assert f"near-duplicate of row 2 ({source})" in problem.message
    assert not (tmp_path / "a").exists()
    kw = {"allow_outside": True, "progress": False, "register": False}  # not about registration
    skipped = ingest(manifest, tmp_path / "b", skip_duplicates=True, **kw)
    assert skipped.written == 4 and [p.case_id for p in skipped.skipped] == ["copy"]
    report = pl.read_csv(tmp_path / "b" / "skipped.csv")
    assert report["case_id"].to_list() == ["copy"] and "row 2" in report["problem"][0]
    kept = ingest(manifest, tmp_path / "c", allow_duplicates=True, **kw)
    assert kept.written == 5 and kept.skipped == []
    assert {(p.a, p.b) for p in kept.duplicates} == {(source, "copy")}


def test_cli_duplicates_and_ingest_skip(cohort, tmp_path):
    manifest = _manifest(tmp_path, cohort, copy_of=0)
    runner = CliRunner()
    out = tmp_path / "cohort"
    args = ["ingest", str(manifest), str(out), "--allow-outside", "--no-register"]
    refused = runner.invoke(cli_app, args)
    assert refused.exit_code == 2 and "near-duplicate of row 1" in refused.output
    done = runner.invoke(cli_app, [*args, "--skip-duplicates"])
    assert done.exit_code == 0, done.output
    assert "wrote 4 cases" in done.output and "skipped 1 row(s)" in done.output
    kept = tmp_path / "kept"
    done = runner.invoke(
        cli_app,
        [*args[:2], str(kept), "--allow-outside", "--allow-duplicates", "--no-register"],
    )
    assert done.exit_code == 0, done.output
    listed = runner.invoke(cli_app, ["duplicates", str(kept), "--json"])
    assert listed.exit_code == 0, listed.output
    body = json.loads(listed.output)
    first = cohort.cases()[0].case_id
    assert {(p["a"], p["b"], p["modality"]) for p in body["pairs"]} == {
        (first, "copy", "cf"),
        (first, "copy", "ffa"),
    }
    table = runner.invoke(cli_app, ["duplicates", str(out)])
    assert table.exit_code == 0 and "0 near-duplicate pair(s)" in table.output
    bad = runner.invoke(cli_app, ["duplicates", str(tmp_path / "missing")])
    assert bad.exit_code == 2


# --------------------------------------------------------------------------- engine, API


@pytest.fixture
def engine(cohort, tmp_path):
    """A pixel-encoder index over the 128-px cohort (a private copy, for updates)."""
    from retrieval.testing import build_pixel_index

    build_pixel_index(cohort.root, tmp_path / "index")
    opened = Engine.open(tmp_path / "index", encoder=PixelEncoder())
    yield opened
    opened.close()


def _new(case_id: str) -> NewCase:
    return NewCase(case_id=case_id, eye="OD", split="train")


def test_engine_refuses_a_near_duplicate_unless_allowed(engine, media):
    ids = list(media)
    cf, ffa = media[ids[3]]
    copy = _jpeg(_resize(cf, 0.6), 50)
    with pytest.raises(NearDuplicate) as err:
        engine.add_case(_new("again"), copy, ffa)
    assert isinstance(err.value, DuplicateCase) and err.value.existing_case_id == ids[3]
    assert {m["modality"] for m in err.value.matches} == {"cf", "ffa"}
    assert "again" not in {c.case_id for c in engine.cases(0, 100)[1]}
    with pytest.raises(DuplicateCase) as same_id:  # a known id stays a plain duplicate
        engine.add_case(_new(ids[0]), copy, ffa)
    assert not isinstance(same_id.value, NearDuplicate)
    added = engine.add_case(_new("again"), copy, ffa, allow_duplicate=True)
    assert added.case_id == "again"
    assert [(p.a, p.modality) for p in engine.duplicates_of("again")] == [
        (ids[3], "ffa"),
        (ids[3], "cf"),
    ]
    assert {p.a for p in engine.duplicates_of(ids[3])} == {"again"}
    assert engine.duplicates_of(ids[5]) == []
    engine.remove_case("again")
    assert engine.duplicates_of(ids[3]) == []
    # a new, distinct picture (flipped: another eye's layout) is taken
    engine.add_case(_new("flipped"), np.ascontiguousarray(cf[:, ::-1]), ffa[:, :, ::-1].copy())


def test_api_409_names_the_existing_case(engine, media):
    ids = list(media)
    cf, ffa = media[ids[2]]
    files = {
        "cf": ("copy.png", png_bytes(np.clip(cf * 0.92, 0, 255).astype(np.uint8)), "image/png"),
        "ffa": ("copy.mp4", mp4_bytes(ffa, crf=28), "video/mp4"),
    }
    with TestClient(create_app(Settings(open_writes=True), engine=engine)) as client:
        refused = client.post("/cases", files=files, data={"case_id": "re-export"})
        assert refused.status_code == 409, refused.text
        body = refused.json()
        assert body["duplicates"][0]["case_id"] == ids[2] and body["request_id"]
        assert ids[2] in body["detail"] and "allow_duplicate" in body["detail"]
        assert {d["modality"] for d in body["duplicates"]} == {"cf", "ffa"}
        bad = client.post(
            "/cases", files=files, data={"case_id": "re-export", "allow_duplicate": "maybe"}
        )
        assert bad.status_code == 422 and "allow_duplicate" in bad.json()["detail"]
        added = client.post(
            "/cases", files=files, data={"case_id": "re-export", "allow_duplicate": "true"}
        )
        assert added.status_code == 201, added.text
        listed = client.get("/cases/re-export/duplicates").json()
        assert listed["case_id"] == "re-export" and listed["items"][0]["case_id"] == ids[2]
        assert client.get("/cases/nope/duplicates").status_code == 404
        spec = client.get("/openapi.json").json()
        post = spec["paths"]["/cases"]["post"]
        form = post["requestBody"]["content"]["multipart/form-data"]["schema"]
        form = spec["components"]["schemas"][form["$ref"].rsplit("/", 1)[1]]
        assert "allow_duplicate" in form["properties"]
        example = post["responses"]["409"]["content"]["application/json"]["example"]
        assert example["duplicates"][0]["case_id"]
        assert "/cases/{case_id}/duplicates" in spec["paths"]


def test_client_add_case_raises_near_duplicate_error():
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if b'name="allow_duplicate"\r\n\r\ntrue' in request.content:
            return httpx.Response(201, json={"case_id": "n1"})
        match = {"case_id": "old-7", "modality": "cf", "distance": 0.05, "threshold": 0.2}
        body = {"detail": "near-duplicate of case 'old-7'", "errors": None, "request_id": "r"}
        return httpx.Response(409, json={**body, "duplicates": [match]})

    client = ApiClient("http://api", transport=httpx.MockTransport(answer))
    args = ("n1", ("a.png", b"png"), ("b.mp4", b"mp4"))
    with pytest.raises(NearDuplicateError) as err:
        client.add_case(*args, metadata={"eye": "OD", "age": None})
    assert err.value.status == 409 and err.value.existing_case_id == "old-7"
    assert err.value.duplicates[0]["modality"] == "cf" and "old-7" in str(err.value)
    assert b'name="eye"' in sent[0].content and b'name="age"' not in sent[0].content
    assert client.add_case(*args, allow_duplicate=True) == {"case_id": "n1"}


def test_client_plain_409_stays_an_api_error():
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json={"detail": "case_id 'x' is already in the index"})

    client = ApiClient("http://api", transport=httpx.MockTransport(answer))
    with pytest.raises(ApiError) as err:
        client.add_case("x", ("a.png", b"png"), ("b.mp4", b"mp4"))
    assert not isinstance(err.value, NearDuplicateError) and err.value.status == 409


def test_index_folder_pairs_include_added_cases(engine, media):
    ids = list(media)
    cf, ffa = media[ids[1]]
    engine.add_case(_new("kept"), _jpeg(cf, 35), ffa, allow_duplicate=True)
    pairs = dup.folder_pairs(engine.path)
    assert {(p.a, p.b) for p in pairs} == {(ids[1], "kept")}


# --------------------------------------------------------------------------- dashboard


def test_browse_page_lists_possible_duplicates(engine, media):
    from streamlit.testing.v1 import AppTest

    from retrieval.apps.demo import ApiThread

    ids = list(media)
    cf, ffa = media[ids[6]]
    engine.add_case(_new("re-saved"), _jpeg(cf, 60), ffa, allow_duplicate=True)
    api = ApiThread(create_app(Settings(), engine=engine)).start()
    try:
        app = Path(__file__).resolve().parents[1] / "ui" / "app.py"
        at = AppTest.from_file(str(app), default_timeout=60)
        at.session_state["api_url"] = api.url
        at.run()
        at.switch_page("views/browse.py").run()
        for case_id, expected in (("re-saved", ids[6]), (ids[7], None)):
            at.text_input(key="browse_case_input").set_value(case_id).run()
            at.button(key="browse_duplicates").click().run()
            assert not at.exception, [e.value for e in at.exception]
            tables = [d for d in at.dataframe if "distance" in d.value.columns]
            if expected is None:
                assert not tables
                assert any("No near-duplicate" in c.value for c in at.caption)
            else:
                assert set(tables[0].value["case_id"]) == {expected}
                assert set(tables[0].value["modality"]) == {"cf", "ffa"}
    finally:
        api.stop()
