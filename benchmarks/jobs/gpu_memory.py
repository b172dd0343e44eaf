"""Memory modes on one GPU: peak memory per phase and s/step per --offload mode, cards simulated
with torch.cuda.set_per_process_memory_fraction (method: benchmarks/harness/memory.py, reading: memory_report.py).

    source benchmarks/jobs/gpu_env.sh
    python3 benchmarks/jobs/gpu_memory.py --part 14B-720p --out $OUT    # ~7 min on an H100
    python3 benchmarks/jobs/gpu_memory.py --part 14B-low --out $OUT     # ~6 min
    python3 benchmarks/jobs/gpu_memory.py --part 1.3B --out $OUT        # ~5 min
    python3 benchmarks/jobs/gpu_memory.py --report memory_14B-720p.json memory_14B-low.json memory_1.3B.json --out DIR
    python3 benchmarks/jobs/gpu_memory.py --quick --device cpu --out /tmp/m   # tiny model on the CPU (tests)

Parts (one GPU command each, < 9 min; the time budget skips what would not fit and lists it):
  14B-720p  Wan2.1-14B at 1280x720x81: none (dense, sparse) on the whole GPU, group (dense,
            sparse) on a 24 GB card, model on 48 GB.
  14B-low   14B at 1280x720x81 on 16 GB cards (group with the CFG pair as two passes,
            sequential); then 14B at 832x480x81: none (dense, sparse), group (dense, sparse)
            from 16 GB up, model on 48 GB, sequential from 12 GB up.
  1.3B      Wan2.1-1.3B at 832x480x81, then 1280x720x81: none (dense, sparse); model, group (dense,
            sparse) and sequential from 12 GB up.
  A "ladder" starts on the smallest card; out of memory there, it tries the CFG pair as two
  passes on that card and the CFG batch on the next card up.
Random weights at real sizes (UMT5-XXL, Wan2.1 transformer, Wan VAE); 2-3 denoising steps, the
first not timed; the VAE decode peak is measured once per video size (tiled and not) and added
to what each mode keeps resident. Writes OUT/memory_<part>.json and .md after every run (a
killed job keeps what it measured), and prints the "Which mode for my GPU" table last.
The allocator runs with its default settings, as users get it (PYTORCH_CUDA_ALLOC_CONF, if set,
is recorded): a capped run that passes fits that card as is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.harness import memory, memory_report  # noqa: E402
from benchmarks.harness.records import environment  # noqa: E402
from wan_nabla.output.files import atomic_write_json, atomic_write_text  # noqa: E402
from wan_nabla.pipeline import resolve_device  # noqa: E402

NOTE = (
    "random weights at real sizes (speed and memory only; videos are noise); peaks are allocated GiB; "
    "decode peaks are estimated as resident memory + the measured VAE decode peak"
)


def _provenance(result: dict) -> str:
    """One line per measuring environment (a merged report holds one per part)."""
    envs = result.get("environment") or []
    envs = [envs] if isinstance(envs, dict) else envs
    return "".join(
        f"Device {e.get('device_name', '?')}, torch {e.get('torch', '?')}, commit {e.get('commit', '?')}.\n"
        for e in envs
    )


def _write(result: dict, out: Path, stem: str) -> None:
    atomic_write_json(out / f"{stem}.json", result)
    atomic_write_text(
        out / f"{stem}.md",
        f"# Memory modes ({result['part']})\n\n{NOTE}.\n\n{_provenance(result)}\n"
        + memory_report.render_markdown(result),
    )


def _short(result: dict) -> str:
    """The last lines printed: the recommendation per card."""
    md = memory_report.render_markdown(result)
    start = md.index("Which mode for my GPU")
    return md[start : md.index("| VAE decode")].strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=memory.PARTS[:-1], help="which runs (see the module doc)")
    p.add_argument("--quick", action="store_true", help="tiny model, all modes (CPU smoke test)")
    p.add_argument("--report", nargs="+", type=Path, metavar="JSON", help="merge parts' JSON into memory.json/.md")
    p.add_argument("--out", type=Path, required=True, help="output directory ($OUT on the GPU machine)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--sparse", default=memory.DEFAULT_SPARSE, help="the sparse preset measured next to dense")
    p.add_argument(
        "--budget-s",
        type=float,
        default=460.0,
        help="start no run expected to end after this many seconds (default 460)",
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.report:
        result = memory_report.merge([json.loads(f.read_text()) for f in args.report])
        _write(result, args.out, "memory")
        print(_short(result))
        return 0
    if not (args.quick or args.part):
        p.error("give --part, --quick or --report")
    part = "quick" if args.quick else args.part
    device = resolve_device(args.device)
    if device.type == "cuda":
        if device.index is None:  # "auto"/"cuda" carry no index; set_device needs one
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    stem = f"memory_{part}"
    env = environment(argv, device)
    env["command"] = "benchmarks/jobs/gpu_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    env["pytorch_cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")

    def save(result: dict) -> None:
        result.update(
            environment=env, note=NOTE, context_gib=memory_report.CONTEXT_GIB, cards_gib=list(memory_report.CARDS_GIB)
        )
        result["recommendation"] = memory_report.recommendation_table(result["runs"])
        _write(result, args.out, stem)

    result = memory.run_part(part, device, sparse=args.sparse, budget_s=args.budget_s, on_update=save)
    save(result)
    print(
        f"wrote {args.out / (stem + '.json')} and .md; {len(result['runs'])} runs, "
        f"{len(result['skipped'])} skipped, {result.get('elapsed_s', 0):.0f} s"
    )
    print(_short(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
