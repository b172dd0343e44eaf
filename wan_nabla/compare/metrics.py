"""How far two runs are apart: frame PSNR / SSIM, relative L2 of tensors.

    frames = frame_metrics(ref_TxHxWx3, cand_TxHxWx3)   # per frame and overall PSNR, SSIM
    frame_metrics(ref, cand, ssim_device="cuda")         # the same SSIM computed by torch (ssim_torch)
    rel_l2(cand_latents, ref_latents)                    # ||a - b|| / ||b||, 0.0 when equal
    missing_extras()                                     # ['scikit-image'] when it is not installed

PSNR is 10 log10(1 / MSE) on frames in [0, 1] (per frame, and over the whole video from the mean
MSE); identical frames have infinite PSNR, written as the string "inf" by `json_number` because
JSON has no infinity. SSIM is scikit-image's `structural_similarity` (Gaussian-free 7x7 window,
colour channels averaged, data range 1), per frame; its mean and minimum summarise the video.
`ssim_torch` computes that same SSIM with torch on any device (float64; it matches scikit-image's
to 1e-6 in the tests): scikit-image takes ~0.4 s of CPU per 720p frame, ~30 s per 81-frame video,
which the GPU benchmarks (levers, decode) cannot spend per row. It needs no scikit-image.
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


SSIM_WIN = 7
"""scikit-image's default SSIM window (uniform, not Gaussian)."""


def ssim_torch(
    ref: torch.Tensor | np.ndarray,
    cand: torch.Tensor | np.ndarray,
    device: str | torch.device = "cpu",
    frames_per_chunk: int = 4,
) -> list[float]:
    """Per-frame SSIM of two [T, H, W, C] videos in [0, 1], as scikit-image's
    structural_similarity(channel_axis=-1, data_range=1.0) defines it: 7x7 uniform window, sample
    covariance (49/48), K1 0.01, K2 0.03, the 3-pixel border cropped (so a valid 7x7 mean, which
    scikit-image's reflect padding never reaches), channels averaged. float64 on `device`, a few
    frames at a time so a 720p video fits in little memory."""
    if ref.shape != cand.shape or len(ref.shape) != 4 or min(ref.shape[1:3]) < SSIM_WIN:
        raise ValueError(
            f"videos must share a [T, H, W, C] shape with H, W >= {SSIM_WIN}, got "
            f"{tuple(ref.shape)} and {tuple(cand.shape)}"
        )
    n = SSIM_WIN * SSIM_WIN
    cov_norm = n / (n - 1)
    c1, c2 = 0.01**2, 0.03**2
    out: list[float] = []
    for i in range(0, ref.shape[0], frames_per_chunk):
        x, y = (
            torch.as_tensor(v[i : i + frames_per_chunk]).to(device=device, dtype=torch.float64).permute(0, 3, 1, 2)
            for v in (ref, cand)
        )

        def mean(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.avg_pool2d(t, SSIM_WIN, stride=1)

        ux, uy = mean(x), mean(y)
        vx = cov_norm * (mean(x * x) - ux * ux)
        vy = cov_norm * (mean(y * y) - uy * uy)
        vxy = cov_norm * (mean(x * y) - ux * uy)
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        out += [float(v) for v in s.mean(dim=(2, 3)).mean(dim=1).cpu()]
    return out


def frame_metrics(
    ref: np.ndarray, cand: np.ndarray, with_ssim: bool = True, ssim_device: str | torch.device | None = None
) -> dict[str, Any]:
    """Per-frame and overall PSNR / SSIM of two [T, H, W, 3] float videos in [0, 1] (SSIM None
    without `with_ssim`, e.g. on a machine lacking scikit-image). With `ssim_device` the SSIM is
    `ssim_torch`'s on that device (the same definition; no scikit-image needed)."""
    ref, cand = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    if ref.shape != cand.shape or ref.ndim != 4 or ref.shape[-1] != 3:
        raise ValueError(f"videos must share a [T, H, W, 3] shape, got {ref.shape} and {cand.shape}")
    mse = ((ref - cand) ** 2).mean(axis=(1, 2, 3))
    ssim = None
    if with_ssim and ssim_device is not None:
        ssim = ssim_torch(ref, cand, ssim_device)
    elif with_ssim:
        from skimage.metrics import structural_similarity

        ssim = [
            float(structural_similarity(r, c, channel_axis=-1, data_range=1.0)) for r, c in zip(ref, cand, strict=False)
        ]
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
