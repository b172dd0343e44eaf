"""Block masks for NABLA and STA, as pure functions of (inputs, layout, parameters).

    keep = nabla_tile_mask(q_BHSD, k_BHSD, layout, threshold=0.7)     # [B, H, n, n] bool
    keep |= sta_tile_mask(layout, (11, 3, 3), q_BHSD.device)          # [n, n] bool, cached
    bm = to_block_mask(keep, layout)                                   # FlexAttention BlockMask

NABLA (arXiv 2507.13546): mean-pool queries and keys over each 64-token tile (real tokens only),
take the coarse map P = softmax(q_bar k_bar^T / sqrt(D)) in float32 over key tiles, and per query
tile keep the most probable key tiles until their mass reaches `threshold`: tile j (in descending
order of probability) is kept iff the mass of the tiles before it is < threshold. threshold >= 1
keeps every tile. The selection uses one sort per row (fp32), not the published three bf16 sorts.

STA (arXiv 2502.04507): query tile (t, i, j) attends key tile (t', i', j') iff |t - t'| <= wT // 2,
|i - i'| <= wH // 2 and |j - j'| <= wW // 2. Windows are truncated at borders. Static per
(layout, window, device), so it is built once and cached under that key.

`to_block_mask` turns a tile-level keep mask into a BlockMask: key tiles that contain pad tokens
go to the partial list, evaluated with a token mask (`valid[kv]`); every other kept tile is a full
block that the kernel never masks. Indices are built with a cumulative-sum scatter, no sort.
Blocks of 128 tokens (two tiles) on either side are an OR-coarsening of the tile mask, which the
flex kernel runs much faster than 64-token blocks on Hopper (NABLA.md).
Limits: block sizes are 64 or 128 tokens; the whole batch shares one layout.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from .layout import TILE_TOKENS, TileLayout


def pool_tiles(x_BHSD: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Mean over the real tokens of each tile: [B, H, S_pad, D] -> [B, H, n_tiles, D] float32."""
    b, h, s, d = x_BHSD.shape
    if s != layout.padded_len:
        raise ValueError(f"expected {layout.padded_len} tokens in tile order, got {s}")
    x = x_BHSD.view(b, h, layout.n_tiles, TILE_TOKENS, d)
    if layout.needs_padding:
        w = layout.valid(x.device).view(1, 1, layout.n_tiles, TILE_TOKENS, 1)
        x = x * w  # pads are zero by construction; multiply anyway so pooling never depends on it
    return x.sum(dim=3, dtype=torch.float32) / layout.tile_counts(x.device).view(1, 1, -1, 1)


def coarse_map(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """P = softmax(q_bar k_bar^T / sqrt(D)) over key tiles: [B, H, n, n] float32."""
    qp, kp = pool_tiles(q_BHSD, layout), pool_tiles(k_BHSD, layout)
    scores = torch.matmul(qp, kp.transpose(-1, -2)) * (1.0 / math.sqrt(q_BHSD.shape[-1]))
    return torch.softmax(scores, dim=-1)


def cdf_select(p: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per row keep the most probable entries until their sum reaches `threshold` (bool mask)."""
    if threshold >= 1.0:
        return torch.ones_like(p, dtype=torch.bool)
    vals, order = torch.sort(p, dim=-1, descending=True)
    mass_before = torch.cumsum(vals, dim=-1) - vals
    keep_sorted = mass_before < threshold
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def nabla_tile_mask(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, layout: TileLayout, threshold: float) -> torch.Tensor:
    """NABLA's adaptive keep mask over (query tile, key tile): [B, H, n, n] bool."""
    return cdf_select(coarse_map(q_BHSD, k_BHSD, layout), threshold)


def sta_tile_mask(layout: TileLayout, window: tuple[int, int, int], device: torch.device | str) -> torch.Tensor:
    """Sliding tile attention keep mask [n, n] bool (static; cached per layout/window/device)."""
    return _sta_cached(layout.tile_grid, tuple(int(w) for w in window), torch.device(device))


@functools.lru_cache(maxsize=32)
def _sta_cached(tile_grid: tuple[int, int, int], window: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    nt, nh, nw = tile_grid
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(nt, device=device), torch.arange(nh, device=device), torch.arange(nw, device=device),
            indexing="ij",
        ),
        dim=-1,
    ).reshape(-1, 3)
    delta = (coords[:, None, :] - coords[None, :, :]).abs()
    half = torch.tensor([w // 2 for w in window], device=device)
    return (delta <= half).all(dim=-1)


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
    keep_BHnn: torch.Tensor, layout: TileLayout, block_size: tuple[int, int] = (TILE_TOKENS, TILE_TOKENS)
) -> BlockMask:
    """Tile keep mask [B|1, H|1, n, n] -> BlockMask over the padded tile-order sequence.

    With 128-token blocks a block is kept if any of its tile pairs is kept (`coarsen`)."""
    if keep_BHnn.dim() == 2:
        keep_BHnn = keep_BHnn[None, None]
    bq, bkv = block_size
    if bq % TILE_TOKENS or bkv % TILE_TOKENS:
        raise ValueError(f"block sizes must be multiples of {TILE_TOKENS}, got {block_size}")
    keep = coarsen(keep_BHnn, bq // TILE_TOKENS, bkv // TILE_TOKENS)
    device = keep.device
    has_pad = _block_has_pad(layout, bkv, device)
    partial = keep & has_pad
    full = keep & ~has_pad
    kv_num, kv_idx = _compact_indices(partial)
    full_num, full_idx = _compact_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(bq, bkv),
        mask_mod=key_padding_mask_mod(layout, device),
        seq_lengths=(layout.padded_len, layout.padded_len),
        compute_q_blocks=False,
    )


def _block_has_pad(layout: TileLayout, bkv: int, device: torch.device) -> torch.Tensor:
    """[n_kv_blocks] bool: key blocks holding a pad token or reaching past the sequence end."""
    n_blocks = -(-layout.padded_len // bkv)
    valid = _valid_padded(layout, torch.device(device))[: n_blocks * bkv]
    return ~valid.view(n_blocks, bkv).all(-1)


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
    return coarsen(keep_BHnn, block_size[0] // TILE_TOKENS, block_size[1] // TILE_TOKENS).float().mean()
