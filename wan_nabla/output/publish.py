"""Publishing a video: the MP4 and its sidecar written as one step.

    record = publish_video(gen, result, prompt, Path("outputs/fox.mp4"))   # fox.mp4 + fox.json

What the sidecar holds, its name and the overwrite rules are sidecar.py's (light: preflight checks
a destination without torch); the versions it records are environment.py's.
"""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any

from . import files as wio
from . import video
from .environment import environment
from .sidecar import SINGLE_PROCESS, prompt_record, sidecar_path


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
