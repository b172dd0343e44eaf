"""The JSON record written next to every video, and the environment it names.

    check_destination(Path("outputs/fox.mp4"), overwrite=False)           # OutputError if taken
    record = publish_video(gen, result, prompt, Path("outputs/fox.mp4"))   # fox.mp4 + fox.json

`sidecar_path("fox.mp4")` is "fox.json". The record holds everything needed to reproduce and
judge the video: prompt, the negative prompt actually encoded (Wan's default when none was
given), the schedule actually run (sampler, shift, sigmas, timesteps), seed, model id, the device it ran on, where the DiT
weights came from (path, key naming, size / mtime / sha256 of each file: checkpoint.py), the fully
resolved config (file values with CLI overrides applied), the video's measured properties,
timings (load, text encoding, denoising with per-step times, decode, write, peak GPU memory per
phase), attention density per step and overall (the mean over all ranks of a parallel run), the
speed levers (compile mode and time, step-cache skips, merged LoRAs with their sha256), the
parallel layout that made it (world size, Ulysses degree, CFG parallel, the ranks of its group;
one process: world size 1), and the package, torch, diffusers, transformers, CUDA and GPU
versions with the git commit of the code when it runs from a checkout (or WAN_NABLA_COMMIT).

Overwriting: `check_destination` refuses an existing MP4 or sidecar unless `overwrite`, and even
then refuses a `<name>.json` that is not this MP4's sidecar (not a JSON object naming a file
called `<name>.mp4` in its "output"): an unrelated file that merely shares the stem is never
replaced.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

SINGLE_PROCESS = {
    "world_size": 1,
    "ulysses_degree": 1,
    "cfg_parallel": False,
    "group_size": 1,
    "data_parallel_groups": 1,
}


def sidecar_path(video_path: str | Path) -> Path:
    return Path(video_path).with_suffix(".json")


def sidecar_output(path: Path) -> str | None:
    """The "output" a sidecar JSON names, or None (missing, unreadable, not a sidecar)."""
    try:
        if not path.is_file() or path.stat().st_size > 2**22:  # a sidecar is a few KB
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        out = data.get("output") if isinstance(data, dict) else None
        return out if isinstance(out, str) else None
    except (OSError, ValueError):
        return None


def check_destination(output: Path, overwrite: bool) -> None:
    """OutputError unless publishing `output` replaces nothing by surprise (see module doc)."""
    from .files import OutputError

    side = sidecar_path(output)
    taken = [p for p in (output, side) if os.path.lexists(p)]
    if not taken:
        return
    if not overwrite:
        names = " and ".join(repr(str(p)) for p in taken)
        raise OutputError(
            f"--output: {names} already exist{'s' if len(taken) == 1 else ''}; "
            "give another --output, or --overwrite to replace the video and its sidecar"
        )
    if os.path.lexists(side):
        owner = sidecar_output(side)
        if owner is None or Path(owner).name != output.name:
            raise OutputError(
                f"--output: {str(side)!r} exists and is not the sidecar of {str(output)!r}; "
                "it is never replaced, even with --overwrite: move it or give another --output"
            )


def git_commit(root: Path | None = None) -> str | None:
    """WAN_NABLA_COMMIT, else the commit checked out at `root` (default: this package's checkout),
    read from .git without running git (plain checkouts and worktrees); None outside a checkout."""
    env = os.environ.get("WAN_NABLA_COMMIT")
    if env and env != "unknown":
        return env
    root = Path(__file__).resolve().parents[2] if root is None else root
    try:
        git = root / ".git"
        if git.is_file():  # a worktree: "gitdir: <path>"
            line = git.read_text().strip()
            git = (root / line[len("gitdir:") :].strip()) if line.startswith("gitdir:") else git
        common = git / "commondir"
        common = (git / common.read_text().strip()).resolve() if common.is_file() else git
        ref = (git / "HEAD").read_text().strip()
        if not ref.startswith("ref: "):
            return ref or None
        name = ref[5:]
        for base in (git, common):
            if (base / name).is_file():
                return (base / name).read_text().strip()
        packed = common / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else []:
            if line.endswith(" " + name):
                return line.split()[0]
    except OSError:
        pass
    return None


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

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
    import diffusers
    import torch
    import transformers

    from .. import __version__

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


SIDECAR_PROMPT_CHARS = 4096
"""Prompts are stored whole up to this length (UMT5 reads 512 tokens, about 2,000 characters of
English); a longer one is cut here and identified by `prompt_sha256` of the full text."""


def prompt_record(prompt: str) -> dict[str, Any]:
    """The sidecar's prompt fields: the text (bounded), its length and the sha256 of the full text."""
    record: dict[str, Any] = {
        "prompt": prompt[:SIDECAR_PROMPT_CHARS],
        "prompt_chars": len(prompt),
        "prompt_sha256": hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest(),
    }
    if len(prompt) > SIDECAR_PROMPT_CHARS:
        record["prompt_truncated"] = True
    return record


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
    from . import files as wio
    from . import video

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
