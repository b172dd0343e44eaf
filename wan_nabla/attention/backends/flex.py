"""The flex backend: compiled FlexAttention for sparse calls, SDPA for dense ones. Runs anywhere.

Limits: no backward through a sparse call (inference only; backends/__init__.py refuses one);
head_dim <= 256 (FlexAttention); block sizes 64 or 128 tokens per side; eager flex is never used
(on the CPU it silently ignores BlockMask block tables), so the first call of each shape compiles.

    out_BHSD = sparse_attention(q_BHSD, k_BHSD, v_BHSD, block_mask)    # compiled flex
    out_BHSD = dense_attention(q_BHSD, k_BHSD, v_BHSD)                 # SDPA, cuDNN first

`sparse_attention` holds one `torch.compile(flex_attention, dynamic=False)` for the process: it
compiles once per shape (and device), and never again for new masks, steps, prompts or seeds,
because masks enter as BlockMask tensors and the mask_mod closure is cached per layout.

`dense_attention` is SDPA with cuDNN first on CUDA (the fastest dense SDPA kernel measured on
H100, docs/design.md), then flash, memory-efficient and math. On the CPU SDPA picks its own kernel.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

_CUDA_DENSE_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


@functools.cache
def compiled_flex():
    """The process-wide compiled flex_attention (created on first use; functools.cache holds a
    lock-free single instance, read only outside any traced graph)."""
    # Each distinct shape is one compiled graph; test suites and benchmarks visit many.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


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
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    block_mask: BlockMask,
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
