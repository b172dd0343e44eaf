"""Wan2.1 DiT weights from a safetensors checkpoint in Wan's original layout or diffusers'.

    files = locate_checkpoint("weights/Wan2.1-T2V-14B-NABLA-0.7")   # shards + index, validated
    model, info = load_transformer(files, transformer_config, torch.bfloat16)
    info["naming"]                       # "original" (blocks.0.self_attn.q) or "diffusers" (attn1.to_q)
    info["files"]                        # size, mtime and a (full or labelled partial) sha256 per file

Accepted: a `.safetensors` file; a `*.safetensors.index.json` whose `weight_map` names shard files
in the same directory; a directory holding exactly one such index or one `.safetensors` file (an
original Wan checkpoint directory), or a diffusers `transformer/` subfolder. Pickle files
(.pth/.bin/.pt/.ckpt/.pkl, e.g. the original text encoder and VAE beside the shards) are never
opened; a checkpoint that has only those is refused. Every problem is a CheckpointError: one line
naming the offending file or key (the CLI exits with 2 before anything is written).

Algorithm:
1. Key names and shapes come from the safetensors headers; no tensor is read before they check out.
   Index entries must be plain file names (no directories, no `..`) of files that exist in the
   index's directory, and list exactly the keys their shard holds.
2. Naming: original if the keys hold Wan's `head.modulation` or `blocks.N.self_attn.*`, diffusers
   if `scale_shift_table` or `blocks.N.attn1.*`. Original names are mapped by diffusers' own
   `convert_wan_transformer_to_diffusers`, applied to a {name: name} dict (renames only).
3. The transformer is built from `transformer_config` (the --model's transformer config.json) on
   the meta device; shape mismatches, then missing keys, then unexpected keys are reported (the
   first in sorted order, with how many more).
4. Tensors are read one at a time and cast to `dtype`, except the modules diffusers keeps in
   float32 (`_keep_in_fp32_modules`, the rule from_pretrained applies), then assigned in place
   (load_state_dict(assign=True)); the rotary tables, which are not in checkpoints, are rebuilt.
   The result equals `WanTransformer3DModel.from_pretrained(dir, dtype=dtype)` tensor for tensor.
Limits: Wan2.1 text-to-video transformers only (I2V / VACE / Animate keys are "unexpected").
Hashing: files up to FULL_HASH_BYTES get a sha256; bigger shards get `partial_sha256` over their
first and last PARTIAL_HASH_BYTES (labelled so), plus size and mtime: hashing 57 GB would take minutes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors import safe_open

from .errors import CheckpointError  # noqa: F401 - raised here, caught by the CLI without torch

PICKLE_SUFFIXES = (".pth", ".bin", ".pt", ".ckpt", ".pkl")
DIFFUSERS_REPOS = "Wan-AI/Wan2.1-T2V-14B-Diffusers or Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
FULL_HASH_BYTES = 64 * 2**20
PARTIAL_HASH_BYTES = 8 * 2**20
_INDEX_SUFFIX = ".safetensors.index.json"
_ORIGINAL = re.compile(r"^(model\.diffusion_model\.)?(head\.modulation$|blocks\.\d+\.(self_attn|cross_attn)\.)")
_DIFFUSERS = re.compile(r"^(scale_shift_table$|blocks\.\d+\.(attn1|attn2)\.)")


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one checkpoint, as found by locate_checkpoint."""

    given: Path
    """The path the user gave."""
    shards: tuple[Path, ...]
    index: Path | None = None
    weight_map: Mapping[str, str] | None = None
    """key -> shard file name, from the index."""


def _pickle_refusal(names: list[str], where: str) -> CheckpointError:
    return CheckpointError(
        f"{where} holds only pickle weights ({', '.join(names)}), which wan-nabla never loads; give the DiT as "
        f".safetensors (file, shards + index, or a directory of them) and take the text encoder and VAE from "
        f"a diffusers-format --model ({DIFFUSERS_REPOS})"
    )


