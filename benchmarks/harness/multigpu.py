"""Multi-GPU benchmark: per-step time on 1 GPU vs Ulysses vs CFG parallel, and exactness across ranks.

    benchmarks/jobs/gpu_multigpu.sh OUT_DIR                       # every GPU of the machine (torchrun)
    torchrun --nproc-per-node 2 -m benchmarks.harness.multigpu --quick --device cpu --out DIR   # CPU, tiny

1. Exactness on the devices: the tiny model (4 heads, fp32, padded 208x80x9 grid, 2 steps) run by
   the app's own VideoGenerator under each parallel layout that 4 heads allow, against the same
   generation on rank 0 alone: max |diff| and relative L2 of the final latents, densities.
2. Per-step time of Wan2.1 transformers of the real architectures with RANDOM weights
   (benchmarks/harness/random_init.py, bf16): 1.3B at 832x480x81 and 14B at 1280x720x81. One step = the CFG
   pair's transformer forward(s) + collectives + guidance combination, exactly the app's
   `pipeline.predict_noise` (no text encoder, scheduler or VAE). Layouts for N ranks: `1gpu`
   (every rank alone, batch of 2 as the app does; ranks run it at the same time), `ulysses{N}`
   (batch of 2, tokens split over N ranks) and, for even N, `cfg2` (x ulysses N/2): one branch per
   half. Attention: full (cuDNN SDPA), STA 11-3-3 and NABLA 0.4 (`--attention` picks rows), every
   step sparse (no dense steps). One warm-up step (compile; reported as warmup_s), then `--steps` timed steps; the
   median is reported, the slowest rank's. comm_s: time inside the collectives (all-to-alls,
   gathers, CFG exchange) by CUDA events, per step. Speed-up = 1gpu step / layout step, same
   attention. Measurements start only while under `--budget-s`; the rest are listed as skipped.

Writes OUT/multigpu.json (everything, device, versions, commit) and OUT/multigpu.md (the table),
after every measurement, and prints the table last. Limits: random weights (NABLA keeps more
blocks than on a trained model: see the density column); one node.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from wan_nabla.config import ConfigError, ParallelConfig, RunConfig
from wan_nabla.distributed import Launch, ParallelContext, ParallelPlan, plan_ranks, rank_device
from wan_nabla.pipeline import VideoGenerator, predict_noise, sync_device
from wan_nabla.wan.hooks import apply_attention

from .random_init import WAN_SIZES, WanSize, random_transformer, smooth_latents
from .records import environment

ATTENTION = {
    "full": {"type": "full"},
    "sta 11-3-3": {"type": "sta", "sta_window": [11, 3, 3]},
    "nabla 0.4": {"type": "nabla", "threshold": 0.4},
}
SIZES = [(WAN_SIZES["1.3B"], 832, 480, 81), (WAN_SIZES["14B"], 1280, 720, 81)]
# Exactness: every attention type, with a dense step (STA) and a dense layer (NABLA+STA), on a
# padded grid of 6 tiles (208x80x9 -> patch grid 3x5x13 -> 3x8x16): shards of whole tiles, uneven
# raster shards for full. tests/distributed/test_multiprocess.py uses the same cases.
EXACT_ATTENTION = {
    "nabla 0.5": {"type": "nabla", "threshold": 0.5},
    "sta 1-1-1, 1 dense step": {"type": "sta", "sta_window": [1, 1, 1], "dense_steps": 1},
    "nabla 0.3 + sta 3-1-1, dense layer 1": {
        "type": "nabla_sta",
        "threshold": 0.3,
        "sta_window": [3, 1, 1],
        "dense_layers": [1],
    },
    "full": {"type": "full"},
}
EXACT_GEN = {"size": (208, 80), "frames": 9, "steps": 2}
# --quick (CPU test of this script): the exactness model's attention shapes (4 heads of 16 on the
# same 208x80x9 grid), so the timing compiles no flex shape the exactness check did not.
QUICK_ATTENTION = {"full": {"type": "full"}, "sta 1-1-1": {"type": "sta", "sta_window": [1, 1, 1]}}
QUICK_SIZES = [(WanSize("tiny-4h", 64, 4, 2, 128, text_dim=32, freq_dim=32), 208, 80, 9)]


def layouts(world: int) -> dict[str, ParallelConfig | None]:
    """The layouts measured on `world` ranks: 1gpu, ulysses{world}, cfg2 (x ulysses world/2)."""
    out: dict[str, ParallelConfig | None] = {"1gpu": None}
    if world > 1:
        out[f"ulysses{world}"] = ParallelConfig(ulysses_degree=world)
    if world % 2 == 0:
        u = world // 2
        out["cfg2" if u == 1 else f"cfg2xulysses{u}"] = ParallelConfig(ulysses_degree=u, cfg_parallel=True)
    return out


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.launch = Launch.from_env()
        self.device = rank_device(args.device, self.launch)
        self.t0 = time.perf_counter()
        self.contexts: dict[str, ParallelContext] = {}
        # The world as N groups of one: barriers and gathers for every layout, 1gpu included.
        self.world = self._context("world", ParallelConfig(ulysses_degree=1), batch=True)
        self.out = Path(args.out)
        self.results: dict[str, Any] = {"env": {}, "exactness": [], "timing": [], "skipped": [], "errors": []}

    # ---- plumbing ----------------------------------------------------------------------
    def _context(self, name: str, par: ParallelConfig, heads: int | None = None, batch: bool = False):
        if name not in self.contexts:
            layout = plan_ranks(
                par, self.launch.world_size, command="batch" if batch else "generate", heads=heads, guidance_scale=5.0
            )
            self.contexts[name] = ParallelContext.start(ParallelPlan(self.launch, layout, self.device, 900.0))
        return self.contexts[name]

    @property
    def main(self) -> bool:
        return self.launch.rank == 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self) -> None:
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "multigpu.json").write_text(json.dumps(self.results, indent=2) + "\n")
            (self.out / "multigpu.md").write_text(markdown(self.results))

    # ---- 1. exactness --------------------------------------------------------------------
    def exactness(self) -> None:
        """Every layout that 4 heads allow vs the same generation on rank 0 alone (see module doc)."""
        ref: dict[str, Any] = {}
        if self.main:  # rank 0 alone: the one-process result
            for name, att in EXACT_ATTENTION.items():
                ref[name] = self._tiny_generate(att, None)
        self.world.barrier()
        for lay, par in layouts(self.launch.world_size).items():
            if par is None or 4 % par.ulysses_degree:
                continue
            ctx = self._context(lay, par, heads=4)
            for name, att in EXACT_ATTENTION.items():
                res = self._tiny_generate(att, ctx)
                if self.main:
                    one = ref[name]
                    diff = res.latents.double() - one.latents.double()
                    self.results["exactness"].append(
                        {
                            "layout": lay,
                            "attention": name,
                            "max_abs": float(diff.abs().max()),
                            "rel_l2": float(diff.norm() / one.latents.double().norm()),
                            "density": res.attention["per_step"],
                            "density_one_rank": one.attention["per_step"],
                            "density_equal": bool(
                                np.allclose(res.attention["per_step"], one.attention["per_step"], atol=1e-6)
                            ),
                            "frames": None if res.frames is None else list(res.frames.shape),
                        }
                    )
        self.save()

    def _tiny_generate(self, att: dict, ctx):
        from wan_nabla.tiny import build_tiny_pipeline

        cfg = RunConfig.from_mapping({"attention": att, "generation": {"dtype": "float32"}})
        gen = VideoGenerator(
            build_tiny_pipeline(seed=0, heads=4).to(self.device), cfg, self.device, "tiny", parallel=ctx
        )
        try:
            return gen.generate("a fox in the snow", progress=False, **EXACT_GEN)
        finally:
            gen.close()

    # ---- 2. per-step timing ------------------------------------------------------------
    def timing(self) -> None:
        for spec, w, h, frames in QUICK_SIZES if self.args.quick else SIZES:
            size = spec.name
            if self.args.sizes and size not in self.args.sizes:
                continue
            t = time.perf_counter()
            model = random_transformer(spec, self.device, self.dtype)
            sync_device(self.device)
            build_s = time.perf_counter() - t
            lat = smooth_latents((1, 16, (frames - 1) // 4 + 1, h // 8, w // 8), torch.device("cpu"), seed=0)
            gen = torch.Generator().manual_seed(1)
            pos, neg = (torch.randn(1, 512, spec.text_dim, generator=gen) for _ in range(2))
            inputs = (
                lat.to(self.device),
                torch.tensor(500.0, device=self.device),
                pos.to(self.device, self.dtype),
                neg.to(self.device, self.dtype),
            )
            for att_name, att in (QUICK_ATTENTION if self.args.quick else ATTENTION).items():
                if self.args.attention and att_name not in self.args.attention:
                    continue
                for lay, par in layouts(self.launch.world_size).items():
                    row = {
                        "size": size,
                        "video": f"{w}x{h}x{frames}",
                        "attention": att_name,
                        "layout": lay,
                        "model_build_s": build_s,
                    }
                    if par is not None and spec.heads % par.ulysses_degree:
                        self.results["skipped"].append({**row, "why": f"{spec.heads} heads % {par.ulysses_degree}"})
                        continue
                    if self.elapsed() > self.args.budget_s:
                        self.results["skipped"].append({**row, "why": f"time budget {self.args.budget_s}s spent"})
                        continue
                    ctx = self._context(lay, par, heads=spec.heads) if par is not None else None
                    row.update(self._measure(model, att, ctx, inputs))
                    self.results["timing"].append(row)
                    self.save()
            del model, inputs
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        add_speedups(self.results["timing"])
        self.save()

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def _measure(self, model, att: dict, ctx, inputs) -> dict[str, Any]:
        latents, t, pos, neg = inputs
        handle = apply_attention(model, att, sequence_parallel=ctx.sequence_parallel() if ctx else None)
        if ctx is not None:
            handle.run.stats_mean = ctx.item_mean
            ctx.timer.enabled = True
            ctx.timer.seconds()
        pipe = SimpleNamespace(transformer=model)
        both = torch.cat([pos, neg]) if ctx is None or not ctx.cfg_parallel else None
        steps, comm = [], []
        try:
            with torch.no_grad():
                for _ in range(1 + self.args.steps):
                    self.world.barrier()
                    sync_device(self.device)
                    t0 = time.perf_counter()
                    noise = predict_noise(pipe, latents, t, pos, neg, 5.0, both, ctx)
                    sync_device(self.device)
                    steps.append(time.perf_counter() - t0)
                    comm.append(ctx.timer.seconds() if ctx is not None else 0.0)
                    del noise
            density = handle.run.density_summary()["overall"]
        finally:
            handle.remove()
            if ctx is not None:
                ctx.timer.enabled = False
        mine = {"step_s": statistics.median(steps[1:]), "comm_s": statistics.median(comm[1:]), "warmup_s": steps[0]}
        every = self.world.gather_to_main(mine)
        out = {k: max(m[k] for m in every) for k in mine} if every else mine
        out["density"] = density
        out["steps"] = self.args.steps
        if self.device.type == "cuda":
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out


def add_speedups(rows: list[dict[str, Any]]) -> None:
    base = {(r["size"], r["attention"]): r["step_s"] for r in rows if r["layout"] == "1gpu"}
    for r in rows:
        b = base.get((r["size"], r["attention"]))
        r["speedup"] = b / r["step_s"] if b else None


def markdown(results: dict[str, Any]) -> str:
    env = results.get("env", {})
    lines = [
        f"# Multi-GPU per-step time ({env.get('device_name', '?')} x {env.get('world_size', '?')}, "
        f"torch {env.get('torch', '?')}, commit {env.get('commit', '?')})",
        "",
        "Random weights (real Wan2.1 architectures), bf16 on CUDA. One step = the CFG pair's transformer "
        "forward(s) + collectives + guidance; median of the timed steps, slowest rank. comm = time inside "
        "collectives per step. Speed-up vs `1gpu` with the same attention.",
        "",
        "| model | video | attention | layout | step s | comm s | comm share | speed-up | density | warm-up s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.get("timing", []):
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        lines.append(
            f"| {r['size']} | {r['video']} | {r['attention']} | {r['layout']} | {r['step_s']:.3f} | "
            f"{r['comm_s']:.3f} | {r['comm_s'] / r['step_s']:.1%} | {sp} | {r['density']:.3f} | "
            f"{r['warmup_s']:.1f} |"
        )
    if results.get("exactness"):
        lines += [
            "",
            "Exactness (tiny model, fp32, 2 steps, padded grid) vs the same run on one rank:",
            "",
            "| layout | attention | max abs diff | rel. L2 | densities equal |",
            "|---|---|---|---|---|",
        ]
        for r in results["exactness"]:
            lines.append(
                f"| {r['layout']} | {r['attention']} | {r['max_abs']:.2e} | {r['rel_l2']:.2e} | {r['density_equal']} |"
            )
    for s in results.get("skipped", []):
        lines.append(f"\nskipped: {s['size']} {s['attention']} {s['layout']}: {s['why']}")
    for e in results.get("errors", []):
        lines.append(f"\nerror: {e}")
    return "\n".join(lines) + "\n"


def _nccl_version() -> str:
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.harness.multigpu", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (multigpu.json, multigpu.md)")
    p.add_argument("--device", default="auto", help="auto/cuda (cuda:LOCAL_RANK) or cpu (gloo)")
    p.add_argument("--quick", action="store_true", help="tiny model and grid (CPU test of this script)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per measurement (after one warm-up)")
    p.add_argument("--sizes", nargs="*", help="only these model sizes (1.3B, 14B)")
    p.add_argument("--attention", nargs="*", help=f"only these attention rows ({', '.join(ATTENTION)})")
    p.add_argument("--budget-s", type=float, default=470.0, help="start no measurement after this many seconds")
    p.add_argument("--no-exactness", action="store_true", help="skip the exactness check")
    args = p.parse_args(argv)
    if "WORLD_SIZE" not in os.environ:  # plain `python -m`: a world of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        bench = Bench(args)
    except ConfigError as e:
        print(f"multigpu: error: {e}", file=sys.stderr)
        return 2
    env = environment(argv, bench.device)
    env.update(
        command="python -m benchmarks.harness.multigpu " + " ".join(sys.argv[1:] if argv is None else argv),
        world_size=bench.launch.world_size,
        weights="random (real architectures)",
        nccl=_nccl_version() if bench.device.type == "cuda" else None,
    )
    bench.results["env"] = env
    try:
        if not args.no_exactness:
            bench.exactness()
        bench.timing()
    except Exception as e:  # noqa: BLE001 - keep what was measured; the table says what failed
        bench.results["errors"].append(f"rank {bench.launch.rank}: {type(e).__name__}: {e}")
        bench.save()
        raise
    finally:
        bench.world.close()  # destroys every group
    if bench.main:
        print(markdown(bench.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
