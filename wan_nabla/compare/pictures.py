"""Pictures of a run's masks and of a comparison: PNG bytes, rendered with matplotlib (Agg).

    pngs = mask_pictures(probe.records, probe.density_table(30, 4), "nabla 0.4")
    pngs["step002_layer15.png"]          # kept tile mask of step 2, layer 15, sampled heads
    pngs["density.png"]                  # kept-block density, layer x step heat map
    metrics_png = metrics_picture(step_rel_l2, frames, attention_rows)

Mask pictures show query tile (rows) x key tile (columns) in frame-major order, one panel per
sampled head (batch item 0: the conditional pass), blue = kept, with red lines at latent-frame
boundaries and ticks at frame centres; large maps are downsampled with antialiasing, so a pixel's
shade is the kept share of the tiles under it (the colour bar). Fixed figure sizes at 100 dpi:
a mask picture is (3.6 * heads + 1.2) x 4.2 inches, the density map 6.4 x 4.8, the metrics
picture 13.5 x 4.4 (so the pixel sizes are known in advance).
Limits: needs matplotlib (the `compare` extra); no pyplot state is touched (Figure objects only).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

DPI = 100
MASK_PANEL_IN, MASK_EXTRA_IN, MASK_HEIGHT_IN = 3.6, 1.2, 4.2
DENSITY_SIZE_IN = (6.4, 4.8)
METRICS_SIZE_IN = (13.5, 4.4)


def _figure(size_in: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=size_in, dpi=DPI)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def mask_file_name(step: int, layer: int) -> str:
    return f"step{step:03d}_layer{layer:02d}.png"


def _frame_ticks(ax, n: int, per_frame: int) -> None:
    frames = max(1, n // per_frame)
    every = max(1, math.ceil(frames / 10))
    centres = [f * per_frame + per_frame / 2 - 0.5 for f in range(0, frames, every)]
    labels = [str(f) for f in range(0, frames, every)]
    ax.set_xticks(centres, labels, fontsize=7)
    ax.set_yticks(centres, labels, fontsize=7)
    for f in range(1, frames):
        edge = f * per_frame - 0.5
        ax.axhline(edge, color="tab:red", lw=0.6, alpha=0.7)
        ax.axvline(edge, color="tab:red", lw=0.6, alpha=0.7)


def mask_picture(record, label: str) -> bytes:
    """One sampled call's kept tile masks, a panel per sampled head (record: probe.CallRecord)."""
    masks = record.tile_masks
    heads = record.heads
    fig = _figure((MASK_PANEL_IN * len(heads) + MASK_EXTRA_IN, MASK_HEIGHT_IN))
    axes = fig.subplots(1, len(heads), squeeze=False)[0]
    image = None
    n = masks.shape[-1]
    for ax, head, mask in zip(axes, heads, masks, strict=False):
        image = ax.imshow(
            mask.astype(np.float32),
            cmap="Blues",
            vmin=0.0,
            vmax=1.0,
            interpolation="antialiased",
            interpolation_stage="data",
        )
        _frame_ticks(ax, n, record.tiles_per_frame or n)
        ax.set_title(f"head {head}: kept {mask.mean():.2f} of tiles", fontsize=9)
        ax.set_xlabel("key tile (ticks: latent frame)", fontsize=8)
        ax.set_ylabel("query tile (ticks: latent frame)", fontsize=8)
    state = "dense attention (all kept)" if record.dense else f"kept blocks {record.density:.3f}"
    fig.suptitle(f"{label}: step {record.step}, layer {record.layer} - {state}", fontsize=10)
    bar = fig.colorbar(image, ax=list(axes), fraction=0.04, pad=0.03)
    bar.set_label("kept share of the tiles under a pixel", fontsize=8)
    return _png(fig)


