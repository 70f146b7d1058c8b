"""Shared fixtures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


@pytest.fixture
def deterministic_torch() -> Iterator[None]:
    """Seed torch and turn on deterministic algorithms for one test."""
    torch.manual_seed(0)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


@pytest.fixture(scope="session")
def micro_run_dir(tmp_path_factory) -> Path:
    """A generator run folder with micro-scale weights at 32 px (fresh, seeded)."""
    from encoder import create_generator, save_generator
    from encoder.testing import micro_scale

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("micro-run")
    save_generator(folder, create_generator(micro_scale(32)), micro_scale(32))
    return folder


@pytest.fixture(scope="session")
def pixel_index(tmp_path_factory):
    """A 24-case phantom index embedded by `retrieval.testing.PixelEncoder` (no model).

    Read-only: tests that update an index copy it first.
    """
    from retrieval.data.phantom import write_phantom_cohort
    from retrieval.testing import build_pixel_index

    root = tmp_path_factory.mktemp("pixel")
    write_phantom_cohort(root / "cohort", cases=24, size=64, frames=6, seed=5, progress=False)
    build_pixel_index(root / "cohort", root / "index")
    return root / "index"


@dataclass(frozen=True)
class LiveApi:
    url: str  # base URL of the running API
    cohort: Path  # the cohort its index holds (for query files)


@pytest.fixture(scope="session")
def live_api(pixel_index, tmp_path_factory) -> Iterator[LiveApi]:
    """The real API (uvicorn in a thread, real HTTP) over `pixel_index`, with a run folder
    holding a `stats.jsonl` and a `report.json` so /model has curves and tables."""
    from retrieval.api import Settings, create_app
    from retrieval.apps.demo import ApiThread
    from retrieval.search.engine import Engine
    from retrieval.testing import PixelEncoder

    run = tmp_path_factory.mktemp("live-run")
    rows = [{"Progress/iter": i, "Loss/G_total": 10 / i, "Loss/D_total": 1 / i} for i in (1, 2, 3)]
    (run / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = {"split": "test", "models": {"model": {"psnr": 19.2, "ssim": 0.33}}, "baselines": {}}
    (run / "report.json").write_text(json.dumps(report))
    encoder = PixelEncoder()
    encoder.run_dir = run
    engine = Engine.open(pixel_index, encoder=encoder)
    # the dashboard tests send every search from one address: no limits (test_access.py has them)
    settings = Settings(report=run / "report.json", rate_search="", rate_generate="")
    api = ApiThread(create_app(settings, engine=engine)).start()
    yield LiveApi(api.url, Path(pixel_index).parent / "cohort")
    api.stop()
    engine.close()


@dataclass(frozen=True)
class TinyIndex:
    cohort: Path  # a 24-case phantom cohort (64 px, 6 frames)
    run: Path  # a micro generator (32 px) and its embedder (run / "embedder", dim 32)
    index: Path  # the index folder `build_index(run, cohort, index)` wrote


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory) -> TinyIndex:
    """A real (if barely trained) model and its index: phantom cohort → micro generator
    (3 iterations) → embedder (6 iterations) → index folder. Read-only: copy to update.
    """
    from retrieval.testing import build_micro_index

    cohort, run, index = build_micro_index(tmp_path_factory.mktemp("tiny"))
    return TinyIndex(cohort, run, index)


@pytest.fixture(scope="session")
def model_api(tiny_index) -> Iterator[LiveApi]:
    """The real API (uvicorn in a thread) opening `tiny_index` as `serve` does: the
    trained micro model embeds queries and synthesizes angiograms."""
    from retrieval.api import Settings, create_app
    from retrieval.apps.demo import ApiThread

    settings = Settings(index=tiny_index.index, rate_search="", rate_generate="")  # one address
    api = ApiThread(create_app(settings)).start()
    yield LiveApi(api.url, tiny_index.cohort)
    api.stop()
