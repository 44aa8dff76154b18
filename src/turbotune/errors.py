"""Errors turbotune raises for things the user can fix. The CLI prints them as one line, without a traceback."""
from __future__ import annotations


class TurbotuneError(RuntimeError):
    """Something the user can act on; the message says what happened and what to do."""


class ModelLoadError(TurbotuneError):
    pass


class ConfigError(TurbotuneError):
    pass


class TrainingStopped(TurbotuneError):
    """Training ended early (non-finite loss, out of memory); earlier checkpoints are intact."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
