"""The command runner: what happens once preflight has accepted a run (imports torch and diffusers).

    plan = preflight.plan_generate(request)        # light: config, model, layout, output (no torch)
    from wan_nabla import app                      # heavy modules load here, once the run is valid
    app.run_generate(plan, request)                # check_environment, load, generate, write

cli.py imports this module only after preflight succeeded, so --help, `presets` and bad input
never import torch. Here:
- check_environment(plan): what needs torch but no model: the device exists, the UniPC sampler
  runs the step count at the shift (diffusers' scheduler, no weights);
- parallel_session(plan): the process groups of a torchrun job for the block, destroyed after;
- load_generator(...): weights read before the process group exists, the generator built once
  with its parallel layout bound (never installed and undone);
- agreed / on_main: every rank learns whether a step failed anywhere, so none waits forever;
- run_generate: the `generate` command. batch/run.py and compare/run.py run the other two.
Limits: exit codes are cli.py's; everything raised here that is in errors.USAGE_ERRORS is bad
input (exit 2), anything else a failed run (exit 1).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import diffusers.utils.logging as dlog
import torch
import transformers.utils.logging as tlog
from huggingface_hub.utils import disable_progress_bars

from .compare.save_masks import MaskSaver
from .config import NUM_TRAIN_TIMESTEPS, ConfigError, GenerationConfig, RunConfig
from .distributed.context import ParallelContext, rank_device
from .distributed.launch import ParallelPlan
from .errors import USAGE_ERRORS, PeerFailure, UsageError, describe_failure  # noqa: F401 - used by batch/run.py
from .model_source import (
    TINY_MODEL_ID,
    ModelFacts,
    download_command,
    same_checkpoint,
)
from .output.files import ensure_writable_dir, remove_created_dirs
from .output.publish import publish_video
from .output.sidecar import check_destination
from .pipeline import VideoGenerator, load_weights
from .preflight import ParallelLayout, RunPlan, check_model_fits
from .quantize import fp8_unsupported
from .requests import GenerateRequest
from .sampling import sampler_runs

log = logging.getLogger("wan_nabla")

T = TypeVar("T")

TEXT_ENCODER_TOKENS = 512
"""UMT5 reads this many tokens of a prompt (WanPipeline max_sequence_length); the rest is cut."""


# ---- checks that need torch, still before any weight is read -----------------------------------
def check_device(name: str) -> None:
    """UsageError if device `name` (auto, cpu, cuda, cuda:N) is not on this machine."""
    if name in ("auto", "cpu"):
        return
    if not torch.cuda.is_available():
        raise UsageError(
            f"device {name!r}: CUDA is not available on this machine (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto"
        )
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")


def check_quantize(cfg: RunConfig) -> None:
    """UsageError if the run asks for FP8 linears on a device that cannot run them (quantize.py):
    an explicit request is refused, never run in bf16 under the fp8 label."""
    if cfg.speed.quantize == "none":
        return

    name = cfg.generation.device
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)
    why = fp8_unsupported(device)
    if why is not None:
        raise UsageError(f"--quantize {cfg.speed.quantize}: {why}; use --quantize none")


@functools.lru_cache(maxsize=256)
def _max_steps(scheduler_json: str, shift: float) -> int:
    """Most steps the scheduler runs at `shift` (1..1000). The failing counts are all counts from
    a threshold on (sigma_1 grows with the step count), so a bisection finds it exactly."""
    conf = json.loads(scheduler_json)
    if sampler_runs(conf, NUM_TRAIN_TIMESTEPS, shift):
        return NUM_TRAIN_TIMESTEPS
    ok, bad = 1, NUM_TRAIN_TIMESTEPS  # one step has one timestep: it always runs
    while bad - ok > 1:
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if sampler_runs(conf, mid, shift) else (ok, mid)
    return ok


def check_sampler(facts: ModelFacts, g: GenerationConfig) -> None:
    """ConfigError if the model's UniPC sampler cannot run g.steps at g's shift."""
    if g.sampler != "unipc":
        return
    shift = g.resolved_shift
    top = _max_steps(json.dumps(dict(facts.scheduler), sort_keys=True, default=str), shift)
    if g.steps > top:
        raise ConfigError(
            f"generation.steps: {g.steps} steps at shift {shift:g} cannot run: the UniPC sampler's first two "
            f"timesteps coincide and diffusers fails at the last step; use at most {top} steps at this "
            "shift (--steps), or a smaller --shift"
        )


def item_check(facts: ModelFacts, attention) -> Callable[[GenerationConfig], None]:
    """A batch item's settings against the model (rotary table) and its sampler (ConfigError)."""

    def check(g: GenerationConfig) -> None:
        check_model_fits(facts, g, attention)
        check_sampler(facts, g)

    return check


def check_environment(plan: RunPlan) -> None:
    """The checks that need torch (module doc); then the plan's notes, logged once."""
    if plan.parallel is not None and plan.parallel.launch.distributed:
        rank_device(plan.config.generation.device, plan.parallel.launch)  # torchrun's own device rules
    else:
        check_device(plan.config.generation.device)
    check_quantize(plan.config)
    # the run's own settings (config + flags) for every command: a batch whose defaults cannot run
    # is exit 2; an item's own values are checked per item (a failed item)
    check_sampler(plan.facts, plan.config.generation)
    for note in plan.notes:
        log.warning("%s", note)


def quiet_libraries(quiet: bool = False) -> None:
    """Loading bars of diffusers/transformers (shards, components) are noise next to our own bars;
    with --quiet huggingface_hub's download bars go too."""
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    if quiet:
        disable_progress_bars()


