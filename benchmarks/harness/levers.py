"""Speed levers that stack with sparse attention, measured end to end on one GPU.

    python -m benchmarks.harness.levers --out OUT_DIR                       # 14B 1280x720x81 (H100)
    python -m benchmarks.harness.levers --quick --device cpu --out /tmp/l   # tiny shapes, for tests
    benchmarks/jobs/gpu_levers.sh OUT_DIR                                        # the GPU run, in one command

One random-weight pipeline (random_init.random_pipeline: UMT5-XXL, the transformer, the Wan VAE)
is built once and reused by every row. Each row is a VideoGenerator (the app's own loop) with one
lever more than the row before, generating one video of `steps` steps without CFG (guidance 1,
Euler, shift 5: the distilled-LoRA preset's sampling):
    dense -> + STA 11-3-3 -> + compiled blocks -> + LoRA, fused -> + first-block cache
then a variant row: compiled blocks with the graph split around attention instead of the custom
op, skipped when the run would pass --deadline-s (its cost is estimated from the compiled row);
then + FP8 linears (quantize.py; last, because quantising the shared pipeline is permanent) and +
fast decode (the same with the VAE in bf16). The LoRA, FP8 and fast-decode rows keep their
per-step transformer outputs and final latents: result["quality"] compares FP8 against bf16, the
bf16 decode against the fp32 one, and both together (relative L2 per step and of the final
latents, PSNR / SSIM of the decoded videos), and summary["speed_goal"] checks the FP8 + fast
decode row against the goals (<= 12 s end to end, <= 9 s DiT, <= 3 s decode, non-attention
<= 0.6x of bf16 per forward); the published operating point (50 steps with CFG at 720p) is
ESTIMATED from that row's measured step.
The dense row is cuDNN SDPA; the sparse rows use --attention-backend (default auto: FA4 where
installed and supported, else flex), and each row records the backend it ran (and decoded rows
whether the VAE decoded tiled). `--rows` picks rows by key (dense sta compiled lora cache variant fp8 fastdecode). The LoRA is synthetic, of LightX2V's Wan2.1 T2V 14B
distill LoRA's shape as assumed here: rank 64 (alpha 64) on q/k/v/o of self- and cross-attention
and ffn.0/ffn.2 of every block, original naming (lora_down/lora_up), `diff_b` bias deltas and a
`diff_m` modulation table per block (added to the modulation tables, as LightX2V does). Fused, it costs
nothing per step; the row shows that and the merge time.

Per row: the generator is built (LoRA merge timed as setup_s), one warm-up transformer forward
at the video's shape compiles what the row needs (compile_s: TorchDynamo + Inductor seconds,
excluded from the timings), then the timed generate: text encoding, every denoising step. CUDA
events around AttentionRun.attend give the attention time per forward; the rest of a step is
"non-attention" (projections, FFN, cross-attention, norms, rotary, the tile hooks). The VAE decode
costs the same for every row, so it runs twice: for the LoRA row (the uncached reference) and the
cache row; their decoded frames give the cache's quality cost: PSNR over the video and mean SSIM,
from the product's one implementation (wan_nabla.compare.metrics.frame_metrics: scikit-image's
SSIM definition, 7x7 window, computed by its torch twin ssim_torch on the run's device, since
scikit-image takes ~30 s of CPU per 81-frame 720p video). Results committed before the harness moved to
benchmarks/ used a Gaussian-weighted SSIM (sigma 1.5): their SSIM digits are not comparable. End to end = encode + denoise + decode (the measured
decode for every row). The 50-step CFG run is an ESTIMATE, not run: encode + 50 x 2 x the row's
measured batch-1 step + decode (CFG as two passes; the batched pair costs about the same at these
sizes), plus the published STA schedule (12 dense steps, then STA).
Outputs: levers.json (every number, environment, commit), levers.md; the table is printed last.
Limits: random weights (noise videos; a cache skips only what random residuals allow), synthetic
LoRA, one video per row.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wan_nabla.compare.metrics import frame_metrics, rel_l2
from wan_nabla.compare.report import fmt
from wan_nabla.config import AttentionConfig, GenerationConfig, LoraSpec, MemoryConfig, RunConfig, SpeedConfig

from .random_init import WAN_SIZES, WanSize, random_pipeline
from .records import environment, sync
from .transformer import AttentionTimer

PROMPT = "a red fox running through fresh snow at dawn, cinematic"
LORA_RANK = 64


@dataclass(frozen=True)
class LeverScenario:
    size: str
    width: int
    height: int
    frames: int
    steps: int = 4
    sta_window: tuple[int, int, int] = (11, 3, 3)

    @property
    def label(self) -> str:
        return f"Wan2.1-{self.size} {self.width}x{self.height}x{self.frames}, {self.steps} steps CFG-free"


FULL = LeverScenario("14B", 1280, 720, 81)
QUICK = LeverScenario("tiny", 128, 128, 9, sta_window=(1, 1, 1))


@dataclass
class Row:
    key: str
    name: str
    attention: AttentionConfig
    compile: str = "none"
    cache: str = "none"
    lora: tuple[LoraSpec, ...] = ()
    decode: bool = False
    optional: bool = False
    warm: bool = True
    """A warm-up forward first (rows that compile something; dense SDPA compiles nothing)."""
    note: str = ""
    quantize: str = "none"
    vae_dtype: str = "fp32"
    capture: bool = False
    """Keep the per-step noise predictions and final latents (the FP8 quality comparison)."""
    result: dict[str, Any] = field(default_factory=dict)


def plan_rows(s: LeverScenario, lora_path: str, cache: str, backend: str = "auto") -> list[Row]:
    """The rows in order. The dense row is always cuDNN SDPA (backend flex: full attention goes to
    SDPA), the baseline every ratio is taken against; the sparse rows use `backend`."""
    sta = AttentionConfig(type="sta", sta_window=s.sta_window, backend=backend)
    lora = (LoraSpec(lora_path),)
    sta_label = "STA " + "-".join(map(str, s.sta_window))
    return [
        Row("dense", "dense (cuDNN SDPA)", AttentionConfig(backend="flex"), warm=False),
        Row("sta", f"+ {sta_label}", sta),
        Row(
            "compiled",
            "+ compiled blocks",
            sta,
            compile="blocks",
            note="attention as one custom op inside each block graph",
        ),
        Row(
            "lora",
            "+ LoRA, fused",
            sta,
            compile="blocks",
            lora=lora,
            decode=True,
            note=f"synthetic rank {LORA_RANK}",
            capture=True,
        ),
        Row(
            "cache",
            f"+ cache {cache}",
            sta,
            compile="blocks",
            cache=cache,
            decode=True,
            note="LoRA merged since the row above",
        ),
        Row(
            "variant",
            "variant: compiled blocks, graph split",
            sta,
            compile="blocks-split",
            optional=True,
            note="graph split around attention (torch.compiler.disable); LoRA merged if its row ran",
        ),
        # FP8 last: quantising is permanent for the shared pipeline (the rows above stay bf16).
        Row(
            "fp8",
            "+ FP8 linears",
            sta,
            compile="blocks",
            quantize="fp8",
            decode=True,
            capture=True,
            note="torchao float8 e4m3, rowwise scales; LoRA merged if its row ran",
        ),
        Row(
            "fastdecode",
            "+ fast decode (bf16 VAE)",
            sta,
            compile="blocks",
            quantize="fp8",
            vae_dtype="bf16",
            decode=True,
            capture=True,
            note="FP8 linears as above",
        ),
    ]


ROW_KEYS = ("dense", "sta", "compiled", "lora", "cache", "variant", "fp8", "fastdecode")
QUALITY_PAIRS = (
    ("lora", "fp8", "fp8_vs_bf16"),
    ("fp8", "fastdecode", "bf16_decode_vs_fp32_decode"),
    ("lora", "fastdecode", "fp8_and_bf16_decode_vs_bf16"),
)
"""(reference row, candidate row, name) of result["quality"]: the FP8 transformer against bf16 (same
seed, same LoRA-merged weights), the bf16 decode against the fp32 one (same FP8 latents), both."""


# ---- synthetic LoRA -------------------------------------------------------------------------------
def write_synthetic_lora(
    path: Path, size: WanSize, rank: int = LORA_RANK, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> dict[str, Any]:
    """A LoRA in original Wan naming of the assumed LightX2V key set (module doc), small values."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    d, f = size.dim, size.ffn
    shapes = {f"{a}.{o}": (d, d) for a in ("self_attn", "cross_attn") for o in "qkvo"}
    shapes.update({"ffn.0": (d, f), "ffn.2": (f, d)})  # (in, out)
    sd = {}
    for b in range(size.layers):
        for name, (n_in, n_out) in shapes.items():
            key = f"diffusion_model.blocks.{b}.{name}"
            sd[f"{key}.lora_down.weight"] = (torch.randn(rank, n_in, generator=g) * 2e-3).to(dtype)
            sd[f"{key}.lora_up.weight"] = (torch.randn(n_out, rank, generator=g) * 2e-3).to(dtype)
            sd[f"{key}.alpha"] = torch.tensor(float(rank))
            sd[f"{key}.diff_b"] = (torch.randn(n_out, generator=g) * 1e-3).to(dtype)
        sd[f"diffusion_model.blocks.{b}.diff_m"] = (torch.randn(1, 6, d, generator=g) * 1e-3).to(dtype)
    save_file(sd, str(path))
    return {
        "path": str(path),
        "rank": rank,
        "tensors": len(sd),
        "bytes": path.stat().st_size,
        "targets": sorted(shapes),
        "note": "synthetic: shape of LightX2V's Wan2.1 T2V 14B rank-64 LoRA as assumed",
    }


