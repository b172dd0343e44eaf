"""One rank of the multi-process exactness tests (tests/distributed/test_multiprocess.py), through the library API.

    python -m torch.distributed.run --nproc-per-node 2 tests/support/dist_worker.py OUT_DIR SPEC_JSON

SPEC_JSON: {"heads": 4, "generation": {...}, "cases": [{"name": ..., "attention": {...},
"parallel": {...}, "speed": {...} (optional)}, ...]}. Every rank generates every case with VideoGenerator on the tiny model
(fp32, CPU, gloo) under the case's parallel layout; rank 0 writes OUT_DIR/latents.npz (final
latents per case) and OUT_DIR/results.json (attention summary, parallel layout, frames shape).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from wan_nabla.app import with_device
from wan_nabla.config import RunConfig
from wan_nabla.distributed.context import ParallelContext
from wan_nabla.model_source import ModelFacts
from wan_nabla.pipeline import VideoGenerator
from wan_nabla.preflight import check_parallel
from wan_nabla.tiny import build_tiny_pipeline


def main(out_dir: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    latents, results = {}, {}
    rank = 0
    for case in spec["cases"]:
        cfg = RunConfig.from_mapping(
            {
                "attention": case["attention"],
                "parallel": case["parallel"],
                "speed": case.get("speed", {}),
                "generation": {"dtype": "float32", "device": "cpu"},
            }
        )
        facts = ModelFacts("tiny", heads=spec["heads"])
        plan = with_device(check_parallel(cfg, "generate", facts), cfg.generation.device)
        ctx = ParallelContext.start(plan)  # new groups per case in one process group
        rank = ctx.rank
        gen = VideoGenerator(build_tiny_pipeline(seed=0, heads=spec["heads"]), cfg, plan.device, "tiny", parallel=ctx)
        res = gen.generate("a fox in the snow", progress=False, **spec["generation"])
        gen.close()
        latents[case["name"]] = res.latents.numpy()
        results[case["name"]] = {
            "attention": res.attention,
            "parallel": res.parallel,
            "speed": res.speed,
            "frames": None if res.frames is None else list(res.frames.shape),
        }
    if rank == 0:
        np.savez(Path(out_dir) / "latents.npz", **latents)
        (Path(out_dir) / "results.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1], sys.argv[2])
