"""The flash-attn-4 backend without a GPU: everything but the CuTe kernel itself.

flash-attn-4 runs only on sm90+ GPUs, so these tests replace its three entry points by the float64
imitation in tests/support/reference.py, which follows FA4's documented list semantics literally (mask
blocks masked, full blocks not, lists walked from the last entry with only the first block bounds-
checked). What is tested: the BlockPlan -> BlockSparseTensorsTorch conversion, the pad-key
validity vector, the backend choice (auto/flex/fa4, CPU, unsupported GPUs, missing or broken
FA4: one log line and flex), and the processor path (transposes, gathered dense keys, padded
grids, batch 2) against float64 references. benchmarks/jobs/gpu_fa4_check.py runs the real kernel.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from tests.support import ROOT
from tests.support import reference as R
from wan_nabla import apply_attention
from wan_nabla.attention import backends, masks
from wan_nabla.attention import run as P
from wan_nabla.attention.backends import fa4
from wan_nabla.attention.layout import TILE_TOKENS, TileLayout
from wan_nabla.config import AttentionConfig, ConfigError

BLOCKS = [(128, 128), (128, 64), (64, 64), (64, 128)]
PADDED = (3, 18, 26)  # latents -> patch grid 3 x 9 x 13: pads, odd tile count per frame


@pytest.fixture
def fake_fa4(monkeypatch):
    """flash-attn-4 replaced by the float64 imitation; float32 allowed so CPU tests stay exact."""
    imitation = fa4.FA4Kernels(
        R.flash_attn_func_imitation, R.BlockSparseTensorsImitation, R.key_valid_mask_imitation, "imitation"
    )
    monkeypatch.setattr(fa4, "load", lambda: (imitation, "flash-attn-4 imitation"))
    monkeypatch.setattr(fa4, "DTYPES", (torch.bfloat16, torch.float16, torch.float32))
    monkeypatch.setattr(fa4, "_verified", set())
    return imitation


@pytest.fixture
def fa4_on_cpu(fake_fa4, monkeypatch):
    """AttentionRun resolves to fa4 on the CPU (the real resolver keeps the CPU on flex)."""

    def resolve(requested, device, dtype=None):
        return ("flex", "attention.backend is flex") if requested == "flex" else ("fa4", "imitation on the CPU")

    monkeypatch.setattr(backends, "resolve_backend", resolve)
    return fake_fa4


def _keep(layout, batch=2, heads=2, density=0.35, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = layout.n_tiles
    keep = torch.rand((batch, heads, n, n), generator=g) < density
    return keep | torch.eye(n, dtype=torch.bool)  # every query tile keeps a key tile: no empty rows


def _blocks_brute_force(keep, block_size):
    """Kept blocks by the definition (a block is kept iff one of its tile pairs is)."""
    qt, kt = block_size[0] // TILE_TOKENS, block_size[1] // TILE_TOKENS
    n = keep.shape[-1]
    out = torch.zeros(*keep.shape[:2], -(-n // qt), -(-n // kt), dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            out[:, :, i // qt, j // kt] |= keep[:, :, i, j]
    return out


def _qkv(layout, batch=2, heads=2, d=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    # [B, S, H, D] storage viewed as BHSD, as the processor hands them over
    return tuple(torch.randn((batch, layout.padded_len, heads, d), generator=g).transpose(1, 2) for _ in range(3))


def test_block_sparse_args_are_the_plan_lists_one_to_one():
    """Guards the conversion: mask_* are the partial (pad-holding) lists, full_* the others, int32,
    contiguous, block_size as Python ints; a wrong dtype is refused."""
    layout = TileLayout(3, 9, 13, time_pairs=True)
    plan = masks.plan_from_keep(_keep(layout), layout, (128, 128))
    args = fa4.block_sparse_args(plan)
    pairs = {
        "mask_block_cnt": plan.kv_num,
        "mask_block_idx": plan.kv_idx,
        "full_block_cnt": plan.full_num,
        "full_block_idx": plan.full_idx,
    }
    for name, t in pairs.items():
        assert torch.equal(args[name], t) and args[name].dtype == torch.int32 and args[name].is_contiguous()
    assert args["block_size"] == (128, 128) and all(type(x) is int for x in args["block_size"])
    assert int(plan.kv_num.sum()) > 0 and int(plan.full_num.sum()) > 0  # both lists in use
    bad = masks.BlockPlan(
        plan.kv_num.long(), plan.kv_idx, plan.full_num, plan.full_idx, (128, 128), layout, plan.density
    )
    with pytest.raises(ValueError, match="mask_block_cnt must be int32"):
        fa4.block_sparse_args(bad)


@pytest.mark.parametrize("grid", [(3, 9, 13), (1, 7, 40), (2, 8, 16)])
def test_validity_vector_marks_real_tokens(grid):
    """Guards the mask_mod's aux tensor: int32, 1 exactly at real tokens of the tile order
    (independent reference), 0 at pads and past the end, length a multiple of 128."""
    layout = TileLayout(*grid, time_pairs=True)
    valid = fa4.validity(layout, "cpu")
    ref = R.valid_tile_order(layout)
    assert valid.dtype == torch.int32 and len(valid) % 128 == 0 and len(valid) >= layout.padded_len
    assert torch.equal(valid[: layout.padded_len].bool(), ref) and not valid[layout.padded_len :].any()


@pytest.mark.parametrize("grid", [(3, 9, 13), (1, 7, 40), (2, 8, 16)], ids=["pads", "pads-5tiles", "aligned"])
@pytest.mark.parametrize("block_size", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_fa4_sparse_path_equals_float64_masked_attention(fake_fa4, grid, block_size):
    """Guards the whole FA4 sparse path but the kernel: plan lists in FA4's list semantics, pad keys
    masked through the validity mask_mod on partial blocks only, odd tile counts whose last 128-key
    block reaches past the sequence, batch 2, broadcast (STA) plans: output == float64 attention
    under the brute-force token mask."""
    layout = TileLayout(*grid, time_pairs=True)
    q, k, v = _qkv(layout)
    keep = _keep(layout, seed=sum(grid))
    for tile_keep in (keep, keep[:1, :1]):  # per (batch, head), and broadcast like a cached STA plan
        plan = masks.plan_from_keep(tile_keep, layout, block_size)
        out = fa4.sparse_attention(q, k, v, plan)
        blocks = _blocks_brute_force(tile_keep.expand(2, 2, -1, -1), block_size)
        token_keep = R.token_keep_from_blocks(blocks, block_size, layout.padded_len, R.valid_tile_order(layout))
        ref = R.masked_attention_f64(q, k, v, token_keep)
        torch.testing.assert_close(out.double(), ref, **R.TOL[torch.float64])
        assert out.shape == q.shape


def test_past_the_end_block_in_the_full_list_would_be_wrong(fake_fa4):
    """Guards the test above: a key block reaching past the sequence end that FA4 does not
    bounds-check (full list, not processed first) reads zero-filled keys; the imitation must show
    that, or the conversion's rule (such blocks are partial blocks) is untested."""
    layout = TileLayout(1, 8, 24, time_pairs=True)  # 3 tiles: the last 128-key block reaches past the end
    q, k, v = _qkv(layout, seed=3)
    keep = torch.ones((2, 2, layout.n_tiles, layout.n_tiles), dtype=torch.bool)
    plan = masks.plan_from_keep(keep, layout, (128, 128))
    assert int(plan.kv_num.max()) == 1 and int(plan.full_num.max()) == 1
    good = fa4.sparse_attention(q, k, v, plan)
    token_keep = R.token_keep_from_blocks(
        _blocks_brute_force(keep, (128, 128)), (128, 128), layout.padded_len, R.valid_tile_order(layout)
    )
    torch.testing.assert_close(good.double(), R.masked_attention_f64(q, k, v, token_keep), **R.TOL[torch.float64])
    # the same kept blocks as one full list in descending order: the past-the-end block is no
    # longer the one FA4 bounds-checks
    both = torch.tensor([1, 0], dtype=torch.int32).expand(2, 2, 2, 2).contiguous()
    wrong = masks.BlockPlan(
        torch.zeros_like(plan.kv_num),
        plan.kv_idx,
        torch.full_like(plan.full_num, 2),
        both,
        (128, 128),
        layout,
        plan.density,
    )
    assert (fa4.sparse_attention(q, k, v, wrong) - good).abs().max() > 1e-3


