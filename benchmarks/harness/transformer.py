"""Transformer level: one full WanTransformer3DModel forward, dense against each preset, per backend.

    out = run_transformer_level([TransformerScenario("14B", 1280, 720)], torch.device("cuda"),
                                backends=("flex", "fa4"))

Random weights at the real sizes (random_init.py), bf16, batch 1, smooth random latents (so NABLA
sees spatio-temporal structure), 512 random text tokens, timestep 500. Attention is installed with
the app's own `apply_attention`; the run is put past `dense_steps` so each forward measures the
sparse regime. The first (compiling) forward also records the tile-level density before
coarsening; it is not timed. `AttentionRun.attend` and `.plan` are wrapped with CUDA events, which gives,
per forward, the attention time (mask + kernel) summed over layers and the mask-build part of it;
everything else (projections, rotary, FFN, cross-attention, the tile reorder hooks) is
"non-attention". Every config runs once per backend (row "name [flex]", "name [fa4]"; dense
`full` is cuDNN SDPA under flex and flash-attn-4 under fa4). The Amdahl-ideal speed-up of a
sparse row is
    ideal = T_dense / (N_dense + d * A_dense)
with T, N, A the total, non-attention and attention times of the FASTEST dense row of the run and
d the row's measured kept-block density at the kernel geometry (`ideal_tile`, with the tile
density before coarsening, is reported too). Achieved = T_dense / T_row; the ratio of the two is
target T3 (targets.py); dense fa4 over dense cuDNN is target T6.
Limits: forwards after one warm-up forward (compile); random weights.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from wan_nabla.attention import masks
from wan_nabla.attention.run import Observer
from wan_nabla.config import AttentionConfig
from wan_nabla.wan.hooks import apply_attention

from .configs import preset_configs
from .geometry import available_backends
from .random_init import WAN_SIZES, random_transformer, smooth_latents
from .records import compiled_graphs, first_call_s, sync


@dataclass(frozen=True)
class TransformerScenario:
    size: str
    width: int
    height: int
    frames: int = 81
    batch: int = 1

    @property
    def label(self) -> str:
        return f"Wan2.1-{self.size} {self.width}x{self.height}x{self.frames}"

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return (self.batch, 16, (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8)


FULL_SCENARIOS = (TransformerScenario("1.3B", 832, 480), TransformerScenario("14B", 1280, 720))
QUICK_SCENARIOS = (TransformerScenario("tiny", 256, 144, 9),)
EXTRA_ROWS = (
    ("nabla 0.05", AttentionConfig(type="nabla", threshold=0.05)),
    ("nabla 0.1", AttentionConfig(type="nabla", threshold=0.1)),
)


def row_configs(quick: bool) -> list[tuple[str, AttentionConfig]]:
    """(name, config) per row, `full` first."""
    rows = [("full", AttentionConfig())]
    if quick:
        rows += [
            ("nabla 0.5", AttentionConfig(type="nabla", threshold=0.5)),
            ("sta 3-1-1", AttentionConfig(type="sta", sta_window=(3, 1, 1))),
        ]
    else:
        rows += preset_configs() + list(EXTRA_ROWS)
    return rows


class AttentionTimer(Observer):
    """Event pairs around each attention call and its mask build (host clock on the CPU), as an
    observer of the run's statistics."""

    def __init__(self, run, device: torch.device):
        self.device = device
        self.attn: list = []
        self.mask: list = []
        self._starts: dict[str, Any] = {}
        run.stats.subscribe(self)

    def _mark(self):
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def attend_started(self, call) -> None:
        self._starts["attn"] = self._mark()

    def attend_finished(self, call) -> None:
        self.attn.append((self._starts.pop("attn"), self._mark()))

    def plan_started(self, call) -> None:
        self._starts["mask"] = self._mark()

    def plan_finished(self, call) -> None:
        self.mask.append((self._starts.pop("mask"), self._mark()))

    def reset(self) -> None:
        self.attn.clear()
        self.mask.clear()

    def total_ms(self, sink) -> float:
        if self.device.type == "cuda":
            return sum(s.elapsed_time(e) for s, e in sink)
        return sum(e - s for s, e in sink) * 1e3


