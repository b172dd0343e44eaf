"""FP8 linear layers for the DiT blocks (`speed.quantize: fp8`, `--quantize fp8`) through torchao.

    reason = fp8_unsupported(torch.device("cuda"))      # None, or why this device cannot run FP8
    names = fp8_targets(pipe.transformer)               # ["blocks.0.attn1.to_q", ...] (what would change)
    record = quantize_transformer(pipe.transformer, "fp8", torch.device("cuda"))
    record["linear_modules"], record["per_block"]       # 400 and the 10 names of one block (14B)

What changes: every nn.Linear inside the repeated transformer blocks (self-attention q/k/v/out,
cross-attention q/k/v/out, the FFN's two projections) becomes torchao's float8 inference layer:
weights stored as float8 e4m3 with one scale per output channel, activations quantised on the
fly with one scale per token (Float8DynamicActivationFloat8WeightConfig, granularity PerRow), the
GEMM a `torch._scaled_mm` on FP8 tensor cores. Under compiled blocks TorchInductor fuses the
activation quantisation (amax, scale, cast) into the kernels that produce the activation; eager,
those are separate kernels that cost more than the FP8 GEMM saves (measured on an H200:
docs/speed_levers.md), so fp8 is meant to run with `--compile blocks`. What stays as it was:
patch embedding, time/text embedders, every norm, the modulation tables and the output head (they
are small, precision-sensitive, or not nn.Linear), and any Linear whose in/out features are not
multiples of 16 (the FP8 GEMM's alignment rule; listed in the record as `skipped`).

Order (pipeline.VideoGenerator): attention processors, LoRAs fused into the bf16 weights, THEN
quantisation (a LoRA delta is merged at full precision and rounded once), then memory placement
(diffusers' group offloading moves torchao tensors with swap_tensors, so FP8 weights halve what
it moves), then compiled blocks. Blocks are quantised one at a time on the run's device and put
back where they were, so a transformer held on the CPU for offloading never has to fit on the
GPU at once. Ulysses / CFG parallel are unaffected: each rank quantises its own copy, and token
shards only change the GEMMs' row count.

Refusals (one line, exit code 2 in the CLI, before anything is loaded): fp8 on the CPU, on a
CUDA GPU below compute capability 8.9 (FP8 tensor cores start with Ada / Hopper), or without
torchao installed (`pip install "wan-nabla[fp8]"`). A run is never silently bf16 while labelled
fp8: the sidecar's speed.quantize records what ran (mode, library version, modules, count).

Limits: inference only; the quantisation is permanent for the loaded pipeline (load again for
bf16; a second generator on the same pipeline finds the layers converted and counts them as
`already_quantized`); FP8 changes outputs (relative L2 of a 14B step output ~1e-2 on random weights): judge it on
trained weights with `wan-nabla compare`.
"""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

QUANTIZE_MODES = ("none", "fp8")
FP8_MIN_CAPABILITY = (8, 9)
FP8_ALIGN = 16
"""torch._scaled_mm needs both GEMM dimensions of the weight divisible by 16."""
TORCHAO_HINT = 'pip install "wan-nabla[fp8]" (torchao >= 0.18)'


def torchao_version() -> str | None:
    """The installed torchao version, or None (not imported until needed: it is optional)."""
    try:
        return version("torchao")
    except PackageNotFoundError:
        return None


def fp8_unsupported(device: torch.device | str, capability: tuple[int, int] | None = None) -> str | None:
    """Why `device` cannot run FP8 linears (one line), or None when it can. `capability` overrides
    the CUDA device's compute capability (tests)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    if device.type != "cuda":
        return (
            f"FP8 linear layers need an NVIDIA GPU with compute capability >= "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} (Ada, Hopper, Blackwell); this run is on the "
            f"{device.type.upper()}"
        )
    cap = capability or torch.cuda.get_device_capability(device)
    if tuple(cap) < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device) if capability is None else "this GPU"
        return (
            f"{name} has compute capability {cap[0]}.{cap[1]}; FP8 linear layers need >= "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} (Ada, Hopper, Blackwell)"
        )
    if torchao_version() is None:
        return f"torchao is not installed; {TORCHAO_HINT}"
    return None


def _blocks(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the repeated transformer blocks (diffusers' `_repeated_blocks`)."""
    kinds = tuple(getattr(transformer, "_repeated_blocks", ()) or ())
    blocks = [(n, m) for n, m in transformer.named_modules() if type(m).__name__ in kinds]
    if not blocks:
        raise RuntimeError(f"unsupported diffusers version: no repeated blocks {kinds} in the transformer")
    return blocks


def _eligible(module: torch.nn.Module) -> bool:
    return (
        isinstance(module, torch.nn.Linear)
        and module.in_features % FP8_ALIGN == 0
        and module.out_features % FP8_ALIGN == 0
    )


def fp8_targets(transformer: torch.nn.Module) -> list[str]:
    """Names (relative to the transformer) of the Linear layers fp8 quantises (module doc)."""
    return [f"{bn}.{n}" for bn, block in _blocks(transformer) for n, m in block.named_modules() if _eligible(m)]


def fp8_skipped(transformer: torch.nn.Module) -> list[str]:
    """Linear layers inside the blocks that stay unquantised because of the alignment rule."""
    return [
        f"{bn}.{n}"
        for bn, block in _blocks(transformer)
        for n, m in block.named_modules()
        if isinstance(m, torch.nn.Linear) and not _eligible(m)
    ]


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether a Linear's weight is already a torchao quantised tensor (it carries `qdata`)."""
    return getattr(getattr(module, "weight", None), "qdata", None) is not None


def _torchao_fp8(block: torch.nn.Module) -> None:
    """torchao's float8 inference conversion of the eligible, not yet converted Linears of one block."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(
        block,
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        filter_fn=lambda m, _name: _eligible(m) and not is_quantized(m),
    )


def quantize_transformer(transformer: torch.nn.Module, mode: str, device: torch.device | str) -> dict[str, Any]:
    """Quantise the transformer's block Linears in place (module doc); returns the sidecar record.
    mode "none" changes nothing. Raises ValueError for an unknown mode, RuntimeError where
    fp8_unsupported(device) says why."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize mode {mode!r} is not allowed; use one of {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return {"mode": "none"}
    device = torch.device(device)
    why = fp8_unsupported(device)
    if why is not None:
        raise RuntimeError(f"--quantize fp8: {why}")
    names, skipped = fp8_targets(transformer), fp8_skipped(transformer)
    mods = dict(transformer.named_modules())
    already = sum(is_quantized(mods[n]) for n in names)
    t0 = time.perf_counter()
    blocks = _blocks(transformer)
    for _, block in blocks:
        home = next(block.parameters()).device
        block.to(device)  # amax and cast on the GPU: seconds instead of minutes for 14B on the CPU
        _torchao_fp8(block)
        block.to(home)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = blocks[0][0] + "."
    return {
        "mode": "fp8",
        "library": f"torchao {torchao_version()}",
        "scheme": "float8 e4m3 weights (per output channel) x dynamic float8 e4m3 activations (per token)",
        "linear_modules": len(names),
        "blocks": len(blocks),
        "per_block": [n[len(first) :] for n in names if n.startswith(first)],
        "skipped": skipped,
        "already_quantized": already,
        "seconds": time.perf_counter() - t0,
    }
