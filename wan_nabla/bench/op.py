"""Attention-op level: one self-attention call, dense baselines against every sparse variant.

    scenarios = [OpScenario(heads=40, width=1280, height=720)]
    out = run_op_level(scenarios, torch.device("cuda"), sweep=True)   # list of per-scenario dicts

Per scenario (heads x 128 over the Wan2.1 patch grid of a video size, padded to whole tiles as the
app pads it), with q/k from `qk.synthetic_qkv` (or from a random-weight Wan block):
- dense cuDNN SDPA on the UNPADDED sequence: the baseline every share and speed-up refers to
  (on the CPU, SDPA's own choice);
- dense compiled flex on the unpadded sequence (no mask);
- wan-nabla rows through the app's own path: `AttentionRun.block_mask` (masks.*) then
  `kernels.sparse_attention`, for NABLA thresholds, STA windows and the preset configs; each row
  times the mask build (`masks.plan_blocks`, as the processor calls it), the kernel and the two
  together (what a layer pays);
- published-style rows (`published.py`): 64x64 blocks, three bf16 sorts and STA rebuilt per call.
Effective TFLOP/s = 4*B*H*S_real^2*D x density / time, density = kept share of blocks at the
kernel's geometry (tile density, before coarsening, is reported next to it).
Checks (checks.py): the Triton keep mask against the fp32 sort rule and an fp64 brute force, the
app's block plan against the tile mask it stands for, the sparse output against exact fp32
attention under the same block mask on sampled query rows; and here, that new masks after warm-up
compile nothing. sweep.py times kernel geometries and options on one mask set.
Limits: B=1 by default; time budgets are per measurement (records.time_call).
"""

from __future__ import annotations

import gc
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..attention import masks
from ..attention.kernels import compiled_flex, default_block_size, sparse_attention
from ..attention.layout import TileLayout
from ..attention.processors import AttentionRun
from ..config import AttentionConfig
from . import published
from .checks import run_checks
from .configs import preset_configs
from .qk import real_tokens, relayout, synthetic_qkv
from .records import OpRow, OpScenario, compiled_graphs, first_call_s, sync, time_call
from .sweep import mask_breakdown, run_sweep

NABLA_THRESHOLDS = (0.1, 0.2, 0.4, 0.7, 0.9)
STA_WINDOWS = ((5, 3, 3), (11, 3, 3), (11, 5, 5), (21, 5, 7))
PUBLISHED_ROWS = ((0.2, None), (0.4, None), (0.7, None), (0.6, (11, 3, 3)))

FULL_SCENARIOS = (
    OpScenario(12, 832, 480), OpScenario(12, 1280, 720), OpScenario(40, 832, 480), OpScenario(40, 1280, 720),
)
TARGET_SCENARIO = OpScenario(40, 1280, 720)
# CPU-sized: 3 latent frames x 9 x 16 patches -> 3 x 2 x 2 tiles with padding rows (tests, --quick).
QUICK_SCENARIOS = (OpScenario(heads=2, width=256, height=144, frames=9, head_dim=32),)

def layout_of(s: OpScenario) -> TileLayout:
    return TileLayout(*s.grid)


def dense_flops(s: OpScenario, layout: TileLayout) -> float:
    return 4.0 * s.batch * s.heads * float(layout.seq_len) ** 2 * s.head_dim


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
        candidates.append(("nabla 0.5 + sta 3-1-1", AttentionConfig(type="nabla_sta", threshold=0.5, sta_window=(3, 1, 1))))
    for name, cfg in candidates:
        key = (cfg.type, cfg.threshold, cfg.sta_window)
        if key not in seen:
            seen.add(key)
            rows.append((name, cfg))
    return rows


# ---- inputs -------------------------------------------------------------------------------------
def make_qkv(s: OpScenario, layout: TileLayout, device: torch.device, dtype: torch.dtype, seed: int):
    if s.qk == "synthetic":
        return synthetic_qkv(layout, s.heads, s.head_dim, s.batch, device=device, dtype=dtype, seed=seed)
    if s.qk == "wan_block":
        return wan_block_qkv(s, layout, device, dtype, seed)
    raise ValueError(f"unknown q/k source {s.qk!r}; use synthetic or wan_block")


