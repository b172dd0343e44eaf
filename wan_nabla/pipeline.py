"""Text-to-video generation: load once, patch attention, run the denoising loop, decode.

    gen = VideoGenerator.load("tiny", load_config("configs/nabla_0.7.yaml"), device="cpu")
    result = gen.generate("a red fox running through snow", size=(128, 128), frames=17, steps=4)
    result.frames        # float32 [17, 128, 128, 3] in [0, 1]
    result.timings       # text_encoding_s, denoising_s, per_step_s, decode_s, peak GPU memory per phase
    result.attention     # kept-block density per step and overall
    gen.generate(prompt, on_step=lambda i, noise, latents: ...)   # per-step noise prediction
    result.speed         # compile mode and time, step-cache skips, merged LoRAs

The loop is Wan2.1's: UniPC flow matching on Wan's FlowUniPC schedule with the config's shift
(sampling.py), classifier-free guidance (noise = uncond + g * (cond - uncond), in float32), the
negative prompt Wan's `sample_neg_prompt` unless one is given (config.GenerationConfig), the conditional and unconditional passes run as one
batch of two by default (`batch_cfg`), the step index handed to the attention processors before
every step so `dense_steps` switches at the right step. Seeds draw the initial noise on the CPU,
so a seed reproduces the same video on any device. Guidance <= 1 (step-distilled LoRAs) runs one
pass per step and never encodes the negative prompt.

Set up once, in this order: attention processors, LoRAs merged into the weights (lora.py), FP8
linears (quantize.py, after the merge), the VAE's dtype (memory.vae_dtype), memory placement (`config.memory`, offload.py), compiled blocks, step cache (adapter.py says why the
order matters; compiled blocks are not combined with offloading). Per video the cache state is
reset; skipped block computations are counted from the attention calls (a skipped block never
calls its attention), compile time is what TorchDynamo/Inductor spent during the call (0 once
everything is compiled), and peak GPU memory is recorded per phase (encode, denoise, decode).

Several GPUs (`parallel`, a distributed.ParallelContext, under torchrun): with Ulysses the
transformer's hooks shard the tokens (adapter.py) and every rank of the video runs this same loop
on the same latents; with CFG parallel each rank runs only its branch's pass (batch 1) and the
two predictions are exchanged once per step. Every rank then combines them and steps the
scheduler identically, so latents stay equal on all ranks (checked at the end). The decode is
split: every rank of the group decodes some of the VAE's spatial tiles and the leader blends them
into the video (distributed/decode.py; with vae_tiling off the leader decodes alone, untiled);
`frames` is empty on the other ranks.

Limits: one prompt per call (batch runs loop over prompts with the pipeline loaded once);
Wan2.1 T2V only.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch._dynamo.utils import compilation_time_metrics, counters
from tqdm.auto import tqdm

from . import adapter, offload
from .config import GenerationConfig, RunConfig
from .distributed.decode import split_tiled_decode
from .lora import load_loras
from .magcache import resolve
from .models import load_pipeline, load_transformer
from .quantize import quantize_transformer
from .sampling import guide, schedule_record, set_timesteps
from .wan import hooks

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
AUTO_COMPILE = {"cuda": "blocks"}
"""What `speed.compile: auto` means per device type (others: none)."""


def resolve_compile(mode: str, device: torch.device, offload: str = "none") -> str:
    """The compile mode to use: `auto` is the measured default of the device type, and none while
    the transformer is offloaded (its blocks then run under diffusers' offload hooks, whose weight
    movement is not something to trace; an explicit mode with offloading is refused by RunConfig)."""
    if mode != "auto":
        return mode
    return "none" if offload != "none" else AUTO_COMPILE.get(device.type, "none")


VAE_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def set_vae_dtype(pipe, vae_dtype: str) -> None:
    """Cast the VAE to `memory.vae_dtype` (fp32 | bf16); decode_video feeds it latents of its dtype.
    torch's own Module.to: diffusers' ModelMixin.to warns on every dtype cast that it "should keep
    modules in float32: []" (the Wan VAE names none), noise in every command's output."""
    dtype = VAE_TORCH_DTYPES[vae_dtype]
    if pipe.vae.dtype != dtype:
        torch.nn.Module.to(pipe.vae, dtype=dtype)


