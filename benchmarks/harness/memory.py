"""Memory modes at real sizes: peak GPU memory per phase and seconds per step, under memory caps.

    result = run_part("14B-720p", torch.device("cuda"), budget_s=500)    # benchmarks/jobs/gpu_memory.py
    result["runs"], result["vae"], result["recommendation"]              # rows, decode peaks, per card
    print(memory_report.render_markdown(result))                        # the tables

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

import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from wan_nabla.config import AttentionConfig, GenerationConfig, MemoryConfig, RunConfig, SpeedConfig

from .memory_report import CONTEXT_GIB, VIDEOS, add_decode_estimates, recommendation_table

DEFAULT_SPARSE = "nabla_0.2_sta_11_3_3"
PARTS = ("14B-720p", "14B-low", "1.3B", "fp8-24g", "fp8-quick", "quick")
"""The last is the CPU smoke test (benchmarks/jobs/gpu_memory.py --quick); the others are --part values."""
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
    quantize: str = "none"
    """speed.quantize of the run (fp8: FP8 block linears, quantize.py)."""

    def label(self) -> str:
        card = f"{self.card_gib} GiB" if self.card_gib else "whole GPU"
        cfg = "CFG batch 2" if self.batch_cfg else "CFG 2x batch 1"
        q = f" {self.quantize}" if self.quantize != "none" else ""
        return f"{self.size}{q} {self.video} {self.attention} offload={self.offload} {cfg} on {card}"


def plan(part: str, sparse: str = DEFAULT_SPARSE) -> list[MemoryRun]:
    """The runs of one part, most important first (see benchmarks/jobs/gpu_memory.py for the parts)."""

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
        return [
            r("tiny", "quick", a, m, c)
            for a, m, c in [
                ("full", "none", None),
                ("full", "model", 12),
                ("full", "group", 12),
                ("full", "sequential", 12),
                ("sparse", "group", 12),
            ]
        ]
    if part in ("fp8-24g", "fp8-quick"):
        # 14B 720p with FP8 DiT weights (14.3 GB instead of 28.6) on a 24 GB card: `model` offload
        # (the text encoder leaves before the DiT arrives), else `group` (torchao tensors streamed).
        s, v, card = ("14B", "720p", 24) if part == "fp8-24g" else ("tiny", "quick", 12)
        q = "fp8"

        def rq(mode, b2):
            steps = 2 if s == "14B" else 3
            return MemoryRun(s, v, sparse, mode, card, b2, steps, 1, (), q)

        return [
            MemoryRun(s, v, sparse, "model", card, True, 2 if s == "14B" else 3, 1, (rq("model", False),), q),
            MemoryRun(s, v, sparse, "group", card, True, 2 if s == "14B" else 3, 1, (rq("group", False),), q),
        ]
    if part == "14B-720p":
        s, v = "14B", "720p"
        return [
            r(s, v, "full", "none"),
            ladder(s, v, "group", [24]),
            r(s, v, "sparse", "none"),
            ladder(s, v, "group", [24], "sparse"),
            ladder(s, v, "model", [48]),
        ]
    if part == "14B-low":
        s, v = "14B", "720p"
        runs = [r(s, v, "full", "group", 16, False), ladder(s, v, "sequential", [16])]
        v = "480p"
        return runs + [
            r(s, v, "full", "none"),
            r(s, v, "sparse", "none"),
            ladder(s, v, "group", [16, 24]),
            ladder(s, v, "group", [16, 24], "sparse"),
            ladder(s, v, "model", [48]),
            ladder(s, v, "sequential", [12, 16]),
        ]
    if part == "1.3B":
        runs = []
        for v in ("480p", "720p"):
            s = "1.3B"
            runs += [
                r(s, v, "full", "none"),
                r(s, v, "sparse", "none"),
                ladder(s, v, "model", [12, 16, 24]),
                ladder(s, v, "group", [12, 16, 24]),
                ladder(s, v, "group", [12, 16], "sparse"),
                ladder(s, v, "sequential", [12]),
            ]
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
            self.log(
                f"[memory] pipeline moved to {'device' if on_device else 'cpu'} in {time.perf_counter() - t0:.1f} s"
            )
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
    from wan_nabla.adapter import decode_video

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
    from wan_nabla.pipeline import VideoGenerator

    w, h, f = VIDEOS[run.video]
    dtype = "bfloat16" if device.type == "cuda" or run.quantize != "none" else "float32"
    gen_cfg = GenerationConfig(
        size=(w, h),
        frames=f,
        steps=run.steps,
        guidance_scale=5.0,
        batch_cfg=run.batch_cfg,
        device=str(device),
        dtype=dtype,
    )
    cfg = RunConfig(
        attention=_attention(run.attention),
        generation=gen_cfg,
        memory=MemoryConfig(offload=run.offload),
        speed=SpeedConfig(quantize=run.quantize),
    )
    row: dict[str, Any] = {k: v for k, v in asdict(run).items() if k != "fallback"}
    row["label"] = run.label()
    _empty(device)  # cached blocks of earlier runs must not count against this run's cap
    row["cap_gib"] = _cap(device, run.card_gib)
    gen = None
    t0 = time.perf_counter()
    stack = contextlib.ExitStack()
    if device.type == "cpu" and run.quantize != "none":  # a CPU dry run: torchao's float8 layers on the CPU
        from .levers import allow_fp8_on_cpu

        stack.enter_context(allow_fp8_on_cpu())
    try:
        gen = VideoGenerator(pipe, cfg, device, model_id=f"random-{run.size}")
        _sync(device)
        row["setup_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        res = gen.generate(PROMPT[0], negative_prompt=PROMPT[1], seed=0, progress=False, decode=False)
        _sync(device)
        t = res.timings
        timed = t["per_step_s"][run.warmup :] or t["per_step_s"]
        row.update(
            status="ok",
            s_per_step=statistics.median(timed),
            per_step_s=t["per_step_s"],
            text_encoding_s=t["text_encoding_s"],
            density=res.attention.get("overall"),
            backend=res.attention.get("backend"),
            peak_gib=t.get("peak_gpu_memory_gb_by_phase"),
            reserved_peak_gib=t.get("peak_gpu_reserved_gb_by_phase"),
        )
        if device.type == "cuda":
            vae_gib = sum(p.numel() * p.element_size() for p in pipe.vae.parameters()) / 2**30
            # Offload modes: after_video() moved the VAE off; decoding brings it (and only it) back.
            resident = torch.cuda.memory_allocated(device) / 2**30 + (vae_gib if run.offload != "none" else 0.0)
            row["resident_before_decode_gib"] = resident
    except torch.OutOfMemoryError as e:
        row.update(status="oom", error=_first_line(e))
    except Exception as e:  # noqa: BLE001 - a failed mode is a result; the others still run
        row.update(status="error", error=_first_line(e))
    finally:
        stack.close()
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


def estimate_s(run: MemoryRun, step_s: float | None = None) -> float:
    """Expected wall time of a run: steps (plus encoding) at `step_s` (else the H100 guess) with
    the offload overhead, plus placement and transfers."""
    step = step_s or _STEP_GUESS.get((run.size, run.video), 1.0)
    return (run.steps + 0.5) * step * (1.5 if run.offload == "sequential" else 1.1) + (
        15.0 if run.size == "14B" else 6.0
    )


def run_part(
    part: str,
    device: torch.device,
    *,
    sparse: str = DEFAULT_SPARSE,
    budget_s: float = 500.0,
    log: Callable[[str], None] = print,
    on_update: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Measure every run of plan(part) within budget_s; `on_update(result)` after each one."""
    start = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" or part.startswith("fp8") else torch.float32
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
                    d = {
                        "video": run.video,
                        "tiling": tiling,
                        "seconds": 0.0,
                        "decode_extra_gib": None,
                        "error": _first_line(e),
                    }
                    _empty(device)
                result["vae"].append(d)
                log(
                    f"[memory] VAE decode {run.video} tiling={tiling}: {d['seconds']:.1f} s, "
                    f"extra {_gib(d['decode_extra_gib'])} {d.get('error', '')}"
                )
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
    return (
        f"{row['s_per_step']:.2f} s/step, peaks encode {_gib(peaks.get('encode'))}, denoise "
        f"{_gib(peaks.get('denoise'))}, setup {row['setup_s']:.1f} s"
    )
