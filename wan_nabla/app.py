"""The application layer: turn command-line / YAML input into a run, for every subcommand.

    cfg = resolve_run_config(args)        # config file (path or preset name) + flag overrides
    plan = check_parallel(cfg, "generate")   # torchrun layout checked before anything is loaded
    gen = load_generator(cfg, plan)       # model resolved (flag, config, weights/, hub), DiT weights
                                          # (--transformer), LoRAs and memory mode (--offload) applied
    with parallel_session(plan) as ctx:   # None for one process; else process groups, destroyed after
        gen.use_parallel(ctx)             # sequence / CFG parallel attention on these ranks
        on_main(ctx, lambda: write(...))  # only rank 0 writes; every rank learns whether it worked
    except usage_errors() as e: ...       # the errors that mean "bad input": exit code 2

`args` is any object with the generation flags of `cli.add_generation_flags` as attributes
(argparse.Namespace in the CLI). The CLI (cli.py) and the batch runner (batch/run.py) both
build on this module, so neither imports the other.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .config import ConfigError, RunConfig, load_config, parse_size

log = logging.getLogger("wan_nabla")


class UsageError(ValueError):
    """A bad command-line value (exit code 2); the message is one line naming it."""


class PeerFailure(RuntimeError):
    """Another rank of this torchrun job failed at a step all ranks agree on: exit code 2 if that
    was bad input (the same line is printed on every rank), 1 otherwise."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


T = TypeVar("T")


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
        ulysses_degree=getattr(args, "ulysses_degree", None), cfg_parallel=getattr(args, "cfg_parallel", None),
        attention_backend=getattr(args, "attention_backend", None),
    )
    levers = dict(compile=getattr(args, "compile", None), cache=getattr(args, "cache", None),
                  lora=getattr(args, "lora", None))
    try:
        return cfg.override(**flags).with_levers(**levers)
    except ConfigError as e:
        msg = str(e)
        named = {f"{s}.{k}": (k, v) for k, v in flags.items() for s in ("generation", "memory", "model", "parallel")}
        named.update({"attention.backend": ("attention_backend", flags["attention_backend"]),
                      "speed.compile": ("compile", levers["compile"]), "speed.cache": ("cache", levers["cache"]),
                      "lora": ("lora", levers["lora"])})
        for key, (name, value) in named.items():  # name the flag the user typed, not only the config key
            if value is not None and msg.startswith(f"{key}:"):
                msg = f"--{name.replace('_', '-')} ({msg}"
                msg = msg.replace(":", "):", 1)
        raise ConfigError(msg) from None


def model_label(cfg: RunConfig) -> str:
    """The resolved base model, plus the DiT weights when --transformer replaces its own."""
    from .models import resolve_model

    base = resolve_model(cfg.model.base, None)
    return f"{base} + transformer {cfg.model.transformer}" if cfg.model.transformer else base


def check_parallel(cfg: RunConfig, command: str, env: dict[str, str] | None = None):
    """The checked distributed.ParallelPlan (launch, rank layout, device) of this process, or None
    when it runs alone without parallel settings. Pure and identical on every rank
    (distributed/launch.py), so a bad combination is the same ConfigError everywhere before any
    process group or model exists."""
    from .distributed import Launch, ParallelPlan, plan_ranks, rank_device
    from .models import resolve_model, transformer_heads

    launch = Launch.from_env(env)
    par = cfg.parallel
    if not launch.distributed and par.group_size == 1:
        return None
    heads = transformer_heads(resolve_model(cfg.model.base, None))
    layout = plan_ranks(par, launch.world_size, command=command, heads=heads,
                        guidance_scale=cfg.generation.guidance_scale)
    return ParallelPlan(launch, layout, rank_device(cfg.generation.device, launch), par.timeout_s)


@contextlib.contextmanager
def parallel_session(plan) -> Iterator[Any]:
    """The ParallelContext of a check_parallel plan for the block (None without one); the
    process group is destroyed on the way out, whatever happened."""
    if plan is None:
        yield None
        return
    from .distributed import ParallelContext

    ctx = ParallelContext.start(plan)
    try:
        yield ctx
    finally:
        ctx.close()


def _shared(exc: BaseException) -> tuple[bool, str]:
    """(is bad input, one line) of an exception, as told to the other ranks."""
    text = " ".join(str(exc).split())
    usage = isinstance(exc, usage_errors()) or (isinstance(exc, PeerFailure) and exc.usage)
    return (True, text) if usage else (False, f"{type(exc).__name__}: {text}")


def agreed(ctx, fn: Callable[[], T], here: bool = True, scope: str = "world") -> T | None:
    """fn() where `here` is true; then all ranks of `scope` ('world' or 'item') learn whether it
    failed anywhere: a failing rank re-raises its own exception, the others raise PeerFailure, so
    no rank goes on to wait in a collective for one that gave up. Without a context: fn()."""
    if ctx is None:
        return fn()
    result, exc = None, None
    if here:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - told to the other ranks, then re-raised
            exc = e
    error = ctx.agree(_shared(exc) if exc is not None else None, scope)
    if exc is not None:
        raise exc
    if error is not None:
        usage, text = error
        raise PeerFailure(text if usage else f"another rank failed: {text}", usage=usage)
    return result


def on_main(ctx, fn: Callable[[], T]) -> T | None:
    """fn() on rank 0 only (files are written once), the outcome agreed by all ranks (agreed)."""
    return agreed(ctx, fn, here=ctx is None or ctx.is_main)


def load_generator(cfg: RunConfig, plan=None):  # plan: a ParallelPlan or ParallelContext (its .device)
    """Resolve the model (flag, config, weights/, hub) and load it with attention installed (and
    the config's LoRAs, memory mode, compiled blocks and step cache); LoRA files are checked before
    the model is loaded. Under a ParallelPlan every rank loads its own copy on its device, before
    the process group exists (a load that fails alike everywhere is then a plain error on every
    rank; transformers also saves checkpoints on rank 0 only once a group exists, which the tiny
    model's load relies on). Join the ranks with `gen.use_parallel(ctx)` afterwards."""
    from .lora import preflight_loras
    from .models import resolve_model
    from .pipeline import VideoGenerator

    preflight_loras(cfg.lora)
    model = resolve_model(cfg.model.base, None)
    dit = cfg.model.transformer
    log.info("loading model %s%s (%s attention, offload %s)", model, f" with DiT weights {dit}" if dit else "",
             cfg.attention.label(), cfg.memory.offload)
    warn_if_zero_shot(cfg)
    gen = VideoGenerator.load(model, cfg, device=str(plan.device) if plan is not None else None)
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
