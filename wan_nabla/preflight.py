"""Preflight: a request (requests.py) becomes ONE frozen RunPlan, or one usage error; no torch.

    plan = plan_generate(GenerateRequest(prompt="a fox", flags=RunFlags(model="tiny")))
    plan.config, plan.model, plan.facts, plan.parallel, plan.output, plan.levers, plan.notes
    plan = plan_batch(BatchRequest("prompts.txt", "out/", dry_run=True))   # never resolves weights
    plan = plan_compare(CompareRequest("a fox", "cmp/", flags=RunFlags(config="nabla_0.4")))

Everything after this reads the plan; every rule runs once, here, before torch or diffusers is
imported (the layering is tested: tests/test_preflight.py), in this order:
1. the config: file or preset, then the flags (resolve_run_config; the flag is named in errors);
2. texts that cannot be written as UTF-8; the output target (generate: the MP4 and its sidecar;
   batch / compare: the directory) without creating anything;
3. the model: resolved once (--model > config > weights/Wan2.1-T2V-1.3B-Diffusers > hub id),
   checked to be available (not for a batch dry run: it loads nothing, so it needs no weights),
   its facts read from its config files (model_source.ModelFacts);
4. LoRA files (readable safetensors with LoRA keys) and DiT weights;
5. what the model cannot run: rotary table length, dense_layers past its depth;
6. the parallel layout under torchrun (rank layout, Ulysses degree dividing the heads);
7. degenerate settings that run but not as the user may think (an STA window that covers the
   whole grid, so attention is full): one line each in `notes`, logged once by the runner.
Limits: checks that need torch run in the runner right after this (app.check_environment: the
device exists, the UniPC sampler's step limit at the shift); the head count of a hub model
that is not cached is unknown here and is checked when attention is installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .attention import config as attention_rules
from .batch.prompts import PromptFileError, PromptItem, read_prompt_file
from .batch.ray_options import RayOptions, ray_options
from .config import (
    AttentionConfig,
    ConfigError,
    GenerationConfig,
    RunConfig,
    load_config,
    parse_size,
    utf8_problem,
)
from .distributed.launch import Launch, RankLayout, plan_ranks
from .errors import LoraError, UsageError
from .magcache import check as check_mag
from .model_source import (
    TINY_GENERATION,
    TINY_HEADS,
    TINY_LAYERS,
    TINY_MODEL_ID,
    ModelFacts,
    check_available,
    model_facts,
    model_file,
    resolve_model,
)
from .output.files import probe_writable
from .output.naming import has_control_chars, unique_path
from .output.sidecar import check_destination, sidecar_path
from .requests import (
    BatchRequest,
    CompareRequest,
    GenerateRequest,
    RunFlags,
    SampleFlags,
)

log = logging.getLogger("wan_nabla")

SAMPLE_KINDS = ("steps", "layers", "heads")


@dataclass(frozen=True)
class ParallelLayout:
    """This process's place in a torchrun job and the checked rank layout (distributed/launch.py)."""

    launch: Launch
    layout: RankLayout
    timeout_s: float


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs to know, checked (module doc). Frozen: nothing after preflight
    changes it; a field added by a new feature gets a default so older callers keep working."""

    command: str
    config: RunConfig
    model: str
    """The resolved base model ('tiny', a directory or a hub id)."""
    facts: ModelFacts
    parallel: ParallelLayout | None = None
    """None: one process without parallel settings."""
    output: Path | None = None
    """generate: the MP4 (its sidecar beside it); batch and compare: the output directory."""
    reference: RunConfig | None = None
    """compare: the run the candidate is compared with (--against's attention)."""
    items: tuple[PromptItem, ...] = ()
    """batch: the prompt file's items, bad lines included (each becomes a failed item)."""
    sampling: Mapping[str, tuple[int, ...] | None] = field(default_factory=dict)
    """compare / --save-masks: the --sample-* indices (None = default), syntax checked."""
    model_checked: bool = True
    """False for a batch dry run: the model was resolved but not looked up (it loads nothing)."""
    ray: RayOptions | None = None
    """batch --engine ray: the checked Ray options (None for the local engine)."""
    notes: tuple[str, ...] = ()
    """Degenerate settings that run anyway: one warning each, logged once by the runner."""

    def __post_init__(self) -> None:
        # frozen all the way down: the sampling table is read-only too
        object.__setattr__(self, "sampling", MappingProxyType(dict(self.sampling)))

    @property
    def model_label(self) -> str:
        """The resolved base model, plus the DiT weights when --transformer replaces its own."""
        dit = self.config.model.transformer
        return f"{self.model} + transformer {dit}" if dit else self.model

    @property
    def levers(self) -> dict[str, Any]:
        """The speed levers asked for: compile mode, step cache, LoRAs (resolved by the pipeline)."""
        return {
            "compile": self.config.speed.compile,
            "cache": self.config.speed.cache,
            "lora": [spec.to_dict() for spec in self.config.lora],
        }


OVERRIDE_FLAGS = (
    "model",
    "negative_prompt",
    "frames",
    "steps",
    "guidance_scale",
    "shift",
    "seed",
    "fps",
    "device",
    "dtype",
    "transformer",
    "offload",
    "vae_tiling",
    "sampler",
    "ulysses_degree",
    "cfg_parallel",
    "attention_backend",
    "crf",
    "vae_dtype",
)
"""RunFlags fields passed to RunConfig.override under their own name (size is parsed first); a
flag added by another feature joins this tuple (and requests.RunFlags)."""


# ---- the config --------------------------------------------------------------------------------
def resolve_run_config(flags: RunFlags) -> RunConfig:
    """Config file + flag overrides, validated (ConfigError names the flag the user typed)."""
    cfg = load_config(flags.config)
    size = parse_size(flags.size, "--size") if flags.size is not None else None
    if (flags.model or cfg.model.base) == TINY_MODEL_ID:
        tiny = {k: v for k, v in TINY_GENERATION.items() if getattr(flags, k) is None}
        if tiny:
            log.info("--model tiny: using %s (give the flags to change)", tiny)
            cfg = cfg.override(**tiny)
    # Every RunFlags field that overrides a config value, by RunConfig.override's keyword.
    overrides: dict[str, Any] = {name: getattr(flags, name) for name in OVERRIDE_FLAGS}
    overrides["size"] = size
    levers = {
        "compile": flags.compile,
        "cache": flags.cache,
        "lora": list(flags.lora) if flags.lora else None,
        "quantize": flags.quantize,
    }
    try:
        return cfg.override(**overrides).with_levers(**levers)
    except ConfigError as e:
        raise ConfigError(_name_flag(str(e), overrides, levers)) from None


def _name_flag(msg: str, overrides: Mapping[str, Any], levers: Mapping[str, Any]) -> str:
    named = {f"{s}.{k}": (k, v) for k, v in overrides.items() for s in ("generation", "memory", "model", "parallel")}
    named.update(
        {
            "attention.backend": ("attention_backend", overrides["attention_backend"]),
            "speed.compile": ("compile", levers["compile"]),
            "speed.cache": ("cache", levers["cache"]),
            "speed.quantize": ("quantize", levers["quantize"]),
            "lora": ("lora", levers["lora"]),
        }
    )
    for key, (name, value) in named.items():  # name the flag the user typed, not only the config key
        if value is not None and msg.startswith(f"{key}:"):
            return f"--{name.replace('_', '-')} ({key}):{msg[len(key) + 1 :]}"
    return msg


# ---- single checks -----------------------------------------------------------------------------
def check_text(text: str | None, what: str, required: bool = False) -> None:
    """UsageError if `text` cannot be written as UTF-8 (or is empty when required)."""
    if text is None or not text.strip():
        if required:
            raise UsageError(f"{what}: must be a non-empty string")
        return
    why = utf8_problem(text)
    if why is not None:
        raise UsageError(f"{what}: {why}")


def check_path_text(path: str, what: str) -> None:
    """UsageError for a path that cannot be written as UTF-8 or holds control characters
    (a newline in a file name breaks every tool that lists files one per line)."""
    check_text(path, what)
    if has_control_chars(path):
        raise UsageError(f"{what}: {path!r} contains control characters (such as a newline); give a name without them")


def preflight_loras(specs) -> None:
    """Cheap checks before a model is loaded: peft installed, each file a readable safetensors
    file with LoRA keys (the header only: no tensor is read). Raises LoraError."""
    if not specs:
        return
    if importlib.util.find_spec("peft") is None:
        raise LoraError("--lora needs the peft package; install it with: pip install 'wan-nabla[lora]'")
    for spec in specs:
        keys = safetensors_keys(Path(spec.path))
        if not any("lora" in k or k.endswith((".diff", ".diff_b", ".diff_m")) for k in keys):
            raise LoraError(
                f"LoRA {spec.path!r}: no LoRA weights in it (no key contains 'lora' or ends in "
                f".diff/.diff_b/.diff_m; "
                f"first key {keys[0]!r})"
                if keys
                else f"LoRA {spec.path!r}: the file holds no tensors"
            )


SAFETENSORS_MAX_HEADER = 100 << 20
"""safetensors' own limit on the JSON header (100 MB)."""


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names of a .safetensors file from its header (8-byte little-endian length + JSON)."""
    if not path.is_file():
        raise LoraError(f"LoRA {str(path)!r} does not exist or is not a file")
    bad = f"LoRA {str(path)!r} is not a readable safetensors file"
    try:
        with path.open("rb") as fh:
            raw = fh.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
            text = fh.read(n) if n is not None and n <= SAFETENSORS_MAX_HEADER else b""
    except OSError as e:
        raise LoraError(f"{bad} ({e.strerror or e})") from None
    if n is None:
        raise LoraError(f"{bad} (shorter than its 8-byte header length)")
    if n > SAFETENSORS_MAX_HEADER:
        raise LoraError(f"{bad} (header length {n} is past the 100 MB limit)")
    try:
        header = json.loads(text.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise LoraError(f"{bad} (header is not JSON: {' '.join(str(e).split())[:120]})") from None
    if not isinstance(header, dict):
        raise LoraError(f"{bad} (header is not a JSON object)")
    return [k for k in header if k != "__metadata__"]


def check_dense_layers(facts: ModelFacts, attention: AttentionConfig) -> None:
    """attention.config.check_dense_layers against the model's facts (before it is loaded)."""
    attention_rules.check_dense_layers(attention, facts.num_layers, f"model {facts.model!r}")


def check_model_fits(facts: ModelFacts, g: GenerationConfig, attention: AttentionConfig) -> None:
    """ConfigError for settings this model cannot run: the rotary table, dense_layers past its depth."""
    check_dense_layers(facts, attention)
    pt, ph, pw = facts.patch
    f, h, w = facts.latent_grid(g.width, g.height, g.frames)
    over = {k: v for k, v in {"frames": f, "height": h, "width": w}.items() if v > facts.rope_positions}
    if over:
        side = facts.rope_positions * 8 * min(ph, pw)
        frames = 4 * (facts.rope_positions * pt - 1) + 1
        raise ConfigError(
            f"generation.size/frames: {g.width}x{g.height}, {g.frames} frames needs {max(over.values())} "
            f"rotary positions on the {'/'.join(over)} axis, but model {facts.model!r} has "
            f"{facts.rope_positions}; use at most {side} px per side and {frames} frames"
        )


TILE_SIDE = 8
"""Latent patches per tile side (attention/layout.py TILE_SIDE); STA windows count tiles."""


def window_covers_grid(attention: AttentionConfig, facts: ModelFacts, g: GenerationConfig) -> str | None:
    """The warning for an STA window that reaches every tile from every tile at this size (so
    attention is full, computed through the sparse kernel), else None."""
    if attention.sta_window is None:
        return None
    f, h, w = facts.latent_grid(g.width, g.height, g.frames)
    grid = (f, -(-h // TILE_SIDE), -(-w // TILE_SIDE))
    if any(win // 2 < n - 1 for win, n in zip(attention.sta_window, grid, strict=False)):
        return None
    reach = "x".join(str(2 * n - 1) for n in grid)
    return (
        f"attention.sta_window {list(attention.sta_window)} covers the whole {grid[0]}x{grid[1]}x{grid[2]} "
        f"tile grid of {g.width}x{g.height}, {g.frames} frames: every tile attends to every tile, so this runs "
        f"full attention (density 1.0) through the sparse kernel; a window below {reach} is sparse here"
    )


def parse_indices(text: str | None) -> tuple[int, ...] | None:
    """'0,2,-1' -> (0, 2, -1); None or '' -> None (the default sampling). ValueError otherwise."""
    if text is None or not str(text).strip():
        return None
    out = []
    for part in str(text).split(","):
        try:
            out.append(int(part.strip()))
        except ValueError:
            raise ValueError(f"{text!r} is not allowed; use comma-separated integers such as 0,2,-1") from None
    return tuple(out)


def parse_sampling(sample: SampleFlags) -> dict[str, tuple[int, ...] | None]:
    """The --sample-* flags as index tuples (None = default), syntax only."""
    out = {}
    for what in SAMPLE_KINDS:
        try:
            out[what] = parse_indices(getattr(sample, f"sample_{what}"))
        except ValueError as e:
            raise UsageError(f"--sample-{what}: {e}") from None
    return out


def check_parallel(
    cfg: RunConfig, command: str, facts: ModelFacts, env: Mapping[str, str] | None = None
) -> ParallelLayout | None:
    """The checked layout of this process, or None when it runs alone without parallel settings.
    Pure and identical on every rank, so a bad combination is the same error everywhere."""
    launch = Launch.from_env(env)
    par = cfg.parallel
    if not launch.distributed and par.group_size == 1:
        return None
    layout = plan_ranks(
        par, launch.world_size, command=command, heads=facts.heads, guidance_scale=cfg.generation.guidance_scale
    )
    return ParallelLayout(launch, layout, par.timeout_s)


def default_output_dir() -> Path:
    """Where `generate` writes without --output: $WAN_NABLA_OUTPUT_DIR (the Docker image sets its
    /outputs volume), else outputs/ in the working directory."""
    return Path(os.environ.get("WAN_NABLA_OUTPUT_DIR") or "outputs")


def default_output(prompt: str) -> Path:
    """default_output_dir()/<prompt slug>.mp4, suffixed -2, -3, ... past names whose MP4 or
    sidecar is taken."""
    return unique_path(
        default_output_dir(), prompt, available=lambda p: not any(map(os.path.lexists, (p, sidecar_path(p))))
    )


def _model(cfg: RunConfig, check: bool) -> tuple[str, ModelFacts]:
    model = resolve_model(cfg.model.base, None)
    if check:
        check_available(model, cfg.model.base, transformer_weights=cfg.model.transformer is None)
    if cfg.speed.cache_kind == "mag":  # published MagCache ratios exist for this model's shape?
        check_mag(cfg.speed, transformer_config_on_disk(model))
    return model, model_facts(model)


def transformer_config_on_disk(model: str) -> dict[str, Any] | None:
    """The transformer config.json of `model` without loading or downloading anything; None if unknown."""
    if model == TINY_MODEL_ID:  # tiny.TINY_TRANSFORMER_CONFIG's shape, without importing torch
        return {"num_layers": TINY_LAYERS, "num_attention_heads": TINY_HEADS, "attention_head_dim": 32}
    path = model_file(model, "transformer/config.json")
    try:
        tc = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        tc = {}
    if not isinstance(tc, dict):
        return None
    keys = ("num_layers", "num_attention_heads", "attention_head_dim")
    return tc if all(isinstance(tc.get(k), int) for k in keys) else None


def _check_existing_dir(path: Path, what: str) -> None:
    """An existing directory must accept new files; a missing one is created by the run."""
    if path.is_dir():
        probe_writable(path, what)


# ---- the three commands ------------------------------------------------------------------------
def plan_generate(req: GenerateRequest, env: Mapping[str, str] | None = None) -> RunPlan:
    check_text(req.prompt, "--prompt", required=True)
    cfg = resolve_run_config(req.flags)
    model, facts = _model(cfg, check=True)
    preflight_loras(cfg.lora)
    check_model_fits(facts, cfg.generation, cfg.attention)
    parallel = check_parallel(cfg, "generate", facts, env)
    if req.output is not None:
        output = Path(req.output)
        check_path_text(req.output, "--output")
        if output.suffix.lower() != ".mp4":
            raise UsageError(f"--output: {req.output!r} must end in .mp4")
        if output.is_dir():
            raise UsageError(f"--output: {req.output!r} is a directory; give a file name ending in .mp4")
        check_destination(output, req.overwrite)
    else:
        output = default_output(req.prompt)
    _check_existing_dir(output.parent if str(output.parent) else Path("."), "--output")
    sampling: dict[str, tuple[int, ...] | None] = {}
    if req.save_masks:
        if parallel is not None:
            raise UsageError("--save-masks: works in single-process runs only (not under torchrun / parallel flags)")
        if not cfg.attention.sparse:
            raise UsageError(
                "--save-masks: the config runs full attention, which has no mask to draw; give a sparse --config"
            )
        masks = output.with_name(f"{output.stem}_masks")
        if masks.exists() and not masks.is_dir():
            raise UsageError(f"--save-masks: {str(masks)!r} exists and is not a directory")
        sampling = parse_sampling(req.sample)
    notes = tuple(n for n in (window_covers_grid(cfg.attention, facts, cfg.generation),) if n)
    return RunPlan("generate", cfg, model, facts, parallel, output, sampling=sampling, notes=notes)


def plan_batch(req: BatchRequest, env: Mapping[str, str] | None = None) -> RunPlan:
    """A dry run resolves the model but never looks it up: it loads nothing, so it needs no
    weights (the facts are Wan2.1's where the model's config files are not on disk)."""
    ray = None
    if req.engine == "ray":
        ray = ray_options(req)  # bad --ray-* values and a missing ray: exit 2 first
    cfg = resolve_run_config(req.flags)
    if ray is not None:
        ray.check(cfg)
    try:
        items = tuple(read_prompt_file(req.prompts))
    except PromptFileError as e:
        raise UsageError(str(e)) from None
    out_dir = Path(req.out_dir).expanduser()
    check_path_text(str(out_dir), "--out-dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir: {str(out_dir)!r} exists and is not a directory")
    if not req.dry_run:
        _check_existing_dir(out_dir, "--out-dir")
    model, facts = _model(cfg, check=not req.dry_run)
    if not req.dry_run:
        preflight_loras(cfg.lora)
    check_dense_layers(facts, cfg.attention)  # sizes are per item: the batch runner checks those per item
    parallel = check_parallel(cfg, "batch", facts, env)
    notes = tuple(n for n in (window_covers_grid(cfg.attention, facts, cfg.generation),) if n)
    return RunPlan(
        "batch", cfg, model, facts, parallel, out_dir, items=items, model_checked=not req.dry_run, notes=notes, ray=ray
    )


def plan_serve(flags: RunFlags, env: Mapping[str, str] | None = None) -> RunPlan:
    """`wan-nabla serve`'s defaults, checked like generate's (each job's own values are checked by
    serve/preflight.plan_job); its ranks are grouped the way batch groups them."""
    cfg = resolve_run_config(flags)
    model, facts = _model(cfg, check=True)
    preflight_loras(cfg.lora)
    check_model_fits(facts, cfg.generation, cfg.attention)
    parallel = check_parallel(cfg, "batch", facts, env)
    return RunPlan("serve", cfg, model, facts, parallel)


def plan_compare(req: CompareRequest) -> RunPlan:
    """(candidate, reference): the candidate from --config and the flags, as generate resolves it;
    the reference's attention from --against (default full), named as --against in its errors."""
    check_text(req.prompt, "--prompt", required=True)
    flags = req.flags
    if not flags.config:
        raise UsageError("--config: required; give the candidate's preset name or YAML path")
    cand = resolve_run_config(flags)
    if req.against_geometry is not None:  # the same attention, only the kernel geometry differs
        if req.against:
            raise UsageError(
                "--against-geometry: compares the candidate with itself at another geometry; leave out --against"
            )
        if req.against_geometry not in ("exact", "fast"):
            raise UsageError(f"--against-geometry: {req.against_geometry!r} is not allowed; use exact or fast")
        ref = dataclasses.replace(
            cand,
            attention=dataclasses.replace(
                cand.attention, geometry=req.against_geometry, block_size=None, time_pairs=None
            ),
        )
    else:
        try:
            against = resolve_run_config(dataclasses.replace(flags, config=req.against or "full"))
        except ConfigError as e:
            raise UsageError(f"--against: {e}") from None
        if flags.model is None and against.model.base not in (None, cand.model.base):
            raise UsageError(
                f"--against: its model {against.model.base!r} differs from the candidate's "
                f"{cand.model.base!r}; compare runs one model (give --model)"
            )
        ref = dataclasses.replace(cand, attention=against.attention)
    check_path_text(str(req.out), "--out")
    if req.max_query_rows is not None and req.max_query_rows < 1:
        raise UsageError(f"--max-query-rows: {req.max_query_rows} is not allowed; use an integer >= 1")
    sampling = parse_sampling(req.sample)
    model, facts = _model(cand, check=True)
    preflight_loras(cand.lora)
    check_model_fits(facts, cand.generation, cand.attention)
    check_model_fits(facts, cand.generation, ref.attention)
    notes = tuple(n for n in (window_covers_grid(cand.attention, facts, cand.generation),) if n)
    return RunPlan("compare", cand, model, facts, None, Path(req.out), reference=ref, sampling=sampling, notes=notes)
