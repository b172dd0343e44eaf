"""Side-by-side frames of a comparison: reference | candidate | absolute-difference heat map.

    frames, scale = side_by_side(ref_TxHxWx3, cand_TxHxWx3, "full", "nabla 0.4")
    write_mp4(frames, tmp_path, fps=16)          # output/video.py; [T, H + strip, 3W, 3] uint8

Each panel gets a label strip above it (drawn with Pillow, which imageio already requires). The
heat map is the per-pixel mean over RGB of |reference - candidate| through matplotlib's 'inferno'
colour map, on one scale for the whole video: 0 is black, `scale` (the 99.9th percentile of the
difference over all frames, or 1/255 if smaller, so identical videos stay black) is white-yellow;
the label states the scale. Sizes stay even (yuv420p) because Wan frames are multiples of 16.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

STRIP_FRACTION = 0.12


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def label_strip(text: str, width: int, height: int) -> np.ndarray:
    """[height, width, 3] uint8: white text on dark grey, shrunk until it fits the width."""
    img = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(img)
    size = max(6, int(height * 0.7))
    font = _font(size)
    while size > 6 and draw.textlength(text, font=font) > width - 4:
        size -= 1
        font = _font(size)
    draw.text((3, max(0, (height - size) // 2 - 1)), text, fill=(255, 255, 255), font=font)
    return np.asarray(img, dtype=np.uint8)


def heat(diff_THW: np.ndarray, scale: float) -> np.ndarray:
    """[T, H, W] non-negative floats -> [T, H, W, 3] uint8 through 'inferno' on [0, scale]."""
    from matplotlib import colormaps

    lut = (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    idx = np.clip(np.round(diff_THW / scale * 255), 0, 255).astype(np.intp)
    return lut[idx]


def side_by_side(ref: np.ndarray, cand: np.ndarray, ref_label: str, cand_label: str) -> tuple[np.ndarray, float]:
    """(frames [T, strip + H, 3W, 3] uint8, heat-map scale) of two [T, H, W, 3] videos in [0, 1]."""
    ref = np.clip(np.asarray(ref, dtype=np.float32), 0.0, 1.0)
    cand = np.clip(np.asarray(cand, dtype=np.float32), 0.0, 1.0)
    if ref.shape != cand.shape:
        raise ValueError(f"videos differ in shape: {ref.shape} and {cand.shape}")
    t, h, w, _ = ref.shape
    diff = np.abs(ref - cand).mean(axis=-1)
    scale = max(float(np.percentile(diff, 99.9)), 1.0 / 255.0)
    strip_h = max(12, int(round(w * STRIP_FRACTION / 2)) * 2)
    strips = np.concatenate(
        [
            label_strip(f"reference: {ref_label}", w, strip_h),
            label_strip(f"candidate: {cand_label}", w, strip_h),
            label_strip(f"|difference|, white = {scale:.3f}", w, strip_h),
        ],
        axis=1,
    )
    panels = np.concatenate(
        [(ref * 255).round().astype(np.uint8), (cand * 255).round().astype(np.uint8), heat(diff, scale)], axis=2
    )
    out = np.concatenate([np.broadcast_to(strips, (t, *strips.shape)), panels], axis=1)
    return np.ascontiguousarray(out), scale
