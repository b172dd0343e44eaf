"""Triton kernels behind masks.py on CUDA: tile pooling and the sort-free CDF selection.

    pooled = pool_tiles_triton(q_BHSD, layout)                       # [B, H, n, D] float32
    select_triton(probs, mode=1, n_rows=..., n_cols=n, bh=1, threshold=0.7, tile_out=keep)
    lists = select_triton(scores, mode=0, ..., layout=layout, block_size=(128, 64), out_shape=(B, H))

masks.py documents the algorithm (bisection over fp32 bit patterns, float64 check and fallback,
ties kept together) and chooses between these kernels and its torch reference path. `TRITON`
is None on installs without Triton (the CPU torch wheel); the kernels also run under Triton's
CPU interpreter (TRITON_INTERPRET=1, set before this module is imported), which is how CI tests
them. Launch geometry was measured on an H100 at 14B heads, 1280x720x81 (benchmarks/NOTES.md).
Limits: rows of up to 16,384 tiles (masks.py falls back to torch beyond that).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..layout import TILE_TOKENS, TileLayout

try:  # the CPU torch wheel does not bring Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

TRITON = triton
"""The triton module, or None where it is not installed."""

# Contraction (a*b+c -> fma) may differ between kernel specialisations; off, they round alike.
_NO_FMA = {"enable_fp_fusion": False}


@functools.lru_cache(maxsize=64)
def _layout_tables(layout: TileLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid tokens as uint8 [S_pad], real tokens per tile as float32 [n]) for the pool kernel."""
    return layout.valid(device).to(torch.uint8).contiguous(), layout.tile_counts(device).contiguous()


@functools.lru_cache(maxsize=64)
def _pad_flags(layout: TileLayout, bkv: int, device: torch.device) -> torch.Tensor:
    """[n_kv_blocks] uint8: 1 for key blocks that hold a pad token (they go to the partial list)."""
    return layout.key_block_has_pad(bkv, device).to(torch.uint8).contiguous()


# Launch geometry (measured on H100 at 14B heads, 1280x720x81; benchmarks/NOTES.md).
POOL_TILES_PER_PROGRAM = 4
POOL_WARPS = 4


