"""Queries and keys with spatio-temporal locality, for the attention-op benchmark.

    q, k, v = synthetic_qkv(layout, heads=40, device=dev)        # [1, 40, S_pad, 128] tile order
    q = processor_storage(q)                  # stored [B, S, H, D] as the processor stores it
    cos, sin = tile_rotary(layout, 128, dev)  # the rotary tables the processor sees, tile order
    q, k, v = wan_block_qkv(scenario, dev, torch.bfloat16, seed=0)   # from a random-weight Wan block

Random white-noise q/k give NABLA a flat coarse map (every tile looks alike), so the density it
reaches is just the threshold and says nothing about real videos. Real Wan q/k vary smoothly over
(frame, row, column) and carry Wan's 3-axis rotary embedding. This generator imitates that:
per head, a smooth random field over the patch grid (white noise on a grid 3 frames x 6 x 6
patches apart, trilinearly upsampled) plus per-token noise, RMS-normalised like Wan's q/k norm,
scaled by a per-head gain (heads range from diffuse to sharply local), then rotated by the real
Wan rotary tables. Tokens are returned in tile order with zero pads, as the processors see them.
Limits: a model of the statistics, not of any trained checkpoint; the density each threshold
reaches is always measured and reported next to the time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from wan_nabla.attention.layout import TileLayout

# Gains span diffuse to local heads; q.k/sqrt(D) for a token with itself is about gain^2*sqrt(D).
GAIN_RANGE = (0.9, 2.2)
NOISE = 0.6


def wan_rotary(layout: TileLayout, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan2.1's rotary cos/sin tables [S, D] float32 in raster order (diffusers' WanRotaryPosEmbed)."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    # forward() reads only the latent shape: a meta tensor of that shape allocates nothing.
    cos, sin = rope(torch.empty(1, 1, layout.frames, layout.height * 2, layout.width * 2, device="meta"))
    return cos[0, :, 0].float().to(device), sin[0, :, 0].float().to(device)


def apply_rotary(x_BSHD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation, the same math as diffusers' Wan processor."""
    x1, x2 = x_BSHD.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos_SD[None, :, None, 0::2], sin_SD[None, :, None, 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


def smooth_field(
    shape_BHFHW: tuple[int, ...], dim: int, spacing: tuple[int, int, int], gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """[B*H, dim, F, Hg, Wg] float32: white noise on a coarse grid, trilinearly upsampled."""
    bh, f, h, w = shape_BHFHW
    coarse = tuple(max(2, math.ceil(n / s) + 1) for n, s in zip((f, h, w), spacing, strict=False))
    noise = torch.randn((bh, dim, *coarse), generator=gen, device=device)
    return F.interpolate(noise, size=(f, h, w), mode="trilinear", align_corners=True)


@torch.no_grad()
def synthetic_qkv(
    layout: TileLayout,
    heads: int,
    head_dim: int = 128,
    batch: int = 1,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    gain_range: tuple[float, float] = GAIN_RANGE,
    noise: float = NOISE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) [B, H, S_pad, D] in tile order, pads zero; see the module doc."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    f, h, w = layout.frames, layout.height, layout.width
    cos, sin = wan_rotary(layout, head_dim, device)
    lo, hi = gain_range
    gains = torch.exp(torch.linspace(math.log(lo), math.log(hi), heads, device=device))
    out = []
    for role in range(2):  # q, k share the field (what makes nearby tokens attend), not the noise
        if role == 0:
            field = smooth_field((batch * heads, f, h, w), head_dim, (3, 6, 6), gen, device)
            field = field.view(batch, heads, head_dim, f * h * w).permute(0, 3, 1, 2)  # [B, S, H, D]
        x = field + noise * torch.randn(field.shape, generator=gen, device=device)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gains.view(1, 1, heads, 1)
        x = apply_rotary(x, cos, sin)
        out.append(layout.to_tiles(x.flatten(2), seq_dim=1).unflatten(2, (heads, head_dim)).transpose(1, 2))
    v = torch.randn((batch, heads, layout.padded_len, head_dim), generator=gen, device=device)
    q, k = (t.to(dtype).contiguous() for t in out)
    return q, k, v.to(dtype)


def real_tokens(x_BHSD: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    if not layout.needs_padding:
        return x_BHSD
    return x_BHSD.index_select(2, layout.real_token_index(x_BHSD.device)).contiguous()


def relayout(x_BHSD: torch.Tensor, src: TileLayout, dst: TileLayout) -> torch.Tensor:
    """The same tokens in another layout's tile order (e.g. time-paired), pads zero, stored
    [B, S, H, D] as the processor stores them."""
    if src == dst:
        return x_BHSD
    return processor_storage(dst.to_tiles(src.from_tiles(x_BHSD, seq_dim=2), seq_dim=2))


def processor_storage(x_BHSD: torch.Tensor) -> torch.Tensor:
    """The same values stored [B, S, H, D] and viewed [B, H, S, D]: how the processor hands q/k/v
    to the kernels (it computes them per token and transposes a view)."""
    return x_BHSD.transpose(1, 2).contiguous().transpose(1, 2)


def tile_rotary(layout: TileLayout, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's rotary tables as the processor receives them on a tile layout: [1, S_pad, 1, D] float32."""
    cos, sin = wan_rotary(layout, head_dim, device)
    return tuple(layout.to_tiles(t[None], seq_dim=1)[:, :, None].contiguous() for t in (cos, sin))


@torch.no_grad()
def wan_block_qkv(s, device, dtype, seed: int):
    """q/k/v that the app's processor sees in block 0 of a random-weight Wan transformer of these heads,
    fed smooth random latents (tile order, after q/k norm and rotary)."""
    from wan_nabla.attention.run import Observer
    from wan_nabla.wan.hooks import apply_attention

    from .random_init import WAN_SIZES, WanSize, random_transformer, smooth_latents

    size = next(
        (z for z in WAN_SIZES.values() if z.heads == s.heads and z.head_dim == s.head_dim),
        WanSize("custom", s.heads * s.head_dim, s.heads, 1, 4 * s.heads * s.head_dim),
    )
    model = random_transformer(size, device, dtype, seed=seed, layers=1)
    captured: dict[str, torch.Tensor] = {}
    # plain (unpaired) tile order: the order the op level's scenario layout assumes
    handle = apply_attention(model, {"type": "nabla", "threshold": 0.5, "time_pairs": False, "backend": "flex"})

    class Capture(Observer):
        def attend_started(self, call):
            captured.update(q=call.q.contiguous(), k=call.k.contiguous(), v=call.v.contiguous())

    handle.run.stats.subscribe(Capture())
    f, h, w = s.grid
    latents = smooth_latents((s.batch, 16, f, 2 * h, 2 * w), device, seed).to(dtype)
    text = torch.randn((s.batch, 512, size.text_dim), device=device, dtype=dtype)
    model(
        hidden_states=latents,
        timestep=torch.full((s.batch,), 500.0, device=device),
        encoder_hidden_states=text,
        return_dict=False,
    )
    handle.remove()
    del model
    return captured["q"], captured["k"], captured["v"]
