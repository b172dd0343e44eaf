"""The serve preflight: a request's fields become a job through the same checks as `generate`.

    server = server_plan(req.flags)             # at start: config + flags, torchrun layout, model facts
    job = plan_job(server, {"prompt": "a fox", "size": "64x64", "seconds": "1"})   # JobSpec or RequestError
    job.run_config(server)                      # the RunConfig the worker runs this job with

One rule, one place: the server's own values become a RunPlan through preflight.plan_serve and
app.check_environment, the checks `generate` makes (exit 2 before anything is loaded), and each
request goes through plan_job, the ONE adapter between an HTTP body and the product's
validation: the request's values are applied with RunConfig.override (the config's per-field
ranges), then app.item_check (what the model and the sampler can run, as for a batch item) and
preflight.check_text (UTF-8), the same calls `generate` and `batch` make.

Request fields: prompt (required), negative_prompt, size ("WxH"), seconds (frames = seconds x fps
rounded to the nearest 4k+1) or frames, steps, guidance_scale, seed, preset, model (accepted and
recorded: the server has one model). `preset` is a bundled preset's name, never a path: its
attention section is used for the job; the server's model, LoRAs, memory, speed and parallel
settings stay. No field names a file. Unknown fields are refused, so a typo is not silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..app import check_environment, item_check, parallel_plan
from ..config import ConfigError, RunConfig, load_config, parse_size
from ..errors import UsageError
from ..preflight import RunPlan, check_dense_layers, check_text, plan_serve
from ..presets import preset_names, preset_path
from ..requests import RunFlags

MAX_PROMPT_CHARS = 4000
"""Longest prompt (and negative prompt) in characters; UMT5 reads 512 tokens, so more is waste."""
MAX_FIELD_CHARS = 64
FIELDS = (
    "prompt",
    "negative_prompt",
    "size",
    "seconds",
    "frames",
    "steps",
    "guidance_scale",
    "seed",
    "preset",
    "model",
    "input_reference",
)
_PRESET_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class RequestError(ValueError):
    """A bad request value: `param` names the field, the message says what is allowed (HTTP 400)."""

    def __init__(self, param: str | None, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ServerPlan:
    """What the server was started with, checked once (exit 2 on bad values)."""

    config: RunConfig
    parallel: Any
    """app.parallel_plan's ParallelPlan (None for one process)."""
    facts: Any
    """model_source.ModelFacts of the model."""
    model_id: str
    plan: RunPlan | None = None
    """The preflight plan of the server's defaults."""

    @property
    def model(self) -> str:
        return self.plan.model if self.plan is not None else self.facts.model


@dataclass(frozen=True)
class JobSpec:
    """A checked request: everything the worker needs, JSON-serialisable (stored in the queue)."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    frames: int
    steps: int
    guidance_scale: float
    seed: int
    fps: int
    preset: str | None
    model: str
    """The model the client asked for (recorded; the server runs its own)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobSpec:
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def seconds(self) -> str:
        return f"{self.frames / self.fps:g}"

    def run_config(self, server: ServerPlan) -> RunConfig:
        """The server's config with this job's attention (preset) and generation values."""
        cfg = server.config
        if self.preset is not None:
            cfg = dataclasses.replace(cfg, attention=_preset_attention(self.preset, cfg))
        return cfg.override(
            negative_prompt=self.negative_prompt,
            size=(self.width, self.height),
            frames=self.frames,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
        )


def server_plan(flags: RunFlags) -> ServerPlan:
    """The server's defaults from its generation flags, checked like `generate`'s (UsageError / ConfigError)."""
    plan = plan_serve(flags)
    check_environment(plan)  # device, FP8 support, the sampler at the defaults (needs torch)
    return ServerPlan(plan.config, parallel_plan(plan), plan.facts, plan.model_label, plan)


def _preset_attention(name: str, cfg: RunConfig):
    path = preset_path(name)
    if path is None:
        raise RequestError(
            "preset", f"preset: {name!r} is not a bundled preset; use one of {', '.join(preset_names())}"
        )
    attention = load_config(path).attention
    # the backend is the server's choice (what its GPUs run), not the preset's
    return dataclasses.replace(attention, backend=cfg.attention.backend)


