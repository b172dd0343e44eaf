"""Reading memory-mode measurements (benchmarks/harness/memory.py): decode estimates, the "Which mode for my
GPU" choice, markdown tables, merging parts.

    add_decode_estimates(runs, vae)        # decode peak = resident after denoising + measured decode peak
    decode_on_card(run, vae, 24)           # (tiled?, decode GiB) as vae_tiling auto decides on a 24 GB card
    recommend(runs)[("14B", "720p")][24]   # the fastest dense run whose overall peak fits a 24 GB card
    render_markdown(result)                # all runs, the recommendation per card, VAE decode peaks

Rule: a run fits a card of N GB when its overall peak (allocated GiB: encode, denoise, estimated
decode) is at most N - CONTEXT_GIB; the decode is estimated as the pipeline would run it on that
card: `vae_tiling: auto` decodes untiled when VAE_DECODE_MARGIN x the untiled need fits in what
the card has left after the resident components (offload.vae_tiling_on), tiled otherwise (always
tiled under group/sequential). So one run can fit a 24 GB card with a tiled decode while its
whole-GPU peak (untiled decode) is larger; among fitting runs the fastest s/step wins, ties go to the
simpler mode. A run that ran capped to exactly that card is marked as confirmed.
"""

from __future__ import annotations

from typing import Any

from wan_nabla.config import MemoryConfig
from wan_nabla.offload import vae_tiling_on

CARDS_GIB = (80, 48, 24, 16, 12)
CONTEXT_GIB = 0.75
VIDEOS = {"720p": (1280, 720, 81), "480p": (832, 480, 81), "quick": (64, 64, 5)}
MODES = ("none", "model", "group", "sequential")


def decode_on_card(row: dict, vae: list[dict], card_gib: int | None) -> tuple[bool, float | None]:
    """(tiling, estimated decode peak GiB) of an ok run's decode on a card of `card_gib` GB (None:
    the whole 80 GB GPU), with the pipeline's own `vae_tiling: auto` rule: untiled when the untiled
    need x VAE_DECODE_MARGIN fits in the usable memory left after the resident components. The
    decode peak is that resident memory + the measured VAE decode peak (None when not measured)."""
    resident = row["resident_before_decode_gib"]
    tiling = vae_tiling_on(
        MemoryConfig(offload=row["offload"]),
        *VIDEOS[row["video"]],
        free_gib=usable_gib(card_gib or CARDS_GIB[0]) - resident,
    )
    extra = {(d["video"], d["tiling"]): d["decode_extra_gib"] for d in vae}.get((row["video"], tiling))
    return tiling, None if extra is None else resident + extra


def _total(row: dict, decode_gib: float | None) -> float:
    return max([v for v in (*row["peak_gib"].values(), decode_gib) if v is not None])


def add_decode_estimates(rows: list[dict], vae: list[dict]) -> None:
    """vae_tiling, decode_gib (est.) and the overall peak of each ok run on the card it ran on
    (decode_on_card), and the same per card of CARDS_GIB (peak_by_card_gib, tiled_by_card)."""
    for row in rows:
        if row.get("status") != "ok" or row.get("peak_gib") is None:
            continue
        by_card = {card: decode_on_card(row, vae, card) for card in CARDS_GIB}
        # the card it ran on is one of CARDS_GIB, or the whole GPU (None), estimated as the first
        row["vae_tiling"], row["decode_gib_est"] = by_card[row.get("card_gib") or CARDS_GIB[0]]
        row["total_peak_gib"] = _total(row, row["decode_gib_est"])
        row["tiled_by_card"] = {card: t for card, (t, _) in by_card.items()}
        row["peak_by_card_gib"] = {card: _total(row, d) for card, (_, d) in by_card.items()}


def peak_on_card(row: dict, card: int) -> float:
    """An ok run's overall peak on a card of `card` GB (its decode tiled or not as that card allows)."""
    return (row.get("peak_by_card_gib") or {}).get(card, row["total_peak_gib"])


def usable_gib(card: int) -> float:
    return card - CONTEXT_GIB


def recommend(rows: list[dict], attention: str = "full") -> dict[tuple[str, str], dict[int, dict | None]]:
    """For each (size, video) and card: the fastest measured `attention` run whose overall peak
    (decode estimated as on that card) fits the card's usable memory; ties go to the simpler mode."""
    out: dict[tuple[str, str], dict[int, dict | None]] = {}
    ok = [r for r in rows if r.get("status") == "ok" and r["attention"] == attention and r.get("total_peak_gib")]
    for key in sorted({(r["size"], r["video"]) for r in rows}):
        cands = [r for r in ok if (r["size"], r["video"]) == key]
        out[key] = {}
        for card in CARDS_GIB:
            fit = [r for r in cands if peak_on_card(r, card) <= usable_gib(card)]
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
            out.append(
                {
                    "card_gib": card,
                    "size": size,
                    "video": video,
                    "mode": None if r is None else r["offload"],
                    "batch_cfg": None if r is None else r["batch_cfg"],
                    "s_per_step": None if r is None else r["s_per_step"],
                    "total_peak_gib": None if r is None else peak_on_card(r, card),
                    "vae_tiled": None if r is None else (r.get("tiled_by_card") or {}).get(card),
                    "confirmed_under_cap": None if r is None else r.get("card_gib") == card,
                }
            )
    return out


