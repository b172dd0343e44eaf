"""Which kernel geometry is fastest per backend: 128x64 vs 128x128 blocks, time-paired or not.

    out = run_geometry(sc, q, k, v, backends=["flex", "fa4"], quick=False)
    out["winner"]["fa4"]   # {"geometry": "128x128 time-paired", "sum_total_ms": ..., "block_size": [128, 128], ...}

At equal NABLA threshold (0.2, 0.4, 0.7) and STA window (11-3-3), each geometry runs the app's own
call (`AttentionRun.plan` + `AttentionRun.sparse`, mask build included) and is timed by total
time; the winner of a backend is the geometry with the smallest sum of totals over the masks
(the count of per-mask wins is reported too). Bigger blocks run faster per block but OR-coarsening
keeps more of them, so only the total decides. backends.FAST is set from this table.
Limits: one scenario (the target one), synthetic q/k; NABLA rows reuse the unfused mask build
(pooling inside the rotary kernel costs the same for every geometry).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from wan_nabla.attention import backends, masks
from wan_nabla.attention.run import AttentionRun
from wan_nabla.config import AttentionConfig

GEOMETRIES = (
    ("128x64 time-paired", (128, 64), True),
    ("128x64", (128, 64), False),
    ("128x128 time-paired", (128, 128), True),
    ("128x128", (128, 128), False),
)
# CPU smoke runs: the rows' 64x64 and the sweep's 128x64 time-paired kernels, already compiled.
QUICK_GEOMETRIES = (("64x64", (64, 64), False), ("128x64 time-paired", (128, 64), True))
MASKS = (
    ("nabla 0.2", AttentionConfig(type="nabla", threshold=0.2)),
    ("nabla 0.4", AttentionConfig(type="nabla", threshold=0.4)),
    ("nabla 0.7", AttentionConfig(type="nabla", threshold=0.7)),
    ("sta 11-3-3", AttentionConfig(type="sta", sta_window=(11, 3, 3))),
)
QUICK_MASKS = (MASKS[0], ("sta 3-1-1", AttentionConfig(type="sta", sta_window=(3, 1, 1))))


def app_run(cfg: AttentionConfig, backend: str, device: torch.device, dtype: torch.dtype) -> AttentionRun:
    """An AttentionRun as the app builds it for `cfg` on `backend`, its block size made explicit."""
    cfg = replace(cfg, backend=backend)
    bs = cfg.block_size or AttentionRun(cfg).block_size(device, dtype)
    return AttentionRun(replace(cfg, block_size=bs))


def available_backends(requested, device: torch.device, dtype: torch.dtype, log) -> list[str]:
    """The requested backends this device can run (flex always); a skipped one is logged."""
    out = []
    for name in requested or ("flex", "fa4"):
        if name == "fa4":
            got, why = backends.resolve_backend("fa4", device, dtype)
            if got != "fa4":
                log(f"  [fa4 rows skipped: {why}]")
                continue
        out.append(name)
    return out


def run_geometry(sc, q, k, v, backends, quick: bool = False) -> dict[str, Any]:
    """Total/kernel ms, density and tile density per (backend, geometry, mask), and the winners."""
    entries = []
    for backend in backends:
        for label, bs, pairs in QUICK_GEOMETRIES if quick else GEOMETRIES:
            entry: dict[str, Any] = {
                "backend": backend,
                "geometry": label,
                "block_size": list(bs),
                "time_pairs": pairs,
                "masks": [],
            }
            try:
                for mname, cfg in QUICK_MASKS if quick else MASKS:
                    run = app_run(replace(cfg, block_size=bs, time_pairs=pairs), backend, sc.device, q.dtype)
                    layout = run.layout_for(sc.layout.frames, sc.layout.height, sc.layout.width, sc.device, q.dtype)
                    qq, kk, vv = sc.app_qkv(layout, q, k, v)
                    run.layout = layout
                    plan = run.plan(qq, kk, layout)
                    sc.compile_once(f"geometry {backend} {label}", lambda: run.sparse(qq, kk, vv, plan))
                    t_total = sc.timed(lambda: run.sparse(qq, kk, vv, run.plan(qq, kk, layout)))
                    t_kernel = sc.timed(lambda: run.sparse(qq, kk, vv, plan))
                    entry["masks"].append(
                        {
                            "mask": mname,
                            "total_ms": t_total.median_ms,
                            "kernel_ms": t_kernel.median_ms,
                            "density": float(plan.density),
                            "tile_density": float(masks.tile_keep_mask(cfg, qq, kk, layout).float().mean()),
                            "fallback": run.fallback,
                        }
                    )
                entry["sum_total_ms"] = sum(m["total_ms"] for m in entry["masks"])
            except Exception as e:  # noqa: BLE001 - a geometry that fails is a result too
                entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            cells = ", ".join(f"{m['mask']} {m['total_ms']:.2f} ms ({m['density']:.3f})" for m in entry["masks"])
            sc.log(
                f"  geometry [{backend}] {label}: {cells}" + (f" ERROR {entry['error']}" if "error" in entry else "")
            )
            entries.append(entry)
        sc.relayout_cache = {}
    return {"entries": entries, "winner": winners(entries)}


def winners(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per backend: the geometry with the smallest sum of total times (complete entries only), and
    how many masks each geometry won."""
    out: dict[str, dict[str, Any]] = {}
    for backend in dict.fromkeys(e["backend"] for e in entries):
        mine = [
            e
            for e in entries
            if e["backend"] == backend
            and "error" not in e
            and e["masks"]
            and not any(m["fallback"] for m in e["masks"])
        ]
        if not mine:
            continue
        best = min(mine, key=lambda e: e["sum_total_ms"])
        wins: dict[str, int] = {e["geometry"]: 0 for e in mine}
        for i, _ in enumerate(best["masks"]):
            fastest = min(mine, key=lambda e: e["masks"][i]["total_ms"])
            wins[fastest["geometry"]] += 1
        out[backend] = {
            "geometry": best["geometry"],
            "block_size": best["block_size"],
            "time_pairs": best["time_pairs"],
            "sum_total_ms": best["sum_total_ms"],
            "mask_wins": wins,
        }
    return out
