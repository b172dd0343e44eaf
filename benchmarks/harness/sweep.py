"""Kernel geometry sweep and mask-build breakdown of the op level (CUDA; tiny shapes on the CPU).

    run_sweep(sc, q, k, v)                # kernel ms per (block geometry, tile order, options)
    mask_breakdown(sc, q, k, 0.2, bs)     # ms of each mask-build stage and selection variant

The sweep builds each config's tile mask once (masks.tile_keep_mask) and times only the kernel,
so geometries are compared on identical masks; time-paired entries re-lay q/k/v out first.
"""

from __future__ import annotations

from typing import Any

import torch

from wan_nabla.attention import masks
from wan_nabla.attention.backends.flex import sparse_attention
from wan_nabla.attention.layout import TileLayout
from wan_nabla.attention.rotary import rotate, rotate_torch
from wan_nabla.attention.triton.mask_kernels import pool_tiles_triton, select_triton
from wan_nabla.config import AttentionConfig

from .qk import relayout, tile_rotary
from .records import first_call_s, sync, time_call

# Kernel geometry / option sweep: (label, block_size, time-paired tiles, extra kernel_options).
SWEEP = (
    ("64x64", (64, 64), False, {"USE_TMA": False}),
    ("64x64 TMA", (64, 64), False, {"USE_TMA": True}),
    ("128x64 TMA", (128, 64), False, {"USE_TMA": True}),
    ("128x64 TMA, time-paired tiles", (128, 64), True, {"USE_TMA": True}),
    ("128x64, time-paired tiles", (128, 64), True, {"USE_TMA": False}),
    ("128x128 TMA, time-paired tiles", (128, 128), True, {"USE_TMA": True}),
)
SWEEP_MASKS = (("nabla", 0.2, None), ("nabla", 0.4, None), ("nabla", 0.7, None), ("sta", None, (11, 3, 3)))


@torch.no_grad()
def mask_breakdown(sc, q, k, threshold: float, bs) -> dict[str, Any]:
    """Time each stage of the fused NABLA mask build, and the selection variants (ms, medians)."""
    layout, device = sc.layout, sc.device
    if not masks.use_triton(q):
        return {}
    n = layout.n_tiles
    b, h = q.shape[:2]
    t = lambda fn: time_call(fn, device, budget_ms=200).median_ms  # noqa: E731
    out: dict[str, Any] = {"threshold": threshold, "block_size": list(bs)}
    out["pool_q_triton"] = t(lambda: masks.pool_tiles(q, layout))
    out["pool_q_torch"] = t(lambda: masks.pool_tiles(q, layout, impl="torch"))
    for tpp in (1, 2, 4):
        for warps in (4, 8):
            out[f"pool_q_tpp{tpp}_w{warps}"] = t(lambda: pool_tiles_triton(q, layout, tpp, warps))
    # The app pools inside its rotary kernel: rotation alone vs rotation + pooling, per q (or k).
    cos, sin = tile_rotary(layout, q.shape[-1], device)
    qs = q.transpose(1, 2)
    out["rotary_q_torch_eager"] = t(lambda: rotate_torch(qs, cos, sin))
    out["rotary_q_triton"] = t(lambda: rotate(qs, cos, sin))
    out["rotary_pool_q_triton"] = t(lambda: rotate(qs, cos, sin, layout))
    out["pool_increment_q"] = out["rotary_pool_q_triton"] - out["rotary_q_triton"]
    qp, kp = masks.pool_tiles(q, layout), masks.pool_tiles(k, layout)
    out["scores_matmul_fp32"] = t(lambda: torch.matmul(qp, kp.transpose(-1, -2)))
    scores = torch.matmul(qp, kp.transpose(-1, -2))

    def select_tiles(src):
        keep = torch.empty(src.shape, dtype=torch.uint8, device=device)
        select_triton(
            src, mode=0, n_rows=n, n_cols=n, bh=b * h, threshold=threshold, scale=masks.softmax_scale(q), tile_out=keep
        )
        return keep

    def select(exact, warps=None):
        return select_triton(
            scores,
            mode=0,
            n_rows=n,
            n_cols=n,
            bh=b * h,
            threshold=threshold,
            scale=masks.softmax_scale(q),
            layout=layout,
            block_size=bs,
            out_shape=(b, h),
            exact=exact,
            num_warps=warps,
        )

    for exact, name in ((2, "select_fp32_checked"), (1, "select_fp64"), (0, "select_fp32_only")):
        out[name] = t(lambda: select(exact))
    for warps in (2, 8):
        out[f"select_fp32_checked_w{warps}"] = t(lambda: select(2, warps))
    out["select_tile_mask_only"] = t(lambda: select_tiles(scores))  # the same search, no block lists
    cfg = AttentionConfig(type="nabla", threshold=threshold)
    out["from_kv_blocks"] = t(lambda: masks.plan_blocks(cfg, q, k, layout, bs)._make_block_mask())
    out["plan_total"] = t(lambda: masks.plan_blocks(cfg, q, k, layout, bs).block_mask())
    out["plan_lists_pooled"] = t(lambda: masks.plan_blocks(cfg, q, k, layout, bs, pooled=(qp, kp)))
    out["sort_select_reference"] = t(lambda: masks.cdf_select_sorted(torch.softmax(scores, -1), threshold))
    # Host time of one fused build (no sync): what a layer costs the CPU while the GPU is busy.
    import time as _time

    sync(device)
    t0 = _time.perf_counter()
    for _ in range(10):
        masks.plan_blocks(cfg, q, k, layout, bs).block_mask()
    out["plan_host_ms"] = (_time.perf_counter() - t0) * 100
    sync(device)
    exact_sets = [select(e)[1] for e in (1, 2, 0)]
    out["fp32_checked_equals_fp64"] = bool(torch.equal(exact_sets[0], exact_sets[1]))
    out["fp32_only_equals_fp64"] = bool(torch.equal(exact_sets[0], exact_sets[2]))
    sc.log(
        "  mask breakdown: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items())
    )
    return out


