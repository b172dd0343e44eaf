"""The attention kernels wan-nabla calls, and the choice between its two backends.

    backend, why = resolve_backend("auto", torch.device("cuda"), torch.bfloat16)   # "fa4" or "flex"
    geometry = default_geometry(backend, device)      # Geometry(block_size=(128, 128), time_pairs=True)
    out_BHSD = sparse_attention(q_BHSD, k_BHSD, v_BHSD, block_mask)    # compiled flex
    out_BHSD = dense_attention(q_BHSD, k_BHSD, v_BHSD)                 # SDPA, cuDNN first

Backends (config `attention.backend`): `flex` is compiled FlexAttention for sparse calls and SDPA
for dense ones; `fa4` is flash-attn-4's CuTe kernels for both (fa4.py); `auto` takes fa4 where it
is installed and the GPU supports it, else flex. The CPU always runs flex. A missing or broken
flash-attn-4, or inputs it cannot take (fp32, odd head dims), give flex and one log line per
distinct reason (`log_choice`), never an error. Each backend has its own default block geometry
(`GEOMETRY`, from measurements cited there).

`sparse_attention` holds one `torch.compile(flex_attention, dynamic=False)` for the process: it
compiles once per shape (and device), and never again for new masks, steps, prompts or seeds,
because masks enter as BlockMask tensors and the mask_mod closure is cached per layout.
Eager flex is never used: on the CPU it silently ignores BlockMask block tables.

`dense_attention` is SDPA with cuDNN first on CUDA (the fastest dense SDPA kernel measured on
H100, docs/design.md), then flash, memory-efficient and math. On the CPU SDPA picks its own kernel.

Limits: no backward (inference only); head_dim must be one FlexAttention supports (<= 256).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..config import ATTENTION_BACKENDS
from . import fa4

log = logging.getLogger(__name__)

_lock = threading.Lock()
_compiled_flex = None
_CUDA_DENSE_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def compiled_flex():
    """The process-wide compiled flex_attention (created on first use)."""
    global _compiled_flex
    with _lock:
        if _compiled_flex is None:
            # Each distinct shape is one compiled graph; test suites and benchmarks visit many.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex


@dataclass(frozen=True)
class Geometry:
    """Kernel blocks (query tokens, key tokens) and tile order when the config leaves them open."""

    block_size: tuple[int, int]
    time_pairs: bool
    source: str
    """Where the choice comes from (a results file, or why it is provisional)."""


# Per backend, on CUDA. flex: 128-token query blocks (two time-paired tiles) over 64-token key
# blocks, the fastest at equal NABLA threshold / STA window on H100 at 14B heads, 1280x720x81:
# 128x128 runs a kept block faster but OR-coarsening keys too kept so many more blocks that it
# lost at every threshold (benchmarks/NOTES.md, benchmarks/results/h100_pairs.md). fa4: 128x128
# is FA4's native SM90 tile and its best-covered block-sparse path (a 128x64 kernel runs on a
# 64-wide key tile); it ran a random-mask block at 89-103% of dense cuDNN against 81-88% for
# 128x64 (docs/design.md). PROVISIONAL until `benchmarks/jobs/gpu_fa4.sh` measures both geometries by
# total time at equal threshold (benchmarks/harness/geometry.py prints the winner). The CPU keeps the exact
# 64x64 tile mask.
GEOMETRY = {
    "flex": Geometry((128, 64), True, "benchmarks/results/h100_pairs.md (flex, H100)"),
    "fa4": Geometry((128, 64), True, "benchmarks/results/h100_fa4_probe.json (NABLA 0.2/0.4 and STA at "
                                     "equal threshold, total time incl. mask: 128x64 time-paired fastest, H100)"),
}
CPU_GEOMETRY = Geometry((64, 64), False, "exact tile mask")


def default_geometry(backend: str, device: torch.device) -> Geometry:
    if device.type != "cuda":
        return CPU_GEOMETRY
    return GEOMETRY[backend]


def default_block_size(device: torch.device, backend: str = "flex") -> tuple[int, int]:
    return default_geometry(backend, device).block_size


# ---- backend choice -------------------------------------------------------------------------------
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


def _hopper_or_newer(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def flex_kernel_options(device: torch.device, block_size: tuple[int, int]) -> dict | None:
    """Kernel tiles equal to the mask blocks: on CUDA the default tiles need not divide a 64-token
    block, which fails to compile (docs/design.md). On Hopper and newer, TMA loads (10-15% faster on H100;
    flex turns them off by itself where a tensor does not qualify)."""
    if device.type == "cuda":
        opts = {"BLOCK_M": block_size[0], "BLOCK_N": block_size[1]}
        if _hopper_or_newer(device):
            opts["USE_TMA"] = True
        return opts
    return None


def sparse_attention(
    q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, block_mask: BlockMask,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Compiled flex over `block_mask`; kernel_options extend the geometry-derived defaults."""
    opts = flex_kernel_options(q_BHSD.device, block_mask.BLOCK_SIZE)
    if kernel_options:
        opts = {**(opts or {}), **kernel_options}
    return compiled_flex()(q_BHSD, k_BHSD, v_BHSD, block_mask=block_mask, kernel_options=opts)


def _dense_context(device: torch.device):
    if device.type == "cuda":
        return sdpa_kernel(_CUDA_DENSE_ORDER, set_priority=True)
    return contextlib.nullcontext()


def dense_attention(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> torch.Tensor:
    with _dense_context(q_BHSD.device):
        return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD)
