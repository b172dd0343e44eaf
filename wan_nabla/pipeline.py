"""Text-to-video generation: load once, patch attention, run the denoising loop, decode.

    gen = VideoGenerator.load("tiny", load_config("configs/nabla_0.7.yaml"), device="cpu")
    result = gen.generate("a red fox running through snow", size=(128, 128), frames=17, steps=4)
    result.frames        # float32 [17, 128, 128, 3] in [0, 1]
    result.timings       # text_encoding_s, denoising_s, per_step_s, decode_s, peak GPU memory per phase
    result.attention     # kept-block density per step and overall
    gen.generate(prompt, on_step=lambda i, noise, latents: ...)   # per-step noise prediction

The loop is Wan2.1's: UniPC flow matching with the config's shift, classifier-free guidance
(noise = uncond + g * (cond - uncond)), the conditional and unconditional passes run as one
batch of two by default (`batch_cfg`), the step index handed to the attention processors before
every step so `dense_steps` switches at the right step. Seeds draw the initial noise on the CPU,
so a seed reproduces the same video on any device. `config.memory` places the components
(offload.py); peak GPU memory is recorded per phase (encode, denoise, decode).

Limits: one prompt per call (batch runs loop over prompts with the pipeline loaded once);
Wan2.1 T2V only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import adapter, offload
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


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""on_step(step index, guided noise prediction, latents after the scheduler step)."""


@dataclass
class GenerationResult:
    frames: np.ndarray
    """[T, H, W, 3] float32 in [0, 1]."""
    seed: int
    settings: dict[str, Any]
    """The resolved generation settings of this video (size, frames, steps, guidance, shift, ...)."""
    timings: dict[str, Any] = field(default_factory=dict)
    attention: dict[str, Any] = field(default_factory=dict)


class VideoGenerator:
    """A loaded Wan2.1 pipeline with wan-nabla attention installed; reusable across prompts."""

    def __init__(self, pipe, config: RunConfig, device: torch.device, model_id: str = "custom",
                 transformer_source: dict[str, Any] | None = None):
        self.pipe = pipe
        self.config = config
        self.device = device
        self.model_id = model_id
        # Where the DiT weights came from (models.load_transformer's record), for the sidecar.
        self.transformer_source = transformer_source or {"source": "the model's own transformer"}
        self.load_s = 0.0
        self.handle = adapter.apply_attention(pipe.transformer, config.attention)
        try:
            self.memory = offload.apply_memory(pipe, config.memory, device)
        except BaseException:
            self.handle.remove()  # leave the pipeline as it was given
            raise
        self._first_call = True

    @classmethod
    def load(cls, model: str, config: RunConfig, device: str | None = None, dtype: str | None = None,
             tiny_seed: int = 0) -> VideoGenerator:
        from .models import load_pipeline, load_transformer

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
        gen = cls(pipe, config, dev, model_id=model, transformer_source=source)
        sync_device(dev)
        gen.load_s = time.perf_counter() - t0
        return gen

    def close(self) -> None:
        self.handle.remove()
        self.memory.remove()

    def settings(self, **overrides: Any) -> GenerationConfig:
        """The config's generation defaults with per-call overrides (None = keep) applied."""
        return self.config.override(**overrides).generation

    @torch.no_grad()
    def generate(self, prompt: str, negative_prompt: str | None = None, *, progress: bool = True,
                 on_step: StepCallback | None = None, decode: bool = True,
                 **overrides: Any) -> GenerationResult:
        """Generate one video. `overrides` are GenerationConfig fields (size, frames, steps, ...).

        `on_step(i, noise, latents)` is called after step i with the transformer's (guided) noise
        prediction (the transformer's dtype) and the latents after the scheduler step (float32),
        both [1, 16, F, H/8, W/8]; its time counts in the step's time (used by compare/run.py).
        decode=False stops after denoising (memory and speed measurements): frames are then empty."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        g = self.settings(negative_prompt=negative_prompt, **overrides)
        pipe, dev, run = self.pipe, self.device, self.handle.run
        cfg_on = g.guidance_scale > 1.0
        run.reset_stats()
        timings: dict[str, Any] = {}

        peaks = _PhasePeaks(dev)
        t0 = time.perf_counter()
        pos, neg = adapter.encode_prompts(pipe, prompt, g.negative_prompt, cfg_on, dev)
        sync_device(dev)
        timings["text_encoding_s"] = time.perf_counter() - t0
        peaks.end("encode")

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
                if not cfg_on:
                    noise = adapter.denoise(pipe, latents, t, pos)
                elif both is not None:
                    cond, uncond = adapter.denoise(pipe, torch.cat([latents, latents]), t, both).chunk(2)
                    noise = uncond + g.guidance_scale * (cond - uncond)
                else:
                    cond = adapter.denoise(pipe, latents, t, pos)
                    uncond = adapter.denoise(pipe, latents, t, neg)
                    noise = uncond + g.guidance_scale * (cond - uncond)
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

        frames = np.zeros((0, g.height, g.width, 3), np.float32)
        if decode:
            t0 = time.perf_counter()
            timings["vae_tiling"] = self.memory.before_decode(g.width, g.height)
            frames = adapter.decode_video(pipe, latents, dev)
            sync_device(dev)
            timings["decode_s"] = time.perf_counter() - t0
            peaks.end("decode")
        self.memory.after_video()
        timings.update(peaks.record())

        return GenerationResult(
            frames=np.asarray(frames, dtype=np.float32),
            seed=g.seed,
            settings=g.to_dict(),
            timings=timings,
            attention=run.density_summary(),
        )


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
        return {"peak_gpu_memory_gb": max(self.gb.values()), "peak_gpu_memory_gb_by_phase": dict(self.gb),
                "peak_gpu_reserved_gb_by_phase": dict(self.reserved_gb)}


def _progress(total: int, enabled: bool):
    """tqdm over denoising steps when enabled; a no-op context otherwise."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="denoising", unit="step", leave=False)
    return _NoBar()


class _NoBar(nullcontext):
    def update(self, n: int = 1) -> None:
        pass
