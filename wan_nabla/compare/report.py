"""The records a comparison writes: metrics.json, attention_error.json and report.md.

    metrics = metrics_record(prompt, "tiny", ref, cand, frame_metrics(ref_frames, cand_frames))
    attention = attention_record(cand)          # the probe's sampled calls (probe.py)
    text = markdown(metrics, attention, ["step001_layer00.png"], video=True)

metrics.json: prompt, model, seed, generation settings, both configs; decoded frames (PSNR, SSIM
per frame and overall), relative L2 of the final latents, per step the relative L2 of the two
runs' guided noise predictions; the candidate's kept-block density per step, per layer and as a
layer x step table; both runs' timings and the speed-up (see run.py); versions.
attention_error.json: per sampled call the attention output's relative L2 against exact
attention on the same q/k/v, the dense kernel's (the rounding floor), token-level and coarse
kept mass per head (probe.py says what each guarantees), and a summary over the calls.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

from ..output.environment import environment
from ..tiny import TINY_MODEL_ID
from .metrics import json_number, rel_l2

RANDOM_NOTE = (
    "The model has random weights: its video is noise, so these numbers say nothing about "
    "visual quality; they only show the tool at work. Use real weights to judge a config."
)
MASS_NOTE = (
    "Coarse kept mass is the share of NABLA's pooled map P = softmax(q_bar k_bar^T / sqrt(D)) "
    "in the kept tiles of a query tile: the CDF rule makes it >= the threshold on every row for "
    "NABLA and NABLA | STA. Token-level kept mass is the share of the exact attention of a "
    "query row inside the blocks the kernel computed; nothing guarantees it, and it is what "
    "decides the attention error."
)


def is_random_model(model_id: str) -> bool:
    return model_id == TINY_MODEL_ID or model_id.startswith("random")


def _timing(cap) -> dict[str, Any]:
    t = dict(cap.result.timings)
    t["probe_s_per_step"] = cap.probe_s
    t["steady_step_s"] = cap.steady_step_s()
    return t


def metrics_record(prompt: str, model_id: str, ref, cand, frames: dict[str, Any]) -> dict[str, Any]:
    """metrics.json (ref, cand: run.Capture; frames: metrics.frame_metrics)."""
    dens = cand.result.attention
    steps = len(cand.result.timings["per_step_s"])
    layers = len(dens.get("per_layer") or [])
    table = cand.probe.density_table(layers, steps) if cand.probe is not None and layers else []
    ref_s, cand_s = ref.steady_step_s(), cand.steady_step_s()
    return {
        "prompt": prompt,
        "model": model_id,
        "random_weights": is_random_model(model_id),
        "seed": cand.result.seed,
        "settings": cand.result.settings,
        "reference": {"label": ref.label, "attention": ref.config.attention.to_dict()},
        "candidate": {"label": cand.label, "attention": cand.config.attention.to_dict()},
        "frames": frames,
        "latents": {"final_rel_l2": json_number(rel_l2(cand.final_latents, ref.final_latents))},
        "steps": {"output_rel_l2": [json_number(x) for x in cand.step_rel_l2]},
        "reference_density": ref.result.attention.get("overall"),
        "density": {
            "overall": dens.get("overall"),
            "per_step": dens.get("per_step"),
            "per_layer": dens.get("per_layer"),
            "layer_step": table,
        },
        "timings": {
            "reference": _timing(ref),
            "candidate": _timing(cand),
            "speedup": ref_s / cand_s if cand_s > 0 else None,
            "speedup_basis": "median denoising step time without the first step (FlexAttention compile) "
            "and without the probe's own time",
        },
        "versions": environment(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def mean_of(xs) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def attention_record(cand) -> dict[str, Any]:
    """attention_error.json of the candidate run's probe."""
    calls = [r.to_dict() for r in cand.probe.records]
    rows = attention_rows({"calls": calls})
    att = cand.config.attention
    coarse = [min(c["coarse_mass_min"]) for c in calls if c["coarse_mass_min"] is not None]
    exact = [c["exact"] for c in calls if c["exact"] is not None]
    return {
        "candidate": cand.label,
        "attention": att.to_dict(),
        "threshold": att.threshold,
        "summary": {
            "calls": len(calls),
            "rel_l2_mean": mean_of([r["rel_l2"] for r in rows]),
            "rel_l2_max": max((r["rel_l2"] for r in rows), default=None),
            "dense_kernel_rel_l2_mean": mean_of([r["dense_kernel_rel_l2"] for r in rows]),
            "kept_mass_mean": mean_of([r["kept_mass_mean"] for r in rows]),
            "kept_mass_min": min((r["kept_mass_min"] for r in rows), default=None),
            "coarse_mass_min": min(coarse, default=None),
            "density_mean": mean_of([c["density"] for c in calls]),
        },
        "compute_dtype": exact[0]["compute_dtype"] if exact else None,
        "query_rows": {"sampled": exact[0]["rows"], "of": exact[0]["rows_of"]} if exact else None,
        "note": MASS_NOTE,
        "calls": calls,
    }


