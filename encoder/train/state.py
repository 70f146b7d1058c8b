"""Resumable training state in one safetensors file (tensors) with JSON metadata.

`training-state.safetensors` holds every network, both optimizers' tensors and the
torch RNG; its metadata holds the iteration, elapsed time, optimizer param groups,
GradScaler state and the numpy RNG. One file, replaced atomically: a resume never
mixes two snapshots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..checkpoint import atomic_save_safetensors
from ..errors import CheckpointError

STATE_NAME = "training-state.safetensors"


def _flatten_optimizer(
    prefix: str, opt: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + ".state."):
            pid, key = name[len(prefix) + 7 :].split(".", 1)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(
    path: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    scalers: dict[str, torch.amp.GradScaler],
    np_rng: np.random.Generator,
    meta: dict[str, Any],
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        tensors |= {f"{name}.{k}": v for k, v in module.state_dict().items()}
    opt_meta = {}
    for name, opt in optimizers.items():
        t, m = _flatten_optimizer(f"opt_{name}", opt)
        tensors |= t
        opt_meta[name] = m
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    full = dict(meta)
    full["optimizers"] = opt_meta
    full["scalers"] = {k: s.state_dict() for k, s in scalers.items() if s.is_enabled()}
    full["np_rng"] = np_rng.bit_generator.state
    atomic_save_safetensors(path, tensors, {"meta": json.dumps(full)})


def read_training_meta(path: str | Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["meta"])
    except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"unreadable training state: {e}") from e


def load_training_state(
    path: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    scalers: dict[str, torch.amp.GradScaler],
    np_rng: np.random.Generator,
) -> dict[str, Any]:
    """Restore everything saved by save_training_state; returns the metadata."""
    meta = read_training_meta(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(path, str(e)) from e
    for name, module in modules.items():
        sd = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(path, f"{name} weights do not match: {e}") from e
    for name, opt in optimizers.items():
        if name not in meta["optimizers"]:
            raise CheckpointError(path, f"no state for optimizer {name}")
        try:
            opt.load_state_dict(
                _unflatten_optimizer(f"opt_{name}", tensors, meta["optimizers"][name])
            )
        except (ValueError, KeyError) as e:
            raise CheckpointError(path, f"optimizer {name} does not match: {e}") from e
    for name, scaler in scalers.items():
        if scaler.is_enabled() and name in meta["scalers"]:
            scaler.load_state_dict(meta["scalers"][name])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    np_rng.bit_generator.state = meta["np_rng"]
    return meta
