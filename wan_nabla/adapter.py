"""All coupling to diffusers' Wan2.1 transformer lives here.

    handle = apply_attention(pipe.transformer, {"type": "nabla", "threshold": 0.7})
    handle.run.set_step(i)        # the denoising loop reports the step (dense_steps schedule)
    handle.run.density_summary()  # kept-block density per step
    handle.remove()               # original processors and hooks back, bit-for-bit behaviour

What is patched, and why here:
- every `blocks[i].attn1.processor` becomes a WanSparseAttnProcessor (cross-attention `attn2`
  is untouched);
- for sparse types, three forward hooks put tokens in tile order once per forward, not per layer:
  `patch_embedding` (its [B, C, F, H, W] output is returned as [B, C, S_pad, 1, 1], so diffusers'
  own `flatten(2).transpose(1, 2)` yields tile order), `rope` (cos/sin tables reordered the same
  way, as float32), and `proj_out` (tile order undone and pads dropped before unpatchify);
- a forward pre-hook on the transformer derives the TileLayout from the input latent shape.
With `sequence_parallel` (a distributed.SequenceParallel, Ulysses over U ranks) the same three
hooks also shard: `patch_embedding` keeps this rank's contiguous chunk of whole tiles (of raster
tokens for `full`, which has no tile order), `rope` slices its tables to that chunk, and
`proj_out` all-gathers the chunks before the tile order is undone, so diffusers' unpatchify sees
the whole sequence. Everything between (norms, modulation, cross-attention, FFN) is per token;
the self-attention processor does the all-to-alls around the attention (processors.py).
diffusers' forward itself is not copied. `check_compatible` fails loudly if the processor call
signature or the module names this relies on change (tested against the pinned diffusers range).

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

Limits: Wan2.1 text-to-video transformers (no per-token timesteps, no image context).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch

from .config import AttentionConfig, ConfigError
from .attention.layout import TILE_TOKENS
from .attention.processors import AttentionRun, WanSparseAttnProcessor
from .model_source import WAN_SCHEDULER_CONFIG  # noqa: F401 - re-exported: Wan2.1's scheduler, known without torch

_HANDLE_ATTR = "_wan_nabla_handle"
log = logging.getLogger(__name__)


def check_compatible(transformer: torch.nn.Module) -> None:
    """Raise a clear error if the transformer is not the diffusers Wan2.1 layout we patch."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    if not isinstance(transformer, WanTransformer3DModel):
        raise TypeError(f"apply_attention expects a diffusers WanTransformer3DModel, got {type(transformer).__name__}")
    params = list(inspect.signature(WanAttnProcessor.__call__).parameters)
    expected = ["self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask", "rotary_emb"]
    if params[: len(expected)] != expected:
        raise RuntimeError(f"unsupported diffusers version: WanAttnProcessor.__call__ takes {params}, expected {expected}")
    for name in ("rope", "patch_embedding", "proj_out", "blocks", "enable_cache", "cache_context",
                 "_reset_stateful_cache"):
        if not hasattr(transformer, name):
            raise RuntimeError(f"unsupported diffusers version: WanTransformer3DModel has no '{name}'")
    if getattr(transformer.config, "image_dim", None) is not None:
        raise ValueError("image-conditioned Wan transformers (I2V) are not supported; use a T2V checkpoint")


class AttentionHandle:
    """What apply_attention returns: the shared run context and a way to undo the patch."""

    def __init__(self, transformer, run: AttentionRun, originals: list, hooks: list):
        self.transformer = transformer
        self.run = run
        self._originals = originals
        self._hooks = hooks
        self.active = True

    def remove(self) -> None:
        if not self.active:
            return
        for block, proc in zip(self.transformer.blocks, self._originals):
            block.attn1.processor = proc
        for h in self._hooks:
            h.remove()
        setattr(self.transformer, _HANDLE_ATTR, None)
        self.active = False

    def __enter__(self) -> AttentionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_attention(
    transformer, attention: AttentionConfig | Mapping[str, Any], kernel_options: dict | None = None,
    sequence_parallel=None,
) -> AttentionHandle:
    """Install wan-nabla processors on every self-attention of `transformer`; see module doc.
    `sequence_parallel`: a distributed.SequenceParallel to shard tokens over its ranks (or None)."""
    check_compatible(transformer)
    config = AttentionConfig.from_mapping(attention)
    n_layers = len(transformer.blocks)
    bad = [i for i in config.dense_layers if i >= n_layers]
    if bad:
        raise ConfigError(f"attention.dense_layers: {bad} out of range; this transformer has blocks 0..{n_layers - 1}")
    sp = sequence_parallel
    heads = transformer.config.num_attention_heads
    if sp is not None and heads % sp.size:
        raise ConfigError(f"parallel.ulysses_degree: {sp.size} does not divide the model's {heads} attention heads; "
                          f"use a divisor of {heads}")
    if getattr(transformer, _HANDLE_ATTR, None) is not None:
        raise RuntimeError("attention is already applied to this transformer; call handle.remove() first")

    run = AttentionRun(config, kernel_options, sequence_parallel=sp)
    originals = [block.attn1.processor for block in transformer.blocks]
    for i, block in enumerate(transformer.blocks):
        block.attn1.processor = WanSparseAttnProcessor(run, i)

    hooks = [transformer.register_forward_pre_hook(_make_layout_hook(transformer, run), with_kwargs=True)]
    if config.sparse or sp is not None:
        hooks += [
            transformer.patch_embedding.register_forward_hook(_make_patch_hook(run)),
            transformer.rope.register_forward_hook(_make_rope_hook(run)),
            transformer.proj_out.register_forward_hook(_make_unpatch_hook(run)),
        ]
    handle = AttentionHandle(transformer, run, originals, hooks)
    setattr(transformer, _HANDLE_ATTR, handle)
    return handle


