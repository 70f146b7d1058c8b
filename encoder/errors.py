"""Named errors of the model library; each names the bad value so a CLI can show it verbatim."""

from __future__ import annotations

from pathlib import Path


class EncoderError(Exception):
    """Base class of the model library's errors."""


class UnknownModel(EncoderError, ValueError):
    """A model name that is neither a bundled scale nor a checkpoint folder."""

    def __init__(self, name: str, available: list[str]):
        self.name = name
        self.available = available
        super().__init__(
            f"unknown model {name!r}: not one of {available} and not a checkpoint folder "
            "(a folder with config.json and generator.safetensors)"
        )


class ConfigError(EncoderError, ValueError):
    """A model or training configuration value is out of range or inconsistent."""


class OutputExists(EncoderError, FileExistsError):
    """The output folder already holds what a call would write (a run, an embedder)."""


class CheckpointError(EncoderError):
    """A checkpoint folder or file is missing, incomplete, or does not match its config."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"bad checkpoint {self.path}: {reason}")


class DataError(EncoderError, ValueError):
    """Arrays handed to the library do not have the documented shape, dtype or range."""
