"""One catalog record: `CATALOG_FIELDS` defines the fields of a case once.

The polars schema, `Cohort`'s `Case`, the engine's `CaseInfo`, `NewCase` and its
catalog row, the API's `CaseRecord` and its `POST /cases` form, the dashboard's
mirrors and the README's data contract must all follow it: a field added (or
dropped) in one place and not the others fails here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fastapi import FastAPI
from pydantic import TypeAdapter

from retrieval.api.convert import case_record
from retrieval.api.routes import cases as case_routes
from retrieval.api.schemas import CaseRecord, ResultRow
from retrieval.data.cohort import (
    CASE_FIELDS,
    CASE_MEASURED,
    CASE_METADATA,
    CATALOG_FIELDS,
    CATALOG_SCHEMA,
    DIAGNOSES,
    EYES,
    SPLITS,
    Case,
    Cohort,
    case_values,
    catalog_from_rows,
)
from retrieval.errors import CohortError
from retrieval.search.engine import CaseInfo, Engine, NewCase
from ui import client as ui_client
from ui import components as ui_components

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f.name for f in CATALOG_FIELDS]
METADATA = [f.name for f in CASE_METADATA]
RECORD = [f.name for f in CASE_FIELDS]  # the metadata and the measured fields
MEDIA = [f.name for f in CATALOG_FIELDS if f.media]
API_ONLY = ["modalities", "added", "cf_url", "ffa_url", "synthetic"]  # not catalog fields


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _example_row() -> dict:
    return {f.name: f.example for f in CATALOG_FIELDS}


def test_the_schema_and_the_python_records_follow_the_fields():
    assert list(CATALOG_SCHEMA) == NAMES
    assert MEDIA == ["cf_path", "ffa_path"]
    assert RECORD == [name for name in NAMES if name not in MEDIA]
    assert {f.name for f in CASE_MEASURED} == set(RECORD) - set(METADATA)
    assert _names(Case) == NAMES
    assert _names(CaseInfo) == [*NAMES, "row_id", "added"]
    assert _names(NewCase) == METADATA
    assert list(case_values(_example_row(), Path("/cohort"))) == NAMES


def test_every_field_example_makes_a_valid_catalog_row():
    df = catalog_from_rows([_example_row()])
    assert df.schema == pl.Schema(CATALOG_SCHEMA)
    for f in CATALOG_FIELDS:
        assert TypeAdapter(f.python_type).validate_python(f.example, strict=True) == f.example
        assert df[f.name].to_list() == [f.example]


def test_the_api_case_record_is_the_metadata_and_the_media_urls():
    assert list(CaseRecord.model_fields) == [*RECORD, *API_ONLY]
    example = CaseRecord.model_json_schema()["example"]
    assert set(example) == set(CaseRecord.model_fields)
    assert CaseRecord.model_validate(example).model_dump() == example
    for f in CASE_FIELDS:
        assert CaseRecord.model_fields[f.name].description == f.description


def test_case_record_gives_every_field_of_the_model():
    row = _example_row()
    info = CaseInfo(**case_values(row, Path("/index")), row_id=7, added=False)
    record = case_record(info)
    assert list(record) == list(CaseRecord.model_fields)
    assert CaseRecord.model_validate(record).model_dump() == record
    assert {k: record[k] for k in RECORD} == {k: row[k] for k in RECORD}


def test_a_catalog_without_the_measured_columns_still_opens(tmp_path):
    """Catalogs written before the measured fields existed read them as empty."""
    row = _example_row()
    old = catalog_from_rows([row]).drop([f.name for f in CASE_MEASURED])
    old.write_parquet(tmp_path / "catalog.parquet")
    (case,) = Cohort.open(tmp_path).cases()
    assert all(getattr(case, f.name) is None for f in CASE_MEASURED)
    assert case.diagnosis == row["diagnosis"]


def test_catalog_rows_may_leave_the_measured_fields_out_but_nothing_else():
    row = {k: v for k, v in _example_row().items() if k not in {f.name for f in CASE_MEASURED}}
    assert catalog_from_rows([row])["registration"].to_list() == [None]
    with pytest.raises(CohortError, match=r"missing field\(s\) \['eye'\]"):
        catalog_from_rows([{k: v for k, v in row.items() if k != "eye"}])
    with pytest.raises(CohortError, match="unknown field"):
        catalog_from_rows([{**row, "fov": [1.0, 2.0, 3.0]}])


def test_a_new_case_becomes_a_whole_catalog_row():
    new = NewCase("n-1", eye="OS", age=50, lesions=("leakage",), ffa_times_s=(1.0, 2.0))
    row = Engine._check_new_case(new, np.zeros((2, 8, 8), np.uint8))
    assert list(row) == METADATA
    media = {name: f"media/0/{name}" for name in MEDIA}
    df = catalog_from_rows([{**row, **media}])
    assert df.row(0, named=True)["patient_id"] == "n-1"


def test_the_add_case_form_takes_every_new_case_field():
    app = FastAPI()
    app.include_router(case_routes.write_router)  # POST /cases
    spec = app.openapi()
    body = spec["paths"]["/cases"]["post"]["requestBody"]["content"]["multipart/form-data"]
    form = spec["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[1]]
    # the metadata, the media and two controls: add a near-duplicate anyway, register
    assert set(form["properties"]) == {*METADATA, "cf", "ffa", "allow_duplicate", "register"}


def test_the_dashboard_mirrors_the_api():
    """ui/ speaks HTTP only (no import of retrieval), so its copies are held here."""
    assert _names(ui_client.Result) == list(ResultRow.model_fields)
    for name in set(ResultRow.model_fields) & set(METADATA):  # the same field, the same type
        assert ResultRow.model_fields[name].annotation == CaseRecord.model_fields[name].annotation
    assert set(ui_components.CASE_COLUMNS) <= set(CaseRecord.model_fields)
    assert ui_components.EYES == EYES
    assert ui_components.SPLITS == SPLITS
    assert ui_components.DEFAULT_DIAGNOSES == DIAGNOSES


def _type_name(kind) -> str:
    return str(kind) if hasattr(kind, "__origin__") else kind.__name__


def test_the_documented_data_contract_lists_every_field():
    """The docs' table of catalog columns (`| column | type | meaning |`)."""
    header = "| column | type | meaning |"
    docs = [p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
    found = [text for text in docs if header in text]
    assert len(found) == 1, "one document holds the data contract table"
    lines = found[0].split(header, 1)[1].strip().splitlines()[1:]  # after the |---| line
    documented = []
    for line in lines:
        if not line.startswith("|"):
            break
        names, types = (cell.strip() for cell in line.split("|")[1:3])
        documented += zip(re.split(r",\s*", names), re.split(r",\s*", types), strict=True)
    assert documented == [(f.name, _type_name(f.python_type)) for f in CATALOG_FIELDS]
