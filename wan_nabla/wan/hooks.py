"""apply_attention: wan-nabla's attention patched into a diffusers WanTransformer3DModel.

    handle = apply_attention(pipe.transformer, {"type": "nabla", "threshold": 0.7})
    handle.run.set_step(i)        # the denoising loop reports the step (dense_steps schedule)
    handle.run.density_summary()  # kept-block density per step
    handle.remove()               # original processors and hooks back, bit-for-bit behaviour

What is patched, and why here:
- every `blocks[i].attn1.processor` becomes a processor.WanSparseAttnProcessor (cross-attention
  `attn2` is untouched);
- for sparse types, three forward hooks put tokens in tile order once per forward, not per layer:
  `patch_embedding` (its [B, C, F, H, W] output is returned as [B, C, S_pad, 1, 1], so diffusers'
  own `flatten(2).transpose(1, 2)` yields tile order), `rope` (cos/sin tables reordered the same
  way, as float32), and `proj_out` (tile order undone and pads dropped before unpatchify);
- a forward pre-hook on the transformer derives the TileLayout from the input latent shape and
  checks that the processors are still this patch's (`LayoutHook`).
With `sequence_parallel` (a distributed.SequenceParallel, Ulysses over U ranks) the same three
hooks also shard: `patch_embedding` keeps this rank's contiguous chunk of whole tiles (of raster
tokens for `full`, which has no tile order), `rope` slices its tables to that chunk, and
`proj_out` all-gathers the chunks before the tile order is undone, so diffusers' unpatchify sees
the whole sequence. Everything between (norms, modulation, cross-attention, FFN) is per token.
diffusers' forward itself is not copied. `check_compatible` fails loudly if the processor call
signature or the module names this relies on change (tested against the pinned diffusers range).

Under diffusers' own usage (docs/python_api.md): hooks are objects holding the run, so
`copy.deepcopy` of a patched transformer gives a copy with its own run and hooks; replacing a
processor (`set_attn_processor`) while the patch is active raises one error at the next forward
instead of attending to pad tokens; `torch.compile(transformer, fullgraph=True)` and diffusers'
`compile_repeated_blocks` trace the hooks and reach attention through one custom op.
Limits: Wan2.1 text-to-video transformers (no per-token timesteps, no image context).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from ..attention.config import AttentionConfig, check_dense_layers, check_heads_split
from ..attention.layout import TILE_TOKENS
from ..attention.run import AttentionRun
from .processor import WanSparseAttnProcessor

_HANDLE_ATTR = "_wan_nabla_handle"
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def check_compatible(transformer: torch.nn.Module) -> None:
    """Raise a clear error if the transformer is not the diffusers Wan2.1 layout we patch."""
    if not isinstance(transformer, WanTransformer3DModel):
        raise TypeError(f"apply_attention expects a diffusers WanTransformer3DModel, got {type(transformer).__name__}")
    params = list(inspect.signature(WanAttnProcessor.__call__).parameters)
    expected = ["self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask", "rotary_emb"]
    if params[: len(expected)] != expected:
        raise RuntimeError(
            f"unsupported diffusers version: WanAttnProcessor.__call__ takes {params}, expected {expected}"
        )
    for name in (
        "rope",
        "patch_embedding",
        "proj_out",
        "blocks",
        "enable_cache",
        "cache_context",
        "_reset_stateful_cache",
    ):
        if not hasattr(transformer, name):
            raise RuntimeError(f"unsupported diffusers version: WanTransformer3DModel has no '{name}'")
    if getattr(transformer.config, "image_dim", None) is not None:
        raise ValueError("image-conditioned Wan transformers (I2V) are not supported; use a T2V checkpoint")


class AttentionHandle:
    """What apply_attention returns: the run and a way to undo the patch. Plain references only
    (no torch RemovableHandle, whose weak reference would point into the original after a
    deepcopy), so a deep-copied model's handle undoes the copy's patch."""

    def __init__(self, transformer, run: AttentionRun, originals: list, hooks: list):
        self.transformer = transformer
        self.run = run
        self._originals = originals
        self._hooks = hooks
        """(module, hook id) of every hook installed."""
        self.active = True

    def remove(self) -> None:
        if not self.active:
            return
        for block, proc in zip(self.transformer.blocks, self._originals, strict=False):
            block.attn1.processor = proc
        for module, hook_id in self._hooks:
            for name in _HOOK_DICTS:
                getattr(module, name, {}).pop(hook_id, None)
        setattr(self.transformer, _HANDLE_ATTR, None)
        self.active = False

    def __enter__(self) -> AttentionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def handle_of(transformer) -> AttentionHandle | None:
    """The active patch of `transformer` (None: not patched)."""
    return getattr(transformer, _HANDLE_ATTR, None)


def apply_attention(
    transformer,
    attention: AttentionConfig | Mapping[str, Any],
    kernel_options: dict | None = None,
    sequence_parallel=None,
) -> AttentionHandle:
    """Install wan-nabla processors on every self-attention of `transformer`; see module doc.
    `sequence_parallel`: a distributed.SequenceParallel to shard tokens over its ranks (or None)."""
    check_compatible(transformer)
    config = AttentionConfig.from_mapping(attention)
    check_dense_layers(config, len(transformer.blocks))
    sp = sequence_parallel
    if sp is not None:
        check_heads_split(sp.size, transformer.config.num_attention_heads)
    if handle_of(transformer) is not None:
        raise RuntimeError("attention is already applied to this transformer; call handle.remove() first")

    run = AttentionRun(config, kernel_options, sequence_parallel=sp)
    originals = [block.attn1.processor for block in transformer.blocks]
    for i, block in enumerate(transformer.blocks):
        block.attn1.processor = WanSparseAttnProcessor(run, i)

    p_t, p_h, p_w = transformer.config.patch_size
    pre = transformer.register_forward_pre_hook(LayoutHook(run, (p_t, p_h, p_w)), with_kwargs=True)
    hooks = [(transformer, pre.id)]
    if config.sparse or sp is not None:
        for module, hook in (
            (transformer.patch_embedding, PatchHook(run)),
            (transformer.rope, RopeHook(run)),
            (transformer.proj_out, UnpatchHook(run)),
        ):
            hooks.append((module, module.register_forward_hook(hook).id))
    handle = AttentionHandle(transformer, run, originals, hooks)
    setattr(transformer, _HANDLE_ATTR, handle)
    return handle


class LayoutHook:
    """Forward pre-hook of the transformer: the forward's TileLayout from the latent shape. It
    first checks that every block still runs this patch's processor: a processor swapped in under
    an active patch would see tile-ordered, padded tokens and attend to the pads."""

    def __init__(self, run: AttentionRun, patch_size: tuple[int, int, int]):
        self.run = run
        self.patch_size = patch_size

    def __call__(self, module, args, kwargs):
        run = self.run
        for i, block in enumerate(module.blocks):
            proc = block.attn1.processor
            if not (isinstance(proc, WanSparseAttnProcessor) and proc.run is run):
                raise RuntimeError(
                    f"blocks[{i}].attn1.processor was replaced by {type(proc).__name__} while wan-nabla's attention "
                    "patch is active; call handle.remove() before set_attn_processor (or apply_attention again after)"
                )
        x = args[0] if args else kwargs["hidden_states"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if timestep is not None and timestep.ndim == 2:
            raise ValueError("per-token timesteps (Wan2.2 TI2V) are not supported by wan-nabla's tile layout")
        p_t, p_h, p_w = self.patch_size
        _, _, f, h, w = x.shape  # [B, C, F, H, W] latents
        layout = run.layout_for(f // p_t, h // p_h, w // p_w, x.device, x.dtype) if run.config.sparse else None
        run.state.layout = layout
        sp = run.sequence_parallel
        if sp is not None:  # shards of whole 64-token tiles in tile order, of single tokens in raster order
            if layout is not None:
                sp.set_sequence(layout.padded_len, TILE_TOKENS)
            else:
                sp.set_sequence((f // p_t) * (h // p_h) * (w // p_w), 1)


class PatchHook:
    """patch_embedding's output [B, C, F, H, W] -> [B, C, S, 1, 1] in tile order (this rank's shard)."""

    def __init__(self, run: AttentionRun):
        self.run = run

    def __call__(self, module, args, out_BCFHW):
        run = self.run
        if run.state.layout is not None:
            x_BSC = run.state.layout.grid_to_tiles(out_BCFHW.permute(0, 2, 3, 4, 1))
        else:
            x_BSC = out_BCFHW.flatten(2).transpose(1, 2)
        if run.sequence_parallel is not None:
            x_BSC = run.sequence_parallel.shard(x_BSC, dim=1)
        return x_BSC.transpose(1, 2)[..., None, None]  # diffusers flattens dims 2.. next


class RopeHook:
    """rope's cos/sin tables [1, S, 1, D] in the same token order (float32)."""

    def __init__(self, run: AttentionRun):
        self.run = run

    def __call__(self, module, args, out):
        run = self.run
        cos, sin = out  # [1, S, 1, D] raster order
        if run.state.layout is not None:
            cos, sin = (run.state.layout.to_tiles(t[:, :, 0].float(), seq_dim=1)[:, :, None] for t in (cos, sin))
        if run.sequence_parallel is not None:
            cos, sin = (run.sequence_parallel.shard(t, dim=1) for t in (cos, sin))
        return cos, sin


class UnpatchHook:
    """proj_out's output [B, S, C]: shards gathered, tile order undone, pads dropped."""

    def __init__(self, run: AttentionRun):
        self.run = run

    def __call__(self, module, args, out_BSC):
        run = self.run
        if run.sequence_parallel is not None:
            out_BSC = run.sequence_parallel.gather(out_BSC, dim=1)
        layout = run.state.layout
        return layout.from_tiles(out_BSC, seq_dim=1) if layout is not None else out_BSC
