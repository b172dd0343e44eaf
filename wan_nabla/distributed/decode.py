"""The Wan VAE's tiled decode split over the ranks of one video: disjoint tiles per rank, one assembly.

    video = split_tiled_decode(pipe.vae, z, group, ranks)   # on every rank of `ranks` (leader first)
    video      # [B, 3, T, H, W] on the leader (ranks[0]), None on the others

diffusers' AutoencoderKLWan.tiled_decode cuts the latents into overlapping spatial tiles (256-px
tiles at a 192-px stride by default, `vae.tile_sample_*`), decodes each tile through every frame
with its own causal cache, then blends each tile into its upper and left neighbours (the VAE's own
blend_v / blend_h) and crops. The tiles are independent until the blend, so here tile k (in
tiled_decode's row-major order) is decoded by rank k mod n; the decoded tiles are gathered on the
leader (one gather of their shapes, one of the tiles padded to the largest shape) and blended
and cropped exactly as tiled_decode does. The result equals vae.tiled_decode(z) up to rounding
(bitwise on the CPU: the same operations on the same tiles; tests/distributed/test_decode.py, gloo with 2
and 4 ranks). A video that fits in one tile is decoded by the leader alone, untiled, as
vae.decode does at that size.

Cost: each rank decodes ceil(tiles / n) tiles (1280x720: 4 x 7 = 28 tiles, 7 per rank at n = 4);
the leader additionally receives the other ranks' tiles (1.8x the video's pixels in the tiles'
dtype) and blends. Limits: latents of batch 1 or more, any dtype the VAE runs in; the ranks must
hold the same latents (the pipeline checks they are in sync before decoding); CUDA tensors need
NCCL, CPU tensors gloo (the group's backend).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify


def tile_origins(vae, latent_height: int, latent_width: int) -> list[tuple[int, int]]:
    """Top-left latent coordinates of the tiles, in tiled_decode's order (rows, then columns)."""
    ratio = vae.spatial_compression_ratio
    sh, sw = vae.tile_sample_stride_height // ratio, vae.tile_sample_stride_width // ratio
    return [(i, j) for i in range(0, latent_height, sh) for j in range(0, latent_width, sw)]


def decode_tile(vae, z: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """One tile of tiled_decode's first loop: latents [B, C, T, h, w] at (i, j) through every frame."""
    ratio = vae.spatial_compression_ratio
    th, tw = vae.tile_sample_min_height // ratio, vae.tile_sample_min_width // ratio
    vae.clear_cache()
    frames = []
    for k in range(z.shape[2]):
        vae._conv_idx = [0]
        tile = vae.post_quant_conv(z[:, :, k : k + 1, i : i + th, j : j + tw])
        frames.append(vae.decoder(tile, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=(k == 0)))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def assemble(vae, tiles: list[torch.Tensor], latent_height: int, latent_width: int) -> torch.Tensor:
    """tiled_decode's second half: blend decoded `tiles` (tiled_decode's order) and crop."""
    ratio, patch = vae.spatial_compression_ratio, vae.config.patch_size
    stride_h, stride_w = vae.tile_sample_stride_height, vae.tile_sample_stride_width
    height, width = latent_height * ratio, latent_width * ratio
    if patch is not None:
        height, width, stride_h, stride_w = height // patch, width // patch, stride_h // patch, stride_w // patch
        blend_h, blend_w = vae.tile_sample_min_height // patch - stride_h, vae.tile_sample_min_width // patch - stride_w
    else:
        blend_h, blend_w = vae.tile_sample_min_height - stride_h, vae.tile_sample_min_width - stride_w
    origins = tile_origins(vae, latent_height, latent_width)
    n_cols = len({j for _, j in origins})
    rows = [tiles[r : r + n_cols] for r in range(0, len(tiles), n_cols)]
    out_rows = []
    for a, row in enumerate(rows):
        kept = []
        for b, tile in enumerate(row):
            if a > 0:
                tile = vae.blend_v(rows[a - 1][b], tile, blend_h)
            if b > 0:
                tile = vae.blend_h(row[b - 1], tile, blend_w)
            kept.append(tile[:, :, :, :stride_h, :stride_w])
        out_rows.append(torch.cat(kept, dim=-1))
    dec = torch.cat(out_rows, dim=3)[:, :, :, :height, :width]
    if patch is not None:
        dec = unpatchify(dec, patch_size=patch)
    return torch.clamp(dec, min=-1.0, max=1.0)


def split_tiled_decode(vae, z: torch.Tensor, group=None, ranks: list[int] | None = None) -> torch.Tensor | None:
    """The decoded video [B, 3, T, H, W] on ranks[0], None elsewhere (module doc). `group` is the
    process group of `ranks` (None with one rank: a plain tiled decode)."""
    ranks = list(ranks) if ranks is not None else [0]
    n = len(ranks)
    _, _, _, lh, lw = z.shape
    ratio = vae.spatial_compression_ratio
    if lh <= vae.tile_sample_min_height // ratio and lw <= vae.tile_sample_min_width // ratio:
        # one tile: what vae.decode does untiled at this size (the leader alone)
        leader = group is None or dist.get_rank(group) == 0
        return vae.decode(z, return_dict=False)[0] if leader else None
    origins = tile_origins(vae, lh, lw)
    if n == 1 or group is None:
        return assemble(vae, [decode_tile(vae, z, i, j) for i, j in origins], lh, lw)
    me = dist.get_rank(group)
    mine = [decode_tile(vae, z, i, j) for i, j in origins[me::n]]
    slots = -(-len(origins) // n)  # tiles per rank, the last ranks may hold fewer
    shapes = torch.zeros(slots, 5, dtype=torch.int64, device=z.device)
    for s, t in enumerate(mine):
        shapes[s] = torch.tensor(t.shape, dtype=torch.int64)
    all_shapes = [torch.empty_like(shapes) for _ in range(n)]
    dist.all_gather(all_shapes, shapes, group=group)
    full = torch.stack(all_shapes).view(-1, 5).amax(dim=0).tolist()
    packed = z.new_zeros(slots, *full, dtype=mine[0].dtype if mine else z.dtype)
    for s, t in enumerate(mine):
        packed[s, :, :, : t.shape[2], : t.shape[3], : t.shape[4]] = t
    leader = me == 0
    gathered = [torch.empty_like(packed) for _ in range(n)] if leader else None
    dist.gather(packed, gathered, dst=ranks[0], group=group)
    if not leader:
        return None
    tiles = []
    for k in range(len(origins)):
        r, s = k % n, k // n
        shape = all_shapes[r][s].tolist()
        tiles.append(gathered[r][s, : shape[0], : shape[1], : shape[2], : shape[3], : shape[4]])
    return assemble(vae, tiles, lh, lw)
