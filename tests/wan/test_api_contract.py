"""The Python API under diffusers' own usage: a patched transformer inside diffusers' WanPipeline,
deep copies, processor swaps, torch.compile, training, geometry.

Modelled on the behaviours diffusers' Wan tests check (tests/pipelines/wan/test_wan.py and
tests/models/transformers/test_models_transformer_wan.py): batch of prompts, num_videos_per_prompt,
callbacks, output types, save/load round trip, dtype moves, attn_processors listing, fused QKV,
determinism; each with the patch in `full`, NABLA 1.0 and a sparse config, so a diffusers upgrade
that breaks the patch fails here. The tiny pipeline runs on the CPU.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from tests.support import reference as R
from wan_nabla import apply_attention
from wan_nabla.attention import backends, masks
from wan_nabla.attention.config import AttentionConfig, ConfigError
from wan_nabla.attention.layout import TileLayout
from wan_nabla.wan.processor import WanSparseAttnProcessor

CONFIGS = {
    "full": {"type": "full"},
    "nabla1": {"type": "nabla", "threshold": 1.0},
    "sparse": {"type": "nabla_sta", "threshold": 0.3, "sta_window": [1, 1, 1]},
}
PADDED = (2, 18, 26)  # latents -> patch grid 2 x 9 x 13: pad tokens in every frame


def _inputs(seed=0, batch=1, latent=PADDED):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 16, *latent, generator=g),
        torch.tensor([700.0] * batch),
        torch.randn(batch, 7, 32, generator=g),
    )


def _call(tr, inputs):
    with torch.no_grad():
        return tr(*inputs).sample


@pytest.fixture(scope="module")
def transformer():
    return R.tiny_transformer(seed=0)


# ---- issue: deep copies -----------------------------------------------------------------------------
def test_deepcopy_gives_an_independent_patched_copy(transformer):
    """Guards: copy.deepcopy of a patched transformer runs (the hooks used to keep pointing at the
    original's run: "sparse attention called without a tile layout"), equals the original, has a
    run of its own, and removing one patch leaves the other exact."""
    inputs = _inputs()
    ref = _call(transformer, inputs)
    with apply_attention(transformer, CONFIGS["sparse"]) as h:
        want = _call(transformer, inputs)
        twin = copy.deepcopy(transformer)
        twin_handle = twin._wan_nabla_handle
        assert twin_handle.run is not h.run and twin_handle.run.run_id != h.run.run_id
        assert all(b.attn1.processor.run is twin_handle.run for b in twin.blocks)
        torch.testing.assert_close(_call(twin, _inputs(seed=1)), _call(transformer, _inputs(seed=1)), rtol=0, atol=0)
        torch.testing.assert_close(_call(twin, inputs), want, rtol=0, atol=0)
        assert twin_handle.run.calls_per_step() and h.run.calls_per_step()
        twin_handle.remove()
        torch.testing.assert_close(_call(twin, inputs), ref, rtol=0, atol=0)
        torch.testing.assert_close(_call(transformer, inputs), want, rtol=0, atol=0)
    assert (want - ref).abs().max() > 1e-3  # the sparse config really changes the output


# ---- issue: processor swaps -------------------------------------------------------------------------
def test_processor_swap_under_an_active_patch_raises_one_clear_error(transformer):
    """Guards: set_attn_processor while the patch is active used to run diffusers' processor on
    tile-ordered, padded tokens (pad keys attended, 0.14 off dense, no error); it raises one
    RuntimeError naming the fix, and handle.remove() afterwards restores exact behaviour."""
    inputs = _inputs()
    ref = _call(transformer, inputs)
    h = apply_attention(transformer, CONFIGS["sparse"])
    try:
        transformer.set_attn_processor(WanAttnProcessor())
        with pytest.raises(
            RuntimeError,
            match=r"blocks\[0\]\.attn1\.processor was replaced by WanAttnProcessor.*"
            r"handle\.remove\(\)",
        ):
            _call(transformer, inputs)
    finally:
        h.remove()
    torch.testing.assert_close(_call(transformer, inputs), ref, rtol=0, atol=0)
    assert all(isinstance(b.attn1.processor, WanAttnProcessor) for b in transformer.blocks)
    assert not transformer._forward_pre_hooks and not transformer.patch_embedding._forward_hooks


def test_attn_processors_listing_and_remove_are_exact(transformer):
    """Guards diffusers' attn_processors: the patch shows up on attn1 only, and remove() puts the
    very same processor objects back."""
    before = dict(transformer.attn_processors)
    with apply_attention(transformer, CONFIGS["nabla1"]):
        now = transformer.attn_processors
        assert {k for k, v in now.items() if isinstance(v, WanSparseAttnProcessor)} == {
            k for k in before if ".attn1." in k
        }
        assert all(now[k] is v for k, v in before.items() if ".attn2." in k)
    assert all(transformer.attn_processors[k] is v for k, v in before.items())


# ---- issue: training -----------------------------------------------------------------------------
def test_backward_through_a_sparse_call_is_refused_and_full_trains(transformer):
    """Guards the documented training rule: a sparse call with inputs that require grad raises one
    clear error (no backend's wrapper has a backward); `full` runs SDPA and backpropagates."""
    inputs = _inputs()
    with apply_attention(transformer, CONFIGS["sparse"]):
        with pytest.raises(RuntimeError, match="inference-only"):
            transformer(*inputs)
    with apply_attention(transformer, CONFIGS["full"]):
        transformer(*inputs).sample.square().mean().backward()
    grads = [p.grad for p in transformer.blocks[0].attn1.to_q.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    transformer.zero_grad(set_to_none=True)


# ---- geometry: exact vs fast -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "attention",
    [
        {"type": "nabla", "threshold": 0.5},
        {"type": "sta", "sta_window": [1, 3, 3]},
    ],
    ids=["nabla", "sta"],
)
def test_exact_geometry_is_the_tile_mask_and_fast_pairs_query_tiles(attention):
    """Guards attention.geometry: exact = 64x64 blocks in plain tile order, equal to the brute-force
    tile mask; fast (the CUDA geometry of flex: 128x64 time-paired) ORs two query tiles, so on a
    grid of several frames its plan keeps more token pairs than exact and is not the tile mask."""
    cuda = torch.device("cuda")  # the geometry rule only; nothing runs on a GPU
    exact = backends.geometry(AttentionConfig(**attention, geometry="exact"), "flex", cuda)
    fast = backends.geometry(AttentionConfig(**attention), "flex", cuda)
    assert (exact.block_size, exact.time_pairs) == ((64, 64), False)
    assert (fast.block_size, fast.time_pairs) == ((128, 64), True)
    grid = (4, 16, 24)  # 4 frames of 2 x 3 tiles
    g = torch.Generator().manual_seed(3)
    plain = TileLayout(*grid)
    q_fm, k_fm = (torch.randn(1, 2, plain.padded_len, 16, generator=g) for _ in range(2))  # frame-major tiles
    cfg = AttentionConfig(**attention)
    seen = {}
    for geo in (exact, fast):
        layout = TileLayout(*grid, time_pairs=geo.time_pairs)
        t, i, j = layout.tile_coords().unbind(-1)
        fm = (t * layout.tiles_h + i) * layout.tiles_w + j  # frame-major index of each tile in this order
        q, k = (x.unflatten(2, (layout.n_tiles, 64))[:, :, fm].flatten(2, 3) for x in (q_fm, k_fm))
        plan = masks.plan_blocks(cfg, q, k, layout, geo.block_size, impl="torch")
        keep = masks.tile_keep_mask(cfg, q, k, layout, "torch")
        keep = keep.expand(1, 2, layout.n_tiles, layout.n_tiles) if keep.dim() == 2 else keep
        order = fm.argsort()  # back to frame-major, so both geometries compare on the same tiles
        blocks = _plan_blocks_dense(plan, layout).expand_as(keep)  # STA's plan is one [1, 1] row set
        seen[geo.name] = tuple(m[..., order, :][..., order] for m in (blocks, keep))
    blocks_exact, keep_exact = seen["exact"]
    blocks_fast, keep_fast = seen["fast"]
    assert torch.equal(keep_fast, keep_exact)  # one rule, whatever the tile order
    assert torch.equal(blocks_exact, keep_exact)  # exact: the tile mask itself
    assert (blocks_fast >= keep_fast).all() and not torch.equal(blocks_fast, keep_fast)  # fast: a superset


def _plan_blocks_dense(plan, layout):
    """BlockPlan -> [B, H, n_tiles, n_tiles] bool tile pairs the kernel computes (brute force)."""
    bq, bkv = plan.block_size[0] // 64, plan.block_size[1] // 64
    n = layout.n_tiles
    b, h, mq = plan.full_num.shape
    out = torch.zeros(b, h, n, n, dtype=torch.bool)
    for num, idx in ((plan.kv_num, plan.kv_idx), (plan.full_num, plan.full_idx)):
        for bi in range(b):
            for hi in range(h):
                for qb in range(mq):
                    for kb in idx[bi, hi, qb, : int(num[bi, hi, qb])].tolist():
                        out[bi, hi, qb * bq : (qb + 1) * bq, kb * bkv : (kb + 1) * bkv] = True
    return out


def test_geometry_is_validated_and_recorded(transformer):
    """Guards the config key (one-line errors) and the sidecar record of the geometry used."""
    with pytest.raises(ConfigError, match=r"attention.geometry: 'fastest' is not allowed; use one of fast, exact"):
        AttentionConfig(geometry="fastest")
    with pytest.raises(ConfigError, match=r"attention.block_size: \[128, 64\] contradicts geometry exact"):
        AttentionConfig(type="sta", sta_window=[1, 1, 1], block_size=[128, 64], geometry="exact")
    with apply_attention(transformer, {**CONFIGS["sparse"], "geometry": "exact"}) as h:
        _call(transformer, _inputs())
        assert h.run.density_summary()["geometry"] == {"geometry": "exact", "block_size": [64, 64], "time_pairs": False}


# ---- issue: compile -----------------------------------------------------------------------------
def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.mark.slow
@pytest.mark.parametrize("route", ["torch.compile", "compile_repeated_blocks"])
def test_compile_fullgraph_without_recompiles_equals_eager(route):
    """Guards: a patched transformer compiles with fullgraph=True both ways diffusers documents
    (the processor used to log inside the traced path: a graph break; Dynamo guarded on the
    growing density list: a recompile per call), compiles nothing more after its second call
    across seeds and prompts of one shape, and matches eager. (The process-wide compiled flex
    inside the op compiles one variant on the first call after a fresh trace, for the tensors'
    dispatch keys, and one on the second; the transformer's own graph compiles once.)"""
    tr = R.tiny_transformer(seed=0)
    latent = (2, 18, 18)
    seeds = range(4)
    with apply_attention(tr, CONFIGS["sparse"]) as h:
        eager = [_call(tr, _inputs(seed=s, latent=latent)) for s in seeds]
        h.run.reset_stats()
        torch._dynamo.reset()
        if route == "torch.compile":
            model = torch.compile(tr, fullgraph=True)
        else:
            tr.compile_repeated_blocks(fullgraph=True)
            model = tr
        outs = [_call(model, _inputs(seed=s, latent=latent)) for s in seeds[:2]]
        after_second = _graphs()
        outs += [_call(model, _inputs(seed=s, latent=latent)) for s in seeds[2:]]
        assert _graphs() == after_second
        assert h.run.calls_per_step()[0] == len(seeds) * len(tr.blocks)
    for a, b in zip(eager, outs, strict=False):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ---- diffusers' WanPipeline with the patch -------------------------------------------------------
@pytest.fixture(params=list(CONFIGS), scope="module")
def patched_pipe(request, tiny_pipe):
    h = apply_attention(tiny_pipe.transformer, CONFIGS[request.param])
    yield tiny_pipe, h
    h.remove()


def _pipe_kwargs(**kw):
    base = {
        "height": 32,
        "width": 48,
        "num_frames": 5,
        "num_inference_steps": 2,
        "guidance_scale": 2.0,
        "output_type": "pt",
        "max_sequence_length": 16,
    }
    return {**base, **kw}


@pytest.mark.slow
def test_pipeline_batch_videos_per_prompt_callbacks_and_determinism(patched_pipe):
    """Guards WanPipeline.__call__ with the patch: a batch of two prompts times two videos each,
    the step-end callback once per step, a seeded generator reproduces the video exactly, and
    the np output type equals the pt one."""
    pipe, h = patched_pipe
    steps = []

    def on_step(p, i, t, kw):
        steps.append(i)
        return kw

    kw = _pipe_kwargs(prompt=["a fox", "a cat"], num_videos_per_prompt=2, callback_on_step_end=on_step)
    out = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    assert out.shape[:2] == (4, 5) and torch.isfinite(out).all() and steps == [0, 1]
    again = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    np_out = pipe(**_pipe_kwargs(prompt="a fox", output_type="np"), generator=torch.Generator().manual_seed(1)).frames
    pt_out = pipe(**_pipe_kwargs(prompt="a fox"), generator=torch.Generator().manual_seed(1)).frames
    assert isinstance(np_out, np.ndarray)
    np.testing.assert_allclose(np_out, pt_out.permute(0, 1, 3, 4, 2).numpy(), atol=1e-6)
    assert h.run.calls_per_step()


def test_fused_qkv_dtype_moves_and_save_load_round_trip(patched_pipe, tmp_path):
    """Guards: fused projections (to_qkv) give the unfused output; a deep copy of the patched
    transformer moves to bfloat16; save_pretrained writes diffusers' own weights (the patch is not state),
    and the reloaded model patched the same way gives the same output."""
    from diffusers import WanTransformer3DModel

    pipe, h = patched_pipe
    tr = pipe.transformer
    g = torch.Generator().manual_seed(2)
    inputs = (
        torch.randn(1, 16, 2, 4, 6, generator=g),
        torch.tensor([500.0]),
        torch.randn(1, 7, tr.config.text_dim, generator=g),
    )
    ref = _call(tr, inputs)
    tr.fuse_qkv_projections()
    try:
        torch.testing.assert_close(_call(tr, inputs), ref, rtol=1e-5, atol=1e-5)
    finally:
        tr.unfuse_qkv_projections()
    moved = copy.deepcopy(tr).to(torch.bfloat16)  # a copy: the pipeline fixture is shared
    low = _call(moved, tuple(t.to(torch.bfloat16) for t in inputs))
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1
    tr.save_pretrained(tmp_path)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path)
    with apply_attention(loaded, h.run.config):
        torch.testing.assert_close(_call(loaded, inputs), ref, rtol=0, atol=0)