@torch.no_grad()
def wan_block_qkv(s: OpScenario, layout: TileLayout, device, dtype, seed: int):
    """q/k/v that the app's processor sees in block 0 of a random-weight Wan transformer of these heads,
    fed smooth random latents (tile order, after q/k norm and rotary)."""
    from ..adapter import apply_attention
    from .random_init import WAN_SIZES, WanSize, random_transformer, smooth_latents

    size = next((z for z in WAN_SIZES.values() if z.heads == s.heads and z.head_dim == s.head_dim),
                WanSize("custom", s.heads * s.head_dim, s.heads, 1, 4 * s.heads * s.head_dim))
    model = random_transformer(size, device, dtype, seed=seed, layers=1)
    captured: dict[str, torch.Tensor] = {}
    handle = apply_attention(model, {"type": "nabla", "threshold": 0.5})

    def capture(q, k, v, layer):
        captured.update(q=q.contiguous(), k=k.contiguous(), v=v.contiguous())
        return torch.zeros_like(q)

    handle.run.attend = capture
    f, h, w = s.grid
    latents = smooth_latents((s.batch, 16, f, 2 * h, 2 * w), device, seed).to(dtype)
    text = torch.randn((s.batch, 512, size.text_dim), device=device, dtype=dtype)
    model(hidden_states=latents, timestep=torch.full((s.batch,), 500.0, device=device),
          encoder_hidden_states=text, return_dict=False)
    handle.remove()
    del model
    return captured["q"], captured["k"], captured["v"]


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

    def timed(self, fn):
        return time_call(fn, self.device, budget_ms=self.budget_ms)

    def row(self, name: str, kind: str, total, density: float, **kw) -> OpRow:
        ms = total.median_ms
        tflops = self.flops * density / (ms * 1e-3) / 1e12
        base = self.cudnn_ms or ms
        base_tflops = self.flops / (base * 1e-3) / 1e12
        return OpRow(scenario=self.s.label, name=name, kind=kind, total_ms=ms, density=density, tflops=tflops,
                     share_of_cudnn=tflops / base_tflops, speedup=base / ms, reps=total.reps,
                     spread_ms=(total.min_ms, total.max_ms), **kw)

    def compile_once(self, key: str, fn) -> float | None:
        """First call of a new (shape, kernel config): its wall time, recorded once per key."""
        if key in self.compile_s:
            return None
        self.compile_s[key] = first_call_s(fn, self.device)
        return self.compile_s[key]


