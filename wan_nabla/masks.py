"""Block masks for NABLA and STA, as pure functions of (inputs, layout, parameters).

    keep = nabla_tile_mask(q_BHSD, k_BHSD, layout, threshold=0.7)     # [B, H, n, n] bool
    keep |= sta_tile_mask(layout, (11, 3, 3), q_BHSD.device)          # [n, n] bool, cached
    bm = to_block_mask(keep, layout)                                   # FlexAttention BlockMask
    bm, density = nabla_block_mask(q_BHSD, k_BHSD, layout, 0.7, (11, 3, 3), (128, 64))  # all in one

NABLA (arXiv 2507.13546): mean-pool queries and keys over each 64-token tile (real tokens only),
take the coarse map P = softmax(q_bar k_bar^T / sqrt(D)) in float32 over key tiles, and per query
tile keep the most probable key tiles until their mass reaches `threshold`: tile j (in descending
order of probability) is kept iff the mass of the tiles before it is < threshold. threshold >= 1
keeps every tile.

Two implementations of that rule, chosen by `impl` ("auto": Triton for CUDA tensors, else torch):
- torch (reference, any device): one fp32 sort per row, cumulative sum, scatter back.
- Triton (CUDA): no sort. The kept set of a row is {p >= c}: the mass before an entry x is
  G(x) = sum of the entries > x, which only falls as x grows, so a search over the bit patterns of
  non-negative fp32 values (their integer order is their value order) finds the smallest c with
  G(c) < threshold. The search halves a bracket that starts at G(t) >= total - n*t, sums in
  float32, and stops once one element is left in it (7 steps on average, 31 at most); two float64
  sums then check the answer (G64(c) < threshold <= G64(c - 1)) and a float64 bisection redoes the
  rows that fail, so the result is the exact rule on the fp32 map. The sort path's fp32 cumulative
  sum can differ from it only where the mass before an entry lies within fp32 rounding (~1e-7) of
  the threshold. Exactly tied probabilities are kept or dropped together (a sort keeps an arbitrary
  subset). One program per query block does softmax (float64 normaliser, so every kernel
  specialisation sees the same map), the search, the OR with STA, the OR-coarsening to 128-token
  blocks and the compaction into BlockMask index lists: `nabla_block_mask` reads the coarse scores
  once. Pooling is a Triton kernel too (q and k read once, pads skipped without a masked copy);
  `to_block_mask` and `block_density` run the compaction part on a given keep mask.

STA (arXiv 2502.04507): query tile (t, i, j) attends key tile (t', i', j') iff |t - t'| <= wT // 2,
|i - i'| <= wH // 2 and |j - j'| <= wW // 2. Windows are truncated at borders. Static per
(layout, window, device), so it is built once and cached under that key.

`to_block_mask` turns a tile-level keep mask into a BlockMask: key blocks that contain pad tokens
go to the partial list, evaluated with a token mask (`valid[kv]`); every other kept block is a full
block that the kernel never masks. Blocks of 128 tokens (two tiles) on either side are an
OR-coarsening of the tile mask, which the flex kernel runs much faster than 64-token blocks on
Hopper (NABLA.md). Index lists hold the kept blocks first, ascending, then the others.
Limits: block sizes are 64 or 128 tokens; the whole batch shares one layout; the Triton path
handles up to 16,384 tiles per frame sequence (longer rows fall back to torch).
"""

from __future__ import annotations

import functools
import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from .layout import TILE_TOKENS, TileLayout
from .mask_triton import _launch_select, _pool_triton, triton  # triton is None on CPU-only installs


IMPLS = ("auto", "torch", "triton")
_MAX_TRITON_TILES = 16384


def triton_available() -> bool:
    return triton is not None


def _use_triton(x: torch.Tensor, impl: str, n: int | None = None) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not allowed; use one of {', '.join(IMPLS)}")
    if impl == "torch":
        return False
    if impl == "triton":
        if triton is None:
            raise RuntimeError("impl='triton' requested but triton is not installed; use impl='torch'")
        return True
    return triton is not None and x.is_cuda and (n is None or n <= _MAX_TRITON_TILES)


# ---- coarse map -----------------------------------------------------------------------------
def pool_tiles(x_BHSD: torch.Tensor, layout: TileLayout, impl: str = "auto") -> torch.Tensor:
    """Mean over the real tokens of each tile: [B, H, S_pad, D] -> [B, H, n_tiles, D] float32."""
    b, h, s, d = x_BHSD.shape
    if s != layout.padded_len:
        raise ValueError(f"expected {layout.padded_len} tokens in tile order, got {s}")
    if _use_triton(x_BHSD, impl):
        return _pool_triton(x_BHSD, layout)
    x = x_BHSD.view(b, h, layout.n_tiles, TILE_TOKENS, d)
    if layout.needs_padding:
        w = layout.valid(x.device).view(1, 1, layout.n_tiles, TILE_TOKENS, 1)
        x = x * w  # pad tokens carry real activations after the first block: never pool them
    return x.sum(dim=3, dtype=torch.float32) / layout.tile_counts(x.device).view(1, 1, -1, 1)


