"""Self-attention processors for Wan2.1 blocks, and the run context they share.

    run = AttentionRun(AttentionConfig(type="nabla", threshold=0.7))
    proc = WanSparseAttnProcessor(run, layer=3)      # installed by adapter.apply_attention
    run.set_step(0)                                  # the pipeline tells it the denoising step
    run.density_summary()                            # {"overall": ..., "per_step": [...], ...}

Each call computes q/k/v exactly as diffusers' WanAttnProcessor does (projections, RMS q/k norm,
rotary embedding; on CUDA the rotation is rotary.py's bit-identical Triton kernel, which also
pools the tiles NABLA needs), then `AttentionRun.attend` picks the kernel:
- dense (type full, a layer in `dense_layers`, or a step < `dense_steps`): SDPA (cuDNN first on
  CUDA) or flash-attn-4. With tile padding, keys/values are gathered to the real tokens so pads
  get no weight.
- sparse: `masks.plan_blocks` (NABLA from these very q/k, STA from the static cache, or their OR)
  gives the kept blocks; compiled FlexAttention or flash-attn-4 runs them.
The backend (config `backend`: auto | flex | fa4) is resolved per (device, dtype) by
kernels.resolve_backend and logged once; it also sets the default block geometry
(kernels.GEOMETRY). If flash-attn-4 fails on a first call, the run logs why and goes on with flex.

The sequence arrives in tile order (adapter.py reorders once per forward) for sparse types, and
in diffusers' raster order for `full`. Under Ulysses sequence parallelism (`run.sequence_parallel`)
each rank holds a chunk of the tokens: the processor's all-to-all gives `attend` all tokens for a
share of the heads, so masks and kernels see exactly what they see on one GPU. Kept-block density is recorded per (step, layer) as device
tensors and read only when a summary is asked for, so recording never syncs the GPU.

Compiled blocks (adapter.compile_blocks). `AttentionRun.attend` reads Python state (step, layout)
and appends to Python lists; traced by TorchDynamo that would guard on the step and recompile on
every call. So under a compiled block the processor hands attention to an opaque region, chosen
by `run.compile_region`:
- "op": the custom op `wan_nabla::attend` (torch.library), one node inside the block's single
  graph; Dynamo sees only its fake (an empty tensor like q). The run and layer enter as a small
  CPU tensor, a graph input, so all blocks (and later runs) share one graph instead of guarding
  on 40 different ints or baking a run into it.
- "split": a `torch.compiler.disable`d call; the block's graph splits around attention.
Under Ulysses the all-to-alls run inside the same opaque region as attention
(`wan_nabla::attend_sequence_parallel`, or behind the graph break).
Either way the mask build and the kernel run as they do eagerly (the kernel is the process-wide
compiled flex or flash-attn-4), dense_steps switch kernels without a recompile, and statistics
stay exact. Inside a compiled block the rotary embedding is plain torch (Inductor fuses it with
the q/k norm) and NABLA pools its tiles in mask_kernels.py; the fused rotary + pooling kernel
(rotary.py) is used by eager blocks.
Limits: self-attention only (attn1); image-conditioned (I2V) attention is not supported.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections import defaultdict
from collections.abc import Callable

import torch

from ..config import AttentionConfig
from . import fa4
from .kernels import default_geometry, dense_attention, log_choice, resolve_backend, sparse_attention
from .layout import TileLayout
from .masks import BlockPlan, plan_blocks, use_triton
from .rotary import rotate, rotate_torch

log = logging.getLogger(__name__)

_RUNS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_RUN_IDS = itertools.count()


class AttentionRun:
    """State shared by all processors of one patched transformer: config, step, layout, stats."""

    def __init__(self, config: AttentionConfig, kernel_options: dict | None = None, sequence_parallel=None):
        self.config = config
        self.kernel_options = kernel_options
        """Extra FlexAttention kernel options (flex backend only)."""
        self.step = 0
        self.layout: TileLayout | None = None
        self.sequence_parallel = sequence_parallel
        """distributed.SequenceParallel or None: processors run `attend` between its all-to-alls."""
        self.stats_mean: Callable[[torch.Tensor], torch.Tensor] | None = None
        """Averages recorded densities over the ranks of one video (set by the pipeline), or None."""
        self.fallback: str | None = None
        """Why flash-attn-4 was given up in this run (None: it was not)."""
        self._backends: dict[tuple, str] = {}
        self._used: set[str] = set()
        self._densities: dict[int, list] = defaultdict(list)
        self.compile_region = "eager"
        """How processors reach `attend`: eager (a plain call), op or split (module doc)."""
        self.run_id = next(_RUN_IDS)
        _RUNS[self.run_id] = self

    # ---- schedule and backend ----------------------------------------------------------
    def set_step(self, step: int) -> None:
        self.step = int(step)

    def backend(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        """The backend this run uses on `device` for `dtype` ("fa4" or "flex"), logged once."""
        key = (device, dtype)
        name = self._backends.get(key)
        if name is None:
            requested = self.config.backend
            if self.fallback is not None:
                name, why = "flex", f"flash-attn-4 failed, flex from now on: {self.fallback}"
            else:
                name, why = resolve_backend(requested, device, dtype)
            log_choice(requested, name, why)
            self._backends[key] = name
        return name

    def kernel_for(self, q_BHSD: torch.Tensor) -> str:
        """The backend of one call: the run's, unless FA4 cannot take these inputs (head_dim)."""
        name = self.backend(q_BHSD.device, q_BHSD.dtype)
        if name == "fa4":
            why = fa4.unsupported(q_BHSD)
            if why is not None:
                log_choice(self.config.backend, "flex", why)
                return "flex"
        return name

    def give_up_fa4(self, reason: str) -> None:
        """flash-attn-4 failed: flex from now on, this call included (the next backend() logs why,
        once: kernels.log_choice)."""
        self.fallback = reason
        self._backends.clear()

    def block_size(self, device: torch.device, dtype: torch.dtype | None = None) -> tuple[int, int]:
        return self.config.block_size or default_geometry(self.backend(device, dtype), device).block_size

    def layout_for(self, frames: int, height: int, width: int, device: torch.device,
                   dtype: torch.dtype | None = None) -> TileLayout:
        """The tile layout of a patch grid under this config (time pairs with 128-token queries)."""
        pairs = self.config.time_pairs
        if pairs is None:
            if self.config.block_size is None:
                pairs = default_geometry(self.backend(device, dtype), device).time_pairs
            else:
                pairs = self.config.block_size[0] == 128
        return TileLayout(frames, height, width, time_pairs=pairs)

    def uses_dense(self, layer: int) -> bool:
        c = self.config
        return c.type == "full" or layer in c.dense_layers or self.step < c.dense_steps

    def pool_layout(self, layer: int, q: torch.Tensor) -> TileLayout | None:
        """The layout whose tile means this call's NABLA plan will read from the rotary kernel
        (None: no NABLA plan this call, or not on the Triton path)."""
        c, layout = self.config, self.layout
        if layout is None or self.uses_dense(layer) or c.type not in ("nabla", "nabla_sta") or c.threshold >= 1.0:
            return None
        return layout if use_triton(q, n=layout.n_tiles) else None

    # ---- the attention itself ----------------------------------------------------------
    def attend(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, layer: int,
               pooled: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        layout = self.layout
        if self.uses_dense(layer):
            self._densities[self.step].append((layer, 1.0))
            return self.dense(q_BHSD, k_BHSD, v_BHSD)
        if layout is None:
            raise RuntimeError("sparse attention called without a tile layout; use wan_nabla.apply_attention")
        plan = self.plan(q_BHSD, k_BHSD, layout, pooled)
        self._densities[self.step].append((layer, plan.density))
        return self.sparse(q_BHSD, k_BHSD, v_BHSD, plan)

    def dense(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> torch.Tensor:
        """Dense attention over the real keys (pads of a padded tile layout gathered out)."""
        layout = self.layout
        if layout is not None and layout.needs_padding:
            real = layout.real_token_index(q_BHSD.device)
            # Gathered as [B, S, H, D] rows (both kernels' preferred layout), viewed as BHSD.
            k_BHSD, v_BHSD = (t.transpose(1, 2).index_select(1, real).transpose(1, 2) for t in (k_BHSD, v_BHSD))
        if self.kernel_for(q_BHSD) == "fa4":
            try:
                out = fa4.dense_attention(q_BHSD, k_BHSD, v_BHSD)
                self._used.add("fa4")
                return out
            except fa4.FA4Error as e:
                self.give_up_fa4(str(e))
        self._used.add("flex")
        return dense_attention(q_BHSD, k_BHSD, v_BHSD)

    def sparse(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
        """Block-sparse attention over `plan` with this run's backend."""
        if self.kernel_for(q_BHSD) == "fa4":
            try:
                out = fa4.sparse_attention(q_BHSD, k_BHSD, v_BHSD, plan)
                self._used.add("fa4")
                return out
            except fa4.FA4Error as e:
                self.give_up_fa4(str(e))
        self._used.add("flex")
        return sparse_attention(q_BHSD, k_BHSD, v_BHSD, plan.block_mask(), self.kernel_options)

    def plan(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, layout: TileLayout,
             pooled: tuple[torch.Tensor, torch.Tensor] | None = None) -> BlockPlan:
        """The kept blocks for this call's q/k under the configured attention type."""
        return plan_blocks(self.config, q_BHSD, k_BHSD, layout, self.block_size(q_BHSD.device, q_BHSD.dtype),
                           pooled=pooled)

    # ---- statistics --------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._densities.clear()
        self._used.clear()

    def calls_per_step(self) -> dict[int, int]:
        """Attention calls recorded per step: one per computed block and batch (a block a step
        cache skipped never calls its attention)."""
        return {step: len(recs) for step, recs in sorted(self._densities.items())}

    def density_summary(self, steps: int | None = None) -> dict:
        """Mean kept-block density per step, per layer and overall (1.0 = dense). Reading the
        recorded device tensors syncs the device once, here and not during the run. With `steps`,
        `per_step` has one entry per step, None where no attention ran (a cache skipped it)."""
        per_step: dict[int, float] = {}
        by_layer: dict[int, list[float]] = defaultdict(list)
        items = sorted(self._densities.items())
        tensors = [v for _, recs in items for _, v in recs if isinstance(v, torch.Tensor)]
        # One device-to-host copy for all recorded densities instead of one sync per value. Under
        # sequence / CFG parallelism every rank of a video records the same calls for its share of
        # heads and batch items, so the mean over ranks is the one-GPU value.
        stacked = torch.stack([t.float().reshape(()) for t in tensors]) if tensors else None
        if stacked is not None and self.stats_mean is not None:
            stacked = self.stats_mean(stacked)
        host = iter(stacked.tolist()) if stacked is not None else iter(())
        for step, records in items:
            self._densities[step] = records = [
                (layer, next(host) if isinstance(v, torch.Tensor) else v) for layer, v in records]
            vals = [float(v) for _, v in records]
            per_step[step] = sum(vals) / len(vals)
            for (layer, _), v in zip(records, vals):
                by_layer[layer].append(v)
        overall = sum(per_step.values()) / len(per_step) if per_step else None
        order = range(steps) if steps is not None else sorted(per_step)
        return {
            "attention": self.config.label(),
            "backend": "+".join(sorted(self._used)) or None,
            "overall": overall,
            "per_step": [per_step.get(s) for s in order],
            "per_layer": [sum(by_layer[i]) / len(by_layer[i]) for i in sorted(by_layer)],
        }

    def log_step(self, step: int) -> None:
        vals = self._densities.get(step)
        if vals and log.isEnabledFor(logging.DEBUG):
            d = sum(float(v) for _, v in vals) / len(vals)
            log.debug("step %d: %s mean kept-block density %.4f over %d attention calls",
                      step, self.config.label(), d, len(vals))


@torch.library.custom_op("wan_nabla::attend", mutates_args=())
def attend_op(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`AttentionRun.attend` as one opaque node of a compiled graph (compile_region "op");
    ids = [run_id, layer] on the CPU."""
    run_id, layer = ids.tolist()
    out = _RUNS[run_id].attend(q_BHSD, k_BHSD, v_BHSD, layer)
    # The compiled graph was planned with the fake's strides (those of q); hand back exactly those.
    return out if out.stride() == q_BHSD.stride() else torch.empty_like(q_BHSD).copy_(out)


@attend_op.register_fake
def _attend_fake(q_BHSD, k_BHSD, v_BHSD, ids):
    return torch.empty_like(q_BHSD)


@torch.compiler.disable
def attend_outside_graph(run: AttentionRun, q_BHSD, k_BHSD, v_BHSD, layer: int) -> torch.Tensor:
    """`AttentionRun.attend` behind a graph break (compile_region "split")."""
    return run.attend(q_BHSD, k_BHSD, v_BHSD, layer)


def _attend_sequence_parallel(run: AttentionRun, q_BSHD, k_BSHD, v_BSHD, layer: int) -> torch.Tensor:
    """Ulysses attention on local tokens [B, S_loc, H, D] -> [B, H, S_loc, D] (contiguous): heads
    scattered over the ranks (all tokens each), `run.attend`, gathered back."""
    sp = run.sequence_parallel
    return sp.gather_heads(run.attend(*sp.scatter_heads(q_BSHD, k_BSHD, v_BSHD), layer)).contiguous()


attend_sequence_parallel = torch.compiler.disable(_attend_sequence_parallel)
"""Behind a graph break (compile_region "split")."""


@torch.library.custom_op("wan_nabla::attend_sequence_parallel", mutates_args=())
def attend_sequence_parallel_op(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor,
                                ids: torch.Tensor) -> torch.Tensor:
    """Ulysses attention (all-to-alls included) as one opaque node of a compiled graph ("op")."""
    run_id, layer = ids.tolist()
    return _attend_sequence_parallel(_RUNS[run_id], q_BSHD, k_BSHD, v_BSHD, layer)


@attend_sequence_parallel_op.register_fake
def _attend_sequence_parallel_fake(q_BSHD, k_BSHD, v_BSHD, ids):
    b, s, h, d = q_BSHD.shape
    return q_BSHD.new_empty(b, h, s, d)


class WanSparseAttnProcessor:
    """Drop-in processor for a Wan2.1 self-attention module (block.attn1)."""

    def __init__(self, run: AttentionRun, layer: int):
        self.run = run
        self.layer = layer
        self.ids = torch.tensor([run.run_id, layer])  # CPU: reading it inside the custom op never syncs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        if encoder_hidden_states is not None or attention_mask is not None or kw:
            raise ValueError("WanSparseAttnProcessor handles self-attention only (no context, mask or kwargs)")
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # [B, S, H, D]
        pooled = None
        region = self.run.compile_region
        if rotary_emb is not None:
            cos, sin = rotary_emb
            if region == "eager":  # NABLA's tile means, pooled while rotating (not traced: Triton)
                pool = self.run.pool_layout(self.layer, q) if self.run.sequence_parallel is None else None
                (q, q_bar), (k, k_bar) = rotate(q, cos, sin, pool), rotate(k, cos, sin, pool)
                pooled = (q_bar, k_bar) if q_bar is not None and k_bar is not None else None
            else:  # inside a compiled block: plain torch, which Inductor fuses with the q/k norm
                q, k = rotate_torch(q, cos, sin), rotate_torch(k, cos, sin)
        if self.run.sequence_parallel is not None:
            # Ulysses: all tokens for this rank's heads, attention exactly as on one GPU, and back;
            # the all-to-alls never enter a compiled graph (an opaque op, or a graph break).
            if region == "op":
                out = attend_sequence_parallel_op(q, k, v, self.ids)
            elif region == "split":
                out = attend_sequence_parallel(self.run, q, k, v, self.layer)
            else:
                out = _attend_sequence_parallel(self.run, q, k, v, self.layer)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
            if region == "op":
                out = attend_op(q, k, v, self.ids)
            elif region == "split":
                out = attend_outside_graph(self.run, q, k, v, self.layer)
            else:
                out = self.run.attend(q, k, v, self.layer, pooled=pooled)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # [B, S, H*D]
        out = attn.to_out[0](out)
        return attn.to_out[1](out)
