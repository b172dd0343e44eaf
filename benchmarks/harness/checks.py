"""Exactness checks of the op level: the mask rule against float64 brute force, the app's block
plan against the tile mask it stands for, and each backend's sparse kernel against exact masked
attention.

    brute_force_keep(p, 0.4)               # (keep, keep_ties, mass_before) in float64
    run_checks(sc, q, k, v, (128, 64), quick=False, backends=["flex", "fa4"])

Mismatches between the app path and the brute force must lie within rounding of the threshold
(reported as "in band"); the plan built by the app (one Triton pass on CUDA) must equal
`plan_from_keep(tile_keep_mask(...))` exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from wan_nabla.attention import masks
from wan_nabla.attention.layout import TileLayout
from wan_nabla.config import AttentionConfig

from .geometry import app_run

CHECK_THRESHOLDS = (0.2, 0.4, 0.7, 0.9)


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
def run_checks(sc, q, k, v, bs, quick: bool, backends=("flex",)) -> dict[str, Any]:
    layout = sc.layout
    out: dict[str, Any] = {"mask": [], "plan_equal": [], "fidelity": []}
    p = masks.coarse_map(q, k, layout, impl="torch")
    p_fast = masks.coarse_map(q, k, layout)
    out["coarse_map_max_abs_diff"] = float((p - p_fast).abs().max())
    del p_fast
    for thr in (0.2, 0.7) if quick else CHECK_THRESHOLDS:
        fast = masks.nabla_tile_mask(q, k, layout, thr)  # the app's path (Triton on CUDA)
        same_p = masks.cdf_select(p, thr)  # the selection rule alone, on the reference map
        ref32 = masks.cdf_select_sorted(p, thr)
        ref64, ref_ties, mass = brute_force_keep(p, thr)
        ambiguous = (mass - thr).abs() < 1e-5
        bad = fast != ref64
        out["mask"].append(
            {
                "threshold": thr,
                "entries": fast.numel(),
                "impl": "triton" if masks.use_triton(q) else "torch",
                "rule_on_same_map_vs_fp64_ties": int((same_p != ref_ties).sum()),
                "rule_on_same_map_vs_fp64": int((same_p != ref64).sum()),
                "tie_entries_changed": int((ref64 != ref_ties).sum()),
                "mismatch_vs_fp32_sort": int((fast != ref32).sum()),
                "mismatch_vs_fp64": int(bad.sum()),
                "outside_band_vs_fp64": int((bad & ~ambiguous).sum()),
                "ambiguous_entries": int(ambiguous.sum()),
                "density": float(fast.float().mean()),
            }
        )
        del ref32, ref64, ref_ties, mass, ambiguous, bad, same_p
        for sta in (None, (11, 3, 3) if not quick else (3, 1, 1)):
            cfg = AttentionConfig(type="nabla_sta" if sta else "nabla", threshold=thr, sta_window=sta)
            keep = masks.tile_keep_mask(cfg, q, k, layout)
            ref = masks.plan_from_keep(keep, layout, bs)
            plan = masks.plan_blocks(cfg, q, k, layout, bs)  # the app's one-pass build on CUDA
            out["plan_equal"].append(
                {
                    "threshold": thr,
                    "sta": sta,
                    "block_size": list(bs),
                    "equal": all(
                        bool(torch.equal(getattr(ref, f), getattr(plan, f)))
                        for f in ("kv_num", "kv_idx", "full_num", "full_idx")
                    ),
                    "density_equal": abs(float(plan.density) - float(ref.density)) < 1e-6,
                }
            )
    del p
    # Output fidelity on sampled query rows: exact fp32 attention under the same block plan, per
    # backend at its default geometry (plain tile order: the kernels do not care which).
    for backend in backends:
        for name, cfg in (
            ("nabla 0.4", AttentionConfig(type="nabla", threshold=0.4, time_pairs=False)),
            (
                "sta 11-3-3",
                AttentionConfig(type="sta", sta_window=(11, 3, 3) if not quick else (3, 1, 1), time_pairs=False),
            ),
        ):
            run = app_run(cfg, backend, q.device, q.dtype)
            run.layout = layout
            plan = run.plan(q, k, layout)
            fid = fidelity(q, k, v, plan, layout, lambda: run.sparse(q, k, v, plan))
            out["fidelity"].append(
                {"row": f"{name} [{backend}]", "block_size": list(plan.block_size), "fallback": run.fallback, **fid}
            )
    return out


def fidelity(q, k, v, plan, layout: TileLayout, attend, n_rows: int = 128) -> dict[str, float]:
    """Relative L2 error of attend() (the kernel over `plan`) vs fp32 attention under the plan's
    exact mask on sampled query rows, and how far the masked result is from dense (so a mask that
    changes nothing is visible)."""
    s_pad = layout.padded_len
    bq, bkv = plan.block_size
    n_qb = -(-s_pad // bq)
    picks = sorted({0, n_qb // 3, n_qb // 2, n_qb - 1})  # the last block holds pad tokens
    per = max(1, n_rows // len(picks))
    rows = torch.cat([torch.arange(b * bq, min(b * bq + min(per, bq), s_pad), device=q.device) for b in picks])
    out = attend()[:, :, rows].float()
    dense_blocks = plan.block_mask().to_dense()  # [B|1, H|1, n_qb, n_kb]: the plan's lists as a matrix
    valid = layout.valid(q.device)
    kb = torch.arange(s_pad, device=q.device) // bkv
    qs, ks, vs = q[:, :, rows].float(), k.float(), v.float()
    scores = torch.einsum("bhqd,bhkd->bhqk", qs, ks) / math.sqrt(q.shape[-1])
    allowed = dense_blocks[:, :, rows // bq][..., kb].bool() & valid
    ref = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ vs
    dense = torch.softmax(scores.masked_fill(~valid, float("-inf")), -1) @ vs
    norm = ref.norm()
    return {
        "rel_l2_vs_exact_masked": float((out - ref).norm() / norm),
        "rel_l2_masked_vs_dense": float((dense - ref).norm() / norm),
        "rows": len(rows),
    }
