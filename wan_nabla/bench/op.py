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
  times the mask build, the kernel and the two together (what a layer pays), and the fused
  `masks.nabla_block_mask` build where NABLA is involved;
- published-style rows (`published.py`): 64x64 blocks, three bf16 sorts and STA rebuilt per call.
Effective TFLOP/s = 4*B*H*S_real^2*D x density / time, density = kept share of blocks at the
kernel's geometry (tile density, before coarsening, is reported next to it).
Checks: the Triton keep mask against the fp32 sort rule and an fp64 brute force (mismatches must lie
within rounding of the threshold), the fused BlockMask against to_block_mask, the sparse output
against exact fp32 attention under the same block mask on sampled query rows, and that new masks
after warm-up compile nothing. An optional sweep times kernel geometries and options on one mask set.
Limits: B=1 by default; time budgets are per measurement (records.time_call).
"""

from __future__ import annotations

import gc
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import masks
from ..config import AttentionConfig, load_config
from ..kernels import compiled_flex, default_block_size, sparse_attention
from ..layout import TileLayout
from ..processors import AttentionRun
from . import published
from .qk import synthetic_qkv
from .records import OpRow, OpScenario, compiled_graphs, first_call_s, sync, time_call

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

NABLA_THRESHOLDS = (0.1, 0.2, 0.4, 0.7, 0.9)
STA_WINDOWS = ((5, 3, 3), (11, 3, 3), (11, 5, 5), (21, 5, 7))
PUBLISHED_ROWS = ((0.2, None), (0.4, None), (0.7, None), (0.6, (11, 3, 3)))
CHECK_THRESHOLDS = (0.2, 0.4, 0.7, 0.9)

FULL_SCENARIOS = (
    OpScenario(12, 832, 480), OpScenario(12, 1280, 720), OpScenario(40, 832, 480), OpScenario(40, 1280, 720),
)
TARGET_SCENARIO = OpScenario(40, 1280, 720)
# CPU-sized: 3 latent frames x 9 x 16 patches -> 3 x 2 x 2 tiles with padding rows (tests, --quick).
QUICK_SCENARIOS = (OpScenario(heads=2, width=256, height=144, frames=9, head_dim=32),)

# Kernel geometry / option sweep: (label, block_size, extra kernel_options).
SWEEP = (
    ("64x64", (64, 64), {"USE_TMA": False}),
    ("64x64 TMA", (64, 64), {"USE_TMA": True}),
    ("128x64", (128, 64), {"USE_TMA": False}),
    ("128x64 TMA", (128, 64), {"USE_TMA": True}),
    ("128x64 TMA rows-safe", (128, 64), {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True}),
    ("128x64 TMA, temporal query pairs", (128, 64), {"USE_TMA": True, "_pairs": "temporal"}),
    ("128x128 TMA", (128, 128), {"USE_TMA": True}),
)
SWEEP_MASKS = (("nabla", 0.2, None), ("nabla", 0.4, None), ("nabla", 0.7, None), ("sta", None, (11, 3, 3)))


def layout_of(s: OpScenario) -> TileLayout:
    return TileLayout(*s.grid)


def dense_flops(s: OpScenario, layout: TileLayout) -> float:
    return 4.0 * s.batch * s.heads * float(layout.seq_len) ** 2 * s.head_dim


def preset_configs() -> list[tuple[str, AttentionConfig]]:
    """Sparse attention sections of configs/*.yaml (dense_steps dropped: one call is one step)."""
    out = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        att = load_config(path).attention
        if att.sparse:
            out.append((path.stem, replace(att, dense_steps=0)))
    return out


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


def real_tokens(x_BHSD: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    if not layout.needs_padding:
        return x_BHSD
    return x_BHSD.index_select(2, layout.real_token_index(x_BHSD.device)).contiguous()


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
            f"density {r.density:.3f} tile {r.tile_density:.3f} -> {r.share_of_cudnn:.0%} of cuDNN")
        if graphs_before is None:
            graphs_before = compiled_graphs()

    if published_rows:
        pub = PUBLISHED_ROWS if not quick else ((0.5, (3, 1, 1)),)
        for thr, win in pub[1:2] if model_qk and not quick else pub:
            rows.append(_published_row(sc, thr, win, q, k, v))
            r = rows[-1]
            log(f"  {r.name}: total {r.total_ms:.2f} ms (mask {r.mask_ms:.3f}, kernel {r.kernel_ms:.2f}) "
                f"density {r.density:.3f} -> {r.share_of_cudnn:.0%} of cuDNN")

    # Fresh q/k -> new masks: the compiled kernels must be reused as they are.
    q2, k2, _ = make_qkv(replace(s, qk="synthetic"), layout, device, dtype, seed + 1)
    g0 = compiled_graphs()
    for name, cfg in row_configs(quick)[:3]:
        run = AttentionRun(replace(cfg, block_size=bs))
        run.layout = layout
        bm, _ = run.block_mask(q2, k2, layout)
        sparse_attention(q2, k2, v, bm)
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


def relayout(x_BHSD: torch.Tensor, src: TileLayout, dst: TileLayout) -> torch.Tensor:
    """The same tokens in another layout's tile order (e.g. time-paired), pads zero."""
    if src == dst:
        return x_BHSD
    return dst.to_tiles(src.from_tiles(x_BHSD, seq_dim=2), seq_dim=2).contiguous()


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
    run.layout = layout
    build = lambda: run.block_mask(q, k, layout)  # noqa: E731 - the app's own call
    sc.compile_once(f"mask build {cfg.type} {cfg.block_size} (first call, Triton JIT)", build)
    bm, density = build()
    comp = sc.compile_once(f"sparse {cfg.block_size}", lambda: sparse_attention(q, k, v, bm))
    t_mask = sc.timed(build)
    t_kernel = sc.timed(lambda: sparse_attention(q, k, v, bm))
    t_total = sc.timed(lambda: sparse_attention(q, k, v, build()[0]))
    fused_ms = None
    keep = None
    if cfg.type in ("nabla", "nabla_sta"):
        keep = masks.nabla_tile_mask(q, k, layout, cfg.threshold)
        fused = lambda: masks.nabla_block_mask(q, k, layout, cfg.threshold, cfg.sta_window, cfg.block_size)  # noqa: E731
        fused()
        fused_ms = sc.timed(fused).median_ms
    if cfg.type in ("sta", "nabla_sta"):
        sta = masks.sta_tile_mask(layout, cfg.sta_window, device)
        keep = sta if keep is None else keep | sta
    tile_density = float(keep.float().mean())
    cfg = replace(cfg, time_pairs=layout.time_pairs)
    return sc.row(name, cfg.type, t_total, float(density), tile_density=tile_density, mask_ms=t_mask.median_ms,
                  mask_fused_ms=fused_ms, kernel_ms=t_kernel.median_ms, block_size=cfg.block_size,
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


# ---- checks -------------------------------------------------------------------------------------
def brute_force_keep(p: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep, keep_ties, mass_before) in float64. keep: sort descending, keep iff the mass before an
    entry < threshold (tied entries in sort order). keep_ties: the same rule with tied entries all
    given the mass before their group (what the Triton path implements)."""
    p64 = p.double()
    vals, order = torch.sort(p64, dim=-1, descending=True)
    before = torch.cumsum(vals, dim=-1) - vals
    n = p.shape[-1]
    first = torch.ones_like(vals, dtype=torch.bool)
    first[..., 1:] = vals[..., 1:] != vals[..., :-1]
    pos = torch.arange(n, device=p.device).expand_as(vals)
    start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), dim=-1).values
    group_before = before.gather(-1, start)
    keep = torch.zeros_like(before, dtype=torch.bool).scatter_(-1, order, before < threshold)
    keep_ties = torch.zeros_like(before, dtype=torch.bool).scatter_(-1, order, group_before < threshold)
    mass = torch.empty_like(before).scatter_(-1, order, before)
    return keep, keep_ties, mass


@torch.no_grad()
def run_checks(sc: _Scenario, q, k, v, bs, quick: bool) -> dict[str, Any]:
    layout, device = sc.layout, sc.device
    out: dict[str, Any] = {"mask": [], "fused_equal": [], "fidelity": []}
    p = masks.coarse_map(q, k, layout, impl="torch")
    p_fast = torch.softmax(masks._coarse_scores(q, k, layout, "auto") * masks._scale(q), -1)
    out["coarse_map_max_abs_diff"] = float((p - p_fast).abs().max())
    del p_fast
    for thr in (0.2, 0.7) if quick else CHECK_THRESHOLDS:
        fast = masks.nabla_tile_mask(q, k, layout, thr)  # the app's path (Triton on CUDA)
        same_p = masks.cdf_select(p, thr)  # the selection rule alone, on the reference map
        ref32 = masks.cdf_select_sorted(p, thr)
        ref64, ref_ties, mass = brute_force_keep(p, thr)
        ambiguous = (mass - thr).abs() < 1e-5
        bad = fast != ref64
        out["mask"].append({
            "threshold": thr, "entries": fast.numel(), "impl": "triton" if masks._use_triton(q, "auto") else "torch",
            "rule_on_same_map_vs_fp64_ties": int((same_p != ref_ties).sum()),
            "rule_on_same_map_vs_fp64": int((same_p != ref64).sum()),
            "tie_entries_changed": int((ref64 != ref_ties).sum()),
            "mismatch_vs_fp32_sort": int((fast != ref32).sum()), "mismatch_vs_fp64": int(bad.sum()),
            "outside_band_vs_fp64": int((bad & ~ambiguous).sum()), "ambiguous_entries": int(ambiguous.sum()),
            "density": float(fast.float().mean()),
        })
        del ref32, ref64, ref_ties, mass, ambiguous, bad, same_p
        for sta in (None, (11, 3, 3) if not quick else (3, 1, 1)):
            keep = fast if sta is None else fast | masks.sta_tile_mask(layout, sta, device)
            ref = masks.to_block_mask(keep, layout, bs, impl="torch")
            fbm, dens = masks.nabla_block_mask(q, k, layout, thr, sta, bs)
            out["fused_equal"].append({
                "threshold": thr, "sta": sta, "block_size": list(bs),
                "equal": bool(torch.equal(ref.to_dense(), fbm.to_dense())),
                "density_equal": abs(float(dens) - float(masks.block_density(keep, bs))) < 1e-6,
            })
    del p
    # Output fidelity on sampled query rows: exact fp32 attention under the same block mask.
    for name, cfg in (("nabla 0.4", AttentionConfig(type="nabla", threshold=0.4, block_size=bs)),
                      ("sta 11-3-3", AttentionConfig(type="sta", sta_window=(11, 3, 3) if not quick else (3, 1, 1),
                                                     block_size=bs))):
        run = AttentionRun(cfg)
        run.layout = layout
        bm, _ = run.block_mask(q, k, layout)
        out["fidelity"].append({"row": name, **_fidelity(q, k, v, bm, layout)})
    return out


def _fidelity(q, k, v, bm, layout: TileLayout, n_rows: int = 128) -> dict[str, float]:
    """Relative L2 error of sparse_attention vs fp32 attention under bm's exact mask, and how far
    the masked result is from dense (so a mask that changes nothing is visible)."""
    s_pad = layout.padded_len
    bq = bm.BLOCK_SIZE[0]
    n_qb = s_pad // bq
    picks = sorted({0, n_qb // 3, n_qb // 2, n_qb - 1})  # the last block holds pad tokens
    per = max(1, n_rows // len(picks))
    rows = torch.cat([torch.arange(b * bq, b * bq + min(per, bq), device=q.device) for b in picks])
    out = sparse_attention(q, k, v, bm)[:, :, rows].float()
    dense_blocks = bm.to_dense()  # [B, H, n_qb, n_kb]
    valid = layout.valid(q.device)
    kb = torch.arange(s_pad, device=q.device) // bm.BLOCK_SIZE[1]
    qs, ks, vs = q[:, :, rows].float(), k.float(), v.float()
    scores = torch.einsum("bhqd,bhkd->bhqk", qs, ks) / math.sqrt(q.shape[-1])
    allowed = dense_blocks[:, :, rows // bq][..., kb].bool() & valid
    ref = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ vs
    dense = torch.softmax(scores.masked_fill(~valid, float("-inf")), -1) @ vs
    norm = ref.norm()
    return {"rel_l2_vs_exact_masked": float((out - ref).norm() / norm),
            "rel_l2_masked_vs_dense": float((dense - ref).norm() / norm), "rows": len(rows)}


@torch.no_grad()
def mask_breakdown(sc: _Scenario, q, k, threshold: float, bs) -> dict[str, Any]:
    """Time each stage of the fused NABLA mask build, and the selection variants (ms, medians)."""
    layout, device = sc.layout, sc.device
    if not masks._use_triton(q, "auto"):
        return {}
    n = layout.n_tiles
    b, h = q.shape[:2]
    t = lambda fn: time_call(fn, device, budget_ms=200).median_ms  # noqa: E731
    out: dict[str, Any] = {"threshold": threshold, "block_size": list(bs)}
    out["pool_q_triton"] = t(lambda: masks.pool_tiles(q, layout))
    out["pool_q_torch"] = t(lambda: masks.pool_tiles(q, layout, impl="torch"))
    for tpp in (1, 2, 4):
        for warps in (4, 8):
            out[f"pool_q_tpp{tpp}_w{warps}"] = t(lambda: masks._pool_triton(q, layout, tpp, warps))
    qp, kp = masks.pool_tiles(q, layout), masks.pool_tiles(k, layout)
    out["scores_matmul_fp32"] = t(lambda: torch.matmul(qp, kp.transpose(-1, -2)))
    scores = torch.matmul(qp, kp.transpose(-1, -2))

    def select(exact, warps=None):
        return masks._launch_select(scores, mode=0, n_rows=n, n_cols=n, bh=b * h, threshold=threshold,
                                    scale=masks._scale(q), layout=layout, block_size=bs, out_shape=(b, h),
                                    exact=exact, num_warps=warps)
    for exact, name in ((2, "select_fp32_checked"), (1, "select_fp64"), (0, "select_fp32_only")):
        out[name] = t(lambda: select(exact))
    for warps in (2, 8):
        out[f"select_fp32_checked_w{warps}"] = t(lambda: select(2, warps))
    lists = select(2)
    out["from_kv_blocks"] = t(lambda: masks._block_mask_from_lists(lists, layout, bs))
    out["fused_total"] = t(lambda: masks.nabla_block_mask(q, k, layout, threshold, None, bs))
    out["sort_select_reference"] = t(lambda: masks.cdf_select_sorted(torch.softmax(scores, -1), threshold))
    # Host time of one fused build (no sync): what a layer costs the CPU while the GPU is busy.
    import time as _time
    sync(device)
    t0 = _time.perf_counter()
    for _ in range(10):
        masks.nabla_block_mask(q, k, layout, threshold, None, bs)
    out["fused_host_ms"] = (_time.perf_counter() - t0) * 100
    sync(device)
    exact_sets = [select(e)[1] for e in (1, 2, 0)]
    out["fp32_checked_equals_fp64"] = bool(torch.equal(exact_sets[0], exact_sets[1]))
    out["fp32_only_equals_fp64"] = bool(torch.equal(exact_sets[0], exact_sets[2]))
    sc.log("  mask breakdown: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in out.items()))
    return out


def temporal_pair_order(layout: TileLayout) -> torch.Tensor:
    """Tile permutation putting tiles (t, i, j) and (t + 1, i, j) next to each other (t even), so a
    128-token query block holds two consecutive latent frames of one 8x8 square; an odd last frame
    keeps its row-major order. A what-if for the layout: keys are untouched."""
    nt, nh, nw = layout.tile_grid
    idx = torch.arange(layout.n_tiles).view(nt, nh * nw)
    pairs = nt // 2 * 2
    head = idx[:pairs].view(nt // 2, 2, nh * nw).transpose(1, 2).reshape(-1)
    return torch.cat([head, idx[pairs:].reshape(-1)])


# ---- kernel sweep -------------------------------------------------------------------------------
def run_sweep(sc: _Scenario, q, k, v) -> list[dict[str, Any]]:
    """Kernel time per (geometry, options) on the same masks; compile time per config."""
    layout, device = sc.layout, sc.device
    keeps = {}
    for kind, thr, win in SWEEP_MASKS:
        keep = masks.nabla_tile_mask(q, k, layout, thr) if kind == "nabla" else masks.sta_tile_mask(layout, win, device)
        keeps[f"{kind} {thr:g}" if thr else f"sta {'-'.join(map(str, win))}"] = keep
    out = []
    for label, bs, extra in SWEEP if device.type == "cuda" else (SWEEP[0], SWEEP[5]):
        entry = {"config": label, "block_size": list(bs), "kernel_options": extra, "masks": []}
        opts = {key: val for key, val in extra.items() if not key.startswith("_")} or None
        if device.type != "cuda" and opts:
            opts = None
        qq = q
        perm = None
        if extra.get("_pairs") == "temporal":
            perm = temporal_pair_order(layout).to(device)
            b, h, s_pad, d = q.shape
            qq = q.view(b, h, layout.n_tiles, -1, d)[:, :, perm].reshape(b, h, s_pad, d)
        try:
            first = None
            for mname, keep in keeps.items():
                if perm is not None:
                    keep = (keep[None, None] if keep.dim() == 2 else keep)[:, :, perm]
                bm = masks.to_block_mask(keep, layout, bs)
                fn = lambda: sparse_attention(qq, k, v, bm, opts)  # noqa: E731
                if first is None:
                    first = first_call_s(fn, device)
                t = sc.timed(fn)
                dens = float(masks.block_density(keep, bs))
                tflops = sc.flops * dens / (t.median_ms * 1e-3) / 1e12
                entry["masks"].append({"mask": mname, "kernel_ms": t.median_ms, "density": dens,
                                       "tile_density": float(keep.float().mean()), "tflops": tflops,
                                       "share_of_cudnn": t_share(sc, dens, t.median_ms),
                                       "speedup": sc.cudnn_ms / t.median_ms})
            entry["compile_s"] = first
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is a result too
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        cells = ", ".join(f"{m['mask']} {m['kernel_ms']:.2f} ms ({m['share_of_cudnn']:.0%})" for m in entry["masks"])
        sc.log(f"  sweep {label}: {cells}" + (f" ERROR {entry['error']}" if "error" in entry else ""))
        out.append(entry)
    return out


def t_share(sc: _Scenario, density: float, ms: float) -> float:
    return density * sc.cudnn_ms / ms


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