def _text(fields: Mapping[str, Any], name: str, required: bool = False) -> str | None:
    v = fields.get(name)
    if v is None:
        if required:
            raise RequestError(name, f"{name}: required; give a non-empty string", "missing_required_parameter")
        return None
    if not isinstance(v, str):
        raise RequestError(name, f"{name}: must be a string")
    limit = MAX_PROMPT_CHARS if name in ("prompt", "negative_prompt") else MAX_FIELD_CHARS
    if len(v) > limit:
        raise RequestError(name, f"{name}: {len(v)} characters is too long; at most {limit}")
    try:
        check_text(v, name, required=required)
    except UsageError as e:
        raise RequestError(name, str(e)) from None
    return v


def _number(fields: Mapping[str, Any], name: str, kind: type) -> Any:
    v = fields.get(name)
    if v is None:
        return None
    if isinstance(v, bool):
        raise RequestError(name, f"{name}: {v!r} is not a number")
    if isinstance(v, str):
        s = v.strip()
        if len(s) > MAX_FIELD_CHARS:
            raise RequestError(name, f"{name}: too long")
        try:
            v = int(s) if kind is int else float(s)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise RequestError(name, f"{name}: {v!r} is not {what}") from None
    if kind is int and isinstance(v, float):
        if not v.is_integer():
            raise RequestError(name, f"{name}: {v!r} is not an integer")
        v = int(v)
    if not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise RequestError(name, f"{name}: {v!r} is not a finite number")
    return v


def _frames_for(seconds: float, fps: int) -> int:
    """seconds x fps, rounded to the nearest frame count of the form 4k+1."""
    return 4 * max(0, round((seconds * fps - 1) / 4)) + 1


def plan_job(server: ServerPlan, fields: Mapping[str, Any]) -> JobSpec:
    """Check one request (module doc); RequestError names the first bad field."""
    unknown = sorted(k for k in fields if k not in FIELDS)
    if unknown:
        raise RequestError(
            unknown[0], f"{unknown[0]}: unknown field; allowed: {', '.join(FIELDS[:-1])}", "unknown_parameter"
        )
    if fields.get("input_reference") is not None:
        raise RequestError("input_reference", "input_reference: not supported; this server generates from text only")
    prompt = _text(fields, "prompt", required=True)
    negative = _text(fields, "negative_prompt")
    model = _text(fields, "model") or server.model_id
    preset = _text(fields, "preset")
    if preset is not None and not _PRESET_NAME.match(preset):
        raise RequestError(
            "preset",
            f"preset: {preset!r} is not a preset name (letters, digits, '_', '.', '-'); a path is never accepted",
        )
    cfg = server.config
    fps = cfg.generation.fps
    frames = _number(fields, "frames", int)
    seconds = _number(fields, "seconds", float)
    if seconds is not None and frames is None:
        if not 0 < seconds <= 3600:
            raise RequestError("seconds", f"seconds: {seconds:g} is not allowed; use a number in (0, 3600]")
        frames = _frames_for(seconds, fps)
    size = _text(fields, "size")
    overrides: dict[str, Any] = {
        "negative_prompt": negative,
        "frames": frames,
        "steps": _number(fields, "steps", int),
        "guidance_scale": _number(fields, "guidance_scale", float),
        "seed": _number(fields, "seed", int),
    }
    try:
        if size is not None:
            overrides["size"] = parse_size(size, "size")
        if preset is not None:
            cfg = dataclasses.replace(cfg, attention=_preset_attention(preset, cfg))
        g = cfg.override(**overrides).generation
        item_check(server.facts, cfg.attention)(g)
        check_dense_layers(server.facts, cfg.attention)
        if cfg.parallel.cfg_parallel and g.guidance_scale <= 1.0:
            raise ConfigError(
                f"guidance_scale: {g.guidance_scale:g} turns classifier-free guidance off, which this "
                "server's --cfg-parallel needs; use a value > 1"
            )
    except ConfigError as e:
        msg = str(e).removeprefix("generation.")
        param = msg.split(":", 1)[0].split("/")[0].strip()
        if param == "frames" and seconds is not None and fields.get("frames") is None:
            param, msg = "seconds", f"seconds: {seconds:g} s at {fps} fps is {frames} frames; {msg}"
        raise RequestError(param if param in FIELDS else None, msg) from None
    return JobSpec(
        prompt=prompt,
        negative_prompt=negative,
        width=g.width,
        height=g.height,
        frames=g.frames,
        steps=g.steps,
        guidance_scale=g.guidance_scale,
        seed=g.seed,
        fps=g.fps,
        preset=preset,
        model=model,
    )
