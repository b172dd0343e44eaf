"""Attention-op level: one self-attention call, dense baselines against every sparse variant.

    scenarios = [OpScenario(heads=40, width=1280, height=720)]
    out = run_op_level(scenarios, torch.device("cuda"), backends=("flex", "fa4"), geometry=True)

Per scenario (heads x 128 over the Wan2.1 patch grid of a video size, padded to whole tiles as the
app pads it), with q/k from `qk.synthetic_qkv` (or from a random-weight Wan block), stored
[B, S, H, D] and viewed as [B, H, S, D] exactly as the processor hands them to the kernels:
- dense cuDNN SDPA on the UNPADDED sequence: the baseline every share and speed-up refers to
  (on the CPU, SDPA's own choice); dense compiled flex and dense flash-attn-4 (where available);
- wan-nabla rows per backend (flex, fa4) at that backend's default geometry, through the app's
  own calls (`AttentionRun.plan` then `AttentionRun.sparse`), for NABLA thresholds, STA windows
  and the preset configs; each row times the mask build, the kernel and the two together. On the
  Triton path the app pools q/k inside its rotary kernel (attention/rotary.py), so NABLA rows
  count pooling as what it adds there (fused rotary+pool minus rotary alone, measured once per
  layout) plus scores and selection; `mask_unfused_ms` is the build with its own pooling pass;
- published-style rows (published.py) on their own cropped grid, with the published compile mode.
Effective TFLOP/s = 4*B*H*S_real^2*D x density / time, density = kept share of blocks at the
kernel's geometry (tile density, before coarsening, is reported next to it).
Checks (checks.py), the geometry comparison (geometry.py), the kernel sweep and mask breakdown
(sweep.py) run when asked; here, that new masks after warm-up compile nothing.
Limits: B=1 by default; >= 10 timed repetitions per measurement (records.time_call).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from wan_nabla.attention import masks
from wan_nabla.attention.backends import default_block_size, fa4
from wan_nabla.attention.backends.flex import compiled_flex
from wan_nabla.attention.layout import TileLayout
from wan_nabla.attention.rotary import rotate
from wan_nabla.config import AttentionConfig

from . import published
from .checks import run_checks
from .configs import preset_configs
from .geometry import app_run, available_backends, run_geometry
from .qk import processor_storage, real_tokens, relayout, synthetic_qkv, tile_rotary, wan_block_qkv
from .records import (
    OpRow,
    OpScenario,
    Timing,
    base_name,
    baseline_row_name,
    compiled_graphs,
    dense_flops,
    first_call_s,
    sync,
    time_call,
)
from .sweep import mask_breakdown, run_sweep

NABLA_THRESHOLDS = (0.1, 0.2, 0.4, 0.7, 0.9)
STA_WINDOWS = ((5, 3, 3), (11, 3, 3), (11, 5, 5), (21, 5, 7))
MIN_REPS = 10

FULL_SCENARIOS = (
    OpScenario(12, 832, 480),
    OpScenario(12, 1280, 720),
    OpScenario(40, 832, 480),
    OpScenario(40, 1280, 720),
)
TARGET_SCENARIO = OpScenario(40, 1280, 720)
# CPU-sized: 3 latent frames x 9 x 16 patches -> 3 x 2 x 2 tiles with padding rows (tests, --quick).
QUICK_SCENARIOS = (OpScenario(heads=2, width=256, height=144, frames=9, head_dim=32),)


def layout_of(s: OpScenario) -> TileLayout:
    return TileLayout(*s.grid)


def row_configs(quick: bool) -> list[tuple[str, AttentionConfig]]:
    """(name, config) of every wan-nabla row, presets first, duplicates of a preset dropped."""
    rows: list[tuple[str, AttentionConfig]] = []
    seen: set = set()
    thresholds = (0.2, 0.7) if quick else NABLA_THRESHOLDS
    windows = ((3, 1, 1),) if quick else STA_WINDOWS
    candidates = preset_configs() if not quick else []
    candidates += [(f"nabla {t:g}", AttentionConfig(type="nabla", threshold=t)) for t in thresholds]
    candidates += [("sta " + "-".join(map(str, w)), AttentionConfig(type="sta", sta_window=w)) for w in windows]
    if quick:
        candidates.append(
            ("nabla 0.5 + sta 3-1-1", AttentionConfig(type="nabla_sta", threshold=0.5, sta_window=(3, 1, 1)))
        )
    for name, cfg in candidates:
        key = (cfg.type, cfg.threshold, cfg.sta_window, cfg.geometry)
        if key not in seen:
            seen.add(key)
            rows.append((name, cfg))
    return rows


# ---- inputs -------------------------------------------------------------------------------------
def make_qkv(s: OpScenario, layout: TileLayout, device: torch.device, dtype: torch.dtype, seed: int):
    """q, k, v [B, H, S_pad, D] in tile order, stored as the processor stores them."""
    if s.qk == "synthetic":
        qkv = synthetic_qkv(layout, s.heads, s.head_dim, s.batch, device=device, dtype=dtype, seed=seed)
    elif s.qk == "wan_block":
        qkv = wan_block_qkv(s, device, dtype, seed)
    else:
        raise ValueError(f"unknown q/k source {s.qk!r}; use synthetic or wan_block")
    return tuple(processor_storage(t) for t in qkv)


# ---- one scenario -------------------------------------------------------------------------------
class _Scenario:
    """Shared state of one scenario's measurements (inputs, baseline, budget)."""

    def __init__(self, s: OpScenario, device: torch.device, budget_ms: float, log: Callable[[str], None]):
        self.s, self.device, self.budget_ms, self.log = s, device, budget_ms, log
        self.layout = layout_of(s)
        self.flops = dense_flops(s, self.layout)
        self.cudnn_ms: float | None = None
        self.compile_s: dict[str, float] = {}
        self.relayout_cache: dict[str, Any] = {}  # q/k/v in the app's layout when it differs
        self.pool_increment: dict[TileLayout, dict[str, float]] = {}

    def timed(self, fn):
        return time_call(fn, self.device, budget_ms=self.budget_ms, min_reps=MIN_REPS)

    def baseline(self, q, k, v):
        """The dense baseline: cuDNN SDPA on CUDA, SDPA's own choice on the CPU."""
        if self.device.type == "cuda":
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    def row(
        self,
        name: str,
        kind: str,
        total,
        density: float,
        *,
        flops: float | None = None,
        base_ms: float | None = None,
        **kw,
    ) -> OpRow:
        """A row; flops/base_ms: the work and dense cuDNN time of the row's own grid (default: this
        scenario's)."""
        ms = total.median_ms
        flops = flops or self.flops
        tflops = flops * density / (ms * 1e-3) / 1e12
        base = base_ms or self.cudnn_ms or ms
        base_tflops = flops / (base * 1e-3) / 1e12
        kw.setdefault("seq_real", self.layout.seq_len)
        return OpRow(
            scenario=self.s.label,
            name=name,
            kind=kind,
            total_ms=ms,
            density=density,
            tflops=tflops,
            share_of_cudnn=tflops / base_tflops,
            speedup=base / ms,
            reps=total.reps,
            spread_ms=(total.min_ms, total.max_ms),
            **kw,
        )

    def compile_once(self, key: str, fn) -> float | None:
        """First call of a new (shape, kernel config): its wall time, recorded once per key."""
        if key in self.compile_s:
            return None
        self.compile_s[key] = first_call_s(fn, self.device)
        return self.compile_s[key]

    def app_qkv(self, layout: TileLayout, q, k, v):
        """q/k/v in `layout`'s tile order (re-laid out once and cached while rows share it)."""
        if layout == self.layout:
            return q, k, v
        if self.relayout_cache.get("layout") != layout:
            self.relayout_cache = {"layout": layout, "qkv": tuple(relayout(t, self.layout, layout) for t in (q, k, v))}
        return self.relayout_cache["qkv"]

    def pooling_increment(self, layout: TileLayout, q, k) -> dict[str, float]:
        """What pooling adds to the app's rotary kernel for q and k (ms, measured once per layout)."""
        if layout not in self.pool_increment:
            cos, sin = tile_rotary(layout, q.shape[-1], self.device)
            qs, ks = q.transpose(1, 2), k.transpose(1, 2)  # [B, S, H, D], as the processor has them
            fused = self.timed(lambda: (rotate(qs, cos, sin, layout), rotate(ks, cos, sin, layout))).median_ms
            plain = self.timed(lambda: (rotate(qs, cos, sin), rotate(ks, cos, sin))).median_ms
            self.pool_increment[layout] = {
                "rotary_pool_ms": fused,
                "rotary_ms": plain,
                "increment_ms": max(0.0, fused - plain),
            }
        return self.pool_increment[layout]