def test_fa4_dense_path_with_fewer_keys_than_queries(fake_fa4):
    """Guards dense FA4 on a padded tile layout: keys/values gathered to the real tokens (fewer than
    the queries) give exactly dense attention over real keys."""
    layout = TileLayout(3, 9, 13, time_pairs=True)
    q, k, v = _qkv(layout)
    real = layout.real_token_index("cpu")
    kr, vr = (t.index_select(2, real) for t in (k, v))
    out = fa4.dense_attention(q, kr, vr)
    ref = R.masked_attention_f64(q, kr, vr, torch.ones(q.shape[2], kr.shape[2], dtype=torch.bool))
    torch.testing.assert_close(out.double(), ref, **R.TOL[torch.float64])


# ---- the backend choice ------------------------------------------------------------------------------
def _gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    return torch.device("cuda", 0)


@pytest.mark.parametrize("capability, expect", [((9, 0), "fa4"), ((10, 0), "fa4"), ((8, 0), "flex"), ((12, 0), "flex")])
def test_auto_takes_fa4_only_where_it_honours_block_tables(fake_fa4, monkeypatch, capability, expect):
    """Guards the rule: auto = fa4 on sm90-sm110 with FA4 installed; sm80/sm120 (where FA4 ignores
    block tables) and fp32 inputs stay on flex; the CPU always runs flex; flex is flex."""
    dev = _gpu(monkeypatch, capability)
    monkeypatch.setattr(fa4, "DTYPES", (torch.bfloat16, torch.float16))  # the real rule: no fp32
    name, why = backends.resolve_backend("auto", dev, torch.bfloat16)
    assert name == expect, why
    if expect == "flex":
        assert f"sm{capability[0]}{capability[1]}" in why
    assert backends.resolve_backend("auto", dev, torch.float32)[0] == "flex"
    assert backends.resolve_backend("flex", dev, torch.bfloat16)[0] == "flex"
    assert backends.resolve_backend("fa4", torch.device("cpu"), torch.bfloat16) == ("flex", "the CPU always runs flex")


