"""AttentionConfig: how every self-attention of a patched transformer is computed.

    config = AttentionConfig(type="nabla", threshold=0.7)              # validated on construction
    config = AttentionConfig.from_mapping({"type": "sta", "sta_window": [11, 3, 3]})
    config.to_dict()                     # the YAML `attention:` section, keys exactly as read

The attention library's own typed config: frozen, one docstring per field, every value checked in
`__post_init__` with a one-line `ConfigError` naming the key, the bad value and what is allowed.
The application embeds it as the `attention:` section of its run config; nothing here knows about
that application. Limits: values are checked one by one and against each other, not against a
model (block indices beyond the model's depth are checked when the patch is applied).
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

ATTENTION_TYPES = ("full", "nabla", "sta", "nabla_sta")
ATTENTION_BACKENDS = ("auto", "flex", "fa4")
GEOMETRIES = ("fast", "exact")
BLOCK_TOKENS = (64, 128)

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxtuple, _short.maxdict, _short.maxlevel = 60, 60, 6, 6, 4, 2


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming key, value and what is allowed."""


def _show(value: Any) -> str:
    return _short.repr(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


@dataclass(frozen=True)
class AttentionConfig:
    """How every self-attention (attn1) of the transformer is computed."""

    type: str = "full"
    """full | nabla | sta | nabla_sta."""
    threshold: float | None = None
    """NABLA: keep the most probable key tiles of each query tile until their coarse mass reaches
    this value, in (0, 1]. Required for nabla and nabla_sta; 1.0 keeps every tile with mass."""
    sta_window: tuple[int, int, int] | None = None
    """STA window (wT, wH, wW): positive odd integers, in latent frames and 8x8-patch tiles.
    Required for sta and nabla_sta."""
    dense_steps: int = 0
    """The first N denoising steps use full attention (published STA preset: 12)."""
    dense_layers: tuple[int, ...] = ()
    """Transformer block indices that always use full attention."""
    block_size: tuple[int, int] | None = None
    """Kernel block (query tokens, key tokens), each 64 (one tile) or 128 (two tiles). A 128 block
    is kept if any tile pair in it is kept (a superset of the tile mask, never less). None: the
    `geometry` decides."""
    time_pairs: bool | None = None
    """Order tiles so that a 128-token query block is one 8x8 square over two consecutive latent
    frames instead of two side-by-side squares (fewer blocks kept after coarsening; measured
    15-18% faster kernels on H100). None: on whenever the query block is 128 tokens."""
    backend: str = "auto"
    """Attention kernels: flex (compiled FlexAttention for sparse, SDPA for dense), fa4
    (flash-attn-4's CuTe kernels for sparse and dense on sm90+ GPUs), or auto (fa4 where it is
    installed and the GPU supports it, else flex). The CPU always runs flex; a missing or broken
    flash-attn-4 falls back to flex with one log line (attention/backends/__init__.py)."""
    geometry: str = "fast"
    """exact: 64x64 blocks over plain tile order, so the kernel computes exactly the tile pairs
    NABLA / STA define. fast: the measured fastest geometry of the chosen backend on CUDA (128-token
    time-paired query blocks over 64-token key blocks: a query block is kept where either of its
    two tiles keeps it, a superset of the tile mask); on the CPU fast is exact. An explicit
    `block_size` / `time_pairs` overrides fast; exact allows only 64x64 without time pairs."""

    def __post_init__(self) -> None:
        t = self.type
        if t not in ATTENTION_TYPES:
            raise ConfigError(f"attention.type: {_show(t)} is not allowed; use one of {', '.join(ATTENTION_TYPES)}")
        uses_nabla = t in ("nabla", "nabla_sta")
        uses_sta = t in ("sta", "nabla_sta")
        if uses_nabla:
            th = self.threshold
            if th is None:
                raise ConfigError(f"attention.threshold is required for type {_show(t)}; give a number in (0, 1]")
            if not _is_number(th) or not (0.0 < float(th) <= 1.0):
                raise ConfigError(f"attention.threshold: {_show(th)} is not allowed; use a number in (0, 1]")
            object.__setattr__(self, "threshold", float(th))
        elif self.threshold is not None:
            raise ConfigError(
                f"attention.threshold: set to {_show(self.threshold)} but type {_show(t)} does not use it"
            )
        if uses_sta:
            w = self.sta_window
            if w is None:
                raise ConfigError(f"attention.sta_window is required for type {_show(t)}; give [wT, wH, wW]")
            if (
                not isinstance(w, (list, tuple))
                or len(w) != 3
                or not all(_is_int(x) and x > 0 and x % 2 == 1 for x in w)
            ):
                raise ConfigError(
                    f"attention.sta_window: {_show(w)} is not allowed; use three positive odd integers [wT, wH, wW]"
                )
            object.__setattr__(self, "sta_window", tuple(int(x) for x in w))
        elif self.sta_window is not None:
            raise ConfigError(
                f"attention.sta_window: set to {_show(self.sta_window)} but type {_show(t)} does not use it"
            )
        if not _is_int(self.dense_steps) or self.dense_steps < 0:
            raise ConfigError(f"attention.dense_steps: {_show(self.dense_steps)} is not allowed; use an integer >= 0")
        dl = self.dense_layers
        if not isinstance(dl, (list, tuple)) or not all(_is_int(x) and x >= 0 for x in dl):
            raise ConfigError(
                f"attention.dense_layers: {_show(dl)} is not allowed; use a list of block indices (integers >= 0)"
            )
        object.__setattr__(self, "dense_layers", tuple(sorted(set(int(x) for x in dl))))
        bs = self.block_size
        if bs is not None:
            if (
                not isinstance(bs, (list, tuple))
                or len(bs) != 2
                or not all(_is_int(x) and x in BLOCK_TOKENS for x in bs)
            ):
                raise ConfigError(f"attention.block_size: {_show(bs)} is not allowed; use [q, kv] with each 64 or 128")
            object.__setattr__(self, "block_size", (int(bs[0]), int(bs[1])))
        if self.time_pairs is not None and not isinstance(self.time_pairs, bool):
            raise ConfigError(f"attention.time_pairs: {_show(self.time_pairs)} is not allowed; use true, false or null")
        if self.backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention.backend: {_show(self.backend)} is not allowed; use one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if self.geometry not in GEOMETRIES:
            raise ConfigError(
                f"attention.geometry: {_show(self.geometry)} is not allowed; use one of {', '.join(GEOMETRIES)}"
            )
        if self.geometry == "exact":
            if self.block_size not in (None, (64, 64)):
                raise ConfigError(
                    f"attention.block_size: {list(self.block_size)} contradicts geometry exact "
                    "(64x64 tile masks); use [64, 64], leave it out, or use geometry fast"
                )
            if self.time_pairs:
                raise ConfigError(
                    "attention.time_pairs: true contradicts geometry exact (plain tile order); "
                    "use false, leave it out, or use geometry fast"
                )

    @property
    def sparse(self) -> bool:
        return self.type != "full"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | AttentionConfig) -> AttentionConfig:
        """From the YAML `attention:` section (or an AttentionConfig, returned as is): unknown keys
        are errors naming the allowed ones."""
        if isinstance(data, AttentionConfig):
            return data
        allowed = tuple(f.name for f in fields(cls))
        if not isinstance(data, Mapping):
            raise ConfigError(f"attention: expected a mapping, got {type(data).__name__} {_show(data)}")
        for key in data:
            if key not in allowed:
                name = key if isinstance(key, str) and len(key) <= 60 else _show(key)
                raise ConfigError(f"unknown key 'attention.{name}'; allowed keys: {', '.join(allowed)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["sta_window"] = list(self.sta_window) if self.sta_window else None
        d["dense_layers"] = list(self.dense_layers)
        d["block_size"] = list(self.block_size) if self.block_size else None
        return d

    def label(self) -> str:
        """Short human name, e.g. 'nabla 0.6 + sta 11-3-3'."""
        parts = []
        if self.type in ("nabla", "nabla_sta"):
            parts.append(f"nabla {self.threshold:g}")
        if self.type in ("sta", "nabla_sta") and self.sta_window is not None:
            parts.append("sta " + "-".join(str(x) for x in self.sta_window))
        return " + ".join(parts) if parts else "full"


# ---- rules between the attention config and a model ---------------------------------------------
# Written once; preflight applies them from the model's facts before anything loads, and
# apply_attention again on the transformer it is given (the library entry, reached without preflight).
def check_dense_layers(config: AttentionConfig, num_layers: int | None, owner: str = "this transformer") -> None:
    """ConfigError when attention.dense_layers names a block past the model's depth (None: unknown)."""
    if num_layers is None:
        return
    bad = [i for i in config.dense_layers if i >= num_layers]
    if bad:
        raise ConfigError(f"attention.dense_layers: {bad} out of range; {owner} has blocks 0..{num_layers - 1}")


def check_heads_split(degree: int, heads: int | None) -> None:
    """ConfigError when a Ulysses degree does not divide the attention heads (None: unknown): each
    rank attends a whole share of the heads."""
    if heads is not None and heads % degree:
        raise ConfigError(
            f"parallel.ulysses_degree: {degree} does not divide the model's {heads} attention heads; "
            f"use a divisor of {heads}"
        )