# ---- one row --------------------------------------------------------------------------------------
@torch.no_grad()  # as generate runs: grad mode is part of what a compiled graph is guarded on
def _warm_forward(gen, s: LeverScenario, device: torch.device) -> None:
    """One transformer forward at the video's shape (batch 1), so compiling stays out of the timings."""
    from wan_nabla import adapter

    pipe = gen.pipe
    lat = adapter.initial_latents(pipe, s.width, s.height, s.frames, 0, device)
    emb = torch.zeros((1, 512, pipe.transformer.config.text_dim), device=device, dtype=pipe.transformer.dtype)
    gen.handle.run.set_step(0)
    adapter.denoise(pipe, lat, torch.tensor(999.0, device=device), emb)
    sync(device)


def quality(ref: dict[str, Any], cand: dict[str, Any], ref_frames, cand_frames, device) -> dict[str, Any]:
    """How far `cand`'s row is from `ref`'s: relative L2 of the transformer output per step (step 0
    has the same input in both runs: the one-forward error; later steps follow each run's own
    latents), of the final latents, and PSNR / SSIM of the decoded frames (`frame_quality`)."""
    a, b = cand["_capture"], ref["_capture"]
    out = {
        "reference": ref["name"],
        "candidate": cand["name"],
        "noise_rel_l2_per_step": [rel_l2(x, y) for x, y in zip(a["noise"], b["noise"], strict=False)],
        "final_latents_rel_l2": rel_l2(a["latents"], b["latents"]),
    }
    if ref_frames is not None and cand_frames is not None:
        out["psnr_db"], out["ssim"] = frame_quality(ref_frames, cand_frames, device)
    return out


