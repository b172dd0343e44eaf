"""Block masks for NABLA and STA, as pure functions of (config, q/k, layout, block size).

    plan = plan_blocks(config, q_BHSD, k_BHSD, layout, block_size=(128, 64))   # the one rule
    plan.block_mask()        # FlexAttention BlockMask over the padded tile-order sequence
    plan.density             # kept share of (query block, key block) pairs, 0-d device tensor
    keep = tile_keep_mask(config, q_BHSD, k_BHSD, layout)    # [B, H, n, n] bool (tile level)

`plan_blocks` is the only place that decides which blocks a config keeps: the attention
processors, the benchmarks and the compare tool all call it (or `tile_keep_mask`, its tile-level
half). Its result is a set of block index lists that any block-sparse kernel can consume.

NABLA (arXiv 2507.13546): mean-pool queries and keys over each 64-token tile (real tokens only),
take the coarse map P = softmax(q_bar k_bar^T / sqrt(D)) in float32 over key tiles, and per query
tile keep the most probable key tiles until their mass reaches `threshold`: tile j (in descending
order of probability) is kept iff the mass of the tiles before it is < threshold. threshold >= 1
keeps every tile.

Two implementations of that rule, chosen by `impl` ("auto": Triton for CUDA tensors, else torch):
- torch (reference, any device): one fp32 sort per row, cumulative sum, scatter back.
- Triton (CUDA, triton/mask_kernels.py): no sort. The kept set of a row is {p >= c}: the mass before an
  entry x is G(x) = sum of the entries > x, which only falls as x grows, so a search over the bit
  patterns of non-negative fp32 values (their integer order is their value order) finds the
  smallest c with G(c) < threshold. The search halves a bracket that starts at
  G(t) >= total - n*t, sums in float32, and stops once one element is left in it (7 steps on
  average, 31 at most); two float64 sums then check the answer (G64(c) < threshold <= G64(c - 1))
  and a float64 bisection redoes the rows that fail, so the result is the exact rule on the fp32
  map. The sort path's fp32 cumulative sum can differ from it only where the mass before an entry
  lies within fp32 rounding (~1e-7) of the threshold. Exactly tied probabilities are kept or
  dropped together (a sort keeps an arbitrary subset). One program per query block does the
  softmax (float64 normaliser, so every kernel specialisation sees the same map), the search, the
  OR with STA, the OR-coarsening to 128-token blocks and the compaction into index lists, so the
  coarse scores are read once. Pooling is a Triton kernel too (q and k read once, pads skipped).
  The scores q_bar k_bar^T stay a cuBLAS fp32 product: a Triton 3xTF32 kernel was 0.1-0.15 ms
  faster on an H100 but changed more tile decisions against a float64 map (benchmarks/NOTES.md).

STA (arXiv 2502.04507): query tile (t, i, j) attends key tile (t', i', j') iff |t - t'| <= wT // 2,
|i - i'| <= wH // 2 and |j - j'| <= wW // 2. Windows are truncated at borders. Static per
(layout, window, block size, device), so it is built once and cached under that key.

Block lists: key blocks that contain pad tokens go to the partial lists (kv_num/kv_idx), where the
kernel applies a token mask (`valid[kv]`); every other kept block is a full block that the kernel
never masks. Blocks of 128 tokens (two tiles) on either side are an OR-coarsening of the tile mask
(never fewer pairs than the rule chose): the kernels run them much faster than 64-token blocks on
Hopper (docs/design.md). Index rows hold the kept blocks first, ascending, then the others.
Limits: block sizes are 64 or 128 tokens; the whole batch shares one layout; the Triton path
handles up to 16,384 tiles (longer rows fall back to torch).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask

from .config import AttentionConfig
from .layout import MAX_BLOCK, TILE_TOKENS, TileLayout
from .triton.mask_kernels import TRITON, pool_tiles_triton, select_triton

IMPLS = ("auto", "torch", "triton")
MAX_TRITON_TILES = 16384


def use_triton(x: torch.Tensor, impl: str = "auto", n: int | None = None) -> bool:
    """Whether `impl` resolves to the Triton kernels for a tensor on x's device (rows of n tiles)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not allowed; use one of {', '.join(IMPLS)}")
    if impl == "torch":
        return False
    if impl == "triton":
        if TRITON is None:
            raise RuntimeError("impl='triton' requested but triton is not installed; use impl='torch'")
        return True
    return TRITON is not None and x.is_cuda and (n is None or n <= MAX_TRITON_TILES)


