"""What the masks kept and what it cost, measured on the very q/k/v of a run's attention calls.

    sampling = Sampling(steps=(0, 1, 3), layers=(0, 14, 29), heads=(0, 11))  # options.py: from flags
    probe = AttentionProbe(gen.handle.run, sampling, exact=True)
    gen.generate("a fox")          # the probe watches every self-attention call of the run
    probe.records                  # one CallRecord per sampled (step, layer)
    probe.density_table(30, 4)     # [layer][step] kept-block density of every call
    probe.close()                  # unsubscribed from the run

The probe subscribes to the run's statistics (`run.stats.subscribe`, attention/run.py's Observer,
as benchmarks/harness/transformer.py's timer does); nothing of the run is replaced. Every call
records its kept-block density. A sampled
call (the first call of a sampled (step, layer); with batched CFG it holds both passes) also gets:
- its tile keep mask, `masks.tile_keep_mask` (the one rule), for the sampled heads of batch item 0
  (the conditional pass), in frame-major tile order for pictures (layouts with time pairs are
  reordered); all-kept for dense calls;
- coarse kept mass (NABLA's own guarantee): on the coarse map P = softmax(q_bar k_bar^T / sqrt(D))
  the P-mass of the kept tiles per query tile. The CDF rule keeps tiles until their mass reaches
  the threshold, so for NABLA (and NABLA | STA, which only adds tiles) it is >= threshold on every
  row, by construction. Per head: min and mean over query tiles and batch items.
- with `exact=True`, exact dense attention on the same q/k/v (pad keys excluded): the relative L2
  error of the call's output against it (all heads, per head), of the dense kernel's output too
  (the rounding floor: bf16 on a GPU), and the token-level kept mass: the share of the exact
  attention probability of each query row that falls inside the blocks the kernel computed (at
  the kernel geometry: 128-token query blocks OR-coarsen tiles on CUDA). This mass has no
  guarantee: a tile kept for its pooled score can hold little of the real attention, and the
  reverse. Per head: min and mean over the sampled query rows and batch items.

Exact attention is computed in float64 on the CPU and float32 on CUDA, over chunks of query rows
(at most `chunk_bytes` of scores at a time), so the S x S matrix never exists: at 1.3B 832x480x81
(S = 37,632 padded tokens, 12 heads, CFG batch 2) it would take 136 GB in float32. For long
sequences the query rows are subsampled: at most `max_query_rows` real tokens, evenly spaced in
the call's token order (every key is always used). The probe's own time is measured between
device syncs and reported per step, so callers can take it out of step times.
Limits: self-attention calls of one run; sampled masks are kept on the host ([heads, n, n] bool);
a sampled call needs float32 copies of k and v plus `chunk_bytes` of device memory on top of
the run (1.3B 832x480x81: about 2 GB).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import masks
from ..attention.backends.flex import dense_attention
from ..attention.layout import TileLayout
from ..attention.run import AttentionCall, Observer
from ..pipeline import sync_device

DEFAULT_MAX_QUERY_ROWS = 4096
DEFAULT_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class Sampling:
    """The (step, layer) calls and heads a probe looks at closely (indices from 0)."""

    steps: tuple[int, ...]
    layers: tuple[int, ...]
    heads: tuple[int, ...]


# ---- the measurements ------------------------------------------------------------------------
def plan_block_keep(plan: masks.BlockPlan) -> torch.Tensor:
    """The kept (query block, key block) pairs of a BlockPlan: [B|1, H|1, n_q, n_kv] bool."""
    keep = None
    for num, idx in ((plan.kv_num, plan.kv_idx), (plan.full_num, plan.full_idx)):
        n = idx.shape[-1]
        listed = torch.arange(n, device=idx.device) < num[..., None].long()  # slot holds a kept block
        # Only the first `num` slots count, whatever the rest of the row holds: they go to a spare column.
        target = torch.where(listed, idx.long(), n)
        part = torch.zeros(*idx.shape[:-1], n + 1, dtype=torch.bool, device=idx.device)
        part = part.scatter_(-1, target, True)[..., :n]
        keep = part if keep is None else keep | part
    return keep


def sample_rows(n_rows: int, max_rows: int, device: torch.device, real: torch.Tensor | None = None) -> torch.Tensor:
    """Query rows to measure: every real row, or `max_rows` of them evenly spaced."""
    rows = real if real is not None else torch.arange(n_rows, device=device)
    if len(rows) > max_rows:
        pick = torch.linspace(0, len(rows) - 1, max_rows, device=device).round().long().unique()
        rows = rows[pick]
    return rows


@torch.no_grad()
def exact_attention_stats(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    outputs: dict[str, torch.Tensor],
    *,
    key_valid: torch.Tensor | None = None,
    block_keep: torch.Tensor | None = None,
    block_size: tuple[int, int] = (64, 64),
    rows: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, Any]:
    """Exact softmax attention on these q/k/v over chunks of query `rows`, compared with `outputs`
    (name -> [B, H, S, D]) and with the kept blocks `block_keep` ([B|1, H|1, n_q, n_kv] at
    `block_size`; None = everything kept). Keys where `key_valid` ([S] bool) is False get no weight.

    Returns {"rel_l2": {name: overall}, "rel_l2_per_head": {name: [H]}, "kept_mass_min": [H],
    "kept_mass_mean": [H], "rows": count}; rel L2 = ||out - exact|| / ||exact|| over the rows."""
    b, h, s, d = q_BHSD.shape
    dev = q_BHSD.device
    cd = compute_dtype or (torch.float64 if dev.type == "cpu" else torch.float32)
    rows = torch.arange(s, device=dev) if rows is None else rows.to(dev)
    k, v = k_BHSD.to(cd), v_BHSD.to(cd)
    scale = 1.0 / math.sqrt(d)
    err = {name: torch.zeros(b, h, dtype=torch.float64, device=dev) for name in outputs}
    ref_sq = torch.zeros(b, h, dtype=torch.float64, device=dev)
    mass_min = torch.full((b, h), math.inf, dtype=torch.float64, device=dev)
    mass_sum = torch.zeros(b, h, dtype=torch.float64, device=dev)
    itemsize = torch.empty((), dtype=cd).element_size()
    chunk = max(1, chunk_bytes // (3 * b * h * s * itemsize))  # scores, probabilities, a temporary
    bq, bk = block_size
    for start in range(0, len(rows), chunk):
        idx = rows[start : start + chunk]
        scores = torch.matmul(q_BHSD[:, :, idx].to(cd), k.transpose(-1, -2)) * scale  # [B, H, c, S]
        if key_valid is not None:
            scores.masked_fill_(~key_valid.to(dev), -math.inf)
        p = torch.softmax(scores, dim=-1)
        del scores
        exact = torch.matmul(p, v)
        ref_sq += exact.double().square().sum((-1, -2))
        for name, out in outputs.items():
            err[name] += (out[:, :, idx].to(cd) - exact).double().square().sum((-1, -2))
        if block_keep is None:
            kept = torch.ones(b, h, len(idx), dtype=torch.float64, device=dev)
        else:
            n_kv = block_keep.shape[-1]
            per_block = F.pad(p, (0, n_kv * bk - s)).view(b, h, len(idx), n_kv, bk).sum(-1)
            kept = (per_block * block_keep[:, :, idx // bq, :]).sum(-1).double()  # [B, H, c]
        mass_min = torch.minimum(mass_min, kept.amin(-1))
        mass_sum += kept.sum(-1)
    norm = ref_sq.sum(0).clamp_min(1e-300)
    return {
        "rel_l2": {name: math.sqrt(float(e.sum() / ref_sq.sum().clamp_min(1e-300))) for name, e in err.items()},
        "rel_l2_per_head": {name: (e.sum(0) / norm).sqrt().tolist() for name, e in err.items()},
        "kept_mass_min": mass_min.amin(0).tolist(),
        "kept_mass_mean": (mass_sum.sum(0) / (b * len(rows))).tolist(),
        "rows": int(len(rows)),
    }


def coarse_kept_mass(
    q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, layout: TileLayout, keep: torch.Tensor
) -> dict[str, list[float]]:
    """P-mass of the kept tiles on NABLA's coarse map, per head: min and mean over query tiles
    (and batch items). `keep` is [B|1, H|1, n, n] or [n, n] bool."""
    p = masks.coarse_map(q_BHSD, k_BHSD, layout).double()
    kept = (p * keep.to(p.device)).sum(-1)  # [B, H, n]
    return {"min": kept.amin((0, 2)).tolist(), "mean": kept.mean((0, 2)).tolist()}


def frame_major(layout: TileLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n] permutation: position i of the frame-major order (t, i, j) holds layout tile perm[i]."""
    t, i, j = layout.tile_coords(device).unbind(-1)
    rank = (t * layout.tiles_h + i) * layout.tiles_w + j
    return torch.argsort(rank)


