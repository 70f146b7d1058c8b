"""Checkpoints: `generator.safetensors` + `config.json`, rebuilt from data, written atomically.

A checkpoint folder (a training run folder is one) holds:
- `config.json`: {"format", "format_version", "model": ScaleConfig dict, "preprocessing",
  "training": training options, "code_version", "iteration"};
- `generator.safetensors`: the generator's state dict (the config JSON in its metadata).

Each file is replaced atomically (flushed to disk before its rename, the folder after
it), but the two are two renames: a process killed between
them leaves a `config.json` of the previous checkpoint beside new weights. The weights'
embedded config is written with them in one file, so `load_generator` takes that one
(and says so when `config.json` differs). Temporaries are named
`.NAME.tmp-PID_HOST_XXXX`; the next save removes those of writers that were killed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .configs import ScaleConfig, get_scale, list_scales
from .errors import CheckpointError, ConfigError, UnknownModel
from .networks import Generator

log = logging.getLogger(__name__)

FORMAT = "fundus2video-generator"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "generator.safetensors"
LOCAL_PREFIX = "local-dir:"


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    try:
        version = metadata.version("fundus2video")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}"


@contextlib.contextmanager
def _atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` that replaces it on success (removed on failure).

    `encoder` does not import `index`, which has the project's general atomic writers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    prefix = f".{path.name}.tmp-{os.getpid()}_{socket.gethostname()}_"
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync(path: str | Path) -> None:
    """Flush a file or a folder's entries to disk, so a power loss after the rename leaves
    the old or the new file (as `index.atomic.fsync_path`; FUNDUS2VIDEO_FSYNC=0: off)."""
    if os.environ.get("FUNDUS2VIDEO_FSYNC", "1").strip().lower() in ("0", "false", "no"):
        return
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of `path` left by killed writers of this host (as
    `index.atomic.remove_stale_temporaries`, which `encoder` does not import)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-(\d+)_([^_/]*)_.*")
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        found = pattern.fullmatch(tmp.name)
        if found is None or found.group(2) != socket.gethostname():
            continue
        try:
            os.kill(int(found.group(1)), 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        log.info("removed %s, left by a writer that was killed", tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write through a temporary sibling and os.replace, so readers never see half a file."""
    with _atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_save_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None
) -> None:
    with _atomic_path(path) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, tmp, metadata=meta)


def checkpoint_config(
    scale: ScaleConfig, training: dict[str, Any] | None = None, iteration: int | None = None
) -> dict[str, Any]:
    """The `config.json` dictionary of a generator checkpoint."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": scale.to_dict(),
        "preprocessing": {
            "size": scale.generator.image_size,
            "geometry": "centre-pad to square with black, then antialiased bilinear resize",
            "cf": "RGB uint8 -> x / 127.5 - 1",
            "ffa": "grey uint8 -> x / 127.5 - 1",
            "previous_frames_before_start": "black",
        },
        "training": training or {},
        "code_version": code_version(),
        "iteration": iteration,
    }


def save_generator(
    folder: str | Path,
    generator: Generator,
    scale: ScaleConfig,
    training: dict[str, Any] | None = None,
    iteration: int | None = None,
) -> Path:
    """Write `generator.safetensors` then `config.json` into `folder`, each atomically."""
    if scale.generator != generator.config:
        raise ConfigError(
            f"scale config {scale.generator} does not describe the generator ({generator.config})"
        )
    folder = Path(folder)
    cfg = checkpoint_config(scale, training, iteration)
    text = json.dumps(cfg, indent=2)
    atomic_save_safetensors(folder / WEIGHTS_NAME, generator.state_dict(), {"config": text})
    atomic_write_text(folder / CONFIG_NAME, text + "\n")
    return folder


def read_checkpoint_config(folder: str | Path) -> dict[str, Any]:
    """`config.json` of a checkpoint folder, validated for format."""
    path = Path(str(folder).removeprefix(LOCAL_PREFIX)) / CONFIG_NAME
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(path.parent, f"no {CONFIG_NAME}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"invalid JSON: {e}") from e
    if cfg.get("format") != FORMAT:
        raise CheckpointError(path, f"format {cfg.get('format')!r} is not {FORMAT!r}")
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(path, f"format_version {cfg['format_version']} is newer than ours")
    return cfg


def load_generator(folder: str | Path) -> tuple[Generator, dict[str, Any]]:
    """Rebuild the generator from `config.json` and load its weights (strict)."""
    folder = Path(str(folder).removeprefix(LOCAL_PREFIX))
    cfg = read_checkpoint_config(folder)
    try:
        state = load_file(str(folder / WEIGHTS_NAME))
        cfg = _weights_config(folder, cfg)
    except FileNotFoundError as e:
        raise CheckpointError(folder, f"no {WEIGHTS_NAME}") from e
    except SafetensorError as e:
        raise CheckpointError(folder / WEIGHTS_NAME, str(e)) from e
    scale = ScaleConfig.from_dict(cfg["model"])
    generator = Generator(scale.generator)
    try:
        generator.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(folder / WEIGHTS_NAME, f"weights do not match config: {e}") from e
    generator.eval()
    return generator, cfg


def _weights_config(folder: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The config saved inside the weights file (written atomically with them) when it
    differs from `config.json` for the same model (a save interrupted between the two
    files), else `cfg` (a model that differs stays an error of `load_generator`)."""
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        text = (f.metadata() or {}).get("config")
    if text is None:
        return cfg
    try:
        embedded = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(folder / WEIGHTS_NAME, f"invalid embedded config: {e}") from e
    if embedded == cfg or embedded.get("model") != cfg.get("model"):
        return cfg
    log.warning(
        "%s: %s is from iteration %s, the weights from %s (a save was interrupted); "
        "using the config saved with the weights",
        folder,
        CONFIG_NAME,
        cfg.get("iteration"),
        embedded.get("iteration"),
    )
    return embedded


def create_scale(name_or_config: str | ScaleConfig, **overrides: Any) -> ScaleConfig:
    scale = get_scale(name_or_config) if isinstance(name_or_config, str) else name_or_config
    return scale.replace(**overrides) if overrides else scale


def create_generator(name_or_dir: str | Path | ScaleConfig, **overrides: Any) -> Generator:
    """A generator by scale name ("tiny", "paper": fresh weights from the current torch RNG),
    a ScaleConfig, or a checkpoint folder ("runs/00042" or "local-dir:runs/00042": trained
    weights, eval mode). `overrides` change config fields of a fresh model (e.g. image_size=64).
    """
    if isinstance(name_or_dir, ScaleConfig):
        return Generator(create_scale(name_or_dir, **overrides).generator)
    text = str(name_or_dir)
    if text in list_scales() and not text.startswith(LOCAL_PREFIX):
        return Generator(create_scale(text, **overrides).generator)
    folder = Path(text.removeprefix(LOCAL_PREFIX))
    if not folder.is_dir():
        raise UnknownModel(text, list_scales())
    if overrides:
        raise ConfigError(f"cannot override {sorted(overrides)} of a trained checkpoint {folder}")
    return load_generator(folder)[0]