def coarse_map(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, layout: TileLayout, impl: str = "auto") -> torch.Tensor:
    """P = softmax(q_bar k_bar^T / sqrt(D)) over key tiles: [B, H, n, n] float32."""
    return torch.softmax(_coarse_scores(q_BHSD, k_BHSD, layout, impl) * _scale(q_BHSD), dim=-1)


def _scale(q_BHSD: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q_BHSD.shape[-1])


def _coarse_scores(q_BHSD, k_BHSD, layout: TileLayout, impl: str) -> torch.Tensor:
    """q_bar k_bar^T, unscaled: [B, H, n, n] float32 (cuBLAS fp32 on CUDA)."""
    qp, kp = pool_tiles(q_BHSD, layout, impl), pool_tiles(k_BHSD, layout, impl)
    return torch.matmul(qp, kp.transpose(-1, -2))


# ---- the CDF rule ---------------------------------------------------------------------------
def cdf_select(p: torch.Tensor, threshold: float, impl: str = "auto") -> torch.Tensor:
    """Per row keep the most probable entries until their sum reaches `threshold` (bool mask)."""
    if threshold >= 1.0:
        return torch.ones_like(p, dtype=torch.bool)
    if threshold <= 0.0:
        return torch.zeros_like(p, dtype=torch.bool)
    n = p.shape[-1]
    if _use_triton(p, impl, n):
        rows = p.reshape(-1, n).float().contiguous()
        out = torch.empty(rows.shape, dtype=torch.uint8, device=p.device)
        _launch_select(rows, mode=1, n_rows=rows.shape[0], n_cols=n, bh=1, threshold=threshold, tile_out=out)
        return out.view(torch.bool).view(p.shape)
    return cdf_select_sorted(p, threshold)


def cdf_select_sorted(p: torch.Tensor, threshold: float) -> torch.Tensor:
    """The reference rule: sort each row (fp32), cumulative sum, keep while mass before < threshold."""
    if threshold >= 1.0:
        return torch.ones_like(p, dtype=torch.bool)
    vals, order = torch.sort(p, dim=-1, descending=True)
    mass_before = torch.cumsum(vals, dim=-1) - vals
    keep_sorted = mass_before < threshold
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def cdf_select_bisect(p: torch.Tensor, threshold: float) -> torch.Tensor:
    """The Triton kernel's algorithm in plain torch (any device; for tests and reading).

    keep x iff G(x) = sum(p[p > x]) < threshold, found by bisection on the fp32 bit patterns."""
    if threshold >= 1.0:
        return torch.ones_like(p, dtype=torch.bool)
    if threshold <= 0.0:
        return torch.zeros_like(p, dtype=torch.bool)
    x = torch.where(p > 0, p.float(), torch.zeros((), device=p.device))
    bits, x64 = x.view(torch.int32), x.double()
    lo = torch.zeros(x.shape[:-1] + (1,), dtype=torch.int32, device=p.device)
    hi = bits.amax(-1, keepdim=True)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        take = torch.where(bits > mid, x64, 0.0).sum(-1, keepdim=True) < threshold
        hi, lo = torch.where(take, mid, hi), torch.where(take, lo, mid)
    cut = torch.where(x64.sum(-1, keepdim=True) < threshold, torch.zeros_like(hi), hi)
    return bits >= cut


def nabla_tile_mask(
    q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, layout: TileLayout, threshold: float, impl: str = "auto"
) -> torch.Tensor:
    """NABLA's adaptive keep mask over (query tile, key tile): [B, H, n, n] bool."""
    n = layout.n_tiles
    if threshold < 1.0 and _use_triton(q_BHSD, impl, n):
        scores = _coarse_scores(q_BHSD, k_BHSD, layout, impl)
        b, h = scores.shape[:2]
        out = torch.empty((b, h, n, n), dtype=torch.uint8, device=q_BHSD.device)
        _launch_select(scores, mode=0, n_rows=n, n_cols=n, bh=b * h, threshold=threshold,
                       scale=_scale(q_BHSD), tile_out=out)
        return out.view(torch.bool)
    return cdf_select_sorted(coarse_map(q_BHSD, k_BHSD, layout, "torch"), threshold)


