"""The one place that chooses the attention kernels: backend, block geometry, fallback.

    backend = select(config, torch.device("cuda"), torch.bfloat16)   # logs its choice once
    backend.name, backend.geometry          # "fa4" | "flex", Geometry((128, 64), True, "fast", ...)
    out_BHSD = backend.sparse(q_BHSD, k_BHSD, v_BHSD, plan)      # plan: masks.BlockPlan
    out_BHSD = backend.dense(q_BHSD, k_BHSD, v_BHSD)             # K/V may be shorter than Q

Backends (config `attention.backend`): `flex` (flex.py: compiled FlexAttention for sparse calls,
SDPA for dense ones; any device) and `fa4` (fa4.py: flash-attn-4's CuTe kernels, sm90-sm110);
`auto` takes fa4 where it is installed and the GPU supports it, else flex. The CPU always runs
flex. A missing or broken flash-attn-4, or inputs it cannot take (fp32, odd head dims), give flex
and one log line per distinct reason (`log_choice`), never an error. If fa4 fails on the first
call of a configuration, the Backend logs why once and runs flex for that call and the rest of
its run (`Backend.fall_back`): the block plan stays as it is, since flex runs every geometry.

Geometry (config `attention.geometry`): `exact` is the 64x64 tile mask in plain tile order, the
pairs NABLA / STA define and no others. `fast` is the backend's measured fastest geometry on CUDA
(`FAST`, each entry citing its measurement); on the CPU fast is exact. An explicit
`attention.block_size` / `time_pairs` overrides fast.
Limits: inference only (neither backend's wrapper has a backward: a sparse call with inputs
that require grad is refused); the geometry is fixed per (config, device), not per call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..config import ATTENTION_BACKENDS, AttentionConfig
from ..layout import TILE_TOKENS
from . import fa4, flex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Geometry:
    """Kernel blocks (query tokens, key tokens) and tile order of a run."""

    block_size: tuple[int, int]
    time_pairs: bool
    name: str
    """fast | exact (config `attention.geometry`)."""
    source: str
    """Why these blocks: the measurement behind a fast entry, or the rule."""

    def record(self) -> dict:
        """What the sidecar records: {"geometry", "block_size", "time_pairs"}."""
        return {"geometry": self.name, "block_size": list(self.block_size), "time_pairs": self.time_pairs}


# Per backend, on CUDA, at equal NABLA threshold / STA window on H100 at 14B heads, 1280x720x81.
# flex: 128-token query blocks (two time-paired tiles) over 64-token key blocks; 128x128 runs a
# kept block faster but OR-coarsening keys too kept so many more blocks that it lost at every
# threshold. fa4: by total time including the mask build, 128x64 time-paired was fastest too
# (128x128 is FA4's native SM90 tile and runs a random-mask block faster, docs/design.md, but
# keeps more blocks).
FAST = {
    "flex": Geometry((128, 64), True, "fast", "benchmarks/results/h100_pairs.md (flex, H100)"),
    "fa4": Geometry(
        (128, 64),
        True,
        "fast",
        "benchmarks/results/h100_fa4_probe.json (NABLA 0.2/0.4 and STA, "
        "total time incl. mask: 128x64 time-paired fastest, H100)",
    ),
}
EXACT = Geometry((TILE_TOKENS, TILE_TOKENS), False, "exact", "the 64x64 tile mask, no coarsening")


def geometry(config: AttentionConfig, backend: str, device: torch.device) -> Geometry:
    """The block geometry of `config` on `device` for `backend` (module doc)."""
    if config.geometry == "exact":
        return EXACT
    base = FAST[backend] if device.type == "cuda" else EXACT
    if config.block_size is None and config.time_pairs is None:
        return base
    block = config.block_size or base.block_size
    if config.time_pairs is not None:
        pairs = config.time_pairs
    else:
        pairs = base.time_pairs if config.block_size is None else block[0] == 2 * TILE_TOKENS
    return Geometry((int(block[0]), int(block[1])), pairs, "fast", "attention.block_size / time_pairs")


def default_block_size(device: torch.device, backend: str = "flex") -> tuple[int, int]:
    """The block size of the default config (geometry fast) for `backend` on `device`."""
    return geometry(AttentionConfig(), backend, torch.device(device)).block_size


# ---- the choice ---------------------------------------------------------------------------------
_logged: set = set()


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, str]:
    """(backend to run, one-line reason). Never raises for a missing or broken flash-attn-4."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"backend {requested!r} is not allowed; use one of {', '.join(ATTENTION_BACKENDS)}")
    if requested == "flex":
        return "flex", "attention.backend is flex"
    if device.type != "cuda":
        return "flex", "the CPU always runs flex"
    ok, why = fa4.available(device)
    if ok and dtype is not None and dtype not in fa4.DTYPES:
        ok, why = False, f"dtype {dtype} (flash-attn-4 runs bfloat16 and float16)"
    return ("fa4" if ok else "flex"), why


