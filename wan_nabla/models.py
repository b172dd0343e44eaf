"""Find and load a Wan2.1 text-to-video pipeline: the tiny test model, a local directory, or a hub id.

    model = resolve_model(args.model, cfg.model.base)      # CLI > config > weights/... > hub id
    pipe = load_pipeline(model, device="cuda", dtype=torch.bfloat16)
    dit, source = load_transformer("weights/Wan2.1-T2V-14B-NABLA-0.7", model)   # other DiT weights
    pipe = load_pipeline(model, device="cuda", transformer=dit)  # ... used instead of model's own
    set_flow_shift(pipe, 5.0)                              # Wan2.1 T2V: 5.0 at every size
    save_tiny_checkpoint("/tmp/tiny-wan")                  # diffusers layout, safetensors only

Limits and policy:
- Only safetensors weights are ever loaded (use_safetensors=True), never pickles, and never
  trust_remote_code. A directory holding only .bin/.pt/.pkl weights is refused.
- `dtype=` is passed to from_pretrained (diffusers 0.42 deprecates `torch_dtype`).
- The VAE is always loaded in float32; `dtype` applies to the transformer and the text encoder.
  The pipeline then casts the VAE to `memory.vae_dtype` (fp32 by default; bf16 on request).
- Path or hub id: `--model` is a local path if it looks like one (looks_like_path: it starts with
  '.', '/' or '~', contains a backslash or a second '/', ends in '/', exists, its first component
  is an existing directory, or it ends in a known Wan2.1 directory name under an owner other than
  Wan-AI, as `weights/Wan2.1-T2V-1.3B-Diffusers` does); otherwise 'owner/name' is a hub id. A
  missing path is reported as a missing directory, never looked up on the hub.
- A hub id is first looked up in the local HF cache. Downloading happens only when the cache misses
  and HF_HUB_OFFLINE is not set, and only after one quick request (HUB_PROBE_TIMEOUT_S, no
  retries) showed that the hub answers and the repo exists: huggingface_hub itself retries a
  failed download 5 times with backoff (~23 s offline), so without the probe an offline machine
  waits that long for a known answer. Any failure becomes ModelNotFoundError with the
  `hf download` command to run (diffusers 0.42 needs huggingface_hub >= 1.32, where the old
  `huggingface-cli` no longer exists). check_available() makes the same decisions without
  loading anything (the CLI calls it before any work); repo_id_for() picks the repo the command
  names: the hub id itself, Wan-AI/<name> for a path ending in a known Wan2.1 directory name,
  else the config's hub id or the 1.3B default.
- `load_transformer` takes DiT weights from elsewhere (checkpoint.py: original Wan or diffusers key
  names, one file or shards) into the architecture of the base model's transformer config; a hub id
  is fetched with only its *.safetensors and *.json files. The base then needs no transformer weights.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanPipeline
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError

from .tiny import TINY_HEADS, TINY_MODEL_ID, TINY_TRANSFORMER_CONFIG, build_tiny_pipeline

DEFAULT_HUB_ID = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
DEFAULT_LOCAL_DIR = Path("weights/Wan2.1-T2V-1.3B-Diffusers")

REQUIRED_ENTRIES = ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHT_SUBFOLDERS = ("transformer", "vae", "text_encoder")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
# A DiT repository is fetched without its pickles (original Wan repos also hold .pth encoder/VAE).
DIT_PATTERNS = ("*.safetensors", "*.json")


def _hub_errors() -> tuple[type[BaseException], ...]:
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


def download_command(repo_id: str = DEFAULT_HUB_ID, local_dir: str | Path | None = None,
                     dit_only: bool = False) -> str:
    """The shell command that puts `repo_id` at `local_dir` (default weights/<name>, where
    resolve_model() looks for the 1.3B model); `dit_only`: only the safetensors weights and json
    files of a transformer checkpoint, for --transformer."""
    target = str(local_dir) if local_dir is not None else f"weights/{repo_id.rstrip('/').split('/')[-1]}"
    include = "".join(f' --include "{p}"' for p in DIT_PATTERNS) if dit_only else ""
    return f"hf download {repo_id}{include} --local-dir {shlex.quote(target)}"


class ModelNotFoundError(RuntimeError):
    """The requested weights are not available; the message is one line ending in the download command."""

    def __init__(self, reason: str, repo_id: str = DEFAULT_HUB_ID, local_dir: str | Path | None = None,
                 command: str | None = None):
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


def check_model_dir(path: Path, repo_id: str = DEFAULT_HUB_ID, local_dir: str | Path | None = None,
                    transformer_weights: bool = True) -> None:
    """Raise ModelNotFoundError unless `path` is a complete diffusers Wan layout with safetensors weights
    (without `transformer_weights`, only the transformer's config.json is needed)."""
    local_dir = path if local_dir is None else local_dir
    missing = [e for e in REQUIRED_ENTRIES if not (path / e).exists()]
    if not transformer_weights and (path / "transformer").is_dir() and not (path / "transformer" / "config.json").exists():
        missing.append("transformer/config.json")
    if missing:
        raise ModelNotFoundError(f"model directory {str(path)!r} is incomplete, missing: {', '.join(missing)}",
                                 repo_id, local_dir)
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
            _check_hub_reachable(model)
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
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model, filename)
    except (OSError, ValueError):
        return None
    return Path(found) if isinstance(found, str) else None


