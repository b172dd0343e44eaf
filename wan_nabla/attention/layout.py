"""Token tiling: raster patch order <-> tile order, with padding to whole tiles.

    layout = TileLayout(frames=21, height=45, width=80)   # patch grid of 1280x720x81 on Wan2.1
    layout.padded_len          # 80640 = 21 * 6 * 10 tiles * 64 tokens
    x_tiles = layout.to_tiles(x_BSC)       # [B, S, C] raster -> [B, S_pad, C] tile order
    x_back = layout.from_tiles(x_tiles)    # exact inverse, pads dropped

A *tile* is one latent frame x an 8x8 square of patch tokens = 64 consecutive tokens, so that
block-sparse attention over 64-token blocks works on spatio-temporal neighbourhoods. Tiles are
ordered by (frame, tile row, tile column), or with `time_pairs` by (frame pair, tile row, tile
column, frame in pair) so that 128-token query blocks span two frames of one square; inside a
tile tokens are row-major.

When the patch grid's height or width is not a multiple of 8 (e.g. 1280x720 gives 45x80), the
grid is padded at the bottom/right to whole tiles: never cropped. Pad tokens are zero on entry,
are masked out as keys by the attention (`valid`), and are dropped by `from_tiles`. Only the
edge tiles contain pads; `key_block_has_pad` marks the kernel's key blocks that hold one, so the
kernel evaluates a token mask there and nowhere else.

Limits: one layout per (frames, height, width); the tile side is fixed at 8 patch tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TILE_SIDE = 8
TILE_TOKENS = TILE_SIDE * TILE_SIDE
MAX_BLOCK = 2 * TILE_TOKENS
"""The largest kernel block (tokens): two tiles."""


@dataclass(frozen=True)
class TileLayout:
    frames: int
    """Latent frames after patchify (Wan2.1: (video_frames - 1) / 4 + 1)."""
    height: int
    """Patch-token rows (latent height / 2)."""
    width: int
    """Patch-token columns (latent width / 2)."""
    time_pairs: bool = False
    """Order tiles (t, i, j), (t+1, i, j) next to each other for even t (an odd last frame keeps
    row-major order), so a 128-token query block is one 8x8 square over two latent frames rather
    than two side-by-side squares: their coarse maps are more alike, so OR-coarsening keeps fewer
    blocks (benchmarks/NOTES.md)."""

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TileLayout.{name} must be a positive integer, got {v!r}")
        if not isinstance(self.time_pairs, bool):
            raise ValueError(f"TileLayout.time_pairs must be a bool, got {self.time_pairs!r}")

    # ---- sizes -------------------------------------------------------------------------
    @property
    def tiles_h(self) -> int:
        return -(-self.height // TILE_SIDE)

    @property
    def tiles_w(self) -> int:
        return -(-self.width // TILE_SIDE)

    @property
    def tile_grid(self) -> tuple[int, int, int]:
        """(frames, tile rows, tile columns): the grid STA windows are measured in."""
        return (self.frames, self.tiles_h, self.tiles_w)

    @property
    def n_tiles(self) -> int:
        return self.frames * self.tiles_h * self.tiles_w

    @property
    def seq_len(self) -> int:
        """Real tokens, raster order."""
        return self.frames * self.height * self.width

    @property
    def padded_len(self) -> int:
        return self.n_tiles * TILE_TOKENS

    @property
    def needs_padding(self) -> bool:
        return self.height % TILE_SIDE != 0 or self.width % TILE_SIDE != 0

    # ---- reordering --------------------------------------------------------------------
    def _pair(self, x: torch.Tensor) -> torch.Tensor:
        """[*lead, F, th, tw, R] tile-major -> [*lead, n_tiles, R] in this layout's tile order."""
        lead, r = x.shape[:-4], x.shape[-1]
        if not self.time_pairs or self.frames < 2:
            return x.reshape(*lead, self.n_tiles, r)
        e = self.frames // 2 * 2
        head = x[..., :e, :, :, :].reshape(*lead, e // 2, 2, self.tiles_h, self.tiles_w, r)
        head = head.movedim(-4, -2).reshape(*lead, -1, r)  # (t//2, i, j, t%2)
        return torch.cat([head, x[..., e:, :, :, :].reshape(*lead, -1, r)], dim=-2)

    def _unpair(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of _pair: [*lead, n_tiles, R] -> [*lead, F, th, tw, R]."""
        lead, r = x.shape[:-2], x.shape[-1]
        th, tw = self.tiles_h, self.tiles_w
        if not self.time_pairs or self.frames < 2:
            return x.reshape(*lead, self.frames, th, tw, r)
        e = self.frames // 2 * 2
        head, tail = x[..., : e * th * tw, :], x[..., e * th * tw :, :]
        head = head.reshape(*lead, e // 2, th, tw, 2, r).movedim(-2, -4).reshape(*lead, e, th, tw, r)
        return torch.cat([head, tail.reshape(*lead, -1, th, tw, r)], dim=-4)

    def grid_to_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """[..., F, H, W, C] raster grid -> [..., S_pad, C] in tile order, zero pads."""
        lead = x.shape[:-4]
        f, h, w, c = x.shape[-4:]
        if (f, h, w) != (self.frames, self.height, self.width):
            raise ValueError(f"grid {(f, h, w)} does not match layout {(self.frames, self.height, self.width)}")
        ph, pw = self.tiles_h * TILE_SIDE - h, self.tiles_w * TILE_SIDE - w
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))  # pads W then H (last dims first, C untouched)
        x = x.reshape(*lead, f, self.tiles_h, TILE_SIDE, self.tiles_w, TILE_SIDE, c)
        nd = len(lead)
        perm = list(range(nd)) + [nd + i for i in (0, 1, 3, 2, 4, 5)]
        x = x.permute(perm).reshape(*lead, f, self.tiles_h, self.tiles_w, TILE_TOKENS * c)
        return self._pair(x).reshape(*lead, self.padded_len, c)

    def to_tiles(self, x: torch.Tensor, seq_dim: int = 1) -> torch.Tensor:
        """Raster tokens along `seq_dim` (length seq_len) -> tile order (length padded_len)."""
        x = x.movedim(seq_dim, -2)
        grid = x.reshape(*x.shape[:-2], self.frames, self.height, self.width, x.shape[-1])
        return self.grid_to_tiles(grid).movedim(-2, seq_dim)

    def from_tiles(self, x: torch.Tensor, seq_dim: int = 1) -> torch.Tensor:
        """Tile order (length padded_len) along `seq_dim` -> raster tokens, pads dropped."""
        x = x.movedim(seq_dim, -2)
        lead, c = x.shape[:-2], x.shape[-1]
        if x.shape[-2] != self.padded_len:
            raise ValueError(f"expected {self.padded_len} tokens in tile order, got {x.shape[-2]}")
        nd = len(lead)
        x = self._unpair(x.reshape(*lead, self.n_tiles, TILE_TOKENS * c))
        x = x.reshape(*lead, self.frames, self.tiles_h, self.tiles_w, TILE_SIDE, TILE_SIDE, c)
        perm = list(range(nd)) + [nd + i for i in (0, 1, 3, 2, 4, 5)]
        x = x.permute(perm).reshape(*lead, self.frames, self.tiles_h * TILE_SIDE, self.tiles_w * TILE_SIDE, c)
        x = x[..., : self.height, : self.width, :]
        return x.reshape(*lead, self.seq_len, c).movedim(-2, seq_dim)

    # ---- masks of real tokens ----------------------------------------------------------
    def valid(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[S_pad] bool: True for real tokens in tile order."""
        return _valid_tokens(self, torch.device(device))

    def tile_counts(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[n_tiles] float32: number of real tokens per tile (64 except at the bottom/right edge)."""
        return self.valid(device).view(self.n_tiles, TILE_TOKENS).sum(-1, dtype=torch.float32)

    def valid_padded(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[S_pad rounded up to MAX_BLOCK] bool: `valid` extended with False, so a kernel block of
        any allowed size can index it without reading past the end."""
        return _valid_padded(self, torch.device(device))

    def key_block_has_pad(self, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[ceil(S_pad / block)] bool: key blocks of `block` tokens holding a pad token (or reaching
        past the end of the sequence). Only these need a token mask in the attention kernel."""
        if block not in (TILE_TOKENS, MAX_BLOCK):
            raise ValueError(f"block must be {TILE_TOKENS} or {MAX_BLOCK} tokens, got {block}")
        return _key_block_has_pad(self, block, torch.device(device))

    def real_token_index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[S] int64: tile-order positions of the real tokens, in tile order (for gathering K/V)."""
        return _real_index(self, torch.device(device))

    def tile_coords(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[n_tiles, 3] int64: (frame, tile row, tile column) of each tile, in this layout's order."""
        t, i, j = torch.meshgrid(
            torch.arange(self.frames, device=device),
            torch.arange(self.tiles_h, device=device),
            torch.arange(self.tiles_w, device=device),
            indexing="ij",
        )
        return self._pair(torch.stack([t, i, j], dim=-1))


@functools.lru_cache(maxsize=64)
def _valid_tokens(layout: TileLayout, device: torch.device) -> torch.Tensor:
    ones = torch.ones(layout.frames, layout.height, layout.width, 1, dtype=torch.bool, device=device)
    return layout.grid_to_tiles(ones).reshape(layout.padded_len)


@functools.lru_cache(maxsize=64)
def _real_index(layout: TileLayout, device: torch.device) -> torch.Tensor:
    return torch.nonzero(_valid_tokens(layout, device), as_tuple=False).reshape(-1)


@functools.lru_cache(maxsize=64)
def _valid_padded(layout: TileLayout, device: torch.device) -> torch.Tensor:
    valid = _valid_tokens(layout, device)
    extra = -len(valid) % MAX_BLOCK
    return torch.cat([valid, valid.new_zeros(extra)]) if extra else valid


@functools.lru_cache(maxsize=64)
def _key_block_has_pad(layout: TileLayout, block: int, device: torch.device) -> torch.Tensor:
    n_blocks = -(-layout.padded_len // block)
    return ~_valid_padded(layout, device)[: n_blocks * block].view(n_blocks, block).all(-1)