def pool_tiles_triton(
    x_BHSD: torch.Tensor, layout: TileLayout, tiles_per_program: int | None = None, num_warps: int | None = None
) -> torch.Tensor:
    """Mean of the real tokens of each tile: [B, H, S_pad, D] -> [B, H, n_tiles, D] float32."""
    b, h, s, d = x_BHSD.shape
    n = layout.n_tiles
    tpp = tiles_per_program or POOL_TILES_PER_PROGRAM
    valid, counts = _layout_tables(layout, x_BHSD.device)
    out = torch.empty((b, h, n, d), dtype=torch.float32, device=x_BHSD.device)
    sb, sh, ss, sd = x_BHSD.stride()
    _pool_kernel[(b * h, -(-n // tpp))](
        x_BHSD,
        out,
        valid,
        counts,
        h,
        n,
        sb,
        sh,
        ss,
        sd,
        D=d,
        DP=triton.next_power_of_2(d),
        T=TILE_TOKENS,
        TPP=tpp,
        MASKED=layout.needs_padding,
        num_warps=num_warps or POOL_WARPS,
    )
    return out


def _split_f64(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo float32: passes a float64 threshold through float32 kernel arguments."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def select_triton(
    src: torch.Tensor,
    *,
    mode: int,
    n_rows: int,
    n_cols: int,
    bh: int,
    threshold: float,
    scale: float = 1.0,
    sta_window: tuple[int, int, int] | None = None,
    layout: TileLayout | None = None,
    block_size: tuple[int, int] | None = None,
    out_shape: tuple[int, int] | None = None,
    tile_out: torch.Tensor | None = None,
    exact: int = 2,
    num_warps: int | None = None,
):
    """Run the selection kernel over `bh` groups of n_rows x n_cols rows of `src` (mode 0: raw
    coarse scores, softmax in the kernel; mode 1: probabilities). tile_out (uint8, src's shape)
    receives the tile keep mask. With block_size (and layout), returns the block lists
    (kv_num, kv_idx, full_num, full_idx) shaped out_shape + (blocks...): key blocks holding pad
    tokens go to the partial (kv_*) lists, every other kept block to the full lists."""
    if mode not in (0, 1):
        raise ValueError(f"mode must be 0 (scores) or 1 (probabilities), got {mode}")
    if block_size is not None and (layout is None or out_shape is None):
        raise ValueError("block lists need the layout and out_shape")
    device = src.device
    qt = kt = 1
    if block_size is not None:
        qt, kt = block_size[0] // TILE_TOKENS, block_size[1] // TILE_TOKENS
    nqb, nkb = -(-n_rows // qt), -(-n_cols // kt)
    block = triton.next_power_of_2(n_cols)
    dummy = torch.empty(1, dtype=torch.int32, device=device)
    if block_size is not None:
        assert layout is not None and out_shape is not None  # checked above; narrows for the type checker
        lists = (
            torch.empty((*out_shape, nqb), dtype=torch.int32, device=device),
            torch.empty((*out_shape, nqb, nkb), dtype=torch.int32, device=device),
            torch.empty((*out_shape, nqb), dtype=torch.int32, device=device),
            torch.empty((*out_shape, nqb, nkb), dtype=torch.int32, device=device),
        )
        pad = _pad_flags(layout, block_size[1], device)
    else:
        lists, pad = (dummy,) * 4, dummy
    sta = tuple(w // 2 for w in sta_window) if sta_window is not None else (0, 0, 0)
    tiles_h, tiles_w = (layout.tiles_h, layout.tiles_w) if layout is not None else (1, 1)
    n_frames = layout.frames if layout is not None else 1
    paired = layout is not None and layout.time_pairs
    warps = num_warps or (4 if block <= 2048 else (8 if block <= 8192 else 16))
    _select_kernel[(bh * nqb,)](
        src,
        tile_out if tile_out is not None else dummy,
        *lists,
        pad,
        n_rows,
        n_cols,
        nqb,
        nkb,
        float(scale),
        *_split_f64(min(threshold, 1.0)),
        int(threshold >= 1.0),
        *sta,
        tiles_h,
        tiles_w,
        n_frames,
        MODE=mode,
        PAIRED=paired,
        EXACT=exact,
        QT=qt,
        KT=kt,
        BLOCK=block,
        HAS_STA=sta_window is not None,
        WRITE_TILE=tile_out is not None,
        WRITE_BLOCKS=block_size is not None,
        KNOWN_TOTAL=mode == 0 and threshold < 0.99,
        num_warps=warps,
        **_NO_FMA,  # the same rounding in every specialisation: tile and fused paths agree bit for bit
    )
    return lists if block_size is not None else None


if triton is not None:

    @triton.jit
    def _pool_kernel(
        x_ptr,
        out_ptr,
        valid_ptr,
        count_ptr,
        H,
        n_tiles,
        s_b,
        s_h,
        s_s,
        s_d,
        D: tl.constexpr,
        DP: tl.constexpr,
        T: tl.constexpr,
        TPP: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        # One program per (batch*head, TPP tiles): sum 64 tokens x D in fp32, skip pads, divide.
        bh = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1).to(tl.int64) * TPP + tl.arange(0, TPP)  # [TPP]
        tvalid = tile < n_tiles
        t = tl.arange(0, T)
        d = tl.arange(0, DP)
        tok = tl.minimum(tile, n_tiles - 1)[:, None] * T + t[None, :]  # [TPP, T]
        ptrs = x_ptr + (bh // H) * s_b + (bh % H) * s_h + tok[:, :, None] * s_s + d[None, None, :] * s_d
        x = tl.load(ptrs, mask=d[None, None, :] < D, other=0.0).to(tl.float32)
        if MASKED:
            v = tl.load(valid_ptr + tok)
            x = tl.where(v[:, :, None] != 0, x, 0.0)
        total = tl.sum(x, 1)  # [TPP, DP]
        cnt = tl.load(count_ptr + tl.minimum(tile, n_tiles - 1))
        optr = out_ptr + (bh * n_tiles + tile)[:, None] * D + d[None, :]
        tl.store(optr, total / cnt[:, None], mask=tvalid[:, None] & (d[None, :] < D))

    @triton.jit
    def _bisect(bits, vals, lo, hi, thr):
        # The smallest bit pattern c in (lo, hi] with G(c) = sum(vals[bits > c]) < thr, given
        # G(lo) >= thr and G(hi) < thr; G only falls as c grows, so 31 halvings of a 31-bit range
        # find it exactly. One row: bits/vals [BLOCK], lo/hi scalars.
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            take = tl.sum(tl.where(bits > mid, vals, 0.0), 0) < thr
            hi = tl.where(take, mid, hi)
            lo = tl.where(take, lo, mid)
        return hi

    @triton.jit
    def _sum_pair(a0, a1, b0, b1):
        return a0 + b0, a1 + b1

    @triton.jit
    def _bisect_fast(bits, vals, lo, hi, thr):
        # The same search, stopping as soon as (lo, hi] holds one element (that element is the
        # answer: G is constant between elements); the count of elements in the upper half comes
        # from the same reduction as G. Needs G(lo) >= thr > G(hi); a bracket broken by fp32
        # rounding gives a wrong answer, which the caller's float64 check catches.
        cnt = tl.sum(((bits > lo) & (bits <= hi)).to(tl.int32), 0)
        steps = 0
        while (cnt > 1) & (hi - lo > 1) & (steps < 32):
            mid = lo + (hi - lo) // 2
            above = bits > mid
            g, upper = tl.reduce((tl.where(above, vals, 0.0), (above & (bits <= hi)).to(tl.int32)), 0, _sum_pair)
            take = g < thr
            cnt = tl.where(take, cnt - upper, upper)
            hi = tl.where(take, mid, hi)
            lo = tl.where(take, lo, mid)
            steps += 1
        return tl.min(tl.where((bits > lo) & (bits <= hi), bits, 2147483647), 0)

    @triton.jit
    def _store_lists(kept, nopad, bvalid, bcols, fn_ptr, fi_ptr, kvn_ptr, kvi_ptr, row, nkb):
        # Two stable partitions of the block columns, full (no pad key) and partial (pad keys):
        # selected columns first (ascending), then the rest, so every slot of both index rows is
        # written. One scan serves both lists (16-bit fields of one int32; rows have < 65,536
        # blocks), and a column's rank among the unselected ones is its index minus the selected
        # ones before it (every column below nkb is valid).
        full = (kept & nopad).to(tl.int32)
        part = (kept & (nopad == 0)).to(tl.int32)
        scan = tl.cumsum(full + (part << 16), 0)
        cnt = tl.sum(full + (part << 16), 0)
        for which in tl.static_range(2):
            if which == 0:
                sel, before, n_sel, num_ptr, idx_ptr = full, (scan & 0xFFFF) - full, cnt & 0xFFFF, fn_ptr, fi_ptr
            else:
                sel, before, n_sel, num_ptr, idx_ptr = part, (scan >> 16) - part, cnt >> 16, kvn_ptr, kvi_ptr
            slot = tl.where(sel != 0, before, n_sel + bcols - before)
            tl.store(idx_ptr + row * nkb + slot, bcols, mask=bvalid)
            tl.store(num_ptr + row, n_sel)

    @triton.jit
    def _tile_tij(idx, n_frames, tiles_h, tiles_w, PAIRED: tl.constexpr):
        # (frame, tile row, tile column) of tile position idx: layout.TileLayout's order.
        hw = tiles_h * tiles_w
        if PAIRED:  # (t // 2, i, j, t % 2) for the first 2*(F//2) frames, then the odd last frame
            e = (n_frames // 2) * 2
            head = idx < e * hw
            r = idx % (2 * hw)
            t = tl.where(head, (idx // (2 * hw)) * 2 + r % 2, e)
            s = tl.where(head, r // 2, idx - e * hw)
        else:
            t = idx // hw
            s = idx % hw
        return t, s // tiles_w, s % tiles_w

    @triton.jit
    def _select_kernel(
        src_ptr,
        tile_ptr,
        kvn_ptr,
        kvi_ptr,
        fn_ptr,
        fi_ptr,
        pad_ptr,
        n_rows,
        n_cols,
        nqb,
        nkb,
        scale,
        thr,
        thr_lo,
        keep_all,
        sta_t,
        sta_h,
        sta_w,
        tiles_h,
        tiles_w,
        n_frames,
        MODE: tl.constexpr,
        PAIRED: tl.constexpr,  # 0: raw scores (softmax here), 1: probabilities
        EXACT: tl.constexpr,  # 1: float64 bisection, 2: float32 search checked in float64, 0: float32 only
        QT: tl.constexpr,
        KT: tl.constexpr,
        BLOCK: tl.constexpr,
        HAS_STA: tl.constexpr,
        WRITE_TILE: tl.constexpr,
        WRITE_BLOCKS: tl.constexpr,
        KNOWN_TOTAL: tl.constexpr,
    ):
        # One program per query block (QT tile rows, one after the other: few live registers).
        pid = tl.program_id(0).to(tl.int64)
        grp = pid // nqb
        qb = pid % nqb
        cols = tl.arange(0, BLOCK)
        cmask = cols < n_cols
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for r in tl.static_range(QT):
            row = qb * QT + r
            rvalid = row < n_rows
            rowc = tl.minimum(row, n_rows - 1)
            off = (grp * n_rows + rowc) * n_cols
            if MODE == 0:
                x = tl.load(src_ptr + off + cols, mask=cmask, other=float("-inf")) * scale
                e = tl.where(cmask, tl.exp(x - tl.max(x, 0)), 0.0)
                # Normaliser summed in float64: the fp32 sum's rounding depends on the reduction
                # order, which the compiler picks per specialisation; this way the tile and the
                # block-list builds see the same probabilities.
                p = (e.to(tl.float64) * (1.0 / tl.sum(e.to(tl.float64), 0))).to(tl.float32)
            else:
                p = tl.load(src_ptr + off + cols, mask=cmask, other=0.0)
            p = tl.where(p > 0.0, p, 0.0)  # +0.0 for zeros, -0.0 and padding columns
            bits = p.to(tl.int32, bitcast=True)  # non-negative floats: integer order = value order
            top = tl.max(bits, 0)  # G(max) = 0 < thr; G(+0.0) = total mass >= thr unless `everything`
            thr64 = tl.sum(tl.zeros([1], tl.float64) + thr + thr_lo, 0)  # the threshold exactly (hi + lo)
            # KNOWN_TOTAL (softmax rows, threshold < 0.99): a softmax row sums to 1 within ~1e-6,
            # so the bracket's lower end uses 1 (0.999 slack; a broken bracket is caught by the
            # float64 check) and "keep everything" (total < threshold) cannot happen: two
            # reductions fewer per row.
            if KNOWN_TOTAL:
                total = 1.0
            else:
                total = tl.sum(p, 0)
            if EXACT == 1:  # plain bisection with float64 sums
                cut = _bisect(bits, p.to(tl.float64), top * 0, top, thr64)
            else:
                # float32 sums, bracket from G(t) >= total - n*t, early exit at one element left
                t0 = tl.maximum((total - thr) / n_cols * 0.999, 0.0)
                cut = _bisect_fast(bits, p, t0.to(tl.int32, bitcast=True), top, thr)
                if EXACT == 2:  # exact iff G64(cut) < thr <= G64(cut - 1); else redo in float64
                    p64 = p.to(tl.float64)
                    above, below = tl.reduce(
                        (tl.where(bits > cut, p64, 0.0), tl.where(bits > cut - 1, p64, 0.0)), 0, _sum_pair
                    )
                    if (above >= thr64) | (below < thr64):
                        cut = _bisect(bits, p64, top * 0, top, thr64)
            if KNOWN_TOTAL:
                everything = keep_all != 0
            else:
                everything = (tl.sum(p.to(tl.float64), 0) < thr64) | (keep_all != 0)
            keep = bits >= tl.where(everything, 0, cut)
            if HAS_STA:
                rt, ri, rj = _tile_tij(rowc, n_frames, tiles_h, tiles_w, PAIRED)
                ct, ci, cj = _tile_tij(cols, n_frames, tiles_h, tiles_w, PAIRED)
                dt, di, dj = tl.abs(rt - ct), tl.abs(ri - ci), tl.abs(rj - cj)
                keep = keep | ((dt <= sta_t) & (di <= sta_h) & (dj <= sta_w))
            keep = keep & cmask & rvalid
            if WRITE_TILE:
                tl.store(tile_ptr + off + cols, keep.to(tl.uint8), mask=cmask & rvalid)
            acc = acc | keep.to(tl.int32)
        if WRITE_BLOCKS:
            _write_lists(acc, pad_ptr, fn_ptr, fi_ptr, kvn_ptr, kvi_ptr, pid, nkb, KT, BLOCK)

    @triton.jit
    def _write_lists(acc, pad_ptr, fn_ptr, fi_ptr, kvn_ptr, kvi_ptr, row, nkb, KT: tl.constexpr, BLOCK: tl.constexpr):
        # acc: [BLOCK] nonzero where a tile column is kept by any query tile of this query block.
        if KT == 2:
            kb = tl.max(tl.reshape(acc, (BLOCK // 2, 2)), 1)  # OR over pairs of key tiles
            bcols = tl.arange(0, BLOCK // 2)
        else:
            kb = acc
            bcols = tl.arange(0, BLOCK)
        bvalid = bcols < nkb
        nopad = tl.load(pad_ptr + bcols, mask=bvalid, other=1) == 0
        kept = (kb != 0) & bvalid
        _store_lists(kept, nopad, bvalid, bcols, fn_ptr, fi_ptr, kvn_ptr, kvi_ptr, row, nkb)
