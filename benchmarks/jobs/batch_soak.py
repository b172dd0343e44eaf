"""Soak test of `wan-nabla batch`: N tiny items, RSS sampled after every item, manifest checked exactly.

    python benchmarks/jobs/batch_soak.py --items 1000 --out /tmp/soak     # ~4-8 min on 2 CPU cores
    python benchmarks/jobs/batch_soak.py --items 5 --out /tmp/soak        # smoke run (tests/batch/test_run.py)

The batch runs in-process through the real CLI parser and `batch.run_batch`, with the cheapest
item the pipeline allows (tiny model, 16x16, 1 frame, 1 step, guidance 1: no CFG pass), so the
per-item overhead (text encoding, VAE, ffmpeg, manifest, sidecar) is what is measured. Every
tenth prompt repeats an earlier one, so equal slugs are named -2, -3, ... along the way.
Reported (soak.json in --out, plus a short table on stdout): wall time and time per item; RSS after
the warm-up (item min(20, N/10)), its growth to the last item, the peak, and the least-squares
slope in KiB per item over the post-warm-up samples; manifest exactness: one record per item, all
ok, distinct output names, each MP4 present and complete (decoded, 1 frame), each sidecar holding
its record's key, no temp files, and nothing else in the directory.
Exit code 0 iff the manifest is exact and the growth is under --max-growth-mb.
Why a script: 1,000 items take minutes, more than the CI suite can spend; the suite runs the
200-item memory test (tests/batch/test_run.py) and this script's smoke mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness.records import environment  # noqa: E402


def prompts_text(n: int) -> str:
    lines = []
    for i in range(n):
        j = i - 1 if i % 10 == 9 else i  # every tenth repeats its predecessor
        lines.append(f"prompt {j}: a small animal number {j} walking through snow\n")
    return "".join(lines)


def check_manifest(out: Path, n: int) -> dict:
    """Exactness checks of a finished soak batch (see module doc); returns counts and problems."""
    from wan_nabla.batch.manifest import read_manifest
    from wan_nabla.batch.resume import sidecar_key
    from wan_nabla.output.video import is_complete_mp4

    records = read_manifest(out / "manifest.jsonl")
    problems = []
    by_index: dict[int, list] = {}
    for r in records:
        by_index.setdefault(r["index"], []).append(r)
    if sorted(by_index) != list(range(n)) or any(len(v) != 1 for v in by_index.values()):
        problems.append(f"records per item not exactly one: {len(records)} records for {n} items")
    if any(r["status"] != "ok" for r in records):
        problems.append(f"{sum(r['status'] != 'ok' for r in records)} records not ok")
    names = [r["output"] for r in records]
    if len(set(names)) != len(names):
        problems.append("duplicate output names")
    bad_video = [nm for nm in names if not is_complete_mp4(out / nm, 1)]
    bad_key = [r["output"] for r in records if sidecar_key(out / r["sidecar"]) != r["key"]]
    if bad_video:
        problems.append(f"{len(bad_video)} MP4s missing or incomplete, e.g. {bad_video[:3]}")
    if bad_key:
        problems.append(f"{len(bad_key)} sidecars without their key, e.g. {bad_key[:3]}")
    expected = {"manifest.jsonl", *names, *(r["sidecar"] for r in records)}
    extra = sorted(set(os.listdir(out)) - expected)
    if extra:
        problems.append(f"unexpected files (temps?): {extra[:5]}")
    return {
        "records": len(records),
        "items": n,
        "distinct_outputs": len(set(names)),
        "suffixed_names": sum(1 for nm in names if nm.rsplit(".", 1)[0].endswith("-2")),
        "exact": not problems,
        "problems": problems,
    }


def soak(n: int, out_dir: Path) -> dict:
    import psutil

    from wan_nabla import cli, preflight
    from wan_nabla.batch.run import run_batch
    from wan_nabla.requests import BatchRequest

    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = out_dir / "prompts.txt"
    prompts.write_text(prompts_text(n))
    batch_dir = out_dir / "batch"
    args = cli.build_parser().parse_args(
        [
            "batch",
            str(prompts),
            "--out-dir",
            str(batch_dir),
            "--model",
            "tiny",
            "--size",
            "16x16",
            "--frames",
            "1",
            "--steps",
            "1",
            "--guidance-scale",
            "1",
            "--quiet",
        ]
    )
    proc = psutil.Process()
    rss: list[int] = []
    t0 = time.perf_counter()
    req = cli.request_from_args(BatchRequest, args)
    rc = run_batch(preflight.plan_batch(req), req, on_record=lambda rec: rss.append(proc.memory_info().rss))
    wall = time.perf_counter() - t0
    warm = max(1, min(20, n // 10))
    tail = rss[warm - 1 :]
    xs = list(range(len(tail)))
    mx, my = sum(xs) / len(xs), sum(tail) / len(tail)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, tail, strict=False)) / var if var else 0.0
    check = check_manifest(batch_dir, n)
    return {
        "items": n,
        "exit_code": rc,
        "wall_s": wall,
        "per_item_s": wall / n,
        "warmup_items": warm,
        "rss_after_warmup_mb": tail[0] / 2**20,
        "rss_last_mb": rss[-1] / 2**20,
        "rss_growth_mb": (rss[-1] - tail[0]) / 2**20,
        "rss_peak_mb": max(tail) / 2**20,
        "rss_slope_kib_per_item": slope / 1024,
        "rss_mb_every_100": [round(r / 2**20, 1) for r in rss[::100]],
        "manifest": check,
        "env": environment(sys.argv[1:], "cpu"),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--out", type=Path, required=True, help="work directory (prompts, batch/, soak.json)")
    p.add_argument("--max-growth-mb", type=float, default=48.0)
    args = p.parse_args(argv)
    from wan_nabla import cli

    cli.setup_logging(quiet=True)
    res = soak(args.items, args.out)
    (args.out / "soak.json").write_text(json.dumps(res, indent=1) + "\n")
    m = res["manifest"]
    print(f"{res['items']} items in {res['wall_s']:.0f} s ({res['per_item_s']:.2f} s/item), exit {res['exit_code']}")
    print(
        f"RSS after item {res['warmup_items']}: {res['rss_after_warmup_mb']:.0f} MB; growth to the last item "
        f"{res['rss_growth_mb']:+.1f} MB (slope {res['rss_slope_kib_per_item']:+.2f} KiB/item), "
        f"peak {res['rss_peak_mb']:.0f} MB"
    )
    print(
        f"manifest: {m['records']} records for {m['items']} items, {m['distinct_outputs']} distinct outputs, "
        f"exact: {m['exact']}" + (f"; problems: {m['problems']}" if m["problems"] else "")
    )
    ok = m["exact"] and res["exit_code"] == 0 and res["rss_growth_mb"] < args.max_growth_mb
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
