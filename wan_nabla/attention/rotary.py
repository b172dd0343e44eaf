"""Wan's rotary embedding on q/k, with NABLA's tile pooling fused in (Triton on CUDA).

    q_BSHD, q_pooled = rotate(q_BSHD, cos, sin, layout)    # pooled: [B, H, n_tiles, D] float32 or None
    q_BSHD, _ = rotate(q_BSHD, cos, sin)                   # rotation only (raster order, dense calls)
    q_BSHD = rotate_torch(q_BSHD, cos, sin)                # the eager reference (any device)

The rotation is diffusers' WanAttnProcessor math on interleaved pairs: out[2i] = x[2i] cos[2i] -
x[2i+1] sin[2i+1], out[2i+1] = x[2i] sin[2i+1] + x[2i+1] cos[2i], in float32 from the model's
dtype, rounded back to it. The Triton kernel does each product and sum as a separate float32
operation with fused multiply-add off, as eager torch does, so its output is bit-identical to
`rotate_torch` (tested under Triton's interpreter and on the GPU by benchmarks/jobs/gpu_fa4_check.py).

Fusion (the mask build's floor, docs/design.md section 5): NABLA needs the mean of q and k over
the real tokens of each 64-token tile. Pooling them separately re-reads q and k (2 x 0.83 GB per
14B layer at 720p); here one program per (batch item, tile) loads the tile's cos/sin once, and for
every head rotates the tile, writes it, and sums its real tokens (of the values as stored, so the
mean equals pooling the stored q/k up to float32 summation order). Pad tokens are skipped.
Limits: cos/sin [1, S, 1, D] float32 shared by the batch (diffusers' layout), D even; pooling
needs the tile-order sequence (S = layout.padded_len); otherwise, or without CUDA + Triton,
`rotate` runs `rotate_torch` and returns no pooled means (masks.py then pools by itself).
"""

from __future__ import annotations

import functools

import torch

from .layout import TILE_TOKENS, TileLayout
from .triton.mask_kernels import TRITON, triton

if TRITON is not None:
    import triton.language as tl

# Fused multiply-add changes rounding; eager torch multiplies and adds separately.
_NO_FMA = {"enable_fp_fusion": False}
ROTARY_WARPS = 8


def rotate_torch(x_BSHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Eager reference: the same math and rounding as diffusers' Wan rotary embedding."""
    x1, x2 = x_BSHD.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    return out.type_as(x_BSHD)


def fused_ok(x_BSHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: TileLayout | None = None) -> bool:
    """Whether the Triton kernel takes these inputs (else `rotate` runs the torch path)."""
    b, s, h, d = x_BSHD.shape
    ok = (
        TRITON is not None
        and x_BSHD.is_cuda
        and d % 2 == 0
        and x_BSHD.stride(-1) == 1
        and all(
            t.dtype == torch.float32
            and tuple(t.shape) == (1, s, 1, d)
            and t.device == x_BSHD.device
            and t.stride(-1) == 1
            for t in (cos, sin)
        )
    )
    return ok and (layout is None or s == layout.padded_len)


def rotate(
    x_BSHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: TileLayout | None = None, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rotated x [B, S, H, D], tile means [B, H, n_tiles, D] float32 or None). impl: auto (Triton
    where `fused_ok`), torch, or triton (the interpreter in tests)."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl={impl!r} is not allowed; use auto, torch or triton")
    use = impl == "triton" or (impl == "auto" and fused_ok(x_BSHD, cos, sin, layout))
    if not use:
        return rotate_torch(x_BSHD, cos, sin), None
    return rotate_triton(x_BSHD, cos, sin, layout)


