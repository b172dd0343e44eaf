"""Random-weight Wan2.1 models at real sizes, built straight on the GPU (no checkpoint, no download).

    model = random_transformer(WAN_SIZES["14B"], device, torch.bfloat16)   # 14B params in ~28 GB
    pipe = random_pipeline("1.3B", device)         # UMT5-XXL + 1.3B transformer + Wan VAE

Modules are created on the meta device and every parameter is then allocated once, on the target
device, in its final dtype, and filled in place: a 14B transformer never exists in fp32 on the host.
Parameters matching the model's `_keep_in_fp32_modules` stay float32, as from_pretrained keeps them.
Initialisation keeps activations finite through all layers (timing does not depend on values, but
NABLA's masks do, and NaN would make them meaningless): weights U(+-1/sqrt(fan_in)) as torch's
default Linear init, norms one, embeddings N(0, 1), other tables N(0, 1/dim).
Limits: random weights produce noise videos; only speed, memory and mask statistics mean anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class WanSize:
    name: str
    dim: int
    heads: int
    layers: int
    ffn: int
    text_dim: int = 4096
    freq_dim: int = 256

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


WAN_SIZES = {
    "1.3B": WanSize("1.3B", 1536, 12, 30, 8960),
    "14B": WanSize("14B", 5120, 40, 40, 13824),
    # CPU tests: the same code path at a size that runs in seconds.
    "tiny": WanSize("tiny", 64, 2, 2, 128, text_dim=32, freq_dim=32),
}

# google/umt5-xxl encoder, as used by Wan2.1 (d_model 4096 = the transformer's text_dim).
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    is_encoder_decoder=False,
    tie_word_embeddings=False,
)
UMT5_TINY = dict(
    vocab_size=512,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    is_encoder_decoder=False,
)


@torch.no_grad()
def materialize(
    module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0, keep_fp32: tuple[str, ...] = ()
) -> nn.Module:
    """Allocate every meta parameter on `device` and fill it (see module doc). Returns `module`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for mod_name, mod in module.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            full = f"{mod_name}.{pname}" if mod_name else pname
            dt = torch.float32 if any(k in full for k in keep_fp32) else dtype
            t = torch.empty(p.shape, dtype=dt, device=device)
            _fill(t, mod, pname, gen)
            mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
        for bname, b in list(mod.named_buffers(recurse=False)):
            if b.is_meta:
                raise RuntimeError(f"buffer {mod_name}.{bname} is still on the meta device; rebuild that module")
    return module


def _fill(t: torch.Tensor, mod: nn.Module, pname: str, gen: torch.Generator) -> None:
    cls = type(mod).__name__.lower()
    if isinstance(mod, nn.Embedding):
        t.normal_(0.0, 1.0, generator=gen)
    elif "norm" in cls:
        t.fill_(1.0 if pname == "weight" else 0.0)
    elif isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        weight = mod.weight
        fan_in = weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        t.uniform_(-bound, bound, generator=gen)
    else:
        t.normal_(0.0, 1.0 / math.sqrt(t.shape[-1]), generator=gen)


def random_transformer(
    size: WanSize, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0, layers: int | None = None
):
    """WanTransformer3DModel of `size` (optionally fewer layers) with random weights on `device`."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    kwargs = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=size.heads,
        attention_head_dim=size.head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=size.text_dim,
        freq_dim=size.freq_dim,
        ffn_dim=size.ffn,
        num_layers=layers or size.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    )
    with torch.device("meta"):
        model = WanTransformer3DModel(**kwargs)
    model.rope = WanRotaryPosEmbed(size.head_dim, (1, 2, 2), 1024).to(device)  # real tables, not meta
    materialize(model, device, dtype, seed, tuple(model._keep_in_fp32_modules or ()))
    return model.eval()


def random_text_encoder(config: dict, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 1):
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**config))
    materialize(model, device, dtype, seed)
    return model.eval()


def random_pipeline(size: str, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """diffusers WanPipeline of random weights: `size` transformer, UMT5-XXL (tiny: small UMT5),
    the default Wan VAE in float32 (tiny: the test VAE), the tiny pipeline's byte tokenizer."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    from wan_nabla.tiny import build_tiny_tokenizer

    tiny = size == "tiny"
    tokenizer = build_tiny_tokenizer()
    text_cfg = dict(
        UMT5_TINY if tiny else UMT5_XXL, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = (
            AutoencoderKLWan(
                base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
            )
            if tiny
            else AutoencoderKLWan()
        )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=random_text_encoder(text_cfg, device, dtype, seed + 1),
        # Built in float32 (the default dtype), so only the device moves: a dtype argument makes
        # diffusers warn "modules that should be kept in float32: []" into the bench output.
        vae=vae.to(device).eval(),
        scheduler=scheduler,
        transformer=random_transformer(WAN_SIZES[size], device, dtype, seed),
    )


def smooth_latents(shape: tuple[int, ...], device: torch.device, seed: int = 0) -> torch.Tensor:
    """Latents with spatio-temporal structure (coarse noise upsampled + fine noise), float32."""
    b, c, f, h, w = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    coarse = torch.randn((b, c, max(2, f // 3), max(2, h // 6), max(2, w // 6)), generator=gen, device=device)
    x = torch.nn.functional.interpolate(coarse, size=(f, h, w), mode="trilinear", align_corners=True)
    return x + 0.3 * torch.randn(shape, generator=gen, device=device)
