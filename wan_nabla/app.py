"""The application layer: turn command-line / YAML input into a run, for every subcommand.

    cfg = resolve_run_config(args)        # config file (path or preset name) + flag overrides
    plan = check_parallel(cfg, "generate")   # torchrun layout checked before anything is loaded
    facts = validate_run(cfg, {"--prompt": prompt})   # everything else checkable before loading
    gen = load_generator(cfg, plan, facts.model)   # model resolved (flag, config, weights/, hub), DiT
                                          # weights (--transformer), LoRAs and memory mode (--offload) applied
    with parallel_session(plan) as ctx:   # None for one process; else process groups, destroyed after
        gen.use_parallel(ctx)             # sequence / CFG parallel attention on these ranks
        on_main(ctx, lambda: write(...))  # only rank 0 writes; every rank learns whether it worked
    except usage_errors() as e: ...       # the errors that mean "bad input": exit code 2

`args` is any object with the generation flags of `cli.add_generation_flags` as attributes
(argparse.Namespace in the CLI). The CLI (cli.py) and the batch runner (batch/run.py) both
build on this module, so neither imports the other.

validate_run is THE preflight of every subcommand that generates (generate, batch, compare):
it runs before anything is loaded or written, in about a millisecond (plus one request to the
hub for a hub id that is not cached), and raises a one-line usage error for
- text that cannot be written as UTF-8 (prompts with lone surrogates: bytes that were not UTF-8
  in the shell's argv or a file name, kept by Python's surrogateescape);
- a device that is not there (`cuda` without CUDA, `cuda:N` past the device count);
- a model that is missing (models.check_available: path, cache, hub; with the download command),
  and LoRA files that are missing or not LoRAs (lora.preflight_loras);
- settings the model or the sampler cannot run (ModelFacts.check): steps the UniPC sampler
  fails on at this shift (config.GenerationConfig.steps), sizes or frame counts past the model's
  rotary table, dense_layers past its depth.
Per-field ranges (guidance, shift, steps, frames, size, seed, fps) are the config's own checks.
A batch calls validate_run for its whole-run values (exit 2) and ModelFacts.check per item (that
item fails). ModelFacts comes from the model's config files when they are on disk (a local
directory, the hub cache, the tiny model's constants), else Wan2.1's values.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .config import ConfigError, GenerationConfig, RunConfig, load_config, parse_size, utf8_problem

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


def check_text(text: str | None, what: str, required: bool = False) -> None:
    """UsageError if `text` cannot be written as UTF-8 (or is empty when required)."""
    if text is None or not text.strip():
        if required:
            raise UsageError(f"{what}: must be a non-empty string")
        return
    why = utf8_problem(text)
    if why is not None:
        raise UsageError(f"{what}: {why}")


def check_device(name: str) -> None:
    """UsageError if device `name` (auto, cpu, cuda, cuda:N) is not on this machine."""
    import torch

    if name in ("auto", "cpu"):
        return
    if not torch.cuda.is_available():
        raise UsageError(f"device {name!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto")
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")


def check_quantize(cfg: RunConfig) -> None:
    """UsageError if the run asks for FP8 linears on a device that cannot run them (quantize.py):
    an explicit request is refused, never run in bf16 under the fp8 label."""
    if cfg.speed.quantize == "none":
        return
    import torch

    from .quantize import fp8_unsupported

    name = cfg.generation.device
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)
    why = fp8_unsupported(device)
    if why is not None:
        raise UsageError(f"--quantize {cfg.speed.quantize}: {why}; use --quantize none")


def _wan_scheduler() -> dict[str, Any]:
    from .adapter import WAN_SCHEDULER_CONFIG

    return dict(WAN_SCHEDULER_CONFIG)


@dataclass(frozen=True)
class ModelFacts:
    """What a model can run, known before it is loaded (module doc)."""

    model: str
    rope_positions: int = 1024
    """Rotary table length per axis (WanTransformer3DModel rope_max_seq_len)."""
    num_layers: int | None = None
    """Transformer blocks, if known."""
    patch: tuple[int, int, int] = (1, 2, 2)
    scheduler: Mapping[str, Any] = field(default_factory=_wan_scheduler)
    """The scheduler config (adapter.WAN_SCHEDULER_CONFIG when not on disk)."""

    def check_attention(self, attention) -> None:
        bad = [i for i in attention.dense_layers if self.num_layers is not None and i >= self.num_layers]
        if bad:
            raise ConfigError(f"attention.dense_layers: {bad} out of range; model {self.model!r} has blocks "
                              f"0..{self.num_layers - 1}")

    @functools.cached_property
    def _scheduler_json(self) -> str:
        return json.dumps(dict(self.scheduler), sort_keys=True, default=str)

    def check(self, g: GenerationConfig) -> None:
        """ConfigError if this model and its sampler cannot run settings `g` (module doc)."""
        shift = g.resolved_shift
        top = _max_steps(self._scheduler_json, shift) if g.sampler == "unipc" else None
        if top is not None and g.steps > top:
            raise ConfigError(
                f"generation.steps: {g.steps} steps at shift {shift:g} cannot run: the UniPC sampler's first two "
                f"timesteps coincide and diffusers fails at the last step; use at most {top} steps at this "
                "shift (--steps), or a smaller --shift")
        pt, ph, pw = self.patch
        latent_frames = (g.frames - 1) // 4 + 1
        need = {"frames": latent_frames // pt, "height": g.height // (8 * ph), "width": g.width // (8 * pw)}
        over = {k: v for k, v in need.items() if v > self.rope_positions}
        if over:
            side = self.rope_positions * 8 * min(ph, pw)
            frames = 4 * (self.rope_positions * pt - 1) + 1
            raise ConfigError(
                f"generation.size/frames: {g.width}x{g.height}, {g.frames} frames needs {max(over.values())} "
                f"rotary positions on the {'/'.join(over)} axis, but model {self.model!r} has "
                f"{self.rope_positions}; use at most {side} px per side and {frames} frames")


@functools.lru_cache(maxsize=256)
def _max_steps(scheduler_json: str, shift: float) -> int:
    """Most steps the scheduler runs at `shift` (1..1000). The failing counts are all counts from
    a threshold on (sigma_1 grows with the step count), so a bisection finds it exactly."""
    from .adapter import sampler_runs
    from .config import NUM_TRAIN_TIMESTEPS

    conf = json.loads(scheduler_json)
    if sampler_runs(conf, NUM_TRAIN_TIMESTEPS, shift):
        return NUM_TRAIN_TIMESTEPS
    ok, bad = 1, NUM_TRAIN_TIMESTEPS  # one step has one timestep: it always runs
    while bad - ok > 1:
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if sampler_runs(conf, mid, shift) else (ok, mid)
    return ok


def _read_json(path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_facts(model: str) -> ModelFacts:
    """ModelFacts of `model` from its config files on disk (no download, no weights read)."""
    from .adapter import WAN_SCHEDULER_CONFIG
    from .models import model_file
    from .tiny import TINY_LAYERS, TINY_MODEL_ID, TINY_ROPE_POSITIONS

    if model == TINY_MODEL_ID:
        return ModelFacts(model, TINY_ROPE_POSITIONS, TINY_LAYERS, scheduler=WAN_SCHEDULER_CONFIG)
    tc = _read_json(model_file(model, "transformer/config.json"))
    sc = _read_json(model_file(model, "scheduler/scheduler_config.json")) or WAN_SCHEDULER_CONFIG
    patch = tc.get("patch_size", (1, 2, 2))
    ok = isinstance(patch, (list, tuple)) and len(patch) == 3 and all(isinstance(p, int) and p > 0 for p in patch)
    layers = tc.get("num_layers")
    return ModelFacts(model, int(tc.get("rope_max_seq_len") or 1024),
                      layers if isinstance(layers, int) else None, tuple(patch) if ok else (1, 2, 2), sc)


def validate_run(cfg: RunConfig, texts: Mapping[str, str | None] | None = None) -> ModelFacts:
    """The preflight (module doc): raises a usage error (exit 2) or returns the model's facts.
    `texts` maps what to call a text in a message (e.g. "--prompt") to the text."""
    from .lora import preflight_loras
    from .models import check_available, resolve_model

    for what, text in (texts or {}).items():
        check_text(text, what)
    check_device(cfg.generation.device)
    check_quantize(cfg)
    model = resolve_model(cfg.model.base, None)
    check_available(model, cfg.model.base, transformer_weights=cfg.model.transformer is None)
    preflight_loras(cfg.lora)
    facts = model_facts(model)
    facts.check_attention(cfg.attention)
    facts.check(cfg.generation)
    if cfg.speed.cache_kind == "mag":  # published MagCache ratios exist for this model's shape?
        from .magcache import check

        check(cfg.speed, _transformer_config_on_disk(model))
    return facts


def _transformer_config_on_disk(model: str) -> dict[str, Any] | None:
    """The transformer config.json of `model` without loading or downloading anything; None if unknown."""
    from .models import model_file
    from .tiny import TINY_MODEL_ID, TINY_TRANSFORMER_CONFIG

    if model == TINY_MODEL_ID:
        return dict(TINY_TRANSFORMER_CONFIG)
    tc = _read_json(model_file(model, "transformer/config.json"))
    keys = ("num_layers", "num_attention_heads", "attention_head_dim")
    return tc if all(isinstance(tc.get(k), int) for k in keys) else None


def describe_failure(exc: BaseException) -> str:
    """One line for an error that stopped a generation (out of memory gets advice)."""
    text = " ".join(str(exc).split()) or "(no message)"
    if "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError":
        return f"out of memory: {text[:300]}; lower size or frames, or use a sparser attention config"
    return f"{type(exc).__name__}: {text[:500]}"


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
        fps=args.fps, crf=getattr(args, "crf", None), device=args.device, dtype=args.dtype, transformer=getattr(args, "transformer", None),
        offload=getattr(args, "offload", None), vae_tiling=getattr(args, "vae_tiling", None),
        vae_dtype=getattr(args, "vae_dtype", None),
        sampler=getattr(args, "sampler", None),
        ulysses_degree=getattr(args, "ulysses_degree", None), cfg_parallel=getattr(args, "cfg_parallel", None),
        attention_backend=getattr(args, "attention_backend", None),
    )
    levers = dict(compile=getattr(args, "compile", None), cache=getattr(args, "cache", None),
                  lora=getattr(args, "lora", None), quantize=getattr(args, "quantize", None))
    try:
        return cfg.override(**flags).with_levers(**levers)
    except ConfigError as e:
        msg = str(e)
        named = {f"{s}.{k}": (k, v) for k, v in flags.items() for s in ("generation", "memory", "model", "parallel")}
        named.update({"attention.backend": ("attention_backend", flags["attention_backend"]),
                      "speed.compile": ("compile", levers["compile"]), "speed.cache": ("cache", levers["cache"]),
                      "speed.quantize": ("quantize", levers["quantize"]),
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


def load_generator(cfg: RunConfig, plan=None, model: str | None = None):
    # plan: a ParallelPlan or ParallelContext (its .device); model: the resolved base (validate_run)
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
    model = model or resolve_model(cfg.model.base, None)
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

    from .tiny import TINY_MODEL_ID

    tuned = cfg.model.recommended_transformer
    if not tuned or same_checkpoint(cfg.model.transformer, tuned) or cfg.model.base == TINY_MODEL_ID:
        return False  # (the tiny test model has no tuned DiT: nothing to suggest)
    log.warning("zero-shot run: this config was tuned for the DiT %s, but the run uses %s; for the tuned weights: "
                "%s, then add --transformer weights/%s", tuned, cfg.model.transformer or "the model's own transformer",
                download_command(tuned, dit_only=True), tuned.split("/")[-1])
    return True