# ---- coarse map -----------------------------------------------------------------------------
def pool_tiles(x_BHSD: torch.Tensor, layout: TileLayout, impl: str = "auto") -> torch.Tensor:
    """Mean over the real tokens of each tile: [B, H, S_pad, D] -> [B, H, n_tiles, D] float32."""
    b, h, s, d = x_BHSD.shape
    if s != layout.padded_len:
        raise ValueError(f"expected {layout.padded_len} tokens in tile order, got {s}")
    if use_triton(x_BHSD, impl):
        return pool_tiles_triton(x_BHSD, layout)
    x = x_BHSD.view(b, h, layout.n_tiles, TILE_TOKENS, d)
    if layout.needs_padding:
        w = layout.valid(x.device).view(1, 1, layout.n_tiles, TILE_TOKENS, 1)
        x = x * w  # pad tokens carry real activations after the first block: never pool them
    return x.sum(dim=3, dtype=torch.float32) / layout.tile_counts(x.device).view(1, 1, -1, 1)


def softmax_scale(q_BHSD: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q_BHSD.shape[-1])


def coarse_scores(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, layout: TileLayout, impl: str = "auto") -> torch.Tensor:
    """q_bar k_bar^T, unscaled: [B, H, n, n] float32 (cuBLAS fp32 on CUDA)."""
    qp, kp = pool_tiles(q_BHSD, layout, impl), pool_tiles(k_BHSD, layout, impl)
    return torch.matmul(qp, kp.transpose(-1, -2))


def coarse_map(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, layout: TileLayout, impl: str = "auto") -> torch.Tensor:
    """P = softmax(q_bar k_bar^T / sqrt(D)) over key tiles: [B, H, n, n] float32."""
    return torch.softmax(coarse_scores(q_BHSD, k_BHSD, layout, impl) * softmax_scale(q_BHSD), dim=-1)


# ---- the CDF rule ---------------------------------------------------------------------------
def cdf_select(p: torch.Tensor, threshold: float, impl: str = "auto") -> torch.Tensor:
    """Per row keep the most probable entries until their sum reaches `threshold` (bool mask)."""
    if threshold >= 1.0:
        return torch.ones_like(p, dtype=torch.bool)
    if threshold <= 0.0:
        return torch.zeros_like(p, dtype=torch.bool)
    n = p.shape[-1]
    if use_triton(p, impl, n):
        rows = p.reshape(-1, n).float().contiguous()
        out = torch.empty(rows.shape, dtype=torch.uint8, device=p.device)
        select_triton(rows, mode=1, n_rows=rows.shape[0], n_cols=n, bh=1, threshold=threshold, tile_out=out)
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
    if threshold < 1.0 and use_triton(q_BHSD, impl, n):
        scores = coarse_scores(q_BHSD, k_BHSD, layout, impl)
        b, h = scores.shape[:2]
        out = torch.empty((b, h, n, n), dtype=torch.uint8, device=q_BHSD.device)
        select_triton(
            scores, mode=0, n_rows=n, n_cols=n, bh=b * h, threshold=threshold, scale=softmax_scale(q_BHSD), tile_out=out
        )
        return out.view(torch.bool)
    return cdf_select_sorted(coarse_map(q_BHSD, k_BHSD, layout, "torch"), threshold)


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


# ---- the one rule: config + q/k + layout -> kept tiles / blocks --------------------------------
def tile_keep_mask(
    config: AttentionConfig,
    q_BHSD: torch.Tensor | None,
    k_BHSD: torch.Tensor | None,
    layout: TileLayout,
    impl: str = "auto",
) -> torch.Tensor:
    """The tile pairs `config` keeps: [B, H, n, n] bool for NABLA (and NABLA | STA), [n, n] for STA."""
    if config.type == "full":
        raise ValueError("attention type 'full' has no tile mask; it runs dense attention")
    keep = None
    if config.type in ("nabla", "nabla_sta"):
        q, k, threshold = _nabla_inputs(config, q_BHSD, k_BHSD)
        keep = nabla_tile_mask(q, k, layout, threshold, impl)
    if config.type in ("sta", "nabla_sta"):
        sta = sta_tile_mask(layout, _sta_window(config), layout_device(q_BHSD))
        keep = sta if keep is None else keep | sta
    if keep is None:
        raise ValueError(f"attention type {config.type!r} has no tile mask")
    return keep


