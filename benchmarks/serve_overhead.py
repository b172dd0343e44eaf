"""Server overhead per job: `wan-nabla serve` vs generating the same videos in one process.

    python benchmarks/serve_overhead.py --jobs 30 [--out results.json]

Both sides run the tiny model on the CPU with the same settings (32x32, 1 frame, 1 step, no CFG,
float32, OMP_NUM_THREADS=1) and write the same MP4 + sidecar (output.publish.publish_video):
  in-process: VideoGenerator.generate + publish_video per job, the model loaded once (what
              `generate` does per video, without its process start and model load);
  server:     a real `wan-nabla serve` process; all jobs are POSTed at once, the clock runs from
              the first POST to the last job's completion (polled every 20 ms).
Overhead per job = (server seconds - in-process seconds) / jobs: HTTP, the queue's fsync'd
commits, per-step progress writes, polling granularity. These are CPU numbers on a tiny model:
they bound the server's fixed cost per job, which on a GPU job of tens of seconds is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness.records import environment  # noqa: E402

SETTINGS = {"size": "32x32", "frames": 1, "steps": 1, "guidance_scale": 1.0}


def in_process(jobs: int, out: Path) -> float:
    from wan_nabla.config import RunConfig
    from wan_nabla.output.publish import publish_video
    from wan_nabla.pipeline import VideoGenerator

    gen = VideoGenerator.load("tiny", RunConfig(), device="cpu", dtype="float32")
    gen.generate("warm up", progress=False, size=(32, 32), frames=1, steps=1, guidance_scale=1.0)
    t0 = time.perf_counter()
    for i in range(jobs):
        r = gen.generate(f"job {i}", progress=False, size=(32, 32), frames=1, steps=1, guidance_scale=1.0)
        publish_video(gen, r, f"job {i}", out / f"job{i}.mp4")
    return time.perf_counter() - t0


def served(jobs: int, data: Path) -> float:
    from tests.support.serve_util import ServeProcess

    with ServeProcess(data) as srv:
        srv.wait_for(srv.create(prompt="warm up", **SETTINGS)["id"], "completed")
        t0 = time.perf_counter()
        ids = [srv.create(prompt=f"job {i}", **SETTINGS)["id"] for i in range(jobs)]
        srv.wait_for(ids[-1], "completed", timeout=600)
        return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=30)
    p.add_argument("--out", help="write the result as JSON here")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "local"
        local.mkdir()
        t_local = in_process(a.jobs, local)
        t_server = served(a.jobs, Path(tmp) / "data")
    env = environment(sys.argv[1:], "cpu")
    res = {
        "env": env,
        "jobs": a.jobs,
        "settings": SETTINGS,
        "device": "cpu (tiny model)",
        "cpu": env["device_name"],
        "cores": os.cpu_count(),
        "torch": env["torch"],
        "in_process_s_per_job": t_local / a.jobs,
        "server_s_per_job": t_server / a.jobs,
        "overhead_s_per_job": (t_server - t_local) / a.jobs,
    }
    print(f"{a.jobs} jobs on the CPU (tiny model, {SETTINGS}):")
    print(f"  in one process: {res['in_process_s_per_job'] * 1000:.0f} ms/job")
    print(f"  through serve:  {res['server_s_per_job'] * 1000:.0f} ms/job")
    print(f"  overhead:       {res['overhead_s_per_job'] * 1000:.0f} ms/job")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