@torch.no_grad()
def run_scenario(
    s: TransformerScenario,
    device: torch.device,
    *,
    quick: bool = False,
    reps: int = 2,
    rows: list[str] | None = None,
    backends=None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = WAN_SIZES[s.size]
    t0 = time.perf_counter()
    model = random_transformer(size, device, dtype)
    sync(device)
    build_s = time.perf_counter() - t0
    x = smooth_latents(s.latent_shape, device).to(dtype)
    text = torch.randn((s.batch, 512, size.text_dim), device=device, dtype=dtype)
    ts = torch.full((s.batch,), 500.0, device=device)
    _, _, f, h, w = s.latent_shape
    params_b = sum(p.numel() for p in model.parameters()) / 1e9
    log(f"[transformer] {s.label}: {params_b:.2f}B params (built in {build_s:.1f} s), patch grid {f}x{h // 2}x{w // 2}")

    def forward():
        return model(hidden_states=x, timestep=ts, encoder_hidden_states=text, return_dict=False)[0]

    results = []
    for backend in available_backends(backends, device, dtype, log):
        for name, cfg in row_configs(quick):
            if rows is not None and name not in rows and name != "full":
                continue
            row = _measure(model, forward, replace(cfg, backend=backend), f"{name} [{backend}]", s, size, device, reps)
            results.append(row)
            log(
                f"  {row['name']}: {row['total_ms']:.1f} ms (attention {row['attention_ms']:.1f} ms = "
                f"{row['attention_share']:.0%}, mask {row['mask_ms']:.1f} ms), density {row['density']:.3f}"
            )
    dense = min((r for r in results if r["config"]["type"] == "full"), key=lambda r: r["total_ms"], default=None)
    if dense is not None:
        T, A = dense["total_ms"], dense["attention_ms"]
        N = T - A
        for row in results:
            if row["config"]["type"] == "full":
                continue
            row["speedup"] = T / row["total_ms"]
            row["ideal_speedup"] = T / (N + row["density"] * A)
            row["ideal_speedup_tile"] = T / (N + row["tile_density"] * A)
            row["fraction_of_ideal"] = row["speedup"] / row["ideal_speedup"]
            row["fraction_of_ideal_tile"] = row["speedup"] / row["ideal_speedup_tile"]
            if device.type != "cuda":  # tiny CPU shapes: the fields feed the tests of T3, nothing to read
                log(f"  {row['name']}: {row['speedup']:.2f}x against {dense['name']} (CPU: no Amdahl ideal shown)")
                continue
            log(
                f"  {row['name']}: {row['speedup']:.2f}x of ideal {row['ideal_speedup']:.2f}x "
                f"({row['fraction_of_ideal']:.0%}) against {dense['name']}"
            )
    model = x = text = None  # free the model before the next scenario
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "scenario": s.label,
        "size": s.size,
        "params_b": params_b,
        "build_s": build_s,
        "rows": results,
        "fastest_dense": dense["name"] if dense else None,
    }


def _measure(model, forward, cfg: AttentionConfig, name: str, s, size, device: torch.device, reps: int) -> dict:
    """One row: apply the config, one untimed (compiling) forward, `reps` timed forwards."""
    handle = apply_attention(model, cfg)
    run = handle.run
    run.set_step(cfg.dense_steps)  # the sparse regime (presets with dense_steps start dense)
    timer = AttentionTimer(run, device)
    tiles: list[torch.Tensor] = []
    try:
        g0 = compiled_graphs()
        tile_density = TileDensity(cfg, tiles)
        if cfg.sparse:  # tile density (before coarsening) is collected in the untimed first forward
            run.stats.subscribe(tile_density)
        first = first_call_s(forward, device)
        run.stats.unsubscribe(tile_density)
        g1 = compiled_graphs()
        totals, attn, mask = [], [], []
        out = None
        for _ in range(reps):
            timer.reset()
            run.reset_stats()
            sync(device)
            t = time.perf_counter()
            out = forward()
            sync(device)
            totals.append((time.perf_counter() - t) * 1e3)
            attn.append(timer.total_ms(timer.attn))
            mask.append(timer.total_ms(timer.mask))
        g2 = compiled_graphs()
        finite = bool(torch.isfinite(out).all())
        summary = run.density_summary()
    finally:
        handle.remove()
    total, a = statistics.median(totals), statistics.median(attn)
    return {
        "scenario": s.label,
        "name": name,
        "config": cfg.to_dict(),
        "backend": summary["backend"],
        "total_ms": total,
        "attention_ms": a,
        "mask_ms": statistics.median(mask),
        "non_attention_ms": total - a,
        "attention_share": a / total,
        "per_layer_attention_ms": a / size.layers,
        "density": summary["overall"],
        "tile_density": float(torch.stack(tiles).mean()) if tiles else 1.0,
        "first_forward_s": first,
        "graphs_compiled_first": g1 - g0,
        "recompiles_after_first": g2 - g1,
        "reps": reps,
        "times_ms": totals,
        "finite_output": finite,
        "fallback": run.fallback,
    }


class TileDensity(Observer):
    """Records the tile-level keep share of each sparse call (before coarsening to blocks)."""

    def __init__(self, cfg: AttentionConfig, sink: list):
        self.cfg, self.sink = cfg, sink

    def plan_started(self, call) -> None:
        self.sink.append(masks.tile_keep_mask(self.cfg, call.q, call.k, call.layout).float().mean())


def run_transformer_level(
    scenarios, device: torch.device, *, quick: bool = False, log: Callable[[str], None] = print, **kw
) -> list[dict[str, Any]]:
    out = []
    for s in scenarios:
        try:
            out.append(run_scenario(s, device, quick=quick, log=log, **kw))
        except torch.OutOfMemoryError as e:
            out.append({"scenario": s.label, "error": f"out of memory: {str(e).splitlines()[0]}", "rows": []})
            gc.collect()
            torch.cuda.empty_cache()
    return out
