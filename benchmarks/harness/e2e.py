"""End-to-end level: `VideoGenerator.generate` on a random-weight Wan2.1 at real size.

    out = run_e2e(E2EScenario("1.3B", 832, 480, 81, steps=4), torch.device("cuda"))

One pipeline (random_init.random_pipeline: UMT5-XXL bf16, transformer bf16, Wan VAE fp32, the tiny
byte tokenizer) is built once; for each attention config a VideoGenerator (pipeline.py, the app's
own loop: CFG as a batch of two, step index to the processors) generates two videos with
different prompts and seeds. Reported per config: the generator's timing breakdown (text
encoding, each denoising step, VAE decode), peak GPU memory, the first call's compile time
(first step minus the median later step, and the whole first generate), graphs TorchDynamo
compiled in the first call and in the second (target T5: none in the second), attention density.
Limits: few steps (per-step time is what matters); random weights produce noise frames.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wan_nabla.config import AttentionConfig, GenerationConfig, RunConfig

from .configs import preset_attention
from .random_init import random_pipeline
from .records import compiled_graphs, sync

PROMPTS = (
    ("a red fox running through fresh snow at dawn", 0),
    ("a timelapse of clouds rolling over green mountains", 1),
)


@dataclass(frozen=True)
class E2EScenario:
    size: str
    width: int
    height: int
    frames: int = 81
    steps: int = 4

    @property
    def label(self) -> str:
        return f"Wan2.1-{self.size} {self.width}x{self.height}x{self.frames}, {self.steps} steps"


FULL_SCENARIO = E2EScenario("1.3B", 832, 480, 81, steps=4)
QUICK_SCENARIO = E2EScenario("tiny", 128, 128, 9, steps=2)
DEFAULT_CONFIGS = ("full", "nabla_0.4", "nabla_0.6_sta_11_3_3")


def attention_configs(names) -> list[tuple[str, AttentionConfig]]:
    out = []
    for name in names:
        if name == "full":
            out.append((name, AttentionConfig()))
        else:
            out.append((name, preset_attention(name)))
    return out


@torch.no_grad()
def run_e2e(
    s: E2EScenario, device: torch.device, *, configs=DEFAULT_CONFIGS, log: Callable[[str], None] = print
) -> dict[str, Any]:
    from wan_nabla.pipeline import VideoGenerator

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    pipe = random_pipeline(s.size, device, dtype)
    sync(device)
    build_s = time.perf_counter() - t0
    log(f"[e2e] {s.label}: random pipeline built in {build_s:.1f} s")
    rows = []
    for name, att in attention_configs(configs):
        gen_cfg = GenerationConfig(
            size=(s.width, s.height),
            frames=s.frames,
            steps=s.steps,
            guidance_scale=5.0,
            device=str(device),
            dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
        )
        gen = VideoGenerator(pipe, RunConfig(attention=att, generation=gen_cfg), device, model_id=f"random-{s.size}")
        calls = []
        try:
            for _i, (prompt, seed) in enumerate(PROMPTS):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                g0 = compiled_graphs()
                t = time.perf_counter()
                res = gen.generate(prompt, negative_prompt="blurry, low quality", seed=seed, progress=False)
                wall = time.perf_counter() - t
                calls.append(
                    {
                        "prompt": prompt,
                        "seed": seed,
                        "wall_s": wall,
                        "timings": res.timings,
                        "attention": res.attention,
                        "graphs_compiled": compiled_graphs() - g0,
                        "finite_frames": bool(np.isfinite(res.frames).all()),
                        "frames_shape": list(res.frames.shape),
                    }
                )
        finally:
            gen.close()
        first, second = calls
        steady = statistics.median(second["timings"]["per_step_s"])
        row = {
            "scenario": s.label,
            "name": name,
            "config": att.to_dict(),
            "calls": calls,
            "compile_s": first["timings"]["per_step_s"][0] - steady,
            "first_generate_s": first["wall_s"],
            "second_generate_s": second["wall_s"],
            "recompiles_second_call": second["graphs_compiled"],
            "text_encoding_s": second["timings"]["text_encoding_s"],
            "per_step_s": steady,
            "decode_s": second["timings"]["decode_s"],
            "peak_gpu_memory_gb": second["timings"].get("peak_gpu_memory_gb"),
            "density": second["attention"].get("overall"),
        }
        rows.append(row)
        log(
            f"  {name}: step {steady:.2f} s, text {row['text_encoding_s']:.2f} s, decode {row['decode_s']:.2f} s, "
            f"compile {row['compile_s']:.1f} s, recompiles {row['recompiles_second_call']}, "
            f"density {row['density'] if row['density'] is None else round(row['density'], 3)}"
        )
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"scenario": s.label, "build_s": build_s, "rows": rows}
