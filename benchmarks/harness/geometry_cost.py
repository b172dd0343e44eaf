"""What the exact 64x64 tile geometry costs against the fast one, from a bench results JSON.

    benchmarks/jobs/gpu_bench.sh "$OUT" --stem geometry_cost --levels op transformer --op 40@1280x720 \\
        --transformer 14B@1280x720 --backends flex fa4 --no-published --no-checks \\
        --op-rows ROWS --transformer-rows ROWS     # ROWS: each exact preset and its "<name> @fast"
    python -m benchmarks.harness.geometry_cost "$OUT/geometry_cost.json"   # -> geometry_cost_pairs.md/.json

The bench measures every exact preset twice (configs.py: the preset, and "<name> @fast", the same
attention at the fast geometry). This pairs the two rows per backend: at the op level the total
ms of one attention call (mask build + kernel) and the kept-block density, at the transformer
level the ms of one forward and of one attention call inside it (attention ms / layers), with the
ratio exact / fast. The markdown names the commit, device, torch version and the bench command.
Limits: reads what the bench wrote; rows missing on one side are listed as missing.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from .configs import FAST_TWIN

_ROW = re.compile(r"^(?P<name>.+?) \[(?P<backend>[^\]]+)\]$")


def _index(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for r in rows:
        m = _ROW.match(str(r.get("name", "")))
        if m:
            out[(m["name"], m["backend"])] = r
    return out


def pairs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (level, scenario, preset, backend) with an exact row and its fast twin."""
    out = []
    levels = [("op", s) for s in results.get("op", [])] + [("transformer", s) for s in results.get("transformer", [])]
    for level, scen in levels:
        rows = _index(scen.get("rows", []))
        label = (
            scen.get("scenario", {}).get("label") if isinstance(scen.get("scenario"), dict) else scen.get("scenario")
        )
        for (name, backend), fast in rows.items():
            if not name.endswith(FAST_TWIN):
                continue
            preset = name[: -len(FAST_TWIN)]
            exact = rows.get((preset, backend))
            rec: dict[str, Any] = {"level": level, "scenario": label, "preset": preset, "backend": backend}
            if exact is None:
                rec["missing"] = "exact row"
                out.append(rec)
                continue
            if level == "op":
                rec.update(
                    exact_call_ms=exact["total_ms"],
                    fast_call_ms=fast["total_ms"],
                    exact_density=exact.get("density"),
                    fast_density=fast.get("density"),
                )
            else:
                rec.update(
                    exact_forward_ms=exact["total_ms"],
                    fast_forward_ms=fast["total_ms"],
                    exact_call_ms=exact["per_layer_attention_ms"],
                    fast_call_ms=fast["per_layer_attention_ms"],
                    exact_density=exact.get("density"),
                    fast_density=fast.get("density"),
                )
                rec["forward_ratio"] = rec["exact_forward_ms"] / rec["fast_forward_ms"]
            rec["call_ratio"] = rec["exact_call_ms"] / rec["fast_call_ms"]
            out.append(rec)
    return out


def markdown(results: dict[str, Any], recs: list[dict[str, Any]]) -> str:
    env = results.get("env", {})
    lines = [
        "# Exact 64x64 tile masks vs the fast geometry",
        "",
        f"commit {env.get('commit')}, {env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, "
        f"CUDA {env.get('cuda')}, flash-attn-4 {env.get('flash_attn_4')}.",
        "",
        f"Command: `{env.get('command')}`",
        "",
        "| level | scenario | preset | backend | call ms exact | call ms fast | call exact/fast | "
        "forward ms exact | forward ms fast | forward exact/fast | density exact / fast |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, spec=".2f"):
        return "" if x is None else format(x, spec)

    for r in recs:
        if "missing" in r:
            lines.append(
                f"| {r['level']} | {r['scenario']} | {r['preset']} | {r['backend']} | missing: {r['missing']} "
                "| | | | | | |"
            )
            continue
        dens = f"{f(r.get('exact_density'), '.3f')} / {f(r.get('fast_density'), '.3f')}"
        lines.append(
            f"| {r['level']} | {r['scenario']} | {r['preset']} | {r['backend']} | {f(r['exact_call_ms'])} | "
            f"{f(r['fast_call_ms'])} | {f(r['call_ratio'], '.3f')} | {f(r.get('exact_forward_ms'), '.1f')} | "
            f"{f(r.get('fast_forward_ms'), '.1f')} | {f(r.get('forward_ratio'), '.3f')} | {dens} |"
        )
    lines += [
        "",
        "call ms: one attention call, mask build included (op level: synthetic q/k with locality; "
        "transformer level: attention ms of a forward / layers, random weights).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.harness.geometry_cost RESULTS.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    results = json.loads(path.read_text(encoding="utf-8"))
    recs = pairs(results)
    from wan_nabla.output.files import atomic_write_json, atomic_write_text

    stem = path.with_name(path.stem + "_pairs")
    atomic_write_json(stem.with_suffix(".json"), {"env": results.get("env"), "pairs": recs})
    text = markdown(results, recs)
    atomic_write_text(stem.with_suffix(".md"), text)
    print(text)
    return 0 if recs and not any("missing" in r for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
