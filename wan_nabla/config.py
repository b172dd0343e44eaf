"""Typed configuration: generation defaults, the parallel layout, and their YAML form.

    cfg = load_config("nabla_0.7")                        # a bundled preset by name, or a YAML path
    cfg = cfg.override(steps=4, size=(128, 128))          # CLI flags win over the file
    cfg.model.base, cfg.model.transformer, cfg.memory.offload   # the weights, where they live
    cfg = cfg.with_levers(compile="blocks", cache="first-block:0.05", lora=["l.safetensors:0.8"])
    att = AttentionConfig.from_mapping({"type": "sta", "sta_window": [3, 1, 1]})  # attention/config.py

YAML is only a serialization of these dataclasses: unknown keys, wrong types and out-of-range
values raise ConfigError with one line naming the key, the bad value (shortened: a value shown in
a message is at most ~80 characters, however big it is) and what is allowed. The CLI turns
ConfigError into exit code 2.

Reading is defensive (load_config): the file must be a regular file of at most 1 MiB
(input_files.py: a FIFO or /dev/zero is refused, not read); YAML with a key given twice is
refused (PyYAML would silently keep the last value); alias expansion is bounded (an anchor
referenced from nested aliases - the "billion laughs" shape - is refused before it is built, in
milliseconds, instead of building and printing gigabytes); a section that is not a mapping
(`attention: []`) is an error, only `null` means "defaults".

Ranges are the ones the sampler and the number formats can carry (see each field's docstring);
what depends on the model or on two values at once (steps with shift, sizes against the model's
rotary table, dense layers against its depth) is checked before loading by preflight.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .attention.config import ATTENTION_BACKENDS, ATTENTION_TYPES, AttentionConfig, ConfigError  # noqa: F401 - re-exported
from .input_files import CONFIG_MAX_BYTES, InputFileError, read_input_file
from .presets import preset_names, resolve_config_path

DTYPES = ("bfloat16", "float16", "float32")
OFFLOAD_MODES = ("none", "model", "group", "sequential")
AUTO_ON_OFF = ("auto", "on", "off")
SAMPLERS = ("unipc", "euler")
COMPILE_MODES = ("auto", "none", "blocks", "blocks-split")
QUANTIZE_MODES = ("none", "fp8")
VAE_DTYPES = ("fp32", "bf16")
DEFAULT_VAE_DTYPE = "fp32"
"""memory.vae_dtype's default: the one line to change once the GPU measurement decides it
(docs/speed_levers.md, "FP8 and fast decode")."""
CACHE_FORMS = (
    "none, first-block:T (T >= 0), mag (published settings), mag:T[:K] (T >= 0, K >= 1 skips in a row) or mag:calibrate"
)

# Wan2.1's rotary tables hold 1024 positions per axis (WanTransformer3DModel rope_max_seq_len);
# one position is one latent frame (4 video frames) or one 2x2 patch of 8x8-pixel latents (16 px).
ROPE_POSITIONS = 1024
MAX_SIDE = 16 * ROPE_POSITIONS  # 16384 px
MAX_FRAMES = 4 * (ROPE_POSITIONS - 1) + 1  # 4093 frames = 1024 latent frames
NUM_TRAIN_TIMESTEPS = 1000  # Wan's UniPC flow-matching scheduler
MAX_GUIDANCE = 100.0
SHIFT_RANGE = (0.01, 100.0)
YAML_MAX_NODES = 10_000
"""Expanded YAML node budget: a config has ~30 nodes; 10,000 is far above any real file and far
below what makes building or printing the value slow."""
YAML_MAX_FLOW_DEPTH = 32
"""PyYAML's scanner is quadratic in the nesting depth of [ ] / { } (2,000 levels: 2.5 s) and its
composer recursive, so depth is checked on the raw text before parsing; a config needs 2."""

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxtuple, _short.maxdict, _short.maxlevel = 60, 60, 6, 6, 4, 2


def show(value: Any) -> str:
    """repr(value) cut to ~80 characters, whatever its size or nesting (for one-line errors)."""
    return _short.repr(value)


def utf8_problem(text: str) -> str | None:
    """None if `text` can be written as UTF-8; else where and why not. Lone surrogates come from
    bytes that were not UTF-8 (a shell in a Latin-1 locale, a file name) via surrogateescape."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        ch = text[e.start]
        raw = f"byte 0x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else f"U+{ord(ch):04X}"
        return (
            f"is not valid UTF-8 ({raw} at character {e.start + 1}); use UTF-8 text "
            "(check the terminal's or file's encoding)"
        )


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
        raise ConfigError(f"{section or 'config'}: expected a mapping, got {type(data).__name__} {show(data)}")
    for key in data:
        if key not in allowed:
            name = key if isinstance(key, str) and len(key) <= 60 else show(key)
            where = f"{section}.{name}" if section else str(name)
            raise ConfigError(f"unknown key '{where}'; allowed keys: {', '.join(allowed)}")


