"""Sparse attention in the transformer vs independent references (compiled flex on the CPU).

Shapes: latents [B, 16, F, H, W] with patch grids 3x9x13 (needs padding: 144x208 pixels x 9
frames) and 4x8x16 (no padding), batch 2, fp32 so tolerances are tight.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.support.reference import TOL, install_reference, tiny_transformer
from wan_nabla import ConfigError, apply_attention
from wan_nabla.attention.backends import flex

PADDED = (3, 18, 26)  # latent F, H, W -> patch grid 3 x 9 x 13 (144 x 208 px video)
ALIGNED = (4, 16, 32)  # patch grid 4 x 8 x 16


@pytest.fixture(scope="module")
def transformer():
    return tiny_transformer(seed=0)


def _inputs(latent_shape, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(batch, 16, *latent_shape, generator=g)
    t = torch.tensor([700.0, 300.0][:batch])
    ehs = torch.randn(batch, 7, 32, generator=g)
    return lat, t, ehs


def _run(tr, inputs):
    with torch.no_grad():
        return tr(*inputs).sample


def _assert_close(a, b):
    torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("latent_shape", [PADDED, ALIGNED], ids=["padded", "aligned"])
@pytest.mark.parametrize(
    "attention",
    [
        {"type": "full"},
        {"type": "nabla", "threshold": 1.0},
        {"type": "sta", "sta_window": [7, 5, 5]},
        {"type": "nabla_sta", "threshold": 1.0, "sta_window": [1, 1, 1]},
    ],
    ids=["full", "nabla1", "sta-cover", "nabla1+sta"],
)
def test_full_density_equals_unpatched(transformer, latent_shape, attention):
    """Guards: tile reordering, padding, rope reordering, unpatchify restore and the flex kernel
    are exact when every tile is kept (output equals unpatched diffusers)."""
    inputs = _inputs(latent_shape)
    ref = _run(transformer, inputs)
    with apply_attention(transformer, attention) as h:
        out = _run(transformer, inputs)
        assert h.run.density_summary()["overall"] == pytest.approx(1.0)
    _assert_close(out, ref)


@pytest.mark.parametrize("latent_shape", [PADDED, ALIGNED], ids=["padded", "aligned"])
@pytest.mark.parametrize(
    "attention",
    [
        {"type": "nabla", "threshold": 0.5},
        {"type": "sta", "sta_window": [3, 1, 1]},
        {"type": "nabla_sta", "threshold": 0.3, "sta_window": [1, 3, 1]},
    ],
    ids=["nabla0.5", "sta3-1-1", "nabla0.3+sta1-3-1"],
)
def test_sparse_matches_bruteforce_and_differs_from_dense(transformer, latent_shape, attention):
    """Guards: NABLA/STA masks and the sparse kernel compute exactly the masked attention defined
    by the brute-force rules (float64, raster order, no padding), and sparsity is really applied
    (the compiled kernel honours the block table: output differs from dense)."""
    inputs = _inputs(latent_shape, seed=zlib.crc32(str(attention).encode()) % 1000)
    dense = _run(transformer, inputs)
    proc, restore = install_reference(transformer, attention)
    try:
        ref = _run(transformer, inputs)
    finally:
        restore()
    assert all(m > 1e-5 for m in proc.margins), "a CDF decision sits on a rounding tie; pick another seed"
    with apply_attention(transformer, attention) as h:
        out = _run(transformer, inputs)
        density = h.run.density_summary()["overall"]
    assert density < 0.95
    assert (out - dense).abs().max() > 1e-3, "sparse output equals dense: the block mask was ignored"
    _assert_close(out, ref)


def test_batch_items_get_their_own_masks(transformer):
    """Guards: masks are per batch item: item 1 of a batch of 2 equals running it alone."""
    att = {"type": "nabla", "threshold": 0.4}
    lat, t, ehs = _inputs(PADDED)
    with apply_attention(transformer, att):
        both = _run(transformer, (lat, t, ehs))
        alone = _run(transformer, (lat[1:], t[1:], ehs[1:]))
    _assert_close(both[1:], alone)


def test_remove_restores_bit_for_bit(transformer):
    """Guards: handle.remove() puts back the original processors and removes every hook."""
    inputs = _inputs(PADDED)
    before = _run(transformer, inputs)
    procs = [b.attn1.processor for b in transformer.blocks]
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in transformer.modules())
    h = apply_attention(transformer, {"type": "sta", "sta_window": [3, 1, 1]})
    assert _run(transformer, inputs).sub(before).abs().max() > 1e-3
    h.remove()
    assert [b.attn1.processor for b in transformer.blocks] == procs
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in transformer.modules()) == n_hooks
    assert torch.equal(_run(transformer, inputs), before)


def test_cross_attention_untouched(transformer):
    originals = [b.attn2.processor for b in transformer.blocks]
    with apply_attention(transformer, {"type": "nabla", "threshold": 0.7}):
        assert [b.attn2.processor for b in transformer.blocks] == originals
        assert all(type(b.attn1.processor).__name__ == "WanSparseAttnProcessor" for b in transformer.blocks)


def test_dense_layers_use_dense_kernel(transformer, monkeypatch):
    """Guards: blocks listed in dense_layers never call the sparse kernel."""
    calls = []
    real_sparse, real_dense = flex.sparse_attention, flex.dense_attention

    monkeypatch.setattr(flex, "sparse_attention", lambda *a, **k: calls.append("sparse") or real_sparse(*a, **k))
    monkeypatch.setattr(flex, "dense_attention", lambda *a, **k: calls.append("dense") or real_dense(*a, **k))
    with apply_attention(transformer, {"type": "sta", "sta_window": [3, 1, 1], "dense_layers": [1]}):
        _run(transformer, _inputs(PADDED))
    assert calls == ["sparse", "dense"]


@pytest.mark.parametrize(
    "attention, step",
    [
        ({"type": "nabla", "threshold": 0.3, "dense_layers": [0, 1]}, 0),
        ({"type": "sta", "sta_window": [1, 1, 1], "dense_steps": 2}, 1),
        (
            {"type": "nabla_sta", "threshold": 0.2, "sta_window": [1, 1, 1], "dense_steps": 1, "block_size": [128, 64]},
            0,
        ),
    ],
    ids=["dense-layers", "dense-steps", "dense-step-128-pairs"],
)
def test_dense_path_on_a_padded_grid_equals_unpatched(transformer, attention, step):
    """Guards: with a sparse type, dense layers and dense steps still run in tile order with pad
    tokens in the sequence; pad keys must get no weight there either (a mutant that let dense
    attention see pad keys changed outputs by 0.1 and passed every other test)."""
    inputs = _inputs(PADDED)
    ref = _run(transformer, inputs)
    with apply_attention(transformer, attention) as h:
        h.run.set_step(step)
        out = _run(transformer, inputs)
        assert h.run.layout is not None and h.run.layout.needs_padding  # tile order with pads
        assert h.run.density_summary()["overall"] == 1.0
    _assert_close(out, ref)


def test_dense_layers_out_of_range_is_a_clear_error(transformer):
    with pytest.raises(ConfigError, match="dense_layers"):
        apply_attention(transformer, {"type": "sta", "sta_window": [3, 1, 1], "dense_layers": [5]})


def test_double_apply_refused(transformer):
    with apply_attention(transformer, {"type": "full"}):
        with pytest.raises(RuntimeError, match="already applied"):
            apply_attention(transformer, {"type": "full"})


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"type": "sparse"}, "attention.type"),
        ({"type": "nabla"}, "attention.threshold"),
        ({"type": "nabla", "threshold": 1.5}, "attention.threshold"),
        ({"type": "nabla", "threshold": 0}, "attention.threshold"),
        ({"type": "sta", "sta_window": [2, 3, 3]}, "attention.sta_window"),
        ({"type": "sta", "sta_window": [3, 3]}, "attention.sta_window"),
        ({"type": "sta", "sta_window": [3, -1, 3]}, "attention.sta_window"),
        ({"type": "full", "treshold": 0.5}, "attention.treshold"),
        ({"type": "full", "dense_steps": -1}, "attention.dense_steps"),
        ({"type": "full", "block_size": [96, 64]}, "attention.block_size"),
    ],
)
def test_bad_attention_config_names_the_key(transformer, bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_attention(transformer, bad)
    assert all(type(b.attn1.processor).__name__ != "WanSparseAttnProcessor" for b in transformer.blocks)


def test_coarse_blocks_are_a_superset_and_still_exact(transformer):
    """Guards: 128-token blocks keep every tile pair the tile mask keeps (never less), and the
    kernel is still exact at full coverage with 128-token blocks and padding."""
    inputs = _inputs(PADDED)
    ref = _run(transformer, inputs)
    with apply_attention(transformer, {"type": "nabla", "threshold": 1.0, "block_size": [128, 128]}):
        _assert_close(_run(transformer, inputs), ref)
    with apply_attention(transformer, {"type": "nabla", "threshold": 0.5}) as h64:
        _run(transformer, inputs)
        d64 = h64.run.density_summary()["overall"]
    with apply_attention(transformer, {"type": "nabla", "threshold": 0.5, "block_size": [128, 64]}) as h128:
        out128 = _run(transformer, inputs)
        d128 = h128.run.density_summary()["overall"]
    assert d128 >= d64
    assert (out128 - ref).abs().max() > 1e-4


@pytest.mark.parametrize("latent_shape", [PADDED, (5, 16, 32)], ids=["padded-3frames", "aligned-5frames"])
@pytest.mark.parametrize(
    "attention",
    [
        {"type": "nabla", "threshold": 0.4, "block_size": [128, 64]},
        {"type": "sta", "sta_window": [1, 1, 1], "block_size": [128, 64]},
        {"type": "nabla_sta", "threshold": 0.3, "sta_window": [1, 3, 1], "block_size": [128, 64]},
    ],
    ids=["nabla0.4", "sta1-1-1", "nabla0.3+sta1-3-1"],
)
def test_time_paired_query_blocks_match_bruteforce(transformer, latent_shape, attention):
    """Guards: with 128-token query blocks the tiles are time-paired (the default) and a query
    block keeps the OR of its two tiles' key tiles: output == float64 brute force that pairs
    tiles by the definition ((t, i, j) with (t+1, i, j); odd last frame row-major), odd and even
    frame counts, padding, batch 2."""
    inputs = _inputs(latent_shape, seed=zlib.crc32(str(attention).encode()) % 1000)
    dense = _run(transformer, inputs)
    proc, restore = install_reference(transformer, attention, time_pairs=True)
    try:
        ref = _run(transformer, inputs)
    finally:
        restore()
    assert all(m > 1e-5 for m in proc.margins)
    with apply_attention(transformer, attention) as h:
        out = _run(transformer, inputs)
        assert h.run.layout.time_pairs
    assert (out - dense).abs().max() > 1e-3
    _assert_close(out, ref)


def test_time_pairs_off_pairs_spatial_neighbours(transformer):
    """Guards: time_pairs=false keeps the row-major tile order (query blocks = side-by-side tiles),
    which differs from the paired result for a mask that is not pair-symmetric."""
    inputs = _inputs((4, 16, 32))
    att = {"type": "sta", "sta_window": [1, 1, 1], "block_size": [128, 64]}
    with apply_attention(transformer, att) as h:
        paired = _run(transformer, inputs)
        d_paired = h.run.density_summary()["overall"]
    with apply_attention(transformer, {**att, "time_pairs": False}) as h:
        spatial = _run(transformer, inputs)
        assert not h.run.layout.time_pairs
        d_spatial = h.run.density_summary()["overall"]
    # 4 frames x 2 tiles: paired blocks see 2 frames x 1 square, spatial blocks 1 frame x 2 squares
    assert d_paired == pytest.approx(d_spatial) and (paired - spatial).abs().max() > 1e-3
