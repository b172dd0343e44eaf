"""The denoising loop's calls into diffusers' WanPipeline components, and the speed levers.

    pos, neg = encode_prompts(pipe, "a fox", "", cfg=True, device=dev)
    latents = initial_latents(pipe, 832, 480, 81, seed=0, device=dev)
    noise = denoise(pipe, latents, t, embeds, context="cond")

The attention patch itself (processor and model hooks) is wan/hooks.py and wan/processor.py.

Speed levers (pipeline.VideoGenerator applies them in this order: attention, LoRA, compile, cache):
    compiled = compile_blocks(pipe.transformer, handle.run, "blocks")   # before enable_cache
    enable_cache(pipe.transformer, "first-block", {"threshold": 0.05}, steps=4)
    reset_cache(pipe.transformer)                                    # before every video
    denoise(pipe, latents, t, embeds, context="cond")                # cache state per context
- compile_blocks compiles each repeated block's `forward` (the model's `_repeated_blocks`, the
  rule of diffusers' compile_repeated_blocks), not `nn.Module.compile`: diffusers' cache hooks
  replace `block.forward`, and MagCache's hook is `torch.compiler.disable`d, so a compiled
  `_call_impl` above the hooks ran MagCache blocks eagerly (0 graphs) and broke the graph under
  FirstBlockCache; a compiled forward below the hooks is one full graph shared by every block with
  or without a cache (measured on the tiny model). Hence compile first, then enable the cache.
- Caches are diffusers' FirstBlockCache and MagCache; each transformer call runs inside
  `cache_context(name)` (state is kept per name: "cfg" for the batched CFG pair, which then shares
  one skip decision, "cond"/"uncond" for separate passes) and `reset_cache` clears the state
  between videos (otherwise a video's first step compares against the last one's residual).

Limits: Wan2.1 text-to-video pipelines.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import FirstBlockCacheConfig, MagCacheConfig
from torch._dynamo.exc import TorchDynamoException

from . import sampling
from .attention.run import AttentionRun
from .model_source import WAN_SCHEDULER_CONFIG  # noqa: F401 - re-exported: Wan2.1's scheduler, known without torch

log = logging.getLogger(__name__)

# ---- the denoising loop's calls into diffusers' WanPipeline components ------------------------
TEXT_MAX_TOKENS = 512  # Wan2.1 pads/truncates prompts to 512 UMT5 tokens


def encode_prompts(pipe, prompt: str, negative_prompt: str, cfg: bool, device: torch.device):
    """UMT5 embeddings [1, 512, text_dim] for the prompt and (when cfg) the negative prompt."""
    pos, neg = pipe.encode_prompt(
        prompt=prompt,
        negative_prompt=negative_prompt,
        do_classifier_free_guidance=cfg,
        num_videos_per_prompt=1,
        max_sequence_length=TEXT_MAX_TOKENS,
        device=device,
    )
    return pos, neg


def initial_latents(pipe, width: int, height: int, frames: int, seed: int, device: torch.device) -> torch.Tensor:
    """Seeded float32 noise [1, 16, (frames-1)/4+1, H/8, W/8], drawn on the CPU so a seed gives the
    same video on every device (as diffusers does with a CPU generator)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    latents = pipe.prepare_latents(
        1, pipe.transformer.config.in_channels, height, width, frames, torch.float32, torch.device("cpu"), gen
    )
    return latents.to(device)


def make_scheduler(pipe, shift: float, sampler: str = "unipc"):
    """A fresh flow-matching scheduler with this shift (sampling.make_scheduler on the pipeline's own)."""
    return sampling.make_scheduler(pipe.scheduler, shift, sampler)


def denoise(
    pipe, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, context: str | None = None
) -> torch.Tensor:
    """One transformer call on a batch: latents [B, 16, F, H, W], embeds [B, 512, text_dim]. With a
    step cache enabled the call runs in the cache context `context` (module doc)."""
    x = latents.to(pipe.transformer.dtype)
    tr = pipe.transformer
    scope = tr.cache_context(context or "cond") if tr.is_cache_enabled else contextlib.nullcontext()
    with scope:
        return tr(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=embeds, return_dict=False)[0]


