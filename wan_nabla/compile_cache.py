"""Where compiled kernels persist between runs (no torch: set before torch is imported).

    use_compile_cache()    # TORCHINDUCTOR_CACHE_DIR, else $XDG_CACHE_HOME/wan-nabla/inductor

The first sparse video of a shape compiles the FlexAttention kernel (and, with speed.compile,
the transformer blocks): measured in docs/usage.md ("First run"). Inductor's FX graph cache and
AOTAutograd cache (on by default in torch >= 2.5) keep the generated code on disk, so a second
process with the same shapes skips code generation; TorchDynamo still traces each process.
Torch's default directory (/tmp/torchinductor_<user>) is lost with /tmp and in every fresh
container; this one lives with the user's other caches (mount it into Docker to keep it).
Limits: torch writes its default into the environment when it first compiles or is imported
with inductor, so this must run before `import torch` (cli.py calls it before the runner).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def compile_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """$TORCHINDUCTOR_CACHE_DIR if set, else $XDG_CACHE_HOME/wan-nabla/inductor (~/.cache/...)."""
    env = os.environ if env is None else env
    if env.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(env["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "wan-nabla" / "inductor"


def use_compile_cache() -> Path:
    """Point Inductor's on-disk caches at compile_cache_dir() (see module doc)."""
    path = compile_cache_dir()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path