def test_missing_fa4_means_flex_with_a_reason(monkeypatch):
    """Guards: without flash-attn-4 (or with a broken install) auto and fa4 resolve to flex, and the
    reason names the import failure."""
    monkeypatch.setattr(fa4, "load", lambda: (None, "ModuleNotFoundError: No module named 'flash_attn'"))
    dev = _gpu(monkeypatch, (9, 0))
    for requested in ("auto", "fa4"):
        name, why = backends.resolve_backend(requested, dev, torch.bfloat16)
        assert name == "flex" and "No module named 'flash_attn'" in why


def test_real_load_never_raises():
    """Guards: loading FA4 where it is absent (CI) or broken returns a reason instead of raising."""
    fa, why = fa4.load()
    assert (fa is None and why) or (fa is not None and why.startswith("flash-attn-4"))


def test_backend_choice_is_logged_once(monkeypatch, caplog):
    """Guards: one log line per distinct choice; asking for fa4 and getting flex is a warning."""
    monkeypatch.setattr(backends, "_logged", set())
    with caplog.at_level(logging.INFO, logger="wan_nabla.attention.backends"):
        for _ in range(3):
            backends.log_choice("fa4", "flex", "flash-attn-4 not usable: ImportError: x")
            backends.log_choice("auto", "flex", "the CPU always runs flex")
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]
    assert "attention backend: flex (requested fa4; flash-attn-4 not usable" in caplog.records[0].getMessage()


def test_backend_is_validated_and_overridable():
    """Guards the config key and the --attention-backend override (one-line ConfigError)."""
    from wan_nabla.config import RunConfig

    with pytest.raises(ConfigError, match=r"attention.backend: 'cuda' is not allowed; use one of auto, flex, fa4"):
        AttentionConfig(backend="cuda")
    cfg = RunConfig().override(attention_backend="flex")
    assert cfg.attention.backend == "flex" and AttentionConfig().backend == "auto"
    assert AttentionConfig.from_mapping(cfg.attention.to_dict()) == cfg.attention