def frame_quality(ref_frames, cand_frames, device: torch.device) -> tuple[Any, float]:
    """PSNR over the video and mean SSIM (compare.metrics.frame_metrics, SSIM by its torch twin on
    `device`: the same definition as scikit-image's, without its ~30 s of CPU per 720p video)."""
    overall = frame_metrics(ref_frames, cand_frames, ssim_device=device)["overall"]
    return overall["psnr_db"], overall["ssim_mean"]


def run_row(
    pipe, s: LeverScenario, row: Row, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, Any], np.ndarray | None]:
    """One row's record, and its decoded frames when the row decodes."""
    from wan_nabla.pipeline import VideoGenerator, compile_seconds

    gen_cfg = GenerationConfig(
        size=(s.width, s.height),
        frames=s.frames,
        steps=s.steps,
        guidance_scale=1.0,
        shift=5.0,
        sampler="euler",
        device=str(device),
        dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
    )
    cfg = RunConfig(
        attention=row.attention,
        generation=gen_cfg,
        lora=row.lora,
        speed=SpeedConfig(compile=row.compile, cache=row.cache, quantize=row.quantize),
        memory=MemoryConfig(vae_dtype=row.vae_dtype),
    )
    t0 = time.perf_counter()
    gen = VideoGenerator(pipe, cfg, device, model_id=f"random-{s.size}")
    sync(device)
    setup_s = time.perf_counter() - t0
    try:
        timer = AttentionTimer(gen.handle.run, device)
        c0 = compile_seconds()
        t0 = time.perf_counter()
        if row.warm:
            _warm_forward(gen, s, device)
        warm_s = time.perf_counter() - t0
        compile_s = compile_seconds() - c0
        timer.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        noise: list[torch.Tensor] = []
        on_step = (lambda i, n, lat: noise.append(n.detach().float().cpu())) if row.capture else None
        res = gen.generate(PROMPT, progress=False, decode=row.decode, on_step=on_step)
        forwards = s.steps * res.speed["passes_per_step"]
        attn_ms = timer.total_ms(timer.attn) / forwards
        mask_ms = timer.total_ms(timer.mask) / forwards
    finally:
        gen.close()
    t = res.timings
    step_s = statistics.median(t["per_step_s"])
    out = {
        "key": row.key,
        "name": row.name,
        "note": row.note,
        "attention": row.attention.to_dict(),
        "compile": gen.compile_mode,
        "cache": row.cache,
        "lora": res.speed["lora"],
        "setup_s": setup_s,
        "warmup_forward_s": warm_s,
        "compile_s": compile_s,
        "warmup_minus_step_s": warm_s - statistics.median(res.timings["per_step_s"]),
        "graphs_compiled_in_generate": res.speed["compile"]["graphs_compiled"],
        "compile_error": res.speed["compile"]["error"],
        "encode_s": t["text_encoding_s"],
        "denoise_s": t["denoising_s"],
        "per_step_s": t["per_step_s"],
        "step_median_s": step_s,
        "attention_ms_per_forward": attn_ms,
        "mask_ms_per_forward": mask_ms,
        "non_attention_ms_per_forward": step_s * 1e3 - attn_ms,
        "decode_s": t["decode_s"],
        "density": res.attention.get("overall"),
        "backend": res.attention.get("backend"),
        "vae_tiling": t.get("vae_tiling") if row.decode else None,
        "cache_record": res.speed["cache"],
        "peak_gpu_memory_gb": t.get("peak_gpu_memory_gb"),
        "finite": bool(np.isfinite(res.frames).all()) if row.decode else None,
        "quantize": res.speed["quantize"],
        "vae_dtype": row.vae_dtype,
    }
    if row.capture:
        out["_capture"] = {"noise": noise, "latents": res.latents}
    return out, (res.frames if row.decode else None)


