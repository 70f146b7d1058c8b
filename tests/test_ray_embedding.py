"""Batch embedding on Ray Data (`index --ray`): the same vectors as one process, shards
that survive a failed job, a refused mismatched resume. A local Ray with 2 CPUs."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

from index import load_index_folder
from retrieval.data.cohort import Cohort
from retrieval.errors import Fundus2VideoError
from retrieval.models import ray_embedding
from retrieval.models.embedding import QueryEncoder, build_index, embed_cohort
from retrieval.models.ray_embedding import RayOptions, embed_cohort_ray

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray is not installed (the scale extra)"
)
pytestmark = needs_ray


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_index):
    """The single-process path's vectors of every case, and the opened encoder and cohort."""
    encoder, cohort = QueryEncoder.open(tiny_index.run), Cohort.open(tiny_index.cohort)
    _, cf, ffa = embed_cohort(encoder, cohort, progress=False)
    return encoder, cohort, cf, ffa


TWO_WORKERS = RayOptions(workers=2, cpus_per_worker=0.5, shard_cases=8)


def test_ray_embeddings_equal_the_single_process_path(local_ray, reference, tmp_path):
    encoder, cohort, cf, ffa = reference
    got_cf, got_ffa = embed_cohort_ray(encoder, cohort, tmp_path, TWO_WORKERS, progress=False)
    assert np.abs(got_cf - cf).max() <= 1e-5 and np.abs(got_ffa - ffa).max() <= 1e-5
    shards = sorted(p.name for p in tmp_path.glob("shard-*.parquet"))
    assert shards == [f"shard-{k:06d}.parquet" for k in range(3)]  # 24 cases, 8 per shard


def test_a_failed_job_resumes_from_its_shards(local_ray, reference, tmp_path, monkeypatch):
    encoder, cohort, cf, ffa = reference
    write = ray_embedding._write_shard
    written: list[str] = []

    def dies_after_one(path, part):
        if written:
            raise RuntimeError("killed")
        write(path, part)
        written.append(path.name)

    monkeypatch.setattr(ray_embedding, "_write_shard", dies_after_one)
    with pytest.raises(RuntimeError, match="killed"):
        embed_cohort_ray(encoder, cohort, tmp_path, TWO_WORKERS, progress=False)
    assert [p.name for p in tmp_path.glob("shard-*.parquet")] == written  # one whole shard
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial file

    monkeypatch.setattr(ray_embedding, "_write_shard", write)
    items = ray_embedding._item
    embedded: list[int] = []
    monkeypatch.setattr(ray_embedding, "_item", lambda i, c: embedded.append(i) or items(i, c))
    got_cf, got_ffa = embed_cohort_ray(encoder, cohort, tmp_path, TWO_WORKERS, progress=False)
    done = int(written[0].removeprefix("shard-").removesuffix(".parquet"))
    assert sorted(embedded) == [r for r in range(24) if r // 8 != done]  # only what was missing
    assert np.abs(got_cf - cf).max() <= 1e-5 and np.abs(got_ffa - ffa).max() <= 1e-5


def test_shards_of_another_plan_are_refused(reference, tmp_path):
    encoder, cohort, _, _ = reference
    ray_embedding._check_plan(tmp_path, ray_embedding._plan(encoder, cohort.cases(), 8))
    with pytest.raises(Fundus2VideoError, match="shard_cases"):
        embed_cohort_ray(encoder, cohort, tmp_path, RayOptions(shard_cases=5), progress=False)


def test_build_index_on_ray_writes_the_same_index_and_drops_its_shards(
    local_ray, tiny_index, tmp_path
):
    out = tmp_path / "index"
    build_index(tiny_index.run, tiny_index.cohort, out, ray=TWO_WORKERS, progress=False)
    assert not (tmp_path / "index.shards").exists()
    got, want = load_index_folder(out), load_index_folder(tiny_index.index)
    assert got.extra["precision"] == want.extra["precision"]
    for modality in ("cf", "ffa"):
        a, b = got.indexes[modality], want.indexes[modality]
        np.testing.assert_array_equal(a.ids(), b.ids())
        np.testing.assert_allclose(a.reconstruct(a.ids()), b.reconstruct(b.ids()), atol=1e-5)


def test_cli_ray_options_need_ray(tmp_path):
    from typer.testing import CliRunner

    from retrieval.apps.cli import app

    args = ["index", str(tmp_path / "run"), str(tmp_path / "cohort"), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--ray-workers", "2"])
    assert result.exit_code == 2 and "are for --ray" in result.output, result.output
    result = CliRunner().invoke(app, [*args, "--ray", "--ray-workers", "0"])
    assert result.exit_code == 2 and "--ray-workers must be >= 1" in result.output, result.output
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
