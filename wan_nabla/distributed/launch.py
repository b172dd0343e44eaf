"""What torchrun started, and whether the requested parallel layout fits it: checked before any
process group or model exists, so a bad combination is one line and exit 2 on every rank.

    launch = Launch.from_env()           # RANK / WORLD_SIZE / LOCAL_RANK; (0, 1, 0) outside torchrun
    layout = plan_ranks(cfg.parallel, launch.world_size, command="generate", heads=40,
                        guidance_scale=5.0)               # ConfigError: one line naming the problem
    layout.roles(launch.rank)            # Roles(group=0, branch=1, ulysses_rank=0, ...)
    device = rank_device("auto", launch) # context.py: cuda:LOCAL_RANK under torchrun (needs torch)
    plan = ParallelPlan(launch, layout, device, timeout_s=3600)   # what ParallelContext.start takes

Rank layout. A *group* of `ulysses_degree x (2 if cfg_parallel else 1)` consecutive ranks makes
one video: ranks [0, U) run the conditional pass (branch 0), ranks [U, 2U) the unconditional one
(branch 1), each branch split over U ranks by Ulysses sequence parallelism; rank u of branch 0
and rank u of branch 1 form a CFG pair. `generate` needs exactly one group (world size = group
size); `batch` takes world size / group size groups, each generating its own items.

Every check here is a pure function of the command line, the config, the environment and the
model's head count, so all ranks reach the same verdict without talking to each other.
Limits: one node's ranks are assumed (LOCAL_RANK picks the GPU); the head count of a hub model
that is not cached yet is unknown here and is checked when the transformer is patched instead
(still identically on every rank).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..attention.config import check_heads_split
from ..config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class Launch:
    """The process's place in the torchrun job (environment variables torchrun sets)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Launch:
        env = os.environ if env is None else env
        try:
            rank = int(env.get("RANK", "0"))
            world = int(env.get("WORLD_SIZE", "1"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise ConfigError(
                f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun), got "
                f"{env.get('RANK')!r}/{env.get('WORLD_SIZE')!r}/{env.get('LOCAL_RANK')!r}"
            ) from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ConfigError(
                f"RANK {rank} / WORLD_SIZE {world} / LOCAL_RANK {local} are inconsistent; launch with torchrun"
            )
        return cls(rank, world, local)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class Roles:
    """One rank's jobs in a RankLayout."""

    group: int
    """Which video group (data-parallel index) the rank belongs to."""
    group_rank: int
    """Position inside its group, 0 = the group's leader (decodes, writes files and records)."""
    branch: int
    """0: conditional pass, 1: unconditional pass (always 0 without cfg_parallel)."""
    ulysses_rank: int
    """Position inside its Ulysses group (which token shard and which heads it holds)."""

    @property
    def leader(self) -> bool:
        return self.group_rank == 0


@dataclass(frozen=True)
class RankLayout:
    world_size: int
    ulysses: int
    cfg: int
    """2 with cfg_parallel, else 1."""

    @property
    def group_size(self) -> int:
        return self.ulysses * self.cfg

    @property
    def groups(self) -> int:
        return self.world_size // self.group_size

    def roles(self, rank: int) -> Roles:
        pos = rank % self.group_size
        return Roles(
            group=rank // self.group_size, group_rank=pos, branch=pos // self.ulysses, ulysses_rank=pos % self.ulysses
        )

    def group_ranks(self, group: int) -> list[int]:
        base = group * self.group_size
        return list(range(base, base + self.group_size))

    def ulysses_ranks(self, group: int, branch: int) -> list[int]:
        base = group * self.group_size + branch * self.ulysses
        return list(range(base, base + self.ulysses))

    def cfg_ranks(self, group: int, ulysses_rank: int) -> list[int]:
        base = group * self.group_size + ulysses_rank
        return [base + b * self.ulysses for b in range(self.cfg)]

    def describe(self) -> dict:
        return {
            "world_size": self.world_size,
            "ulysses_degree": self.ulysses,
            "cfg_parallel": self.cfg == 2,
            "group_size": self.group_size,
            "data_parallel_groups": self.groups,
        }


@dataclass(frozen=True)
class ParallelPlan:
    """Everything checked before a process group exists: who this rank is and what it will do."""

    launch: Launch
    layout: RankLayout
    device: Any
    """A torch.device (context.rank_device); this module stays free of torch for preflight."""
    timeout_s: float

    @property
    def rank(self) -> int:
        return self.launch.rank


def _flags(p: ParallelConfig) -> str:
    return f"--ulysses-degree {p.ulysses_degree}" + (" --cfg-parallel" if p.cfg_parallel else "")


def plan_ranks(
    parallel: ParallelConfig, world_size: int, *, command: str, heads: int | None, guidance_scale: float
) -> RankLayout:
    """The rank layout for `command` ('generate' or 'batch'), or ConfigError naming what does not fit."""
    g = parallel.group_size
    if command == "generate" and world_size != g:
        hint = (
            f"launch with torchrun --nproc-per-node {g}"
            if world_size < g or world_size % g
            else f"use `batch` for {world_size // g} videos at once, or a larger --ulysses-degree"
        )
        raise ConfigError(
            f"parallel: {_flags(parallel)} runs one video on {g} rank(s), but this run has "
            f"{world_size} (WORLD_SIZE); {hint}"
        )
    if command == "batch" and world_size % g:
        raise ConfigError(
            f"parallel: {world_size} ranks (WORLD_SIZE) cannot form groups of {g} ({_flags(parallel)}); "
            f"use a world size that is a multiple of {g}"
        )
    check_heads_split(parallel.ulysses_degree, heads)
    if parallel.cfg_parallel and guidance_scale <= 1.0:
        raise ConfigError(
            f"parallel.cfg_parallel: needs classifier-free guidance, but guidance_scale is "
            f"{guidance_scale:g} (<= 1 turns it off); drop --cfg-parallel or raise --guidance-scale"
        )
    return RankLayout(world_size, parallel.ulysses_degree, 2 if parallel.cfg_parallel else 1)
