"""wan-nabla: Wan2.1 text-to-video with NABLA / STA block-sparse FlexAttention.

    from wan_nabla import apply_attention
    handle = apply_attention(pipe.transformer, {"type": "nabla", "threshold": 0.7})
    ...
    handle.remove()
"""

from .wan.hooks import AttentionHandle, apply_attention
from .config import AttentionConfig, ConfigError, GenerationConfig, RunConfig, load_config

__version__ = "0.2.0"

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
