"""Reading memory-mode measurements (bench/memory.py): decode estimates, the "Which mode for my
GPU" choice, markdown tables, merging parts.

    add_decode_estimates(runs, vae)        # decode peak = resident after denoising + measured decode peak
    recommend(runs)[("14B", "720p")][24]   # the fastest dense run whose overall peak fits a 24 GB card
    render_markdown(result)                # all runs, the recommendation per card, VAE decode peaks

Rule: a run fits a card of N GB when its overall peak (allocated GiB: encode, denoise, estimated
decode) is at most N - CONTEXT_GIB; among fitting runs the fastest s/step wins, ties go to the
simpler mode. A run that ran capped to exactly that card is marked as confirmed.
"""

from __future__ import annotations

from typing import Any

from ..config import MemoryConfig
from ..offload import vae_tiling_on

CARDS_GIB = (80, 48, 24, 16, 12)
CONTEXT_GIB = 0.75
VIDEOS = {"720p": (1280, 720, 81), "480p": (832, 480, 81), "quick": (64, 64, 5)}
MODES = ("none", "model", "group", "sequential")


def add_decode_estimates(rows: list[dict], vae: list[dict]) -> None:
    """decode_gib (est.) and the overall peak of each ok run, from the decode measurements."""
    extra = {(d["video"], d["tiling"]): d["decode_extra_gib"] for d in vae}
    for row in rows:
        if row.get("status") != "ok" or row.get("peak_gib") is None:
            continue
        w, h, _ = VIDEOS[row["video"]]
        tiling = vae_tiling_on(MemoryConfig(offload=row["offload"]), w, h)
        e = extra.get((row["video"], tiling))
        row["vae_tiling"] = tiling
        row["decode_gib_est"] = None if e is None else row["resident_before_decode_gib"] + e
        row["total_peak_gib"] = max([v for v in (*row["peak_gib"].values(), row["decode_gib_est"]) if v is not None])


def usable_gib(card: int) -> float:
    return card - CONTEXT_GIB


def recommend(rows: list[dict], attention: str = "full") -> dict[tuple[str, str], dict[int, dict | None]]:
    """For each (size, video) and card: the fastest measured `attention` run whose overall peak
    (decode estimated) fits the card's usable memory; ties go to the simpler mode."""
    out: dict[tuple[str, str], dict[int, dict | None]] = {}
    ok = [r for r in rows if r.get("status") == "ok" and r["attention"] == attention and r.get("total_peak_gib")]
    for key in sorted({(r["size"], r["video"]) for r in rows}):
        cands = [r for r in ok if (r["size"], r["video"]) == key]
        out[key] = {}
        for card in CARDS_GIB:
            fit = [r for r in cands if r["total_peak_gib"] <= usable_gib(card)]
            fit.sort(key=lambda r: (r["s_per_step"], MODES.index(r["offload"]), not r["batch_cfg"]))
            out[key][card] = fit[0] if fit else None
    return out


def _mode_text(r: dict) -> str:
    return r["offload"] + ("" if r["batch_cfg"] else " + batch_cfg: false")


def recommendation_table(rows: list[dict]) -> list[dict[str, Any]]:
    """recommend() as JSON-friendly rows: card, size, video, mode, batch_cfg, s/step, peak."""
    out = []
    for (size, video), cards in recommend(rows).items():
        for card, r in cards.items():
            out.append({"card_gib": card, "size": size, "video": video,
                        "mode": None if r is None else r["offload"], "batch_cfg": None if r is None else r["batch_cfg"],
                        "s_per_step": None if r is None else r["s_per_step"],
                        "total_peak_gib": None if r is None else r["total_peak_gib"],
                        "confirmed_under_cap": None if r is None else r.get("card_gib") == card})
    return out


def render_markdown(result: dict[str, Any]) -> str:
    rows = result["runs"]
    base = {(r["size"], r["video"], r["attention"]): r["s_per_step"] for r in rows
            if r.get("status") == "ok" and r["offload"] == "none"}
    lines = ["| model | video | attention | mode | CFG | card | status | encode | denoise | decode (est.) | peak "
             "| reserved | s/step | x none |", "|" + "---|" * 14]
    for r in rows:
        peaks = r.get("peak_gib") or {}
        ref = base.get((r["size"], r["video"], r["attention"]))
        ratio = f"{r['s_per_step'] / ref:.2f}" if r.get("s_per_step") and ref else ""
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:60]}"
        lines.append(
            f"| {r['size']} | {r['video']} | {r['attention']} | {r['offload']} | {'batch 2' if r['batch_cfg'] else '2 x 1'} "
            f"| {r['card_gib'] or 'whole'} | {status} | {_num(peaks.get('encode'))} | {_num(peaks.get('denoise'))} "
            f"| {_num(r.get('decode_gib_est'))} | {_num(r.get('total_peak_gib'))} "
            f"| {_num(max((r.get('reserved_peak_gib') or {}).values(), default=None))} | {_num(r.get('s_per_step'))} "
            f"| {ratio} |")
    lines += ["", "Peaks: allocated GiB per phase (decode: resident + measured VAE decode peak); reserved: "
              "the caching allocator's peak over encode and denoise.", "",
              "Which mode for my GPU (dense attention; fastest measured mode whose peak fits the card minus "
              f"{CONTEXT_GIB} GiB; * = confirmed by a run capped to that card):", ""]
    rec = recommend(rows)
    keys = list(rec)
    no_peaks = not any(r.get("total_peak_gib") for r in rows)
    lines.append("| card | " + " | ".join(f"{s} {v}" for s, v in keys) + " |")
    lines.append("|" + "---|" * (len(keys) + 1))
    for card in CARDS_GIB:
        cells = []
        for key in keys:
            r = rec[key][card]
            cells.append("n/a (no GPU peaks)" if no_peaks else "does not fit (measured modes)" if r is None else
                         f"{_mode_text(r)}{'*' if r.get('card_gib') == card else ''} "
                         f"({r['s_per_step']:.2f} s/step, {r['total_peak_gib']:.1f} GiB)")
        lines.append(f"| {card} GB | " + " | ".join(cells) + " |")
    lines += ["", "| VAE decode | tiling | extra GiB | seconds |", "|---|---|---|---|"]
    lines += [f"| {d['video']} | {'on' if d['tiling'] else 'off'} | {_num(d['decode_extra_gib'])} | {d['seconds']:.1f} |"
              for d in result.get("vae", [])]
    if result.get("skipped"):
        lines += ["", "Skipped (time budget): " + "; ".join(s["label"] for s in result["skipped"])]
    return "\n".join(lines) + "\n"


def _num(x, nd: int = 2) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several parts' results as one (runs, decode measurements and skips concatenated)."""
    merged: dict[str, Any] = {"part": "+".join(r["part"] for r in results), "runs": [], "vae": [], "skipped": [],
                              "environment": [r.get("environment") for r in results]}
    for r in results:
        merged["runs"] += r["runs"]
        merged["vae"] += r["vae"]
        merged["skipped"] += r.get("skipped", [])
    merged["recommendation"] = recommendation_table(merged["runs"])
    return merged