def attention_rows(attention: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per sampled call: step, layer, density, rel_l2, dense_kernel_rel_l2,
    kept_mass_mean (over heads), kept_mass_min (over heads), coarse_mass_min (over heads)."""
    rows = []
    for c in attention["calls"]:
        e = c.get("exact") or {}
        rows.append(
            {
                "step": c["step"],
                "layer": c["layer"],
                "dense": c["dense"],
                "density": c["density"],
                "rel_l2": e.get("rel_l2", {}).get("sparse"),
                "dense_kernel_rel_l2": e.get("rel_l2", {}).get("dense_kernel"),
                "kept_mass_mean": mean_of(e.get("kept_mass_mean", [])),
                "kept_mass_min": min(e.get("kept_mass_min", []), default=None),
                "coarse_mass_min": min(c["coarse_mass_min"]) if c.get("coarse_mass_min") else None,
            }
        )
    return rows


def fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return "∞" if x == "inf" else x
    if isinstance(x, float):
        if math.isinf(x):
            return "∞"
        return f"{x:.{digits}g}"
    return str(x)


def markdown(metrics: dict[str, Any], attention: dict[str, Any], mask_files: list[str], *, video: bool) -> str:
    """report.md: the headline numbers, the pictures, the attention table, what the masses mean."""
    ref, cand = metrics["reference"]["label"], metrics["candidate"]["label"]
    s = metrics["settings"]
    t = metrics["timings"]
    fr = metrics["frames"]["overall"]
    lines = [f"# {cand} against {ref}", ""]
    lines += [
        f"Prompt: {metrics['prompt']!r}. Model: `{metrics['model']}`, seed {metrics['seed']}, "
        f"{s['size']}, {s['frames']} frames, {s['steps']} steps, guidance {s['guidance_scale']}, "
        f"shift {s['shift']}.",
        "",
    ]
    if metrics["random_weights"]:
        lines += [f"**{RANDOM_NOTE}**", ""]
    tr, tc = t["reference"], t["candidate"]
    lines += [
        "| | reference | candidate |",
        "|---|---|---|",
        f"| attention | {ref} | {cand} |",
        f"| step time s (steady) | {fmt(tr['steady_step_s'])} | {fmt(tc['steady_step_s'])} |",
        f"| denoising s (all steps) | {fmt(tr['denoising_s'])} | {fmt(tc['denoising_s'])} |",
        f"| kept-block density | {fmt(metrics['reference_density'])} | {fmt(metrics['density']['overall'])} |",
        "",
    ]
    lines += [f"Speed-up {fmt(t['speedup'], 3)}x ({t['speedup_basis']}).", ""]
    last = metrics["steps"]["output_rel_l2"][-1] if metrics["steps"]["output_rel_l2"] else None
    lines += [
        "## Distance from the reference",
        "",
        f"- decoded frames: PSNR {fmt(fr['psnr_db'])} dB over the video, SSIM mean {fmt(fr['ssim_mean'])}, "
        f"min {fmt(fr['ssim_min'])}, largest pixel difference {fmt(fr['max_abs_diff'])}",
        f"- final latents: relative L2 {fmt(metrics['latents']['final_rel_l2'])}",
        f"- transformer output (guided noise) at the last step: relative L2 {fmt(last)}",
        "",
        "![metrics](metrics.png)",
        "",
        "Middle frame: reference | candidate | absolute difference"
        + (" (the whole video: [side_by_side.mp4](side_by_side.mp4))" if video else "")
        + ".",
        "",
        "![side by side](side_by_side.png)",
        "",
    ]
    sm = attention["summary"]
    rows = attention_rows(attention)
    q = attention.get("query_rows") or {}
    lines += [
        "## Attention fidelity at sampled calls",
        "",
        f"Exact dense attention on the candidate's own q/k/v ({attention.get('compute_dtype')}, "
        f"{q.get('sampled')} of {q.get('of')} query rows per call). Mean relative L2 "
        f"{fmt(sm['rel_l2_mean'])} (dense kernel floor {fmt(sm['dense_kernel_rel_l2_mean'])}); "
        f"token-level kept mass mean {fmt(sm['kept_mass_mean'])}, min {fmt(sm['kept_mass_min'])}; "
        f"coarse kept mass min {fmt(sm['coarse_mass_min'])}"
        + (f" (threshold {attention['threshold']:g})" if attention.get("threshold") else "")
        + ".",
        "",
        "| step | layer | kept blocks | rel. L2 vs exact | dense kernel | kept mass mean | kept mass min "
        "| coarse mass min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['layer']}{' (dense)' if r['dense'] else ''} | {fmt(r['density'], 3)} | "
            f"{fmt(r['rel_l2'], 3)} | {fmt(r['dense_kernel_rel_l2'], 3)} | {fmt(r['kept_mass_mean'], 3)} | "
            f"{fmt(r['kept_mass_min'], 3)} | {fmt(r['coarse_mass_min'], 3)} |"
        )
    lines += ["", MASS_NOTE, "", "## Masks", "", "![density](masks/density.png)", ""]
    lines += [f"![{name}](masks/{name})" for name in mask_files]
    lines += ["", "Files: metrics.json (every number above), attention_error.json (per call and head).", ""]
    return "\n".join(lines)
