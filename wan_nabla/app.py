"""The application layer: turn command-line / YAML input into a run, for every subcommand.

    cfg = resolve_run_config(args)        # config file (path or preset name) + flag overrides
    gen = load_generator(cfg)             # model resolved (flag, config, weights/, hub) and loaded
    except usage_errors() as e: ...       # the errors that mean "bad input": exit code 2

`args` is any object with the generation flags of `cli.add_generation_flags` as attributes
(argparse.Namespace in the CLI). The CLI (cli.py) and the batch runner (batch/run.py) both
build on this module, so neither imports the other.
"""

from __future__ import annotations

import logging
from typing import Any

from .config import ConfigError, RunConfig, load_config, parse_size

log = logging.getLogger("wan_nabla")


class UsageError(ValueError):
    """A bad command-line value (exit code 2); the message is one line naming it."""


def usage_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit code 2, one line, nothing written)."""
    from .models import ModelNotFoundError
    from .output.files import OutputError

    return (UsageError, ConfigError, OutputError, ModelNotFoundError)


def resolve_run_config(args: Any) -> RunConfig:
    """Config file + flag overrides, validated (ConfigError names the bad value or flag)."""
    from .tiny import TINY_GENERATION, TINY_MODEL_ID

    cfg = load_config(args.config)
    size = parse_size(args.size, "--size") if args.size is not None else None
    if (args.model or cfg.model) == TINY_MODEL_ID:
        tiny = {k: v for k, v in TINY_GENERATION.items() if getattr(args, k) is None}
        if tiny:
            log.info("--model tiny: using %s (give the flags to change)", tiny)
            cfg = cfg.override(**tiny)
    flags = dict(
        model=args.model, negative_prompt=args.negative_prompt, size=size, frames=args.frames,
        steps=args.steps, guidance_scale=args.guidance_scale, shift=args.shift, seed=args.seed,
        fps=args.fps, device=args.device, dtype=args.dtype,
        attention_backend=getattr(args, "attention_backend", None),
    )
    try:
        return cfg.override(**flags)
    except ConfigError as e:
        msg = str(e)
        for name, value in flags.items():  # name the flag the user typed, not only the config key
            key = "attention.backend" if name == "attention_backend" else f"generation.{name}"
            if value is not None and msg.startswith(f"{key}:"):
                msg = f"--{name.replace('_', '-')} ({msg}"
                msg = msg.replace(":", "):", 1)
        raise ConfigError(msg) from None


def load_generator(cfg: RunConfig):
    """Resolve the model (flag, config, weights/, hub) and load it with attention installed."""
    from .models import resolve_model
    from .pipeline import VideoGenerator

    model = resolve_model(cfg.model, None)
    log.info("loading model %s (%s attention)", model, cfg.attention.label())
    gen = VideoGenerator.load(model, cfg)
    log.info("loaded in %.1fs on %s", gen.load_s, gen.device)
    return gen
