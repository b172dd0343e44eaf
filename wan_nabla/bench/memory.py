"""Memory modes at real sizes: peak GPU memory per phase and seconds per step, under memory caps.

    result = run_part("14B-720p", torch.device("cuda"), budget_s=500)    # scripts/gpu_memory.py
    cells = recommend(result["runs"])       # "Which mode for my GPU": card -> (size, video) -> run
    print(render_markdown(result))

Method. One random-weight pipeline per model size (random_init.random_pipeline: UMT5-XXL and the
Wan2.1 transformer in bf16, the Wan VAE in fp32) is built once on the GPU; `none` runs use it
there, then it moves to the CPU for the offload modes. Each run (size, video, attention, mode,
CFG batching, card): VideoGenerator places the components (offload.apply_memory), the allocator
is capped with torch.cuda.set_per_process_memory_fraction to the card's size minus CONTEXT_GIB
(the CUDA context and library handles live outside the allocator), and one generate of `steps`
steps runs without decoding. The first `warmup` steps are not timed (flex compile; group
offloading's first pass records the layer order for prefetching); s/step is the median of the
rest. Peaks are allocated bytes (GiB) per phase from VideoGenerator's timings.
Decode: measured once per video size with VAE tiling on and off, only the VAE resident; a run's
decode peak = what stays resident after its denoising + that measured decode peak ("est." in
tables: exact for allocated bytes, it skips decoding 81 frames per run).
An out-of-memory run is a result ("does not fit" its card); its `fallback` (e.g. the CFG pair
as two batch-1 passes) then runs. Runs that would overrun the time budget are skipped and listed.
Limits: random weights (memory and speed do not depend on values; NABLA densities do, and are
those of random weights); few steps; the host needs RAM for the model plus the pinned copies of
group / sequential modes.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..config import AttentionConfig, GenerationConfig, MemoryConfig, RunConfig
from ..offload import vae_tiling_on

CARDS_GIB = (80, 48, 24, 16, 12)
CONTEXT_GIB = 0.75
VIDEOS = {"720p": (1280, 720, 81), "480p": (832, 480, 81), "quick": (64, 64, 5)}
MODES = ("none", "model", "group", "sequential")
DEFAULT_SPARSE = "nabla_0.2_sta_11_3_3"
PARTS = ("14B-720p", "14B-low", "1.3B", "quick")
PROMPT = ("a red fox running through fresh snow at dawn", "blurry, low quality")
# Rough H100 seconds per dense CFG step (batch of two), for the time budget before a size is measured.
_STEP_GUESS = {("14B", "720p"): 26.0, ("14B", "480p"): 7.5, ("1.3B", "720p"): 5.5, ("1.3B", "480p"): 1.4}


@dataclass(frozen=True)
class MemoryRun:
    size: str
    """Model size: 14B, 1.3B (random_init.WAN_SIZES) or tiny."""
    video: str
    """A key of VIDEOS."""
    attention: str
    """full or a preset name."""
    offload: str
    card_gib: int | None = None
    """The simulated card (GiB); None = the whole device."""
    batch_cfg: bool = True
    steps: int = 2
    warmup: int = 1
    fallback: tuple[MemoryRun, ...] = ()
    """Runs to try when this one runs out of memory (each with its own fallbacks)."""

    def label(self) -> str:
        card = f"{self.card_gib} GiB" if self.card_gib else "whole GPU"
        cfg = "CFG batch 2" if self.batch_cfg else "CFG 2x batch 1"
        return f"{self.size} {self.video} {self.attention} offload={self.offload} {cfg} on {card}"


def plan(part: str, sparse: str = DEFAULT_SPARSE) -> list[MemoryRun]:
    """The runs of one part, most important first (see scripts/gpu_memory.py for the parts)."""

    def r(size, video, att, mode, card=None, b2=True, fb=()):
        steps = 2 if (size, video) == ("14B", "720p") else 3
        return MemoryRun(size, video, sparse if att == "sparse" else att, mode, card, b2, steps, 1, fb)

    def ladder(size, video, mode, cards, att="full"):
        """The smallest card first; when it runs out of memory: the CFG pair as two batch-1 passes
        on that card, and the CFG batch on the next card up (and so on)."""
        run = None
        for card in reversed(cards):
            up = (run,) if run else ()
            run = r(size, video, att, mode, card, True, (r(size, video, att, mode, card, False), *up))
        return run

    if part == "quick":
        return [r("tiny", "quick", a, m, c) for a, m, c in [
            ("full", "none", None), ("full", "model", 12), ("full", "group", 12), ("full", "sequential", 12),
            ("sparse", "group", 12)]]
    if part == "14B-720p":
        s, v = "14B", "720p"
        return [r(s, v, "full", "none"), ladder(s, v, "group", [24]), r(s, v, "sparse", "none"),
                ladder(s, v, "group", [24], "sparse"), ladder(s, v, "model", [48])]
    if part == "14B-low":
        s, v = "14B", "720p"
        runs = [r(s, v, "full", "group", 16, False), ladder(s, v, "sequential", [16])]
        v = "480p"
        return runs + [r(s, v, "full", "none"), r(s, v, "sparse", "none"), ladder(s, v, "group", [16, 24]),
                       ladder(s, v, "group", [16, 24], "sparse"), ladder(s, v, "model", [48]),
                       ladder(s, v, "sequential", [12, 16])]
    if part == "1.3B":
        runs = []
        for v in ("480p", "720p"):
            s = "1.3B"
            runs += [r(s, v, "full", "none"), r(s, v, "sparse", "none"), ladder(s, v, "model", [12, 16, 24]),
                     ladder(s, v, "group", [12, 16, 24]), ladder(s, v, "group", [12, 16], "sparse"),
                     ladder(s, v, "sequential", [12])]
        return runs
    raise ValueError(f"unknown part {part!r}; use one of {', '.join(PARTS)}")


class _Pipes:
    """One random pipeline at a time, moved between the device and the CPU as runs need."""

    def __init__(self, device: torch.device, dtype: torch.dtype, log):
        self.device, self.dtype, self.log = device, dtype, log
        self.size, self.pipe, self.on_device = None, None, False

    def get(self, size: str, on_device: bool):
        from .random_init import random_pipeline

        if size != self.size:
            self.pipe = None
            gc.collect()
            _empty(self.device)
            t0 = time.perf_counter()
            self.pipe, self.size, self.on_device = random_pipeline(size, self.device, self.dtype), size, True
            _sync(self.device)
            self.log(f"[memory] random {size} pipeline built on {self.device} in {time.perf_counter() - t0:.1f} s")
        if on_device != self.on_device:
            t0 = time.perf_counter()
            self.pipe.to(self.device if on_device else torch.device("cpu"))
            _sync(self.device)
            _empty(self.device)
            self.on_device = on_device
            self.log(f"[memory] pipeline moved to {'device' if on_device else 'cpu'} in {time.perf_counter() - t0:.1f} s")
        return self.pipe


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cap(device: torch.device, card_gib: int | None) -> float | None:
    """Limit the allocator to a card of `card_gib` (minus CONTEXT_GIB); returns the cap in GiB."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    cap = total if card_gib is None else min(total, card_gib - CONTEXT_GIB)
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    return round(cap, 2)


