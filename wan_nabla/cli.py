"""The `wan-nabla` command line: generate, batch, compare, presets, bench.

    wan-nabla generate --model tiny --prompt "a red fox running through snow" \\
        --config nabla_0.7 --output fox.mp4 [--save-masks]
    wan-nabla compare --prompt "a red fox" --config nabla_0.4 [--against full] --out cmp/
    wan-nabla generate --model weights/Wan2.1-T2V-14B-Diffusers --transformer weights/Wan2.1-T2V-14B-NABLA-0.7 \\
        --config nabla_0.7 --offload group --size 1280x720 --prompt "..."   # fine-tuned DiT, 24 GB card
    wan-nabla batch examples/example_prompts.jsonl --config nabla_0.7 --out-dir outputs/
    wan-nabla presets                                  # bundled configs, one line each
    wan-nabla bench --levels op --out benchmarks/results/h100   # a checkout only: python -m benchmarks.harness

    torchrun --nproc-per-node 2 -m wan_nabla generate --ulysses-degree 2 ...   # several GPUs

Exit codes: 0 success; 1 the run failed (generate: while generating or writing; batch: some item
failed; or another rank of a torchrun job failed), with one line on stderr (the traceback only
with --verbose); 2 bad command line, config, parallel layout, prompt, model, device or output
location, found before anything is loaded (one line on stderr naming the bad value; nothing
written, no directory left behind; under torchrun on every rank); 130 interrupted (SIGINT), 143
terminated (SIGTERM), with temp files removed (interrupts.py).
Flags override the config file's `generation:` values; the resolved config is logged and saved
in the sidecar JSON next to each video. `--help` of each subcommand shows the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

from . import __version__, preflight
from .compile_cache import use_compile_cache
from .config import (
    MAX_FRAMES,
    MAX_GUIDANCE,
    MAX_SIDE,
    NUM_TRAIN_TIMESTEPS,
    SHIFT_RANGE,
    GenerationConfig,
)
from .errors import USAGE_ERRORS, PeerFailure, UsageError, describe_failure
from .interrupts import Interrupted, handle_signals
from .log_setup import THIRD_PARTY_LOGGERS, keep_one_handler, setup_logging  # noqa: F401 - used below and by tests
from .model_source import TINY_GENERATION
from .presets import PRESET_DIR, list_presets, preset_path
from .requests import (
    BatchRequest,
    CompareRequest,
    GenerateRequest,
    RunFlags,
    SampleFlags,
    ServeRequest,
    request_fields,
)
from .serve.options import add_serve_flags

log = logging.getLogger("wan_nabla")


# ---- shared flags ------------------------------------------------------------------------------
def add_generation_flags(p: argparse.ArgumentParser, config_help: str | None = None) -> None:
    """Flags shared by generate, batch and compare (for batch they are defaults for every item);
    each is a field of requests.RunFlags of the same name."""
    d = GenerationConfig()
    tw, th = TINY_GENERATION["size"]
    p.add_argument(
        "--config",
        help=config_help
        or "a preset name (see `wan-nabla presets`, e.g. nabla_0.7) or a "
        "YAML path (default: full attention, Wan defaults)",
    )
    p.add_argument(
        "--model",
        help="'tiny', a local diffusers-format Wan2.1 directory, or a hub repo id (default: "
        "the config's model, else weights/Wan2.1-T2V-1.3B-Diffusers if present, else "
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers from the Hugging Face cache)",
    )
    p.add_argument(
        "--transformer",
        metavar="PATH",
        help="DiT weights replacing the model's own: a .safetensors "
        "file, a *.safetensors.index.json with its shards, a directory of them (Wan's original layout "
        "or diffusers'), or a hub repo id; text encoder, VAE and architecture come from --model",
    )
    p.add_argument(
        "--offload",
        help="memory mode: none (all on the GPU), model (each component on the GPU "
        "only while it runs), group (transformer blocks streamed in), sequential (lowest memory)",
    )
    p.add_argument("--vae-tiling", help="decode in tiles: auto (from 1280x720, or with group/sequential), on, off")
    p.add_argument(
        "--vae-dtype", help="VAE decode precision: fp32 or bf16 (default: the config's memory.vae_dtype, fp32)"
    )
    p.add_argument(
        "--negative-prompt",
        help="negative prompt for classifier-free guidance (default: Wan2.1's "
        "sample_neg_prompt when guidance > 1; --negative-prompt '' for none)",
    )
    p.add_argument(
        "--size",
        help=f"WIDTHxHEIGHT in pixels, multiples of 16, at most {MAX_SIDE} "
        f"(default: {d.width}x{d.height}; with --model tiny {tw}x{th})",
    )
    p.add_argument(
        "--frames",
        type=int,
        help=f"number of video frames, 4k+1, at most {MAX_FRAMES} "
        f"(default: {d.frames}; tiny {TINY_GENERATION['frames']})",
    )
    p.add_argument(
        "--steps",
        type=int,
        help=f"denoising steps, 1..{NUM_TRAIN_TIMESTEPS}; the sampler's limit at "
        f"the shift is checked before loading (default: {d.steps}; tiny "
        f"{TINY_GENERATION['steps']})",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        help=f"classifier-free guidance scale in [0, {MAX_GUIDANCE:g}]; "
        f"<= 1 turns CFG off (default: {d.guidance_scale:g})",
    )
    p.add_argument(
        "--shift",
        type=float,
        help=f"flow-matching shift in [{SHIFT_RANGE[0]:g}, {SHIFT_RANGE[1]:g}] "
        "(default: 5.0, Wan2.1's T2V value at every size; 1.3B: "
        "Wan recommends 8-12 with guidance 6, the wan_1.3b preset)",
    )
    p.add_argument(
        "--seed", type=int, help=f"random seed, 0..2**63-1 (default: {d.seed}; batch: a base for per-item seeds)"
    )
    p.add_argument("--fps", type=int, help=f"frames per second of the MP4, 1..240 (default: {d.fps})")
    p.add_argument(
        "--crf",
        type=int,
        help=f"MP4 quality, x264 CRF 0..51, lower is finer (default: {d.crf}, "
        "visually lossless; Wan2.1's imageio quality=8 is CRF 10)",
    )
    p.add_argument("--device", help=f"auto, cpu, cuda or cuda:N (default: {d.device}: cuda if available)")
    p.add_argument(
        "--dtype",
        help=f"bfloat16, float16 or float32 for transformer and text encoder; the VAE's "
        f"is --vae-dtype (default: {d.dtype})",
    )
    p.add_argument("--sampler", help="unipc (Wan's default) or euler (the schedule of step-distilled LoRAs)")
    p.add_argument("--compile", help="none, blocks, blocks-split or auto (default: blocks on CUDA, none on CPU)")
    p.add_argument(
        "--quantize",
        help="none or fp8: FP8 e4m3 linear layers in the transformer blocks (torchao; "
        "CUDA compute capability >= 8.9; use with --compile blocks) (default none)",
    )
    p.add_argument(
        "--cache",
        help="step cache: none, first-block:T, mag (MagCache with the published ratios and "
        "settings of Wan2.1 T2V 1.3B / 14B), mag:T[:K] or mag:calibrate (default none)",
    )
    p.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:SCALE]",
        help="merge a .safetensors LoRA into the transformer (repeatable; replaces the config's lora list)",
    )
    p.add_argument(
        "--ulysses-degree",
        type=int,
        metavar="U",
        help="under torchrun: split each video's tokens over U ranks (sequence parallel; U divides the "
        "model's heads: 1.3B 12, 14B 40)",
    )
    p.add_argument(
        "--cfg-parallel",
        action="store_true",
        default=None,
        help="under torchrun: run the conditional and unconditional passes on two groups of ranks",
    )
    p.add_argument(
        "--attention-backend",
        help="auto, flex or fa4: the attention kernels (default: the config's "
        "attention.backend, auto = flash-attn-4 where installed and supported)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars; warnings and errors only")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="debug log of wan-nabla (per-step attention density), tracebacks of failures",
    )


# Libraries whose INFO/DEBUG lines (file locks, HTTP requests, compile internals) are noise next to
# ours: they stay at WARNING even with --verbose.
def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Which attention calls compare / --save-masks look at closely (comma-separated indices,
    negative from the end; default: first sparse, middle and last step; first, middle, last)."""
    p.add_argument("--sample-steps", metavar="I,J,..", help="denoising steps to sample (e.g. 0,-1)")
    p.add_argument("--sample-layers", metavar="I,J,..", help="transformer blocks to sample (e.g. 0,15,-1)")
    p.add_argument("--sample-heads", metavar="I,J,..", help="heads drawn in the mask pictures")