def log_choice(requested: str, backend: str, why: str) -> None:
    """One log line per distinct (requested, chosen, reason) in the process. Asking for fa4 and
    getting flex is a warning; auto's choice is info."""
    key = (requested, backend, why)
    if key in _logged:
        return
    _logged.add(key)
    level = logging.WARNING if requested == "fa4" and backend != "fa4" else logging.INFO
    log.log(level, "attention backend: %s (requested %s; %s)", backend, requested, why)


def select(
    config: AttentionConfig, device: torch.device, dtype: torch.dtype | None = None, kernel_options: dict | None = None
) -> Backend:
    """The backend and geometry of `config` on (device, dtype), its choice logged once."""
    name, why = resolve_backend(config.backend, torch.device(device), dtype)
    log_choice(config.backend, name, why)
    return Backend(config.backend, name, why, geometry(config, name, torch.device(device)), kernel_options)


@dataclass(eq=False)
class Backend:
    """One run's kernels on one (device, dtype): `sparse` and `dense` calls, and the fallback."""

    requested: str
    name: str
    """fa4 or flex; fa4 becomes flex for good after a first-call failure."""
    why: str
    geometry: Geometry
    kernel_options: dict | None = None
    """Extra FlexAttention kernel options (flex only)."""
    fallback: str | None = None
    """Why flash-attn-4 was given up (None: it was not)."""
    used: set = field(default_factory=set)
    """Kernels that ran: {"fa4", "flex"}."""

    def kernel_for(self, q_BHSD: torch.Tensor) -> str:
        """The backend of one call: this one's, unless FA4 cannot take these inputs (head_dim)."""
        if self.name == "fa4":
            why = fa4.unsupported(q_BHSD)
            if why is not None:
                log_choice(self.requested, "flex", why)
                return "flex"
        return self.name

    def fall_back(self, reason: str) -> None:
        self.fallback, self.name = reason, "flex"
        log_choice(self.requested, "flex", f"flash-attn-4 failed, flex from now on: {reason}")

    def _call(self, q_BHSD: torch.Tensor, run_fa4, run_flex) -> torch.Tensor:
        if self.kernel_for(q_BHSD) == "fa4":
            try:
                out = run_fa4()
                self.used.add("fa4")
                return out
            except fa4.FA4Error as e:
                self.fall_back(str(e))
        self.used.add("flex")
        return run_flex()

    def sparse(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, plan) -> torch.Tensor:
        """Block-sparse attention over `plan` (masks.BlockPlan), pad keys masked."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHSD, k_BHSD, v_BHSD)):
            raise RuntimeError(
                "wan-nabla's sparse attention is inference-only (no backward); run under "
                "torch.no_grad() / torch.inference_mode(), or use attention type full to train"
            )
        return self._call(
            q_BHSD,
            lambda: fa4.sparse_attention(q_BHSD, k_BHSD, v_BHSD, plan),
            lambda: flex.sparse_attention(q_BHSD, k_BHSD, v_BHSD, plan.block_mask(), self.kernel_options),
        )

    def dense(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> torch.Tensor:
        """Dense attention (no mask); K/V may hold fewer tokens than Q (pads gathered out)."""
        return self._call(
            q_BHSD,
            lambda: fa4.dense_attention(q_BHSD, k_BHSD, v_BHSD),
            lambda: flex.dense_attention(q_BHSD, k_BHSD, v_BHSD),
        )