def run_scenario(s: OpScenario, device: torch.device, *, quick: bool = False, sweep: bool = False,
                 breakdown: bool = False,
                 published_rows: bool = True, checks: bool = True, only_rows: list[str] | None = None,
                 budget_ms: float = 1000.0, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sc = _Scenario(s, device, budget_ms, log)
    layout = sc.layout
    log(f"[op] {s.label}: grid {s.grid}, S={layout.seq_len} real / {layout.padded_len} padded, "
        f"{layout.n_tiles} tiles")
    q, k, v = make_qkv(s, layout, device, dtype, seed)
    rows: list[OpRow] = []
    result: dict[str, Any] = {"scenario": s.to_dict(), "seq_real": layout.seq_len, "seq_padded": layout.padded_len,
                              "tiles": layout.n_tiles, "dense_tflop": sc.flops / 1e12}

    # dense baselines on the unpadded sequence
    qr, kr, vr = (real_tokens(t, layout) for t in (q, k, v))
    if device.type == "cuda":
        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(qr, kr, vr)
        cudnn_name = "dense cuDNN SDPA"
    else:
        def cudnn():
            return F.scaled_dot_product_attention(qr, kr, vr)
        cudnn_name = "dense SDPA (cpu)"
    t = sc.timed(cudnn)
    sc.cudnn_ms = t.median_ms
    rows.append(sc.row(cudnn_name, "dense_cudnn", t, 1.0, kernel_ms=t.median_ms, notes="unpadded sequence"))
    log(f"  {cudnn_name}: {t.median_ms:.2f} ms")
    flex = compiled_flex()
    comp = sc.compile_once("dense flex", lambda: flex(qr, kr, vr))
    t = sc.timed(lambda: flex(qr, kr, vr))
    rows.append(sc.row("dense flex", "dense_flex", t, 1.0, kernel_ms=t.median_ms, compile_s=comp,
                       notes="unpadded sequence, no mask"))
    log(f"  dense flex: {t.median_ms:.2f} ms")
    qr = kr = vr = None  # free the unpadded copies before the sparse rows

    graphs_before = None
    bs = default_block_size(device)
    model_qk = s.qk != "synthetic"  # q/k of a model: the NABLA rows (STA does not read q/k)
    for name, cfg in row_configs(quick):
        if (only_rows and name not in only_rows) or (model_qk and cfg.type == "sta"):
            continue
        rows.append(_sparse_row(sc, name, cfg, q, k, v, bs))
        r = rows[-1]
        log(f"  {name}: total {r.total_ms:.2f} ms (mask {r.mask_ms:.3f}, kernel {r.kernel_ms:.2f}) "
            f"density {r.density:.3f} tile {r.tile_density:.3f} -> {r.share_of_cudnn:.0%} of {cudnn_name}")
        if graphs_before is None:
            graphs_before = compiled_graphs()

    if published_rows:
        pub = PUBLISHED_ROWS if not quick else ((0.5, (3, 1, 1)),)
        for thr, win in pub[1:2] if model_qk and not quick else pub:
            rows.append(_published_row(sc, thr, win, q, k, v))
            r = rows[-1]
            log(f"  {r.name}: total {r.total_ms:.2f} ms (mask {r.mask_ms:.3f}, kernel {r.kernel_ms:.2f}) "
                f"density {r.density:.3f} -> {r.share_of_cudnn:.0%} of {cudnn_name}")

    # Fresh q/k -> new masks: the compiled kernels must be reused as they are.
    q2, k2, _ = make_qkv(replace(s, qk="synthetic"), layout, device, dtype, seed + 1)
    g0 = compiled_graphs()
    for name, cfg in row_configs(quick)[:3]:
        sparse_attention(q2, k2, v, masks.plan_blocks(cfg, q2, k2, layout, bs).block_mask())
    sync(device)
    result["recompiles_on_new_masks"] = compiled_graphs() - g0
    del q2, k2

    if checks:
        result["checks"] = run_checks(sc, q, k, v, bs, quick)
    if sweep or breakdown:
        result["mask_breakdown"] = mask_breakdown(sc, q, k, 0.2, bs)
    if sweep:
        result["sweep"] = run_sweep(sc, q, k, v)
    result["rows"] = [r.to_dict() for r in rows]
    result["compile_s"] = sc.compile_s
    sc.relayout_cache = {}
    del q, k, v
    _free(device)
    return result


def _attention_config(cfg: AttentionConfig, bs) -> AttentionConfig:
    return replace(cfg, block_size=cfg.block_size or bs)


def _sparse_row(sc: _Scenario, name: str, cfg: AttentionConfig, q, k, v, bs) -> OpRow:
    device = sc.device
    cfg = _attention_config(cfg, bs)
    run = AttentionRun(cfg)
    # The app's layout for this config (time-paired tiles with 128-token query blocks).
    layout = run.layout_for(sc.layout.frames, sc.layout.height, sc.layout.width, device)
    if layout != sc.layout:
        if sc.relayout_cache.get("layout") != layout:
            sc.relayout_cache = {"layout": layout, "qkv": tuple(relayout(t, sc.layout, layout) for t in (q, k, v))}
        q, k, v = sc.relayout_cache["qkv"]
    build = lambda: run.plan(q, k, layout).block_mask()  # noqa: E731 - the app's own call
    sc.compile_once(f"mask build {cfg.type} {cfg.block_size} (first call, Triton JIT)", build)
    plan = run.plan(q, k, layout)
    bm = plan.block_mask()
    comp = sc.compile_once(f"sparse {cfg.block_size}", lambda: sparse_attention(q, k, v, bm))
    t_mask = sc.timed(build)
    t_kernel = sc.timed(lambda: sparse_attention(q, k, v, bm))
    t_total = sc.timed(lambda: sparse_attention(q, k, v, build()))
    tile_density = float(masks.tile_keep_mask(cfg, q, k, layout).float().mean())
    cfg = replace(cfg, time_pairs=layout.time_pairs)
    return sc.row(name, cfg.type, t_total, float(plan.density), tile_density=tile_density, mask_ms=t_mask.median_ms,
                  kernel_ms=t_kernel.median_ms, block_size=cfg.block_size,
                  kernel_options=None, compile_s=comp, config=cfg.to_dict(),
                  notes="STA mask cached per shape (built once)" if cfg.type == "sta" else "")


def _published_row(sc: _Scenario, thr: float, win, q, k, v) -> OpRow:
    layout = sc.layout
    build = lambda: published.published_block_mask(q, k, layout, thr, win)  # noqa: E731
    bm = build()
    comp = sc.compile_once("published 64x64", lambda: published.published_attention(q, k, v, bm))
    t_mask = sc.timed(build)
    t_kernel = sc.timed(lambda: published.published_attention(q, k, v, bm))
    t_total = sc.timed(lambda: published.published_attention(q, k, v, build()))
    density = float(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) / bm.full_kv_indices.numel()
    name = f"published-style nabla {thr:g}" + (" + sta " + "-".join(map(str, win)) if win else "")
    return sc.row(name, "published", t_total, density, tile_density=density, mask_ms=t_mask.median_ms,
                  kernel_ms=t_kernel.median_ms, block_size=published.PUBLISHED_BLOCK,
                  kernel_options=published.PUBLISHED_KERNEL_OPTIONS if sc.device.type == "cuda" else None,
                  compile_s=comp, notes="bf16 map, 3 sorts + STA rebuilt per call, no pad masking",
                  config={"type": "nabla_sta" if win else "nabla", "threshold": thr,
                          "sta_window": list(win) if win else None})


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_op_level(scenarios, device: torch.device, *, quick: bool = False, sweep: bool = False,
                 log: Callable[[str], None] = print, **kw) -> list[dict[str, Any]]:
    out = []
    for s in scenarios:
        do_sweep = sweep and (quick or s == TARGET_SCENARIO)
        try:
            out.append(run_scenario(s, device, quick=quick, sweep=do_sweep, log=log, **kw))
        except torch.OutOfMemoryError as e:  # report and go on with the next scenario
            out.append({"scenario": s.to_dict(), "error": f"out of memory: {str(e).splitlines()[0]}", "rows": []})
            _free(device)
    return out
