"""One rank's process groups and roles, and the few collectives the app needs besides Ulysses.

    ctx = ParallelContext.start(plan)    # a launch.ParallelPlan: init_process_group + groups
    sp = ctx.sequence_parallel()         # SequenceParallel over this rank's Ulysses group, or None
    cond, uncond = ctx.exchange_cfg(noise_mine)       # CFG parallel: both branches' predictions
    ctx.item_mean(densities)             # statistics averaged over the ranks of one video
    err = ctx.agree(my_error, scope="item")          # the first error of any rank in the scope, or None
    ctx.broadcast(obj, scope="world")    # rank 0's object on every rank (scope "item": the leader's)
    ctx.close()                          # destroy_process_group

Backends: NCCL for CUDA tensors, gloo on the CPU. Control messages (errors, plans, claims, the
end-of-batch barrier) always go through gloo groups, so a rank that waits for another one's VAE
decode or file write waits on the CPU and not under NCCL's watchdog. Every group has the
configured timeout (parallel.timeout_s): a rank that never arrives fails the run instead of
hanging it, and torchrun stops the other ranks.

Groups (see launch.RankLayout): `item` = the ranks of one video, `ulysses` = the ranks that split
one branch's tokens, `cfg` = the pair (cond rank u, uncond rank u). All ranks create every group
in the same order, as torch.distributed requires; groups of one rank are not created.
Limits: CPU tensors through gloo, CUDA tensors through NCCL; no other backends.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..pipeline import resolve_device
from .launch import Launch, ParallelPlan, RankLayout
from .ulysses import CommTimer, SequenceParallel, all_gather_equal

log = logging.getLogger(__name__)


class ParallelContext:
    """Process groups, roles and collectives of one rank (see module doc)."""

    def __init__(
        self,
        launch: Launch,
        layout: RankLayout,
        device: torch.device,
        backend: str,
        groups: dict[str, Any],
        timeout_s: float,
    ):
        self.launch = launch
        self.timeout_s = timeout_s
        self.layout = layout
        self.device = device
        self.backend = backend
        self.roles = layout.roles(launch.rank)
        self._groups = groups
        self._sp: SequenceParallel | None = None
        self.timer = CommTimer()
        """Times the data-plane collectives (all-to-alls, gathers, CFG exchange) when enabled."""

    @classmethod
    def start(cls, plan: ParallelPlan) -> ParallelContext:
        """Join the job's process group (created on first use) and make this layout's groups."""
        launch, layout, device, timeout_s = plan.launch, plan.layout, plan.device, plan.timeout_s
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            kwargs["device_id"] = device
        if not dist.is_initialized():
            dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, timeout=timeout, **kwargs)
        groups = _make_groups(layout, launch.rank, backend, timeout)
        return cls(launch, layout, device, backend, groups, timeout_s)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- roles -------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one that owns a batch's output directory."""
        return self.launch.rank == 0

    @property
    def is_leader(self) -> bool:
        """First rank of its video group: decodes, writes the video and its records."""
        return self.roles.leader

    @property
    def cfg_parallel(self) -> bool:
        return self.layout.cfg == 2

    @property
    def branch(self) -> int:
        return self.roles.branch

    def describe(self) -> dict[str, Any]:
        """The parallel layout as recorded in sidecars."""
        return {
            **self.layout.describe(),
            "backend": self.backend,
            "group": self.roles.group,
            "ranks": self.layout.group_ranks(self.roles.group),
        }

    def item_group(self):
        """The process group of this video's ranks (None when the video has one rank)."""
        return self._groups.get("item")

    def item_ranks(self) -> list[int]:
        """Global ranks of this video's group, leader first."""
        return self.layout.group_ranks(self.roles.group)

    # ---- data-plane collectives ----------------------------------------------------------
    def sequence_parallel(self) -> SequenceParallel | None:
        if self.layout.ulysses == 1:
            return None
        if self._sp is None:
            self._sp = SequenceParallel(
                self._groups["ulysses"], self.layout.ulysses, self.roles.ulysses_rank, self.timer
            )
        return self._sp

    def exchange_cfg(self, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) predictions from this rank's branch prediction and its CFG partner's."""
        both = mine.new_empty(2, *mine.shape)
        with self.timer.timed(mine.device):
            all_gather_equal(both, mine.contiguous()[None], self._groups["cfg"])
        return both[0], both[1]

    def item_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of `t` over the ranks of this video (each holds an equal share of heads/branches)."""
        group = self._groups.get("item")
        if group is None:
            return t
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t / self.layout.group_size

    def check_in_sync(self, t: torch.Tensor, what: str) -> None:
        """Raise if `t` differs between the ranks of this video (they must step identically)."""
        group = self._groups.get("item")
        if group is None:
            return
        d = t.detach().double()
        mine = torch.stack(
            [
                d.sum(),
                d.abs().sum(),
                (d * torch.arange(d.numel(), device=d.device, dtype=torch.float64).view(d.shape)).sum(),
            ]
        )
        allv = mine.new_empty(self.layout.group_size, 3)
        all_gather_equal(allv, mine[None], group)
        if not bool((allv == allv[0]).all()):
            raise RuntimeError(
                f"{what} differ between the ranks of one video (checksums {allv.tolist()}); the ranks diverged"
            )

    # ---- control messages (gloo) -------------------------------------------------------
    def _ctrl(self, scope: str):
        if scope not in ("item", "world"):
            raise ValueError(f"scope must be 'item' or 'world', got {scope!r}")
        return self._groups["ctrl_" + scope]

    def _size(self, scope: str) -> int:
        return self.layout.group_size if scope == "item" else self.layout.world_size

    def agree(self, error: Any, scope: str = "world") -> Any:
        """Every rank of `scope` passes its error (or None); all get the lowest rank's error, or None."""
        if self._size(scope) == 1:
            return error
        errors: list[Any] = [None] * self._size(scope)
        dist.all_gather_object(errors, error, group=self._ctrl(scope))
        return next((e for e in errors if e is not None), None)

    def broadcast(self, obj: Any, scope: str = "world") -> Any:
        """`obj` of the scope's first rank (rank 0 / the group leader), on every rank of the scope."""
        if self._size(scope) == 1:
            return obj
        src = 0 if scope == "world" else self.layout.group_ranks(self.roles.group)[0]
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self._ctrl(scope))
        return box[0]

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (a list in rank order); None on the others."""
        out = [None] * self.layout.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._ctrl("world"))
        return out

    def barrier(self, scope: str = "world") -> None:
        if self._size(scope) > 1:
            dist.barrier(group=self._ctrl(scope))


def _make_groups(layout: RankLayout, rank: int, backend: str, timeout: datetime.timedelta) -> dict[str, Any]:
    """Every group of the layout, created in the same order on every rank; this rank's are kept."""

    def new(ranks: list[int], gloo: bool = False):
        return dist.new_group(ranks, timeout=timeout, backend="gloo" if gloo else None)

    mine: dict[str, Any] = {
        "ctrl_world": new(list(range(layout.world_size)), gloo=True) if backend != "gloo" else dist.group.WORLD
    }
    roles = layout.roles(rank)
    for g in range(layout.groups):
        if layout.group_size > 1:
            ranks = layout.group_ranks(g)
            item = new(ranks)
            ctrl = new(ranks, gloo=True) if backend != "gloo" else item
            if g == roles.group:
                mine["item"], mine["ctrl_item"] = item, ctrl
        if layout.ulysses > 1:
            for b in range(layout.cfg):
                group = new(layout.ulysses_ranks(g, b))
                if g == roles.group and b == roles.branch:
                    mine["ulysses"] = group
        if layout.cfg > 1:
            for u in range(layout.ulysses):
                group = new(layout.cfg_ranks(g, u))
                if g == roles.group and u == roles.ulysses_rank:
                    mine["cfg"] = group
    return mine


def rank_device(name: str, launch: Launch) -> torch.device:
    """The device of this rank: under torchrun 'auto' and 'cuda' mean cuda:LOCAL_RANK (a fixed
    'cuda:N' would put every rank on one GPU, so it is refused); 'cpu' is the CPU (gloo)."""
    if not launch.distributed:
        try:
            return resolve_device(name)
        except ValueError as e:
            raise ConfigError(f"--device: {e}") from None
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda:"):
        raise ConfigError(
            f"--device: {name!r} under torchrun would put every rank on one GPU; use cuda or auto "
            f"(rank i uses cuda:LOCAL_RANK)"
        )
    if not torch.cuda.is_available():
        if name == "cuda":
            raise ConfigError("--device: 'cuda' requested but CUDA is not available; use --device cpu or auto")
        return torch.device("cpu")
    if launch.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK {launch.local_rank} but only {torch.cuda.device_count()} CUDA device(s); "
            f"use --nproc-per-node <= {torch.cuda.device_count()}"
        )
    return torch.device("cuda", launch.local_rank)
