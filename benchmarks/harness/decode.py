"""The Wan VAE decode on one GPU: dtype, tiling and kernel options, time, peak memory, PSNR vs fp32.

    python -m benchmarks.harness.decode --out OUT_DIR                   # 1280x720x81 (+ 832x480x81 for the fit)
    python -m benchmarks.harness.decode --quick --device cpu --out /tmp/d   # tiny VAE, tiny sizes (dry run)

One random-weight Wan VAE (diffusers AutoencoderKLWan, default config; the tiny test VAE with
--quick) decodes the same random latents in every variant:
    fp32 untiled (the reference) | fp32 tiled | bf16 untiled | bf16 tiled
    | bf16 + channels_last_3d | bf16 + cudnn.benchmark | bf16 + compiled decoder
Per variant: seconds (one warm-up decode of two latent frames first, so cuDNN's autotuning and
compiling stay out), the peak memory above what was allocated before the decode (GiB), and PSNR
/ SSIM of the frames against the fp32 untiled decode (compare.metrics.frame_metrics; SSIM by its
torch twin on the decode's device). The tiled variants decode tile by tile through distributed/decode.py
(decode_tile + assemble, what the split decode runs), so each tile's time is known: `split`
estimates the split decode over 2 and 4 ranks as the slowest rank's tiles plus the assembly
(one GPU measured; the gather is not included). `need` fits the untiled decode's peak per
million pixel-frames per dtype from the two video sizes (offload.VAE_DECODE_GIB_PER_MPIXEL_FRAME_BY_DTYPE).
A variant that fails (e.g. the compile) is recorded with its error; the others still run; a
variant that would end past --deadline-s is skipped (the compiled one when less than
COMPILE_ROOM_S is left).
Outputs: decode.json, decode.md. Limits: random weights and latents (time and memory do not depend
on values; PSNR between dtypes does, a little); one decode per variant.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .records import environment, sync

FULL_SIZES = ((1280, 720, 81), (832, 480, 81))
QUICK_SIZES = ((64, 48, 5), (48, 32, 5))
COMPILE_ROOM_S = 120.0
VARIANTS = ("fp32", "fp32-tiled", "bf16", "bf16-tiled", "bf16-channels-last", "bf16-cudnn-benchmark", "bf16-compiled")


def build_vae(quick: bool, device: torch.device):
    """The random Wan VAE (default config) or, quick, the tiny one; fp32, eval, on `device`."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    if quick:
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        vae.enable_tiling(
            tile_sample_min_height=32,
            tile_sample_min_width=32,
            tile_sample_stride_height=24,
            tile_sample_stride_width=24,
        )
    else:
        vae = AutoencoderKLWan()
    return vae.to(device=device, dtype=torch.float32).eval()


def prepare(vae, variant: str):
    """A copy of `vae` set up for `variant` (the fp32 original stays untouched)."""
    v = copy.deepcopy(vae)
    if variant.startswith("bf16"):
        v.to(torch.bfloat16)
    if variant.endswith("channels-last"):  # the 5-D convolution weights only (norms and biases have no such layout)
        for m in v.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
    if variant.endswith("compiled"):
        v.decoder = torch.compile(v.decoder)
    return v