def compile_seconds() -> float:
    """Seconds TorchDynamo + Inductor have spent compiling in this process so far."""
    return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))


def compile_record(
    blocks: str, seconds: float, graphs: int, error: str | None, cache: dict[str, int] | None = None
) -> dict[str, Any]:
    """The sidecar's speed.compile: what the speed.compile lever did to the transformer blocks
    (`mode`), and what was compiled during this video and why, so `mode: none` next to seconds
    of compiling is explained: sparse attention compiles the FlexAttention kernel per shape
    whatever the lever says; `cache_dir` is where Inductor keeps compiled code across runs."""
    if graphs == 0 and seconds < 0.05:
        what = "nothing (everything this video needed was compiled earlier in this process)"
    elif blocks == "none":
        what = "the FlexAttention kernel for this shape (the transformer blocks run eagerly: speed.compile none)"
    else:
        what = f"the transformer blocks ({blocks}) and the attention kernel they call"
    return {
        "mode": blocks,
        "compiled": what,
        "compile_s": seconds,
        "graphs_compiled": graphs,
        "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "cache": cache or {},
        "error": error,
    }


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; a CUDA device that does not exist is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return dev


def sync_device(device: torch.device) -> None:
    """Wait for queued device work, so host clocks measure it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""on_step(step index, guided noise prediction, latents after the scheduler step)."""


@dataclass
class GenerationResult:
    frames: np.ndarray | None
    """[T, H, W, 3] float32 in [0, 1]; None on the ranks of a parallel run that do not decode."""
    seed: int
    settings: dict[str, Any]
    """The resolved generation settings of this video (size, frames, steps, guidance, shift, ...)."""
    timings: dict[str, Any] = field(default_factory=dict)
    attention: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, Any] = field(default_factory=dict)
    """compile (mode, seconds, graphs), cache (kind, block calls computed/skipped), lora (records)."""
    latents: torch.Tensor | None = None
    """The final latents [1, 16, F, H/8, W/8] (float32, CPU) that were decoded."""
    schedule: dict[str, Any] = field(default_factory=dict)
    """What the sampler ran: sampler, shift, sigmas (steps + 1, the last 0) and timesteps (steps)."""
    parallel: dict[str, Any] | None = None
    """The parallel layout that produced this video (ParallelContext.describe()), None for one process."""


@dataclass
class LoadedWeights:
    """A pipeline read from disk, not yet set up (load_weights); `generator()` sets it up once."""

    pipe: Any
    config: RunConfig
    device: torch.device
    model_id: str
    transformer_source: dict[str, Any] | None
    load_s: float

    def generator(self, parallel=None) -> VideoGenerator:
        """The VideoGenerator of these weights, bound to `parallel` (a ParallelContext, or None)."""
        t0 = time.perf_counter()
        gen = VideoGenerator(
            self.pipe,
            self.config,
            self.device,
            model_id=self.model_id,
            transformer_source=self.transformer_source,
            parallel=parallel,
        )
        gen.load_s = self.load_s + time.perf_counter() - t0
        return gen


def load_weights(
    model: str, config: RunConfig, device: str | None = None, dtype: str | None = None, tiny_seed: int = 0
) -> LoadedWeights:
    """Read `model` (and --transformer's DiT weights) onto `device`. Under torchrun every rank
    calls this before the process group exists (a load that fails alike everywhere is then a
    plain error on every rank; transformers saves checkpoints on rank 0 only once a group exists,
    which the tiny model's load relies on); the generator is built after, bound to the group."""
    gen_cfg = config.generation
    dev = resolve_device(device or gen_cfg.device)
    dt = _DTYPES[dtype or gen_cfg.dtype]
    t0 = time.perf_counter()
    transformer, source = None, None
    if config.model.transformer:
        transformer, source = load_transformer(config.model.transformer, model, dt)
    # Offload modes start from the CPU: a 14B model may not fit on the device at all.
    place = dev if config.memory.offload == "none" else torch.device("cpu")
    pipe = load_pipeline(model, device=place, dtype=dt, tiny_seed=tiny_seed, transformer=transformer)
    sync_device(dev)
    return LoadedWeights(pipe, config, dev, model, source, time.perf_counter() - t0)