def render_markdown(result: dict[str, Any]) -> str:
    rows = result["runs"]
    base = {
        (r["size"], r["video"], r["attention"]): r["s_per_step"]
        for r in rows
        if r.get("status") == "ok" and r["offload"] == "none"
    }
    lines = [
        "| model | video | attention | mode | CFG | card | status | encode | denoise | decode (est.) | peak "
        "| reserved | s/step | x none |",
        "|" + "---|" * 14,
    ]
    for r in rows:
        peaks = r.get("peak_gib") or {}
        ref = base.get((r["size"], r["video"], r["attention"]))
        ratio = f"{r['s_per_step'] / ref:.2f}" if r.get("s_per_step") and ref else ""
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:60]}"
        lines.append(
            f"| {r['size']}{' ' + r['quantize'] if r.get('quantize', 'none') != 'none' else ''} | {r['video']} | {r['attention']} | {r['offload']} | {'batch 2' if r['batch_cfg'] else '2 x 1'} "
            f"| {r['card_gib'] or 'whole'} | {status} | {_num(peaks.get('encode'))} | {_num(peaks.get('denoise'))} "
            f"| {_decode_text(r)} | {_num(r.get('total_peak_gib'))} "
            f"| {_num(max((r.get('reserved_peak_gib') or {}).values(), default=None))} | {_num(r.get('s_per_step'))} "
            f"| {ratio} |"
        )
    lines += [
        "",
        "Peaks: allocated GiB per phase (decode: resident + measured VAE decode peak, tiled or untiled "
        "as `vae_tiling: auto` decides on the card the run had); reserved: the caching allocator's peak "
        "over encode and denoise.",
        "",
        "Which mode for my GPU (dense attention; fastest measured mode whose peak fits the card minus "
        f"{CONTEXT_GIB} GiB, its VAE decode tiled where the card needs it (t); "
        "* = confirmed by a run capped to that card):",
        "",
    ]
    rec = recommend(rows)
    keys = list(rec)
    no_peaks = not any(r.get("total_peak_gib") for r in rows)
    lines.append("| card | " + " | ".join(f"{s} {v}" for s, v in keys) + " |")
    lines.append("|" + "---|" * (len(keys) + 1))
    for card in CARDS_GIB:
        cells = []
        for key in keys:
            r = rec[key][card]
            cells.append(
                "n/a (no GPU peaks)"
                if no_peaks
                else "does not fit (measured modes)"
                if r is None
                else f"{_mode_text(r)}{'*' if r.get('card_gib') == card else ''} "
                f"({r['s_per_step']:.2f} s/step, {peak_on_card(r, card):.1f} GiB"
                f"{', t' if (r.get('tiled_by_card') or {}).get(card) else ''})"
            )
        lines.append(f"| {card} GB | " + " | ".join(cells) + " |")
    lines += ["", "| VAE decode | tiling | extra GiB | seconds |", "|---|---|---|---|"]
    lines += [
        f"| {d['video']} | {'on' if d['tiling'] else 'off'} | {_num(d['decode_extra_gib'])} | {d['seconds']:.1f} |"
        for d in result.get("vae", [])
    ]
    if result.get("skipped"):
        lines += ["", "Skipped (time budget): " + "; ".join(s["label"] for s in result["skipped"])]
    return "\n".join(lines) + "\n"


def _decode_text(r: dict) -> str:
    if r.get("decode_gib_est") is None:
        return ""
    return f"{r['decode_gib_est']:.2f} {'tiled' if r.get('vae_tiling') else 'untiled'}"


def _num(x, nd: int = 2) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several parts' results as one (runs, decode measurements and skips concatenated); decode
    estimates are taken again over all parts' VAE measurements (one VAE for every model size)."""
    merged: dict[str, Any] = {
        "part": "+".join(r["part"] for r in results),
        "runs": [],
        "vae": [],
        "skipped": [],
        "environment": [r.get("environment") for r in results],
    }
    for r in results:
        merged["runs"] += r["runs"]
        merged["vae"] += r["vae"]
        merged["skipped"] += r.get("skipped", [])
    add_decode_estimates(merged["runs"], merged["vae"])
    merged["recommendation"] = recommendation_table(merged["runs"])
    return merged
