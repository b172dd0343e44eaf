"""Probe flash-attn-4's block-sparse forward on a Hopper GPU against wan-nabla's block plans.

    source benchmarks/jobs/gpu_env.sh && python3 benchmarks/jobs/gpu_fa4_probe.py "$OUT"

What it checks, on the block lists `attention.masks.plan_blocks` produces (partial blocks =
key blocks holding pad tokens, full blocks = the rest):
1. Exactness: FA4 with a key-validity mask_mod reading an int32 aux tensor on partial blocks,
   against a float32 masked-softmax reference and against compiled flex on the same BlockMask,
   on a padded grid, batch 2, block sizes 128x128 and 128x64, head_dim 128 / 64 / 32 / 24.
2. Dense FA4 against SDPA (no mask).
3. That new block tables of the same shape do not grow FA4's compile cache.
4. A first timing at 14B heads (40 x 128), 1280x720x81 (S_pad 80,640): dense cuDNN SDPA, dense
   FA4, and NABLA 0.2 / STA 11-3-3 through flex (128x64, time pairs) and FA4 (128x128 and 128x64).
Writes OUT/fa4_probe.json and prints a table last. Not part of the package: a measurement of the
interface before the backend is built on it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import cutlass
import cutlass.cute as cute
import torch
import torch.nn.functional as F
from flash_attn.cute import utils as fa_utils
from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
from flash_attn.cute.interface import _flash_attn_fwd, flash_attn_func
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.harness.records import environment  # noqa: E402
from wan_nabla.attention import masks  # noqa: E402
from wan_nabla.attention.backends.flex import sparse_attention  # noqa: E402
from wan_nabla.attention.config import AttentionConfig  # noqa: E402
from wan_nabla.attention.layout import TileLayout  # noqa: E402


@cute.jit
def key_valid_mask(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
    valid = aux_tensors[0]
    v = fa_utils.scalar_to_ssa(valid[kv_idx[0]], cutlass.Int32)
    one = fa_utils.scalar_to_ssa(1, cutlass.Int32)
    return v == one


def fa4_sparse(q_BHSD, k_BHSD, v_BHSD, plan, valid_i32):
    bst = BlockSparseTensorsTorch(
        mask_block_cnt=plan.kv_num.contiguous(),
        mask_block_idx=plan.kv_idx.contiguous(),
        full_block_cnt=plan.full_num.contiguous(),
        full_block_idx=plan.full_idx.contiguous(),
        block_size=tuple(plan.block_size),
    )
    out, _ = flash_attn_func(
        q_BHSD.transpose(1, 2),
        k_BHSD.transpose(1, 2),
        v_BHSD.transpose(1, 2),
        softmax_scale=1.0 / math.sqrt(q_BHSD.shape[-1]),
        mask_mod=key_valid_mask,
        aux_tensors=[valid_i32],
        block_sparse_tensors=bst,
    )
    return out.transpose(1, 2)


def fa4_dense(q_BHSD, k_BHSD, v_BHSD):
    out, _ = flash_attn_func(q_BHSD.transpose(1, 2), k_BHSD.transpose(1, 2), v_BHSD.transpose(1, 2))
    return out.transpose(1, 2)


def reference(q, k, v, plan, layout):
    """float32 masked softmax over the kept blocks and real keys."""
    dense = plan.block_mask().to_dense().bool()  # [B|1, H|1, nqb, nkb]
    bq, bkv = plan.block_size
    s = layout.padded_len
    qb = torch.arange(s, device=q.device) // bq
    kb = torch.arange(s, device=q.device) // bkv
    allowed = dense[:, :, qb][..., kb] & layout.valid(q.device)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return p @ v.float()


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def exactness() -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for d in (128, 64, 32, 24):
        for bs in ((128, 128), (128, 64)):
            layout = TileLayout(3, 9, 13, time_pairs=bs[0] == 128)
            q, k, v = (
                torch.randn(2, 3, layout.padded_len, d, device="cuda", generator=g, dtype=torch.bfloat16)
                for _ in range(3)
            )
            for cfg in (
                AttentionConfig(type="nabla", threshold=0.5),
                AttentionConfig(type="sta", sta_window=(1, 1, 1)),
            ):
                plan = masks.plan_blocks(cfg, q, k, layout, bs)
                valid = layout.valid_padded(q.device).to(torch.int32).contiguous()
                row = {"head_dim": d, "block_size": list(bs), "config": cfg.label(), "density": float(plan.density)}
                try:
                    out = fa4_sparse(q, k, v, plan, valid)
                    ref = reference(q, k, v, plan, layout)
                    real = layout.valid(q.device)
                    row["rel_l2_vs_fp32_ref"] = rel(out[:, :, real], ref[:, :, real])
                    try:
                        fl = sparse_attention(q, k, v, plan.block_mask())
                        row["rel_l2_vs_flex"] = rel(out[:, :, real], fl[:, :, real])
                    except Exception as e:  # noqa: BLE001
                        row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    dense = reference(
                        q,
                        k,
                        v,
                        masks.plan_from_keep(
                            torch.ones(layout.n_tiles, layout.n_tiles, dtype=torch.bool, device="cuda"), layout, bs
                        ),
                        layout,
                    )
                    row["rel_l2_masked_vs_dense"] = rel(ref[:, :, real], dense[:, :, real])
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                rows.append(row)
                print("exactness", row, flush=True)
    # dense FA4 vs SDPA
    q, k, v = (torch.randn(2, 4, 3000, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    rows.append(
        {
            "dense_fa4_vs_sdpa_fp32": rel(
                fa4_dense(q, k, v), F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            )
        }
    )
    return rows


def cache_growth() -> dict:
    layout = TileLayout(5, 16, 24, time_pairs=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (
        torch.randn(1, 4, layout.padded_len, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3)
    )
    valid = layout.valid_padded(q.device).to(torch.int32).contiguous()
    cfg = AttentionConfig(type="nabla", threshold=0.4)
    fa4_sparse(q, k, v, masks.plan_blocks(cfg, q, k, layout, (128, 128)), valid)
    before = len(_flash_attn_fwd.compile_cache.cache)
    for _ in range(3):
        q2, k2 = torch.randn_like(q), torch.randn_like(k)
        fa4_sparse(q2, k2, v, masks.plan_blocks(cfg, q2, k2, layout, (128, 128)), valid)
    torch.cuda.synchronize()
    return {"cache_before": before, "cache_after_new_masks": len(_flash_attn_fwd.compile_cache.cache)}


def bench(fn, reps=10) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def timing() -> list[dict]:
    from benchmarks.harness.qk import real_tokens, relayout, synthetic_qkv

    base = TileLayout(21, 45, 80)
    q, k, v = synthetic_qkv(base, 40, 128, 1, device=torch.device("cuda"), dtype=torch.bfloat16, seed=0)
    flops = 4.0 * 40 * base.seq_len**2 * 128
    qr, kr, vr = (real_tokens(t, base) for t in (q, k, v))

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(qr, kr, vr)

    rows = []
    t_cudnn = bench(cudnn)
    rows.append({"row": "dense cuDNN SDPA", "ms": t_cudnn, "share": 1.0})
    t = bench(lambda: fa4_dense(qr, kr, vr))
    rows.append({"row": "dense FA4", "ms": t, "share": t_cudnn / t})
    qr = kr = vr = None  # frees the tensors; rebinding rather than del keeps the closures above well-defined
    for name, cfg in (
        ("nabla 0.2", AttentionConfig(type="nabla", threshold=0.2)),
        ("nabla 0.4", AttentionConfig(type="nabla", threshold=0.4)),
        ("sta 11-3-3", AttentionConfig(type="sta", sta_window=(11, 3, 3))),
    ):
        for backend, bs, pairs in (
            ("flex", (128, 64), True),
            ("fa4", (128, 128), True),
            ("fa4", (128, 64), True),
            ("fa4", (128, 128), False),
        ):
            layout = TileLayout(21, 45, 80, time_pairs=pairs)
            qq, kk, vv = (relayout(t, base, layout) for t in (q, k, v))
            valid = layout.valid_padded(qq.device).to(torch.int32).contiguous()
            row = {"row": f"{name} {backend} {bs[0]}x{bs[1]}{' pairs' if pairs else ''}"}
            try:
                plan = masks.plan_blocks(cfg, qq, kk, layout, bs)
                dens = float(plan.density)
                if backend == "flex":
                    bm = plan.block_mask()
                    kern = lambda: sparse_attention(qq, kk, vv, bm)  # noqa: E731

                    def total():
                        return sparse_attention(qq, kk, vv, masks.plan_blocks(cfg, qq, kk, layout, bs).block_mask())
                else:
                    kern = lambda: fa4_sparse(qq, kk, vv, plan, valid)  # noqa: E731

                    def total():
                        return fa4_sparse(qq, kk, vv, masks.plan_blocks(cfg, qq, kk, layout, bs), valid)

                t0 = time.perf_counter()
                kern()
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                tk, tt = bench(kern), bench(total)
                tm = bench(lambda: masks.plan_blocks(cfg, qq, kk, layout, bs))
                row.update(
                    density=dens,
                    kernel_ms=tk,
                    total_ms=tt,
                    mask_ms=tm,
                    first_call_s=first,
                    share=dens * flops / (tt * 1e-3) / (flops / (t_cudnn * 1e-3)),
                    speedup=t_cudnn / tt,
                )
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            rows.append(row)
            print("timing", row, flush=True)
            qq = kk = vv = None  # as above: free before the next layout, closures stay well-defined
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fa4_probe_out")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(sys.argv[1:], "cuda")
    res = {"env": env, "device": env["device_name"], "torch": env["torch"], "commit": env["commit"]}
    t0 = time.perf_counter()
    res["exactness"] = exactness()
    res["exactness_s"] = time.perf_counter() - t0
    res["cache"] = cache_growth()
    (out / "fa4_probe.json").write_text(json.dumps(res, indent=2))
    if "--no-timing" not in sys.argv:
        res["timing"] = timing()
    (out / "fa4_probe.json").write_text(json.dumps(res, indent=2))
    print(f"device {res['device']} torch {res['torch']} commit {res['commit']}")
    for r in res["exactness"]:
        print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()})
    print("cache", res["cache"])
    for r in res.get("timing", []):
        print(
            f"{r['row']:<32} "
            + (
                "ERROR " + r["error"]
                if "error" in r
                else f"dens {r.get('density', 1):.3f} total {r['ms'] if 'ms' in r else r['total_ms']:.2f} ms "
                f"share {r['share']:.0%}"
                + (f" mask {r['mask_ms']:.2f} kernel {r['kernel_ms']:.2f}" if "kernel_ms" in r else "")
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
