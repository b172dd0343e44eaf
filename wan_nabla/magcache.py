"""MagCache settings: the published magnitude ratios of Wan2.1 T2V 1.3B and 14B, or the user's own.

    settings = resolve(cfg.speed, pipe.transformer.config)   # ConfigError for an unknown model
    settings.mag_ratios, settings.threshold, settings.max_skip_steps, settings.retention_ratio
    check(cfg.speed, transformer_config)                     # the same decision before loading

`--cache mag` alone runs MagCache with the published values of the loaded transformer; `mag:T` and
`mag:T:K` replace the threshold (and K). The ratios and recommended settings ship as package data
(magcache_ratios.json) copied from their source, Zehong-Ma/MagCache: the ratio lists from
MagCache4Wan2.1/magcache_generate.py, threshold / K / retention from the T2V commands of
MagCache4Wan2.1/README.md (1.3B: 0.12 / 4 / 0.2, 14B: 0.24 / 6 / 0.2; the script's own defaults
are 0.12 / 2 / 0.2).

Which model: by the transformer's shape, (num_layers, num_attention_heads * attention_head_dim):
(30, 1536) is Wan2.1 T2V 1.3B, (40, 5120) is 14B; anything else is refused with one line pointing
at `mag:calibrate`, unless the config gives its own `speed.mag_ratios` (then K defaults to 3,
diffusers' value, and retention to 0.2).

How the published list is used: it holds 100 values, the conditional and unconditional pass
interleaved, because the reference keeps one skip state per pass. diffusers' MagCache takes one
list per cache context; wan-nabla runs the CFG pair as one batch (one context, one skip decision)
or as two contexts, so the conditional values are given (they differ from the unconditional ones
by at most 0.0097 on 1.3B and 0.0051 on 14B, both at step 1, inside the retention steps).
diffusers interpolates them to the step count with the reference's nearest-index rule, and keeps
the first `int(retention * steps + 0.5)` steps computed (the reference: int(2 * steps *
retention) interleaved calls, the same steps at 50). The reference skips while the accumulated
error is < threshold, diffusers while it is <= threshold.

Limits: the ratios were calibrated on Wan's own sampler at 50 steps and shift 5 with dense
attention; sparse attention or other schedules change the true ratios (calibrate to be exact).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError

DATA = Path(__file__).with_name("magcache_ratios.json")
USER_DEFAULT_K = 3  # diffusers' MagCacheConfig default, for user-calibrated ratios
DEFAULT_RETENTION = 0.2


@dataclass(frozen=True)
class Published:
    """One model's published MagCache values."""

    name: str
    num_layers: int
    inner_dim: int
    threshold: float
    max_skip_steps: int
    retention_ratio: float
    mag_ratios: tuple[float, ...]
    """Interleaved: conditional and unconditional value of each step."""

    @property
    def conditional(self) -> tuple[float, ...]:
        return self.mag_ratios[0::2]


@functools.lru_cache(maxsize=1)
def _load() -> tuple[dict[str, Any], tuple[Published, ...]]:
    data = json.loads(DATA.read_text(encoding="utf-8"))
    models = tuple(
        Published(
            name,
            m["num_layers"],
            m["inner_dim"],
            float(m["threshold"]),
            int(m["max_skip_steps"]),
            float(m["retention_ratio"]),
            tuple(float(x) for x in m["mag_ratios"]),
        )
        for name, m in data["models"].items()
    )
    return data["source"], models


def source() -> str:
    s = _load()[0]
    return f"{s['repository']} {s['file']} @ {s['commit'][:12]}"


PUBLISHED: list[Published] = list(_load()[1])
"""The models with published ratios; tests append a tiny shape here to run the published path."""


def model_shape(transformer_config: Any) -> tuple[int, int]:
    """(num_layers, inner dim) of a transformer config (mapping or diffusers FrozenDict/config)."""
    get = transformer_config.get if hasattr(transformer_config, "get") else lambda k: getattr(transformer_config, k)
    return int(get("num_layers")), int(get("num_attention_heads")) * int(get("attention_head_dim"))


def published_for(transformer_config: Any) -> Published | None:
    shape = model_shape(transformer_config)
    return next((p for p in PUBLISHED if (p.num_layers, p.inner_dim) == shape), None)


@dataclass(frozen=True)
class MagSettings:
    """What diffusers' MagCacheConfig is given (besides num_inference_steps)."""

    threshold: float
    max_skip_steps: int
    retention_ratio: float
    mag_ratios: tuple[float, ...]
    source: str
    """'published: <model> (<repository file @ commit>)' or 'speed.mag_ratios'."""

    def record(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "max_skip_steps": self.max_skip_steps,
            "retention_ratio": self.retention_ratio,
            "ratios_source": self.source,
        }


def resolve(speed, transformer_config: Any) -> MagSettings | None:
    """The MagCache settings of `speed` (a SpeedConfig) for this transformer; None unless the
    cache is mag:T[:K] or mag (calibration is not a skip run). ConfigError if no ratios apply."""
    kind, params = speed.cache_kind, speed.cache_params
    if kind != "mag" or params.get("calibrate"):
        return None
    if speed.mag_ratios is not None:
        if "threshold" not in params:
            raise ConfigError(
                f"speed.cache: {speed.cache!r} uses the published settings, but speed.mag_ratios gives "
                "this model's own ratios; give the threshold with them: mag:T[:K]"
            )
        return MagSettings(
            params["threshold"],
            params.get("max_skip_steps", USER_DEFAULT_K),
            DEFAULT_RETENTION,
            tuple(speed.mag_ratios),
            "speed.mag_ratios",
        )
    pub = published_for(transformer_config)
    if pub is None:
        layers, dim = model_shape(transformer_config)
        known = ", ".join(f"{p.name} ({p.num_layers} layers, dim {p.inner_dim})" for p in PUBLISHED)
        raise ConfigError(
            f"speed.cache: {speed.cache!r}: no published MagCache ratios for this transformer ({layers} "
            f"layers, dim {dim}; published: {known}); measure them with --cache mag:calibrate and give "
            "them as speed.mag_ratios"
        )
    return MagSettings(
        params.get("threshold", pub.threshold),
        params.get("max_skip_steps", pub.max_skip_steps),
        pub.retention_ratio,
        pub.conditional,
        f"published: {pub.name} ({source()})",
    )


def check(speed, transformer_config: Any | None) -> None:
    """resolve() before loading, when the transformer config is known (None: decided at load)."""
    if transformer_config is not None:
        resolve(speed, transformer_config)