def test_default_geometry_follows_the_backend():
    """Guards the per-backend table: flex 128x64, fa4 128x64 (both time-paired; the H100 probe's
    fastest by total time) on CUDA, the exact 64x64 tile mask on the CPU whatever the backend."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert backends.geometry(AttentionConfig(), "flex", cuda).block_size == (128, 64)
    assert backends.geometry(AttentionConfig(), "fa4", cuda).block_size == (128, 64)
    assert all(backends.geometry(AttentionConfig(), b, cuda).time_pairs for b in ("flex", "fa4"))
    assert backends.geometry(AttentionConfig(), "fa4", cpu).block_size == (64, 64)


# ---- the processor path with the imitation ------------------------------------------------------------
def _inputs(latent_shape=PADDED, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 16, *latent_shape, generator=g),
        torch.tensor([700.0, 300.0][:batch]),
        torch.randn(batch, 7, 32, generator=g),
    )


def _run(tr, inputs):
    with torch.no_grad():
        return tr(*inputs).sample


@pytest.fixture(scope="module")
def transformer():
    return R.tiny_transformer(seed=0)


@pytest.mark.parametrize(
    "attention",
    [
        {"type": "nabla", "threshold": 0.4, "block_size": [128, 64]},
        {"type": "nabla_sta", "threshold": 0.3, "sta_window": [1, 3, 1], "block_size": [64, 64]},
        {"type": "sta", "sta_window": [1, 1, 1], "block_size": [128, 64]},
    ],
    ids=["nabla0.4-128x64", "nabla+sta-64x64", "sta-128x64"],
)
def test_fa4_backend_matches_float64_reference_and_flex(fa4_on_cpu, transformer, attention):
    """Guards the processor's FA4 dispatch: padded grid, batch 2, masks per batch item; output ==
    the float64 brute force and the flex backend, and the FA4 path really ran (not a fallback)."""
    inputs = _inputs()
    proc, restore = R.install_reference(transformer, attention, time_pairs=attention["block_size"][0] == 128)
    try:
        ref = _run(transformer, inputs)
    finally:
        restore()
    assert all(m > 1e-5 for m in proc.margins)
    with apply_attention(transformer, {**attention, "backend": "fa4"}) as h:
        out = _run(transformer, inputs)
        assert h.run.density_summary()["backend"] == "fa4" and h.run.fallback is None
    with apply_attention(transformer, {**attention, "backend": "flex"}) as h:
        flex = _run(transformer, inputs)
        assert h.run.density_summary()["backend"] == "flex"
    torch.testing.assert_close(out, ref, **R.TOL[torch.float32])
    torch.testing.assert_close(out, flex, **R.TOL[torch.float32])


@pytest.mark.parametrize(
    "attention",
    [
        {"type": "full"},
        {"type": "nabla", "threshold": 1.0, "block_size": [128, 128]},
        {"type": "sta", "sta_window": [3, 1, 1], "dense_steps": 1},
    ],
    ids=["full", "nabla1-128x128", "dense-step"],
)
def test_fa4_dense_and_full_coverage_equal_unpatched(fa4_on_cpu, transformer, attention):
    """Guards FA4 dense attention (raster `full`, and dense steps in tile order where pad keys are
    gathered out) and 128x128 blocks at full coverage on a padded grid: output == unpatched."""
    inputs = _inputs()
    ref = _run(transformer, inputs)
    with apply_attention(transformer, {**attention, "backend": "fa4"}) as h:
        out = _run(transformer, inputs)
        assert h.run.density_summary()["backend"] == "fa4"
    torch.testing.assert_close(out, ref, **R.TOL[torch.float32])


def test_broken_fa4_falls_back_to_flex_with_one_warning(fa4_on_cpu, transformer, monkeypatch, caplog):
    """Guards "never a hard requirement": FA4 raising on its first call gives one warning naming the
    error, this and every later call run flex, and the output equals the flex backend's."""

    def broken(*a, **kw):
        raise RuntimeError("cute DSL compile failed: unsupported arch")

    monkeypatch.setattr(
        fa4,
        "load",
        lambda: (fa4.FA4Kernels(broken, R.BlockSparseTensorsImitation, R.key_valid_mask_imitation, "broken"), "x"),
    )
    att = {"type": "nabla", "threshold": 0.4, "block_size": [64, 64]}
    inputs = _inputs()
    monkeypatch.setattr(backends, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="wan_nabla"):
        with apply_attention(transformer, {**att, "backend": "fa4"}) as h:
            out = _run(transformer, inputs)
            assert "unsupported arch" in h.run.fallback and h.run.density_summary()["backend"] == "flex"
    assert len(caplog.records) == 1 and "unsupported arch" in caplog.records[0].getMessage()
    with apply_attention(transformer, {**att, "backend": "flex"}):
        torch.testing.assert_close(out, _run(transformer, inputs), rtol=0, atol=0)


