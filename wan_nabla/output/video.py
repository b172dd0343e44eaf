"""Write and check H.264 MP4 videos with the ffmpeg binary that imageio-ffmpeg ships.

    write_mp4(frames, tmp_path, fps=16)             # frames: [T, H, W, 3], float in [0, 1] or uint8
    probe_mp4("outputs/fox.mp4")                    # {'frames': 81, 'width': 832, 'height': 480,
                                                    #  'codec': 'h264', 'fps': 16.0}
    is_complete_mp4("outputs/fox.mp4", 81)          # True; never raises

Output: libx264, yuv420p, CRF 18 by default, `+faststart` (index up front, so browsers can stream
it): exactly T frames at exactly H x W, no resizing. `write_mp4` writes exactly the path it is
given; publishing atomically is the caller's job (publish.publish_video writes into a temp path
from files.atomic_output and renames it together with the sidecar).
Limits: yuv420p needs even H and W, so odd sizes are refused rather than silently padded. Non-finite
float frames are refused too (a NaN from the model would otherwise become a black video).
No audio. probe/is_complete decode the whole file: cheap for generated clips, slow for films.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np

_FRAME_LINE = re.compile(rb"^frame=(\d+)\s*$", re.MULTILINE)


def to_uint8_frames(frames: Any) -> np.ndarray:
    """[T, H, W, 3] uint8 (C-contiguous) from a float array in [0, 1] (clipped) or a uint8 array."""
    if hasattr(frames, "detach"):  # a torch tensor, without importing torch here
        frames = frames.detach().cpu().float().numpy()
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must have shape [T, H, W, 3], got {list(arr.shape)}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"frames must be float in [0, 1] or uint8, got dtype {arr.dtype}")
        if not np.isfinite(arr).all():
            raise ValueError("frames contain NaN or infinity; refusing to encode them as black pixels")
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(arr)


def write_mp4(frames: Any, path: str | Path, fps: float = 16, crf: int = 18, preset: str = "medium") -> Path:
    """Encode frames to an H.264 MP4 at exactly `path` (not atomic: see module doc). Returns the path."""
    arr = to_uint8_frames(frames)
    t, h, w, _ = arr.shape
    if t < 1:
        raise ValueError("frames must contain at least one frame")
    if h < 2 or w < 2 or h % 2 or w % 2:
        raise ValueError(f"frame height and width must be even and >= 2 for yuv420p, got {w}x{h}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if not 0 <= int(crf) <= 51:
        raise ValueError(f"crf must be in [0, 51], got {crf!r}")
    path = Path(path)
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (w, h),
        fps=fps,
        codec="libx264",
        pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p",
        quality=None,  # rate control comes from -crf below; imageio's quality maps poorly to x264
        macro_block_size=1,  # never rescale: the caller asked for exactly H x W
        ffmpeg_log_level="error",
        output_params=["-crf", str(int(crf)), "-preset", preset, "-movflags", "+faststart"],
    )
    writer.send(None)
    try:
        for frame in arr:
            writer.send(frame)
    finally:
        writer.close()  # always reap ffmpeg, also when a frame fails
    return path


def _decode(path: Path) -> tuple[int, str]:
    """Decode the first video stream fully; return (frames decoded, ffmpeg's error output)."""
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error",
        "-i", str(path), "-map", "0:v:0", "-f", "null", "-progress", "pipe:1", "-",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, timeout=600)
    found = _FRAME_LINE.findall(proc.stdout)
    errors = proc.stderr.decode("utf-8", "replace").strip()
    if proc.returncode != 0 and not errors:
        errors = f"ffmpeg exited with status {proc.returncode}"
    return (int(found[-1]) if found else 0), errors


def probe_mp4(path: str | Path) -> dict[str, Any]:
    """frames (counted by decoding), width, height, codec, fps. ValueError if it is not a readable video."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file")
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        reader.close()
    except (OSError, RuntimeError, StopIteration) as exc:
        last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise ValueError(f"{str(path)!r} is not a readable video: {last}") from None
    width, height = meta["size"]
    frames, _ = _decode(path)
    return {
        "frames": frames,
        "width": int(width),
        "height": int(height),
        "codec": str(meta.get("codec", "")),
        "fps": float(meta.get("fps", 0.0)),
    }


def is_complete_mp4(path: str | Path, expected_frames: int | None = None) -> bool:
    """True iff the file decodes without any error and, if given, has exactly `expected_frames` frames."""
    try:
        path = Path(path)
        if not path.is_file() or path.stat().st_size == 0:
            return False
        frames, errors = _decode(path)
        if errors or frames < 1:
            return False
        return expected_frames is None or frames == expected_frames
    except Exception:  # a check, not a validator: any failure means "not complete"
        return False
