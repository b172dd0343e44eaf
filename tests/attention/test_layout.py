"""Token tiling: exact round trips, the tile order itself, and the pad bookkeeping."""

from __future__ import annotations

import pytest
import torch

from tests.support.reference import tile_ids
from wan_nabla.attention.layout import TileLayout

GRIDS = [(1, 8, 8), (3, 9, 13), (2, 15, 17), (21, 45, 80), (5, 1, 1), (2, 16, 24)]


@pytest.mark.parametrize("grid", GRIDS)
def test_round_trip_is_exact(grid):
    """Guards: from_tiles(to_tiles(x)) == x bit for bit, for any channel count and batch."""
    L = TileLayout(*grid)
    x = torch.randn(2, L.seq_len, 3)
    tiles = L.to_tiles(x)
    assert tiles.shape == (2, L.padded_len, 3)
    assert torch.equal(L.from_tiles(tiles), x)


@pytest.mark.parametrize("grid", GRIDS[:4])
def test_tile_order_matches_definition(grid):
    """Guards: position p // 64 in tile order is the tile (frame, tile row, tile col) of the raster
    token placed there, row-major inside the tile; pads are zero and flagged invalid."""
    L = TileLayout(*grid)
    raster = torch.arange(1, L.seq_len + 1, dtype=torch.float64)[None, :, None]
    tiles = L.to_tiles(raster)[0, :, 0]
    ids = tile_ids(*grid)
    valid = L.valid()
    assert int(valid.sum()) == L.seq_len
    assert torch.all(tiles[~valid] == 0)
    placed = tiles[valid].long() - 1  # raster index of each real token, in tile order
    assert torch.equal(ids[placed], torch.nonzero(valid)[:, 0] // 64)
    # inside a tile, raster order is preserved (row-major 8x8)
    assert torch.all(placed.view(-1)[1:] != placed.view(-1)[:-1])
    assert torch.equal(placed, L.to_tiles(torch.arange(L.seq_len)[None, :, None].double())[0, valid, 0].long())


def test_padding_counts():
    L = TileLayout(21, 45, 80)  # 1280x720x81 on Wan2.1
    assert (L.tiles_h, L.tiles_w, L.padded_len, L.seq_len) == (6, 10, 80640, 75600)
    counts = L.tile_counts()
    assert counts.max() == 64 and counts.min() == 5 * 8
    # 64-token key blocks are tiles: the bottom tile row of every frame holds pads.
    assert int(L.key_block_has_pad(64).sum()) == 21 * 10
    # 128-token blocks pair tiles side by side (10 per row): the bottom row's 5 blocks per frame.
    assert int(L.key_block_has_pad(128).sum()) == 21 * 5
    # time-paired order puts (t, i, j) and (t + 1, i, j) into one block: pads only in bottom squares.
    P = TileLayout(21, 45, 80, time_pairs=True)
    assert int(P.key_block_has_pad(128).sum()) == 10 * 10 + 5  # 10 frame pairs x 10 squares + odd last frame
    assert not TileLayout(21, 48, 80).needs_padding


def test_grid_to_tiles_rejects_wrong_grid():
    with pytest.raises(ValueError, match="does not match"):
        TileLayout(2, 8, 8).grid_to_tiles(torch.zeros(2, 8, 9, 1))


@pytest.mark.parametrize("grid", [(1, 8, 8), (2, 9, 13), (3, 9, 13), (21, 45, 80), (4, 16, 24)])
def test_time_pairs_round_trip_and_order(grid):
    """Guards: the time-paired order is exact to invert and places (t, i, j), (t+1, i, j) next to
    each other for even t; an odd last frame stays row-major; tile_coords describe the tokens."""
    L = TileLayout(*grid, time_pairs=True)
    x = torch.randn(2, L.seq_len, 3)
    assert torch.equal(L.from_tiles(L.to_tiles(x)), x)
    f, th, tw = L.tile_grid
    expected = [(t, i, j) for p in range(f // 2) for i in range(th) for j in range(tw) for t in (2 * p, 2 * p + 1)]
    expected += [(f - 1, i, j) for i in range(th) for j in range(tw)] if f % 2 else []
    assert L.tile_coords().tolist() == [list(e) for e in expected]
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1).reshape(-1, 3)
    first = L.to_tiles(coords[None].double())[0].view(L.n_tiles, 64, 3)[:, 0].long()
    assert torch.equal(torch.stack([first[:, 0], first[:, 1] // 8, first[:, 2] // 8], -1), L.tile_coords())