# ---- the commands: a typed request, preflight (no torch), then the runner ----------------------
def _run(plan: preflight.RunPlan, req) -> int:
    """Run an accepted plan. The one place the CLI imports the heavy layers (torch, diffusers):
    the runner of the plan's command, once preflight has accepted the input."""
    use_compile_cache()  # before torch is imported: torch fixes its own default on import
    from . import app

    app.quiet_libraries(req.flags.quiet)
    keep_one_handler()
    if plan.command == "generate":
        return app.run_generate(plan, req)
    if plan.command == "batch":
        from .batch.run import run_batch

        return run_batch(plan, req)
    from .compare.run import run_compare

    return run_compare(plan, req)


def request_from_args(cls, args: argparse.Namespace):
    """A typed request (requests.py) of the parsed flags: the runners never see the namespace."""
    values = vars(args)
    extra = {"flags": RunFlags.from_mapping(values)}
    if "sample" in {f.name for f in dataclasses.fields(cls)}:
        extra["sample"] = SampleFlags(**{k: values.get(k) for k in ("sample_steps", "sample_layers", "sample_heads")})
    return cls(**request_fields(cls, values), **extra)


def cmd_generate(args: argparse.Namespace) -> int:
    req = request_from_args(GenerateRequest, args)
    return _run(preflight.plan_generate(req), req)


