"""Typed configuration: the attention section, generation defaults, and their YAML form.

    cfg = load_config("nabla_0.7")                        # a bundled preset by name, or a YAML path
    cfg = cfg.override(steps=4, size=(128, 128))          # CLI flags win over the file
    att = AttentionConfig.from_mapping({"type": "sta", "sta_window": [3, 1, 1]})

YAML is only a serialization of these dataclasses: unknown keys, wrong types and out-of-range
values raise ConfigError with one line naming the key, the bad value and what is allowed.
The CLI turns ConfigError into exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

ATTENTION_TYPES = ("full", "nabla", "sta", "nabla_sta")
ATTENTION_BACKENDS = ("auto", "flex", "fa4")
DTYPES = ("bfloat16", "float16", "float32")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming key, value and what is allowed."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool) and math.isfinite(float(v))


def _check_keys(section: str, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{section or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    for key in data:
        if key not in allowed:
            where = f"{section}.{key}" if section else str(key)
            raise ConfigError(f"unknown key '{where}'; allowed keys: {', '.join(allowed)}")


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
    is kept if any tile pair in it is kept (a superset of the tile mask, never less). None picks
    the fastest measured geometry on CUDA and (64, 64), the exact tile mask, on the CPU."""
    time_pairs: bool | None = None
    """Order tiles so that a 128-token query block is one 8x8 square over two consecutive latent
    frames instead of two side-by-side squares (fewer blocks kept after coarsening; measured
    15-18% faster kernels on H100). None: on whenever the query block is 128 tokens."""
    backend: str = "auto"
    """Attention kernels: flex (compiled FlexAttention for sparse, SDPA for dense), fa4
    (flash-attn-4's CuTe kernels for sparse and dense on sm90+ GPUs), or auto (fa4 where it is
    installed and the GPU supports it, else flex). The CPU always runs flex; a missing or broken
    flash-attn-4 falls back to flex with one log line (attention/kernels.py)."""

    def __post_init__(self) -> None:
        t = self.type
        if t not in ATTENTION_TYPES:
            raise ConfigError(f"attention.type: {t!r} is not allowed; use one of {', '.join(ATTENTION_TYPES)}")
        uses_nabla = t in ("nabla", "nabla_sta")
        uses_sta = t in ("sta", "nabla_sta")
        if uses_nabla:
            th = self.threshold
            if th is None:
                raise ConfigError(f"attention.threshold is required for type {t!r}; give a number in (0, 1]")
            if not _is_number(th) or not (0.0 < float(th) <= 1.0):
                raise ConfigError(f"attention.threshold: {th!r} is not allowed; use a number in (0, 1]")
            object.__setattr__(self, "threshold", float(th))
        elif self.threshold is not None:
            raise ConfigError(f"attention.threshold: set to {self.threshold!r} but type {t!r} does not use it")
        if uses_sta:
            w = self.sta_window
            if w is None:
                raise ConfigError(f"attention.sta_window is required for type {t!r}; give [wT, wH, wW]")
            if (
                not isinstance(w, (list, tuple))
                or len(w) != 3
                or not all(_is_int(x) and x > 0 and x % 2 == 1 for x in w)
            ):
                raise ConfigError(
                    f"attention.sta_window: {w!r} is not allowed; use three positive odd integers [wT, wH, wW]"
                )
            object.__setattr__(self, "sta_window", tuple(int(x) for x in w))
        elif self.sta_window is not None:
            raise ConfigError(f"attention.sta_window: set to {self.sta_window!r} but type {t!r} does not use it")
        if not _is_int(self.dense_steps) or self.dense_steps < 0:
            raise ConfigError(f"attention.dense_steps: {self.dense_steps!r} is not allowed; use an integer >= 0")
        dl = self.dense_layers
        if not isinstance(dl, (list, tuple)) or not all(_is_int(x) and x >= 0 for x in dl):
            raise ConfigError(
                f"attention.dense_layers: {dl!r} is not allowed; use a list of block indices (integers >= 0)"
            )
        object.__setattr__(self, "dense_layers", tuple(sorted(set(int(x) for x in dl))))
        bs = self.block_size
        if bs is not None:
            if not isinstance(bs, (list, tuple)) or len(bs) != 2 or not all(_is_int(x) and x in (64, 128) for x in bs):
                raise ConfigError(f"attention.block_size: {bs!r} is not allowed; use [q, kv] with each 64 or 128")
            object.__setattr__(self, "block_size", (int(bs[0]), int(bs[1])))
        if self.time_pairs is not None and not isinstance(self.time_pairs, bool):
            raise ConfigError(f"attention.time_pairs: {self.time_pairs!r} is not allowed; use true, false or null")
        if self.backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention.backend: {self.backend!r} is not allowed; use one of {', '.join(ATTENTION_BACKENDS)}")

    @property
    def sparse(self) -> bool:
        return self.type != "full"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | AttentionConfig) -> AttentionConfig:
        if isinstance(data, AttentionConfig):
            return data
        _check_keys("attention", data, tuple(f.name for f in fields(cls)))
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sta_window"] = list(self.sta_window) if self.sta_window else None
        d["dense_layers"] = list(self.dense_layers)
        d["block_size"] = list(self.block_size) if self.block_size else None
        return d

    def label(self) -> str:
        """Short human name, e.g. 'nabla 0.6 + sta 11-3-3'."""
        parts = []
        if self.type in ("nabla", "nabla_sta"):
            parts.append(f"nabla {self.threshold:g}")
        if self.type in ("sta", "nabla_sta"):
            parts.append("sta " + "-".join(str(x) for x in self.sta_window))
        return " + ".join(parts) if parts else "full"


