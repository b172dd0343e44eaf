"""The application layer: turn command-line / YAML input into a run, for every subcommand.

    cfg = resolve_run_config(args)        # config file (path or preset name) + flag overrides
    gen = load_generator(cfg)             # model resolved (flag, config, weights/, hub), DiT weights
                                          # (--transformer) and memory mode (--offload) applied
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
    from .checkpoint import CheckpointError
    from .lora import LoraError
    from .models import ModelNotFoundError
    from .output.files import OutputError

    return (UsageError, ConfigError, OutputError, ModelNotFoundError, CheckpointError, LoraError)


def resolve_run_config(args: Any) -> RunConfig:
    """Config file + flag overrides, validated (ConfigError names the bad value or flag)."""
    from .tiny import TINY_GENERATION, TINY_MODEL_ID

    cfg = load_config(args.config)
    size = parse_size(args.size, "--size") if args.size is not None else None
    if (args.model or cfg.model.base) == TINY_MODEL_ID:
        tiny = {k: v for k, v in TINY_GENERATION.items() if getattr(args, k) is None}
        if tiny:
            log.info("--model tiny: using %s (give the flags to change)", tiny)
            cfg = cfg.override(**tiny)
    flags = dict(
        model=args.model, negative_prompt=args.negative_prompt, size=size, frames=args.frames,
        steps=args.steps, guidance_scale=args.guidance_scale, shift=args.shift, seed=args.seed,
        fps=args.fps, device=args.device, dtype=args.dtype, transformer=getattr(args, "transformer", None),
        offload=getattr(args, "offload", None), vae_tiling=getattr(args, "vae_tiling", None),
        sampler=getattr(args, "sampler", None),
    )
    levers = dict(compile=getattr(args, "compile", None), cache=getattr(args, "cache", None),
                  lora=getattr(args, "lora", None))
    try:
        return cfg.override(**flags).with_levers(**levers)
    except ConfigError as e:
        msg = str(e)
        named = {**{f"{s}.{k}": v for k, v in flags.items() for s in ("generation", "memory", "model")},
                 "speed.compile": levers["compile"], "speed.cache": levers["cache"], "lora": levers["lora"]}
        for key, value in named.items():  # name the flag the user typed, not only the config key
            name = key.rpartition(".")[2]
            if value is not None and msg.startswith(f"{key}:"):
                msg = f"--{name.replace('_', '-')} ({msg}"
                msg = msg.replace(":", "):", 1)
        raise ConfigError(msg) from None


def model_label(cfg: RunConfig) -> str:
    """The resolved base model, plus the DiT weights when --transformer replaces its own."""
    from .models import resolve_model

    base = resolve_model(cfg.model.base, None)
    return f"{base} + transformer {cfg.model.transformer}" if cfg.model.transformer else base


def load_generator(cfg: RunConfig):
    """Resolve the model (flag, config, weights/, hub) and load it with attention installed (and
    the config's LoRAs, compiled blocks and step cache); LoRA files are checked before the model
    is loaded."""
    from .lora import preflight_loras
    from .models import resolve_model
    from .pipeline import VideoGenerator

    preflight_loras(cfg.lora)
    model = resolve_model(cfg.model.base, None)
    dit = cfg.model.transformer
    log.info("loading model %s%s (%s attention, offload %s)", model, f" with DiT weights {dit}" if dit else "",
             cfg.attention.label(), cfg.memory.offload)
    warn_if_zero_shot(cfg)
    gen = VideoGenerator.load(model, cfg)
    log.info("loaded in %.1fs on %s", gen.load_s, gen.device)
    return gen


def warn_if_zero_shot(cfg: RunConfig) -> bool:
    """One log line when the config names the DiT it was tuned for and the run uses other weights."""
    from .models import download_command, same_checkpoint

    tuned = cfg.model.recommended_transformer
    if not tuned or same_checkpoint(cfg.model.transformer, tuned):
        return False
    log.warning("zero-shot run: this config was tuned for the DiT %s, but the run uses %s; for the tuned weights: "
                "%s, then add --transformer weights/%s", tuned, cfg.model.transformer or "the model's own transformer",
                download_command(tuned, dit_only=True), tuned.split("/")[-1])
    return True
