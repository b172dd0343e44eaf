"""Token tiling: exact round trips, the tile order itself, and the pad bookkeeping."""

from __future__ import annotations

import pytest
import torch

from wan_nabla.layout import TileLayout

from .reference import tile_ids

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
    assert int(L.tile_has_pad().sum()) == 21 * 10  # bottom tile row of every frame
    assert not TileLayout(21, 48, 80).needs_padding


def test_grid_to_tiles_rejects_wrong_grid():
    with pytest.raises(ValueError, match="does not match"):
        TileLayout(2, 8, 8).grid_to_tiles(torch.zeros(2, 8, 9, 1))
