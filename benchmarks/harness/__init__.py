"""`python -m benchmarks.harness`: attention-op, transformer and end-to-end benchmarks; results as files.

    python -m benchmarks.harness --out benchmarks/results                      # all levels, real sizes (one GPU)
    python -m benchmarks.harness --levels op --op 40@1280x720 --sweep --out r/  # the target scenario + kernel sweep
    python -m benchmarks.harness --quick --out /tmp/b                           # tiny shapes, runs on the CPU
    python -m benchmarks.harness --levels op --op 40@1280x720 --backends flex fa4 --geometry --out r/   # FA4 vs flex
    python -m benchmarks.harness --render benchmarks/results/h100.json       # rewrite .md/.png from a JSON

Modules: op.py (one attention call: dense cuDNN/flex/FA4, NABLA, STA, presets per backend),
published.py (the peer baseline on its own cropped grid), checks.py (exactness checks of the op
level), geometry.py (128x64 vs 128x128, time-paired or not, per backend, by total time),
sweep.py (flex kernel option sweep, mask-build breakdown), configs.py (the presets measured),
transformer.py (one WanTransformer3DModel forward at 1.3B/14B size per backend, random weights),
e2e.py (VideoGenerator.generate at 1.3B size), report.py (JSON, markdown, PNG, targets.json),
targets.py (targets T1-T6 from the figures), records.py (records, timer, environment), qk.py
(q/k with locality), random_init.py (random-weight models built on the GPU); with their own
entry points: levers.py (the speed levers end to end), decode.py (VAE decode variants: dtype,
tiling, kernel options, the split-decode estimate), memory.py + memory_report.py (memory modes),
multigpu.py (several GPUs). Results are written after every level, so a run stopped
half-way keeps what it measured.
Limits: one device; the full run needs a GPU with >= 80 GB for the 14B transformer level.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

LEVELS = ("op", "transformer", "e2e")


def _op_scenario(spec: str):
    """'40@1280x720' or '12@832x480x81:wan_block' -> OpScenario."""
    from .records import OpScenario

    head, _, rest = spec.partition("@")
    size, _, qk = rest.partition(":")
    dims = [int(x) for x in size.lower().split("x")]
    if not head.isdigit() or len(dims) not in (2, 3):
        raise argparse.ArgumentTypeError(f"op scenario {spec!r}: use HEADS@WIDTHxHEIGHT[xFRAMES][:wan_block]")
    return OpScenario(int(head), dims[0], dims[1], dims[2] if len(dims) == 3 else 81, qk=qk or "synthetic")


def _model_scenario(spec: str):
    """'14B@1280x720' or '1.3B@832x480x81' -> (size, width, height, frames)."""
    from .random_init import WAN_SIZES

    size, _, rest = spec.partition("@")
    dims = [int(x) for x in rest.lower().split("x")] if rest else []
    if size not in WAN_SIZES or len(dims) not in (2, 3):
        raise argparse.ArgumentTypeError(
            f"scenario {spec!r}: use SIZE@WIDTHxHEIGHT[xFRAMES], SIZE in {list(WAN_SIZES)}"
        )
    return size, dims[0], dims[1], dims[2] if len(dims) == 3 else 81


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.harness",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS), help="levels to run (default: all)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for results.json/.md/.png")
    p.add_argument("--stem", default="results", help="file name stem of the results files")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU-sized), for tests and smoke runs")
    p.add_argument(
        "--op",
        dest="op_scenarios",
        nargs="+",
        type=_op_scenario,
        metavar="HEADS@WxH[:wan_block]",
        help="attention-op scenarios (default: 12 and 40 heads at 832x480 and 1280x720)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        choices=("flex", "fa4"),
        default=None,
        help="attention backends to measure (default: flex, and fa4 where it runs)",
    )
    p.add_argument(
        "--geometry",
        action="store_true",
        help="128x64 vs 128x128 blocks, time-paired or not, per backend, at the target op scenario",
    )
    p.add_argument("--sweep", action="store_true", help="flex kernel options sweep at the target op scenario")
    p.add_argument("--breakdown", action="store_true", help="time each stage of the NABLA mask build")
    p.add_argument(
        "--op-rows", nargs="+", metavar="NAME", help="only these sparse op rows (e.g. 'nabla 0.4' nabla_0.7)"
    )
    p.add_argument("--no-published", action="store_true", help="skip the published-style rows")
    p.add_argument("--no-checks", action="store_true", help="skip the mask/fidelity checks")
    p.add_argument("--budget-ms", type=float, default=1000.0, help="timing budget per measurement (ms)")
    p.add_argument(
        "--transformer",
        dest="tr_scenarios",
        nargs="+",
        type=_model_scenario,
        metavar="SIZE@WxH",
        help="transformer scenarios (default: 1.3B@832x480 14B@1280x720)",
    )
    p.add_argument(
        "--transformer-rows",
        nargs="+",
        metavar="NAME",
        help="only these transformer rows (preset file stems, e.g. nabla_0.4), plus full",
    )
    p.add_argument("--reps", type=int, default=2, help="timed forwards per transformer row")
    p.add_argument(
        "--e2e",
        dest="e2e_scenario",
        type=_model_scenario,
        metavar="SIZE@WxH[xF]",
        help="end-to-end scenario (default 1.3B@832x480x81)",
    )
    p.add_argument("--steps", type=int, default=4, help="denoising steps for the end-to-end level")
    p.add_argument("--e2e-configs", nargs="+", default=None, help="full and/or preset stems for the e2e level")
    p.add_argument(
        "--render",
        type=Path,
        nargs="+",
        metavar="RESULTS.json",
        help="only re-render .md/.png from results JSON(s); several are merged level by level "
        "(each keeps its own environment record)",
    )
    return p


def _device(name: str) -> torch.device:
    from wan_nabla.pipeline import resolve_device

    dev = resolve_device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import report

    if args.render:
        res = report.merge([report.load(p) for p in args.render])
        out = args.out if args.out != Path("benchmarks/results") else args.render[0].parent
        stem = args.stem if args.stem != "results" or len(args.render) > 1 else args.render[0].stem
        paths = report.write_all(res, out, stem=stem)
        print(report.summary(res))
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        return 0
    from .records import Results, environment

    try:
        device = _device(args.device)
    except ValueError as e:  # no CUDA, or a cuda:N that does not exist: one line, exit 2
        print(f"python -m benchmarks.harness: error: --device: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    res = Results(env=environment(argv, device))

    def log(msg: str) -> None:
        print(msg, flush=True)

    def save() -> dict[str, str]:
        return report.write_all(res.to_dict(), args.out, stem=args.stem)

    log(
        f"python -m benchmarks.harness on {res.env['device_name']} ({device}); torch {res.env['torch']}, "
        f"triton {res.env['triton']}, diffusers {res.env['diffusers']}"
    )
    with torch.inference_mode(False), torch.no_grad():
        for level in args.levels:
            try:
                _run_level(level, args, device, res, log)
            except Exception as e:  # noqa: BLE001 - keep what the other levels measured
                res.errors.append(f"{level}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                traceback.print_exc()
            paths = save()
    paths = save()
    log(report.summary(report.load(paths["json"])))
    log("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 1 if res.errors else 0


def _run_level(level: str, args, device: torch.device, res, log) -> None:
    if level == "op":
        from . import op

        scen = args.op_scenarios or (op.QUICK_SCENARIOS if args.quick else op.FULL_SCENARIOS)

        def checkpoint(partial: dict) -> None:  # the scenario so far, written with what is done
            from . import report

            report.write_all({**res.to_dict(), "op": res.op + [partial]}, args.out, stem=args.stem, with_plot=False)

        done = op.run_op_level(
            scen,
            device,
            quick=args.quick,
            sweep=args.sweep,
            log=log,
            checkpoint=checkpoint,
            published_rows=not args.no_published,
            checks=not args.no_checks,
            budget_ms=args.budget_ms,
            only_rows=args.op_rows,
            breakdown=args.breakdown,
            geometry=args.geometry,
            backends=args.backends,
        )
        res.op.extend(done)
        res.errors += [
            f"op {x['scenario'].get('label')}: {e}"
            for x in done
            for e in x.get("errors", []) + ([x["error"]] if x.get("error") else [])
        ]
    elif level == "transformer":
        from . import transformer as tr

        if args.tr_scenarios:
            scen = [tr.TransformerScenario(size, w, h, f) for size, w, h, f in args.tr_scenarios]
        else:
            scen = tr.QUICK_SCENARIOS if args.quick else tr.FULL_SCENARIOS
        rows = None
        if args.transformer_rows:
            rows = list(args.transformer_rows)
        res.transformer.extend(
            tr.run_transformer_level(
                scen, device, quick=args.quick, log=log, reps=args.reps, rows=rows, backends=args.backends
            )
        )
    elif level == "e2e":
        from . import e2e

        if args.e2e_scenario:
            size, w, h, f = args.e2e_scenario
            scen = e2e.E2EScenario(size, w, h, f, steps=args.steps)
        else:
            scen = e2e.QUICK_SCENARIO if args.quick else e2e.E2EScenario(*_full_e2e(), steps=args.steps)
        configs = args.e2e_configs or (("full", "nabla_0.4") if args.quick else e2e.DEFAULT_CONFIGS)
        res.e2e.append(e2e.run_e2e(scen, device, configs=configs, log=log))


def _full_e2e():
    from .e2e import FULL_SCENARIO

    return FULL_SCENARIO.size, FULL_SCENARIO.width, FULL_SCENARIO.height, FULL_SCENARIO.frames