def _check_hub_reachable(repo_id: str) -> None:
    """One request without retries: is the hub reachable, and does it have `repo_id`?"""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if _offline():
        raise ModelNotFoundError(f"{repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set", repo_id)
    try:
        HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo_id!r} is gated: accept its license on huggingface.co and log in "
                                 "(hf auth login)", repo_id) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id!r} is not a model repo on the Hugging Face hub (nor a local "
                                 "directory); check the name", repo_id) from None
    except _hub_errors() as exc:
        raise ModelNotFoundError(f"{repo_id!r} is not in the Hugging Face cache and the hub at "
                                 f"{hf_constants.ENDPOINT} cannot be reached ({_first_line(exc)})", repo_id) from None


def _from_pretrained(source: str, dtype: torch.dtype, local_files_only: bool, transformer=None) -> WanPipeline:
    # A given transformer is used as it is (diffusers then neither reads nor downloads its folder).
    extra = {} if transformer is None else {"transformer": transformer}
    with warnings.catch_warnings():
        # diffusers 0.42 still passes this kwarg to huggingface_hub, which ignores it; pure noise.
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        vae = AutoencoderKLWan.from_pretrained(
            source, subfolder="vae", dtype=torch.float32, use_safetensors=True, local_files_only=local_files_only
        )
        return WanPipeline.from_pretrained(
            source, vae=vae, dtype=dtype, use_safetensors=True, local_files_only=local_files_only, **extra
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; the environment may have changed since.
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(hf_constants.HF_HUB_OFFLINE)


def _from_hub(repo_id: str, fetch, command: str | None = None):
    """fetch(local_files_only): from the HF cache first, then (unless offline) the network."""
    errors = _hub_errors()
    try:
        return fetch(True)
    except errors as exc:
        cache_miss = exc
    if _offline():
        raise ModelNotFoundError(
            f"{repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set ({_first_line(cache_miss)})",
            repo_id, command,
        ) from cache_miss
    _check_hub_reachable(repo_id)  # fail in one request instead of huggingface_hub's 5 retries
    try:
        return fetch(False)
    except errors as exc:
        raise ModelNotFoundError(f"could not download {repo_id!r} ({_first_line(exc)})", repo_id, command) from exc


def _kind(model: str) -> tuple[str, Path]:
    """('tiny' | 'dir' | 'hub', path) for a --model value; ModelNotFoundError for files and missing paths."""
    path = Path(model).expanduser()
    if model == TINY_MODEL_ID:
        return "tiny", path
    if path.is_dir():
        return "dir", path
    if path.exists():
        raise ModelNotFoundError(f"model path {model!r} is a file; give a diffusers model directory",
                                 repo_id_for(model), path)
    if looks_like_hub_id(model):
        return "hub", path
    raise ModelNotFoundError(f"model directory {model!r} does not exist", repo_id_for(model), path)


def load_pipeline(
    model: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    tiny_seed: int = 0,
    transformer: torch.nn.Module | None = None,
) -> WanPipeline:
    """Load `model` ('tiny', a directory, or 'owner/name'); transformer + text encoder in `dtype`, VAE fp32.
    A given `transformer` (load_transformer) replaces the model's own, whose weights are then not read."""
    kind, path = _kind(model)
    if kind == "tiny":
        if dtype == torch.float32:
            pipe = build_tiny_pipeline(seed=tiny_seed)
            if transformer is not None:
                pipe = WanPipeline(**{**pipe.components, "transformer": transformer})
            return pipe.to(device)
        # A plain .to(dtype) would also cast the modules that diffusers/transformers keep in fp32
        # (time embedder, modulation tables, norms; T5's `wo` in fp16). Going through
        # from_pretrained applies exactly the rules real weights get, and exercises the real loader.
        with tempfile.TemporaryDirectory(prefix="wan-nabla-tiny-") as tmp:
            save_tiny_checkpoint(tmp, seed=tiny_seed)
            return _from_pretrained(tmp, dtype, True, transformer).to(device)
    if kind == "dir":
        check_model_dir(path, repo_id_for(model), path, transformer_weights=transformer is None)
        try:
            pipe = _from_pretrained(str(path), dtype, True, transformer)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"cannot load model directory {str(path)!r} ({_first_line(exc)})",
                                     repo_id_for(model), path) from exc
    else:
        pipe = _from_hub(model, lambda local: _from_pretrained(model, dtype, local, transformer))
    return pipe.to(device)


