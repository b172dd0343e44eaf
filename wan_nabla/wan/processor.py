"""The self-attention processor wan-nabla installs on every Wan2.1 block (block.attn1).

    proc = WanSparseAttnProcessor(run, layer=3)      # installed by hooks.apply_attention
    out = proc(attn, hidden_states, rotary_emb=(cos, sin))

It reads like diffusers' WanAttnProcessor: projections (fused or not), RMS q/k norm, rotary
embedding, one attention call, output projection. The attention call is chosen once, at
construction: on one GPU `AttentionRun.attend` on [B, H, S, D]; under Ulysses sequence
parallelism the all-to-alls around it (each rank attends all tokens for a share of the heads).
While TorchDynamo traces (torch.compile of the transformer or of its blocks) the call goes
through the custom op `attention.run.attend_op` (or behind a graph break for compile_region
"split"), so the traced graph holds no Python state, logging or statistics and never recompiles
per step, prompt or seed. Eagerly on CUDA the rotation is rotary.py's bit-identical Triton kernel,
which also pools the tiles NABLA needs; traced, it is plain torch that Inductor fuses.
Limits: self-attention only (no context, mask or extra kwargs); no image-conditioned (I2V) attention.
"""

from __future__ import annotations

import copy

import torch

from ..attention.rotary import rotate, rotate_torch
from ..attention.run import (
    AttentionRun,
    attend_op,
    attend_outside_graph,
    attend_sequence_parallel,
    attend_sequence_parallel_op,
    attend_sequence_parallel_outside_graph,
    layout_args,
)


class _Local:
    """One GPU (or CPU): AttentionRun.attend on [B, H, S, D]."""

    @staticmethod
    def eager(proc, q_BSHD, k_BSHD, v_BSHD, pooled):
        q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHD))
        return proc.run.attend(q, k, v, proc.layer, pooled=pooled)

    @staticmethod
    def op(proc, q_BSHD, k_BSHD, v_BSHD):
        q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHD))
        return attend_op(q, k, v, proc.ids, layout_args(proc.run.state.layout))

    @staticmethod
    def split(proc, q_BSHD, k_BSHD, v_BSHD):
        q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHD))
        return attend_outside_graph(proc.run, q, k, v, proc.layer)


class _Ulysses:
    """Sequence parallelism: the all-to-alls around `attend`, never inside a compiled graph."""

    @staticmethod
    def eager(proc, q_BSHD, k_BSHD, v_BSHD, pooled):
        return attend_sequence_parallel(proc.run, q_BSHD, k_BSHD, v_BSHD, proc.layer)

    @staticmethod
    def op(proc, q_BSHD, k_BSHD, v_BSHD):
        return attend_sequence_parallel_op(q_BSHD, k_BSHD, v_BSHD, proc.ids, layout_args(proc.run.state.layout))

    @staticmethod
    def split(proc, q_BSHD, k_BSHD, v_BSHD):
        return attend_sequence_parallel_outside_graph(proc.run, q_BSHD, k_BSHD, v_BSHD, proc.layer)


class WanSparseAttnProcessor:
    """Drop-in processor for a Wan2.1 self-attention module (block.attn1)."""

    def __init__(self, run: AttentionRun, layer: int):
        self.run = run
        self.layer = layer
        self.ids = torch.tensor([run.run_id, layer])  # CPU: reading it inside the custom op never syncs
        self.path = _Ulysses if run.sequence_parallel is not None else _Local  # chosen once, here

    def __deepcopy__(self, memo) -> WanSparseAttnProcessor:
        return WanSparseAttnProcessor(copy.deepcopy(self.run, memo), self.layer)

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
        if rotary_emb is not None:
            q, k, pooled = self._rotate(q, k, rotary_emb)
        out = self.attend(q, k, v, pooled)  # [B, H, S, D]
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # [B, S, H*D]
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def attend(self, q_BSHD, k_BSHD, v_BSHD, pooled):
        """[B, S, H, D] -> [B, H, S, D] by the path chosen at construction. While TorchDynamo traces
        (a trace-time constant: the compiled graph holds only the op or the break), through the
        custom op or behind a graph break as compile_blocks set it (AttentionRun.set_compile_region)."""
        if not torch.compiler.is_compiling():
            return self.path.eager(self, q_BSHD, k_BSHD, v_BSHD, pooled)
        traced = self.path.split if self.run.compile_region == "split" else self.path.op
        return traced(self, q_BSHD, k_BSHD, v_BSHD)

    def _rotate(self, q, k, rotary_emb):
        cos, sin = rotary_emb
        if torch.compiler.is_compiling():  # plain torch, which Inductor fuses with the q/k norm
            return rotate_torch(q, cos, sin), rotate_torch(k, cos, sin), None
        # NABLA's tile means, pooled while rotating (Triton, on one GPU only)
        pool = self.run.pool_layout(self.layer, q) if self.run.sequence_parallel is None else None
        (q, q_bar), (k, k_bar) = rotate(q, cos, sin, pool), rotate(k, cos, sin, pool)
        return q, k, ((q_bar, k_bar) if q_bar is not None and k_bar is not None else None)
