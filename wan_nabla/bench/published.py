"""The published-style NABLA peer baseline, rebuilt from the paper's public code as it runs there.

    bm = published_block_mask(q_BHSD, k_BHSD, layout, threshold=0.4, sta_window=(11, 3, 3))
    out = published_attention(q_BHSD, k_BHSD, v_BHSD, bm)     # 64x64 blocks, BLOCK_M=BLOCK_N=64

What makes it "published-style" (docs/design.md, section 7): every call pools q/k in their own dtype (bf16) over
64 tokens with `.mean` (pad tokens included: the published code crops instead of padding), takes
the coarse map and softmax in bf16, and binarises it with three full sorts: an ascending sort,
`cumsum >= 1 - threshold`, an `argsort` of the sort indices to scatter back, and an `argsort` of
the mask to list kept blocks. The STA mask is rebuilt on every call from int16 distance tables.
All blocks go to the full list with no mask_mod (pads are attended, as in cropped inputs), BLOCK
64 x 64, batch 1. One concession to the peer: the transposed (backward-pass) block indices the
published code also builds are skipped (compute_q_blocks=False), so its mask time is a lower bound.

Its rule keeps x iff (mass of entries <= x) >= 1 - threshold, i.e. mass of entries > x <= threshold:
the same set as NABLA's CDF rule except for ties and for entries whose mass-before equals the
threshold exactly (then it keeps one more), all computed in bf16 here.
Limits: benchmark use only; wan-nabla never calls this.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..attention.kernels import compiled_flex
from ..attention.layout import TILE_TOKENS, TileLayout

PUBLISHED_BLOCK = (TILE_TOKENS, TILE_TOKENS)
PUBLISHED_KERNEL_OPTIONS = {"BLOCK_M": TILE_TOKENS, "BLOCK_N": TILE_TOKENS}


@torch.no_grad()
def published_sta(t: int, h: int, w: int, wt: int, wh: int, ww: int, device) -> torch.Tensor:
    """[T*H*W, T*H*W] bool STA over the tile grid, built the published way (every call)."""
    m = int(max(t, h, w))
    r = torch.arange(0, m, 1, dtype=torch.int16, device=device)
    mat = (r.unsqueeze(1) - r.unsqueeze(0)).abs()
    sta_t, sta_h, sta_w = mat[:t, :t].flatten(), mat[:h, :h].flatten(), mat[:w, :w].flatten()
    sta_t, sta_h, sta_w = sta_t <= wt // 2, sta_h <= wh // 2, sta_w <= ww // 2
    sta_hw = (sta_h.unsqueeze(1) * sta_w.unsqueeze(0)).reshape(h, h, w, w).transpose(1, 2).flatten()
    sta = (sta_t.unsqueeze(1) * sta_hw.unsqueeze(0)).reshape(t, t, h * w, h * w).transpose(1, 2)
    return sta.reshape(t * h * w, t * h * w)


@torch.no_grad()
def published_keep(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, layout: TileLayout, threshold: float,
                   sta_window: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The published binarised tile mask [B, H, n, n] (int/bool), before BlockMask listing."""
    b, h, s, d = q_BHSD.shape
    n = s // TILE_TOKENS
    qa = q_BHSD.reshape(b, h, n, TILE_TOKENS, d).mean(-2)
    ka = k_BHSD.reshape(b, h, n, TILE_TOKENS, d).mean(-2).transpose(-2, -1)
    attn_map = torch.softmax((qa @ ka) / math.sqrt(d), dim=-1)
    vals, inds = attn_map.sort(-1)  # sort 1
    cvals = vals.cumsum_(-1)
    mask = (cvals >= 1 - threshold).int()
    mask = mask.gather(-1, inds.argsort(-1))  # sort 2
    if sta_window is not None:
        t_, h_, w_ = layout.tile_grid
        sta = published_sta(t_, h_, w_, *sta_window, device=q_BHSD.device).unsqueeze_(0).unsqueeze_(0)
        mask = torch.logical_or(mask, sta)
    return mask


@torch.no_grad()
def published_block_mask(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, layout: TileLayout, threshold: float,
                         sta_window: tuple[int, int, int] | None = None) -> BlockMask:
    mask = published_keep(q_BHSD, k_BHSD, layout, threshold, sta_window)
    kv_nb = mask.sum(-1).to(torch.int32)
    kv_inds = mask.argsort(dim=-1, descending=True).to(torch.int32)  # sort 3
    # Distinct tensors for the partial and full lists (one shared tensor breaks the CPU compile).
    full_inds = kv_inds if kv_inds.is_cuda else kv_inds.clone()
    return BlockMask.from_kv_blocks(torch.zeros_like(kv_nb), kv_inds, kv_nb, full_inds,
                                    BLOCK_SIZE=PUBLISHED_BLOCK, mask_mod=None, compute_q_blocks=False)


def published_attention(q_BHSD, k_BHSD, v_BHSD, block_mask: BlockMask) -> torch.Tensor:
    opts = PUBLISHED_KERNEL_OPTIONS if q_BHSD.is_cuda else None
    return compiled_flex()(q_BHSD, k_BHSD, v_BHSD, block_mask=block_mask, kernel_options=opts)
