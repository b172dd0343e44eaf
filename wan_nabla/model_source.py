"""Where a model comes from and what is known about it before any weight is read (no torch).

    model = resolve_model(None, cfg.model.base)   # --model > config > weights/Wan2.1-T2V-1.3B-Diffusers > hub id
    check_available(model)                        # ModelNotFoundError ending in the `hf download` command
    facts = model_facts(model)                    # rotary length, depth, heads, patch, scheduler config
    transformer_heads("tiny")                     # 2, read from config files only

The light half of models.py: the CLI and preflight import this module to answer bad input
before torch or diffusers is imported; models.py loads the weights. Rules for path vs hub id,
the cache and the offline probe are in models.py's docstring. Limits: the facts of a hub model
that is not in the cache are Wan2.1's defaults until it is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, try_to_load_from_cache
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

TINY_MODEL_ID = "tiny"
# Generation settings the CLI uses with `--model tiny` for every value not given as a flag: the
# presets' 832x480x81 x 50 steps would take a long time on a CPU for a video that is noise anyway.
TINY_GENERATION = {"size": (128, 128), "frames": 17, "steps": 4}
TINY_LAYERS = 2
TINY_HEADS = 2
TINY_ROPE_POSITIONS = 64  # rotary table length per axis: at most 64 latent frames / 1024 px per side

WAN_SCHEDULER_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "num_train_timesteps": 1000,
    "flow_shift": 3.0,
}
"""Wan2.1's scheduler config (used where the model's own scheduler_config.json is not on disk)."""

DEFAULT_HUB_ID = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
DEFAULT_LOCAL_DIR = Path("weights/Wan2.1-T2V-1.3B-Diffusers")

REQUIRED_ENTRIES = ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHT_SUBFOLDERS = ("transformer", "vae", "text_encoder")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
# A DiT repository is fetched without its pickles (original Wan repos also hold .pth encoder/VAE).
DIT_PATTERNS = ("*.safetensors", "*.json")


def hub_errors() -> tuple[type[BaseException], ...]:
    # Cache misses and network failures come as OSError subclasses, except the HTTP client's own
    # transport errors, which (depending on the huggingface_hub version) derive from Exception only.
    errors: list[type[BaseException]] = [OSError, ValueError, EntryNotFoundError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(__import__(name).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


KNOWN_REPOS = ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers")
HUB_PROBE_TIMEOUT_S = 5.0
"""One request, no retries: the hub answers in well under a second when it is reachable."""


def repo_id_for(model: str | None, fallback: str | None = None) -> str:
    """The hub repo that provides `model` (see module doc), for the download command."""
    if model and looks_like_hub_id(model):
        return model
    name = Path(str(model or "").rstrip("/\\")).name
    for repo in KNOWN_REPOS:
        if name.lower() == repo.split("/")[1].lower():
            return repo
    if fallback and looks_like_hub_id(fallback):
        return fallback
    return DEFAULT_HUB_ID


def download_command(repo_id: str = DEFAULT_HUB_ID, local_dir: str | Path | None = None, dit_only: bool = False) -> str:
    """The shell command that puts `repo_id` at `local_dir` (default weights/<name>, where
    resolve_model() looks for the 1.3B model); `dit_only`: only the safetensors weights and json
    files of a transformer checkpoint, for --transformer."""
    target = str(local_dir) if local_dir is not None else f"weights/{repo_id.rstrip('/').split('/')[-1]}"
    include = "".join(f' --include "{p}"' for p in DIT_PATTERNS) if dit_only else ""
    return f"hf download {repo_id}{include} --local-dir {shlex.quote(target)}"


class ModelNotFoundError(RuntimeError):
    """The requested weights are not available; the message is one line ending in the download command."""

    def __init__(
        self,
        reason: str,
        repo_id: str = DEFAULT_HUB_ID,
        local_dir: str | Path | None = None,
        command: str | None = None,
    ):
        reason = " ".join(str(reason).split())  # one line, whatever the wrapped error looked like
        super().__init__(f"{reason}; get the weights with: {command or download_command(repo_id, local_dir)}")
        self.repo_id = repo_id


def resolve_model(cli_model: str | None, config_model: str | None, weights_root: Path = Path("weights")) -> str:
    """First of: --model, the config's `model`, weights_root/Wan2.1-T2V-1.3B-Diffusers if present, the hub id."""
    for choice in (cli_model, config_model):
        if choice is not None and str(choice).strip():
            return str(choice)
    local = Path(weights_root) / DEFAULT_LOCAL_DIR.name
    if local.is_dir():
        return str(local)
    return DEFAULT_HUB_ID