def parse_size(value: Any, key: str = "size") -> tuple[int, int]:
    """'832x480' or [832, 480] -> (width, height); both multiples of 16 and positive."""
    if isinstance(value, str):
        parts = value.lower().replace("×", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"{key}: {value!r} is not allowed; use WIDTHxHEIGHT, e.g. 832x480")
        w, h = (int(p) for p in parts)
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value):
        w, h = value
    else:
        raise ConfigError(f"{key}: {value!r} is not allowed; use WIDTHxHEIGHT, e.g. 832x480")
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise ConfigError(f"{key}: width and height must be positive multiples of 16, got {w}x{h}")
    return int(w), int(h)


def default_shift(width: int, height: int) -> float:
    """Wan's recommended flow shift: 5.0 for 720p-class sizes, 3.0 for 480p-class and smaller."""
    return 5.0 if min(width, height) >= 720 else 3.0


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling defaults; every field can be overridden on the command line."""

    size: tuple[int, int] = (832, 480)
    """(width, height) in pixels, multiples of 16. YAML: '832x480' or [832, 480]."""
    frames: int = 81
    """Video frames, of the form 4k+1 (the Wan VAE compresses time by 4)."""
    steps: int = 50
    """Denoising steps (UniPC flow matching)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale; <= 1 disables the unconditional pass."""
    shift: float | None = None
    """Flow-matching shift; None picks 5.0 for 720p and 3.0 for 480p."""
    seed: int = 0
    fps: int = 16
    negative_prompt: str = ""
    dtype: str = "bfloat16"
    """Transformer and text-encoder dtype (the VAE always runs in float32)."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    batch_cfg: bool = True
    """Run the conditional and unconditional passes as one batch of two."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", parse_size(self.size, "generation.size"))
        f = self.frames
        if not _is_int(f) or f < 1 or (f - 1) % 4:
            raise ConfigError(f"generation.frames: {f!r} is not allowed; use 4k+1 frames (1, 5, ..., 17, ..., 81)")
        if not _is_int(self.steps) or self.steps < 1:
            raise ConfigError(f"generation.steps: {self.steps!r} is not allowed; use an integer >= 1")
        if not _is_number(self.guidance_scale) or self.guidance_scale < 0:
            raise ConfigError(f"generation.guidance_scale: {self.guidance_scale!r} is not allowed; use a number >= 0")
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        if self.shift is not None:
            if not _is_number(self.shift) or self.shift <= 0:
                raise ConfigError(f"generation.shift: {self.shift!r} is not allowed; use a number > 0")
            object.__setattr__(self, "shift", float(self.shift))
        if not _is_int(self.seed) or self.seed < 0 or self.seed >= 2**63:
            raise ConfigError(f"generation.seed: {self.seed!r} is not allowed; use an integer in [0, 2**63)")
        if not _is_int(self.fps) or not (1 <= self.fps <= 240):
            raise ConfigError(f"generation.fps: {self.fps!r} is not allowed; use an integer in [1, 240]")
        if not isinstance(self.negative_prompt, str):
            raise ConfigError(f"generation.negative_prompt: {self.negative_prompt!r} is not allowed; use a string")
        if self.dtype not in DTYPES:
            raise ConfigError(f"generation.dtype: {self.dtype!r} is not allowed; use one of {', '.join(DTYPES)}")
        d = self.device
        if not isinstance(d, str) or not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ConfigError(f"generation.device: {d!r} is not allowed; use auto, cpu, cuda or cuda:N")
        if not isinstance(self.batch_cfg, bool):
            raise ConfigError(f"generation.batch_cfg: {self.batch_cfg!r} is not allowed; use true or false")

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    @property
    def resolved_shift(self) -> float:
        return self.shift if self.shift is not None else default_shift(*self.size)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> GenerationConfig:
        _check_keys("generation", data, tuple(f.name for f in fields(cls)))
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["size"] = f"{self.size[0]}x{self.size[1]}"
        d["shift"] = self.resolved_shift
        return d


@dataclass(frozen=True)
class RunConfig:
    """A whole config file: optional model, attention section, generation defaults."""

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    model: str | None = None
    """tiny, a local diffusers-format Wan2.1 directory, or a hub repo id (see models.py)."""

    def __post_init__(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise ConfigError(f"model: {self.model!r} is not allowed; use tiny, a directory or a hub repo id")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> RunConfig:
        data = {} if data is None else data
        _check_keys("", data, ("model", "attention", "generation"))
        return cls(
            attention=AttentionConfig.from_mapping(data.get("attention") or {}),
            generation=GenerationConfig.from_mapping(data.get("generation") or {}),
            model=data.get("model"),
        )

    def override(self, **changes: Any) -> RunConfig:
        """Return a copy with generation fields (and `model`, `attention_backend`) replaced; None
        values are ignored."""
        changes = {k: v for k, v in changes.items() if v is not None}
        model = changes.pop("model", self.model)
        attention = self.attention
        if "attention_backend" in changes:
            attention = dataclasses.replace(attention, backend=changes.pop("attention_backend"))
        gen_names = {f.name for f in fields(GenerationConfig)}
        for k in changes:
            if k not in gen_names:
                raise ConfigError(f"unknown generation override '{k}'")
        gen = dataclasses.replace(self.generation, **changes) if changes else self.generation
        return RunConfig(attention=attention, generation=gen, model=model)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "attention": self.attention.to_dict(), "generation": self.generation.to_dict()}


def load_config(path: str | Path | None) -> RunConfig:
    """Read and validate a YAML config (a path, or a bundled preset's name: presets/__init__.py);
    None gives the defaults (full attention)."""
    from .presets import preset_names, resolve_config_path

    if path is None:
        return RunConfig()
    p = resolve_config_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {str(p)!r} does not exist; give a YAML path or a preset name: {', '.join(preset_names())}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {first}") from None
    try:
        return RunConfig.from_mapping(data)
    except TypeError as e:  # e.g. a section given as a list
        raise ConfigError(f"config file {str(p)!r}: {e}") from None
