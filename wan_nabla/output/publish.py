"""Publishing a video: the MP4 and its sidecar written as one step, and the environment record.

    record = publish_video(gen, result, prompt, Path("outputs/fox.mp4"))   # fox.mp4 + fox.json
    env = environment("cuda:0")     # versions, commit, device: in every sidecar, report and benchmark

What the sidecar holds, its name and the overwrite rules are sidecar.py's (light: preflight checks
a destination without torch); this module needs torch, diffusers and transformers for the
versions it records, so only the runners import it.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

from .. import __version__
from . import files as wio
from . import video
from .sidecar import SINGLE_PROCESS, git_commit, prompt_record, sidecar_path


def _dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(device: Any = None) -> dict[str, Any]:
    """The software and hardware a result was made with: the record every sidecar, compare report
    and benchmark result carries (benchmarks add their command line and start time to it).

    Versions of the package, Python, torch, diffusers, transformers, Triton, CUDA, cuDNN and the
    FA4 distributions (None when absent), the git commit (git_commit), and `gpu`: the CUDA device's
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


def sidecar_record(
    *,
    prompt: str,
    result,
    config,
    model_id: str,
    output: Path,
    video: dict,
    load_s: float,
    write_s: float,
    transformer: dict[str, Any] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The sidecar dict for one generated video (`result` is a pipeline.GenerationResult)."""
    resolved = config.to_dict()
    resolved["generation"] = result.settings
    timings = {"load_s": load_s, **result.timings, "write_s": write_s}
    return {
        **prompt_record(prompt),
        "negative_prompt": result.settings.get("negative_prompt", ""),
        "schedule": getattr(result, "schedule", None) or None,
        "seed": result.seed,
        "model": model_id,
        "transformer": transformer,
        "device": device,
        "output": str(output),
        "video": video,
        "config": resolved,
        "timings": timings,
        "attention": result.attention,
        "speed": result.speed,
        "parallel": result.parallel or SINGLE_PROCESS,
        "versions": environment(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def publish_video(gen, result, prompt: str, output: Path, extra: dict[str, Any] | None = None) -> dict:
    """Write the MP4 and its sidecar (plus `extra` entries) as one atomic step: the video is encoded
    into a temp file beside `output`, checked (decoded frame count), the sidecar is written
    atomically while the MP4 is still a temp file, then the MP4 is renamed into place; if that
    fails the sidecar is removed again, so neither exists without the other."""
    output = Path(output)
    side = sidecar_path(output)
    t0 = time.perf_counter()
    try:
        with wio.atomic_output(output) as tmp:
            video.write_mp4(result.frames, tmp, fps=result.settings["fps"], crf=result.settings.get("crf", 18))
            info = video.probe_mp4(tmp)
            if info["frames"] != len(result.frames):
                raise RuntimeError(f"encoded {info['frames']} frames, expected {len(result.frames)}")
            record = sidecar_record(
                prompt=prompt,
                result=result,
                config=gen.config,
                model_id=gen.model_id,
                output=output,
                video=info,
                load_s=gen.load_s,
                write_s=time.perf_counter() - t0,
                transformer=getattr(gen, "transformer_source", None),
                device=str(gen.device),
            )
            record.update(extra or {})
            wio.atomic_write_json(side, record)
    except BaseException:
        if side.exists() and not output.exists():
            side.unlink()
        raise
    return record
