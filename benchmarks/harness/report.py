"""Results files of a bench run: JSON (every figure), a markdown table, a PNG plot, targets.json.

    paths = write_all(results_dict, Path("benchmarks/results"))   # results.json/.md, _speedup.png, targets.json
    md = render_markdown(load("benchmarks/results/h100.json"))  # re-render from a JSON later

The targets T1-T6 are computed from the figures by targets.py, never entered by hand.
The plot needs matplotlib; without it the PNG is skipped (re-render elsewhere with `--render`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .records import base_name
from .targets import TARGET_OP, compute_targets, label_of, on_cpu, scenario, target_text, targets_json


def load(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' results as one: levels concatenated, each run's environment kept in `runs`."""
    if len(results) == 1:
        return results[0]
    out: dict[str, Any] = {
        "env": dict(results[0]["env"]),
        "runs": [],
        "op": [],
        "transformer": [],
        "e2e": [],
        "errors": [],
    }
    for r in results:
        out["runs"].append({"env": r["env"], "levels": [k for k in ("op", "transformer", "e2e") if r.get(k)]})
        for level in ("op", "transformer", "e2e", "errors"):
            out[level].extend(r.get(level, []))
    out["env"]["command"] = " + ".join(r["env"]["command"] for r in results)
    out["env"]["created"] = ", ".join(r["env"]["created"] for r in results)
    return out


# ---- markdown ------------------------------------------------------------------------------
def _f(x, nd=2, pct=False):
    if x is None:
        return "-"
    if pct:
        return f"{x:.0%}"
    return f"{x:.{nd}f}"


def _base(res: dict[str, Any]) -> str:
    """The run's dense baseline in texts: cuDNN, or plain dense SDPA on a CPU (records.base_name)."""
    return base_name(res.get("env", {}).get("device", ""))


