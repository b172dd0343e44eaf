"""The errors that mean "bad input" (exit code 2, one line, nothing written), known without torch.

    try: plan = plan_generate(request)
    except USAGE_ERRORS as e: print(f"wan-nabla: error: {e}"); return 2

Each heavy module raises its own subclass (LoraError from lora.py, CheckpointError from
checkpoint.py, ModelNotFoundError from models.py); defining them here lets the CLI catch them
before those modules, and torch, are imported. Limits: an error raised outside this tuple is a
failed run (exit 1), whatever its text says.
"""

from __future__ import annotations

from .config import ConfigError
from .model_source import ModelNotFoundError
from .output.files import OutputError


class UsageError(ValueError):
    """A bad command-line value (exit code 2); the message is one line naming it."""


class PeerFailure(RuntimeError):
    """Another rank of this torchrun job failed at a step all ranks agree on: exit code 2 if that
    was bad input (the same line is printed on every rank), 1 otherwise."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


class LoraError(ValueError):
    """A LoRA that cannot be applied; the message is one line naming the file and the first bad key."""


class CheckpointError(ValueError):
    """A DiT checkpoint that cannot be loaded; one line naming the file or key."""


USAGE_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    ConfigError,
    OutputError,
    ModelNotFoundError,
    CheckpointError,
    LoraError,
)


def describe_failure(exc: BaseException) -> str:
    """One line for an error that stopped a generation (out of memory gets advice)."""
    text = " ".join(str(exc).split()) or "(no message)"
    if "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError":
        return f"out of memory: {text[:300]}; lower size or frames, or use a sparser attention config"
    return f"{type(exc).__name__}: {text[:500]}"
