"""One patched transformer's attention: per-forward state, chosen backend, statistics, observers.

    run = AttentionRun(AttentionConfig(type="nabla", threshold=0.7))
    run.set_step(0)                        # the denoising loop reports the step (dense_steps)
    run.state.layout = run.layout_for(21, 45, 80, device, dtype)    # a forward pre-hook does this
    out_BHSD = run.attend(q_BHSD, k_BHSD, v_BHSD, layer=3)        # dense or sparse, per the config
    run.stats.subscribe(observer)          # see Observer; run.stats.unsubscribe(observer)
    run.density_summary()                  # {"overall": ..., "per_step": [...], "geometry": ...}

Three parts, each with one job:
- `ForwardState`: the denoising step and the tile layout of the forward in flight, written by the
  caller that knows them (the pipeline's loop; the model's forward pre-hook).
- the backend: `backends.select` per (device, dtype), held here so its fa4 fallback lasts for the
  rest of the run.
- `Statistics`: kept-block density per (step, layer) as device tensors (read once, in
  `density_summary`, so recording never syncs the GPU), and the observers that tools subscribe to
  see every call (q/k/v, the plan, the output) without replacing any method.

`attend_op` is `AttentionRun.attend` as the custom op `wan_nabla::attend`, one opaque node in a
compiled graph: TorchDynamo sees only its fake, so Python state, logging and statistics stay out
of the traced path and nothing recompiles per step, prompt or seed. The run and layer enter as a
small CPU tensor and the tile layout as integers: the op finds its run in `_RUNS`, a weak
registry, because a custom op can take tensors and numbers but not a Python object.
Limits: inference only (a sparse call refuses inputs that require grad); one layout per forward.
"""

from __future__ import annotations

import copy
import itertools
import logging
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from . import backends
from .config import AttentionConfig
from .layout import TileLayout
from .masks import BlockPlan, plan_blocks, use_triton

log = logging.getLogger(__name__)

_RUNS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_RUN_IDS = itertools.count()


@dataclass
class ForwardState:
    """What the forward in flight needs to know that q/k/v do not say."""

    step: int = 0
    """Denoising step (dense_steps schedule and statistics)."""
    layout: TileLayout | None = None
    """Tile layout of the latent grid (None: raster order, type full)."""


@dataclass
class AttentionCall:
    """One self-attention call, as observers see it. q/k/v are [B, H, S, D] in the run's token
    order; plan is None for a dense call; out is set when the call has finished."""

    step: int
    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: TileLayout | None
    plan: BlockPlan | None = None
    out: torch.Tensor | None = None


class Observer:
    """Subscribe a subclass with `run.stats.subscribe(obs)`; every method is optional. Calls come
    in order attend_started, [plan_started, plan_finished], attend_finished, on the caller's thread,
    outside any compiled graph."""

    def attend_started(self, call: AttentionCall) -> None: ...

    def plan_started(self, call: AttentionCall) -> None: ...

    def plan_finished(self, call: AttentionCall) -> None: ...

    def attend_finished(self, call: AttentionCall) -> None: ...


@dataclass
class Statistics:
    """Kept-block densities per step (device tensors until read) and the subscribed observers."""

    densities: dict[int, list] = field(default_factory=lambda: defaultdict(list))
    observers: list[Observer] = field(default_factory=list)

    def subscribe(self, observer: Observer) -> Observer:
        if observer not in self.observers:
            self.observers.append(observer)
        return observer

    def unsubscribe(self, observer: Observer) -> None:
        if observer in self.observers:
            self.observers.remove(observer)

    def emit(self, event: str, call: AttentionCall) -> None:
        for obs in list(self.observers):
            getattr(obs, event)(call)

    def record(self, step: int, layer: int, density) -> None:
        self.densities[step].append((layer, density))

    def reset(self) -> None:
        self.densities.clear()


_LAYOUTS: dict[tuple, TileLayout] = {}


def tile_layout(frames: int, height: int, width: int, time_pairs: bool) -> TileLayout:
    """One TileLayout object per grid, so compiled code guarding on it sees the same object (a
    plain dict: TorchDynamo traces it, where it would warn about an lru_cache)."""
    key = (frames, height, width, time_pairs)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _LAYOUTS[key] = TileLayout(frames, height, width, time_pairs=time_pairs)
    return layout