def _attention(name: str) -> AttentionConfig:
    from .configs import preset_attention

    return AttentionConfig() if name == "full" else preset_attention(name)


@torch.no_grad()
def measure_decode(pipe, video: str, tiling: bool, device: torch.device) -> dict[str, Any]:
    """VAE decode of one video's latents, only the VAE resident: seconds and the peak above the
    memory in use before decoding (GiB)."""
    from ..adapter import decode_video

    w, h, f = VIDEOS[video]
    pipe.vae.to(device)
    pipe.vae.enable_tiling() if tiling else pipe.vae.disable_tiling()
    latents = torch.randn(1, 16, (f - 1) // 4 + 1, h // 8, w // 8, device=device)
    _empty(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    decode_video(pipe, latents, device)
    _sync(device)
    extra = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
    return {"video": video, "tiling": tiling, "seconds": time.perf_counter() - t0, "decode_extra_gib": extra}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def measure(run: MemoryRun, pipe, device: torch.device) -> dict[str, Any]:
    """One run (see module doc); status ok, oom or error."""
    from ..pipeline import VideoGenerator

    w, h, f = VIDEOS[run.video]
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    gen_cfg = GenerationConfig(size=(w, h), frames=f, steps=run.steps, guidance_scale=5.0, batch_cfg=run.batch_cfg,
                               device=str(device), dtype=dtype)
    cfg = RunConfig(attention=_attention(run.attention), generation=gen_cfg, memory=MemoryConfig(offload=run.offload))
    row: dict[str, Any] = {k: v for k, v in asdict(run).items() if k != "fallback"}
    row["label"] = run.label()
    _empty(device)  # cached blocks of earlier runs must not count against this run's cap
    row["cap_gib"] = _cap(device, run.card_gib)
    gen = None
    t0 = time.perf_counter()
    try:
        gen = VideoGenerator(pipe, cfg, device, model_id=f"random-{run.size}")
        _sync(device)
        row["setup_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        res = gen.generate(PROMPT[0], negative_prompt=PROMPT[1], seed=0, progress=False, decode=False)
        _sync(device)
        t = res.timings
        timed = t["per_step_s"][run.warmup:] or t["per_step_s"]
        row.update(status="ok", s_per_step=statistics.median(timed), per_step_s=t["per_step_s"],
                   text_encoding_s=t["text_encoding_s"], density=res.attention.get("overall"),
                   peak_gib=t.get("peak_gpu_memory_gb_by_phase"))
        if device.type == "cuda":
            vae_gib = sum(p.numel() * p.element_size() for p in pipe.vae.parameters()) / 2**30
            # Offload modes: after_video() moved the VAE off; decoding brings it (and only it) back.
            resident = torch.cuda.memory_allocated(device) / 2**30 + (vae_gib if run.offload != "none" else 0.0)
            row["resident_before_decode_gib"] = resident
            row["max_reserved_denoise_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    except torch.OutOfMemoryError as e:
        row.update(status="oom", error=_first_line(e))
    except Exception as e:  # noqa: BLE001 - a failed mode is a result; the others still run
        row.update(status="error", error=_first_line(e))
    finally:
        if gen is not None:
            try:
                gen.close()
            except Exception as e:  # noqa: BLE001
                row.setdefault("error", f"close: {_first_line(e)}")
        gen = None
        gc.collect()
        _sync(device)
        _empty(device)
        _cap(device, None)
    row["wall_s"] = time.perf_counter() - t0
    return row


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


def estimate_s(run: MemoryRun, step_s: float | None = None) -> float:
    """Expected wall time of a run: steps (plus encoding) at `step_s` (else the H100 guess) with
    the offload overhead, plus placement and transfers."""
    step = step_s or _STEP_GUESS.get((run.size, run.video), 1.0)
    return (run.steps + 0.5) * step * (1.5 if run.offload == "sequential" else 1.1) + (15.0 if run.size == "14B" else 6.0)


def run_part(part: str, device: torch.device, *, sparse: str = DEFAULT_SPARSE, budget_s: float = 500.0,
             log: Callable[[str], None] = print, on_update: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Measure every run of plan(part) within budget_s; `on_update(result)` after each one."""
    start = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipes = _Pipes(device, dtype, log)
    result: dict[str, Any] = {"part": part, "sparse": sparse, "runs": [], "vae": [], "skipped": []}
    planned = plan(part, sparse)
    order = list(dict.fromkeys((r.size, r.video) for r in planned))
    # Per (size, video) in plan order, the `none` runs first: the pipeline is still on the device then.
    runs = sorted(planned, key=lambda r: (order.index((r.size, r.video)), r.offload != "none"))
    step_s: dict[tuple[str, str], float] = {}
    videos_done: set[str] = set()

    def elapsed() -> float:
        return time.perf_counter() - start

    queue = list(runs)
    while queue:
        run = queue.pop(0)
        est = estimate_s(run, step_s.get((run.size, run.video)))
        if elapsed() + est > budget_s:
            result["skipped"].append({"label": run.label(), "estimated_s": round(est)})
            log(f"[memory] skipped (time budget): {run.label()}")
            continue
        pipe = pipes.get(run.size, on_device=run.offload == "none")
        row = measure(run, pipe, device)
        result["runs"].append(row)
        if row["status"] == "ok":
            step_s[(run.size, run.video)] = max(step_s.get((run.size, run.video), 0.0), row["s_per_step"])
        log(f"[memory] {row['label']}: {_row_summary(row)}")
        if run.video not in videos_done and pipes.pipe is not None and row["status"] == "ok":
            videos_done.add(run.video)
            for tiling in (False, True):
                try:
                    d = measure_decode(pipes.pipe, run.video, tiling, device)
                except Exception as e:  # noqa: BLE001 - an OOM here is a result too
                    d = {"video": run.video, "tiling": tiling, "seconds": 0.0, "decode_extra_gib": None,
                         "error": _first_line(e)}
                    _empty(device)
                result["vae"].append(d)
                log(f"[memory] VAE decode {run.video} tiling={tiling}: {d['seconds']:.1f} s, "
                    f"extra {_gib(d['decode_extra_gib'])} {d.get('error', '')}")
            if run.offload != "none":
                pipes.pipe.vae.to("cpu")
        add_decode_estimates(result["runs"], result["vae"])
        result["elapsed_s"] = elapsed()
        if on_update is not None:
            on_update(result)
        if row["status"] == "oom":
            queue[:0] = list(run.fallback)
    result["recommendation"] = recommendation_table(result["runs"])
    return result


def _gib(x) -> str:
    return "n/a" if x is None else f"{x:.1f} GiB"


def _row_summary(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status'].upper()} ({row.get('error', '')})"
    peaks = row.get("peak_gib") or {}
    return (f"{row['s_per_step']:.2f} s/step, peaks encode {_gib(peaks.get('encode'))}, denoise "
            f"{_gib(peaks.get('denoise'))}, setup {row['setup_s']:.1f} s")


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
             "| s/step | x none |", "|" + "---|" * 13]
    for r in rows:
        peaks = r.get("peak_gib") or {}
        ref = base.get((r["size"], r["video"], r["attention"]))
        ratio = f"{r['s_per_step'] / ref:.2f}" if r.get("s_per_step") and ref else ""
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:60]}"
        lines.append(
            f"| {r['size']} | {r['video']} | {r['attention']} | {r['offload']} | {'batch 2' if r['batch_cfg'] else '2 x 1'} "
            f"| {r['card_gib'] or 'whole'} | {status} | {_num(peaks.get('encode'))} | {_num(peaks.get('denoise'))} "
            f"| {_num(r.get('decode_gib_est'))} | {_num(r.get('total_peak_gib'))} | {_num(r.get('s_per_step'))} | {ratio} |")
    lines += ["", "Which mode for my GPU (dense attention; peak in GiB incl. estimated decode; "
              f"usable = card - {CONTEXT_GIB} GiB; * = confirmed by a run capped to that card):", ""]
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