# ---- the run --------------------------------------------------------------------------------------
def estimate_50_step_cfg(rows: list[dict[str, Any]], encode_s: float, decode_s: float) -> list[dict[str, Any]]:
    """ESTIMATES of a 50-step CFG run from measured batch-1 steps (module doc)."""
    by = {r["name"]: r for r in rows if "step_median_s" in r}
    dense = next((r for n, r in by.items() if n.startswith("dense")), None)
    out = []
    for name, r in by.items():
        if r["cache"] != "none" or name.startswith("variant"):
            continue  # a cache's skip rate at 50 steps is not the 4-step one: not extrapolated
        out.append(
            {
                "config": name,
                "estimate_s": encode_s + 50 * 2 * r["step_median_s"] + decode_s,
                "dit_s": 50 * 2 * r["step_median_s"],
            }
        )
        if dense is not None and r is not dense and r["attention"]["type"] == "sta":
            dit = 2 * (12 * dense["step_median_s"] + 38 * r["step_median_s"])
            out.append(
                {
                    "config": f"{name}, published schedule (12 dense steps)",
                    "estimate_s": encode_s + dit + decode_s,
                    "dit_s": dit,
                }
            )
    return out


SPEED_GOALS = {"e2e_s": 12.0, "dit_s": 9.0, "decode_s": 3.0, "non_attention_ratio": 0.6}
"""Goals of the FP8 + fast decode row (STA 11-3-3 + compiled blocks + FP8 + bf16 decode, 14B 720p, 4
CFG-free steps): end to end, DiT, decode, and non-attention time per forward against the bf16 row."""


