"""GPU smoke and cross-device check of the app path (run on a CUDA machine; prints a table last).

    PYTHONPATH=. python3 benchmarks/jobs/gpu_smoke.py OUT_DIR

1. Cross-device exactness: the tiny transformer (fp32) with NABLA 0.5 / STA 3-1-1 / NABLA 0.3 +
   STA, on a padded grid (144x208 px, 9 frames) and batch 2, run on CUDA (Triton pooling and
   selection, CUDA flex with TMA) and on the CPU (torch reference masks, CPU flex), for block
   sizes (64, 64) and (128, 64): kept-block densities must agree and outputs must match to fp32
   tolerance (relative L2). Dense output is reported too, to show the masks matter.
2. Every bundled preset runs the whole generation loop on CUDA in bf16 on the tiny model
   (frames finite, density recorded); no MP4 is written (the GPU image lacks imageio-ffmpeg).
Writes OUT_DIR/gpu_smoke.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.harness.records import environment  # noqa: E402
from tests.support.reference import tiny_transformer  # noqa: E402
from wan_nabla import apply_attention, load_config  # noqa: E402
from wan_nabla.pipeline import VideoGenerator  # noqa: E402
from wan_nabla.tiny import build_tiny_pipeline  # noqa: E402


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def cross_device() -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 16, 3, 18, 26, generator=g)
    t = torch.tensor([700.0, 300.0])
    ehs = torch.randn(2, 7, 32, generator=g)
    cpu_tr = tiny_transformer(seed=0)
    gpu_tr = tiny_transformer(seed=0).cuda()
    with torch.no_grad():
        dense = cpu_tr(lat, t, ehs).sample
    for att in (
        {"type": "nabla", "threshold": 0.5},
        {"type": "sta", "sta_window": [3, 1, 1]},
        {"type": "nabla_sta", "threshold": 0.3, "sta_window": [1, 3, 1]},
    ):
        for bs in ([64, 64], [128, 64]):
            a = {**att, "block_size": bs}
            outs, dens = {}, {}
            for name, tr, dev in (("cpu", cpu_tr, "cpu"), ("cuda", gpu_tr, "cuda")):
                with apply_attention(tr, a) as h, torch.no_grad():
                    outs[name] = tr(lat.to(dev), t.to(dev), ehs.to(dev)).sample.cpu()
                    dens[name] = h.run.density_summary()["overall"]
            rows.append(
                {
                    "attention": a,
                    "density_cpu": dens["cpu"],
                    "density_cuda": dens["cuda"],
                    "rel_l2_cuda_vs_cpu": rel_l2(outs["cuda"], outs["cpu"]),
                    "rel_l2_sparse_vs_dense": rel_l2(outs["cpu"], dense),
                }
            )
    return rows


def presets() -> list[dict]:
    rows = []
    for cfg_path in sorted((ROOT / "wan_nabla" / "presets").glob("*.yaml")):
        cfg = load_config(cfg_path).override(dtype="bfloat16", device="cuda")
        gen = VideoGenerator(build_tiny_pipeline(seed=0).to("cuda", torch.bfloat16), cfg, torch.device("cuda"), "tiny")
        gen.pipe.vae.to(torch.float32)
        t0 = time.perf_counter()
        res = gen.generate("a red fox running through snow", progress=False, size=(208, 144), frames=9, steps=3)
        gen.close()
        rows.append(
            {
                "config": cfg_path.name,
                "seconds": time.perf_counter() - t0,
                "finite": bool(np.isfinite(res.frames).all()),
                "shape": list(res.frames.shape),
                "density_per_step": res.attention["per_step"],
            }
        )
    return rows


def main() -> int:
    torch.backends.cudnn.allow_tf32 = False  # exact fp32 convs and matmuls for the cross-device check
    torch.backends.cuda.matmul.allow_tf32 = False
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_smoke_out")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(sys.argv[1:], "cuda")
    result = {
        "env": env,
        "device": env["device_name"],
        "torch": env["torch"],
        "cross_device": cross_device(),
        "presets": presets(),
    }
    (out / "gpu_smoke.json").write_text(json.dumps(result, indent=2))
    ok = True
    print(f"device {result['device']}, torch {result['torch']}")
    print(f"{'attention':<45} {'dens cpu':>9} {'dens cuda':>9} {'cuda vs cpu':>12} {'vs dense':>9}")
    for r in result["cross_device"]:
        good = abs(r["density_cpu"] - r["density_cuda"]) < 1e-6 and r["rel_l2_cuda_vs_cpu"] < 1e-4
        ok &= good
        print(
            f"{json.dumps(r['attention']):<45} {r['density_cpu']:9.4f} {r['density_cuda']:9.4f} "
            f"{r['rel_l2_cuda_vs_cpu']:12.2e} {r['rel_l2_sparse_vs_dense']:9.3f} {'ok' if good else 'MISMATCH'}"
        )
    for r in result["presets"]:
        ok &= r["finite"] and r["shape"] == [9, 144, 208, 3]
        print(
            f"{r['config']:<30} {r['seconds']:6.1f}s finite={r['finite']} shape={r['shape']} "
            f"density/step={[round(d, 3) for d in r['density_per_step']]}"
        )
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
