"""The fa4 backend: flash-attn-4's CuTe DSL kernels for sparse and dense calls, sm90-sm110 GPUs only.

Limits: CUDA sm90-sm110 (on sm80/sm120 FA4 ignores block tables); bf16/fp16; head_dim a multiple
of 8 in [8, 256]; no backward (inference only); the first call of each compile configuration
JITs for seconds. Anything outside these limits runs flex instead (backends/__init__.py).

    ok, why = available(torch.device("cuda"))   # (True, "flash-attn-4 4.0.0b36 on NVIDIA H100 ... (sm90)")
    out_BHSD = sparse_attention(q_BHSD, k_BHSD, v_BHSD, plan)    # plan: masks.BlockPlan
    out_BHSD = dense_attention(q_BHSD, k_BHSD, v_BHSD)          # K/V may be shorter than Q

Block sparsity: a BlockPlan's lists are FA4's `BlockSparseTensorsTorch` one to one (kv_* ->
mask_*, full_* -> full_*, block_size = the plan's (bq, bkv)): FA4 evaluates its mask_mod only on
the "mask" (partial) blocks, which is where the plan puts every key block holding a pad token,
and runs "full" blocks unmasked. The mask_mod (`fa4_mask.key_valid_mask`, one module-level CuTe
function so FA4 compiles it once) reads `validity(layout)`, int32 [S_pad rounded up to 128], as
FA4's aux tensor: pad keys score -inf and get exactly zero weight. The block reaching past the end
of the sequence (odd tile counts with 128-token key blocks) is always a partial block, and it is
safe twice over: FA4 walks a list from its last entry down and bounds-checks only the first block
it processes, which ascending rows make that block; and the validity vector is 0 up to the next
multiple of 128, so the mask_mod hides those keys even unchecked (docs/design.md).
Dense attention is FA4 without block tables; the caller gathers real keys first (attention/run.py).

Robustness: `load()` imports FA4 lazily (the CUTLASS DSL import takes seconds) and turns any
failure into a reason string; `available()` also refuses GPUs other than sm90-sm110 (on sm80 and
sm120, FA4 ignores block tables and silently computes dense attention). The first call of each
compile configuration (kind, dtype, head_dim, blocks, broadcast pattern) raises `FA4Error` on any
failure so the caller can fall back to flex; later calls are not wrapped. JIT results are cached
per process (FA4's disk cache is on with FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import torch

from ..layout import TileLayout

SUPPORTED_MAJORS = (9, 10, 11)
"""Compute capability majors whose FA4 forward honours block-sparse tables."""
DTYPES = (torch.bfloat16, torch.float16)


class FA4Error(RuntimeError):
    """flash-attn-4 failed on the first call of a configuration (the caller falls back to flex)."""


@dataclass(frozen=True)
class FA4Kernels:
    """What wan-nabla uses of flash-attn-4 (tests substitute a torch imitation)."""

    flash_attn_func: Callable[..., Any]
    block_sparse_tensors: Callable[..., Any]
    """flash_attn.cute.block_sparsity.BlockSparseTensorsTorch."""
    key_valid_mask: Callable[..., Any]
    version: str


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


@functools.lru_cache(maxsize=1)
def load() -> tuple[FA4Kernels | None, str]:
    """(kernels, description) or (None, why not): never raises."""
    try:
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        from .fa4_mask import key_valid_mask
    except Exception as e:  # noqa: BLE001 - ImportError, a missing CUDA library, a DSL error: all mean "not usable"
        return None, one_line(e)
    try:
        ver = version("flash-attn-4")
    except Exception:  # noqa: BLE001 - installed without metadata (PYTHONPATH copy)
        ver = "unknown version"
    return FA4Kernels(flash_attn_func, BlockSparseTensorsTorch, key_valid_mask, ver), f"flash-attn-4 {ver}"


def available(device: torch.device | str) -> tuple[bool, str]:
    """Whether FA4 can serve attention on `device`, and a one-line reason either way."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"{device.type} device (flash-attn-4 needs a CUDA GPU)"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in SUPPORTED_MAJORS:
        return False, (
            f"sm{major}{minor} GPU: flash-attn-4 block sparsity needs sm90-sm110 "
            "(on sm80/sm120 it ignores block tables)"
        )
    fa, why = load()
    if fa is None:
        return False, f"flash-attn-4 not usable: {why}"
    return True, f"flash-attn-4 {fa.version} on {torch.cuda.get_device_name(device)} (sm{major}{minor})"


