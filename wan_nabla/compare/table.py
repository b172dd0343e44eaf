"""Every sparse preset against full attention on one loaded model: attention error and kept mass.

    python -m wan_nabla.compare.table --out OUT                      # GPU: 1.3B 832x480x81, 3 steps
    python -m wan_nabla.compare.table --out OUT --quick --device cpu # tiny model 144x208x9 (CI)
    scripts/gpu_compare.sh OUT                                       # the GPU run, log kept

One random-weight pipeline (bench/random_init.py: Wan2.1-1.3B transformer and UMT5-XXL in bf16,
Wan VAE in fp32; `--quick`: the tiny model, bf16 as the CLI runs it) is built once. The full-attention reference
is generated once (run.capture, guided noise kept per step); then every sparse bundled preset is
generated from the same prompt, seed and initial noise with the probe (probe.py) on, exact
attention included, at the sampled steps (default all) and layers (first, middle, last). The
presets' `dense_steps` are dropped (sta_11_3_3 would otherwise run only dense steps in a few
steps), so every step measures the sparse masks. Decoding is kept (3.6 s per video on H100 for
1.3B): PSNR is measured on decoded frames, SSIM only where scikit-image is installed; no MP4 is
written, so neither ffmpeg nor imageio-ffmpeg is needed.

Writes OUT/compare_table.json (environment, settings, one row per preset with its whole
attention_error record), OUT/compare_table.md, and with matplotlib OUT/compare_table.png and one
mask picture; prints the table last. **Random weights say nothing about visual quality**: their
attention maps are flat, so these rows show what the masks drop from such maps and that the tool
works at real size; users judge a config with their own weights through `wan-nabla compare`.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..bench.configs import preset_configs
from ..bench.random_init import random_pipeline
from ..bench.records import environment, sync
from ..config import AttentionConfig, GenerationConfig, RunConfig
from ..output.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..pipeline import resolve_device
from .metrics import frame_metrics, json_number, missing_extras, rel_l2
from .probe import Sampling, spread
from .report import attention_record, fmt
from .run import capture

PROMPT = "a red fox running through fresh snow at dawn"
FULL = dict(model="1.3B", size=(832, 480), frames=81, steps=3)
QUICK = dict(model="tiny", size=(144, 208), frames=9, steps=2)  # padded 3x9x13 patch grid
NOTE = ("Random weights: these rows say nothing about visual quality. Random-weight attention maps are "
        "flat, so NABLA keeps more and drops differently than on trained weights. They measure what the "
        "masks drop on such maps (exact attention on the same q/k/v) and show the tool at real size.")


def build_rows(pipe, device: torch.device, configs: list[tuple[str, AttentionConfig]], settings: dict,
               sampling: Sampling, max_query_rows: int, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The reference run, then one row per config (see module doc)."""
    gen = GenerationConfig(size=settings["size"], frames=settings["frames"], steps=settings["steps"],
                           device=str(device), dtype=settings["dtype"])
    model_id = f"random-{settings['model']}"
    with_ssim = not missing_extras(("skimage",))
    t0 = time.perf_counter()
    ref = capture(pipe, RunConfig(attention=AttentionConfig(), generation=gen), device, model_id, PROMPT,
                  keep_noise=True)
    log(f"[compare] reference (full): {time.perf_counter() - t0:.1f} s, steady step {ref.steady_step_s():.3f} s")
    rows = []
    for name, att in configs:
        t0 = time.perf_counter()
        cand = capture(pipe, RunConfig(attention=att, generation=gen), device, model_id, PROMPT, reference=ref,
                       probe=(sampling, True), max_query_rows=max_query_rows)
        frames = frame_metrics(ref.result.frames, cand.result.frames, with_ssim=with_ssim)
        attention = attention_record(cand)
        sm = attention["summary"]
        row = {
            "preset": name, "label": cand.label, "attention": att.to_dict(), "threshold": att.threshold,
            "density": cand.result.attention["overall"],
            "tile_density_sampled": _mean([c["tile_density"] for c in attention["calls"]]),
            "rel_l2_mean": sm["rel_l2_mean"], "rel_l2_max": sm["rel_l2_max"],
            "dense_kernel_rel_l2_mean": sm["dense_kernel_rel_l2_mean"],
            "kept_mass_mean": sm["kept_mass_mean"], "kept_mass_min": sm["kept_mass_min"],
            "coarse_mass_min": sm["coarse_mass_min"],
            "output_rel_l2_per_step": [json_number(x) for x in cand.step_rel_l2],
            "final_latents_rel_l2": json_number(rel_l2(cand.final_latents, ref.final_latents)),
            "psnr_db": frames["overall"]["psnr_db"], "ssim_mean": frames["overall"]["ssim_mean"],
            "steady_step_s": cand.steady_step_s(), "reference_steady_step_s": ref.steady_step_s(),
            "speedup": ref.steady_step_s() / cand.steady_step_s(),
            "first_step_s": cand.result.timings["per_step_s"][0],
            "probe_s": sum(cand.probe_s), "wall_s": time.perf_counter() - t0,
            "attention_error": attention,
        }
        rows.append(row)
        row["_records"] = cand.probe.records  # for the mask picture; dropped before writing JSON
        log(f"  {name}: density {row['density']:.3f}, attention rel. L2 {row['rel_l2_mean']:.4f} "
            f"(floor {row['dense_kernel_rel_l2_mean']:.4f}), kept mass mean {row['kept_mass_mean']:.3f} "
            f"min {row['kept_mass_min']:.3f}, coarse min {fmt(row['coarse_mass_min'], 3)}, "
            f"{row['speedup']:.2f}x, {row['wall_s']:.1f} s")
        del cand
        gc.collect()
    return rows


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