class AttentionRun:
    """The attention of one patched transformer: config, ForwardState, backend, Statistics."""

    def __init__(self, config: AttentionConfig, kernel_options: dict | None = None, sequence_parallel=None):
        self.config = config
        self.kernel_options = kernel_options
        """Extra FlexAttention kernel options (flex backend only)."""
        self.sequence_parallel = sequence_parallel
        """distributed.SequenceParallel or None: processors run `attend` between its all-to-alls."""
        self.stats_mean = None
        """Averages recorded densities over the ranks of one video (set by the pipeline), or None."""
        self.state = ForwardState()
        self.stats = Statistics()
        self.compile_region = "eager"
        """How traced code reaches `attend` (set_compile_region): one custom op ("eager", "op") or
        behind a graph break ("split"). Read while TorchDynamo traces, never in eager calls."""
        self._backends: dict[tuple, backends.Backend] = {}
        self.run_id = next(_RUN_IDS)
        _RUNS[self.run_id] = self

    def __deepcopy__(self, memo) -> AttentionRun:
        """A run of its own for a deep-copied model (same config and state, fresh statistics)."""
        if self.sequence_parallel is not None:
            raise RuntimeError(
                "a transformer patched with sequence parallelism cannot be deep-copied (it holds "
                "process groups); copy it before apply_attention, then patch the copy"
            )
        new = AttentionRun(self.config, copy.deepcopy(self.kernel_options, memo))
        new.state = copy.deepcopy(self.state, memo)
        new.compile_region = self.compile_region
        return new

    def set_compile_region(self, region: str) -> None:
        """How compiled code calls attention from now on (adapter.compile_blocks): "op" (one opaque
        custom op inside a full graph), "split" (the graph breaks around attention) or "eager" (not
        compiled: traced callers get the custom op)."""
        if region not in ("eager", "op", "split"):
            raise ValueError(f"compile region {region!r} is not allowed; use eager, op or split")
        self.compile_region = region

    # ---- per-forward state -------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.state.step

    @property
    def layout(self) -> TileLayout | None:
        return self.state.layout

    @layout.setter
    def layout(self, layout: TileLayout | None) -> None:
        self.state.layout = layout

    def set_step(self, step: int) -> None:
        self.state.step = int(step)

    def layout_for(
        self, frames: int, height: int, width: int, device: torch.device, dtype: torch.dtype | None = None
    ) -> TileLayout:
        """The tile layout of a patch grid under this run's geometry."""
        pairs = self.backend_for(device, dtype).geometry.time_pairs
        return tile_layout(frames, height, width, pairs)

    # ---- backend -----------------------------------------------------------------------
    def backend_for(self, device: torch.device, dtype: torch.dtype | None = None) -> backends.Backend:
        """This run's Backend on (device, dtype): selected (and logged) once."""
        key = (torch.device(device), dtype)
        b = self._backends.get(key)
        if b is None:
            b = self._backends[key] = backends.select(self.config, key[0], dtype, self.kernel_options)
        return b

    def backend(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        return self.backend_for(device, dtype).name

    def kernel_for(self, q_BHSD: torch.Tensor) -> str:
        return self.backend_for(q_BHSD.device, q_BHSD.dtype).kernel_for(q_BHSD)

    @property
    def fallback(self) -> str | None:
        """Why flash-attn-4 was given up in this run (None: it was not)."""
        return next((b.fallback for b in self._backends.values() if b.fallback is not None), None)

    def block_size(self, device: torch.device, dtype: torch.dtype | None = None) -> tuple[int, int]:
        return self.backend_for(device, dtype).geometry.block_size

    def uses_dense(self, layer: int, step: int | None = None) -> bool:
        c = self.config
        step = self.state.step if step is None else step
        return c.type == "full" or layer in c.dense_layers or step < c.dense_steps

    def pool_layout(self, layer: int, q: torch.Tensor) -> TileLayout | None:
        """The layout whose tile means this call's NABLA plan will read from the rotary kernel
        (None: no NABLA plan this call, or not on the Triton path)."""
        c, layout = self.config, self.state.layout
        if (
            layout is None
            or self.uses_dense(layer)
            or c.type not in ("nabla", "nabla_sta")
            or c.threshold is None
            or c.threshold >= 1.0
        ):
            return None
        return layout if use_triton(q, n=layout.n_tiles) else None

    # ---- the attention itself ----------------------------------------------------------
    def attend(
        self,
        q_BHSD: torch.Tensor,
        k_BHSD: torch.Tensor,
        v_BHSD: torch.Tensor,
        layer: int,
        pooled: tuple[torch.Tensor, torch.Tensor] | None = None,
        layout: TileLayout | None = None,
    ) -> torch.Tensor:
        """[B, H, S, D] -> [B, H, S, D]. `layout` defaults to the forward's (state.layout)."""
        layout = self.state.layout if layout is None else layout
        step, observers = self.state.step, self.stats.observers
        call = AttentionCall(step, layer, q_BHSD, k_BHSD, v_BHSD, layout) if observers else None
        if call is not None:
            self.stats.emit("attend_started", call)
        if self.uses_dense(layer, step):
            self.stats.record(step, layer, 1.0)
            out = self.dense(q_BHSD, k_BHSD, v_BHSD, layout)
        else:
            if layout is None:
                raise RuntimeError("sparse attention called without a tile layout; use wan_nabla.apply_attention")
            if call is not None:
                self.stats.emit("plan_started", call)
            plan = self.plan(q_BHSD, k_BHSD, layout, pooled)
            if call is not None:
                call.plan = plan
                self.stats.emit("plan_finished", call)
            self.stats.record(step, layer, plan.density)
            out = self.sparse(q_BHSD, k_BHSD, v_BHSD, plan)
        if call is not None:
            call.out = out
            self.stats.emit("attend_finished", call)
        return out

    def dense(
        self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, layout: TileLayout | None = None
    ) -> torch.Tensor:
        """Dense attention over the real keys (pads of a padded tile layout gathered out)."""
        layout = self.state.layout if layout is None else layout
        if layout is not None and layout.needs_padding:
            real = layout.real_token_index(q_BHSD.device)
            # Gathered as [B, S, H, D] rows (both kernels' preferred layout), viewed as BHSD.
            k_BHSD, v_BHSD = (t.transpose(1, 2).index_select(1, real).transpose(1, 2) for t in (k_BHSD, v_BHSD))
        return self.backend_for(q_BHSD.device, q_BHSD.dtype).dense(q_BHSD, k_BHSD, v_BHSD)

    def sparse(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
        """Block-sparse attention over `plan` with this run's backend."""
        return self.backend_for(q_BHSD.device, q_BHSD.dtype).sparse(q_BHSD, k_BHSD, v_BHSD, plan)

    def plan(
        self,
        q_BHSD: torch.Tensor,
        k_BHSD: torch.Tensor,
        layout: TileLayout,
        pooled: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> BlockPlan:
        """The kept blocks for this call's q/k under the configured attention type."""
        return plan_blocks(
            self.config, q_BHSD, k_BHSD, layout, self.block_size(q_BHSD.device, q_BHSD.dtype), pooled=pooled
        )

    # ---- statistics --------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.stats.reset()
        for b in self._backends.values():
            b.used.clear()

    def calls_per_step(self) -> dict[int, int]:
        """Attention calls recorded per step: one per computed block and batch (a block a step
        cache skipped never calls its attention)."""
        return {step: len(recs) for step, recs in sorted(self.stats.densities.items())}

    def density_summary(self, steps: int | None = None) -> dict:
        """Mean kept-block density per step, per layer and overall (1.0 = dense), the kernels used
        and the geometry. Reading the recorded device tensors syncs the device once, here and not
        during the run. With `steps`, `per_step` has one entry per step, None where no attention
        ran (a cache skipped it)."""
        per_step: dict[int, float] = {}
        by_layer: dict[int, list[float]] = defaultdict(list)
        densities = self.stats.densities
        items = sorted(densities.items())
        tensors = [v for _, recs in items for _, v in recs if isinstance(v, torch.Tensor)]
        # One device-to-host copy for all recorded densities instead of one sync per value. Under
        # sequence / CFG parallelism every rank of a video records the same calls for its share of
        # heads and batch items, so the mean over ranks is the one-GPU value.
        stacked = torch.stack([t.float().reshape(()) for t in tensors]) if tensors else None
        if stacked is not None and self.stats_mean is not None:
            stacked = self.stats_mean(stacked)
        host = iter(stacked.tolist()) if stacked is not None else iter(())
        for step, records in items:
            densities[step] = records = [
                (layer, next(host) if isinstance(v, torch.Tensor) else v) for layer, v in records
            ]
            vals = [float(v) for _, v in records]
            per_step[step] = sum(vals) / len(vals)
            for (layer, _), v in zip(records, vals, strict=False):
                by_layer[layer].append(v)
        overall = sum(per_step.values()) / len(per_step) if per_step else None
        order = range(steps) if steps is not None else sorted(per_step)
        used = set().union(*(b.used for b in self._backends.values())) if self._backends else set()
        chosen = next(iter(self._backends.values()), None)
        return {
            "attention": self.config.label(),
            "backend": "+".join(sorted(used)) or None,
            "geometry": chosen.geometry.record() if chosen is not None else None,
            "overall": overall,
            "per_step": [per_step.get(s) for s in order],
            "per_layer": [sum(by_layer[i]) / len(by_layer[i]) for i in sorted(by_layer)],
        }

    def log_step(self, step: int) -> None:
        vals = self.stats.densities.get(step)
        if vals and log.isEnabledFor(logging.DEBUG):
            d = sum(float(v) for _, v in vals) / len(vals)
            log.debug(
                "step %d: %s mean kept-block density %.4f over %d attention calls",
                step,
                self.config.label(),
                d,
                len(vals),
            )


# ---- the opaque regions a compiled graph calls ---------------------------------------------------
def layout_args(layout: TileLayout | None) -> list[int]:
    """A layout as the integers a custom op can take ([] for none)."""
    return [] if layout is None else [layout.frames, layout.height, layout.width, int(layout.time_pairs)]


def _layout_from(grid: list[int]) -> TileLayout | None:
    return tile_layout(grid[0], grid[1], grid[2], bool(grid[3])) if grid else None


@torch.library.custom_op("wan_nabla::attend", mutates_args=())
def attend_op(
    q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, ids: torch.Tensor, grid: list[int]
) -> torch.Tensor:
    """`AttentionRun.attend` as one opaque node; ids = [run_id, layer] on the CPU, grid = layout_args."""
    run_id, layer = ids.tolist()
    out = _RUNS[run_id].attend(q_BHSD, k_BHSD, v_BHSD, layer, layout=_layout_from(grid))
    # The compiled graph was planned with the fake's strides (those of q); hand back exactly those.
    return out if out.stride() == q_BHSD.stride() else torch.empty_like(q_BHSD).copy_(out)


@attend_op.register_fake
def _attend_fake(q_BHSD, k_BHSD, v_BHSD, ids, grid):
    return torch.empty_like(q_BHSD)


@torch.compiler.disable
def attend_outside_graph(run: AttentionRun, q_BHSD, k_BHSD, v_BHSD, layer: int) -> torch.Tensor:
    """`AttentionRun.attend` behind a graph break (compile_region "split")."""
    return run.attend(q_BHSD, k_BHSD, v_BHSD, layer)


def attend_sequence_parallel(
    run: AttentionRun, q_BSHD, k_BSHD, v_BSHD, layer: int, layout: TileLayout | None = None
) -> torch.Tensor:
    """Ulysses attention on local tokens [B, S_loc, H, D] -> [B, H, S_loc, D] (contiguous): heads
    scattered over the ranks (all tokens each), `run.attend`, gathered back."""
    sp = run.sequence_parallel
    q, k, v = sp.scatter_heads(q_BSHD, k_BSHD, v_BSHD)
    out = run.attend(q, k, v, layer, layout=layout)
    return sp.gather_heads(out).contiguous()


attend_sequence_parallel_outside_graph = torch.compiler.disable(attend_sequence_parallel)
"""Behind a graph break (compile_region "split")."""


@torch.library.custom_op("wan_nabla::attend_sequence_parallel", mutates_args=())
def attend_sequence_parallel_op(
    q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor, ids: torch.Tensor, grid: list[int]
) -> torch.Tensor:
    """Ulysses attention (all-to-alls included) as one opaque node of a compiled graph."""
    run_id, layer = ids.tolist()
    return attend_sequence_parallel(_RUNS[run_id], q_BSHD, k_BSHD, v_BSHD, layer, _layout_from(grid))


@attend_sequence_parallel_op.register_fake
def _attend_sequence_parallel_fake(q_BSHD, k_BSHD, v_BSHD, ids, grid):
    b, s, h, d = q_BSHD.shape
    return q_BSHD.new_empty(b, h, s, d)