def run_scenario(
    s: OpScenario,
    device: torch.device,
    *,
    quick: bool = False,
    sweep: bool = False,
    breakdown: bool = False,
    geometry: bool = False,
    backends=None,
    published_rows: bool = True,
    checks: bool = True,
    only_rows: list[str] | None = None,
    budget_ms: float = 1000.0,
    seed: int = 0,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """All rows of one scenario, then each optional part on its own (a failing part is recorded in
    result["errors"]); `checkpoint(partial_result)` is called after the rows and after each part,
    so a run stopped half-way keeps what it measured."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sc = _Scenario(s, device, budget_ms, log)
    layout = sc.layout
    log(f"[op] {s.label}: grid {s.grid}, S={layout.seq_len} real / {layout.padded_len} padded, {layout.n_tiles} tiles")
    backends = available_backends(backends, device, dtype, log)
    q, k, v = make_qkv(s, layout, device, dtype, seed)
    rows: list[OpRow] = []
    result: dict[str, Any] = {
        "scenario": s.to_dict(),
        "seq_real": layout.seq_len,
        "seq_padded": layout.padded_len,
        "tiles": layout.n_tiles,
        "dense_tflop": sc.flops / 1e12,
        "backends": backends,
        "storage": "[B, S, H, D] viewed as [B, H, S, D] (the processor's q/k/v)",
    }
    rows += dense_rows(sc, q, k, v, backends)

    graphs_before = None
    model_qk = s.qk != "synthetic"  # q/k of a model: the NABLA rows (STA does not read q/k)
    for backend in backends:
        for name, cfg in row_configs(quick):
            if (only_rows and name not in only_rows) or (model_qk and cfg.type == "sta"):
                continue
            r = sparse_row(sc, f"{name} [{backend}]", cfg, q, k, v, backend)
            rows.append(r)
            log(
                f"  {r.name}: total {r.total_ms:.2f} ms (mask {r.mask_ms:.3f}, kernel {r.kernel_ms:.2f}) "
                f"density {r.density:.3f} tile {r.tile_density:.3f} -> {r.share_of_cudnn:.0%} of {base_name(device)}"
            )
            if graphs_before is None:
                graphs_before = compiled_graphs()
    result["pooling_in_rotary"] = {
        ("time-paired" if lay.time_pairs else "plain") + " tiles": inc for lay, inc in sc.pool_increment.items()
    }

    def save():
        result["rows"], result["compile_s"] = [r.to_dict() for r in rows], sc.compile_s
        if checkpoint is not None:
            checkpoint(result)

    save()
    # Cheap and essential first; the published rows (its max-autotune compile) last.
    parts = [
        ("recompiles_on_new_masks", True, lambda: recompiles_on_new_masks(sc, q, v, backends, quick, seed)),
        ("mask_breakdown", sweep or breakdown, lambda: mask_breakdown(sc, q, k, 0.2, default_block_size(device))),
        ("checks", checks, lambda: run_checks(sc, q, k, v, default_block_size(device), quick, backends)),
        ("sweep", sweep, lambda: run_sweep(sc, q, k, v)),
        ("geometry", geometry, lambda: run_geometry(sc, q, k, v, backends, quick)),
        ("published", published_rows, lambda: published.run_published(sc, quick=quick, seed=seed, model_qk=model_qk)),
    ]
    for key, wanted, fn in parts:  # each part on its own: one that fails keeps the rows measured
        if not wanted:
            continue
        try:
            result[key] = fn()
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - recorded in the results and the errors list
            result.setdefault("errors", []).append(f"{key}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            log(f"  {key} FAILED: {result['errors'][-1]}")
        if key == "published" and isinstance(result.get(key), tuple):
            pub_rows, result[key] = result[key]
            rows += pub_rows
        save()
    sc.relayout_cache = {}
    q = k = v = None  # drop the big tensors (the part lambdas above hold them as closure cells)
    _free(device)
    return result


def dense_rows(sc: _Scenario, q, k, v, backends) -> list[OpRow]:
    """Dense cuDNN SDPA (the baseline), compiled flex and flash-attn-4 on the unpadded sequence."""
    rows = []
    qr, kr, vr = (processor_storage(real_tokens(t, sc.layout)) for t in (q, k, v))
    cudnn_name = baseline_row_name(sc.device)
    t = sc.timed(lambda: sc.baseline(qr, kr, vr))
    sc.cudnn_ms = t.median_ms
    rows.append(sc.row(cudnn_name, "dense_cudnn", t, 1.0, kernel_ms=t.median_ms, notes="unpadded sequence"))
    flex = compiled_flex()
    comp = sc.compile_once("dense flex", lambda: flex(qr, kr, vr))
    t = sc.timed(lambda: flex(qr, kr, vr))
    rows.append(
        sc.row(
            "dense flex",
            "dense_flex",
            t,
            1.0,
            kernel_ms=t.median_ms,
            compile_s=comp,
            notes="unpadded sequence, no mask",
            backend="flex",
        )
    )
    if "fa4" in backends:
        comp = sc.compile_once("dense fa4", lambda: fa4.dense_attention(qr, kr, vr))
        t = sc.timed(lambda: fa4.dense_attention(qr, kr, vr))
        rows.append(
            sc.row(
                "dense flash-attn-4",
                "dense_fa4",
                t,
                1.0,
                kernel_ms=t.median_ms,
                compile_s=comp,
                notes="unpadded sequence, no mask",
                backend="fa4",
            )
        )
    for r in rows:
        sc.log(f"  {r.name}: {r.total_ms:.2f} ms ({r.share_of_cudnn:.0%} of {base_name(sc.device)})")
    return rows


def sparse_row(sc: _Scenario, name: str, cfg: AttentionConfig, q, k, v, backend: str) -> OpRow:
    device = sc.device
    run = app_run(cfg, backend, device, q.dtype)
    cfg = run.config
    layout = run.layout_for(sc.layout.frames, sc.layout.height, sc.layout.width, device, q.dtype)
    q, k, v = sc.app_qkv(layout, q, k, v)
    run.state.layout = layout
    pooled, inc, unfused = None, 0.0, None
    if run.pool_layout(0, q) is not None:  # the app pools these tiles inside its rotary kernel
        pooled = (masks.pool_tiles(q, layout), masks.pool_tiles(k, layout))
        inc = sc.pooling_increment(layout, q, k)["increment_ms"]

    def build(with_pooled=True):
        plan = run.plan(q, k, layout, pooled if with_pooled else None)
        return plan.block_mask() if backend == "flex" else plan  # what each backend's call needs

    sc.compile_once(f"mask build {cfg.type} {cfg.block_size} (first call, Triton JIT)", build)
    plan = run.plan(q, k, layout, pooled)
    comp = sc.compile_once(f"sparse {backend} {cfg.block_size}", lambda: run.sparse(q, k, v, plan))
    t_mask = shift(sc.timed(build), inc)
    if pooled is not None:
        unfused = sc.timed(lambda: build(False)).median_ms
    t_kernel = sc.timed(lambda: run.sparse(q, k, v, plan))
    t_total = shift(sc.timed(lambda: run.sparse(q, k, v, run.plan(q, k, layout, pooled))), inc)
    tile_density = float(masks.tile_keep_mask(cfg, q, k, layout).float().mean())
    cfg = replace(cfg, time_pairs=layout.time_pairs)
    notes = "STA mask cached per shape (built once)" if cfg.type == "sta" else ""
    if pooled is not None:
        notes = f"pooling in the rotary kernel: +{inc:.3f} ms counted in mask and total"
    used = backend
    if run.fallback:  # never report flex numbers as FA4's
        used, notes = f"{backend} -> flex", f"FA4 FAILED, ran flex: {run.fallback}"
    return sc.row(
        name,
        cfg.type,
        t_total,
        float(plan.density),
        tile_density=tile_density,
        mask_ms=t_mask.median_ms,
        kernel_ms=t_kernel.median_ms,
        block_size=cfg.block_size,
        kernel_options=None,
        compile_s=comp,
        config=cfg.to_dict(),
        notes=notes,
        backend=used,
        mask_unfused_ms=unfused,
    )


def shift(t: Timing, ms: float) -> Timing:
    return Timing(t.median_ms + ms, t.min_ms + ms, t.max_ms + ms, t.reps)


def recompiles_on_new_masks(sc: _Scenario, q, v, backends, quick: bool, seed: int) -> dict[str, int]:
    """Fresh q/k -> new masks after warm-up: compiled graphs (flex) and FA4 compile-cache entries
    added (both must be 0)."""
    q2, k2, _ = make_qkv(replace(sc.s, qk="synthetic"), sc.layout, sc.device, q.dtype, seed + 1)
    out = {}
    for backend in backends:
        g0, c0 = compiled_graphs(), fa4_cache_size()
        for _name, cfg in row_configs(quick)[:3]:
            run = app_run(cfg, backend, sc.device, q.dtype)
            layout = run.layout_for(sc.layout.frames, sc.layout.height, sc.layout.width, sc.device, q.dtype)
            qq, kk, vv = sc.app_qkv(layout, q2, k2, v)
            run.state.layout = layout
            run.sparse(qq, kk, vv, run.plan(qq, kk, layout))
        sync(sc.device)
        out[backend] = compiled_graphs() - g0 + fa4_cache_size() - c0
    sc.relayout_cache = {}
    return out


def fa4_cache_size() -> int:
    """Entries in flash-attn-4's in-process compile cache (0 where FA4 is not loaded)."""
    import sys

    interface = sys.modules.get("flash_attn.cute.interface")
    cache = getattr(getattr(interface, "_flash_attn_fwd", None), "compile_cache", None)
    inner = getattr(cache, "cache", cache)
    try:
        return len(inner)
    except TypeError:
        return 0


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_op_level(
    scenarios,
    device: torch.device,
    *,
    quick: bool = False,
    sweep: bool = False,
    geometry: bool = False,
    log: Callable[[str], None] = print,
    **kw,
) -> list[dict[str, Any]]:
    out = []
    for s in scenarios:
        target = quick or s == TARGET_SCENARIO
        try:
            out.append(
                run_scenario(
                    s, device, quick=quick, sweep=sweep and target, geometry=geometry and target, log=log, **kw
                )
            )
        except torch.OutOfMemoryError as e:  # report and go on with the next scenario
            out.append({"scenario": s.to_dict(), "error": f"out of memory: {str(e).splitlines()[0]}", "rows": []})
            _free(device)
    return out