@dataclass
class CallRecord:
    """The close look at one sampled attention call."""

    step: int
    layer: int
    dense: bool
    """Dense attention ran (type full, a dense step or a dense layer): everything is kept."""
    batch: int
    heads: list[int]
    """The sampled heads, in the order of `tile_masks`."""
    density: float | None = None
    """Kept share of the kernel's (query block, key block) pairs, all heads and batch items."""
    tile_density: float | None = None
    """Kept share of (query tile, key tile) pairs before any coarsening, all heads and items."""
    tiles_per_frame: int | None = None
    tile_masks: np.ndarray | None = None
    """[len(heads), n, n] bool, frame-major tile order, batch item 0; None without a tile layout."""
    coarse_mass_min: list[float] | None = None
    """Per head (all heads): min over query tiles of the coarse-map mass of the kept tiles."""
    coarse_mass_mean: list[float] | None = None
    exact: dict[str, Any] | None = None
    """exact_attention_stats of the call (outputs 'sparse' = the call's own, 'dense_kernel')."""

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "tile_masks"}
        return d


class AttentionProbe(Observer):
    """Watches a run's attention calls; see module doc. Use as a context manager or call close()."""

    def __init__(
        self,
        run,
        sampling: Sampling,
        *,
        exact: bool = False,
        max_query_rows: int = DEFAULT_MAX_QUERY_ROWS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        self.run = run
        self.sampling = sampling
        self.exact = exact
        self.max_query_rows = max_query_rows
        self.chunk_bytes = chunk_bytes
        self.records: list[CallRecord] = []
        self.probe_s: dict[int, float] = defaultdict(float)
        self._densities: dict[tuple[int, int], list] = defaultdict(list)
        self._seen: set[tuple[int, int]] = set()
        run.stats.subscribe(self)

    def close(self) -> None:
        self.run.stats.unsubscribe(self)

    def __enter__(self) -> AttentionProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the observer ------------------------------------------------------------------------
    def attend_finished(self, call: AttentionCall) -> None:
        q_BHSD, k_BHSD, v_BHSD, out = call.q, call.k, call.v, call.out
        step, layer, plan = call.step, call.layer, call.plan
        self._densities[(step, layer)].append(plan.density if plan is not None else 1.0)
        if step in self.sampling.steps and layer in self.sampling.layers and (step, layer) not in self._seen:
            self._seen.add((step, layer))
            dev = q_BHSD.device
            sync_device(dev)
            t0 = time.perf_counter()
            self.records.append(self._measure(q_BHSD, k_BHSD, v_BHSD, out, layer, step, plan))
            sync_device(dev)
            self.probe_s[step] += time.perf_counter() - t0

    @torch.no_grad()
    def _measure(self, q, k, v, out, layer: int, step: int, plan) -> CallRecord:
        run, layout = self.run, self.run.layout
        b, h, s, _ = q.shape
        dense = plan is None
        rec = CallRecord(
            step=step,
            layer=layer,
            dense=dense,
            batch=b,
            heads=list(self.sampling.heads),
            density=1.0 if dense else float(plan.density),
        )
        heads = torch.tensor(self.sampling.heads, device=q.device)
        if layout is not None:
            if dense:
                keep = torch.ones(layout.n_tiles, layout.n_tiles, dtype=torch.bool, device=q.device)
            else:
                keep = masks.tile_keep_mask(run.config, q, k, layout)
                cm = coarse_kept_mass(q, k, layout, keep)
                rec.coarse_mass_min, rec.coarse_mass_mean = cm["min"], cm["mean"]
            keep4 = keep.expand(b, h, layout.n_tiles, layout.n_tiles) if keep.dim() == 2 else keep
            rec.tile_density = float(keep4.float().mean())
            order = frame_major(layout, q.device)
            picked = keep4[0].index_select(0, heads)[:, order][:, :, order]
            rec.tile_masks = picked.cpu().numpy()
            rec.tiles_per_frame = layout.tiles_h * layout.tiles_w
        if self.exact:
            rec.exact = self._exact(q, k, v, out, layout, plan)
        return rec

    def _exact(self, q, k, v, out, layout: TileLayout | None, plan) -> dict[str, Any]:
        s = q.shape[2]
        if layout is not None and layout.needs_padding:
            real = layout.real_token_index(q.device)
            key_valid = layout.valid(q.device)
            dense_out = dense_attention(q, k.index_select(2, real), v.index_select(2, real))
        else:
            real = key_valid = None
            dense_out = dense_attention(q, k, v)
        rows = sample_rows(s, self.max_query_rows, q.device, real)
        keep = None if plan is None else plan_block_keep(plan)
        stats = exact_attention_stats(
            q,
            k,
            v,
            {"sparse": out, "dense_kernel": dense_out},
            key_valid=key_valid,
            block_keep=keep,
            block_size=plan.block_size if plan is not None else (64, 64),
            rows=rows,
            chunk_bytes=self.chunk_bytes,
        )
        stats["compute_dtype"] = "float64" if q.device.type == "cpu" else "float32"
        stats["rows_of"] = int(len(real) if real is not None else s)
        return stats

    # ---- summaries ---------------------------------------------------------------------------
    def density_table(self, layers: int, steps: int) -> list[list[float | None]]:
        """[layer][step] mean kept-block density of the calls seen (None: no call). Reads the
        recorded device tensors in one copy."""
        keys = sorted(self._densities)
        flat = [d for key in keys for d in self._densities[key]]
        tensors = [d for d in flat if isinstance(d, torch.Tensor)]
        host = iter(torch.stack([t.float().reshape(()) for t in tensors]).tolist()) if tensors else iter(())
        table: list[list[float | None]] = [[None] * steps for _ in range(layers)]
        for key in keys:
            vals = [next(host) if isinstance(d, torch.Tensor) else float(d) for d in self._densities[key]]
            step, layer = key
            if layer < layers and step < steps:
                table[layer][step] = sum(vals) / len(vals)
        return table

    def step_probe_s(self, steps: int) -> list[float]:
        return [self.probe_s.get(i, 0.0) for i in range(steps)]
