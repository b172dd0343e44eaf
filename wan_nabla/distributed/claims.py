"""A shared counter that hands work items to groups of ranks one at a time (dynamic balancing).

    claims = WorkClaims(ctx)          # every rank; rank 0 serves a TCPStore, group leaders connect
    while (k := claims.next()) < len(pending):   # all ranks of a group get the same k
        ...                                       # the group works on pending[k]
        claims.count("ok")            # leaders count outcomes
    claims.total("ok")                # rank 0: the counts of all groups

Each group's leader takes the next index with one atomic `add` on a TCPStore that rank 0 hosts
(on a free port, told to the others over the control group) and passes it to the rest of its
group, so every item is claimed exactly once, and a group that finishes a short item takes the
next one instead of waiting for a fixed share. The store lives as long as this object; rank 0
must outlive the other leaders' last claim (run_batch ends with a barrier).

Limits: the store address is MASTER_ADDR (torchrun sets it; 127.0.0.1 otherwise); counts live in
memory only (a resumed batch re-plans from the manifest, not from these counters).
"""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist


class WorkClaims:
    def __init__(self, ctx, prefix: str = "wan_nabla/claims"):
        self.ctx = ctx
        self.prefix = prefix
        timeout = datetime.timedelta(seconds=ctx.timeout_s)
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        self.store = None
        if ctx.is_main:
            self.store = dist.TCPStore(host, 0, None, True, timeout, wait_for_workers=False)
        port = ctx.broadcast(self.store.port if self.store is not None else None)
        if ctx.is_leader and self.store is None:
            self.store = dist.TCPStore(host, port, None, False, timeout)

    def next(self) -> int:
        """The next item index for this rank's group (the same on all its ranks)."""
        k = self.store.add(f"{self.prefix}/next", 1) - 1 if self.ctx.is_leader else None
        return self.ctx.broadcast(k, scope="item")

    def count(self, name: str, n: int = 1) -> int:
        """Add `n` to a shared counter (leaders); returns the new total."""
        return self.store.add(f"{self.prefix}/{name}", n)

    def total(self, name: str) -> int:
        return self.store.add(f"{self.prefix}/{name}", 0)
