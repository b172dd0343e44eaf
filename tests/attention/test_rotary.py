"""The processor's rotary step: the eager rotation is diffusers' math, and the Triton kernel (run by
Triton's CPU interpreter) is bit-identical to it and pools NABLA's tile means exactly as
masks.pool_tiles does, also inside the whole processor path."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import torch

from tests.support import ROOT
from wan_nabla.attention.rotary import rotate, rotate_torch


def test_eager_rotation_is_diffusers_math():
    """Guards rotate_torch: out[2i] = x[2i] cos[2i] - x[2i+1] sin[2i+1], out[2i+1] = x[2i] sin[2i+1]
    + x[2i+1] cos[2i] in float32, rounded once to the input dtype (diffusers' WanAttnProcessor)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g).to(torch.bfloat16)
    cos, sin = torch.randn(1, 5, 1, 8, generator=g), torch.randn(1, 5, 1, 8, generator=g)
    ref = torch.empty_like(x)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    ref[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    ref[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    assert torch.equal(rotate_torch(x, cos, sin), ref)
    out, pooled = rotate(x, cos, sin)  # CPU tensors: the eager path, no pooled means
    assert torch.equal(out, ref) and pooled is None


def test_rotary_kernel_and_fused_pooling_in_interpreter():
    """Guards the Triton rotary kernel (bit-identical to eager for bf16/fp16/fp32, odd head dims,
    sequences that are not whole tiles) and its pooled tile means (== pool_tiles of its output,
    pads skipped), then the processor path with every Triton kernel on (pooling in the rotary
    step): same densities and outputs as the torch path on a padded grid with batch 2."""
    assert importlib.util.find_spec("triton") is not None, "triton missing: pip install -e '.[dev]'"
    script = textwrap.dedent("""
        import torch
        from tests.support import reference as R
        from wan_nabla import apply_attention
        from wan_nabla.attention import backends, masks, rotary
        from wan_nabla.attention import run as P
        from wan_nabla.attention.backends import fa4
        from wan_nabla.attention.layout import TileLayout
        g = torch.Generator().manual_seed(0)
        for grid, d, dtype in (((3, 9, 13), 24, torch.float32), ((2, 8, 16), 32, torch.bfloat16),
                               ((1, 7, 40), 16, torch.float16)):
            layout = TileLayout(*grid, time_pairs=True)
            s = layout.padded_len
            x = (torch.randn(2, s, 3, d, generator=g) * 3).to(dtype)
            cos, sin = torch.randn(1, s, 1, d, generator=g), torch.randn(1, s, 1, d, generator=g)
            ref = rotary.rotate_torch(x, cos, sin)
            out, pooled = rotary.rotate(x, cos, sin, layout, impl="triton")
            assert torch.equal(out, ref), (grid, dtype)
            want = masks.pool_tiles(ref.transpose(1, 2), layout, "torch")
            assert (pooled - want).abs().max() <= 1e-6 * want.abs().max(), (grid, dtype)
        x = torch.randn(2, 100, 3, 8, generator=g).to(torch.bfloat16)  # raster order, 100 tokens
        cos, sin = torch.randn(1, 100, 1, 8, generator=g), torch.randn(1, 100, 1, 8, generator=g)
        assert torch.equal(rotary.rotate(x, cos, sin, impl="triton")[0], rotary.rotate_torch(x, cos, sin))

        # the processor path, every kernel Triton (interpreted), attention by the float64 FA4 imitation
        imitation = fa4.FA4Kernels(R.flash_attn_func_imitation, R.BlockSparseTensorsImitation,
                                   R.key_valid_mask_imitation, "imitation")
        fa4.load = lambda: (imitation, "imitation")
        fa4.DTYPES = (torch.bfloat16, torch.float16, torch.float32)
        backends.resolve_backend = lambda requested, device, dtype=None: ("fa4", "imitation")
        tr = R.tiny_transformer(seed=0)
        inputs = (torch.randn(2, 16, 3, 18, 26, generator=g), torch.tensor([700.0, 300.0]),
                  torch.randn(2, 7, 32, generator=g))
        fused = []
        real_rotate = rotary.rotate_triton
        def counting(x, cos, sin, layout=None):
            out, pooled = real_rotate(x, cos, sin, layout)
            fused.append(pooled is not None)
            return out, pooled
        for att in ({"type": "nabla_sta", "threshold": 0.4, "sta_window": [1, 1, 1], "block_size": [128, 64]},):
            results = []
            for triton_on in (False, True):
                masks.use_triton = (lambda x, impl="auto", n=None: impl != "torch") if triton_on else \\
                    (lambda x, impl="auto", n=None: impl == "triton")
                P.use_triton = masks.use_triton
                rotary.fused_ok = lambda *a, **k: triton_on
                rotary.rotate_triton = counting
                fused.clear()
                with apply_attention(tr, {**att, "backend": "fa4"}) as h, torch.no_grad():
                    out = tr(*inputs).sample
                    results.append((out, h.run.density_summary()["overall"]))
                assert (fused.count(True) == 4) == triton_on, fused  # q and k of both layers pooled
            (a, da), (b, db) = results
            assert da == db and 0 < da < 1 and (a - b).abs().max() < 1e-5, (att, da, db, (a - b).abs().max())
        print("ok")
    """)
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