@functools.lru_cache(maxsize=64)
def _pool_tables(layout: TileLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return layout.valid(device).to(torch.uint8).contiguous(), layout.tile_counts(device).contiguous()


def rotate_triton(
    x_BSHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: TileLayout | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, s, h, d = x_BSHD.shape
    out = torch.empty((b, s, h, d), dtype=x_BSHD.dtype, device=x_BSHD.device)
    pool = layout is not None
    if layout is not None:
        if s != layout.padded_len:
            raise ValueError(f"pooling needs {layout.padded_len} tokens in tile order, got {s}")
        valid, counts = _pool_tables(layout, x_BSHD.device)
        pooled = torch.empty((b, h, layout.n_tiles, d), dtype=torch.float32, device=x_BSHD.device)
    else:
        valid = counts = pooled = out  # unused pointers
    n_blocks = -(-s // TILE_TOKENS)
    sb, ss, sh, sd = x_BSHD.stride()
    _rotary_kernel[(b * n_blocks,)](
        x_BSHD,
        out,
        cos,
        sin,
        pooled,
        valid,
        counts,
        s,
        h,
        n_blocks,
        sb,
        ss,
        sh,
        sd,
        cos.stride(1),
        sin.stride(1),
        D=d,
        DP=max(2, triton.next_power_of_2(d)),
        T=TILE_TOKENS,
        POOL=pool,
        BF16=x_BSHD.dtype == torch.bfloat16,
        num_warps=ROTARY_WARPS,
        **_NO_FMA,
    )
    return out, (pooled if pool else None)


if TRITON is not None:

    @triton.jit
    def _rotary_kernel(
        x_ptr,
        out_ptr,
        cos_ptr,
        sin_ptr,
        pool_ptr,
        valid_ptr,
        count_ptr,
        S,
        H,
        n_blocks,
        s_b,
        s_s,
        s_h,
        s_d,
        s_cos,
        s_sin,
        D: tl.constexpr,
        DP: tl.constexpr,
        T: tl.constexpr,
        POOL: tl.constexpr,
        BF16: tl.constexpr,
    ):
        # One program per (batch item, 64-token block): cos/sin loaded once, then every head.
        pid = tl.program_id(0).to(tl.int64)
        bi = pid // n_blocks
        blk = pid % n_blocks
        tok = blk * T + tl.arange(0, T)  # [T]
        tmask = tok < S
        dd = tl.arange(0, DP)
        m2 = tmask[:, None] & (dd[None, :] < D)
        c = tl.load(cos_ptr + tok[:, None] * s_cos + dd[None, :], mask=m2, other=0.0)
        sn = tl.load(sin_ptr + tok[:, None] * s_sin + dd[None, :], mask=m2, other=0.0)
        c_even, _ = tl.split(tl.reshape(c, (T, DP // 2, 2)))  # cos[2i]
        _, s_odd = tl.split(tl.reshape(sn, (T, DP // 2, 2)))  # sin[2i+1]
        if POOL:
            real = (tl.load(valid_ptr + tok, mask=tmask, other=0) != 0)[:, None]
            cnt = tl.load(count_ptr + blk)
        base = x_ptr + bi * s_b + tok[:, None] * s_s + dd[None, :] * s_d
        obase = out_ptr + ((bi * S + tok[:, None]) * H) * D + dd[None, :]
        for hh in range(H):
            x = tl.load(base + hh * s_h, mask=m2, other=0.0)
            x1, x2 = tl.split(tl.reshape(x.to(tl.float32), (T, DP // 2, 2)))
            o1 = x1 * c_even - x2 * s_odd
            o2 = x1 * s_odd + x2 * c_even
            o = tl.reshape(tl.join(o1, o2), (T, DP))
            if BF16:  # round to nearest even by hand: Triton's interpreter truncates instead
                bits = o.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                o = bits.to(tl.float32, bitcast=True)
            o = o.to(x.dtype)
            tl.store(obase + hh * D, o, mask=m2)
            if POOL:
                tot = tl.sum(tl.where(real, o.to(tl.float32), 0.0), 0)  # [DP]
                tl.store(pool_ptr + ((bi * H + hh) * n_blocks + blk) * D + dd, tot / cnt, mask=dd < D)
