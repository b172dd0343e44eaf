"""Would Ulysses ranks be unequal under NABLA? Per-head kept-block densities -> rank imbalance.

    python3 benchmarks/jobs/head_balance.py OUT_DIR                 # CUDA: 14B heads at 1280x720x81
    python3 benchmarks/jobs/head_balance.py OUT_DIR --quick         # CPU, tiny shapes (used by the tests)

Under Ulysses sequence parallelism each of U ranks computes attention for H/U heads over the whole
sequence, so its attention time follows the summed kept-block density of its heads (per layer:
every rank waits for the slowest at the second all-to-all). NABLA's density differs per head (a
diffuse head keeps many blocks, a local one few), so contiguous head groups can be unequal.

For every layer (or q/k sample) this measures the per-head density of the app's own block plan
(`masks.plan_blocks`) and reports, for U in {2, 4, 8} (those dividing H):
- imbalance = max rank work / mean rank work - 1, with contiguous head groups (what an all-to-all
  over the head dimension gives), and
- the same with a balanced assignment of H/U heads per rank (heads sorted by density and dealt in
  snake order: 0..U-1, U-1..0, ...), i.e. what permuting heads before the all-to-all would give.
Sources: synthetic q/k with per-head locality (benchmarks/harness/qk.py) and, on CUDA, the q/k every layer of a
random-weight Wan2.1-14B sees (random weights give flat coarse maps: a lower bound on the spread).
Writes OUT_DIR/head_balance.json and prints a table last.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.harness.records import environment  # noqa: E402
from wan_nabla.attention import masks  # noqa: E402
from wan_nabla.attention.backends import default_block_size  # noqa: E402
from wan_nabla.attention.config import AttentionConfig  # noqa: E402
from wan_nabla.attention.layout import TileLayout  # noqa: E402
from wan_nabla.attention.run import Observer  # noqa: E402

CONFIGS = {
    "nabla 0.2": AttentionConfig(type="nabla", threshold=0.2),
    "nabla 0.4": AttentionConfig(type="nabla", threshold=0.4),
    "nabla 0.7": AttentionConfig(type="nabla", threshold=0.7),
    "nabla 0.6 + sta 11-3-3": AttentionConfig(type="nabla_sta", threshold=0.6, sta_window=(11, 3, 3)),
}


def head_densities(plan: masks.BlockPlan) -> torch.Tensor:
    """[H] kept share of block pairs per head (mean over the batch)."""
    kept = (plan.kv_num + plan.full_num).float().sum(-1)  # [B, H]
    return (kept / (plan.kv_num.shape[-1] * plan.kv_idx.shape[-1])).mean(0).cpu()


def snake(dens: torch.Tensor, ranks: int) -> list[list[int]]:
    order = torch.argsort(dens, descending=True).tolist()
    groups: list[list[int]] = [[] for _ in range(ranks)]
    for i, h in enumerate(order):
        r = i % ranks if (i // ranks) % 2 == 0 else ranks - 1 - i % ranks
        groups[r].append(h)
    return groups


def imbalance(dens: torch.Tensor, groups: list[list[int]]) -> float:
    work = torch.stack([dens[g].sum() for g in groups])
    return float(work.max() / work.mean() - 1)


def analyse(dens_LH: torch.Tensor) -> dict:
    """dens_LH: [layers or samples, H] -> imbalance stats per U."""
    n_heads = dens_LH.shape[-1]
    out = {
        "heads": n_heads,
        "samples": dens_LH.shape[0],
        "mean_density": float(dens_LH.mean()),
        "head_spread": float((dens_LH.max(-1).values / dens_LH.min(-1).values.clamp_min(1e-9)).mean()),
    }
    for u in (2, 4, 8):
        if n_heads % u:
            continue
        per = n_heads // u
        contiguous = [imbalance(d, [list(range(r * per, (r + 1) * per)) for r in range(u)]) for d in dens_LH]
        balanced = [imbalance(d, snake(d, u)) for d in dens_LH]
        out[f"U{u}"] = {
            "contiguous_mean": sum(contiguous) / len(contiguous),
            "contiguous_max": max(contiguous),
            "balanced_mean": sum(balanced) / len(balanced),
            "balanced_max": max(balanced),
        }
    return out


def synthetic(device: torch.device, quick: bool) -> dict:
    from benchmarks.harness.qk import synthetic_qkv

    heads, dim, grid = (8, 32, (5, 9, 16)) if quick else (40, 128, (21, 45, 80))
    bs = default_block_size(device)
    layout = TileLayout(*grid, time_pairs=bs[0] == 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = {}
    for name, cfg in CONFIGS.items():
        samples = []
        for seed in range(2 if quick else 4):
            q, k, _ = synthetic_qkv(layout, heads, dim, 1, device=device, dtype=dtype, seed=seed)
            samples.append(head_densities(masks.plan_blocks(cfg, q, k, layout, bs)))
        rows[name] = analyse(torch.stack(samples))
    return rows


@torch.no_grad()
def model_layers(device: torch.device, quick: bool) -> dict:
    """Per-layer per-head densities of a random-weight Wan transformer forward (real architecture)."""
    from benchmarks.harness.random_init import WAN_SIZES, random_transformer, smooth_latents
    from wan_nabla.wan.hooks import apply_attention

    size = WAN_SIZES["tiny" if quick else "14B"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_transformer(size, device, dtype)
    shape = (1, 16, 3, 18, 32) if quick else (1, 16, 21, 90, 160)
    x = smooth_latents(shape, device).to(dtype)
    text = torch.randn((1, 512 if not quick else 8, size.text_dim), device=device, dtype=dtype)
    rows = {}
    for name, cfg in CONFIGS.items():
        handle = apply_attention(model, cfg)
        sink = []

        class Recording(Observer):
            def plan_finished(self, call, _sink=sink):
                _sink.append(head_densities(call.plan))

        handle.run.stats.subscribe(Recording())
        model(
            hidden_states=x,
            timestep=torch.full((1,), 500.0, device=device),
            encoder_hidden_states=text,
            return_dict=False,
        )
        handle.remove()
        rows[name] = analyse(torch.stack(sink))
    return rows


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    out = Path(args[0] if args else "head_balance_out")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    t0 = time.perf_counter()
    env = environment(sys.argv[1:], device)
    res = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": env["torch"],
        "commit": env["commit"],
        "command": env["command"],
        "quick": quick,
        "env": env,
        "synthetic_qk": synthetic(device, quick),
    }
    (out / "head_balance.json").write_text(json.dumps(res, indent=2))
    if "--no-model" not in sys.argv:
        res["random_weight_model"] = model_layers(device, quick)
    res["seconds"] = time.perf_counter() - t0
    (out / "head_balance.json").write_text(json.dumps(res, indent=2))
    print(
        f"{'source':<20} {'config':<24} {'mean dens':>9} {'max/min head':>12}  "
        + "  ".join(f"U{u} contig/balanced (mean, max)" for u in (2, 4, 8))
    )
    for src in ("synthetic_qk", "random_weight_model"):
        for name, r in res.get(src, {}).items():
            cells = "  ".join(
                f"U{u} {r[f'U{u}']['contiguous_mean']:.1%}/{r[f'U{u}']['balanced_mean']:.1%} "
                f"({r[f'U{u}']['contiguous_max']:.1%}/{r[f'U{u}']['balanced_max']:.1%})"
                for u in (2, 4, 8)
                if f"U{u}" in r
            )
            print(f"{src:<20} {name:<24} {r['mean_density']:9.3f} {r['head_spread']:12.2f}  {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