def summarize(s: LeverScenario, rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if "denoise_s" in r]
    decodes = [r["decode_s"] for r in ok if r.get("decode_s") and r.get("vae_dtype", "fp32") == "fp32"]
    decode_s = statistics.median(decodes) if decodes else None
    prev = None
    for r in ok:
        # a row that decoded counts its own decode (the bf16 VAE row differs); others the fp32 median
        r["e2e_s"] = r["encode_s"] + r["denoise_s"] + (r.get("decode_s") or decode_s or 0.0)
        r["speedup_vs_dense_dit"] = ok[0]["denoise_s"] / r["denoise_s"]
        if prev is not None and not r["name"].startswith("variant"):
            r["speedup_vs_previous_dit"] = prev["denoise_s"] / r["denoise_s"]
        if not r["name"].startswith("variant"):
            prev = r
    goal_rows = [r for r in ok if r["compile"] != "none" and r["lora"] and r["attention"]["type"] == "sta"]
    goal = None
    if goal_rows and decode_s is not None:
        g = goal_rows[0]
        goal = {
            "row": g["name"],
            "e2e_s": g["e2e_s"],
            "dit_s": g["denoise_s"],
            "e2e_goal_s": 30.0,
            "dit_goal_s": 16.0,
            "e2e_met": g["e2e_s"] <= 30.0,
            "dit_met": g["denoise_s"] <= 16.0,
        }
    encode = statistics.median(r["encode_s"] for r in ok) if ok else 0.0
    fast = next((r for r in ok if r["key"] == "fastdecode"), None)
    bf16 = next((r for r in ok if r["key"] == "lora"), None) or next((r for r in ok if r["key"] == "compiled"), None)
    speed_goal = None
    if fast is not None:
        g = SPEED_GOALS
        ratio = fast["non_attention_ms_per_forward"] / bf16["non_attention_ms_per_forward"] if bf16 else None
        speed_goal = {
            "row": fast["name"],
            "e2e_s": fast["e2e_s"],
            "dit_s": fast["denoise_s"],
            "decode_s": fast["decode_s"],
            "non_attention_ratio_vs_bf16": ratio,
            "goals": g,
            "e2e_met": fast["e2e_s"] <= g["e2e_s"],
            "dit_met": fast["denoise_s"] <= g["dit_s"],
            "decode_met": fast["decode_s"] <= g["decode_s"],
            "non_attention_met": ratio is not None and ratio <= g["non_attention_ratio"],
        }
    estimates = estimate_50_step_cfg(ok, encode, decode_s or 0.0) if ok else []
    if fast is not None:
        # The published NABLA operating point (50 steps, CFG 5, 1280x720) on this stack, ESTIMATED
        # from the measured FP8 step and the measured bf16 decode: never run here.
        estimates.append(
            {
                "config": f"published operating point (50 steps, CFG as 2 passes, {s.width}x{s.height}): "
                "STA + compiled + "
                "FP8 + bf16 decode, ESTIMATED",
                "estimate_s": encode + 50 * 2 * fast["step_median_s"] + fast["decode_s"],
                "dit_s": 50 * 2 * fast["step_median_s"],
            }
        )
    return {
        "scenario": s.label,
        "decode_s": decode_s,
        "goal": goal,
        "speed_goal": speed_goal,
        "cfg50_estimates": estimates,
    }