class VideoGenerator:
    """A loaded Wan2.1 pipeline with wan-nabla attention installed; reusable across prompts."""

    def __init__(
        self,
        pipe,
        config: RunConfig,
        device: torch.device,
        model_id: str = "custom",
        transformer_source: dict[str, Any] | None = None,
        parallel=None,
    ):
        # `parallel` (a distributed.ParallelContext) is bound here, once: attention is installed
        # with its sequence parallelism and the blocks are compiled for that attention run.
        self.pipe = pipe
        self.config = config
        self.device = device
        self.model_id = model_id
        # Where the DiT weights came from (models.load_transformer's record), for the sidecar.
        self.transformer_source = transformer_source or {"source": "the model's own transformer"}
        self.load_s = 0.0
        self.parallel = parallel
        self.handle = hooks.apply_attention(
            pipe.transformer,
            config.attention,
            sequence_parallel=parallel.sequence_parallel() if parallel is not None else None,
        )
        if parallel is not None:  # densities are averaged over the ranks of a video
            self.handle.run.stats_mean = parallel.item_mean
        self.lora: list[dict[str, Any]] = []
        self.quantize: dict[str, Any] = {"mode": "none"}
        try:
            if config.lora:  # before offloading moves the weights
                self.lora = load_loras(pipe, config.lora)
            if config.speed.quantize != "none":  # after the LoRA merge: deltas fused at full precision
                self.quantize = quantize_transformer(pipe.transformer, config.speed.quantize, device)
                log.info(
                    "quantize %s: %d linear layers in %d blocks (%.1fs)",
                    self.quantize["mode"],
                    self.quantize["linear_modules"],
                    self.quantize["blocks"],
                    self.quantize["seconds"],
                )
            set_vae_dtype(pipe, config.memory.vae_dtype)
            self.memory = offload.apply_memory(pipe, config.memory, device)
        except BaseException:
            self.handle.remove()  # leave the pipeline as it was given
            raise
        self._first_call = True
        self.compile_mode = resolve_compile(config.speed.compile, device, config.memory.offload)
        if self.quantize["mode"] != "none" and self.compile_mode == "none":
            log.warning(
                "--quantize %s without compiled blocks: the activation quantisation runs as separate kernels "
                "and a step is slower than bf16 (the weights still take half the memory); add --compile "
                "blocks where the memory mode allows it",
                self.quantize["mode"],
            )
        self._compiled = None
        self._compile()
        self._cache_key = None
        self._mag = None

    def _compile(self) -> None:
        # `auto` must never cost a video: a compile failure falls back to eager (and is recorded).
        if self.compile_mode != "none":
            self._compiled = adapter.compile_blocks(
                self.pipe.transformer, self.handle.run, self.compile_mode, fallback=self.config.speed.compile == "auto"
            )

    def use_config(self, config: RunConfig) -> None:
        """Generate with `config` from here on (e.g. a server job's preset): its generation defaults
        are taken as they are and attention is reinstalled when its section differs. Model, LoRAs,
        memory, speed and parallel are fixed at load; a config that changes them raises ValueError
        (load another VideoGenerator instead)."""
        fixed = [
            name
            for name in ("model", "lora", "memory", "speed", "parallel")
            if getattr(config, name) != getattr(self.config, name)
        ]
        if fixed:
            raise ValueError(
                f"use_config: {', '.join(fixed)} differ from the loaded config; only attention and "
                "generation can change after load"
            )
        if config.attention != self.config.attention:
            self._install_attention(config.attention)
        self.config = config

    def _install_attention(self, attention) -> None:
        """Replace the installed attention run (with this generator's sequence parallelism) and
        compile the blocks again for it: the compiled blocks hold the run they were set up with."""
        compiled = self._compiled is not None
        if compiled:
            self._compiled.undo()
            self._compiled = None
        sp = self.parallel.sequence_parallel() if self.parallel is not None else None
        self.handle.remove()
        try:
            self.handle = hooks.apply_attention(self.pipe.transformer, attention, sequence_parallel=sp)
        except BaseException:  # keep a working generator: the attention it had
            self.handle = hooks.apply_attention(self.pipe.transformer, self.config.attention, sequence_parallel=sp)
            raise
        finally:
            if self.parallel is not None:
                self.handle.run.stats_mean = self.parallel.item_mean
            if compiled:
                self._compile()

    @classmethod
    def load(
        cls,
        model: str,
        config: RunConfig,
        device: str | None = None,
        dtype: str | None = None,
        tiny_seed: int = 0,
        parallel=None,
    ) -> VideoGenerator:
        """load_weights + the constructor; `parallel` must already exist (see load_weights)."""
        loaded = load_weights(model, config, device, dtype, tiny_seed)
        return loaded.generator(parallel)

    def close(self) -> None:
        """Undo attention, compiled blocks and cache (merged LoRAs stay in the weights)."""
        adapter.disable_cache(self.pipe.transformer)
        if self._compiled is not None:
            self._compiled.undo()
        self.handle.remove()
        self.memory.remove()

    def _prepare_cache(self, steps: int) -> None:
        """Enable the configured step cache (again when MagCache's step count changes) and reset it."""
        speed, tr = self.config.speed, self.pipe.transformer
        kind = speed.cache_kind
        key = (kind, steps if kind == "mag" else None)
        if kind != "none" and key != self._cache_key:
            mag = resolve(speed, tr.config)
            params, ratios = speed.cache_params, speed.mag_ratios
            if mag is not None:
                params = {
                    "threshold": mag.threshold,
                    "max_skip_steps": mag.max_skip_steps,
                    "retention_ratio": mag.retention_ratio,
                }
                ratios = mag.mag_ratios
            adapter.enable_cache(tr, kind, params, steps, ratios)
            self._mag = mag
            self._cache_key = key
        adapter.reset_cache(tr)

    def settings(self, **overrides: Any) -> GenerationConfig:
        """The config's generation defaults with per-call overrides (None = keep) applied."""
        return self.config.override(**overrides).generation

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        progress: bool = True,
        on_step: StepCallback | None = None,
        decode: bool = True,
        settings: GenerationConfig | None = None,
        **overrides: Any,
    ) -> GenerationResult:
        """Generate one video. `overrides` are GenerationConfig fields (size, frames, steps, ...).

        `settings`: this call's whole GenerationConfig instead of the config's defaults plus
        overrides (a batch item's or a served job's, as preflight checked it); it cannot be combined
        with `negative_prompt` or overrides, and its dtype and device must be the generator's (both
        are fixed when it is built).

        `on_step(i, noise, latents)` is called after step i with the transformer's (guided) noise
        prediction (float32) and the latents after the scheduler step (float32),
        both [1, 16, F, H/8, W/8]; its time counts in the step's time (used by compare/run.py).
        decode=False stops after denoising (memory and speed measurements): frames are then empty."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        if settings is None:
            g = self.settings(negative_prompt=negative_prompt, **overrides)
        elif overrides or negative_prompt is not None:
            raise TypeError("generate: give settings= or per-call overrides, not both")
        elif (settings.dtype, settings.device) != (self.config.generation.dtype, self.config.generation.device):
            raise ValueError(
                f"generate: settings ask for {settings.dtype} on {settings.device}, but this generator was "
                f"built for {self.config.generation.dtype} on {self.config.generation.device}"
            )
        else:
            g = settings
        pipe, dev, run, par = self.pipe, self.device, self.handle.run, self.parallel
        cfg_on = g.guidance_scale > 1.0
        split_cfg = par is not None and par.cfg_parallel
        if split_cfg and not cfg_on:
            raise ValueError(
                f"guidance_scale {g.guidance_scale:g} turns classifier-free guidance off, but this run "
                f"splits the CFG passes over ranks (--cfg-parallel); use guidance_scale > 1"
            )
        run.reset_stats()
        timings: dict[str, Any] = {}
        compile_s0, graphs0, cache0 = compile_seconds(), _graphs(), _cache_counts()
        self._prepare_cache(g.steps)
        calibrate = bool(self.config.speed.cache_params.get("calibrate"))

        peaks = _PhasePeaks(dev)
        t0 = time.perf_counter()
        pos, neg = adapter.encode_prompts(pipe, prompt, g.resolved_negative_prompt, cfg_on, dev)
        sync_device(dev)
        timings["text_encoding_s"] = time.perf_counter() - t0
        peaks.end("encode")

        scheduler = adapter.make_scheduler(pipe, g.resolved_shift, g.sampler)
        set_timesteps(scheduler, g.steps, dev)
        schedule = schedule_record(scheduler)  # before stepping: what this run's steps use
        latents = adapter.initial_latents(pipe, g.width, g.height, g.frames, g.seed, dev)
        both = torch.cat([pos, neg]) if cfg_on and g.batch_cfg else None
        passes = 1 if not cfg_on or both is not None or split_cfg else 2  # transformer calls per step here

        per_step = []
        printed = io.StringIO()  # diffusers prints MagCache's calibrated ratios to stdout
        t_loop = time.perf_counter()
        bar = _progress(g.steps, progress)
        with bar, contextlib.redirect_stdout(printed) if calibrate else contextlib.nullcontext():
            for i, t in enumerate(scheduler.timesteps):
                ts = time.perf_counter()
                run.set_step(i)
                noise = predict_noise(pipe, latents, t, pos, neg if cfg_on else None, g.guidance_scale, both, par)
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                if on_step is not None:
                    on_step(i, noise, latents)
                sync_device(dev)
                per_step.append(time.perf_counter() - ts)
                run.log_step(i)
                bar.update(1)
        timings["denoising_s"] = time.perf_counter() - t_loop
        timings["per_step_s"] = per_step
        if self._first_call and per_step:
            # The first step compiles FlexAttention for this shape (once per process and shape).
            timings["first_step_s"] = per_step[0]
        self._first_call = False
        peaks.end("denoise")
        timings["compile_s"] = compile_seconds() - compile_s0
        speed = {
            "compile": compile_record(
                self.compile_mode,
                timings["compile_s"],
                _graphs() - graphs0,
                self._compiled.error if self._compiled is not None else None,
                {k: v - cache0.get(k, 0) for k, v in _cache_counts().items()},
            ),
            "cache": self._cache_record(g.steps, passes, printed.getvalue() if calibrate else ""),
            "lora": self.lora,
            "quantize": self.quantize,
            "passes_per_step": passes,
        }

        if par is not None:
            par.check_in_sync(latents, "final latents")
        attention = run.density_summary(steps=g.steps)  # collective under parallelism: every rank, same point

        frames = np.zeros((0, g.height, g.width, 3), np.float32)
        timings["decode_s"] = None
        split = decode and par is not None and par.layout.group_size > 1 and self.config.memory.vae_tiling != "off"
        if split:  # every rank of the group decodes some tiles; the leader assembles them
            t0 = time.perf_counter()
            self.memory.before_decode(g.width, g.height, g.frames)
            if self.config.memory.offload == "model":
                # the split decode calls the VAE's layers, not vae.decode, whose hook would bring it in
                pipe.vae.to(dev)
            timings["vae_tiling"], timings["vae_split_ranks"] = True, par.layout.group_size

            out = adapter.decode_video(
                pipe,
                latents,
                dev,
                decoder=lambda z: split_tiled_decode(pipe.vae, z, par.item_group(), par.item_ranks()),
            )
            frames = out if out is not None else frames
            sync_device(dev)
            timings["decode_s"] = time.perf_counter() - t0
            peaks.end("decode")
        elif decode and (par is None or par.is_leader):  # one rank of a parallel group decodes
            t0 = time.perf_counter()
            timings["vae_tiling"] = self.memory.before_decode(g.width, g.height, g.frames)
            try:
                frames = adapter.decode_video(pipe, latents, dev)
            except torch.OutOfMemoryError:
                if timings["vae_tiling"]:
                    raise
                # The denoised latents are kept: decode again in tiles rather than lose the video.
                log.warning(
                    "VAE decode ran out of memory untiled at %dx%dx%d; decoding again with tiling",
                    g.width,
                    g.height,
                    g.frames,
                )
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                pipe.vae.enable_tiling()
                timings["vae_tiling"], timings["vae_tiling_retry"] = True, True
                frames = adapter.decode_video(pipe, latents, dev)
            sync_device(dev)
            timings["decode_s"] = time.perf_counter() - t0
            peaks.end("decode")
        self.memory.after_video()
        timings.update(peaks.record())

        return GenerationResult(
            frames=frames,
            seed=g.seed,
            settings=g.to_dict(),
            schedule={"sampler": g.sampler, "shift": g.resolved_shift, **schedule},
            timings=timings,
            attention=attention,
            speed=speed,
            latents=latents.detach().float().cpu(),
            parallel=par.describe() if par is not None else None,
        )

    def _cache_record(self, steps: int, passes: int, printed: str) -> dict[str, Any]:
        """Block computations the step cache skipped in the last video (from attention calls)."""
        calls = self.handle.run.calls_per_step()
        n_blocks = len(self.pipe.transformer.blocks)
        computed = [calls.get(i, 0) for i in range(steps)]
        total = steps * passes * n_blocks
        record = {
            "cache": self.config.speed.cache,
            "block_calls": total,
            "computed": sum(computed),
            "skipped": total - sum(computed),
            "skipped_share": (total - sum(computed)) / total,
            "computed_per_step": computed,
        }
        if printed:
            record["calibrated_mag_ratios"] = _printed_ratios(printed)
        if self._mag is not None:
            record["mag"] = self._mag.record()
        return record


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _cache_counts() -> dict[str, int]:
    """Inductor's on-disk cache hits and misses so far in this process (FX graph, AOTAutograd)."""
    names = ("fxgraph_cache_hit", "fxgraph_cache_miss", "autograd_cache_hit", "autograd_cache_miss")
    return {n: int(counters["inductor"].get(n, 0)) + int(counters["aot_autograd"].get(n, 0)) for n in names}