# ---- ranks -------------------------------------------------------------------------------------
def parallel_plan(plan: RunPlan) -> ParallelPlan | None:
    """The plan's rank layout with this rank's device, what ParallelContext.start takes."""
    return with_device(plan.parallel, plan.config.generation.device)


def with_device(par: ParallelLayout | None, device: str) -> ParallelPlan | None:
    """A checked layout (preflight.check_parallel) with this rank's torch device."""
    if par is None:
        return None
    return ParallelPlan(par.launch, par.layout, rank_device(device, par.launch), par.timeout_s)


@contextlib.contextmanager
def parallel_session(pplan: ParallelPlan | None) -> Iterator[ParallelContext | None]:
    """The ParallelContext of `pplan` for the block (None without one); the process group is
    destroyed on the way out, whatever happened."""
    if pplan is None:
        yield None
        return
    ctx = ParallelContext.start(pplan)
    try:
        yield ctx
    finally:
        ctx.close()


def _shared(exc: BaseException) -> tuple[bool, str]:
    """(is bad input, one line) of an exception, as told to the other ranks."""
    text = " ".join(str(exc).split())
    usage = isinstance(exc, USAGE_ERRORS) or (isinstance(exc, PeerFailure) and exc.usage)
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


# ---- loading -----------------------------------------------------------------------------------
def load_weights_for(cfg: RunConfig, device, model: str):
    """Read the weights of `model` (the plan's, resolved once by preflight) for `cfg`
    (pipeline.load_weights) on `device` (a ParallelPlan's device under torchrun; None: the
    config's); the generator is built afterwards, bound to its parallel context."""
    dit = cfg.model.transformer
    log.info(
        "loading model %s%s (%s attention, offload %s)",
        model,
        f" with DiT weights {dit}" if dit else "",
        cfg.attention.label(),
        cfg.memory.offload,
    )
    warn_if_zero_shot(cfg)
    return load_weights(model, cfg, device=str(device) if device is not None else None)


def load_generator(cfg: RunConfig, parallel: ParallelContext | None, model: str, device=None) -> VideoGenerator:
    """Weights read and the generator built in one go (one process, or a context that exists)."""
    loaded = load_weights_for(cfg, device if device is not None else getattr(parallel, "device", None), model)
    gen = loaded.generator(parallel)
    log.info("loaded in %.1fs on %s", gen.load_s, gen.device)
    return gen


def warn_if_zero_shot(cfg: RunConfig) -> bool:
    """One log line when the config names the DiT it was tuned for and the run uses other weights."""
    tuned = cfg.model.recommended_transformer
    if not tuned or same_checkpoint(cfg.model.transformer, tuned) or cfg.model.base == TINY_MODEL_ID:
        return False  # (the tiny test model has no tuned DiT: nothing to suggest)
    log.warning(
        "zero-shot run: this config was tuned for the DiT %s, but the run uses %s; for the tuned weights: "
        "%s, then add --transformer weights/%s",
        tuned,
        cfg.model.transformer or "the model's own transformer",
        download_command(tuned, dit_only=True),
        tuned.split("/")[-1],
    )
    return True


def warn_long_prompt(gen: VideoGenerator, prompt: str, what: str = "the prompt") -> int:
    """One warning when the text encoder will not read all of `prompt`; returns its token count."""
    tokenizer = getattr(gen.pipe, "tokenizer", None)
    if tokenizer is None:
        return 0
    n = len(tokenizer(prompt, add_special_tokens=True, truncation=False)["input_ids"])
    if n > TEXT_ENCODER_TOKENS:
        log.warning(
            "%s is %d tokens (%d characters); the text encoder reads the first %d, the rest does not change the video",
            what,
            n,
            len(prompt),
            TEXT_ENCODER_TOKENS,
        )
    return n


# ---- generate ----------------------------------------------------------------------------------
def run_generate(plan: RunPlan, req: GenerateRequest) -> int:
    """The `generate` command after preflight (module doc); prints the MP4's path."""
    check_environment(plan)
    output = plan.output
    saver = None
    if req.save_masks:
        saver = MaskSaver.prepare(plan.config, output, plan.sampling)
    pplan = parallel_plan(plan)
    created: list[Path] = []

    def write():
        check_destination(output, req.overwrite)  # again: something may have appeared while it ran
        return publish_video(gen, result, req.prompt, output)

    cfg = plan.config
    try:
        ensure_writable_dir(output.parent if str(output.parent) else Path("."), created)
        log.info("resolved config: %s", cfg.to_dict())
        # Weights on every rank before the process group exists; the generator after, bound to it.
        loaded = load_weights_for(cfg, pplan.device if pplan is not None else None, plan.model)
        with parallel_session(pplan) as ctx:
            gen = loaded.generator(ctx)
            log.info("loaded in %.1fs on %s", gen.load_s, gen.device)
            if saver is not None:
                saver.attach(gen)
            warn_long_prompt(gen, req.prompt)
            result = gen.generate(req.prompt, progress=not req.flags.quiet and (ctx is None or ctx.is_main))
            record = on_main(ctx, write)  # rank 0 writes; every rank learns whether it worked
    except BaseException:
        remove_created_dirs(created)  # a failed run leaves no empty directories behind
        raise
    if record is None:  # another rank of a torchrun job; rank 0 wrote the files
        return 0
    if saver is not None:
        log.info("mask pictures: %s", saver.write(result)[0].parent)
    t = record["timings"]
    density = record["attention"]["overall"]
    log.info(
        "denoising %.1fs, decode %.1fs, mean attention density %s",
        t["denoising_s"],
        t["decode_s"],
        f"{density:.3f}" if density is not None else "n/a",
    )
    print(output)
    return 0
