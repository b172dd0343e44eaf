"""Ulysses sequence parallelism that keeps every attention mask exact.

    sp = SequenceParallel(group, size=2, rank=r)      # made by ParallelContext
    sp.set_sequence(total=80640, unit=64)            # once per forward: tile-ordered, 64-token tiles
    x_loc = sp.shard(x_BSC, dim=1)                   # this rank's contiguous chunk of whole tiles
    q_BHSD, k_BHSD, v_BHSD = sp.scatter_heads(q_BSHD, k_BSHD, v_BSHD)   # all tokens, heads/size heads
    out_BHSD = sp.gather_heads(attention(q_BHSD, k_BHSD, v_BHSD))       # local tokens, all heads
    y_BSC = sp.gather(y_loc, dim=1)                  # every rank gets the whole sequence back

Algorithm. Outside self-attention every operation of a Wan block acts on each token alone (norms,
modulation by the per-video timestep, cross-attention to the global text keys, FFN), so each of
the U ranks keeps a contiguous chunk of the sequence. Self-attention needs all tokens: one
all-to-all turns q/k/v [B, S_loc, H, D] into [B, S, H/U, D] (rank r holds heads
[r H/U, (r+1) H/U), all tokens in sequence order), the attention runs exactly as on one GPU for
those heads, and a second all-to-all brings [B, S, H/U, D] back to [B, S_loc, H, D]. NABLA masks
are built per batch item and head from that head's own pooled q/k, and STA and padding masks
depend only on the token grid, so every head gets the mask it gets on one GPU: the sparse result
is identical, not an approximation (published NABLA falls back to dense attention here).

Shards are whole units (64-token tiles in tile order, single tokens in raster order): unit counts
differ by at most one between ranks, and all_to_all_single takes the uneven split sizes. q, k and v
travel in one collective each way.

Timing: with an enabled CommTimer every collective is bracketed by CUDA events (host clocks on
the CPU) and `timer.seconds()` returns their total since the last call (benchmarks report it
separately); ParallelContext shares one timer between this and the CFG exchange.
Limits: the group must be one Ulysses group of a ParallelContext; inference only (no autograd).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist


def all_gather_equal(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    # torch >= 2.13 renames all_gather_into_tensor (deprecated there) to all_gather_single.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


class SequenceParallel:
    """Token sharding and the two all-to-alls around self-attention for one Ulysses group."""

    def __init__(self, group, size: int, rank: int, timer: CommTimer | None = None):
        self.group = group
        self.size = size
        self.rank = rank
        self.timer = timer or CommTimer()
        self.sizes: list[int] | None = None
        """Tokens per rank for the current forward (set_sequence)."""
        self.start = 0

    # ---- shards ------------------------------------------------------------------------
    def set_sequence(self, total: int, unit: int) -> None:
        """Split `total` tokens (a multiple of `unit`) into contiguous chunks of whole units."""
        if total % unit:
            raise ValueError(f"sequence of {total} tokens is not a whole number of {unit}-token units")
        base, extra = divmod(total // unit, self.size)
        self.sizes = [(base + (r < extra)) * unit for r in range(self.size)]
        self.start = sum(self.sizes[: self.rank])

    @property
    def local_len(self) -> int:
        return self._sizes()[self.rank]

    def _sizes(self) -> list[int]:
        if self.sizes is None:
            raise RuntimeError("SequenceParallel.set_sequence was not called for this forward")
        return self.sizes

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's chunk of the full sequence along `dim`."""
        return x.narrow(dim, self.start, self.local_len)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The full sequence from every rank's chunk (along `dim`), on every rank."""
        sizes = self._sizes()
        longest = max(sizes)
        x = x.movedim(dim, 0)
        if x.shape[0] < longest:  # equal sizes for the collective; the pad rows are dropped again
            x = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
        out = x.new_empty(self.size * longest, *x.shape[1:])
        with self.timer.timed(x.device):
            all_gather_equal(out, x.contiguous(), self.group)
        parts = [out[r * longest : r * longest + n] for r, n in enumerate(sizes)]
        return torch.cat(parts).movedim(0, dim)

    # ---- heads <-> tokens --------------------------------------------------------------
    def scatter_heads(self, q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor):
        """Local tokens, all heads -> all tokens, this rank's heads: three [B, H/U, S, D] tensors."""
        sizes = self._sizes()
        b, s_loc, h, d = q_BSHD.shape
        if h % self.size:
            raise ValueError(f"{h} heads cannot be split over {self.size} ranks")
        hl = h // self.size
        send = q_BSHD.new_empty(self.size, s_loc, 3, b, hl, d)  # chunk r (heads of rank r) first: dim 0
        for i, t in enumerate((q_BSHD, k_BSHD, v_BSHD)):  # one copy each, straight into the send buffer
            send[:, :, i] = t.unflatten(2, (self.size, hl)).permute(2, 1, 0, 3, 4)
        send = send.view(self.size * s_loc, 3 * b * hl * d)
        recv = send.new_empty(sum(sizes), 3 * b * hl * d)
        with self.timer.timed(send.device):
            dist.all_to_all_single(
                recv, send, output_split_sizes=sizes, input_split_sizes=[s_loc] * self.size, group=self.group
            )
        q, k, v = recv.view(-1, 3, b, hl, d).permute(1, 2, 3, 0, 4).unbind(0)  # [B, H/U, S, D] each
        return q, k, v

    def gather_heads(self, out_BHSD: torch.Tensor) -> torch.Tensor:
        """All tokens, this rank's heads -> local tokens, all heads: [B, H, S_loc, D]."""
        sizes = self._sizes()
        b, hl, s, d = out_BHSD.shape
        s_loc = sizes[self.rank]
        send = out_BHSD.permute(2, 0, 1, 3).reshape(s, b * hl * d)
        recv = send.new_empty(self.size * s_loc, b * hl * d)
        with self.timer.timed(send.device):
            dist.all_to_all_single(
                recv, send, output_split_sizes=[s_loc] * self.size, input_split_sizes=sizes, group=self.group
            )
        # [U, S_loc, B, H/U, D] -> [B, U * H/U, S_loc, D]: head blocks back in rank order
        return recv.view(self.size, s_loc, b, hl, d).permute(2, 0, 3, 1, 4).reshape(b, self.size * hl, s_loc, d)


class CommTimer:
    """Total time of the collectives run inside `timed(device)` while `enabled` (off by default):
    CUDA events on CUDA (no sync until seconds()), host clocks on the CPU."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self._events: list = []
        self._host_s = 0.0

    @contextlib.contextmanager
    def timed(self, device: torch.device) -> Iterator[None]:
        if not self.enabled:
            yield
        elif device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._host_s += time.perf_counter() - t0

    def seconds(self) -> float:
        """Seconds in timed collectives since the last call (waits for the recorded CUDA events)."""
        total = self._host_s
        for start, end in self._events:
            end.synchronize()
            total += start.elapsed_time(end) / 1e3
        self._events.clear()
        self._host_s = 0.0
        return total