def _backend_text(r: dict[str, Any]) -> str:
    """The kernels a row ran: full attention under "flex" is SDPA (cuDNN on a GPU)."""
    b = r.get("backend") or ""
    return "SDPA" if b == "flex" and r["attention"]["type"] == "full" else b


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    e = result.get("env") or {}
    lines = [
        f"### Speed levers: {s['scenario']} (random weights, one GPU)",
        "",
        f"Device {e.get('device_name', '?')}, torch {e.get('torch', '?')}, triton {e.get('triton', '?')}, "
        f"commit {e.get('commit', '?')}.",
        "",
        "| row | backend | DiT s | step s | attention ms/fwd | non-attention ms/fwd | encode s | decode s | end to end s | "
        "vs previous | vs dense | compile s | density | skipped blocks | PSNR / SSIM vs uncached bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "denoise_s" not in r:
            lines.append(f"| {r['name']} | {r.get('error') or r.get('skipped')} |" + " |" * 13)
            continue
        c = r["cache_record"]
        q = f"{fmt(r['psnr_db'], 4)} dB / {fmt(r['ssim'], 4)}" if "psnr_db" in r else ""
        vp = f"{r['speedup_vs_previous_dit']:.2f}x" if "speedup_vs_previous_dit" in r else ""
        dec = f"{r['decode_s']:.1f}" if r.get("decode_s") else f"({s['decode_s']:.1f})" if s["decode_s"] else ""
        if r.get("decode_s") and r.get("vae_tiling") is not None:
            dec += " tiled" if r["vae_tiling"] else " untiled"
        dens = f"{r['density']:.3f}" if r["density"] is not None else ""
        lines.append(
            f"| {r['name']} | {_backend_text(r)} | {r['denoise_s']:.2f} | {r['step_median_s']:.3f} | {r['attention_ms_per_forward']:.0f} | "
            f"{r['non_attention_ms_per_forward']:.0f} | {r['encode_s']:.2f} | {dec} | {r['e2e_s']:.1f} | {vp} | "
            f"{r['speedup_vs_dense_dit']:.2f}x | {r['compile_s']:.1f} | {dens} | "
            f"{c['skipped']}/{c['block_calls']} | {q} |"
        )
    q = result.get("quality") or {}
    if q:
        lines += [
            "",
            "Quality (random weights; relative L2 against the reference row, PSNR/SSIM of the decoded "
            "videos; step 0 has the same input in both runs):",
            "",
            "| candidate vs reference | transformer output rel. L2 per step | final latents rel. L2 | PSNR dB | SSIM |",
            "|---|---|---|---|---|",
        ]
        for v in q.values():
            steps = ", ".join(f"{x:.2e}" for x in v["noise_rel_l2_per_step"])
            lines.append(
                f"| {v['candidate']} vs {v['reference']} | {steps} | {v['final_latents_rel_l2']:.2e} | "
                f"{fmt(v.get('psnr_db'), 4)} | {fmt(v.get('ssim'), 4)} |"
            )
    sg = s.get("speed_goal")
    if sg:
        ratio = sg["non_attention_ratio_vs_bf16"]
        lines += [
            "",
            f"Goals ({sg['row']}): end to end {sg['e2e_s']:.1f} s (<= 12 s: {'met' if sg['e2e_met'] else 'NOT met'}), "
            f"DiT {sg['dit_s']:.1f} s (<= 9 s: {'met' if sg['dit_met'] else 'NOT met'}), decode "
            f"{sg['decode_s']:.1f} s (<= 3 s: {'met' if sg['decode_met'] else 'NOT met'}), non-attention per "
            f"forward {'n/a' if ratio is None else f'{ratio:.2f}x'} of bf16 (<= 0.6x: "
            f"{'met' if sg['non_attention_met'] else 'NOT met'}).",
        ]
    g = s.get("goal")
    if g:
        lines += [
            "",
            f"Goal ({g['row']}): end to end {g['e2e_s']:.1f} s (goal <= 30 s: {'met' if g['e2e_met'] else 'NOT met'}), "
            f"DiT {g['dit_s']:.1f} s (goal <= 16 s: {'met' if g['dit_met'] else 'NOT met'}).",
        ]
    if s["cfg50_estimates"]:
        lines += [
            "",
            "50-step CFG run, ESTIMATED (50 x 2 x measured batch-1 step + measured encode and decode; not run):",
            "",
            "| config | DiT s | end to end s |",
            "|---|---|---|",
        ]
        lines += [f"| {e['config']} | {e['dit_s']:.0f} | {e['estimate_s']:.0f} |" for e in s["cfg50_estimates"]]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    from wan_nabla.pipeline import resolve_device

    device = resolve_device(args.device)
    s = QUICK if args.quick else FULL
    s = LeverScenario(s.size, s.width, s.height, s.frames, args.steps or s.steps, s.sta_window)
    emulate = device.type == "cpu" and any(k in args.rows for k in ("fp8", "fastdecode"))
    # bf16 on the GPU; fp32 on the CPU, except a dry run with FP8 rows (FP8 GEMMs take bf16)
    dtype = torch.bfloat16 if device.type == "cuda" or emulate else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "env": environment(None, device),
        "scenario": s.label,
        "random_weights": True,
        "rows": [],
        "summary": {},
    }
    result["env"]["command"] = "python -m benchmarks.harness.levers " + " ".join(args.argv)

    def save() -> None:
        (args.out / "levers.json").write_text(json.dumps(result, indent=1, default=str))

    if emulate:  # a CPU dry run of the GPU job: the real torchao path, its numbers meaningless
        result["fp8_emulated_on_cpu"] = True
    with allow_fp8_on_cpu() if emulate else contextlib.nullcontext():
        _run_rows(args, s, device, dtype, result, start, save, log)
    (args.out / "levers.md").write_text(markdown(result))
    return result


