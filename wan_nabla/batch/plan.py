"""Batch planning: each prompt-file item's settings, seed and identity key, before anything runs.

    planned = [plan_item(cfg, item, model_id) for item in read_prompt_file(path)]
    planned[0].settings, planned[0].key, planned[0].error

Settings: config < command-line flags < the item's own fields. Seed: the item's `seed`, else
`derive_seed(base, index)` = first 8 bytes of sha256(f"{base}:{index}") mod 2**31, with base =
--seed (or the config's seed, default 0). Key: sha256 of (index, prompt, negative prompt, name,
model, attention config except its kernel backend, generation settings except device, LoRAs,
step cache, FP8 linears and a non-fp32 VAE when set: where and with which kernels an item runs is not what it is), stored in the
manifest and in the sidecar, so a changed prompt or setting is a new item, never mistaken for one
already done. A bad value makes the item a failed item with a one-line reason, not an error of
the run; so does a value the model or sampler cannot run (`check`, app.item_check: steps at
the shift, size against the rotary table), found here rather than after the item's compute.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DEFAULT_CRF, ConfigError, GenerationConfig, RunConfig, parse_size
from .prompts import PromptItem


def derive_seed(base: int, index: int) -> int:
    """The seed of item `index` without its own seed: stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{base}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**31


@dataclass
class PlannedItem:
    item: PromptItem
    settings: GenerationConfig | None = None
    key: str | None = None
    error: str | None = None
    output: Path | None = None
    done: dict[str, Any] | None = None
    """The verified earlier record if this item is already done."""


def plan_item(
    cfg: RunConfig, item: PromptItem, model_id: str, check: Callable[[GenerationConfig], None] | None = None
) -> PlannedItem:
    """Resolve one item's settings, seed and key; a bad value (config rules, then `check`, which
    raises ConfigError) makes it a failed item, not an error."""
    if item.error:
        return PlannedItem(item, error=item.error)
    ov = dict(item.overrides)
    try:
        if "size" in ov:
            ov["size"] = parse_size(ov["size"], "size")
        seed = ov.pop("seed", None)
        seed = derive_seed(cfg.generation.seed, item.index) if seed is None else seed
        g = cfg.override(negative_prompt=item.negative_prompt, seed=seed, **ov).generation
        if check is not None:
            check(g)
    except ConfigError as e:
        return PlannedItem(item, error=f"line {item.line}: {str(e).removeprefix('generation.')}")
    ident = {
        "index": item.index, "prompt": item.prompt, "name": item.name, "model": model_id,
        "attention": {k: v for k, v in cfg.attention.to_dict().items() if k != "backend"},
        "generation": {k: v for k, v in g.to_dict().items()
                       if k != "device" and (k, v) not in (("sampler", "unipc"), ("crf", DEFAULT_CRF))},
    }  # fmt: skip
    # What changes the video enters the key; settings added later only when not at their default,
    # so keys of earlier runs stay valid (compile changes speed, not the video).
    if cfg.lora:
        ident["lora"] = [x.to_dict() for x in cfg.lora]
    if cfg.speed.cache != "none":
        ident["cache"] = {"cache": cfg.speed.cache, "mag_ratios": cfg.speed.to_dict()["mag_ratios"]}
    if cfg.speed.quantize != "none":
        ident["quantize"] = cfg.speed.quantize
    if cfg.memory.vae_dtype != "fp32":
        ident["vae_dtype"] = cfg.memory.vae_dtype
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]
    return PlannedItem(item, settings=g, key=key)
