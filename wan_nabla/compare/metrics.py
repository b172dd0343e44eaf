"""How far two runs are apart: frame PSNR / SSIM, relative L2 of tensors.

    frames = frame_metrics(ref_TxHxWx3, cand_TxHxWx3)   # per frame and overall PSNR, SSIM
    rel_l2(cand_latents, ref_latents)                    # ||a - b|| / ||b||, 0.0 when equal
    missing_extras()                                     # ['scikit-image'] when it is not installed

PSNR is 10 log10(1 / MSE) on frames in [0, 1] (per frame, and over the whole video from the mean
MSE); identical frames have infinite PSNR, written as the string "inf" by `json_number` because
JSON has no infinity. SSIM is scikit-image's `structural_similarity` (Gaussian-free 7x7 window,
colour channels averaged, data range 1), per frame; its mean and minimum summarise the video.
Both measure distance from the reference run, not quality: with random weights the "video" is
noise and only the numbers' relation to each other means anything.
Limits: scikit-image and matplotlib are the `compare` extra (`pip install 'wan-nabla[compare]'`).
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
import torch

EXTRAS = {"skimage": "scikit-image", "matplotlib": "matplotlib"}


def missing_extras(modules: tuple[str, ...] = tuple(EXTRAS)) -> list[str]:
    """Distribution names of the compare extra's packages that cannot be imported."""
    missing = []
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(EXTRAS.get(mod, mod))
    return missing


def rel_l2(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """||a - b|| / ||b|| in float64 (0.0 when a equals b, inf when only b is zero)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double().to(torch.as_tensor(a).device)
    diff = float((a - b).norm())
    if diff == 0.0:
        return 0.0
    ref = float(b.norm())
    return diff / ref if ref > 0 else math.inf


def psnr(mse: float) -> float:
    """PSNR in dB for signals in [0, 1]; inf for mse 0."""
    return math.inf if mse <= 0 else 10.0 * math.log10(1.0 / mse)


def json_number(x: float | None) -> float | str | None:
    """A float for JSON: 'inf' / '-inf' / 'nan' as strings (JSON has no such numbers)."""
    if x is None or math.isfinite(x):
        return x
    return str(x)


def frame_metrics(ref: np.ndarray, cand: np.ndarray, with_ssim: bool = True) -> dict[str, Any]:
    """Per-frame and overall PSNR / SSIM of two [T, H, W, 3] float videos in [0, 1] (SSIM None
    without `with_ssim`, e.g. on a machine lacking scikit-image)."""
    ref, cand = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    if ref.shape != cand.shape or ref.ndim != 4 or ref.shape[-1] != 3:
        raise ValueError(f"videos must share a [T, H, W, 3] shape, got {ref.shape} and {cand.shape}")
    mse = ((ref - cand) ** 2).mean(axis=(1, 2, 3))
    ssim = None
    if with_ssim:
        from skimage.metrics import structural_similarity

        ssim = [float(structural_similarity(r, c, channel_axis=-1, data_range=1.0)) for r, c in zip(ref, cand)]
    return {
        "psnr_db": [json_number(psnr(float(m))) for m in mse],
        "ssim": ssim,
        "overall": {
            "psnr_db": json_number(psnr(float(mse.mean()))),
            "ssim_mean": float(np.mean(ssim)) if ssim else None,
            "ssim_min": float(np.min(ssim)) if ssim else None,
            "max_abs_diff": float(np.abs(ref - cand).max()),
        },
    }