def looks_like_path(model: str) -> bool:
    """True if `model` names a local path rather than a hub id (rules in the module doc)."""
    if model == TINY_MODEL_ID:
        return False
    if not _HUB_ID.match(model):  # not 'owner/name': only a path can be meant
        return True
    owner, name = model.split("/")
    if os.path.lexists(model) or os.path.isdir(owner):
        return True
    return owner != "Wan-AI" and any(name.lower() == r.split("/")[1].lower() for r in KNOWN_REPOS)


def looks_like_hub_id(model: str) -> bool:
    """'owner/name' with exactly one slash that does not look like a local path."""
    return bool(_HUB_ID.match(model)) and not looks_like_path(model)


def check_model_dir(
    path: Path, repo_id: str = DEFAULT_HUB_ID, local_dir: str | Path | None = None, transformer_weights: bool = True
) -> None:
    """Raise ModelNotFoundError unless `path` is a complete diffusers Wan layout with safetensors weights
    (without `transformer_weights`, only the transformer's config.json is needed)."""
    local_dir = path if local_dir is None else local_dir
    missing = [e for e in REQUIRED_ENTRIES if not (path / e).exists()]
    if (
        not transformer_weights
        and (path / "transformer").is_dir()
        and not (path / "transformer" / "config.json").exists()
    ):
        missing.append("transformer/config.json")
    if missing:
        raise ModelNotFoundError(
            f"model directory {str(path)!r} is incomplete, missing: {', '.join(missing)}", repo_id, local_dir
        )
    for sub in _WEIGHT_SUBFOLDERS if transformer_weights else ("vae", "text_encoder"):
        files = [f for f in (path / sub).iterdir() if f.is_file()]
        if any(f.suffix == ".safetensors" for f in files):
            continue
        pickles = sorted(f.name for f in files if f.suffix in _PICKLE_SUFFIXES)
        why = f"only pickle weights ({', '.join(pickles)}), which are refused" if pickles else "no weight files"
        raise ModelNotFoundError(f"{str(path / sub)!r} has no .safetensors weights: {why}", repo_id, local_dir)


def check_available(model: str, config_model: str | None = None, transformer_weights: bool = True) -> None:
    """Raise ModelNotFoundError now if load_pipeline(model) would: a missing or incomplete
    directory, a file, a hub id that is neither cached nor reachable. Loads nothing; at most one
    quick request to the hub (none when cached or offline). Without `transformer_weights` (the
    DiT comes from --transformer) a directory needs only its transformer's config.json."""
    if model == TINY_MODEL_ID:
        return
    path = Path(model).expanduser()
    repo = repo_id_for(model, config_model)
    if path.is_dir():
        check_model_dir(path, repo, path, transformer_weights=transformer_weights)
    elif os.path.lexists(path):
        raise ModelNotFoundError(f"model path {model!r} is a file; give a diffusers model directory", repo, path)
    elif looks_like_hub_id(model):
        if model_file(model, "model_index.json") is None:
            check_hub_reachable(model)
    else:
        raise ModelNotFoundError(f"model directory {model!r} does not exist", repo, path)


