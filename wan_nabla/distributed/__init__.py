"""Several GPUs under torchrun: Ulysses sequence parallelism that keeps sparse masks exact, CFG
parallelism, and the process groups behind data-parallel batches. Nothing here imports diffusers;
adapter.py installs the sharding hooks, pipeline.py and batch/ call the collectives.

    torchrun --nproc-per-node 2 -m wan_nabla generate --ulysses-degree 2 ...
    launch.py   what torchrun started; the layout check (one line, exit 2 on every rank)
    context.py  process groups, roles, CFG exchange, agreements between ranks
    ulysses.py  token shards and the all-to-alls around self-attention
"""

from .context import ParallelContext
from .launch import Launch, ParallelPlan, RankLayout, Roles, plan_ranks, rank_device
from .ulysses import SequenceParallel

__all__ = ["Launch", "ParallelContext", "ParallelPlan", "RankLayout", "Roles", "SequenceParallel", "plan_ranks", "rank_device"]
