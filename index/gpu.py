"""GPU placement: a search-only mirror of a CPU index, when faiss-gpu sees GPUs.

The CPU index stays the master copy (it is what gets saved, mutated, and used for
exhaustive fallbacks); the GPU copy is rebuilt from it after a mutation. FAISS
has no GPU HNSW, so HNSW indexes stay on the CPU (CAGRA is not used: it needs a
different build and has no id map).
"""

from __future__ import annotations

import logging

import faiss

from .keys import IndexSpec

log = logging.getLogger(__name__)

GPU_MAX_K = 2048  # largest k (and over-fetch) FAISS GPU indexes accept


def gpu_count() -> int:
    """GPUs visible to FAISS (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def gpu_unsupported_reason(spec: IndexSpec) -> str | None:
    """Why `spec` cannot live on a GPU, or None when it can."""
    if spec.kind == "hnsw":
        return "HNSW has no FAISS GPU implementation; searching on CPU"
    if gpu_count() == 0:
        return "no GPU visible to FAISS; searching on CPU"
    return None


def to_gpu(index: faiss.Index, spec: IndexSpec, search_params: dict[str, int]) -> faiss.Index:
    """Copy a CPU index to every GPU (replicas) with its search-time parameters set."""
    options = faiss.GpuMultipleClonerOptions()
    try:
        gpu_index = faiss.index_cpu_to_all_gpus(index, co=options)
    except RuntimeError as err:
        if spec.kind != "ivf_pq":
            raise
        # large m overflows shared memory with float32 lookup tables
        log.info("retrying GPU IVF-PQ with float16 lookup tables (%s)", err)
        options.useFloat16LookupTables = True
        gpu_index = faiss.index_cpu_to_all_gpus(index, co=options)
    if spec.is_ivf and "nprobe" in search_params:
        faiss.GpuParameterSpace().set_index_parameter(
            gpu_index, "nprobe", min(search_params["nprobe"], GPU_MAX_K)
        )
    return gpu_index