def nabla_block_mask(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    layout: TileLayout,
    threshold: float,
    sta_window: tuple[int, int, int] | None = None,
    block_size: tuple[int, int] = (TILE_TOKENS, TILE_TOKENS),
    impl: str = "auto",
) -> tuple[BlockMask, torch.Tensor]:
    """(BlockMask, kept-block density as a 0-d device tensor) for NABLA, optionally OR STA.

    Same result as to_block_mask(nabla_tile_mask(...) | sta_tile_mask(...)) with block_density;
    on CUDA one Triton pass goes from the coarse scores straight to the BlockMask index lists."""
    _check_blocks(block_size)
    n = layout.n_tiles
    device = q_BHSD.device
    if not _use_triton(q_BHSD, impl, n):
        keep = nabla_tile_mask(q_BHSD, k_BHSD, layout, threshold, impl="torch")
        if sta_window is not None:
            keep = keep | sta_tile_mask(layout, sta_window, device)
        return to_block_mask(keep, layout, block_size, impl="torch"), block_density(keep, block_size)
    scores = _coarse_scores(q_BHSD, k_BHSD, layout, impl)
    b, h = scores.shape[:2]
    lists = _launch_select(
        scores, mode=0, n_rows=n, n_cols=n, bh=b * h, threshold=threshold, scale=_scale(q_BHSD),
        sta_window=sta_window, layout=layout, block_size=block_size, out_shape=(b, h),
    )
    return _block_mask_from_lists(lists, layout, block_size), _lists_density(lists)


# ---- STA ------------------------------------------------------------------------------------
def sta_tile_mask(layout: TileLayout, window: tuple[int, int, int], device: torch.device | str) -> torch.Tensor:
    """Sliding tile attention keep mask [n, n] bool in the layout's tile order (static; cached per
    layout, window and device)."""
    return _sta_cached(layout, tuple(int(w) for w in window), torch.device(device))