def unsupported(q_BHSD: torch.Tensor) -> str | None:
    """Why FA4 cannot run these inputs (None: it can)."""
    if q_BHSD.dtype not in DTYPES:
        return f"dtype {q_BHSD.dtype} (flash-attn-4 runs bfloat16 and float16)"
    d = q_BHSD.shape[-1]
    if d % 8 or not 8 <= d <= 256:
        return f"head_dim {d} (flash-attn-4 needs a multiple of 8 in [8, 256])"
    return None


# ---- the conversion (pure torch: tested on the CPU) -----------------------------------------------
def block_sparse_args(plan) -> dict[str, Any]:
    """BlockPlan -> keyword arguments of BlockSparseTensorsTorch (1:1; int32, last dim contiguous)."""
    tensors = {
        "mask_block_cnt": plan.kv_num,
        "mask_block_idx": plan.kv_idx,
        "full_block_cnt": plan.full_num,
        "full_block_idx": plan.full_idx,
    }
    for name, t in tensors.items():
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 for flash-attn-4, got {t.dtype}")
    out: dict[str, Any] = {name: t.contiguous() for name, t in tensors.items()}
    out["block_size"] = (int(plan.block_size[0]), int(plan.block_size[1]))
    return out


def validity(layout: TileLayout, device: torch.device | str) -> torch.Tensor:
    """int32 [S_pad rounded up to 128]: 1 for real tokens, 0 for pads (the mask_mod's aux tensor)."""
    return _validity(layout, torch.device(device))


@functools.lru_cache(maxsize=64)
def _validity(layout: TileLayout, device: torch.device) -> torch.Tensor:
    return layout.valid_padded(device).to(torch.int32).contiguous()


# ---- the calls --------------------------------------------------------------------------------
_verified: set = set()
_lock = threading.Lock()


def _kernels() -> FA4Kernels:
    fa, why = load()
    if fa is None:
        raise FA4Error(f"flash-attn-4 not usable: {why}")
    return fa


def _guarded(key: tuple, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run fn; on the first call of `key` any failure but out-of-memory becomes FA4Error."""
    if key in _verified:
        return fn()
    try:
        out = fn()
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken install or an unsupported shape: fall back to flex
        raise FA4Error(
            f"flash-attn-4 {key[0]} attention failed on its first call "
            f"({key[1]}, head_dim {key[2]}, blocks {key[3]}): {one_line(e)}"
        ) from e
    with _lock:
        _verified.add(key)
    return out


def sparse_attention(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, plan) -> torch.Tensor:
    """Block-sparse attention over `plan` (a masks.BlockPlan on q's device), pad keys masked."""
    fa = _kernels()
    args = block_sparse_args(plan)
    valid = validity(plan.layout, q_BHSD.device)
    q, k, v = (t.transpose(1, 2) for t in (q_BHSD, k_BHSD, v_BHSD))  # [B, S, H, D] views
    key = ("sparse", q.dtype, q.shape[-1], args["block_size"], tuple(plan.kv_num.shape[:2]) == (1, 1), q_BHSD.device)

    def call():
        out, _ = fa.flash_attn_func(
            q,
            k,
            v,
            mask_mod=fa.key_valid_mask,
            aux_tensors=[valid],
            block_sparse_tensors=fa.block_sparse_tensors(**args),
        )
        return out

    return _guarded(key, call).transpose(1, 2)


def dense_attention(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> torch.Tensor:
    """Dense attention (no mask); K/V may hold fewer tokens than Q (real keys gathered)."""
    fa = _kernels()
    q, k, v = (t.transpose(1, 2) for t in (q_BHSD, k_BHSD, v_BHSD))
    key = ("dense", q.dtype, q.shape[-1], None, False, q_BHSD.device)
    return _guarded(key, lambda: fa.flash_attn_func(q, k, v)[0]).transpose(1, 2)