def _frames(video: torch.Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] -> [T, H, W, 3] float32 in [0, 1] (what the video processor gives)."""
    return ((video[0].float().permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).cpu().numpy()


@torch.no_grad()
def decode_once(vae, z: torch.Tensor, tiled: bool, device: torch.device) -> dict[str, Any]:
    """One decode: seconds, extra peak GiB, the video, and per-tile seconds when tiled."""
    from wan_nabla.distributed.decode import assemble, decode_tile, tile_origins

    z = z.to(device=device, dtype=vae.dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    tiles_s: list[float] = []
    t0 = time.perf_counter()
    if tiled:
        tiles = []
        for i, j in tile_origins(vae, z.shape[3], z.shape[4]):
            ts = time.perf_counter()
            tiles.append(decode_tile(vae, z, i, j))
            sync(device)
            tiles_s.append(time.perf_counter() - ts)
        ta = time.perf_counter()
        video = assemble(vae, tiles, z.shape[3], z.shape[4])
        sync(device)
        assemble_s = time.perf_counter() - ta
    else:
        vae.disable_tiling()
        video = vae.decode(z, return_dict=False)[0]
        assemble_s = None
    sync(device)
    out = {"seconds": time.perf_counter() - t0, "video": video}
    if device.type == "cuda":
        out["extra_peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    if tiled:
        out.update(tile_s=tiles_s, assemble_s=assemble_s)
    return out


def split_estimate(tile_s: list[float], assemble_s: float, ranks: int) -> float:
    """Slowest rank's tiles (round-robin, as split_tiled_decode assigns them) plus the assembly."""
    return max(sum(tile_s[r::ranks]) for r in range(ranks)) + assemble_s


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    from wan_nabla.compare.metrics import frame_metrics
    from wan_nabla.pipeline import resolve_device

    device = resolve_device(args.device)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "env": environment(None, device),
        "random_weights": True,
        "rows": [],
        "need": {},
        "skipped": [],
    }
    result["env"]["command"] = "python -m benchmarks.harness.decode " + " ".join(args.argv)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    vae = build_vae(args.quick, device)
    g = torch.Generator().manual_seed(0)
    latents = {(w, h, f): torch.randn(1, 16, (f - 1) // 4 + 1, h // 8, w // 8, generator=g) for w, h, f in sizes}

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - start
        (args.out / "decode.json").write_text(json.dumps(result, indent=1, default=str))

    main_size = sizes[0]
    reference = None
    # the memory fit (second size) before the compiled decoder, whose first call may take minutes
    plan = (
        [(v, main_size) for v in args.variants if not v.endswith("compiled")]
        + [(v, sizes[1]) for v in ("fp32", "bf16") if args.fit]
        + [(v, main_size) for v in args.variants if v.endswith("compiled")]
    )
    last_s = 0.0
    for variant, size in plan:
        label = f"{variant} {size[0]}x{size[1]}x{size[2]}"
        # a compile's first call is not known in advance: it needs COMPILE_ROOM_S left
        need = COMPILE_ROOM_S if variant.endswith("compiled") else 2 * last_s
        if time.perf_counter() - start + need > args.deadline_s:
            result["skipped"].append(label)
            log(f"[decode] skipped (deadline): {label}")
            continue
        row: dict[str, Any] = {"variant": variant, "size": list(size)}
        try:
            if variant.endswith("cudnn-benchmark"):
                torch.backends.cudnn.benchmark = True
            v = prepare(vae, variant)
            tiled = variant.endswith("tiled")
            tw = time.perf_counter()
            decode_once(v, latents[size][:, :, :2], tiled, device)  # warm-up: autotune / compile
            row["warmup_s"] = time.perf_counter() - tw
            d = decode_once(v, latents[size], tiled, device)
            row.update({k: d[k] for k in ("seconds", "extra_peak_gib", "tile_s", "assemble_s") if k in d})
            last_s = row["seconds"] + row["warmup_s"]
            if "tile_s" in d:
                row["tiles"] = len(d["tile_s"])
                row["split_estimate_s"] = {n: split_estimate(d["tile_s"], d["assemble_s"], n) for n in (2, 4)}
            if size == main_size:
                frames = _frames(d["video"])
                if variant == "fp32":
                    reference = frames
                elif reference is not None:
                    overall = frame_metrics(reference, frames, ssim_device=device)["overall"]
                    row["psnr_db"], row["ssim"] = overall["psnr_db"], overall["ssim_mean"]
            del d, v
        except Exception as e:  # noqa: BLE001 - one variant's failure must not lose the others
            row.update(
                error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                traceback=traceback.format_exc(),
            )
        finally:
            torch.backends.cudnn.benchmark = False
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["rows"].append(row)
        log(
            f"[decode] {label}: "
            + (
                row.get("error")
                or f"{row['seconds']:.2f} s, peak +{row.get('extra_peak_gib') or 0:.2f} GiB"
                + (f", PSNR {row['psnr_db']}" if "psnr_db" in row else "")
            )
        )
        save()
    result["need"] = fit_need(result["rows"])
    save()
    (args.out / "decode.md").write_text(markdown(result))
    return result


def fit_need(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Untiled decode peak per million pixel-frames, per dtype, at each size (GiB), and the largest:
    what offload's auto tiling rule assumes (proportional to the video's pixels)."""
    need: dict[str, Any] = {}
    for dtype in ("fp32", "bf16"):
        pts = [(r["size"], r["extra_peak_gib"]) for r in rows if r["variant"] == dtype and r.get("extra_peak_gib")]
        per = {f"{w}x{h}x{f}": gib / (w * h * f / 1e6) for (w, h, f), gib in pts}
        if per:
            need[dtype] = {"gib_per_mpixel_frame": per, "rule": max(per.values())}
    return need


def markdown(result: dict[str, Any]) -> str:
    e = result["env"]
    lines = [
        "### VAE decode variants (random weights, one device)",
        "",
        f"Device {e.get('device_name', '?')}, torch {e.get('torch', '?')}, commit {e.get('commit', '?')}.",
        "",
        "| variant | video | s | warm-up s | peak above resident GiB | PSNR dB vs fp32 untiled | SSIM | split over 2 / 4 ranks, est. s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        size = "x".join(map(str, r["size"]))
        if "error" in r:
            lines.append(f"| {r['variant']} | {size} | {r['error']} | | | | | |")
            continue
        sp = r.get("split_estimate_s")
        split = f"{sp[2]:.2f} / {sp[4]:.2f}" if sp else ""
        peak = f"{r['extra_peak_gib']:.2f}" if r.get("extra_peak_gib") is not None else ""
        ps = r.get("psnr_db", "")
        ps = f"{ps:.2f}" if isinstance(ps, float) else ps
        ss = f"{r['ssim']:.4f}" if "ssim" in r else ""
        lines.append(
            f"| {r['variant']} | {size} | {r['seconds']:.2f} | {r['warmup_s']:.1f} | {peak} | {ps} | {ss} | {split} |"
        )
    for dtype, n in result.get("need", {}).items():
        lines.append("")
        lines.append(
            f"Untiled {dtype} decode need: "
            + ", ".join(f"{k}: {v:.3f}" for k, v in n["gib_per_mpixel_frame"].items())
            + f" GiB per million pixel-frames (rule: {n['rule']:.3f})."
        )
    if result.get("skipped"):
        lines += ["", "Skipped (deadline): " + ", ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.harness.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for decode.json and decode.md")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="tiny VAE and sizes (CPU dry run)")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=None,
        help="variants, fp32 first: the reference (default: all; --quick: all but bf16-compiled, whose CPU "
        "compile takes minutes)",
    )
    p.add_argument("--no-fit", dest="fit", action="store_false", help="skip the second size (the memory fit)")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="skip variants that would end later (default 330 s; --quick: none)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.variants is None:
        args.variants = [v for v in VARIANTS if not (args.quick and v.endswith("compiled"))]
    if args.deadline_s is None:
        args.deadline_s = float("inf") if args.quick else 330.0
    result = run(args)
    print(markdown(result), end="")
    return 0 if all("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