TABLE_HEAD = ("| preset | kept blocks | attention rel. L2 mean / max | dense-kernel floor | kept mass mean | "
              "kept mass min | coarse mass min (threshold) | output rel. L2 last step | PSNR dB | step s | speed-up |")


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    env = result["env"]
    lines = [f"# Attention error per preset: Wan2.1-{s['model']} {s['size'][0]}x{s['size'][1]}x{s['frames']}, "
             f"{s['steps']} steps, random weights", "",
             f"**{NOTE}**", "",
             f"Device {env.get('device_name')}, torch {env.get('torch')}, triton {env.get('triton')}, commit "
             f"{env.get('commit')}. Reference: full attention (dense SDPA), same prompt, seed and noise. "
             f"Exact attention in {result['compute_dtype']} on {result['query_rows']} query rows per sampled call; "
             f"sampled steps {s['sampled_steps']}, layers {s['sampled_layers']}; presets' dense_steps dropped.", "",
             TABLE_HEAD, "|" + "---|" * 11]
    for r in result["rows"]:
        th = f" ({r['threshold']:g})" if r["threshold"] else ""
        last = r["output_rel_l2_per_step"][-1] if r["output_rel_l2_per_step"] else None
        lines.append(
            f"| {r['preset']} | {fmt(r['density'], 3)} | {fmt(r['rel_l2_mean'], 3)} / {fmt(r['rel_l2_max'], 3)} | "
            f"{fmt(r['dense_kernel_rel_l2_mean'], 2)} | {fmt(r['kept_mass_mean'], 3)} | {fmt(r['kept_mass_min'], 3)} | "
            f"{fmt(r['coarse_mass_min'], 3)}{th} | {fmt(last, 3)} | {fmt(r['psnr_db'], 3)} | "
            f"{fmt(r['steady_step_s'], 3)} | {fmt(r['speedup'], 3)}x |")
    lines += ["", "Kept mass: share of the exact attention probability of a query row inside the blocks the "
              "kernel computed (min: the worst row of any head). Coarse mass: the same on NABLA's pooled map, "
              ">= threshold by construction for NABLA presets. Step s: median steady denoising step (probe time "
              "excluded); speed-up against the full reference in the same run.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wan_nabla.compare.table", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny model at 144x208x9, 2 steps (CPU test)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, help="denoising steps (default 3; quick 2)")
    p.add_argument("--presets", nargs="*", help="bundled sparse presets to run (default: all)")
    p.add_argument("--max-query-rows", type=int, default=4096)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    settings = dict(QUICK if args.quick else FULL)
    if args.steps:
        settings["steps"] = args.steps
    # bf16 on the CPU too in quick mode: the CLI's tiny default, so a test process compiles once.
    settings["dtype"] = "bfloat16" if device.type == "cuda" or args.quick else "float32"
    configs = [(n, a) for n, a in preset_configs() if not args.presets or n in args.presets]
    unknown = set(args.presets or ()) - {n for n, _ in configs}
    if unknown:
        print(f"error: --presets: {sorted(unknown)} are not sparse bundled presets", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(argv, device)
    env["command"] = "python -m wan_nabla.compare.table " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    pipe = random_pipeline(settings["model"], device, getattr(torch, settings["dtype"]))
    sync(device)
    print(f"[compare] random Wan2.1-{settings['model']} pipeline built in {time.perf_counter() - t0:.1f} s on {device}")
    tr = pipe.transformer
    sampling = Sampling(steps=tuple(range(settings["steps"])), layers=spread(len(tr.blocks)),
                        heads=spread(tr.config.num_attention_heads))
    settings.update(sampled_steps=list(sampling.steps), sampled_layers=list(sampling.layers))
    rows = build_rows(pipe, device, configs, settings, sampling, args.max_query_rows)
    first = rows[0]["attention_error"] if rows else {}
    result = {"env": env, "note": NOTE, "prompt": PROMPT, "settings": {**settings, "size": list(settings["size"])},
              "compute_dtype": first.get("compute_dtype"),
              "query_rows": (first.get("query_rows") or {}).get("sampled"),
              "rows": [{k: v for k, v in r.items() if k != "_records"} for r in rows]}
    atomic_write_json(out / "compare_table.json", result)
    text = markdown(result)
    atomic_write_text(out / "compare_table.md", text)
    if not missing_extras(("matplotlib",)) and rows:
        from .pictures import mask_picture, presets_picture

        title = f"Wan2.1-{settings['model']} random weights, {settings['size'][0]}x{settings['size'][1]}x{settings['frames']}"
        atomic_write_bytes(out / "compare_table.png", presets_picture(result["rows"], title))
        pick = next((r for r in rows if r["preset"] == "nabla_0.4"), rows[0])
        rec = pick["_records"][-1]
        atomic_write_bytes(out / f"compare_mask_{pick['preset']}.png", mask_picture(rec, f"{pick['label']} (random weights)"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