def render_markdown(res: dict[str, Any]) -> str:
    env = res.get("env", {})
    base = _base(res)
    cpu = on_cpu(res)

    def ideal(row: dict, key: str):
        return None if cpu else row.get(key)

    lines = ["# python -m benchmarks.harness results", ""]
    lines += [
        f"- device: {env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, "
        f"triton {env.get('triton')}, diffusers {env.get('diffusers')}, CUDA {env.get('cuda')}",
        f"- commit: `{env.get('commit')}`; created {env.get('created')}",
    ]
    for run in res.get("runs", []) or [{"env": env, "levels": None}]:
        levels = f" ({', '.join(run['levels'])})" if run.get("levels") else ""
        lines.append(f"- command{levels}: `{run['env'].get('command')}`")
    lines.append("")
    targets = res.get("targets") or compute_targets(res)
    if targets:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        for key in ("T1", "T2", "T3", "T4", "T5", "T6"):
            if key in targets:
                met = targets[key]["met"]
                shown = "n/a (CPU run; set for an H100)" if met is None else ("yes" if met else "**no**")
                lines.append(f"| {key}: {targets[key]['target']} | {target_text(key, targets[key])} | {shown} |")
        lines.append("")
    for sc in res.get("op", []):
        lines += [f"## Attention op: {label_of(sc)}", ""]
        if sc.get("error"):
            lines += [f"error: {sc['error']}", ""]
            continue
        lines += [
            f"S = {sc['seq_real']} real tokens ({sc['seq_padded']} padded to {sc['tiles']} tiles); "
            f"dense = {sc['dense_tflop']:.1f} TFLOP. Times are medians in ms; density = kept share of "
            f"kernel blocks (tile = before coarsening); share = effective TFLOP/s over {base}'s.",
            "",
            f"| row | blocks | density | tile density | mask ms | kernel ms | total ms | eff. TFLOP/s | share of {base} | speed-up |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sc["rows"]:
            bs = "x".join(map(str, r["block_size"])) if r.get("block_size") else "-"
            if (r.get("config") or {}).get("time_pairs"):
                bs += " paired"
            lines.append(
                f"| {r['name']} | {bs} | {r['density']:.3f} | {_f(r.get('tile_density'), 3)} | "
                f"{_f(r.get('mask_ms'), 3)} | {_f(r.get('kernel_ms'))} | "
                f"{r['total_ms']:.2f} | {r['tflops']:.0f} | {r['share_of_cudnn']:.0%} | {r['speedup']:.2f}x |"
            )
        lines.append("")
        notes = [f"- {r['name']}: {r['notes']}" for r in sc["rows"] if r.get("notes")]
        if notes:
            lines += ["Row notes:", ""] + notes + [""]
        if sc.get("published"):
            pub = sc["published"]
            lines += [
                f"Published-style rows run on their own cropped grid {pub['size'][0]}x{pub['size'][1]} "
                f"({pub['seq_real']} tokens, no pads; dense {base} {pub['cudnn_ms']:.2f} ms there), compiled "
                f"with {pub['compile']}; their share refers to that baseline.",
                "",
            ]
        if sc.get("geometry"):
            lines += _geometry_md(sc["geometry"])
        if sc.get("checks"):
            lines += _checks_md(sc["checks"])
        if sc.get("mask_breakdown"):
            mb = sc["mask_breakdown"]
            lines += [
                "Mask build breakdown (ms, NABLA "
                + f"{mb['threshold']}, blocks {mb['block_size']}): "
                + ", ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in mb.items()
                    if k not in ("threshold", "block_size")
                ),
                "",
            ]
        if sc.get("sweep"):
            lines += _sweep_md(sc["sweep"], base)
        lines += [
            f"Recompiles on new masks after warm-up (compiled graphs + FA4 cache entries): "
            f"{sc.get('recompiles_on_new_masks')}; first calls (s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in (sc.get("compile_s") or {}).items()),
            "",
        ]
    for sc in res.get("transformer", []):
        lines += [f"## Transformer forward: {sc['scenario']}", ""]
        if sc.get("error"):
            lines += [f"error: {sc['error']}", ""]
            continue
        if sc.get("fastest_dense"):
            lines += [
                f"Speed-ups and ideals against the fastest dense forward: {sc['fastest_dense']}."
                + (" A CPU run shows no Amdahl ideal (its tiny shapes say nothing about a GPU's)." if cpu else ""),
                "",
            ]
        lines += [
            "| config | density | tile density | total ms | attention ms | share | mask ms | non-attn ms | speed-up | ideal | of ideal | first forward s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sc["rows"]:
            lines.append(
                f"| {r['name']} | {r['density']:.3f} | {r['tile_density']:.3f} | {r['total_ms']:.0f} | "
                f"{r['attention_ms']:.0f} | {r['attention_share']:.0%} | {r['mask_ms']:.1f} | "
                f"{r['non_attention_ms']:.0f} | {_f(r.get('speedup'))} | {_f(ideal(r, 'ideal_speedup'))} | "
                f"{_f(ideal(r, 'fraction_of_ideal'), pct=True)} | {r['first_forward_s']:.1f} |"
            )
        lines.append("")
    for sc in res.get("e2e", []):
        lines += [
            f"## End to end: {sc['scenario']}",
            "",
            "| config | text enc s | per step s | decode s | peak GPU GB | first-call compile s | first generate s | recompiles 2nd call | density |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sc["rows"]:
            lines.append(
                f"| {r['name']} | {r['text_encoding_s']:.2f} | {r['per_step_s']:.2f} | {r['decode_s']:.2f} | "
                f"{_f(r.get('peak_gpu_memory_gb'), 1)} | {r['compile_s']:.1f} | {r['first_generate_s']:.1f} | "
                f"{r['recompiles_second_call']} | {_f(r.get('density'), 3)} |"
            )
        lines.append("")
    if res.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in res["errors"]] + [""]
    return "\n".join(lines)


def _checks_md(c: dict) -> list[str]:
    out = [
        "Mask checks. *Rule*: the selection alone (`cdf_select`, Triton on CUDA) on the reference fp32 map vs an "
        "fp64 brute force (sort, keep iff mass before < threshold) with exactly tied probabilities given the "
        "mass before their group (must be 0), and vs the plain sort order (differs only on exact ties, "
        "counted). *App path*: Triton pooling + map + selection as the app runs them vs the fp32 sort rule "
        "and the fp64 brute force; those differences come from fp32 rounding of the map (max |dP| = "
        f"{c.get('coarse_map_max_abs_diff', float('nan')):.1e}) at entries within rounding of the threshold "
        "or of a tie (band = mass before within 1e-5 of the threshold).",
        "",
        "| threshold | impl | entries | density | rule vs fp64 (tie-aware) | rule vs fp64 sort | entries decided by exact ties | app vs fp32 sort | app vs fp64 | outside band | in band |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in c.get("mask", []):
        out.append(
            f"| {m['threshold']} | {m['impl']} | {m['entries']} | {m['density']:.3f} | "
            f"{m.get('rule_on_same_map_vs_fp64_ties', '-')} | {m.get('rule_on_same_map_vs_fp64', '-')} | "
            f"{m.get('tie_entries_changed', '-')} | {m['mismatch_vs_fp32_sort']} | {m['mismatch_vs_fp64']} | "
            f"{m.get('outside_band_vs_fp64', m.get('unexplained_vs_fp64'))} | {m['ambiguous_entries']} |"
        )
    plans = c.get("plan_equal", c.get("fused_equal", []))
    if plans:
        ok = sum(1 for f in plans if f["equal"] and f["density_equal"])
        out += ["", f"App block plan (plan_blocks) equal to plan_from_keep(tile_keep_mask): {ok}/{len(plans)} cases."]
    for f in c.get("fidelity", []):
        out.append(
            f"- output fidelity, {f['row']}: rel. L2 vs exact fp32 masked attention {f['rel_l2_vs_exact_masked']:.2e} "
            f"({f['rows']} query rows); masked vs dense differ by {f['rel_l2_masked_vs_dense']:.2f}"
        )
    return out + [""]


def _geometry_md(g: dict) -> list[str]:
    entries = g.get("entries", [])
    masks = list(dict.fromkeys(m["mask"] for e in entries for m in e.get("masks", [])))
    out = [
        "Geometry at equal threshold (app path, mask + kernel; total ms / kept-block density):",
        "",
        "| backend | geometry | " + " | ".join(masks) + " | sum ms |",
        "|---|---|" + "---|" * (len(masks) + 1),
    ]
    for e in entries:
        by = {m["mask"]: m for m in e.get("masks", [])}
        cells = [f"{by[m]['total_ms']:.2f} / {by[m]['density']:.3f}" if m in by else "-" for m in masks]
        err = f" ({e['error']})" if e.get("error") else ""
        out.append(
            f"| {e['backend']} | {e['geometry']}{err} | " + " | ".join(cells) + f" | {_f(e.get('sum_total_ms'))} |"
        )
    for backend, w in g.get("winner", {}).items():
        out.append(
            f"\nFastest geometry [{backend}]: **{w['geometry']}** (sum {w['sum_total_ms']:.1f} ms; "
            f"per-mask wins {w['mask_wins']})"
        )
    return out + [""]


def _sweep_md(sweep: list[dict], base: str = "cuDNN") -> list[str]:
    masks = []
    for e in sweep:
        for m in e.get("masks", []):
            if m["mask"] not in masks:
                masks.append(m["mask"])
    out = [
        f"Kernel geometry sweep (kernel only; ms / density / share of {base}):",
        "",
        "| config | compile s | " + " | ".join(masks) + " |",
        "|---|---|" + "---|" * len(masks),
    ]
    for e in sweep:
        cells = []
        by = {m["mask"]: m for m in e.get("masks", [])}
        for name in masks:
            m = by.get(name)
            cells.append(f"{m['kernel_ms']:.2f} / {m['density']:.3f} / {m['share_of_cudnn']:.0%}" if m else "-")
        err = f" ({e['error']})" if e.get("error") else ""
        out.append(f"| {e['config']}{err} | {_f(e.get('compile_s'), 1)} | " + " | ".join(cells) + " |")
    return out + [""]


def summary(res: dict[str, Any]) -> str:
    """The short table printed at the end of a run: targets, then the target op scenario's rows."""
    md = render_markdown(res)
    head = md.split("## Attention op")[0].split("## Transformer")[0].split("## End to end")[0]
    op = scenario(res.get("op", []), TARGET_OP)
    lines = [head.rstrip(), ""]
    if op:
        lines += [f"{label_of(op)}: row, density, total ms, share of {_base(res)}, speed-up"]
        for r in op["rows"]:
            lines.append(
                f"  {r['name']:<34} {r['density']:6.3f} {r['total_ms']:9.2f} {r['share_of_cudnn']:6.0%} "
                f"{r['speedup']:6.2f}x"
            )
    return "\n".join(lines)


# ---- plot ----------------------------------------------------------------------------------
def plot(res: dict[str, Any], path: Path) -> bool:
    """Speed-up over dense cuDNN vs density, one panel per op scenario. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scen = [s for s in res.get("op", []) if s.get("rows")]
    if not scen:
        return False
    base = _base(res)
    cols = min(2, len(scen))
    nrows = -(-len(scen) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.8 * nrows), squeeze=False)
    style = {
        ("nabla", "flex"): ("o", "C0", "NABLA [flex]"),
        ("nabla_sta", "flex"): ("s", "C2", "NABLA+STA [flex]"),
        ("sta", "flex"): ("^", "C1", "STA [flex]"),
        ("nabla", "fa4"): ("o", "C4", "NABLA [fa4]"),
        ("nabla_sta", "fa4"): ("s", "C5", "NABLA+STA [fa4]"),
        ("sta", "fa4"): ("^", "C6", "STA [fa4]"),
        ("published", None): ("x", "C3", "published-style NABLA (cropped grid)"),
        ("dense_flex", "flex"): ("D", "C7", "dense flex"),
        ("dense_fa4", "fa4"): ("D", "C8", "dense fa4"),
    }
    for ax, sc in zip(axes.flat, scen, strict=False):
        for (kind, backend), (marker, color, label) in style.items():
            rows = [
                r
                for r in sc["rows"]
                if r["kind"] == kind and r.get("backend", "flex" if kind != "published" else None) == backend
            ]
            if rows:
                ax.scatter(
                    [r["density"] for r in rows],
                    [r["speedup"] for r in rows],
                    marker=marker,
                    color=color,
                    label=label,
                    s=40,
                )
        import numpy as np

        d = np.geomspace(0.02, 1.0, 50)
        ax.plot(d, 1 / d, "k--", lw=0.8, label="ideal (1/density)")
        ax.plot(d, 0.8 / d, "k:", lw=0.8, label=f"80% of dense {base} throughput")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (kept share of kernel blocks)")
        ax.set_ylabel(f"speed-up over dense {base}")
        ax.set_title(label_of(sc), fontsize=10)
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(scen) :]:
        ax.axis("off")
    env = res.get("env", {})
    fig.suptitle(f"wan-nabla attention op, {env.get('device_name')}, mask build + kernel", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(
    res: dict[str, Any], out_dir: str | Path, stem: str = "results", with_plot: bool = True
) -> dict[str, str]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res["targets"] = compute_targets(res)  # always recomputed from the figures
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "targets": out_dir / "targets.json"}
    paths["json"].write_text(json.dumps(res, indent=1, default=_jsonable) + "\n")
    paths["targets"].write_text(json.dumps(targets_json(res, res["targets"]), indent=1, default=_jsonable) + "\n")
    paths["md"].write_text(render_markdown(res) + "\n")
    png = out_dir / f"{stem}_speedup.png"
    if with_plot and plot(res, png):
        paths["png"] = png
    return {k: str(v) for k, v in paths.items()}


def _jsonable(x):
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if isinstance(x, (set, tuple)):
        return list(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)
