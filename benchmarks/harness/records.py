"""Records of a benchmark run: frozen scenario/result dataclasses, the environment, the timer.

    env = environment(argv)                      # device, versions, commit, command line
    t = time_call(lambda: f(x), device)          # Timing(median_ms, min_ms, max_ms, reps)
    row = OpRow(scenario="14B heads 1280x720x81", name="nabla 0.4", ...).to_dict()

Timing: warm-up calls first (compile and autotune stay out of the numbers),
then repeated calls timed with CUDA events (host clock after a sync on the CPU), median reported
with min/max and the repeat count. Inputs at the sizes benchmarked are far larger than L2, so
calls repeat over one buffer without measuring the cache.
Limits: one device per process; the timer assumes `fn` is idempotent.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wan_nabla.output.environment import environment as product_environment
from wan_nabla.pipeline import sync_device


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


sync = sync_device  # one definition for the app's timings and the benchmarks


def time_call(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 2,
    min_reps: int = 3,
    max_reps: int = 30,
    budget_ms: float = 1500.0,
) -> Timing:
    """Median time of fn() after `warmup` calls; the repeat count fits `budget_ms` (3..30)."""
    for _ in range(warmup):
        fn()
    sync(device)
    probe = _one(fn, device)
    reps = int(max(min_reps, min(max_reps, budget_ms / max(probe, 1e-3))))
    times = [probe] + [_one(fn, device) for _ in range(reps - 1)]
    return Timing(statistics.median(times), min(times), max(times), len(times))


def _one(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def first_call_s(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call including whatever it compiles (seconds)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def compiled_graphs() -> int:
    """Graphs TorchDynamo has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass(frozen=True)
class OpScenario:
    """One attention-op problem: heads x head_dim over the patch grid of a video size."""

    heads: int
    width: int
    height: int
    frames: int = 81
    head_dim: int = 128
    batch: int = 1
    qk: str = "synthetic"
    """synthetic (smooth random fields + rotary) or wan_block (q/k of a random-weight Wan block)."""

    @property
    def label(self) -> str:
        model = {12: "1.3B", 40: "14B"}.get(self.heads, f"{self.heads}h")
        src = "" if self.qk == "synthetic" else f", {self.qk} q/k"
        return f"{model} heads {self.width}x{self.height}x{self.frames}{src}"

    @property
    def grid(self) -> tuple[int, int, int]:
        """Wan2.1 patch grid (latent frames, rows, columns): VAE 4x8x8, patch 1x2x2."""
        return ((self.frames - 1) // 4 + 1, self.height // 16, self.width // 16)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["label"] = self.label
        d["grid"] = list(self.grid)
        return d


def dense_flops(s: OpScenario, layout) -> float:
    """Dense attention work over the real tokens: 4 * B * H * S_real^2 * D."""
    return 4.0 * s.batch * s.heads * float(layout.seq_len) ** 2 * s.head_dim


@dataclass(frozen=True)
class OpRow:
    """One measured row of the attention-op table. Times in ms (median); None = not measured."""

    scenario: str
    name: str
    kind: str
    """dense_cudnn | dense_flex | dense_fa4 | nabla | sta | nabla_sta | published | published_kernel."""
    total_ms: float
    density: float
    """Kept share of (query block, key block) pairs at the kernel geometry (1.0 dense)."""
    tflops: float
    """Effective TFLOP/s: 4*B*H*S_real^2*D x density / total time."""
    share_of_cudnn: float
    speedup: float
    """Dense cuDNN time / this row's total time."""
    tile_density: float | None = None
    """Kept share of (query tile, key tile) pairs: what the algorithm asked for, before coarsening."""
    mask_ms: float | None = None
    kernel_ms: float | None = None
    block_size: tuple[int, int] | None = None
    kernel_options: dict | None = None
    compile_s: float | None = None
    reps: int = 0
    spread_ms: tuple[float, float] | None = None
    config: dict | None = None
    notes: str = ""
    backend: str | None = None
    """flex | fa4 (the kernels of this row); None for dense SDPA and the published-style rows."""
    seq_real: int | None = None
    """Real tokens of this row's grid (the published-style rows run on their own cropped grid)."""
    mask_unfused_ms: float | None = None
    """Mask build with its own pooling pass (mask_ms counts pooling as its increment inside the
    rotary kernel, the app's path; see op.py)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def base_name(device) -> str:
    """The dense baseline's name in texts: cuDNN on CUDA; on a CPU SDPA picks its own kernel, so
    rows there are not labelled cuDNN (`device`: a torch.device or an env record's device string)."""
    return "cuDNN" if str(getattr(device, "type", device)).startswith("cuda") else "dense SDPA (cpu)"


def baseline_row_name(device) -> str:
    """The dense baseline's row name: "dense cuDNN SDPA" on CUDA, "dense SDPA (cpu)" elsewhere."""
    base = base_name(device)
    return "dense cuDNN SDPA" if base == "cuDNN" else base


REPO = Path(__file__).resolve().parents[2]


def command_line(argv: list[str] | None) -> str:
    """The command that is running, as typed from the repository root: `python -m
    benchmarks.harness.levers ...` for a harness module, `python benchmarks/jobs/gpu_smoke.py ...` for a
    job script, `python -m benchmarks.harness ...` when called from another program (tests)."""
    args = " ".join(argv if argv is not None else sys.argv[1:])
    try:
        rel = Path(sys.argv[0]).resolve().relative_to(REPO)
    except (ValueError, OSError):
        rel = None
    if rel is not None and rel.parts[:2] == ("benchmarks", "harness") and rel.suffix == ".py":
        program = "python -m " + ".".join(rel.with_suffix("").parts).removesuffix(".__main__")
    elif rel is not None and rel.parts[:1] == ("benchmarks",):
        program = f"python {rel}"
    else:
        program = "python -m benchmarks.harness"
    return f"{program} {args}".rstrip()


def environment(argv: list[str] | None, device: torch.device | str) -> dict[str, Any]:
    """The product's environment record (wan_nabla.output.environment.environment: versions, commit,
    device) with the command line (command_line), start time and default attention backend: the
    one record every benchmark result and GPU job carries."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(argv),
        **product_environment(device),
    }
    env["commit"] = env["commit"] or "unknown"
    from wan_nabla.attention.backends import resolve_backend

    env["default_backend"], env["default_backend_reason"] = resolve_backend(
        "auto", device, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    return env


@dataclass
class Results:
    """Everything one `python -m benchmarks.harness` run measured; serialised by report.py."""

    env: dict[str, Any]
    op: list[dict[str, Any]] = field(default_factory=list)
    transformer: list[dict[str, Any]] = field(default_factory=list)
    e2e: list[dict[str, Any]] = field(default_factory=list)
    targets: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