def test_fa4_unsupported_head_dim_runs_flex_for_that_call(fa4_on_cpu):
    """Guards per-call inputs: a head_dim FA4 cannot take (not a multiple of 8) runs flex."""
    run = P.AttentionRun(AttentionConfig(type="full", backend="fa4"))
    q = torch.randn(1, 2, 64, 12)
    assert fa4.unsupported(q) and run.kernel_for(q) == "flex"
    assert run.kernel_for(torch.randn(1, 2, 64, 16)) == "fa4"
    assert math.isclose(
        float((run.dense(q, q, q) - torch.nn.functional.scaled_dot_product_attention(q, q, q)).abs().max()),
        0.0,
        abs_tol=1e-6,
    )


def test_gpu_check_script_runs_on_the_cpu(fa4_on_cpu, monkeypatch, tmp_path):
    """Guards benchmarks/jobs/gpu_fa4_check.py against typos before a GPU run: its --quick CPU mode (with
    the imitation) runs every section and passes its own checks."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("gpu_fa4_check", ROOT / "benchmarks" / "jobs" / "gpu_fa4_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    real = backends.resolve_backend
    monkeypatch.setattr(
        backends,
        "resolve_backend",
        lambda requested, device, dtype=None: (
            ("fa4", "imitation") if requested != "flex" else real(requested, device, dtype)
        ),
    )
    assert mod.main([str(tmp_path), "--device", "cpu", "--quick"]) == 0
    res = json.loads((tmp_path / "gpu_fa4_check.json").read_text())
    assert res["commit"] not in (None, "unknown") and res["command"].endswith("--device cpu --quick")
    assert res["env"]["commit"] == res["commit"] and res["env"]["device"] == "cpu" and res["env"]["diffusers"]
    assert set(res["sections"]) == {"kernel", "rotary", "transformer", "presets"}
    assert all(r["ok"] for rows in res["sections"].values() for r in rows)


@pytest.mark.skipif(fa4.load()[0] is None, reason="flash-attn-4 and the CUTLASS DSL are not installed")
def test_fa4_compiles_for_sm90_without_a_gpu():
    """Where flash-attn-4 is installed (not in CI): the wrapper's real calls (mask_mod, validity aux
    tensor, block tables from a BlockPlan at 128x128 / 128x64 / broadcast, head_dim 24, dense with
    fewer keys) compile for sm_90a under FakeTensorMode, FA4's compile-only mode."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from wan_nabla.attention import masks
        from wan_nabla.attention.backends import fa4
        from wan_nabla.attention.layout import TileLayout
        layout = TileLayout(3, 17, 21, time_pairs=True)
        n = layout.n_tiles
        length = len(fa4.validity(layout, "cpu"))  # a CPU torch cannot build it on a fake CUDA device
        fa4.validity = lambda layout, device: torch.empty(length, dtype=torch.int32, device="cuda")
        for d, bs, bcast in ((128, (128, 128), False), (128, (128, 64), False), (128, (128, 128), True),
                             (24, (128, 128), False)):
            keep = torch.rand(2, 3, n, n) < 0.3
            plan = masks.plan_from_keep(keep[:1, :1] if bcast else keep, layout, bs)
            with FakeTensorMode(allow_non_fake_inputs=True):
                fake = lambda t: torch.empty(t.shape, dtype=t.dtype, device="cuda")
                fplan = masks.BlockPlan(fake(plan.kv_num), fake(plan.kv_idx), fake(plan.full_num),
                                        fake(plan.full_idx), bs, layout, plan.density)
                q = torch.empty(2, layout.padded_len, 3, d, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
                assert fa4.sparse_attention(q, q, q, fplan).shape == q.shape
                kr = torch.empty(2, layout.seq_len, 3, d, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
                assert fa4.dense_attention(q, kr, kr).shape == q.shape
        print("ok")
    """)
    env = dict(os.environ, FLASH_ATTENTION_ARCH="sm_90", CUTE_DSL_ARCH="sm_90a", FLASH_ATTENTION_NUM_SMS="132")
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