# ---- speed levers: compiled blocks and step caches ---------------------------------------------
class CompiledBlocks:
    """What compile_blocks returns: `undo()` restores the eager forwards; `error` is the one-line
    compile failure the blocks fell back to eager after (fallback mode only), else None."""

    def __init__(self, blocks: list, run: AttentionRun):
        self.blocks = blocks
        self.run = run
        self.error: str | None = None

    def fall_back(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        self.run.set_compile_region("eager")
        log.warning("compiling the transformer blocks failed; running them eagerly (%s)", self.error)

    def undo(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self.run.set_compile_region("eager")


def compile_blocks(transformer, run: AttentionRun, mode: str, fallback: bool = False) -> CompiledBlocks:
    """Compile the forward of every repeated block (module doc): mode "blocks" puts attention in
    one custom op (fullgraph: a graph break is an error), "blocks-split" splits the graph around
    it. With `fallback`, a compile failure (TorchDynamo/Inductor) is logged and the blocks run
    eagerly from then on instead of failing the video. Call before enable_cache."""
    if transformer.is_cache_enabled:
        raise RuntimeError("compile_blocks must run before a step cache is enabled (its hooks wrap forward)")
    if mode not in ("blocks", "blocks-split"):
        raise ValueError(f"compile mode {mode!r} is not allowed; use blocks or blocks-split")
    kinds = tuple(getattr(transformer, "_repeated_blocks", ()) or ())
    blocks = [m for m in transformer.modules() if type(m).__name__ in kinds]
    if not blocks:
        raise RuntimeError(f"unsupported diffusers version: no repeated blocks {kinds} to compile")
    run.set_compile_region("op" if mode == "blocks" else "split")
    # One graph per input shape (dynamic=False, like the compiled flex); let resolutions, CFG batch
    # sizes and sizes of tests coexist instead of silently falling back to eager at the default limit.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    state = CompiledBlocks(blocks, run)
    for block in blocks:
        eager = block.forward
        compiled = torch.compile(eager, fullgraph=mode == "blocks", dynamic=False)
        block.forward = _compiled_forward(state, eager, compiled, fallback)
    return state


def _standard_strides(x: torch.Tensor) -> torch.Tensor:
    """x with the strides of a contiguous tensor of its shape. Block 0 gets the patch embedding's
    view (transposed in raster order; with batch 1 a dim-0 stride of C in tile order), later blocks
    a fresh tensor: static-shape guards compare strides, so without this block 0 compiled a second
    graph (measured). A contiguous view is re-strided for free; a transposed one is copied."""
    want, acc = [], 1
    for n in reversed(x.shape):
        want.insert(0, acc)
        acc *= max(n, 1)
    want = tuple(want)
    if x.stride() == want:
        return x
    return x.as_strided(x.shape, want) if x.is_contiguous() else x.contiguous()


def _compiled_forward(state: CompiledBlocks, eager, compiled, fallback: bool):
    def forward(hidden_states, *args, **kwargs):
        x = _standard_strides(hidden_states)
        if state.error is None:
            try:
                return compiled(x, *args, **kwargs)
            except TorchDynamoException as e:  # Inductor's errors derive from it too
                if not fallback:
                    raise
                state.fall_back(e)
        return eager(x, *args, **kwargs)

    return forward


def enable_cache(
    transformer, kind: str, params: Mapping[str, Any], steps: int, mag_ratios: tuple[float, ...] | None = None
) -> None:
    """Enable diffusers' FirstBlockCache ("first-block", params: threshold) or MagCache ("mag",
    params: threshold and max_skip_steps, or calibrate) on `transformer` (replacing an enabled one)."""
    disable_cache(transformer)
    if kind == "first-block":
        config = FirstBlockCacheConfig(threshold=params["threshold"])
    elif kind == "mag":
        config = MagCacheConfig(
            num_inference_steps=steps, mag_ratios=list(mag_ratios) if mag_ratios else None, **params
        )
    else:
        raise ValueError(f"cache kind {kind!r} is not allowed; use first-block or mag")
    transformer.enable_cache(config)


def disable_cache(transformer) -> None:
    if transformer.is_cache_enabled:
        transformer.disable_cache()


def reset_cache(transformer) -> None:
    """Forget the cached residuals and step counters (call before every video)."""
    if transformer.is_cache_enabled:
        # Private in diffusers 0.42 (check_compatible insists it exists); WanPipeline.__call__
        # reaches it through maybe_free_model_hooks(), which would also offload models.
        transformer._reset_stateful_cache()


def decode_video(pipe, latents: torch.Tensor, device: torch.device | None = None, decoder=None):
    """Latents -> float frames [T, H, W, 3] in [0, 1] (numpy), through the Wan VAE in its own dtype,
    on `device` (default: where the VAE's weights are; give it when an offload hook moves the VAE).
    `decoder(z) -> video [B, 3, T, H, W] or None` replaces vae.decode (the split decode: None on
    the ranks that do not assemble, and then this returns None)."""
    vae = pipe.vae
    z = vae.config.z_dim
    latents = latents.to(device=device or next(vae.parameters()).device, dtype=vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
    scaled = latents * std + mean
    video = vae.decode(scaled, return_dict=False)[0] if decoder is None else decoder(scaled)
    if video is None:
        return None
    # float32 for the postprocessing's numpy conversion (numpy has no bfloat16)
    return pipe.video_processor.postprocess_video(video.float(), output_type="np")[0]
