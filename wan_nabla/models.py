"""Find and load a Wan2.1 text-to-video pipeline: the tiny test model, a local directory, or a hub id.

    model = resolve_model(flags.model, cfg.model.base)     # --model > config > weights/... > hub id (preflight)
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

import tempfile
import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from huggingface_hub import snapshot_download

from .adapter import make_scheduler
from .checkpoint import load_transformer as load_checkpoint

# The light half (resolution, availability, facts) lives in model_source.py; its names are
# re-exported here because loading code and callers think of both halves as "the model".
from .model_source import (  # noqa: F401
    DEFAULT_HUB_ID,
    DEFAULT_LOCAL_DIR,
    DIT_PATTERNS,
    KNOWN_REPOS,
    REQUIRED_ENTRIES,
    ModelNotFoundError,
    check_available,
    check_hub_reachable,
    check_model_dir,
    download_command,
    first_line,
    hub_errors,
    hub_offline,
    looks_like_hub_id,
    looks_like_path,
    model_file,
    repo_id_for,
    resolve_model,
    same_checkpoint,
    transformer_heads,
)
from .tiny import TINY_MODEL_ID, TINY_TRANSFORMER_CONFIG, build_tiny_pipeline


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


def _from_hub(repo_id: str, fetch, command: str | None = None):
    """fetch(local_files_only): from the HF cache first, then (unless offline) the network."""
    errors = hub_errors()
    try:
        return fetch(True)
    except errors as exc:
        cache_miss = exc
    if hub_offline():
        raise ModelNotFoundError(
            f"{repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set ({first_line(cache_miss)})",
            repo_id,
            command,
        ) from cache_miss
    check_hub_reachable(repo_id)  # fail in one request instead of huggingface_hub's 5 retries
    try:
        return fetch(False)
    except errors as exc:
        raise ModelNotFoundError(f"could not download {repo_id!r} ({first_line(exc)})", repo_id, command) from exc


def _kind(model: str) -> tuple[str, Path]:
    """('tiny' | 'dir' | 'hub', path) for a --model value; ModelNotFoundError for files and missing paths."""
    path = Path(model).expanduser()
    if model == TINY_MODEL_ID:
        return "tiny", path
    if path.is_dir():
        return "dir", path
    if path.exists():
        raise ModelNotFoundError(
            f"model path {model!r} is a file; give a diffusers model directory", repo_id_for(model), path
        )
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
            raise ModelNotFoundError(
                f"cannot load model directory {str(path)!r} ({first_line(exc)})", repo_id_for(model), path
            ) from exc
    else:
        pipe = _from_hub(model, lambda local: _from_pretrained(model, dtype, local, transformer))
    return pipe.to(device)


def transformer_config(model: str) -> dict:
    """The transformer config (WanTransformer3DModel keyword arguments) of a --model value."""
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
        raise ModelNotFoundError(f"cannot read the transformer config of {str(path)!r} ({first_line(exc)})") from exc


def resolve_transformer(spec: str) -> Path:
    """A --transformer value as a local path: itself, or a hub id's snapshot (safetensors + json only)."""
    path = Path(spec).expanduser()
    if path.exists() or not looks_like_hub_id(spec):
        return path  # checkpoint.locate_checkpoint reports what is wrong with it

    def fetch(local: bool) -> Path:
        return Path(snapshot_download(spec, allow_patterns=list(DIT_PATTERNS), local_files_only=local))

    return _from_hub(spec, fetch, download_command(spec, dit_only=True))


def load_transformer(spec: str, model: str, dtype: torch.dtype = torch.bfloat16):
    """(transformer, source record): the DiT weights `spec` (path or hub id) in the architecture of
    `model`'s transformer config; checkpoint.CheckpointError for a bad checkpoint."""
    config = transformer_config(model)
    transformer, info = load_checkpoint(resolve_transformer(spec), config, dtype)
    return transformer, {"source": spec, **info}


def save_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Save build_tiny_pipeline(seed) in diffusers layout (safetensors) and return the directory."""
    path = Path(path)
    build_tiny_pipeline(seed=seed).save_pretrained(path, safe_serialization=True)
    return path


def set_flow_shift(pipe: WanPipeline, shift: float) -> WanPipeline:
    """Replace the scheduler by the same UniPC flow-matching scheduler with a different flow_shift."""
    pipe.scheduler = make_scheduler(pipe, float(shift))
    return pipe