@functools.lru_cache(maxsize=32)
def _sta_cached(layout: TileLayout, window: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    coords = layout.tile_coords(device)
    delta = (coords[:, None, :] - coords[None, :, :]).abs()
    half = torch.tensor([w // 2 for w in window], device=device)
    return (delta <= half).all(dim=-1)


# ---- BlockMask construction -----------------------------------------------------------------
def _check_blocks(block_size: tuple[int, int]) -> None:
    bq, bkv = block_size
    if bq not in (TILE_TOKENS, 2 * TILE_TOKENS) or bkv not in (TILE_TOKENS, 2 * TILE_TOKENS):
        raise ValueError(f"block sizes must be {TILE_TOKENS} or {2 * TILE_TOKENS} tokens, got {block_size}")


def _compact_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [..., n] -> (count [...] int32, indices [..., n] int32 with kept columns first, ascending)."""
    n = keep.shape[-1]
    count = keep.sum(-1, dtype=torch.int32)
    slot = torch.cumsum(keep, dim=-1, dtype=torch.int32) - 1
    # Dropped columns write to a spare slot n, which is cut off afterwards.
    slot = torch.where(keep, slot, torch.full_like(slot, n)).long()
    cols = torch.arange(n, device=keep.device, dtype=torch.int32).expand_as(slot)
    out = torch.zeros(*keep.shape[:-1], n + 1, dtype=torch.int32, device=keep.device)
    out.scatter_(-1, slot, cols)
    return count, out[..., :n].contiguous()


def coarsen(keep_BHnn: torch.Tensor, q_tiles: int, kv_tiles: int) -> torch.Tensor:
    """OR-pool a tile keep mask into blocks of q_tiles x kv_tiles tiles (the last block may be short)."""
    if q_tiles == 1 and kv_tiles == 1:
        return keep_BHnn
    *lead, nq, nk = keep_BHnn.shape
    mq, mk = -(-nq // q_tiles), -(-nk // kv_tiles)
    padded = torch.nn.functional.pad(keep_BHnn, (0, mk * kv_tiles - nk, 0, mq * q_tiles - nq))
    return padded.view(*lead, mq, q_tiles, mk, kv_tiles).any(dim=-1).any(dim=-2)


def to_block_mask(
    keep_BHnn: torch.Tensor,
    layout: TileLayout,
    block_size: tuple[int, int] = (TILE_TOKENS, TILE_TOKENS),
    impl: str = "auto",
) -> BlockMask:
    """Tile keep mask [B|1, H|1, n, n] -> BlockMask over the padded tile-order sequence.

    With 128-token blocks a block is kept if any of its tile pairs is kept (`coarsen`)."""
    if keep_BHnn.dim() == 2:
        keep_BHnn = keep_BHnn[None, None]
    _check_blocks(block_size)
    bq, bkv = block_size
    n = keep_BHnn.shape[-1]
    if _use_triton(keep_BHnn, impl, n):
        b, h = keep_BHnn.shape[:2]
        src = keep_BHnn.to(torch.bool).contiguous().view(torch.uint8)
        lists = _launch_select(src, mode=2, n_rows=n, n_cols=n, bh=b * h, threshold=1.0,
                               layout=layout, block_size=block_size, out_shape=(b, h))
        return _block_mask_from_lists(lists, layout, block_size)
    keep = coarsen(keep_BHnn, bq // TILE_TOKENS, bkv // TILE_TOKENS)
    device = keep.device
    has_pad = _block_has_pad(layout, bkv, device)[: keep.shape[-1]]
    partial = keep & has_pad
    full = keep & ~has_pad
    kv_num, kv_idx = _compact_indices(partial)
    full_num, full_idx = _compact_indices(full)
    return _block_mask_from_lists((kv_num, kv_idx, full_num, full_idx), layout, block_size)


def _block_mask_from_lists(lists, layout: TileLayout, block_size: tuple[int, int]) -> BlockMask:
    kv_num, kv_idx, full_num, full_idx = lists
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=tuple(block_size),
        mask_mod=key_padding_mask_mod(layout, kv_idx.device),
        seq_lengths=(layout.padded_len, layout.padded_len),
        compute_q_blocks=False,
    )


def _lists_density(lists) -> torch.Tensor:
    kv_num, kv_idx, full_num, _ = lists
    total = kv_num.numel() * kv_idx.shape[-1]
    return (kv_num.sum(dtype=torch.int64) + full_num.sum(dtype=torch.int64)).float() / total


def _block_has_pad(layout: TileLayout, bkv: int, device: torch.device) -> torch.Tensor:
    """[n_kv_blocks (+1)] bool: key blocks holding a pad token or reaching past the sequence end."""
    valid = _valid_padded(layout, torch.device(device))
    return ~valid.view(-1, bkv).all(-1)


def key_padding_mask_mod(layout: TileLayout, device: torch.device | str):
    """mask_mod that hides pad keys; one function object per (layout, device) so compiled flex
    sees the same closure every call and never recompiles."""
    return _mask_mod_cached(layout, torch.device(device))


_MAX_BLOCK = 128


@functools.lru_cache(maxsize=64)
def _valid_padded(layout: TileLayout, device: torch.device) -> torch.Tensor:
    """layout.valid() extended with False up to a multiple of the largest block (no OOB reads)."""
    valid = layout.valid(device)
    extra = -len(valid) % _MAX_BLOCK
    return torch.cat([valid, valid.new_zeros(extra)]) if extra else valid


@functools.lru_cache(maxsize=64)
def _pad_flags(layout: TileLayout, bkv: int, device: torch.device) -> torch.Tensor:
    return _block_has_pad(layout, bkv, device).to(torch.uint8).contiguous()


@functools.lru_cache(maxsize=64)
def _mask_mod_cached(layout: TileLayout, device: torch.device):
    valid = _valid_padded(layout, device)

    def mask_mod(b, h, q_idx, kv_idx):
        return valid[kv_idx]

    return mask_mod


def block_density(keep_BHnn: torch.Tensor, block_size: tuple[int, int] = (TILE_TOKENS, TILE_TOKENS)) -> torch.Tensor:
    """Kept share of (query block, key block) pairs at the kernel's geometry, averaged over batch
    and heads (0-d float tensor): the fraction of the dense attention work the kernel does."""
    if keep_BHnn.dim() == 2:
        keep_BHnn = keep_BHnn[None, None]
    n = keep_BHnn.shape[-1]
    if _use_triton(keep_BHnn, "auto", n):
        b, h = keep_BHnn.shape[:2]
        src = keep_BHnn.to(torch.bool).contiguous().view(torch.uint8)
        kv_num, _, full_num, _ = _launch_select(src, mode=2, n_rows=n, n_cols=n, bh=b * h, threshold=1.0,
                                                layout=None, block_size=block_size, out_shape=(b, h),
                                                counts_only=True)
        nkb = -(-n // (block_size[1] // TILE_TOKENS))
        return (kv_num.sum(dtype=torch.int64) + full_num.sum(dtype=torch.int64)).float() / (kv_num.numel() * nkb)
    blocks = coarsen(keep_BHnn, block_size[0] // TILE_TOKENS, block_size[1] // TILE_TOKENS)
    return torch.count_nonzero(blocks).float() / blocks.numel()

