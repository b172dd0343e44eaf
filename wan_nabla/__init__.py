"""wan-nabla: Wan2.1 text-to-video with NABLA / STA block-sparse FlexAttention.

    from wan_nabla import apply_attention
    handle = apply_attention(pipe.transformer, {"type": "nabla", "threshold": 0.7})
    ...
    handle.remove()

Importing the package is light (config only): the command line answers --help and bad input
without torch. The attention entry points (apply_attention, AttentionHandle) import torch on
first access (PEP 562 module __getattr__), so `import wan_nabla` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import AttentionConfig, ConfigError, GenerationConfig, RunConfig, load_config

if TYPE_CHECKING:
    from .wan.hooks import AttentionHandle, apply_attention

__version__ = "0.2.0"

_HEAVY = {"AttentionHandle", "apply_attention"}


def __getattr__(name: str) -> Any:
    if name in _HEAVY:
        from .wan import hooks

        return getattr(hooks, name)
    raise AttributeError(f"module 'wan_nabla' has no attribute {name!r}")


__all__ = [
    "AttentionConfig",
    "AttentionHandle",
    "ConfigError",
    "GenerationConfig",
    "RunConfig",
    "apply_attention",
    "load_config",
    "__version__",
]