def cmd_batch(args: argparse.Namespace) -> int:
    req = request_from_args(BatchRequest, args)
    return _run(preflight.plan_batch(req), req)


def cmd_compare(args: argparse.Namespace) -> int:
    req = request_from_args(CompareRequest, args)
    return _run(preflight.plan_compare(req), req)


def cmd_presets(args: argparse.Namespace) -> int:
    if args.show:
        path = preset_path(args.show)
        if path is None:
            raise UsageError(f"presets --show: {args.show!r} is not a bundled preset; run `wan-nabla presets`")
        print(path.read_text(encoding="utf-8"), end="")
        return 0
    rows = list_presets()
    width = max(len(name) for name, _ in rows)
    for name, text in rows:
        print(f"{name:<{width}}  {text}")
    print(f"\n(use as --config NAME; files in {PRESET_DIR}; `wan-nabla presets --show NAME` prints one)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.main import run_serve

    return run_serve(request_from_args(ServeRequest, args))


GENERATE_EPILOG = """\
exit codes:
  0    the video and its sidecar were written
  1    the run failed while generating or writing: one line on stderr (the traceback with
       --verbose); no partial file, no temp file and no new empty directory is left
  2    bad input (flag, config, prompt, model, device, output location), found before anything is
       loaded: one line on stderr naming the value; nothing written, no directory left behind
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM): temp files removed, nothing half-written"""

BATCH_EPILOG = """\
exit codes:
  0    every item ok or already done
  1    at least one item failed (its reason is in manifest.jsonl), or the run stopped on an
       unexpected error (one line on stderr; the traceback with --verbose)
  2    bad command line, config, prompt file, output directory, model or device: one line on
       stderr, nothing written, no directory left behind
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM): the current item is abandoned without
       temp files, the manifest stays consistent; run the same command again to resume"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wan-nabla",
        description="Wan2.1 text-to-video with NABLA/STA sparse attention",
        epilog="Exit codes: see `wan-nabla generate --help` and `wan-nabla batch --help`.",
    )
    parser.add_argument("--version", action="version", version=f"wan-nabla {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,batch,compare,presets,serve,bench}")
    raw = argparse.RawDescriptionHelpFormatter

    g = sub.add_parser("generate", help="generate one video from a prompt", epilog=GENERATE_EPILOG, formatter_class=raw)
    g.add_argument("--prompt", required=True, help="text prompt (UTF-8)")
    g.add_argument(
        "--output",
        help="output .mp4 (default: $WAN_NABLA_OUTPUT_DIR or outputs/, then "
        "<prompt-slug>.mp4, -2, -3, ... if taken); "
        "the sidecar <name>.json is written beside it",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output MP4 and its sidecar (default: refuse); a <name>.json that is "
        "not that MP4's sidecar is never replaced",
    )
    add_generation_flags(g)
    g.add_argument(
        "--save-masks",
        action="store_true",
        help="also draw the kept tile masks of sampled steps/layers/heads into <output stem>_masks/",
    )
    add_sampling_flags(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser(
        "batch",
        help="generate a video per line of a .txt or record of a .jsonl prompt file",
        epilog=BATCH_EPILOG,
        formatter_class=raw,
    )
    b.add_argument("prompts", help=".txt (one prompt per line, # comments) or .jsonl (prompt, seed, size, ...), UTF-8")
    b.add_argument("--out-dir", required=True, help="output directory (MP4s, sidecars, manifest.jsonl)")
    b.add_argument("--dry-run", action="store_true", help="validate the prompt file and print the plan; load nothing")
    # --engine ray (fields of requests.BatchRequest, checked by batch/ray_options.py): docs/scale_out.md
    b.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (or torchrun ranks); ray: a pool of Ray actors, one pipeline per GPU, "
        "across nodes (needs the [ray] extra)",
    )
    b.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="--engine ray: a running cluster, HOST:PORT or auto (default: RAY_ADDRESS, "
        "else a local cluster started for this run)",
    )
    b.add_argument(
        "--ray-actors",
        type=int,
        metavar="N",
        help="--engine ray: pipelines to run (default: one per GPU of the cluster, 2 without GPUs)",
    )
    b.add_argument(
        "--max-retries",
        type=int,
        metavar="N",
        help="--engine ray: how often an item whose actor died (killed, node lost, out of memory) runs "
        "again on another actor before it is recorded failed (default 2)",
    )
    b.add_argument(
        "--ray-transfer",
        action="store_true",
        help="--engine ray: actors return the files and this process writes them (when --out-dir is "
        "not storage shared by every node)",
    )
    add_generation_flags(b)
    b.set_defaults(func=cmd_batch)

    c = sub.add_parser(
        "compare",
        help="run a sparse config and a reference on the same prompt, seed and noise; "
        "write videos side by side, errors, mask pictures and a report",
    )
    c.add_argument("--prompt", required=True, help="text prompt")
    c.add_argument(
        "--against", help="the reference config (preset name or YAML path; default full); only its attention is used"
    )
    c.add_argument(
        "--against-geometry",
        choices=("exact", "fast"),
        help="reference = the candidate's own attention at this kernel geometry (exact 64x64 tile masks "
        "or the fast coarsened blocks), instead of --against",
    )
    c.add_argument("--out", required=True, help="output directory (new or empty): report.md, metrics.json, ...")
    c.add_argument("--overwrite", action="store_true", help="write into a non-empty --out directory")
    c.add_argument("--no-video", action="store_true", help="skip side_by_side.mp4 (no ffmpeg needed)")
    c.add_argument(
        "--max-query-rows",
        type=int,
        help="query rows per sampled call for exact attention (default 4096; all when fewer)",
    )
    add_generation_flags(
        c,
        config_help="the candidate config (required): a preset name or a YAML path; its "
        "generation: section and the flags apply to both runs",
    )
    add_sampling_flags(c)
    c.set_defaults(func=cmd_compare)

    pr = sub.add_parser("presets", help="list the bundled attention presets (usable as --config NAME)")
    pr.add_argument("--show", metavar="NAME", help="print one preset's YAML (to copy and edit)")
    pr.set_defaults(func=cmd_presets)

    sv = sub.add_parser(
        "serve", help="serve the model over HTTP (OpenAI-style /v1/videos, a durable queue, a web page)"
    )
    add_generation_flags(
        sv,
        config_help="the server's defaults: a preset name or a YAML path (requests may pick "
        "another bundled preset's attention)",
    )
    add_serve_flags(sv)
    sv.set_defaults(func=cmd_serve)

    sub.add_parser("bench", help="the benchmark harness of a checkout (python -m benchmarks.harness)", add_help=False)
    return parser


CHECKOUT_ROOT = Path(__file__).resolve().parents[1]  # the repository, when the package runs from one
BENCH_MISSING = (
    "wan-nabla bench: the benchmark harness is not installed; it lives in a checkout's benchmarks/ "
    "(git clone the repository, then run `python -m benchmarks.harness --help` in it)"
)


def run_bench(argv: list[str]) -> int:
    """`wan-nabla bench ARGS` = `python -m benchmarks.harness ARGS` of the checkout this package runs
    from. The harness is lab code kept out of the installed package, and the package never imports
    it: it runs as a child process with the checkout on its path."""
    root = CHECKOUT_ROOT
    if not (root / "benchmarks" / "harness" / "__main__.py").is_file():
        print(BENCH_MISSING, file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    return subprocess.call([sys.executable, "-m", "benchmarks.harness", *argv], env=env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return run_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    with handle_signals():
        try:
            return args.func(args)
        except USAGE_ERRORS as e:
            print(f"wan-nabla: error: {e}", file=sys.stderr)
            return 2
        except PeerFailure as e:
            print(f"wan-nabla: error: {e}", file=sys.stderr)
            return 2 if e.usage else 1
        except Interrupted as e:
            print(f"wan-nabla: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("wan-nabla: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - an accepted run fails with one line, not a traceback
            if getattr(args, "verbose", False):
                traceback.print_exc()
            print(f"wan-nabla: error: {describe_failure(e)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