def locate_checkpoint(path: str | Path) -> CheckpointFiles:
    """The checkpoint files at `path` (see module doc); CheckpointError if there are none or they are unsafe."""
    given = Path(path).expanduser()
    if given.is_dir():
        indexes = sorted(p for p in given.iterdir() if p.name.endswith(_INDEX_SUFFIX) and p.is_file())
        if len(indexes) > 1:
            raise CheckpointError(
                f"{str(given)!r} holds several indexes ({', '.join(p.name for p in indexes)}); give the one to load"
            )
        if indexes:
            return _from_index(indexes[0], given)
        singles = sorted(p for p in given.iterdir() if p.suffix == ".safetensors" and p.is_file())
        if len(singles) == 1:
            return CheckpointFiles(given, (singles[0],))
        if len(singles) > 1:
            raise CheckpointError(
                f"{str(given)!r} holds {len(singles)} .safetensors files and no *{_INDEX_SUFFIX}; give the file to load"
            )
        if (given / "transformer").is_dir():
            return locate_checkpoint(given / "transformer")
        pickles = sorted(p.name for p in given.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_refusal(pickles, repr(str(given)))
        raise CheckpointError(f"{str(given)!r} holds no .safetensors weights")
    if not given.exists():
        raise CheckpointError(f"transformer checkpoint {str(given)!r} does not exist")
    if given.suffix in PICKLE_SUFFIXES:
        raise _pickle_refusal([given.name], "the checkpoint")
    if given.name.endswith(".index.json"):
        return _from_index(given, given)
    if given.suffix == ".safetensors":
        return CheckpointFiles(given, (given,))
    raise CheckpointError(f"{str(given)!r} is not a .safetensors file, a *{_INDEX_SUFFIX} or a directory")


def _from_index(index: Path, given: Path) -> CheckpointFiles:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise TypeError("weight_map must be a non-empty mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"index {str(index)!r} is not a valid safetensors index: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    root = index.parent
    shards = []
    for name in sorted(set(weight_map.values())):
        # A plain name in the index's own directory; symlinks there are fine (the HF cache uses them).
        if (
            not isinstance(name, str)
            or not name
            or name in (".", "..")
            or "/" in name
            or "\\" in name
            or Path(name).is_absolute()
        ):
            raise CheckpointError(
                f"index {str(index)!r} names {name!r}, which is not a file name in its "
                "directory; shards must sit next to the index"
            )
        if not name.endswith(".safetensors"):
            raise CheckpointError(f"index {str(index)!r} names shard {name!r}; only .safetensors shards are loaded")
        if not (root / name).is_file():
            raise CheckpointError(f"index {str(index)!r} names shard {name!r}, which does not exist in {str(root)!r}")
        shards.append(root / name)
    return CheckpointFiles(given, tuple(shards), index, weight_map)


def read_shapes(files: CheckpointFiles) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """key -> (shard, shape) from the safetensors headers only; checks the index against the shards."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for shard in files.shards:
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as fh:
                for key in fh.keys():
                    if key in found:
                        raise CheckpointError(f"key {key!r} is in both {found[key][0].name!r} and {shard.name!r}")
                    found[key] = (shard, tuple(fh.get_slice(key).get_shape()))
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(
                f"cannot read {str(shard)!r} as safetensors ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})"
            ) from None
    if files.weight_map is not None:
        for key, name in sorted(files.weight_map.items()):
            if key not in found or found[key][0].name != name:
                raise CheckpointError(f"index lists {key!r} in {name!r}, but that shard does not hold it")
        extra = sorted(set(found) - set(files.weight_map))
        if extra:
            raise CheckpointError(
                f"shard {found[extra[0]][0].name!r} holds {extra[0]!r}, which the index does not list"
            )
    return found


def detect_naming(keys) -> str:
    """'original' (Wan's own key names) or 'diffusers'; CheckpointError if neither or both."""
    original = any(_ORIGINAL.match(k) for k in keys)
    diffusers = any(_DIFFUSERS.match(k) for k in keys)
    if original != diffusers:
        return "original" if original else "diffusers"
    sample = sorted(keys)[0] if keys else "(no keys)"
    why = "both" if original else "neither"
    raise CheckpointError(
        f"cannot tell the key naming: {why} Wan's original names (blocks.0.self_attn.q.weight) "
        f"and diffusers' (blocks.0.attn1.to_q.weight) are present, e.g. {sample!r}; "
        "is this a Wan2.1 text-to-video transformer?"
    )


def diffusers_names(keys, naming: str) -> dict[str, str]:
    """diffusers key -> checkpoint key, using diffusers' own converter for original names."""
    keys = list(keys)
    if naming == "diffusers":
        return {k: k for k in keys}
    try:  # the converter renames by substring and pops its input: give it a throwaway {name: name}
        mapping = convert_wan_transformer_to_diffusers({k: k for k in keys})
    except Exception as e:
        raise CheckpointError(f"diffusers could not convert the original key names ({type(e).__name__}: {e})") from None
    if len(mapping) != len(keys):
        raise CheckpointError(
            f"{len(keys) - len(mapping)} original keys map onto the same diffusers key; the checkpoint mixes namings"
        )
    return mapping


def _fp32_kept(key: str, keep: tuple[str, ...]) -> bool:
    return any(m in key.split(".") for m in keep)  # diffusers' from_pretrained rule


def load_transformer(
    files: CheckpointFiles | str | Path, transformer_config: Mapping[str, Any], dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the transformer of `transformer_config` with the checkpoint's weights (see module doc)."""
    if not isinstance(files, CheckpointFiles):
        files = locate_checkpoint(files)
    shapes = read_shapes(files)
    naming = detect_naming(shapes)
    names = diffusers_names(shapes, naming)
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(dict(transformer_config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_keys(names, expected, shapes, naming, model.config)

    keep = tuple(model._keep_in_fp32_modules or ())
    by_shard: dict[Path, list[str]] = {}
    for new in expected:
        by_shard.setdefault(shapes[names[new]][0], []).append(new)
    state = {}
    for shard, keys in by_shard.items():
        with safe_open(str(shard), framework="pt", device="cpu") as fh:
            for new in keys:
                t = fh.get_tensor(names[new])
                target = torch.float32 if _fp32_kept(new, keep) or not t.is_floating_point() else dtype
                # A fresh, owned tensor: aligned storage, so CPU kernels match an in-memory model.
                state[new] = t.to(target, copy=True)
    model.load_state_dict(state, strict=True, assign=True)
    cfg = model.config
    model.rope = type(model.rope)(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"transformer tensors left on the meta device: {meta[:3]}")
    info = {
        "path": str(files.given),
        "naming": naming,
        "tensors": len(state),
        "parameters": sum(t.numel() for t in state.values()),
        "files": fingerprint(files),
    }
    return model.eval(), info


def _check_keys(names: Mapping[str, str], expected: Mapping[str, tuple], shapes, naming: str, config) -> None:
    def shown(new: str) -> str:
        old = names.get(new, new)
        return repr(new) if old == new else f"{new!r} (checkpoint name {old!r})"

    arch = f"{config.num_layers} blocks, width {config.num_attention_heads * config.attention_head_dim}"
    # Shapes first: a 14B checkpoint with a 1.3B --model is then named as a size mismatch.
    for new in sorted(set(expected) & set(names)):
        got = shapes[names[new]][1]
        if got != expected[new]:
            raise CheckpointError(
                f"shape mismatch for {shown(new)}: checkpoint {list(got)}, --model transformer "
                f"{list(expected[new])} ({arch}); do --model and the checkpoint have the same size?"
            )
    missing = sorted(set(expected) - set(names))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(
            f"checkpoint lacks {missing[0]!r}{more} of the --model transformer ({arch}); "
            "is it a Wan2.1 T2V transformer of this size?"
        )
    unexpected = sorted(set(names) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"checkpoint has unexpected key {shown(unexpected[0])}{more} for the --model "
            f"transformer ({arch}; {naming} key names)"
        )


def fingerprint(files: CheckpointFiles) -> list[dict[str, Any]]:
    """Name, size, mtime and sha256 (full up to FULL_HASH_BYTES, else labelled partial) of every file."""
    out = []
    for path in ([files.index] if files.index else []) + list(files.shards):
        st = path.stat()
        rec: dict[str, Any] = {
            "name": path.name,
            "bytes": st.st_size,
            "mtime": _dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc).isoformat(timespec="seconds"),
        }
        h = hashlib.sha256()
        with path.open("rb") as fh:
            if st.st_size <= FULL_HASH_BYTES:
                for chunk in iter(lambda: fh.read(2**20), b""):
                    h.update(chunk)
                rec["sha256"] = h.hexdigest()
            else:
                h.update(fh.read(PARTIAL_HASH_BYTES))
                fh.seek(st.st_size - PARTIAL_HASH_BYTES)
                h.update(fh.read(PARTIAL_HASH_BYTES))
                rec["partial_sha256"] = h.hexdigest()
                rec["partial_sha256_covers"] = f"first and last {PARTIAL_HASH_BYTES // 2**20} MiB"
        out.append(rec)
    return out
