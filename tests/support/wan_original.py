"""Test helper: write a diffusers Wan2.1 transformer in Wan's ORIGINAL checkpoint layout.

    save_original_checkpoint(transformer.state_dict(), tmp / "orig", shards=2)
    # -> diffusion_pytorch_model-00001-of-00002.safetensors, ...-00002-of-00002.safetensors,
    #    diffusion_pytorch_model.safetensors.index.json, plus a decoy Wan2.1_VAE.pth

The inverse of diffusers' `convert_wan_transformer_to_diffusers` rename table (T2V keys only),
as Wan-Video/Wan2.1 wan/modules/model.py names the modules: `self_attn.q`, `ffn.0`, `modulation`,
`head.head`, and the norm2/norm3 swap (original norm3 is the affine cross-attention norm).
Only for tests: the package itself converts with diffusers' own function.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

_INVERSE = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.", "self_attn."),
    ("attn2.", "cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
)


def to_original(key: str) -> str:
    """A diffusers WanTransformer3DModel state-dict key in Wan's original naming."""
    for a, b in _INVERSE:
        key = key.replace(a, b)
    if key == "scale_shift_table":
        return "head.modulation"
    key = key.replace(".scale_shift_table", ".modulation")
    return key.replace(".norm2.", ".__n3__.").replace(".norm3.", ".norm2.").replace(".__n3__.", ".norm3.")


def save_original_checkpoint(
    state: dict[str, torch.Tensor], path: Path, shards: int = 2, decoy_pickle: bool = True
) -> Path:
    """Original key names, `shards` safetensors files named like Wan's, and their index json."""
    path.mkdir(parents=True, exist_ok=True)
    items = sorted((to_original(k), v.detach().contiguous().clone()) for k, v in state.items())
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = dict(items[i::shards])
        save_file(part, str(path / name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for _, v in items)}, "weight_map": weight_map}
    (path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if decoy_pickle:  # original repos ship the VAE as a pickle beside the shards; it must be ignored
        (path / "Wan2.1_VAE.pth").write_bytes(b"not to be unpickled")
    return path