def run_sweep(sc, q, k, v) -> list[dict[str, Any]]:
    """Kernel time per (geometry, tile order, options) on the same configs; compile time per entry.
    q/k/v come in the scenario's plain tile order and are re-laid out for time-paired entries."""
    base, device = sc.layout, sc.device
    configs = {
        f"{kind} {thr:g}" if thr else f"sta {'-'.join(map(str, win))}": AttentionConfig(
            type=kind, threshold=thr, sta_window=win
        )
        for kind, thr, win in SWEEP_MASKS
    }
    out = []
    for label, bs, pairs, extra in SWEEP if device.type == "cuda" else (SWEEP[0], SWEEP[3]):
        entry = {"config": label, "block_size": list(bs), "time_pairs": pairs, "kernel_options": extra, "masks": []}
        opts = (extra or None) if device.type == "cuda" else None
        layout = TileLayout(base.frames, base.height, base.width, time_pairs=pairs)
        qq, kk, vv = (relayout(x, base, layout) for x in (q, k, v))
        try:
            first = None
            for mname, cfg in configs.items():
                keep = masks.tile_keep_mask(cfg, qq, kk, layout)
                bm = masks.plan_from_keep(keep, layout, bs).block_mask()
                fn = lambda: sparse_attention(qq, kk, vv, bm, opts)  # noqa: E731
                if first is None:
                    first = first_call_s(fn, device)
                t = sc.timed(fn)
                dens = float(masks.block_density(keep, bs))
                tflops = sc.flops * dens / (t.median_ms * 1e-3) / 1e12
                entry["masks"].append(
                    {
                        "mask": mname,
                        "kernel_ms": t.median_ms,
                        "density": dens,
                        "tile_density": float(keep.float().mean()),
                        "tflops": tflops,
                        "share_of_cudnn": t_share(sc, dens, t.median_ms),
                        "speedup": sc.cudnn_ms / t.median_ms,
                    }
                )
            entry["compile_s"] = first
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is a result too
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        cells = ", ".join(f"{m['mask']} {m['kernel_ms']:.2f} ms ({m['share_of_cudnn']:.0%})" for m in entry["masks"])
        sc.log(f"  sweep {label}: {cells}" + (f" ERROR {entry['error']}" if "error" in entry else ""))
        out.append(entry)
    return out


def t_share(sc, density: float, ms: float) -> float:
    return density * sc.cudnn_ms / ms
