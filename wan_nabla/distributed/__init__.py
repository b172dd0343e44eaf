"""Several GPUs under torchrun: Ulysses sequence parallelism that keeps sparse masks exact, CFG
parallelism, and the process groups behind data-parallel batches. Nothing here imports diffusers;
adapter.py installs the sharding hooks, pipeline.py and batch/ call the collectives.

    torchrun --nproc-per-node 2 -m wan_nabla generate --ulysses-degree 2 ...
    launch.py   what torchrun started; the layout check (one line, exit 2 on every rank)
    context.py  process groups, roles, CFG exchange, agreements between ranks
    ulysses.py  token shards and the all-to-alls around self-attention

Importing the package is light (launch.py, pure): preflight checks layouts without torch.
ParallelContext, SequenceParallel and rank_device need torch; import them from context.py /
ulysses.py (they are also reachable here by name, loaded on first access).
"""

from __future__ import annotations

from typing import Any

from .launch import Launch, ParallelPlan, RankLayout, Roles, plan_ranks

_HEAVY = {"ParallelContext": "context", "rank_device": "context", "SequenceParallel": "ulysses"}


def __getattr__(name: str) -> Any:
    if name in _HEAVY:
        import importlib

        return getattr(importlib.import_module(f".{_HEAVY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Launch",
    "ParallelContext",
    "ParallelPlan",
    "RankLayout",
    "Roles",
    "SequenceParallel",
    "plan_ranks",
    "rank_device",
]