def density_picture(table: Sequence[Sequence[float | None]], label: str) -> bytes:
    """Kept-block density per layer (rows) and denoising step (columns)."""
    data = np.array([[np.nan if v is None else v for v in row] for row in table], dtype=np.float64)
    fig = _figure(DENSITY_SIZE_IN)
    ax = fig.subplots()
    image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("transformer block (layer)")
    mean = np.nanmean(data) if np.isfinite(data).any() else float("nan")
    ax.set_title(f"{label}: kept-block density (mean {mean:.3f})", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("kept share of (query block, key block) pairs")
    fig.subplots_adjust(left=0.12, right=0.95, bottom=0.12, top=0.9)
    return _png(fig)


def mask_pictures(records, density_table, label: str) -> dict[str, bytes]:
    """File name -> PNG for every sampled call with a tile mask, plus 'density.png'."""
    out = {mask_file_name(r.step, r.layer): mask_picture(r, label) for r in records if r.tile_masks is not None}
    out["density.png"] = density_picture(density_table, label)
    return out


def _finite(values) -> list[float]:
    return [float(v) if isinstance(v, (int, float)) and math.isfinite(v) else float("nan") for v in values]


def metrics_picture(
    step_rel_l2: Sequence[float], frames: dict[str, Any], attention: Sequence[dict[str, Any]], label: str
) -> bytes:
    """Three panels: transformer-output rel. L2 per step; PSNR and SSIM per decoded frame; attention
    error and token-level kept mass at the sampled calls (attention rows: step, layer, rel_l2,
    kept_mass_mean, kept_mass_min)."""
    fig = _figure(METRICS_SIZE_IN)
    a, b, c = fig.subplots(1, 3)
    steps = list(range(len(step_rel_l2)))
    a.plot(steps, step_rel_l2, "o-", color="tab:purple")
    positive = [v for v in step_rel_l2 if v > 0]
    if positive and max(positive) / min(positive) > 30:
        a.set_yscale("log")
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.set_xlabel("denoising step")
    a.set_ylabel("rel. L2 vs reference")
    a.set_title("transformer output (guided noise)", fontsize=10)
    a.grid(alpha=0.3)

    psnr = _finite(frames["psnr_db"])
    idx = list(range(len(psnr)))
    b.plot(idx, psnr, "o-", color="tab:blue", ms=3)
    b.xaxis.set_major_locator(MaxNLocator(integer=True))
    b.set_xlabel("video frame")
    b.set_ylabel("PSNR dB (gaps: identical)", color="tab:blue")
    b.set_title("decoded frames vs reference", fontsize=10)
    b.grid(alpha=0.3)
    if frames.get("ssim"):
        b2 = b.twinx()
        b2.plot(idx, frames["ssim"], "s-", color="tab:orange", ms=3)
        b2.set_ylim(min(0.0, min(frames["ssim"])), 1.02)
        b2.set_ylabel("SSIM", color="tab:orange")

    names = [f"s{r['step']}/l{r['layer']}" for r in attention]
    x = np.arange(len(attention))
    c.bar(x, [r["rel_l2"] for r in attention], color="tab:red", alpha=0.7, label="rel. L2 vs exact")
    c.bar(
        x,
        [r["dense_kernel_rel_l2"] for r in attention],
        color="k",
        alpha=0.5,
        width=0.4,
        label="dense kernel (rounding floor)",
    )
    c.set_xticks(x, names, fontsize=7, rotation=45)
    c.set_ylabel("attention output rel. L2")
    c.set_title("attention error at sampled calls", fontsize=10)
    c2 = c.twinx()
    c2.plot(x, [r["kept_mass_mean"] for r in attention], "o", color="tab:green", label="kept mass mean")
    c2.plot(x, [r["kept_mass_min"] for r in attention], "v", color="tab:olive", label="kept mass min")
    c2.set_ylim(0, 1.05)
    c2.set_ylabel("exact attention mass kept", color="tab:green")
    lines = c.get_legend_handles_labels()
    lines2 = c2.get_legend_handles_labels()
    c.legend(
        lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.3)
    )
    fig.suptitle(label, fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.95, bottom=0.32, top=0.86, wspace=0.5)
    return _png(fig)


def presets_picture(rows: Sequence[dict[str, Any]], title: str) -> bytes:
    """Attention rel. L2 and kept mass against kept-block density, one point per preset (rows of
    table.py: preset, density, rel_l2_mean, kept_mass_mean, kept_mass_min). 9 x 4 inches."""
    fig = _figure((9.0, 4.0))
    a, b = fig.subplots(1, 2)
    for r in rows:
        a.scatter(r["density"], r["rel_l2_mean"], s=30)
        a.annotate(r["preset"], (r["density"], r["rel_l2_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        b.scatter(r["density"], r["kept_mass_mean"], s=30, color="tab:green")
        b.scatter(r["density"], r["kept_mass_min"], s=30, marker="v", color="tab:olive")
        b.annotate(
            r["preset"], (r["density"], r["kept_mass_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    a.set_ylabel("attention output rel. L2 vs exact")
    b.set_ylabel("exact attention mass kept (o mean, v min)")
    b.set_ylim(0, 1.05)
    for ax in (a, b):
        ax.set_xlabel("kept-block density")
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.88, wspace=0.3)
    return _png(fig)
