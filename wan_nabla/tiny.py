"""A tiny, randomly initialised Wan2.1 pipeline for smoke tests and CPU development.

    from wan_nabla.tiny import build_tiny_pipeline
    pipe = build_tiny_pipeline(seed=0)
    video = pipe(prompt="a fox", num_frames=17, height=128, width=128,
                 num_inference_steps=2, output_type="np").frames       # [1, 17, 128, 128, 3]

Limits: the weights are random, so the "video" is structured noise. It exercises the real
code paths (WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel, UniPC flow matching,
the diffusers WanPipeline) at the real shapes' *ratios*: patch (1, 2, 2), 16 latent channels,
VAE factors 8 (space) and 4 (time). It says nothing about output quality. Nothing is downloaded;
the same seed gives bit-identical weights and the caller's global RNG state is left untouched.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

# The tiny model's facts that preflight needs without torch live in model_source.py.
from .model_source import TINY_GENERATION, TINY_HEADS, TINY_LAYERS, TINY_MODEL_ID, TINY_ROPE_POSITIONS  # noqa: F401

# T5's id convention (pad=0, eos=1, unk=2) so UMT5Config defaults stay correct.
_SPECIAL = ("<pad>", "</s>", "<unk>")
_TEXT_DIM = 32  # UMT5 d_model == transformer text_dim
# 32 is a power of two (friendly to attention kernels) and splits for Wan's 3-axis rope
# into t/h/w = 12/10/10, all even and positive.
_HEAD_DIM = 32

# The tiny transformer's config (WanTransformer3DModel keyword arguments).
TINY_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=TINY_HEADS,
    attention_head_dim=_HEAD_DIM,
    in_channels=16,
    out_channels=16,
    text_dim=_TEXT_DIM,
    freq_dim=32,
    ffn_dim=64,
    num_layers=TINY_LAYERS,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=TINY_ROPE_POSITIONS,
)


def tiny_transformer_config(heads: int = TINY_HEADS) -> dict:
    """The tiny transformer's config with its 64 channels split into `heads` heads."""
    if heads not in (1, 2, 4):
        raise ValueError(f"heads must be 1, 2 or 4 (64 channels, head-dim >= 16 for Wan's rope), got {heads}")
    return {
        **TINY_TRANSFORMER_CONFIG,
        "num_attention_heads": heads,
        "attention_head_dim": _HEAD_DIM * TINY_HEADS // heads,
    }


def build_tiny_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: every UTF-8 byte is a token, so any unicode prompt encodes
    without <unk>; appends </s> like T5."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(_SPECIAL)}
    vocab.update({ch: len(_SPECIAL) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )


def _tiny_scheduler() -> UniPCMultistepScheduler:
    # Same flow-matching settings as the Wan-AI/Wan2.1-*-Diffusers scheduler_config.json.
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )


def build_tiny_pipeline(seed: int = 0, heads: int = TINY_HEADS) -> WanPipeline:
    """Random-init WanPipeline (float32, CPU): 2 blocks x 2 heads x 32 head-dim, tiny VAE/UMT5.
    `heads` splits the same 64 channels into more heads (4: 16 head-dim; for Ulysses over 4 ranks)."""
    config = tiny_transformer_config(heads)
    tokenizer = build_tiny_tokenizer()
    # fork_rng: deterministic weights without disturbing the caller's torch RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The tiny VAE config of diffusers' own Wan pipeline tests.
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        text_config = UMT5Config(
            vocab_size=len(tokenizer),
            d_model=_TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            dropout_rate=0.0,
            is_encoder_decoder=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        text_encoder = UMT5EncoderModel(text_config)
        transformer = WanTransformer3DModel(**config)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        scheduler=_tiny_scheduler(),
        transformer=transformer.eval(),
    )
    return pipe
