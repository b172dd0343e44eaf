"""Typed configuration: the attention section, generation defaults, the parallel layout, and their YAML form.

    cfg = load_config("nabla_0.7")                        # a bundled preset by name, or a YAML path
    cfg = cfg.override(steps=4, size=(128, 128))          # CLI flags win over the file
    cfg.model.base, cfg.model.transformer, cfg.memory.offload   # the weights, where they live
    cfg = cfg.with_levers(compile="blocks", cache="first-block:0.05", lora=["l.safetensors:0.8"])
    att = AttentionConfig.from_mapping({"type": "sta", "sta_window": [3, 1, 1]})

YAML is only a serialization of these dataclasses: unknown keys, wrong types and out-of-range
values raise ConfigError with one line naming the key, the bad value and what is allowed.
The CLI turns ConfigError into exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

ATTENTION_TYPES = ("full", "nabla", "sta", "nabla_sta")
ATTENTION_BACKENDS = ("auto", "flex", "fa4")
DTYPES = ("bfloat16", "float16", "float32")
OFFLOAD_MODES = ("none", "model", "group", "sequential")
AUTO_ON_OFF = ("auto", "on", "off")
SAMPLERS = ("unipc", "euler")
COMPILE_MODES = ("auto", "none", "blocks", "blocks-split")
CACHE_FORMS = "none, first-block:T (T >= 0), mag:T[:K] (T >= 0, K >= 1 skips in a row) or mag:calibrate"


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming key, value and what is allowed."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool) and math.isfinite(float(v))


def _from_section(cls, section: str, data: Mapping[str, Any]):
    """A config dataclass from its YAML section: unknown keys are errors, values validated by cls."""
    _check_keys(section, data, tuple(f.name for f in fields(cls)))
    return cls(**dict(data))


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
    sampler: str = "unipc"
    """unipc: Wan's UniPC flow-matching multistep solver on its default timesteps. euler:
    first-order flow-matching Euler on sigmas linspace(1, 0, steps + 1)[:-1] before the shift (for 4
    steps: timesteps 1000/750/500/250), the schedule step-distilled LoRAs such as LightX2V's are
    trained for."""

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
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"generation.sampler: {self.sampler!r} is not allowed; use one of {', '.join(SAMPLERS)}")

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
        return _from_section(cls, "generation", data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["size"] = f"{self.size[0]}x{self.size[1]}"
        d["shift"] = self.resolved_shift
        return d


def _optional_text(key: str, value: Any, allowed: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{key}: {value!r} is not allowed; use {allowed}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run. YAML: `model: <id or dir>` (the base only) or a mapping of these fields."""

    base: str | None = None
    """tiny, a local diffusers-format Wan2.1 directory, or a hub repo id (models.py). Gives the text
    encoder, tokenizer, VAE, scheduler and the transformer's architecture (its config.json); None:
    weights/Wan2.1-T2V-1.3B-Diffusers if present, else the 1.3B hub id."""
    transformer: str | None = None
    """DiT weights that replace the base's transformer weights: a .safetensors file, a
    *.safetensors.index.json with its shards, a directory holding either (Wan's original layout or
    a diffusers `transformer/` folder), or a hub repo id. Original or diffusers key names (checkpoint.py)."""
    recommended_transformer: str | None = None
    """Hub id of the DiT this config was tuned for (the fine-tuned NABLA presets). Informational:
    when the run uses other DiT weights, one log line says the run is zero-shot."""

    def __post_init__(self) -> None:
        what = "tiny, a directory or a hub repo id"
        _optional_text("model.base", self.base, what)
        _optional_text("model.transformer", self.transformer, "a .safetensors file, an index .json, a directory or a hub repo id")
        _optional_text("model.recommended_transformer", self.recommended_transformer, "a hub repo id (owner/name)")

    @classmethod
    def from_value(cls, data: Any) -> ModelConfig:
        """`model:` as written in YAML: None, a string (the base) or a mapping of the fields."""
        if data is None or isinstance(data, ModelConfig):
            return data or cls()
        if not isinstance(data, Mapping):
            if not isinstance(data, str) or not data.strip():
                raise ConfigError(f"model: {data!r} is not allowed; use tiny, a directory, a hub repo id "
                                  "or a mapping with base, transformer, recommended_transformer")
            return cls(base=data)
        _check_keys("model", data, tuple(f.name for f in fields(cls)))
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MemoryConfig:
    """Where the components live during a run (offload.py); outputs do not depend on it."""

    offload: str = "none"
    """none: everything on the device. model: each component (text encoder, transformer, VAE) is
    moved to the device only while it runs. group: transformer blocks stream to the device one at a
    time (prefetched on a CUDA stream while the previous block computes); the text encoder is on the
    device only while encoding. sequential: lowest memory, every layer of the transformer and the
    text encoder streams in on its own."""
    vae_tiling: str = "auto"
    """Decode the video in overlapping spatial tiles (less memory, seams blended): on, off, or auto
    (on from offload.VAE_TILING_AUTO_PIXELS per frame, or whenever offload is not none)."""

    def __post_init__(self) -> None:
        if self.offload not in OFFLOAD_MODES:
            raise ConfigError(f"memory.offload: {self.offload!r} is not allowed; use one of {', '.join(OFFLOAD_MODES)}")
        if self.vae_tiling not in AUTO_ON_OFF:
            raise ConfigError(f"memory.vae_tiling: {self.vae_tiling!r} is not allowed; use one of {', '.join(AUTO_ON_OFF)}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> MemoryConfig:
        _check_keys("memory", data, tuple(f.name for f in fields(cls)))
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Flag-style overrides that RunConfig.override routes to a section other than `generation`.
_SECTION_OVERRIDES = {"model": ("model", "base"), "transformer": ("model", "transformer"),
                      "offload": ("memory", "offload"), "vae_tiling": ("memory", "vae_tiling"),
                      "attention_backend": ("attention", "backend")}


def parse_cache(spec: str, key: str = "speed.cache") -> tuple[str, dict[str, Any]]:
    """'none' | 'first-block:T' | 'mag:T[:K]' | 'mag:calibrate' -> (kind, parameters)."""
    bad = ConfigError(f"{key}: {spec!r} is not allowed; use {CACHE_FORMS}")
    if not isinstance(spec, str):
        raise bad
    kind, _, rest = spec.strip().partition(":")
    args = rest.split(":") if rest else []
    try:
        if kind == "none" and not args:
            return "none", {}
        if kind == "first-block" and len(args) == 1:
            threshold = float(args[0])
            if math.isfinite(threshold) and threshold >= 0:
                return "first-block", {"threshold": threshold}
        if kind == "mag" and args == ["calibrate"]:
            return "mag", {"calibrate": True}
        if kind == "mag" and len(args) in (1, 2):
            threshold, max_skip = float(args[0]), int(args[1]) if len(args) == 2 else 3
            if math.isfinite(threshold) and threshold >= 0 and max_skip >= 1:
                return "mag", {"threshold": threshold, "max_skip_steps": max_skip}
    except ValueError:
        pass
    raise bad


@dataclass(frozen=True)
class SpeedConfig:
    """Levers that stack with sparse attention and leave the attention config alone."""

    compile: str = "auto"
    """none | blocks (each transformer block's forward compiled, one graph shared by all blocks,
    attention an opaque custom op inside it) | blocks-split (the graph splits around attention) |
    auto (blocks on CUDA, none elsewhere)."""
    cache: str = "none"
    """Step cache through diffusers' hooks: none | first-block:T (FirstBlockCache: skip blocks
    1..N-1 of a step while block 0's residual changed by a relative mean below T) | mag:T[:K]
    (MagCache: skip whole steps while the error accumulated from `mag_ratios` stays <= T, at most K
    in a row, never in the first 20% of steps) | mag:calibrate (skip nothing; record the ratios)."""
    mag_ratios: tuple[float, ...] | None = None
    """MagCache's per-step residual magnitude ratios of this model (from mag:calibrate); required
    by mag:T. Interpolated by diffusers when their count differs from the steps."""

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"speed.compile: {self.compile!r} is not allowed; use one of {', '.join(COMPILE_MODES)}")
        kind, params = parse_cache(self.cache)
        r = self.mag_ratios
        if r is not None:
            if not isinstance(r, (list, tuple)) or not r or not all(_is_number(x) and x > 0 for x in r):
                raise ConfigError(f"speed.mag_ratios: {r!r} is not allowed; use a list of positive numbers")
            object.__setattr__(self, "mag_ratios", tuple(float(x) for x in r))
        if kind == "mag" and not params.get("calibrate") and self.mag_ratios is None:
            raise ConfigError(f"speed.cache: {self.cache!r} needs speed.mag_ratios, this model's ratios; "
                              "measure them with --cache mag:calibrate (recorded in the sidecar)")

    @property
    def cache_kind(self) -> str:
        return parse_cache(self.cache)[0]

    @property
    def cache_params(self) -> dict[str, Any]:
        return parse_cache(self.cache)[1]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SpeedConfig:
        return _from_section(cls, "speed", data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mag_ratios"] = list(self.mag_ratios) if self.mag_ratios else None
        return d


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA merged into the transformer's weights (lora.py)."""

    path: str
    """A .safetensors file (diffusers/PEFT or original-Wan lora_down/lora_up naming)."""
    scale: float = 1.0
    """Multiplies the LoRA's delta (alpha/rank included); 0 leaves the weights unchanged."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ConfigError(f"lora.path: {self.path!r} is not allowed; give a .safetensors file")
        if not self.path.lower().endswith(".safetensors"):
            raise ConfigError(f"lora: {self.path!r} is not allowed; only .safetensors LoRA files are loaded")
        if not _is_number(self.scale):
            raise ConfigError(f"lora.scale: {self.scale!r} is not allowed; use a finite number")
        object.__setattr__(self, "scale", float(self.scale))

    @classmethod
    def parse(cls, value: Any) -> LoraSpec:
        """'PATH', 'PATH:SCALE', {'path': ..., 'scale': ...} or a LoraSpec."""
        if isinstance(value, LoraSpec):
            return value
        if isinstance(value, Mapping):
            _check_keys("lora[]", value, ("path", "scale"))
            return cls(**dict(value))
        if isinstance(value, os.PathLike):
            return cls(os.fspath(value))
        if isinstance(value, str):
            path, sep, scale = value.rpartition(":")
            try:
                number = float(scale) if sep and path else None
            except ValueError:
                number = None  # a ':' that is part of the path
            return cls(value) if number is None else cls(path, number)
        raise ConfigError(f"lora: {value!r} is not allowed; use PATH[:SCALE] or {{path: ..., scale: ...}}")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "scale": self.scale}


def _lora_list(value: Any) -> tuple[LoraSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"lora: {value!r} is not allowed; use a list of PATH[:SCALE] or {{path, scale}} entries")
    return tuple(LoraSpec.parse(v) for v in value)


@dataclass(frozen=True)
class ParallelConfig:
    """How ranks started by torchrun share the work (distributed/); one process needs none of it."""

    ulysses_degree: int = 1
    """Ranks that split one video's tokens (Ulysses sequence parallel): attention runs on all
    tokens for heads/ulysses_degree heads per rank, so it must divide the model's heads (1.3B: 12,
    14B: 40). 1 = off."""
    cfg_parallel: bool = False
    """Run the conditional and the unconditional pass on two groups of ranks (needs
    guidance_scale > 1)."""
    timeout_s: float = 3600.0
    """How long a rank waits for the others in one collective before the run fails (seconds).
    At the end of a data-parallel batch idle ranks wait for the last item, so it must exceed the
    longest item."""

    def __post_init__(self) -> None:
        u = self.ulysses_degree
        if not _is_int(u) or u < 1:
            raise ConfigError(f"parallel.ulysses_degree: {u!r} is not allowed; use an integer >= 1")
        if not isinstance(self.cfg_parallel, bool):
            raise ConfigError(f"parallel.cfg_parallel: {self.cfg_parallel!r} is not allowed; use true or false")
        t = self.timeout_s
        if not _is_number(t) or t <= 0:
            raise ConfigError(f"parallel.timeout_s: {t!r} is not allowed; use a number of seconds > 0")
        object.__setattr__(self, "timeout_s", float(t))

    @property
    def group_size(self) -> int:
        """Ranks that generate one video together."""
        return self.ulysses_degree * (2 if self.cfg_parallel else 1)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ParallelConfig:
        _check_keys("parallel", data, tuple(f.name for f in fields(cls)))
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PARALLEL_KEYS = tuple(f.name for f in fields(ParallelConfig))


@dataclass(frozen=True)
class RunConfig:
    """A whole config file: model, attention section, generation defaults, memory placement, speed
    levers, LoRAs, parallel layout."""

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    """The weights (ModelConfig); YAML `model:` may be a plain string, the base model."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    lora: tuple[LoraSpec, ...] = ()
    """LoRAs merged into the transformer at load, in order."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", ModelConfig.from_value(self.model))
        object.__setattr__(self, "lora", _lora_list(self.lora))
        if self.speed.compile not in ("auto", "none") and self.memory.offload != "none":
            raise ConfigError(f"speed.compile: {self.speed.compile!r} does not combine with memory.offload "
                              f"{self.memory.offload!r} (compiled blocks are not traced through offload hooks); "
                              "use compile none or auto, or offload none")
        if self.speed.cache_kind != "none" and self.parallel.ulysses_degree > 1:
            raise ConfigError(f"speed.cache: {self.speed.cache!r} does not combine with parallel.ulysses_degree "
                              f"{self.parallel.ulysses_degree} (each rank would decide to skip blocks from its own "
                              "tokens and the ranks would fall out of step); use cache none, or cfg_parallel alone")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> RunConfig:
        data = {} if data is None else data
        _check_keys("", data, ("model", "attention", "generation", "memory", "speed", "lora", "parallel"))
        return cls(
            attention=AttentionConfig.from_mapping(data.get("attention") or {}),
            generation=GenerationConfig.from_mapping(data.get("generation") or {}),
            model=ModelConfig.from_value(data.get("model")),
            memory=MemoryConfig.from_mapping(data.get("memory") or {}),
            speed=SpeedConfig.from_mapping(data.get("speed") or {}),
            lora=data.get("lora"),
            parallel=ParallelConfig.from_mapping(data.get("parallel") or {}),
        )

    def override(self, **changes: Any) -> RunConfig:
        """Return a copy with generation fields, `model` (the base), `transformer`, `offload`,
        `vae_tiling`, `attention_backend` and the parallel fields (ulysses_degree, cfg_parallel, timeout_s) replaced;
        None values are ignored."""
        changes = {k: v for k, v in changes.items() if v is not None}
        sections: dict[str, dict[str, Any]] = {}
        for name, (section, key) in _SECTION_OVERRIDES.items():
            if name in changes:
                sections.setdefault(section, {})[key] = changes.pop(name)
        for name in PARALLEL_KEYS:
            if name in changes:
                sections.setdefault("parallel", {})[name] = changes.pop(name)
        gen_names = {f.name for f in fields(GenerationConfig)}
        for k in changes:
            if k not in gen_names:
                raise ConfigError(f"unknown generation override '{k}'")
        if changes:
            sections["generation"] = changes
        return dataclasses.replace(
            self, **{s: dataclasses.replace(getattr(self, s), **kv) for s, kv in sections.items()}
        )

    def with_levers(self, *, compile: str | None = None, cache: str | None = None,
                    lora: list | None = None) -> RunConfig:
        """Copy with speed.compile / speed.cache replaced and, when `lora` is given, the LoRA list
        replaced by it (entries as for LoraSpec.parse); None keeps the config's value."""
        speed = self.speed
        if compile is not None or cache is not None:
            speed = dataclasses.replace(speed, **{k: v for k, v in (("compile", compile), ("cache", cache))
                                                  if v is not None})
        return dataclasses.replace(self, speed=speed, lora=self.lora if lora is None else lora)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "attention": self.attention.to_dict(),
                "generation": self.generation.to_dict(), "memory": self.memory.to_dict(),
                "speed": self.speed.to_dict(), "lora": [x.to_dict() for x in self.lora],
                "parallel": self.parallel.to_dict()}


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