def model_file(model: str, filename: str) -> Path | None:
    """`filename` (e.g. "transformer/config.json") of a local model directory or of a hub id's
    cached snapshot, without any download; None if it is not there."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    if not looks_like_hub_id(model):
        return None

    try:
        found = try_to_load_from_cache(model, filename)
    except (OSError, ValueError):
        return None
    return Path(found) if isinstance(found, str) else None


def check_hub_reachable(repo_id: str) -> None:
    """One request without retries: is the hub reachable, and does it have `repo_id`?"""
    if hub_offline():
        raise ModelNotFoundError(f"{repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set", repo_id)
    try:
        HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id!r} is gated: accept its license on huggingface.co and log in (hf auth login)", repo_id
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a model repo on the Hugging Face hub (nor a local directory); check the name", repo_id
        ) from None
    except hub_errors() as exc:
        raise ModelNotFoundError(
            f"{repo_id!r} is not in the Hugging Face cache and the hub at "
            f"{hf_constants.ENDPOINT} cannot be reached ({first_line(exc)})",
            repo_id,
        ) from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; the environment may have changed since.
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(hf_constants.HF_HUB_OFFLINE)


def same_checkpoint(source: str | None, repo_id: str) -> bool:
    """Whether the --transformer value `source` is the hub repo `repo_id`: the id itself, or a path
    through a directory named like the repo (`hf download ... --local-dir weights/<name>`) or its
    HF cache folder (models--owner--name)."""
    if not source:
        return False
    if source.strip().lower() == repo_id.lower():
        return True
    owner, _, name = repo_id.lower().partition("/")
    parts = [p.lower() for p in Path(source).expanduser().parts]
    return name in parts or f"models--{owner}--{name}" in parts


def transformer_heads(model: str) -> int | None:
    """The attention head count of `model`'s transformer, read from its config.json without loading
    any weights (for parallel layouts checked before loading); None where it cannot be known yet
    (a missing directory, a hub model not in the cache)."""
    if model == TINY_MODEL_ID:
        return TINY_HEADS
    config = model_file(model, "transformer/config.json")
    if config is None:
        return None
    try:
        heads = json.loads(config.read_text(encoding="utf-8")).get("num_attention_heads")
    except (OSError, ValueError, AttributeError):
        return None
    return heads if isinstance(heads, int) and heads > 0 else None


# ---- facts known before loading ------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFacts:
    """What a model can run, read from its config files before any weight is loaded."""

    model: str
    rope_positions: int = 1024
    """Rotary table length per axis (WanTransformer3DModel rope_max_seq_len)."""
    num_layers: int | None = None
    """Transformer blocks, if known."""
    patch: tuple[int, int, int] = (1, 2, 2)
    heads: int | None = None
    """Attention heads, if known (a hub model not in the cache: unknown until downloaded)."""
    scheduler: Mapping[str, Any] = field(default_factory=lambda: dict(WAN_SCHEDULER_CONFIG))
    """The scheduler config (WAN_SCHEDULER_CONFIG when not on disk)."""

    def latent_grid(self, width: int, height: int, frames: int) -> tuple[int, int, int]:
        """(F, H, W) token grid of a video: VAE factors 4 (time) and 8 (space), then the patch."""
        pt, ph, pw = self.patch
        return ((frames - 1) // 4 + 1) // pt, height // (8 * ph), width // (8 * pw)


def _read_json(path: Path | None) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_facts(model: str) -> ModelFacts:
    """ModelFacts of `model` from its config files on disk (no download, no weights read)."""
    if model == TINY_MODEL_ID:
        return ModelFacts(model, TINY_ROPE_POSITIONS, TINY_LAYERS, heads=TINY_HEADS)
    tc = _read_json(model_file(model, "transformer/config.json"))
    sc = _read_json(model_file(model, "scheduler/scheduler_config.json")) or dict(WAN_SCHEDULER_CONFIG)
    patch = tc.get("patch_size", (1, 2, 2))
    ok = isinstance(patch, (list, tuple)) and len(patch) == 3 and all(isinstance(p, int) and p > 0 for p in patch)
    layers, heads = tc.get("num_layers"), tc.get("num_attention_heads")
    return ModelFacts(
        model,
        int(tc.get("rope_max_seq_len") or 1024),
        layers if isinstance(layers, int) else None,
        tuple(patch) if ok else (1, 2, 2),
        heads if isinstance(heads, int) and heads > 0 else None,
        sc,
    )