@contextlib.contextmanager
def allow_fp8_on_cpu():
    """Let torchao's float8 layers run on the CPU (dry runs and tests only): torchao asserts an
    sm89+ GPU before converting, though its float8 tensors compute on the CPU too."""
    from unittest import mock

    import torchao.quantization.quant_api as qa

    from wan_nabla import quantize

    with (
        mock.patch.object(qa, "_check_hardware_support", lambda *a, **k: None),
        mock.patch.object(quantize, "fp8_unsupported", lambda *a, **k: None),
    ):
        yield


def _run_rows(args, s, device, dtype, result, start, save, log) -> None:

    t0 = time.perf_counter()
    pipe = random_pipeline(s.size, device, dtype)
    sync(device)
    result["build_s"] = time.perf_counter() - t0
    log(f"[levers] {s.label}: random pipeline built in {result['build_s']:.1f} s")
    with tempfile.TemporaryDirectory(prefix="wan-nabla-lora-") as tmp:
        lora_path = Path(tmp) / "synthetic_lightx2v_like.safetensors"
        result["lora_file"] = write_synthetic_lora(lora_path, WAN_SIZES[s.size], rank=4 if args.quick else LORA_RANK)
        reference = None
        kept: dict[str, tuple[dict[str, Any], Any]] = {}  # captured rows and their frames, by key
        for row in plan_rows(s, str(lora_path), args.cache, args.attention_backend):
            if row.key not in args.rows:
                continue
            if row.optional:
                # Its cost: about the compiled row's (one more block compile and the same steps).
                like = next((r for r in result["rows"] if r.get("compile") == "blocks" and "denoise_s" in r), None)
                cost = like["compile_s"] + like["warmup_forward_s"] + like["denoise_s"] if like else 0.0
                if time.perf_counter() - start + cost > args.deadline_s:
                    result["rows"].append(
                        {
                            "key": row.key,
                            "name": row.name,
                            "skipped": f"would end past --deadline-s {args.deadline_s:.0f} (estimated {cost:.0f} s)",
                        }
                    )
                    continue
            try:
                rec, frames = run_row(pipe, s, row, device, dtype)
                if "_capture" in rec:
                    kept[row.key] = (rec, frames)
                    for ref_key, cand_key, name in QUALITY_PAIRS:
                        if cand_key == row.key and ref_key in kept:
                            ref_rec, ref_frames = kept[ref_key]
                            result.setdefault("quality", {})[name] = quality(ref_rec, rec, ref_frames, frames, device)
                    rec = {k: v for k, v in rec.items() if k != "_capture"}
                if frames is not None and row.cache == "none" and row.quantize == "none":
                    reference = frames
                elif frames is not None and reference is not None:
                    rec["psnr_db"], rec["ssim"] = frame_quality(reference, frames, device)
                result["rows"].append(rec)
                log(
                    f"  {row.name}: DiT {rec['denoise_s']:.2f} s (step {rec['step_median_s']:.3f} s, attention "
                    f"{rec['attention_ms_per_forward']:.0f} ms/fwd), compile {rec['compile_s']:.1f} s, "
                    f"skipped {rec['cache_record']['skipped']}/{rec['cache_record']['block_calls']}"
                )
            except Exception as e:  # noqa: BLE001 - one row's failure must not lose the others
                result["rows"].append(
                    {
                        "key": row.key,
                        "name": row.name,
                        "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                        "traceback": traceback.format_exc(),
                    }
                )
                log(f"  {row.name}: FAILED {type(e).__name__}: {e}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result["summary"] = summarize(s, result["rows"])
            result["elapsed_s"] = time.perf_counter() - start
            save()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.harness.levers", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for levers.json and levers.md")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes (CPU-sized)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per row (default 4)")
    p.add_argument("--cache", default="first-block:0.1", help="the cache row's --cache value (default first-block:0.1)")
    p.add_argument(
        "--attention-backend",
        choices=("auto", "flex", "fa4"),
        default="auto",
        help="backend of the sparse rows (default auto: fa4 where installed and supported); "
        "the dense row is always cuDNN SDPA",
    )
    p.add_argument(
        "--deadline-s",
        type=float,
        default=500.0,
        help="skip the optional variant row when it would end later than this (default 500 s)",
    )
    p.add_argument(
        "--rows",
        nargs="+",
        choices=ROW_KEYS,
        default=list(ROW_KEYS),
        help="rows to run (default: all; later rows keep the levers of the rows they follow)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    result = run(args)
    print(markdown(result), end="")
    return 0 if all("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