def _make_layout_hook(transformer, run: AttentionRun):
    p_t, p_h, p_w = transformer.config.patch_size

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if timestep is not None and timestep.ndim == 2:
            raise ValueError("per-token timesteps (Wan2.2 TI2V) are not supported by wan-nabla's tile layout")
        _, _, f, h, w = x.shape  # [B, C, F, H, W] latents
        layout = run.layout_for(f // p_t, h // p_h, w // p_w, x.device, x.dtype) if run.config.sparse else None
        run.layout = layout
        sp = run.sequence_parallel
        if sp is not None:  # shards of whole 64-token tiles in tile order, of single tokens in raster order
            if layout is not None:
                sp.set_sequence(layout.padded_len, TILE_TOKENS)
            else:
                sp.set_sequence((f // p_t) * (h // p_h) * (w // p_w), 1)
        return None

    return hook


def _make_patch_hook(run: AttentionRun):
    def hook(module, args, out_BCFHW):
        if run.layout is not None:
            x_BSC = run.layout.grid_to_tiles(out_BCFHW.permute(0, 2, 3, 4, 1))
        else:
            x_BSC = out_BCFHW.flatten(2).transpose(1, 2)
        if run.sequence_parallel is not None:
            x_BSC = run.sequence_parallel.shard(x_BSC, dim=1)
        return x_BSC.transpose(1, 2)[..., None, None]  # diffusers flattens dims 2.. next

    return hook


def _make_rope_hook(run: AttentionRun):
    def hook(module, args, out):
        cos, sin = out  # [1, S, 1, D] raster order
        if run.layout is not None:
            cos, sin = (run.layout.to_tiles(t[:, :, 0].float(), seq_dim=1)[:, :, None] for t in (cos, sin))
        if run.sequence_parallel is not None:
            cos, sin = (run.sequence_parallel.shard(t, dim=1) for t in (cos, sin))
        return cos, sin

    return hook


def _make_unpatch_hook(run: AttentionRun):
    def hook(module, args, out_BSC):
        if run.sequence_parallel is not None:
            out_BSC = run.sequence_parallel.gather(out_BSC, dim=1)
        return run.layout.from_tiles(out_BSC, seq_dim=1) if run.layout is not None else out_BSC

    return hook


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
    """A fresh flow-matching scheduler with this shift: a copy of the pipeline's own (unipc), or
    first-order Euler (euler; config.GenerationConfig.sampler)."""
    if sampler == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=pipe.scheduler.config.num_train_timesteps, shift=shift)
    return type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=shift)


def set_timesteps(scheduler, steps: int, device: torch.device) -> None:
    """Wan's UniPC timesteps, or for Euler the sigmas linspace(1, 0, steps + 1)[:-1], shifted by the
    scheduler (4 steps: timesteps 1000, 750, 500, 250 before the shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigmas = [1.0 - i / steps for i in range(steps)]
        scheduler.set_timesteps(sigmas=sigmas, device=device)
    else:
        scheduler.set_timesteps(steps, device=device)


def sampler_runs(scheduler_config: Mapping[str, Any], steps: int, shift: float) -> bool:
    """False iff diffusers' scheduler would fail to run `steps` at `shift`, decided without a model.

    UniPCMultistepScheduler finds its start with index_for_timestep(timesteps[0]), which takes the
    *second* match when the first timestep occurs twice; the run then ends one index past the
    schedule, and `step` fails (`assert self.this_order > 0`) at the last step. Integer timesteps
    coincide when sigma_1 rounds to sigma_0's timestep (999): at shift 3.0 from 334 steps, at 5.0
    from 201. Schedulers without that lookup are assumed to run."""
    import diffusers

    cls = getattr(diffusers, str(scheduler_config.get("_class_name", "")), None) or diffusers.UniPCMultistepScheduler
    sched = cls.from_config(dict(scheduler_config), flow_shift=shift)
    find = getattr(sched, "index_for_timestep", None)
    if find is None:
        return True
    sched.set_timesteps(steps)
    return int(find(sched.timesteps[0])) == 0


def denoise(pipe, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
            context: str | None = None) -> torch.Tensor:
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
        self.run.compile_region = "eager"
        log.warning("compiling the transformer blocks failed; running them eagerly (%s)", self.error)

    def undo(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self.run.compile_region = "eager"


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
    run.compile_region = "op" if mode == "blocks" else "split"
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
    from torch._dynamo.exc import TorchDynamoException

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


def enable_cache(transformer, kind: str, params: Mapping[str, Any], steps: int,
                 mag_ratios: tuple[float, ...] | None = None) -> None:
    """Enable diffusers' FirstBlockCache ("first-block", params: threshold) or MagCache ("mag",
    params: threshold and max_skip_steps, or calibrate) on `transformer` (replacing an enabled one)."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig

    disable_cache(transformer)
    if kind == "first-block":
        config = FirstBlockCacheConfig(threshold=params["threshold"])
    elif kind == "mag":
        config = MagCacheConfig(num_inference_steps=steps, mag_ratios=list(mag_ratios) if mag_ratios else None,
                                **params)
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


def decode_video(pipe, latents: torch.Tensor, device: torch.device | None = None):
    """Latents -> float frames [T, H, W, 3] in [0, 1] (numpy), through the Wan VAE in its own dtype,
    on `device` (default: where the VAE's weights are; give it when an offload hook moves the VAE)."""
    vae = pipe.vae
    z = vae.config.z_dim
    latents = latents.to(device=device or next(vae.parameters()).device, dtype=vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
    video = vae.decode(latents * std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="np")[0]
