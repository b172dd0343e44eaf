"""The attention configs the benchmarks measure: the bundled presets and extra sweep points.

    preset_configs()          # [("nabla_0.7", AttentionConfig(...)), ...] sparse presets only
    preset_attention("full")  # the attention section of one bundled preset

A preset that runs the exact 64x64 geometry (the fine-tuned NABLA presets) also gets a twin row
"<name> @fast", the same attention at the fast geometry, so every level measures what exact costs
(geometry_cost.py pairs them).
"""

from __future__ import annotations

from dataclasses import replace

from wan_nabla.config import AttentionConfig, load_config
from wan_nabla.presets import PRESET_DIR, preset_names


def preset_attention(name: str) -> AttentionConfig:
    return load_config(PRESET_DIR / f"{name}.yaml").attention


def preset_configs() -> list[tuple[str, AttentionConfig]]:
    """Sparse attention sections of the bundled presets (dense_steps dropped: one call is one step)."""
    out = []
    for name in preset_names():
        att = preset_attention(name)
        if att.sparse:
            out.append((name, replace(att, dense_steps=0)))
            if att.geometry == "exact":
                out.append((name + FAST_TWIN, replace(att, dense_steps=0, geometry="fast")))
    return out


FAST_TWIN = " @fast"
"""Suffix of the fast-geometry twin row of an exact preset."""
