"""Text-to-video generation: load once, patch attention, run the denoising loop, decode.

    gen = VideoGenerator.load("tiny", load_config("configs/nabla_0.7.yaml"), device="cpu")
    result = gen.generate("a red fox running through snow", size=(128, 128), frames=17, steps=4)
    result.frames        # float32 [17, 128, 128, 3] in [0, 1]
    result.timings       # text_encoding_s, denoising_s, per_step_s, decode_s, ...
    result.attention     # kept-block density per step and overall

The loop is Wan2.1's: UniPC flow matching with the config's shift, classifier-free guidance
(noise = uncond + g * (cond - uncond)), the conditional and unconditional passes run as one
batch of two by default (`batch_cfg`), the step index handed to the attention processors before
every step so `dense_steps` switches at the right step. Seeds draw the initial noise on the CPU,
so a seed reproduces the same video on any device.

Several GPUs (`parallel`, a distributed.ParallelContext, under torchrun): with Ulysses the
transformer's hooks shard the tokens (adapter.py) and every rank of the video runs this same loop
on the same latents; with CFG parallel each rank runs only its branch's pass (batch 1) and the
two predictions are exchanged once per step. Every rank then combines them and steps the
scheduler identically, so latents stay equal on all ranks (checked at the end); only the group's
leader decodes (`frames` is None on the others).

Limits: one prompt per call (batch runs loop over prompts with the pipeline loaded once);
Wan2.1 T2V only.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import adapter
from .config import GenerationConfig, RunConfig

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


@dataclass
class GenerationResult:
    frames: np.ndarray | None
    """[T, H, W, 3] float32 in [0, 1]; None on the ranks of a parallel run that do not decode."""
    seed: int
    settings: dict[str, Any]
    """The resolved generation settings of this video (size, frames, steps, guidance, shift, ...)."""
    timings: dict[str, Any] = field(default_factory=dict)
    attention: dict[str, Any] = field(default_factory=dict)
    latents: torch.Tensor | None = None
    """The final latents [1, 16, F, H/8, W/8] (float32, CPU) that were decoded."""
    parallel: dict[str, Any] | None = None
    """The parallel layout that produced this video (ParallelContext.describe()), None for one process."""


class VideoGenerator:
    """A loaded Wan2.1 pipeline with wan-nabla attention installed; reusable across prompts."""

    def __init__(self, pipe, config: RunConfig, device: torch.device, model_id: str = "custom", parallel=None):
        self.pipe = pipe
        self.config = config
        self.device = device
        self.model_id = model_id
        self.load_s = 0.0
        self.parallel = None
        self.handle = adapter.apply_attention(pipe.transformer, config.attention)
        self.use_parallel(parallel)
        self._first_call = True

    def use_parallel(self, parallel) -> None:
        """Generate together with the other ranks of `parallel` (a distributed.ParallelContext;
        None: alone): attention is reinstalled with its sequence parallelism, and densities are
        averaged over the ranks of a video."""
        if parallel is None:
            return
        self.handle.remove()
        self.parallel = parallel
        self.handle = adapter.apply_attention(self.pipe.transformer, self.config.attention,
                                              sequence_parallel=parallel.sequence_parallel())
        self.handle.run.stats_mean = parallel.item_mean

    @classmethod
    def load(cls, model: str, config: RunConfig, device: str | None = None, dtype: str | None = None,
             tiny_seed: int = 0) -> VideoGenerator:
        from .models import load_pipeline

        gen_cfg = config.generation
        dev = resolve_device(device or gen_cfg.device)
        dt = _DTYPES[dtype or gen_cfg.dtype]
        t0 = time.perf_counter()
        pipe = load_pipeline(model, device=dev, dtype=dt, tiny_seed=tiny_seed)
        sync_device(dev)
        gen = cls(pipe, config, dev, model_id=model)
        gen.load_s = time.perf_counter() - t0
        return gen

    def close(self) -> None:
        self.handle.remove()

    def settings(self, **overrides: Any) -> GenerationConfig:
        """The config's generation defaults with per-call overrides (None = keep) applied."""
        return self.config.override(**overrides).generation

    @torch.no_grad()
    def generate(self, prompt: str, negative_prompt: str | None = None, *, progress: bool = True,
                 **overrides: Any) -> GenerationResult:
        """Generate one video. `overrides` are GenerationConfig fields (size, frames, steps, ...)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        g = self.settings(negative_prompt=negative_prompt, **overrides)
        pipe, dev, run, par = self.pipe, self.device, self.handle.run, self.parallel
        cfg_on = g.guidance_scale > 1.0
        split_cfg = par is not None and par.cfg_parallel
        if split_cfg and not cfg_on:
            raise ValueError(f"guidance_scale {g.guidance_scale:g} turns classifier-free guidance off, but this run "
                             f"splits the CFG passes over ranks (--cfg-parallel); use guidance_scale > 1")
        run.reset_stats()
        timings: dict[str, Any] = {}

        t0 = time.perf_counter()
        pos, neg = adapter.encode_prompts(pipe, prompt, g.negative_prompt, cfg_on, dev)
        sync_device(dev)
        timings["text_encoding_s"] = time.perf_counter() - t0

        scheduler = adapter.make_scheduler(pipe, g.resolved_shift)
        scheduler.set_timesteps(g.steps, device=dev)
        latents = adapter.initial_latents(pipe, g.width, g.height, g.frames, g.seed, dev)
        both = torch.cat([pos, neg]) if cfg_on and g.batch_cfg else None

        per_step = []
        t_loop = time.perf_counter()
        bar = _progress(g.steps, progress)
        with bar:
            for i, t in enumerate(scheduler.timesteps):
                ts = time.perf_counter()
                run.set_step(i)
                noise = predict_noise(pipe, latents, t, pos, neg if cfg_on else None, g.guidance_scale, both, par)
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
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

        if par is not None:
            par.check_in_sync(latents, "final latents")
        attention = run.density_summary()  # collective under parallelism: every rank, same point

        t0 = time.perf_counter()
        frames = None
        if par is None or par.is_leader:
            frames = np.asarray(adapter.decode_video(pipe, latents), dtype=np.float32)
        sync_device(dev)
        timings["decode_s"] = time.perf_counter() - t0
        if dev.type == "cuda":
            timings["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30

        return GenerationResult(
            frames=frames,
            seed=g.seed,
            settings=g.to_dict(),
            timings=timings,
            attention=attention,
            latents=latents.detach().float().cpu(),
            parallel=par.describe() if par is not None else None,
        )


def predict_noise(pipe, latents: torch.Tensor, t: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None,
                  guidance_scale: float, both: torch.Tensor | None = None, parallel=None) -> torch.Tensor:
    """One step's guided noise prediction (the loop body without the scheduler), on every rank.

    neg None: no guidance, one conditional pass. CFG parallel: this rank's branch only, exchanged
    with its partner. Else `both` (= cat(pos, neg)) runs the pair as one batch of two, or two passes
    without it. noise = uncond + g * (cond - uncond)."""
    if neg is None:
        return adapter.denoise(pipe, latents, t, pos)
    if parallel is not None and parallel.cfg_parallel:
        cond, uncond = parallel.exchange_cfg(adapter.denoise(pipe, latents, t, neg if parallel.branch else pos))
    elif both is not None:
        cond, uncond = adapter.denoise(pipe, torch.cat([latents, latents]), t, both).chunk(2)
    else:
        cond, uncond = adapter.denoise(pipe, latents, t, pos), adapter.denoise(pipe, latents, t, neg)
    return uncond + guidance_scale * (cond - uncond)


def _progress(total: int, enabled: bool):
    """tqdm over denoising steps when enabled; a no-op context otherwise."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="denoising", unit="step", leave=False)
    return _NoBar()


class _NoBar(nullcontext):
    def update(self, n: int = 1) -> None:
        pass
