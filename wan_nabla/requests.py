"""Typed requests of the commands: what the user asked for, before any checking.

    flags = RunFlags(config="nabla_0.7", model="tiny", steps=4)
    req = GenerateRequest(prompt="a red fox", output="fox.mp4", flags=flags)
    plan = preflight.plan_generate(req)      # checked, frozen RunPlan (preflight.py)

cli.py builds these from argparse (`RunFlags.from_mapping(vars(args))`); the Python API and
tests build them directly. Every field is a value the user typed (None: not given, the
config's value applies); nothing here validates. To add a flag: add the argparse option in
cli.py and a field of the same name here (RunFlags for flags shared by generate, batch and
compare), then read it in preflight.resolve_run_config.
Limits: no torch, no I/O; frozen so a request cannot change under a running plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class RunFlags:
    """The flags shared by generate, batch and compare (cli.add_generation_flags); None = not given."""

    config: str | None = None
    model: str | None = None
    transformer: str | None = None
    offload: str | None = None
    vae_tiling: str | None = None
    negative_prompt: str | None = None
    size: str | None = None
    frames: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    shift: float | None = None
    seed: int | None = None
    fps: int | None = None
    device: str | None = None
    dtype: str | None = None
    sampler: str | None = None
    compile: str | None = None
    cache: str | None = None
    lora: tuple[str, ...] | None = None
    ulysses_degree: int | None = None
    cfg_parallel: bool | None = None
    attention_backend: str | None = None
    crf: int | None = None
    quantize: str | None = None
    vae_dtype: str | None = None
    quiet: bool = False
    verbose: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunFlags:
        """The fields of this class found in `values` (e.g. vars(argparse.Namespace)); others ignored."""
        kw = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        if kw.get("lora") is not None:
            kw["lora"] = tuple(kw["lora"])
        return cls(**kw)


@dataclass(frozen=True)
class SampleFlags:
    """Which attention calls compare / --save-masks look at (comma-separated indices, None = default)."""

    sample_steps: str | None = None
    sample_layers: str | None = None
    sample_heads: str | None = None


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    output: str | None = None
    overwrite: bool = False
    save_masks: bool = False
    flags: RunFlags = field(default_factory=RunFlags)
    sample: SampleFlags = field(default_factory=SampleFlags)


@dataclass(frozen=True)
class BatchRequest:
    prompts: str
    out_dir: str
    dry_run: bool = False
    engine: str = "local"
    """local: this process (or torchrun ranks); ray: a pool of Ray actors (batch/ray_engine.py)."""
    ray_address: str | None = None
    ray_actors: int | None = None
    max_retries: int | None = None
    ray_transfer: bool = False
    flags: RunFlags = field(default_factory=RunFlags)


@dataclass(frozen=True)
class CompareRequest:
    prompt: str
    out: str
    against: str | None = None
    against_geometry: str | None = None
    overwrite: bool = False
    no_video: bool = False
    max_query_rows: int | None = None
    flags: RunFlags = field(default_factory=RunFlags)
    sample: SampleFlags = field(default_factory=SampleFlags)


@dataclass(frozen=True)
class ServeRequest:
    """`wan-nabla serve`: where to listen and keep jobs; `flags` are the server's generation defaults."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: str = "serve-data"
    api_key: str | None = None
    """None: WAN_NABLA_API_KEY, if set (serve/options.check_flags)."""
    max_queue: int = 100
    flags: RunFlags = field(default_factory=RunFlags)


def request_fields(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The plain fields of request class `cls` found in `values` (flags/sample built separately)."""
    return {f.name: values[f.name] for f in fields(cls) if f.name in values and f.name not in ("flags", "sample")}