def _fields_dict(obj: Any) -> dict[str, Any]:
    """Shallow dataclasses.asdict: the fields are scalars and tuples, so there is nothing to copy
    deeply, and asdict's deep copy dominated planning a 10,000-item batch."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _section(data: Mapping[str, Any], key: str) -> Any:
    """A config section: absent or null means defaults; anything else must be a mapping (checked
    by the section's from_mapping), so `attention: []` is an error rather than "defaults"."""
    value = data.get(key)
    return {} if value is None else value


def parse_size(value: Any, key: str = "size") -> tuple[int, int]:
    """'832x480' or [832, 480] -> (width, height); both positive multiples of 16, at most MAX_SIDE."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.lower().replace("×", "x").split("x")]
        # isdecimal (not isdigit: '²' is a digit int() refuses); 6 digits is far above MAX_SIDE and
        # keeps int() away from its 4300-digit limit.
        if len(parts) != 2 or not all(p.isdecimal() and len(p) <= 6 for p in parts):
            raise ConfigError(f"{key}: {show(value)} is not allowed; use WIDTHxHEIGHT, e.g. 832x480")
        w, h = (int(p) for p in parts)
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value):
        w, h = value
    else:
        raise ConfigError(f"{key}: {show(value)} is not allowed; use WIDTHxHEIGHT, e.g. 832x480")
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise ConfigError(f"{key}: width and height must be positive multiples of 16, got {w}x{h}")
    if w > MAX_SIDE or h > MAX_SIDE:
        raise ConfigError(
            f"{key}: {w}x{h} is too large; width and height must be at most {MAX_SIDE} "
            f"(Wan's rotary table has {ROPE_POSITIONS} positions of 16 px per axis)"
        )
    return int(w), int(h)


DEFAULT_CRF = 18
WAN_CRF = 10
"""Wan2.1's MP4 quality: wan/utils/utils.py cache_video writes with imageio quality=8, which
imageio-ffmpeg maps to libx264 -crf int((1 - 8/10) * 51) = 10."""

WAN_T2V_SHIFT = 5.0
"""Wan2.1's text-to-video flow shift at every size (generate.py `_validate_args`: 5.0 unless i2v
at 480p or flf2v/vace). The 1.3B model's README advice (shift 8-12, guidance 6) is the `wan_1.3b`
preset, not a default."""

WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
"""Wan2.1's `sample_neg_prompt` (wan/configs/shared_config.py), which Wan's and the NABLA fork's
T2V use whenever the negative prompt is empty: oversaturation, overexposure, static frames, blur,
subtitles, worst/low quality, JPEG artefacts, extra or malformed fingers, hands and faces,
deformed limbs, fused fingers, cluttered backgrounds, three legs, crowded backgrounds, walking
backwards."""


def default_shift(width: int, height: int) -> float:
    """The flow shift used when none is given: Wan's T2V value at every size (WAN_T2V_SHIFT)."""
    return WAN_T2V_SHIFT


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling defaults; every field can be overridden on the command line."""

    size: tuple[int, int] = (832, 480)
    """(width, height) in pixels, multiples of 16, each at most 16384. YAML: '832x480' or [832, 480].
    Why 16384: one rotary position is one 2x2 patch of the 8x-downsampled latents (16 px), and
    Wan2.1's tables hold 1024 positions per axis; past that diffusers fails inside the first step.
    A model with a smaller table (the tiny model: 64, i.e. 1024 px) is checked against its own
    value before loading (preflight.py)."""
    frames: int = 81
    """Video frames, of the form 4k+1 (the Wan VAE compresses time by 4), at most 4093: 1024
    latent frames, the rotary table's length on the time axis (a smaller table is checked by
    preflight.py)."""
    steps: int = 50
    """Denoising steps (UniPC flow matching), 1..1000. The scheduler maps each step's sigma to
    one of its 1000 training timesteps, so more steps than that can only repeat timesteps. Not every
    count up to 1000 runs: when the first two integer timesteps coincide (shift 3.0: from 501
    steps; shift 5.0: from 251; shift 100: from 12) diffusers' UniPC starts at the wrong index and
    fails with an assertion at the last step. That set depends on the shift, so it is checked
    exactly, with the scheduler itself, before loading (app.check_sampler)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale in [0, 100]; <= 1 disables the unconditional pass. The
    guided prediction uncond + g * (cond - uncond) grows linearly in g and the latents with it; they
    are cast to the transformer's dtype every step, and float16 overflows at 65504 (NaN frames,
    measured on the tiny model at g = 1e8; bf16/fp32 at 1e38). Published Wan settings are 5-6 and
    no useful CFG exceeds ~20; 100 keeps a wide margin to every dtype's range."""
    shift: float | None = None
    """Flow-matching shift in [0.01, 100]; None is Wan's T2V value, 5.0, at every size. The schedule
    is sigma' = shift*s / (1 + (shift-1)*s): far outside that range every sigma rounds to 0 or 1
    (NaN from UniPC's log-SNR at shift 1e-30 and 1e30, measured), and large shifts leave room for
    only a few steps (see `steps`). Published flow shifts are 1-17."""
    seed: int = 0
    fps: int = 16
    crf: int = DEFAULT_CRF
    """MP4 quality, x264's constant rate factor in [0, 51] (lower: finer, larger files). 18 is
    visually lossless for generated video. Wan2.1 writes with imageio quality=8, which imageio-ffmpeg
    turns into CRF int((1 - 8/10) * 51) = 10 (about 2-3x the file size): --crf 10 for its setting."""
    negative_prompt: str | None = None
    """None (not given): Wan's `sample_neg_prompt` (WAN_NEGATIVE_PROMPT) whenever guidance_scale > 1,
    as Wan and the NABLA fork do; "" (given empty) really is empty."""
    dtype: str = "bfloat16"
    """Transformer and text-encoder dtype (the VAE's is memory.vae_dtype)."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    batch_cfg: bool = True
    """Run the conditional and unconditional passes as one batch of two."""
    sampler: str = "unipc"
    """unipc: diffusers' UniPC flow-matching multistep solver on Wan's FlowUniPC schedule
    (sampling.py: sigmas linspace(0.999, 0, steps + 1)[:-1], shifted; the last sigma 0). euler:
    first-order flow-matching Euler on sigmas linspace(1, 0, steps + 1)[:-1] before the shift (for 4
    steps: timesteps 1000/750/500/250), the schedule step-distilled LoRAs such as LightX2V's are
    trained for."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", parse_size(self.size, "generation.size"))
        f = self.frames
        if not _is_int(f) or f < 1 or (f - 1) % 4 or f > MAX_FRAMES:
            raise ConfigError(
                f"generation.frames: {show(f)} is not allowed; use 4k+1 frames (1, 5, ..., 17, ..., 81)"
                + (f", at most {MAX_FRAMES}" if _is_int(f) and f > MAX_FRAMES else "")
            )
        if not _is_int(self.steps) or not (1 <= self.steps <= NUM_TRAIN_TIMESTEPS):
            raise ConfigError(
                f"generation.steps: {show(self.steps)} is not allowed; use an integer in [1, {NUM_TRAIN_TIMESTEPS}]"
            )
        g = self.guidance_scale
        if not _is_number(g) or not (0 <= g <= MAX_GUIDANCE):
            raise ConfigError(
                f"generation.guidance_scale: {show(g)} is not allowed; use a number in [0, {MAX_GUIDANCE:g}]"
            )
        object.__setattr__(self, "guidance_scale", float(g))
        if self.shift is not None:
            lo, hi = SHIFT_RANGE
            if not _is_number(self.shift) or not (lo <= self.shift <= hi):
                raise ConfigError(
                    f"generation.shift: {show(self.shift)} is not allowed; use a number in [{lo:g}, {hi:g}]"
                )
            object.__setattr__(self, "shift", float(self.shift))
        if not _is_int(self.seed) or self.seed < 0 or self.seed >= 2**63:
            raise ConfigError(f"generation.seed: {show(self.seed)} is not allowed; use an integer in [0, 2**63)")
        if not _is_int(self.fps) or not (1 <= self.fps <= 240):
            raise ConfigError(f"generation.fps: {show(self.fps)} is not allowed; use an integer in [1, 240]")
        if not _is_int(self.crf) or not (0 <= self.crf <= 51):
            raise ConfigError(
                f"generation.crf: {show(self.crf)} is not allowed; use an integer in [0, 51] "
                f"(x264 CRF; default {DEFAULT_CRF}, Wan2.1's imageio quality=8 is {WAN_CRF})"
            )
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ConfigError(f"generation.negative_prompt: {show(self.negative_prompt)} is not allowed; use a string")
        if self.negative_prompt is not None and (why := utf8_problem(self.negative_prompt)) is not None:
            raise ConfigError(f"generation.negative_prompt: {why}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"generation.dtype: {show(self.dtype)} is not allowed; use one of {', '.join(DTYPES)}")
        d = self.device
        if not isinstance(d, str) or not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ConfigError(f"generation.device: {show(d)} is not allowed; use auto, cpu, cuda or cuda:N")
        if not isinstance(self.batch_cfg, bool):
            raise ConfigError(f"generation.batch_cfg: {show(self.batch_cfg)} is not allowed; use true or false")
        if self.sampler not in SAMPLERS:
            raise ConfigError(
                f"generation.sampler: {show(self.sampler)} is not allowed; use one of {', '.join(SAMPLERS)}"
            )

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    @property
    def resolved_shift(self) -> float:
        return self.shift if self.shift is not None else default_shift(*self.size)

    @property
    def resolved_negative_prompt(self) -> str:
        """The negative prompt the run encodes: the given one, else Wan's when guidance is on."""
        if self.negative_prompt is not None:
            return self.negative_prompt
        return WAN_NEGATIVE_PROMPT if self.guidance_scale > 1.0 else ""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> GenerationConfig:
        return _from_section(cls, "generation", data)

    def to_dict(self) -> dict[str, Any]:
        d = _fields_dict(self)
        d["size"] = f"{self.size[0]}x{self.size[1]}"
        d["shift"] = self.resolved_shift
        d["negative_prompt"] = self.resolved_negative_prompt
        return d


def _optional_text(key: str, value: Any, allowed: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{key}: {show(value)} is not allowed; use {allowed}")
    if value is not None and (why := utf8_problem(value)) is not None:
        raise ConfigError(f"{key}: {why}")
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
        _optional_text(
            "model.transformer", self.transformer, "a .safetensors file, an index .json, a directory or a hub repo id"
        )
        _optional_text("model.recommended_transformer", self.recommended_transformer, "a hub repo id (owner/name)")

    @classmethod
    def from_value(cls, data: Any) -> ModelConfig:
        """`model:` as written in YAML: None, a string (the base) or a mapping of the fields."""
        if data is None or isinstance(data, ModelConfig):
            return data or cls()
        if not isinstance(data, Mapping):
            if not isinstance(data, str) or not data.strip():
                raise ConfigError(
                    f"model: {data!r} is not allowed; use tiny, a directory, a hub repo id "
                    "or a mapping with base, transformer, recommended_transformer"
                )
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
    (auto: always with group / sequential offload; else on CUDA when the untiled decode would not
    fit in free memory, elsewhere from offload.VAE_TILING_AUTO_PIXELS per frame). Under torchrun
    with more than one rank per video, auto and on split the tiled decode over those ranks
    (distributed/decode.py); off: the group's first rank decodes alone, untiled."""
    vae_dtype: str = DEFAULT_VAE_DTYPE
    """The VAE decode's precision: fp32 (Wan's reference) or bf16 (about half the memory and
    time of an fp32 decode on an H200, 47 dB PSNR against it on random weights; the default is
    chosen from the measurement in docs/speed_levers.md: DEFAULT_VAE_DTYPE)."""

    def __post_init__(self) -> None:
        if self.offload not in OFFLOAD_MODES:
            raise ConfigError(f"memory.offload: {self.offload!r} is not allowed; use one of {', '.join(OFFLOAD_MODES)}")
        if self.vae_tiling not in AUTO_ON_OFF:
            raise ConfigError(
                f"memory.vae_tiling: {self.vae_tiling!r} is not allowed; use one of {', '.join(AUTO_ON_OFF)}"
            )
        if self.vae_dtype not in VAE_DTYPES:
            raise ConfigError(
                f"memory.vae_dtype: {show(self.vae_dtype)} is not allowed; use one of {', '.join(VAE_DTYPES)}"
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> MemoryConfig:
        return _from_section(cls, "memory", data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Flag-style overrides that RunConfig.override routes to a section other than `generation`.
_SECTION_OVERRIDES = {
    "model": ("model", "base"),
    "transformer": ("model", "transformer"),
    "offload": ("memory", "offload"),
    "vae_tiling": ("memory", "vae_tiling"),
    "vae_dtype": ("memory", "vae_dtype"),
    "attention_backend": ("attention", "backend"),
}


def parse_cache(spec: str, key: str = "speed.cache") -> tuple[str, dict[str, Any]]:
    """'none' | 'first-block:T' | 'mag' | 'mag:T[:K]' | 'mag:calibrate' -> (kind, parameters); what
    `mag` leaves out (threshold, K) comes from magcache.resolve for the loaded model."""
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
        if kind == "mag" and not args:
            return "mag", {}
        if kind == "mag" and args == ["calibrate"]:
            return "mag", {"calibrate": True}
        if kind == "mag" and len(args) in (1, 2):
            threshold, max_skip = float(args[0]), int(args[1]) if len(args) == 2 else None
            if math.isfinite(threshold) and threshold >= 0 and (max_skip is None or max_skip >= 1):
                return "mag", {"threshold": threshold, **({"max_skip_steps": max_skip} if max_skip else {})}
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
    1..N-1 of a step while block 0's residual changed by a relative mean below T) | mag | mag:T[:K]
    (MagCache: skip whole steps while the error accumulated from the magnitude ratios stays <= T,
    at most K in a row, never in the first 20% of steps; `mag` alone: the published threshold and
    K of Wan2.1 T2V 1.3B / 14B, magcache.py) | mag:calibrate (skip nothing; record the ratios)."""
    mag_ratios: tuple[float, ...] | None = None
    """This model's per-step residual magnitude ratios (from mag:calibrate). None: the published
    ratios of Wan2.1 T2V 1.3B / 14B, chosen by the loaded transformer's shape (other models are
    refused). Interpolated by diffusers when their count differs from the steps."""
    quantize: str = "none"
    """none | fp8: the Linear layers of the transformer blocks run FP8 e4m3 GEMMs with dynamic
    per-token x per-channel scales (torchao; quantize.py). Needs a CUDA GPU of compute capability
    >= 8.9 and is meant for compiled blocks (eager FP8 is slower than compiled bf16)."""

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"speed.compile: {self.compile!r} is not allowed; use one of {', '.join(COMPILE_MODES)}")
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(
                f"speed.quantize: {show(self.quantize)} is not allowed; use one of {', '.join(QUANTIZE_MODES)}"
            )
        kind, params = parse_cache(self.cache)
        r = self.mag_ratios
        if r is not None:
            if not isinstance(r, (list, tuple)) or not r or not all(_is_number(x) and x > 0 for x in r):
                raise ConfigError(f"speed.mag_ratios: {r!r} is not allowed; use a list of positive numbers")
            object.__setattr__(self, "mag_ratios", tuple(float(x) for x in r))
        if kind == "mag" and self.mag_ratios is not None and "threshold" not in params:
            raise ConfigError(
                f"speed.cache: {self.cache!r} takes the published settings, which go with the "
                "published ratios; with speed.mag_ratios give the threshold: mag:T[:K]"
            )

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
                if path.lower().endswith(".safetensors"):  # PATH:SCALE with a scale that is not a number
                    raise ConfigError(
                        f"lora: scale {scale!r} in {value!r} is not a number; use PATH[:SCALE] "
                        "with SCALE a number such as 0.8"
                    ) from None
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
        return _from_section(cls, "parallel", data)

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
            raise ConfigError(
                f"speed.compile: {self.speed.compile!r} does not combine with memory.offload "
                f"{self.memory.offload!r} (compiled blocks are not traced through offload hooks); "
                "use compile none or auto, or offload none"
            )
        if self.speed.cache_kind != "none" and self.parallel.ulysses_degree > 1:
            raise ConfigError(
                f"speed.cache: {self.speed.cache!r} does not combine with parallel.ulysses_degree "
                f"{self.parallel.ulysses_degree} (each rank would decide to skip blocks from its own "
                "tokens and the ranks would fall out of step); use cache none, or cfg_parallel alone"
            )
        if self.speed.quantize == "fp8" and self.generation.dtype == "float32":
            raise ConfigError(
                "speed.quantize: 'fp8' does not combine with generation.dtype 'float32' (FP8 GEMMs take "
                "bf16/fp16 activations; an fp32 run would not be the fp8 path it is labelled as); "
                "use dtype bfloat16, or quantize none"
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> RunConfig:
        data = {} if data is None else data
        _check_keys("", data, ("model", "attention", "generation", "memory", "speed", "lora", "parallel"))
        return cls(
            attention=AttentionConfig.from_mapping(_section(data, "attention")),
            generation=GenerationConfig.from_mapping(_section(data, "generation")),
            model=ModelConfig.from_value(data.get("model")),
            memory=MemoryConfig.from_mapping(_section(data, "memory")),
            speed=SpeedConfig.from_mapping(_section(data, "speed")),
            lora=_lora_list(data.get("lora")),
            parallel=ParallelConfig.from_mapping(_section(data, "parallel")),
        )

    def override(self, **changes: Any) -> RunConfig:
        """Return a copy with generation fields, `model` (the base), `transformer`, `offload`,
        `vae_tiling`, `vae_dtype`, `attention_backend` and the parallel fields (ulysses_degree, cfg_parallel, timeout_s) replaced;
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

    def with_levers(
        self,
        *,
        compile: str | None = None,
        cache: str | None = None,
        lora: list | None = None,
        quantize: str | None = None,
    ) -> RunConfig:
        """Copy with speed.compile / speed.cache / speed.quantize replaced and, when `lora` is
        given, the LoRA list replaced by it (entries as for LoraSpec.parse); None keeps the value."""
        speed = self.speed
        changes: dict[str, Any] = {
            k: v for k, v in (("compile", compile), ("cache", cache), ("quantize", quantize)) if v is not None
        }
        if changes:
            speed = dataclasses.replace(speed, **changes)
        return dataclasses.replace(self, speed=speed, lora=self.lora if lora is None else _lora_list(lora))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "attention": self.attention.to_dict(),
            "generation": self.generation.to_dict(),
            "memory": self.memory.to_dict(),
            "speed": self.speed.to_dict(),
            "lora": [x.to_dict() for x in self.lora],
            "parallel": self.parallel.to_dict(),
        }


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                    continue
                key = self.construct_object(key_node, deep=False)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: SafeLoader reports it itself
                    continue
                if duplicate:
                    raise ConfigError(
                        f"duplicate key {show(key)} (line {key_node.start_mark.line + 1}); each key may appear once"
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: yaml.Node, limit: int = YAML_MAX_NODES) -> None:
    """Refuse a node graph whose alias expansion exceeds `limit` nodes, or that refers to itself.

    Aliases make the composed graph a DAG whose expansion can be exponential in the file size; its
    expanded size is computed here in time linear in the number of distinct nodes (memoised by
    identity), before anything is constructed."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    active: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        nid = id(node)
        if isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        else:
            kids = []
        if children_done:
            active.discard(nid)
            size[nid] = 1 + sum(size[id(k)] for k in kids)
            if size[nid] > limit:
                raise ConfigError(
                    f"YAML aliases expand to more than {limit} values (line {node.start_mark.line + 1}); "
                    "a config needs a few dozen: write the values out"
                )
            continue
        if nid in size:
            continue
        active.add(nid)
        stack.append((node, True))
        for k in kids:
            if id(k) in active:
                raise ConfigError(
                    f"YAML alias refers to itself (line {k.start_mark.line + 1}); configs cannot be recursive"
                )
            if id(k) not in size:
                stack.append((k, False))


def _flow_depth(text: str) -> int:
    """Deepest [ / { nesting of `text`, skipping quoted strings and comments (a conservative
    estimate: a bracket inside a plain scalar counts too)."""
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(0, depth - 1)
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c == "'":
            i = text.find("'", i + 1)  # '' (an escaped quote) just closes and reopens
            i = n if i < 0 else i
        elif c == "#" and (i == 0 or text[i - 1] in " \t\n"):
            i = text.find("\n", i)
            i = n if i < 0 else i
        i += 1
    return deepest


def _tag_of(e: yaml.YAMLError) -> str | None:
    """The tag a ConstructorError refused, in the short form the user wrote (!!python/...)."""
    if not isinstance(e, yaml.constructor.ConstructorError):
        return None
    found = re.search(r"tag '([^']+)'", str(getattr(e, "problem", "") or ""))
    if not found:
        return None
    return found.group(1).replace("tag:yaml.org,2002:", "!!")


def _clip_words(text: str, limit: int = 160) -> str:
    """One line of at most ~`limit` characters, cut between words (never inside one)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values, with the rules of the module doc (ConfigError, one line)."""
    if _flow_depth(text) > YAML_MAX_FLOW_DEPTH:
        raise ConfigError(f"YAML nested more than {YAML_MAX_FLOW_DEPTH} levels deep; a config needs 2")
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        tag = _tag_of(e)
        if tag:  # e.g. !!python/object: never constructed; say so whole instead of cutting the tag
            raise ConfigError(
                f"not valid YAML{where}: the tag {tag!r} is not allowed; a config holds plain "
                "values (numbers, strings, lists, mappings) only"
            ) from None
        first = getattr(e, "problem", None) or str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"not valid YAML{where}: {_clip_words(str(first))}") from None
    except RecursionError:
        raise ConfigError("not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def load_config(path: str | Path | None) -> RunConfig:
    """Read and validate a YAML config (a path, or a bundled preset's name: presets/__init__.py);
    None gives the defaults (full attention). See the module doc for what is refused."""
    if path is None:
        return RunConfig()
    p = resolve_config_path(path)
    try:
        raw = read_input_file(p, "config file", CONFIG_MAX_BYTES)
    except InputFileError as e:
        if not os.path.lexists(p):
            raise ConfigError(
                f"config file {str(p)!r} does not exist; give a YAML path or a preset name: {', '.join(preset_names())}"
            ) from None
        raise ConfigError(str(e)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {e.start + 1}); save it as UTF-8") from None
    try:
        data = parse_yaml(text)
        return RunConfig.from_mapping(data)
    except ConfigError as e:
        raise ConfigError(f"config file {str(p)!r}: {e}") from None
    except TypeError as e:  # e.g. an argument the dataclass does not take
        raise ConfigError(f"config file {str(p)!r}: {e}") from None
