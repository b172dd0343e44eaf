"""What `batch --engine ray` costs on the CPU, against a local batch: per-item time seen by the
driver, the --ray-transfer copy, and the memory of the Ray processes (tiny model).

    python benchmarks/jobs/ray_batch_cost.py --out benchmarks/results/cpu_ray_batch   # .json + .md

Per-item time is the driver's interval between manifest records (first to last, over n-1
intervals), so actor start-up and model loading are left out and reported apart (the time to
the first record). Memory is the peak summed RSS of this process's children (Ray's GCS,
raylet, helpers and the actors), sampled every 0.2 s. Limits: a shared CPU gives noisy times;
the tiny model's MP4s are small, so the transfer cost per MB is what carries over to real videos.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness.records import environment  # noqa: E402


def _peak_children_rss(stop: threading.Event, out: dict) -> None:
    me = psutil.Process()
    while not stop.is_set():
        total = 0
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        out["peak"] = max(out.get("peak", 0), total)
        stop.wait(0.2)


def one_run(name: str, prompts: Path, out: Path, flags: list[str]) -> dict:
    from wan_nabla import cli
    from wan_nabla.batch import run_batch

    args = cli.build_parser().parse_args(["batch", str(prompts), "--out-dir", str(out), *flags, "--quiet"])
    stamps: list[float] = []
    recs: list[dict] = []
    t0 = time.perf_counter()
    rc = run_batch(args, on_record=lambda r: (stamps.append(time.perf_counter()), recs.append(r)))
    wall = time.perf_counter() - t0
    n = len(stamps)
    sizes = [(out / r["output"]).stat().st_size for r in recs if r["status"] == "ok"]
    transfer = [r["timings"]["transfer_s"] for r in recs if r["timings"] and "transfer_s" in r["timings"]]
    return {
        "run": name, "rc": rc, "items": n, "wall_s": round(wall, 2),
        "to_first_record_s": round(stamps[0] - t0, 2),
        "per_item_s": round((stamps[-1] - stamps[0]) / (n - 1), 4),
        "actor_item_s": round(statistics.median(r["timings"]["total_s"] for r in recs), 4),
        "mp4_kb": round(statistics.median(sizes) / 1024, 1),
        "transfer_s": round(statistics.median(transfer), 4) if transfer else None,
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    ap.add_argument("--items", type=int, default=24, help="items of the 16x16x1 runs")
    ap.add_argument("--big-items", type=int, default=6, help="items of the 128x128x17 runs")
    a = ap.parse_args()
    import ray

    mem: dict = {}
    stop = threading.Event()
    threading.Thread(target=_peak_children_rss, args=(stop, mem), daemon=True).start()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="ray-cost-"))
    prompts = tmp / "p.txt"
    prompts.write_text("".join(f"clip number {i}\n" for i in range(a.items)))
    few = tmp / "few.txt"
    few.write_text("".join(f"clip number {i}\n" for i in range(a.big_items)))
    small = ["--model", "tiny", "--size", "16x16", "--frames", "1", "--steps", "1"]
    big = ["--model", "tiny", "--size", "128x128", "--frames", "17", "--steps", "1"]
    runs = [
        ("local, 16x16x1", prompts, small),
        ("ray 1 actor, 16x16x1", prompts, [*small, "--engine", "ray", "--ray-actors", "1"]),
        ("ray 2 actors, 16x16x1", prompts, [*small, "--engine", "ray", "--ray-actors", "2"]),
        ("local, 128x128x17", few, big),
        ("ray 1 actor, 128x128x17", few, [*big, "--engine", "ray", "--ray-actors", "1"]),
        (
            "ray 1 actor --ray-transfer, 128x128x17",
            few,
            [*big, "--engine", "ray", "--ray-actors", "1", "--ray-transfer"],
        ),
    ]
    rows = []
    for k, (name, file, flags) in enumerate(runs):
        rows.append(one_run(name, file, tmp / str(k), flags))
        print(rows[-1], flush=True)
    stop.set()
    ray.shutdown()
    env = environment(sys.argv[1:], "cpu")
    meta = {
        "env": env,
        "commit": env["commit"],
        "device": f"CPU, {os.cpu_count()} cores ({env['device_name']})",
        "load_average_1min": round(os.getloadavg()[0], 1),
        "torch": env["torch"],
        "ray": env["ray"],
        "command": env["command"],
        "peak_ray_rss_mb": round(mem.get("peak", 0) / 2**20),
    }
    Path(a.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    cols = ["run", "items", "to_first_record_s", "per_item_s", "actor_item_s", "mp4_kb", "transfer_s"]
    md = [
        "# Ray batch cost on the CPU (tiny model)\n",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    Path(a.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