def _nabla_inputs(
    config: AttentionConfig, q_BHSD: torch.Tensor | None, k_BHSD: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """q, k and the threshold a NABLA mask reads (a validated NABLA config always has the threshold)."""
    if q_BHSD is None or k_BHSD is None or config.threshold is None:
        raise ValueError(f"attention type {config.type!r} needs q, k and a threshold")
    return q_BHSD, k_BHSD, config.threshold


def _sta_window(config: AttentionConfig) -> tuple[int, int, int]:
    if config.sta_window is None:
        raise ValueError(f"attention type {config.type!r} needs sta_window")
    return (int(config.sta_window[0]), int(config.sta_window[1]), int(config.sta_window[2]))


def _pair(block_size) -> tuple[int, int]:
    """(q, kv) block size as a hashable int pair (callers may pass a list)."""
    return (int(block_size[0]), int(block_size[1]))


def layout_device(x: torch.Tensor | None) -> torch.device:
    return x.device if x is not None else torch.device("cpu")


@dataclass(frozen=True)
class BlockPlan:
    """The kept (query block, key block) pairs of one attention call, as index lists.

    Shapes: kv_num / full_num [B|1, H|1, n_q_blocks] int32; kv_idx / full_idx
    [B|1, H|1, n_q_blocks, n_kv_blocks] int32, kept blocks first (ascending), then the others.
    kv_* are key blocks holding pad tokens (a token mask applies), full_* all other kept blocks.
    These are FlexAttention's BlockMask tables and FA4's block-sparse tensors alike."""

    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    full_num: torch.Tensor
    full_idx: torch.Tensor
    block_size: tuple[int, int]
    layout: TileLayout
    density: torch.Tensor
    """Kept share of block pairs averaged over batch and heads (0-d float32 device tensor): the
    fraction of the dense attention work the kernel does."""

    def block_mask(self) -> BlockMask:
        """FlexAttention BlockMask over the padded tile-order sequence (pad keys masked); built once
        per plan (a cached STA plan hands out the same BlockMask every call)."""
        cached = self.__dict__.get("_block_mask")
        if cached is None:
            cached = self.__dict__["_block_mask"] = self._make_block_mask()
        return cached

    def _make_block_mask(self) -> BlockMask:
        return BlockMask.from_kv_blocks(
            self.kv_num,
            self.kv_idx,
            self.full_num,
            self.full_idx,
            BLOCK_SIZE=_pair(self.block_size),
            mask_mod=key_padding_mask_mod(self.layout, self.kv_idx.device),
            seq_lengths=(self.layout.padded_len, self.layout.padded_len),
            compute_q_blocks=False,
        )


def plan_blocks(
    config: AttentionConfig,
    q_BHSD: torch.Tensor | None,
    k_BHSD: torch.Tensor | None,
    layout: TileLayout,
    block_size: tuple[int, int] = (TILE_TOKENS, TILE_TOKENS),
    impl: str = "auto",
    pooled: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> BlockPlan:
    """The blocks `config` keeps for these q/k (see module doc). STA alone ignores q/k and returns
    the cached plan of its (layout, window, block size, device); NABLA on CUDA runs one Triton pass
    from the coarse scores to the lists, elsewhere the torch tile mask is compacted. `pooled`:
    the tile means of q and k ([B, H, n, D] float32) when the caller has them already (rotary.py
    pools inside the rotary kernel); used on the Triton path, where they stand for pool_tiles."""
    check_block_size(block_size)
    if config.type == "full":
        raise ValueError("attention type 'full' has no block plan; it runs dense attention")
    device = layout_device(q_BHSD)
    if config.type == "sta":
        return _sta_plan(layout, _sta_window(config), _pair(block_size), device)
    n = layout.n_tiles
    window = _sta_window(config) if config.type == "nabla_sta" else None
    q, k, threshold = _nabla_inputs(config, q_BHSD, k_BHSD)
    if use_triton(q, impl, n) and threshold < 1.0:
        if pooled is not None:
            scores = torch.matmul(pooled[0], pooled[1].transpose(-1, -2))
        else:
            scores = coarse_scores(q, k, layout, impl)
        b, h = scores.shape[:2]
        lists = select_triton(
            scores,
            mode=0,
            n_rows=n,
            n_cols=n,
            bh=b * h,
            threshold=threshold,
            scale=softmax_scale(q),
            sta_window=window,
            layout=layout,
            block_size=block_size,
            out_shape=(b, h),
        )
        return _plan_from_lists(lists, layout, block_size)
    keep = tile_keep_mask(config, q_BHSD, k_BHSD, layout, "torch" if impl == "auto" else impl)
    return plan_from_keep(keep, layout, block_size)


@functools.lru_cache(maxsize=32)
def _sta_plan(
    layout: TileLayout, window: tuple[int, int, int], block_size: tuple[int, int], device: torch.device
) -> BlockPlan:
    return plan_from_keep(sta_tile_mask(layout, window, device), layout, block_size)


# ---- block lists from a tile mask -----------------------------------------------------------
def check_block_size(block_size: tuple[int, int]) -> None:
    bq, bkv = block_size
    if bq not in (TILE_TOKENS, MAX_BLOCK) or bkv not in (TILE_TOKENS, MAX_BLOCK):
        raise ValueError(f"block sizes must be {TILE_TOKENS} or {MAX_BLOCK} tokens, got {tuple(block_size)}")


def coarsen(keep_BHnn: torch.Tensor, q_tiles: int, kv_tiles: int) -> torch.Tensor:
    """OR-pool a tile keep mask into blocks of q_tiles x kv_tiles tiles (the last block may be short)."""
    if q_tiles == 1 and kv_tiles == 1:
        return keep_BHnn
    *lead, nq, nk = keep_BHnn.shape
    mq, mk = -(-nq // q_tiles), -(-nk // kv_tiles)
    padded = torch.nn.functional.pad(keep_BHnn, (0, mk * kv_tiles - nk, 0, mq * q_tiles - nq))
    return padded.view(*lead, mq, q_tiles, mk, kv_tiles).any(dim=-1).any(dim=-2)


def _compact_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [..., n] -> (count [...] int32, indices [..., n] int32 with kept columns first, ascending)."""
    n = keep.shape[-1]
    count = keep.sum(-1, dtype=torch.int32)
    slot = torch.cumsum(keep, dim=-1, dtype=torch.int32) - 1
    # Dropped columns go after the kept ones, in ascending order, so every slot is written.
    rest = torch.cumsum(~keep, dim=-1, dtype=torch.int32) - 1 + count[..., None]
    slot = torch.where(keep, slot, rest).long()
    cols = torch.arange(n, device=keep.device, dtype=torch.int32).expand_as(slot)
    out = torch.empty(*keep.shape[:-1], n, dtype=torch.int32, device=keep.device)
    out.scatter_(-1, slot, cols)
    return count, out


def plan_from_keep(
    keep_BHnn: torch.Tensor, layout: TileLayout, block_size: tuple[int, int] = (TILE_TOKENS, TILE_TOKENS)
) -> BlockPlan:
    """Tile keep mask [B|1, H|1, n, n] (or [n, n]) -> BlockPlan at `block_size` (torch, any device).

    With 128-token blocks a block is kept if any of its tile pairs is kept (`coarsen`)."""
    if keep_BHnn.dim() == 2:
        keep_BHnn = keep_BHnn[None, None]
    check_block_size(block_size)
    bq, bkv = block_size
    keep = coarsen(keep_BHnn, bq // TILE_TOKENS, bkv // TILE_TOKENS)
    has_pad = layout.key_block_has_pad(bkv, keep.device)
    kv_num, kv_idx = _compact_indices(keep & has_pad)
    full_num, full_idx = _compact_indices(keep & ~has_pad)
    return _plan_from_lists((kv_num, kv_idx, full_num, full_idx), layout, block_size)


def to_block_mask(
    keep_BHnn: torch.Tensor, layout: TileLayout, block_size: tuple[int, int] = (TILE_TOKENS, TILE_TOKENS)
) -> BlockMask:
    """Tile keep mask -> FlexAttention BlockMask (plan_from_keep(...).block_mask())."""
    return plan_from_keep(keep_BHnn, layout, block_size).block_mask()


def _plan_from_lists(lists, layout: TileLayout, block_size: tuple[int, int]) -> BlockPlan:
    kv_num, kv_idx, full_num, full_idx = lists
    total = kv_num.numel() * kv_idx.shape[-1]
    density = (kv_num.sum(dtype=torch.int64) + full_num.sum(dtype=torch.int64)).float() / total
    return BlockPlan(kv_num, kv_idx, full_num, full_idx, _pair(block_size), layout, density)


def block_density(keep_BHnn: torch.Tensor, block_size: tuple[int, int] = (TILE_TOKENS, TILE_TOKENS)) -> torch.Tensor:
    """Kept share of (query block, key block) pairs of a tile mask at a kernel geometry (0-d)."""
    if keep_BHnn.dim() == 2:
        keep_BHnn = keep_BHnn[None, None]
    blocks = coarsen(keep_BHnn, block_size[0] // TILE_TOKENS, block_size[1] // TILE_TOKENS)
    return torch.count_nonzero(blocks).float() / blocks.numel()


# ---- pad keys -------------------------------------------------------------------------------
def key_padding_mask_mod(layout: TileLayout, device: torch.device | str):
    """mask_mod that hides pad keys; one function object per (layout, device) so compiled flex
    sees the same closure every call and never recompiles."""
    return _mask_mod_cached(layout, torch.device(device))


@functools.lru_cache(maxsize=64)
def _mask_mod_cached(layout: TileLayout, device: torch.device):
    valid = layout.valid_padded(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return valid[kv_idx]

    return mask_mod
