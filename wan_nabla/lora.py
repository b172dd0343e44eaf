"""LoRAs merged into the Wan2.1 transformer through diffusers' Wan LoRA loader, refused loudly
when a file does not fit the model.

    specs = [LoraSpec("loras/lightx2v_t2v_14b_rank64.safetensors", 1.0)]
    preflight_loras(specs)           # before loading a model: peft present, files readable, LoRA keys
    records = load_loras(pipe, specs)   # validate against pipe.transformer, load, fuse, drop the adapter
    records[0]  # {"path", "scale", "sha256", "format", "modules", "rank", "diff_keys", "ignored_keys"}

Algorithm, per file in order:
1. Read it with safetensors (`safe_open`; pickles are never loaded, whatever the suffix says).
   Difference keys are split off: `X.diff` (a weight delta, e.g. a norm's), `X.diff_b` (a bias
   delta) and `X.diff_m` (a modulation-table delta), applied as LightX2V applies them
   (lightx2v/utils/lora_loader.py `apply_lora`): parameter += delta.to(parameter dtype) * scale,
   in the module's own dtype (the modulation tables and norms stay float32 in a bf16 model).
   Original names map to diffusers' through diffusers' checkpoint key converter, which also
   swaps Wan's norm3 (cross-attention norm, affine) and norm2 (FFN norm) into diffusers' norm2 /
   norm3; `X.diff_m` targets `X.modulation` (`blocks.N.scale_shift_table`, `scale_shift_table`
   for the head). Every delta must hit a parameter of exactly its shape, or the file is refused.
2. Convert the rest with diffusers' `WanPipeline.lora_state_dict`: original Wan naming (keys under
   `diffusion_model.`, `lora_down`/`lora_up` or `lora_A`/`lora_B`, `.alpha` folded in as
   alpha/rank), musubi naming, and diffusers/PEFT naming
   (`transformer.blocks.0.attn1.to_q.lora_A.weight`) all end in the latter.
3. Check every converted key before anything is loaded, because diffusers only logs a warning when
   some targets are missing and silently ignores keys under another prefix: each key must be
   `transformer.<module>.lora_A.weight | lora_B.weight | lora_B.bias`, `<module>` an nn.Linear of
   this transformer, A [rank, in_features], B [out_features, rank], and every A needs its B. The
   first key that fails is named in a one-line LoraError (exit code 2 in the CLI).
4. `pipe.load_lora_weights(state_dict)`, `fuse_lora(lora_scale=scale)` (W += scale * B @ A in
   the weights' dtype), `unload_lora_weights()`: the delta stays merged and the projections are
   plain nn.Linear again, so a forward costs exactly what the base model's does (and compiled
   blocks see ordinary weights). Scale 0 leaves every weight bit-for-bit unchanged.
5. The difference keys of step 1 are added, counted per kind in the record's `diff_keys`.
Limits: the merge is permanent for the loaded pipeline (load it again to change a scale).
`dora_scale` keys are not applied; they are counted in `ignored_keys` and logged as a warning.
Difference keys in musubi naming are refused (none are known to exist).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import WanPipeline
from safetensors import safe_open

from .checkpoint import CheckpointError, diffusers_names
from .config import LoraSpec
from .errors import LoraError
from .preflight import preflight_loras, safetensors_keys  # noqa: F401 - the light checks, importable from here too

log = logging.getLogger(__name__)

_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")
_DROPPED = re.compile(r"dora_scale$")
DIFF_SUFFIXES = {".diff": "weight", ".diff_b": "bias", ".diff_m": "modulation"}
"""LightX2V's difference keys: suffix -> the parameter of the module they are added to."""
_DIFF = re.compile(r"\.(diff|diff_b|diff_m)$")


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The file's LoRA pairs converted to diffusers naming, and facts about it (format, ignored
    keys, and `diffs`: {file key: tensor} of its difference keys, applied by apply_diffs)."""
    path = Path(path)
    keys = safetensors_keys(path)
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        raw = {k: fh.get_tensor(k) for k in keys}
    fmt = (
        "original"
        if any(k.startswith("diffusion_model.") for k in raw)
        else "musubi"
        if any(k.startswith("lora_unet_") for k in raw)
        else "diffusers"
    )
    ignored = sorted(k for k in raw if _DROPPED.search(k))
    diffs = {k: v for k, v in raw.items() if _DIFF.search(k)}
    rest = {k: v for k, v in raw.items() if k not in diffs}
    converted: dict[str, torch.Tensor] = {}
    if any("lora" in k for k in rest):  # a file of difference keys alone has nothing for diffusers
        try:
            converted = WanPipeline.lora_state_dict(rest)
        except Exception as e:  # diffusers' converters raise ValueError/KeyError/IndexError with long texts
            raise LoraError(f"LoRA {str(path)!r}: {_converter_message(e)}") from None
    elif rest and not all(_DROPPED.search(k) or k.endswith(".alpha") for k in rest):
        first = sorted(k for k in rest if not _DROPPED.search(k))[0]
        raise LoraError(
            f"LoRA {str(path)!r}: key {first!r} is neither a LoRA weight nor a difference key (.diff/.diff_b/.diff_m)"
        )
    return converted, {"format": fmt, "ignored_keys": ignored, "tensors": len(raw), "diffs": diffs}


def diff_targets(transformer: torch.nn.Module, diffs: dict[str, torch.Tensor], fmt: str, path: str) -> dict[str, str]:
    """{file key: transformer parameter name} of each difference key; LoraError naming the first
    key that matches no parameter, or one of another shape."""
    if diffs and fmt == "musubi":
        raise LoraError(f"LoRA {path!r}: difference key {sorted(diffs)[0]!r} in musubi naming is not supported")
    wanted: dict[str, str] = {}  # file key -> parameter name in the file's own naming
    for key in diffs:
        suffix = "." + key.rsplit(".", 1)[1]
        body = key[: -len(suffix)]
        body = body.removeprefix("diffusion_model.") if fmt == "original" else body.removeprefix("transformer.")
        target = DIFF_SUFFIXES[suffix]
        if fmt != "original" and target == "modulation":
            target = "scale_shift_table"  # diffusers' name of Wan's modulation tables
        wanted[key] = f"{body}.{target}" if body else target
    names = dict(wanted)
    if fmt == "original" and wanted:
        try:  # diffusers key -> original key, for the original parameter names
            back = {orig: new for new, orig in diffusers_names(sorted(set(wanted.values())), "original").items()}
        except CheckpointError as e:
            raise LoraError(f"LoRA {path!r}: {e}") from None
        names = {k: back.get(v, v) for k, v in wanted.items()}
    params = dict(transformer.named_parameters())
    for key in sorted(diffs):
        p = params.get(names[key])
        if p is None:
            raise LoraError(
                f"LoRA {path!r}: difference key {key!r} targets {names[key]!r}: no such parameter in this transformer"
            )
        if tuple(p.shape) != tuple(diffs[key].shape):
            raise LoraError(
                f"LoRA {path!r}: difference key {key!r} is {list(diffs[key].shape)} but {names[key]!r} is "
                f"{list(p.shape)}: made for another model size?"
            )
    return names


@torch.no_grad()
def apply_diffs(
    transformer: torch.nn.Module, diffs: dict[str, torch.Tensor], names: dict[str, str], scale: float
) -> dict[str, int]:
    """parameter += diff.to(parameter dtype) * scale for each difference key (module doc, step 1);
    returns the count per kind (diff, diff_b, diff_m)."""
    params = dict(transformer.named_parameters())
    counts = {s[1:]: 0 for s in DIFF_SUFFIXES}
    for key, delta in diffs.items():
        p = params[names[key]]
        p.data += delta.to(device=p.device, dtype=p.dtype) * scale
        counts[key.rsplit(".", 1)[1]] += 1
    return counts


def _converter_message(exc: BaseException) -> str:
    listed = re.search(r"keys\(\)=dict_keys\(\[(.*?)\]\)", str(exc))
    # The original-naming converter's "should be empty at this point" lists the keys it left over,
    # those it drops on purpose (norm/modulation differences) among them: name a real culprit.
    left = [k for k in re.findall(r"'([^']+)'", listed.group(1)) if not _DROPPED.search(k)] if listed else []
    if left:
        return (
            f"key 'diffusion_model.{left[0]}' matches no layer diffusers' Wan LoRA converter knows "
            "(expected blocks.N.self_attn|cross_attn.q|k|v|o, blocks.N.ffn.0|2, head.head, ...)"
        )
    return f"diffusers cannot convert it ({_one_line(exc)})"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _layer_name(key: str) -> str:
    """'transformer.blocks.0.attn1.to_q.lora_A.weight' -> 'blocks.0.attn1.to_q'."""
    suffix = next(s for s in _SUFFIXES if key.endswith(s))
    return key[len("transformer.") : -len(suffix)]


def check_state_dict(transformer: torch.nn.Module, sd: dict[str, torch.Tensor], path: str) -> dict[str, Any]:
    """Raise LoraError unless every key of the converted state dict targets a Linear of
    `transformer` with matching shapes (module doc, step 3). Returns {modules, rank}."""
    modules = dict(transformer.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if not key.startswith("transformer.") or suffix is None:
            raise LoraError(
                f"LoRA {path!r}: key {key!r} is not a transformer LoRA weight "
                "(expected transformer.<module>.lora_A.weight / lora_B.weight / lora_B.bias)"
            )
        name = _layer_name(key)
        layer = modules.get(name)
        if not isinstance(layer, torch.nn.Linear):
            what = "no such layer" if layer is None else f"a {type(layer).__name__}, not a Linear"
            raise LoraError(f"LoRA {path!r}: key {key!r} targets {name!r}: {what} in this transformer")
        pairs.setdefault(name, {})[suffix] = t
    ranks = set()
    for name, parts in pairs.items():
        layer = modules[name]
        a, b = parts.get(".lora_A.weight"), parts.get(".lora_B.weight")
        if a is None or b is None:
            missing = "lora_A" if a is None else "lora_B"
            raise LoraError(f"LoRA {path!r}: layer {name!r} has no {missing} weight (a LoRA needs both)")
        bias = parts.get(".lora_B.bias")
        if (
            a.ndim != 2
            or b.ndim != 2
            or a.shape[1] != layer.in_features
            or b.shape[0] != layer.out_features
            or a.shape[0] != b.shape[1]
            or (bias is not None and tuple(bias.shape) != (layer.out_features,))
        ):
            raise LoraError(
                f"LoRA {path!r}: layer {name!r} is {layer.out_features}x{layer.in_features} but the "
                f"LoRA has A {list(a.shape)}, B {list(b.shape)}: made for another model size?"
            )
        ranks.add(int(a.shape[0]))
    if not pairs:
        raise LoraError(f"LoRA {path!r}: no transformer weights after conversion")
    return {"modules": len(pairs), "rank": sorted(ranks)[0] if len(ranks) == 1 else sorted(ranks)}


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_loras(pipe, specs) -> list[dict[str, Any]]:
    """Validate, load, fuse and unload each LoRA of `specs` (LoraSpec or 'PATH[:SCALE]') into
    pipe.transformer, in order; returns one record per LoRA for the sidecar."""
    specs = [LoraSpec.parse(s) for s in specs]
    preflight_loras(specs)
    records = []
    for i, spec in enumerate(specs):
        sd, facts = read_lora(spec.path)
        diffs = facts["diffs"]
        shape = check_state_dict(pipe.transformer, sd, spec.path) if sd or not diffs else {"modules": 0, "rank": None}
        names = diff_targets(pipe.transformer, diffs, facts["format"], spec.path)
        if facts["ignored_keys"]:
            log.warning(
                "LoRA %s: %d keys are not applied (e.g. %r: DoRA scales)",
                spec.path,
                len(facts["ignored_keys"]),
                facts["ignored_keys"][0],
            )
        # In the dtype of the layers they patch: peft multiplies B @ A as stored, and a float32 file
        # on a bfloat16 model would otherwise mix dtypes in one matmul.
        linears = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
        sd = {k: v.to(linears[_layer_name(k)].weight.dtype) for k, v in sd.items()}
        if any(k.endswith(".lora_B.bias") for k in sd):
            # peft then gives every LoRA layer a bias; a zero one for layers the file has none for
            # is what it means, and keeps diffusers from warning about "missing keys".
            for k in [k for k in sd if k.endswith(".lora_B.weight")]:
                layer = linears[_layer_name(k)]
                sd.setdefault(k[: -len("weight")] + "bias", layer.weight.new_zeros(layer.out_features))
        if sd:
            name = f"wan_nabla_{i}"
            pipe.load_lora_weights(sd, adapter_name=name)
            pipe.fuse_lora(components=["transformer"], lora_scale=spec.scale, adapter_names=[name])
            pipe.unload_lora_weights()
        counts = apply_diffs(pipe.transformer, diffs, names, spec.scale)
        records.append(
            {
                "path": spec.path,
                "scale": spec.scale,
                "sha256": sha256_file(Path(spec.path)),
                "format": facts["format"],
                **shape,
                "diff_keys": counts,
                "ignored_keys": len(facts["ignored_keys"]),
            }
        )
        log.info(
            "LoRA %s (scale %g, %s naming, rank %s) merged into %d layers",
            spec.path,
            spec.scale,
            facts["format"],
            shape["rank"],
            shape["modules"],
        )
    return records
