"""Mask builders vs brute force: STA distance rule, NABLA CDF rule, BlockMask tables."""

from __future__ import annotations

import pytest
import torch

from tests.support import reference as R
from wan_nabla.attention.layout import TileLayout
from wan_nabla.attention.masks import (
    block_density,
    cdf_select,
    coarsen,
    nabla_tile_mask,
    sta_tile_mask,
    to_block_mask,
)


@pytest.mark.parametrize("grid", [(3, 9, 13), (5, 16, 24), (2, 8, 40)])
@pytest.mark.parametrize("window", [(1, 1, 1), (3, 1, 1), (3, 3, 3), (11, 3, 3), (11, 5, 5), (99, 99, 99)])
def test_sta_equals_distance_rule(grid, window):
    """Guards: STA keep mask == |dt|<=wT//2, |di|<=wH//2, |dj|<=wW//2 in latent frames/tiles."""
    keep = sta_tile_mask(TileLayout(*grid), window, "cpu")
    assert torch.equal(keep, R.sta_keep(*grid, window))


def test_sta_is_cached_per_key():
    L = TileLayout(3, 9, 13)
    assert sta_tile_mask(L, (3, 1, 1), "cpu") is sta_tile_mask(L, (3, 1, 1), "cpu")
    assert sta_tile_mask(L, (3, 1, 1), "cpu") is not sta_tile_mask(L, (3, 3, 1), "cpu")


@pytest.mark.parametrize("threshold", [0.1, 0.4, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("grid", [(3, 9, 13), (2, 8, 16)])
def test_nabla_equals_bruteforce_cdf(threshold, grid):
    """Guards: pooled map over real tokens only, fp32 softmax, and the CDF selection rule,
    per batch item and head (batch 2, 3 heads, random q/k with some locality)."""
    L = TileLayout(*grid)
    g = torch.Generator().manual_seed(int(threshold * 100) + grid[1])
    b, h, d = 2, 3, 16
    ids = R.tile_ids(*grid)
    # per-tile offsets give the pooled map real structure (pure noise pools to ~uniform)
    raster_q = (
        torch.randn(b, h, L.seq_len, d, generator=g) + 2 * torch.randn(b, h, L.n_tiles, d, generator=g)[:, :, ids]
    )
    raster_k = (
        torch.randn(b, h, L.seq_len, d, generator=g) + 2 * torch.randn(b, h, L.n_tiles, d, generator=g)[:, :, ids]
    )
    to_t = lambda x: L.to_tiles(x.flatten(0, 1).transpose(0, 1).flatten(1), seq_dim=0)  # noqa: E731
    q = to_t(raster_q).view(L.padded_len, b, h, d).permute(1, 2, 0, 3)
    k = to_t(raster_k).view(L.padded_len, b, h, d).permute(1, 2, 0, 3)
    keep = nabla_tile_mask(q, k, L, threshold)
    ref, margin = R.nabla_keep(raster_q, raster_k, grid, threshold)
    assert margin > 1e-6
    assert torch.equal(keep, ref)
    if threshold < 1.0:
        assert not keep.all()


def test_cdf_select_keeps_the_crossing_entry_and_threshold_one_keeps_all():
    """Guards the CDF rule at exact boundaries: dyadic probabilities make every partial sum exact in
    float32, so "mass before < threshold" is decided without rounding."""
    p = torch.tensor([[0.5, 0.25, 0.1875, 0.0625]])
    assert cdf_select(p, 0.5).tolist() == [[True, False, False, False]]  # mass before 2nd = 0.5, not < 0.5
    assert cdf_select(p, 0.5001).tolist() == [[True, True, False, False]]
    assert cdf_select(p, 0.75).tolist() == [[True, True, False, False]]  # mass before 3rd = 0.75
    assert cdf_select(p, 0.9375).tolist() == [[True, True, True, False]]  # mass before 4th = 0.9375
    assert cdf_select(p, 0.9376).tolist() == [[True, True, True, True]]
    assert cdf_select(p[:, [2, 0, 3, 1]], 0.6).tolist() == [[False, True, False, True]]  # order does not matter
    assert cdf_select(torch.full((1, 4), 0.25), 1.0).all()


@pytest.mark.parametrize("block_size", [(64, 64), (128, 64), (64, 128), (128, 128)])
@pytest.mark.parametrize("grid", [(3, 9, 13), (5, 8, 8)])
def test_block_mask_tables_match_keep_mask(grid, block_size):
    """Guards: BlockMask (partial + full tables) covers exactly the coarsened keep mask; key blocks
    with pad tokens (or past the end) are partial, all others full."""
    L = TileLayout(*grid)
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(2, 3, L.n_tiles, L.n_tiles, generator=g) < 0.3
    bm = to_block_mask(keep, L, block_size)
    coarse = coarsen(keep, block_size[0] // 64, block_size[1] // 64)
    dense = bm.to_dense().bool()
    assert torch.equal(dense, coarse)
    # brute-force coarsening: block kept iff any tile pair inside is kept
    gq, gk = block_size[0] // 64, block_size[1] // 64
    for qb in range(coarse.shape[2]):
        for kb in range(coarse.shape[3]):
            sub = keep[:, :, qb * gq : (qb + 1) * gq, kb * gk : (kb + 1) * gk]
            assert torch.equal(coarse[:, :, qb, kb], sub.flatten(2).any(-1))
    full_counts = bm.full_kv_num_blocks
    has_pad = ~torch.cat([L.valid(), torch.zeros(-L.padded_len % 128, dtype=torch.bool)])[
        : coarse.shape[3] * block_size[1]
    ].view(-1, block_size[1]).all(-1)
    assert torch.equal(full_counts, (coarse & ~has_pad).sum(-1).int())
    assert float(block_density(keep, block_size)) == pytest.approx(coarse.float().mean().item())


@pytest.mark.parametrize("grid", [(3, 9, 13), (4, 16, 24)])
@pytest.mark.parametrize("window", [(1, 1, 1), (3, 1, 1), (3, 3, 3)])
def test_sta_follows_the_time_paired_order(grid, window):
    """Guards: STA is the distance rule on each tile's own coordinates in the layout's order."""
    L = TileLayout(*grid, time_pairs=True)
    pos = {tuple(c): n for n, c in enumerate(R.tile_coords(*grid))}
    perm = torch.tensor([pos[tuple(c)] for c in L.tile_coords().tolist()])
    ref = R.sta_keep(*grid, window)[perm][:, perm]
    assert torch.equal(sta_tile_mask(L, window, "cpu"), ref)
