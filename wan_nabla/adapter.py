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
diffusers' forward itself is not copied. `check_compatible` fails loudly if the processor call
signature or the module names this relies on change (tested against the pinned diffusers range).

Limits: Wan2.1 text-to-video transformers (no per-token timesteps, no image context).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from .config import AttentionConfig, ConfigError
from .attention.processors import AttentionRun, WanSparseAttnProcessor

_HANDLE_ATTR = "_wan_nabla_handle"


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
    for name in ("rope", "patch_embedding", "proj_out", "blocks"):
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
    transformer, attention: AttentionConfig | Mapping[str, Any], kernel_options: dict | None = None
) -> AttentionHandle:
    """Install wan-nabla processors on every self-attention of `transformer`; see module doc."""
    check_compatible(transformer)
    config = AttentionConfig.from_mapping(attention)
    n_layers = len(transformer.blocks)
    bad = [i for i in config.dense_layers if i >= n_layers]
    if bad:
        raise ConfigError(f"attention.dense_layers: {bad} out of range; this transformer has blocks 0..{n_layers - 1}")
    if getattr(transformer, _HANDLE_ATTR, None) is not None:
        raise RuntimeError("attention is already applied to this transformer; call handle.remove() first")

    run = AttentionRun(config, kernel_options)
    originals = [block.attn1.processor for block in transformer.blocks]
    for i, block in enumerate(transformer.blocks):
        block.attn1.processor = WanSparseAttnProcessor(run, i)

    hooks = [transformer.register_forward_pre_hook(_make_layout_hook(transformer, run), with_kwargs=True)]
    if config.sparse:
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
        run.layout = run.layout_for(f // p_t, h // p_h, w // p_w, x.device) if run.config.sparse else None
        return None

    return hook


def _make_patch_hook(run: AttentionRun):
    def hook(module, args, out_BCFHW):
        tiles_BSC = run.layout.grid_to_tiles(out_BCFHW.permute(0, 2, 3, 4, 1))
        return tiles_BSC.transpose(1, 2)[..., None, None]  # diffusers flattens dims 2.. next

    return hook


def _make_rope_hook(run: AttentionRun):
    def hook(module, args, out):
        cos, sin = out  # [1, S, 1, D] raster order
        return tuple(run.layout.to_tiles(t[:, :, 0].float(), seq_dim=1)[:, :, None] for t in (cos, sin))

    return hook


def _make_unpatch_hook(run: AttentionRun):
    def hook(module, args, out_BSC):
        return run.layout.from_tiles(out_BSC, seq_dim=1)

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


def make_scheduler(pipe, shift: float):
    """A fresh copy of the pipeline's flow-matching scheduler with this shift."""
    return type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=shift)


# The scheduler of every Wan-AI/Wan2.1-*-Diffusers checkpoint (and of the tiny model), for checks
# made before a model is loaded.
WAN_SCHEDULER_CONFIG = {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                        "use_flow_sigmas": True, "num_train_timesteps": 1000, "flow_shift": 3.0}


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


def denoise(pipe, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """One transformer call on a batch: latents [B, 16, F, H, W], embeds [B, 512, text_dim]."""
    x = latents.to(pipe.transformer.dtype)
    return pipe.transformer(
        hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=embeds, return_dict=False
    )[0]


def decode_video(pipe, latents: torch.Tensor):
    """Latents -> float frames [T, H, W, 3] in [0, 1] (numpy), through the Wan VAE in its own dtype."""
    vae = pipe.vae
    z = vae.config.z_dim
    latents = latents.to(device=next(vae.parameters()).device, dtype=vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
    video = vae.decode(latents * std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="np")[0]
