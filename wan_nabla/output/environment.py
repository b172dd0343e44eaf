"""The environment record: the software and hardware a result was made with.

    env = environment("cuda:0")     # versions, commit, device: in every sidecar, report and benchmark

One record for the product and the lab: sidecars (publish.py), compare reports and the benchmark
harness all carry it. Needs torch, diffusers and transformers (their versions), nothing else of
the package's heavy side (no video encoding), so the benchmark jobs can import it on a bare GPU
image.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import diffusers
import torch
import transformers

from .. import __version__
from .sidecar import git_commit


def _dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(device: Any = None) -> dict[str, Any]:
    """The software and hardware a result was made with: the record every sidecar, compare report
    and benchmark result carries (benchmarks add their command line and start time to it).

    Versions of the package, Python, torch, diffusers, transformers, Triton, CUDA, cuDNN and the
    FA4 distributions and Ray (None when absent), the git commit (git_commit), and `gpu`: the CUDA device's
    name, if any. With a `device` (torch.device or str) also `device`, `device_name` (the GPU's
    name, else the CPU's) and for a CUDA device its SM count, memory and compute capability."""
    env: dict[str, Any] = {
        "wan_nabla": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "commit": git_commit(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        env["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001 - informational only; a broken cuDNN must not stop a run
        env["cudnn"] = None
    env["flash_attn_4"] = _dist_version("flash-attn-4")
    env["nvidia_cutlass_dsl"] = _dist_version("nvidia-cutlass-dsl")
    env["ray"] = _dist_version("ray")  # --engine ray (looked up, not imported)
    if device is not None:
        device = torch.device(device)
        env.update(device=str(device), device_name=platform.processor() or platform.machine())
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            env.update(
                device_name=props.name,
                sm_count=props.multi_processor_count,
                memory_gb=round(props.total_memory / 2**30, 1),
                capability=list(torch.cuda.get_device_capability(device)),
            )
    return env