def transformer_config(model: str) -> dict:
    """The transformer config (WanTransformer3DModel keyword arguments) of a --model value."""
    from diffusers import WanTransformer3DModel

    kind, path = _kind(model)
    if kind == "tiny":
        return dict(TINY_TRANSFORMER_CONFIG)

    def read(source: str, local: bool) -> dict:
        return dict(WanTransformer3DModel.load_config(source, subfolder="transformer", local_files_only=local))

    if kind == "hub":
        return _from_hub(model, lambda local: read(model, local))
    check_model_dir(path, repo_id_for(model), path, transformer_weights=False)
    try:
        return read(str(path), True)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot read the transformer config of {str(path)!r} ({_first_line(exc)})") from exc


def resolve_transformer(spec: str) -> Path:
    """A --transformer value as a local path: itself, or a hub id's snapshot (safetensors + json only)."""
    path = Path(spec).expanduser()
    if path.exists() or not looks_like_hub_id(spec):
        return path  # checkpoint.locate_checkpoint reports what is wrong with it
    from huggingface_hub import snapshot_download

    def fetch(local: bool) -> Path:
        return Path(snapshot_download(spec, allow_patterns=list(DIT_PATTERNS), local_files_only=local))

    return _from_hub(spec, fetch, download_command(spec, dit_only=True))


def load_transformer(spec: str, model: str, dtype: torch.dtype = torch.bfloat16):
    """(transformer, source record): the DiT weights `spec` (path or hub id) in the architecture of
    `model`'s transformer config; checkpoint.CheckpointError for a bad checkpoint."""
    from .checkpoint import load_transformer as load_checkpoint

    config = transformer_config(model)
    transformer, info = load_checkpoint(resolve_transformer(spec), config, dtype)
    return transformer, {"source": spec, **info}


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


def save_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Save build_tiny_pipeline(seed) in diffusers layout (safetensors) and return the directory."""
    path = Path(path)
    build_tiny_pipeline(seed=seed).save_pretrained(path, safe_serialization=True)
    return path


def set_flow_shift(pipe: WanPipeline, shift: float) -> WanPipeline:
    """Replace the scheduler by the same UniPC flow-matching scheduler with a different flow_shift."""
    from .adapter import make_scheduler

    pipe.scheduler = make_scheduler(pipe, float(shift))
    return pipe