def _printed_ratios(text: str) -> list[float] | None:
    """The first ratio list diffusers' MagCache printed after a calibration run."""
    for line in text.splitlines():
        try:
            values = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError):
            continue  # the banner around the list
        if isinstance(values, list):
            return [float(x) for x in values]
    return None


class _PhasePeaks:
    """Peak GPU memory per phase (GiB; allocated by tensors, and reserved by the caching allocator,
    which is what the device sees): the allocator's peaks are reset as each phase begins."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.gb: dict[str, float] = {}
        self.reserved_gb: dict[str, float] = {}
        if self.device is not None:
            torch.cuda.reset_peak_memory_stats(self.device)

    def end(self, phase: str) -> None:
        if self.device is not None:
            self.gb[phase] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.reserved_gb[phase] = torch.cuda.max_memory_reserved(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)

    def record(self) -> dict[str, Any]:
        if not self.gb:
            return {}
        return {
            "peak_gpu_memory_gb": max(self.gb.values()),
            "peak_gpu_memory_gb_by_phase": dict(self.gb),
            "peak_gpu_reserved_gb_by_phase": dict(self.reserved_gb),
        }


def predict_noise(
    pipe,
    latents: torch.Tensor,
    t: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None,
    guidance_scale: float,
    both: torch.Tensor | None = None,
    parallel=None,
) -> torch.Tensor:
    """One step's guided noise prediction (the loop body without the scheduler), on every rank.

    neg None: no guidance, one conditional pass. CFG parallel: this rank's branch only, exchanged
    with its partner. Else `both` (= cat(pos, neg)) runs the pair as one batch of two, or two passes
    without it. noise = uncond + g * (cond - uncond), in float32 (sampling.guide), which is also
    the dtype of an unguided prediction: the scheduler always steps in float32. Each pass runs in its step-cache context
    (cond / uncond / cfg: adapter.denoise)."""
    if neg is None:
        return adapter.denoise(pipe, latents, t, pos, context="cond").float()
    if parallel is not None and parallel.cfg_parallel:
        branch = "uncond" if parallel.branch else "cond"
        mine = adapter.denoise(pipe, latents, t, neg if parallel.branch else pos, context=branch)
        cond, uncond = parallel.exchange_cfg(mine)
    elif both is not None:
        cond, uncond = adapter.denoise(pipe, torch.cat([latents, latents]), t, both, context="cfg").chunk(2)
    else:
        cond = adapter.denoise(pipe, latents, t, pos, context="cond")
        uncond = adapter.denoise(pipe, latents, t, neg, context="uncond")
    return guide(cond, uncond, guidance_scale)


def _progress(total: int, enabled: bool):
    """tqdm over denoising steps when enabled; a no-op context otherwise."""
    if enabled:
        return tqdm(total=total, desc="denoising", unit="step", leave=False)
    return _NoBar()


class _NoBar(nullcontext):
    def update(self, n: int = 1) -> None:
        pass
