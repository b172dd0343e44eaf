"""Every sparse preset against full attention on one loaded model: attention error and kept mass.

    python -m benchmarks.harness.compare_table --out OUT                      # GPU: 1.3B 832x480x81, 3 steps
    python -m benchmarks.harness.compare_table --out OUT --quick --device cpu # tiny model 144x208x9 (CI)
    benchmarks/jobs/gpu_compare.sh OUT                                       # the GPU run, log kept

One random-weight pipeline (benchmarks/harness/random_init.py: Wan2.1-1.3B transformer and UMT5-XXL in bf16,
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
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from wan_nabla.compare.metrics import frame_metrics, json_number, missing_extras, rel_l2
from wan_nabla.compare.options import spread
from wan_nabla.compare.probe import Sampling
from wan_nabla.compare.report import attention_record, fmt, mean_of
from wan_nabla.compare.run import capture
from wan_nabla.config import AttentionConfig, GenerationConfig, RunConfig
from wan_nabla.output.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from wan_nabla.pipeline import resolve_device

from .configs import preset_configs
from .random_init import random_pipeline
from .records import environment, sync

PROMPT = "a red fox running through fresh snow at dawn"
FULL = dict(model="1.3B", size=(832, 480), frames=81, steps=3)
QUICK = dict(model="tiny", size=(144, 208), frames=9, steps=2)  # padded 3x9x13 patch grid
NOTE = (
    "Random weights: these rows say nothing about visual quality. Random-weight attention maps are "
    "flat, so NABLA keeps more and drops differently than on trained weights. They measure what the "
    "masks drop on such maps (exact attention on the same q/k/v) and show the tool at real size."
)


def iter_rows(
    pipe,
    device: torch.device,
    configs: list[tuple[str, AttentionConfig]],
    settings: dict,
    sampling: Sampling,
    max_query_rows: int,
    budget_s: float = math.inf,
    log: Callable[[str], None] = print,
) -> Iterator[dict[str, Any]]:
    """The reference run, then one row per config (see module doc). A config that fails gives a
    row with its error and the next one runs; once `budget_s` has passed, the rest are skipped."""
    gen = GenerationConfig(
        size=settings["size"],
        frames=settings["frames"],
        steps=settings["steps"],
        device=str(device),
        dtype=settings["dtype"],
    )
    model_id = f"random-{settings['model']}"
    with_ssim = not missing_extras(("skimage",))
    start = t0 = time.perf_counter()
    ref = capture(
        pipe, RunConfig(attention=AttentionConfig(), generation=gen), device, model_id, PROMPT, keep_noise=True
    )
    log(f"[compare] reference (full): {time.perf_counter() - t0:.1f} s, steady step {ref.steady_step_s():.3f} s")
    for name, att in configs:
        if time.perf_counter() - start > budget_s:
            log(f"  {name}: skipped (time budget of {budget_s:.0f} s spent)")
            yield {"preset": name, "label": att.label(), "error": "skipped: time budget spent"}
            continue
        t0 = time.perf_counter()
        try:
            yield _row(name, att, ref, pipe, device, model_id, gen, sampling, max_query_rows, with_ssim, t0, log)
        except Exception as e:  # noqa: BLE001 - one failing preset must not lose the others' rows
            log(f"  {name}: FAILED {type(e).__name__}: {e}")
            yield {"preset": name, "label": att.label(), "error": f"{type(e).__name__}: {str(e)[:500]}"}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _row(name, att, ref, pipe, device, model_id, gen, sampling, max_query_rows, with_ssim, t0, log) -> dict:
    cand = capture(
        pipe,
        RunConfig(attention=att, generation=gen),
        device,
        model_id,
        PROMPT,
        reference=ref,
        probe=(sampling, True),
        max_query_rows=max_query_rows,
    )
    frames = frame_metrics(ref.result.frames, cand.result.frames, with_ssim=with_ssim)
    attention = attention_record(cand)
    sm = attention["summary"]
    row = {
        "preset": name,
        "label": cand.label,
        "attention": att.to_dict(),
        "threshold": att.threshold,
        "density": cand.result.attention["overall"],
        "tile_density_sampled": mean_of([c["tile_density"] for c in attention["calls"]]),
        "rel_l2_mean": sm["rel_l2_mean"],
        "rel_l2_max": sm["rel_l2_max"],
        "dense_kernel_rel_l2_mean": sm["dense_kernel_rel_l2_mean"],
        "kept_mass_mean": sm["kept_mass_mean"],
        "kept_mass_min": sm["kept_mass_min"],
        "coarse_mass_min": sm["coarse_mass_min"],
        "output_rel_l2_per_step": [json_number(x) for x in cand.step_rel_l2],
        "final_latents_rel_l2": json_number(rel_l2(cand.final_latents, ref.final_latents)),
        "psnr_db": frames["overall"]["psnr_db"],
        "ssim_mean": frames["overall"]["ssim_mean"],
        "steady_step_s": cand.steady_step_s(),
        "reference_steady_step_s": ref.steady_step_s(),
        "speedup": ref.steady_step_s() / cand.steady_step_s(),
        "first_step_s": cand.result.timings["per_step_s"][0],
        "probe_s": sum(cand.probe_s),
        "wall_s": time.perf_counter() - t0,
        "attention_error": attention,
        "_records": cand.probe.records,  # for the mask picture; not written to JSON
    }
    log(
        f"  {name}: density {row['density']:.3f}, attention rel. L2 {row['rel_l2_mean']:.4f} "
        f"(floor {row['dense_kernel_rel_l2_mean']:.4f}), kept mass mean {row['kept_mass_mean']:.3f} "
        f"min {row['kept_mass_min']:.3f}, coarse min {fmt(row['coarse_mass_min'], 3)}, "
        f"{row['speedup']:.2f}x, {row['wall_s']:.1f} s"
    )
    return row


TABLE_HEAD = (
    "| preset | kept blocks | attention rel. L2 mean / max | dense-kernel floor | kept mass mean | "
    "kept mass min | coarse mass min (threshold) | output rel. L2 last step | PSNR dB | step s | speed-up |"
)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    env = result["env"]
    lines = [
        f"# Attention error per preset: Wan2.1-{s['model']} {s['size'][0]}x{s['size'][1]}x{s['frames']}, "
        f"{s['steps']} steps, random weights",
        "",
        f"**{NOTE}**",
        "",
        f"Device {env.get('device_name')}, torch {env.get('torch')}, triton {env.get('triton')}, commit "
        f"{env.get('commit')}. Reference: full attention (dense SDPA), same prompt, seed and noise. "
        f"Exact attention in {result['compute_dtype']} on {result['query_rows']} query rows per sampled call; "
        f"sampled steps {s['sampled_steps']}, layers {s['sampled_layers']}; presets' dense_steps dropped.",
        "",
        TABLE_HEAD,
        "|" + "---|" * 11,
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['error']} |" + " |" * 9)
            continue
        th = f" ({r['threshold']:g})" if r["threshold"] else ""
        last = r["output_rel_l2_per_step"][-1] if r["output_rel_l2_per_step"] else None
        lines.append(
            f"| {r['preset']} | {fmt(r['density'], 3)} | {fmt(r['rel_l2_mean'], 3)} / {fmt(r['rel_l2_max'], 3)} | "
            f"{fmt(r['dense_kernel_rel_l2_mean'], 2)} | {fmt(r['kept_mass_mean'], 3)} | {fmt(r['kept_mass_min'], 3)} | "
            f"{fmt(r['coarse_mass_min'], 3)}{th} | {fmt(last, 3)} | {fmt(r['psnr_db'], 3)} | "
            f"{fmt(r['steady_step_s'], 3)} | {fmt(r['speedup'], 3)}x |"
        )
    lines += [
        "",
        "Kept mass: share of the exact attention probability of a query row inside the blocks the "
        "kernel computed (min: the worst row of any head). Coarse mass: the same on NABLA's pooled map, "
        ">= threshold by construction for NABLA presets. Step s: median steady denoising step (probe time "
        "excluded; the probe's syncs still slow sampled steps a little, so it is indicative only: "
        "`python -m benchmarks.harness` measures speed); speed-up against the full reference in the same run.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.harness.compare_table", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny model at 144x208x9, 2 steps (CPU test)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, help="denoising steps (default 3; quick 2)")
    p.add_argument("--presets", nargs="*", help="bundled sparse presets to run (default: all)")
    p.add_argument("--max-query-rows", type=int, default=4096)
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="skip the presets left once this many seconds have passed since the reference started",
    )
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
    env["command"] = "python -m benchmarks.harness.compare_table " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    pipe = random_pipeline(settings["model"], device, getattr(torch, settings["dtype"]))
    sync(device)
    print(f"[compare] random Wan2.1-{settings['model']} pipeline built in {time.perf_counter() - t0:.1f} s on {device}")
    tr = pipe.transformer
    sampling = Sampling(
        steps=tuple(range(settings["steps"])),
        layers=spread(len(tr.blocks)),
        heads=spread(tr.config.num_attention_heads),
    )
    settings.update(sampled_steps=list(sampling.steps), sampled_layers=list(sampling.layers))
    rows: list[dict[str, Any]] = []
    result = _write_results(out, env, settings, rows)
    for row in iter_rows(pipe, device, configs, settings, sampling, args.max_query_rows, args.budget_s):
        rows.append(row)
        result = _write_results(out, env, settings, rows)  # after every preset: a kill keeps the rows so far
    text = markdown(result)
    ok = [r for r in rows if "error" not in r]
    if not missing_extras(("matplotlib",)) and ok:
        from wan_nabla.compare.pictures import mask_picture, presets_picture

        title = (
            f"Wan2.1-{settings['model']} random weights, "
            f"{settings['size'][0]}x{settings['size'][1]}x{settings['frames']}"
        )
        atomic_write_bytes(out / "compare_table.png", presets_picture(ok, title))
        pick = next((r for r in ok if r["preset"] == "nabla_0.4"), ok[0])
        atomic_write_bytes(
            out / f"compare_mask_{pick['preset']}.png",
            mask_picture(pick["_records"][-1], f"{pick['label']} (random weights)"),
        )
    print(text)
    return 1 if len(ok) < len(rows) else 0


def _write_results(out: Path, env: dict, settings: dict, rows: list[dict[str, Any]]) -> dict[str, Any]:
    first = next((r["attention_error"] for r in rows if "attention_error" in r), {})
    result = {
        "env": env,
        "note": NOTE,
        "prompt": PROMPT,
        "settings": {**settings, "size": list(settings["size"])},
        "compute_dtype": first.get("compute_dtype"),
        "query_rows": (first.get("query_rows") or {}).get("sampled"),
        "rows": [{k: v for k, v in r.items() if k != "_records"} for r in rows],
    }
    atomic_write_json(out / "compare_table.json", result)
    atomic_write_text(out / "compare_table.md", markdown(result))
    return result


if __name__ == "__main__":
    sys.exit(main())
