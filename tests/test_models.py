"""Tiny pipeline construction, checkpoint round trips, model resolution and the loading policy."""

from __future__ import annotations

import shutil
import time
import types
from pathlib import Path

import huggingface_hub.constants as hf_constants
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from wan_nabla.models import (
    DEFAULT_HUB_ID,
    DEFAULT_LOCAL_DIR,
    ModelNotFoundError,
    check_available,
    load_pipeline,
    looks_like_hub_id,
    repo_id_for,
    resolve_model,
    set_flow_shift,
)
from wan_nabla.tiny import TINY_MODEL_ID, build_tiny_pipeline

DOWNLOAD_HINT = f"hf download {DEFAULT_HUB_ID} --local-dir weights/Wan2.1-T2V-1.3B-Diffusers"
COMPONENTS = ("transformer", "text_encoder", "vae")


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_weights(a, b) -> bool:
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _small_run(pipe, seed=0):
    gen = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        prompt="a fox", num_frames=5, height=64, width=64, num_inference_steps=2,
        generator=gen, output_type="np",
    ).frames  # fmt: skip


# --- the tiny model -------------------------------------------------------------------------


def test_tiny_build_is_deterministic_and_leaves_global_rng_alone(tiny_pipe):
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    again = build_tiny_pipeline(seed=0)
    assert torch.equal(torch.rand(3), expected_next), "building must not consume the caller's RNG"
    for name in COMPONENTS:
        assert _same_weights(getattr(tiny_pipe, name), getattr(again, name)), name
    other = build_tiny_pipeline(seed=1)
    for name in COMPONENTS:
        assert not _same_weights(getattr(tiny_pipe, name), getattr(other, name)), name


def test_tiny_architecture_matches_what_the_attention_core_assumes(tiny_pipe):
    tc = tiny_pipe.transformer.config
    assert tuple(tc.patch_size) == (1, 2, 2)
    assert tc.in_channels == tc.out_channels == tiny_pipe.vae.config.z_dim == 16
    assert tc.num_layers == 2 and tc.num_attention_heads == 2
    head_dim = tc.attention_head_dim
    t_dim = head_dim - 4 * (head_dim // 6)
    assert t_dim > 0 and t_dim % 2 == 0 and (2 * (head_dim // 6)) % 2 == 0
    assert tc.text_dim == tiny_pipe.text_encoder.config.d_model
    assert tiny_pipe.vae_scale_factor_spatial == 8 and tiny_pipe.vae_scale_factor_temporal == 4
    sc = tiny_pipe.scheduler.config
    assert type(tiny_pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert (sc.prediction_type, sc.use_flow_sigmas, sc.num_train_timesteps, sc.flow_shift) == (
        "flow_prediction", True, 1000, 3.0,
    )  # fmt: skip


def test_tiny_pipeline_generates_17_frames_at_128(tiny_pipe):
    out = tiny_pipe(
        prompt="a red fox running through snow", num_frames=17, height=128, width=128,
        num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0), output_type="np",
    ).frames  # fmt: skip
    assert out.shape == (1, 17, 128, 128, 3)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    assert out.std() > 0.01, "a constant video means the decoder path is broken"


def test_tiny_latent_grid_is_5x16x16(tiny_pipe):
    latents = tiny_pipe(
        prompt="x", num_frames=17, height=128, width=128, num_inference_steps=1, output_type="latent",
        generator=torch.Generator("cpu").manual_seed(0),
    ).frames  # fmt: skip
    assert tuple(latents.shape) == (1, 16, 5, 16, 16)  # -> 5 x 8 x 8 patches of (1, 2, 2)


@pytest.mark.parametrize("prompt", ["🦊 Füchsin im Schnee, 世界 ∑≠ — ok?", "", "\u200b\x00\t"])
def test_any_unicode_prompt_tokenizes_without_unknowns(tiny_pipe, prompt):
    tok = tiny_pipe.tokenizer
    enc = tok([prompt], padding="max_length", max_length=64, truncation=True,
              add_special_tokens=True, return_attention_mask=True, return_tensors="pt")  # fmt: skip
    ids, mask = enc.input_ids[0], enc.attention_mask[0]
    n = int(mask.sum())
    assert ids.shape == (64,) and tok.unk_token_id not in ids.tolist()
    assert ids[n - 1] == tok.eos_token_id and (ids[n:] == tok.pad_token_id).all()
    assert tok.decode(ids[: n - 1]) == prompt
    assert tok.model_max_length == 512
    embeds, _ = tiny_pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=32)
    assert tuple(embeds.shape) == (1, 32, tiny_pipe.transformer.config.text_dim)


def test_long_prompt_is_truncated_to_max_length_with_eos(tiny_pipe):
    ids = tiny_pipe.tokenizer(["ab" * 500], padding="max_length", max_length=16, truncation=True).input_ids[0]
    assert len(ids) == 16 and ids[-1] == tiny_pipe.tokenizer.eos_token_id


# --- checkpoints and loading ----------------------------------------------------------------


def test_checkpoint_is_safetensors_only_and_tokenizer_round_trips(tiny_checkpoint, tiny_pipe):
    files = [p for p in tiny_checkpoint.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in files)
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")
    text = "a fox 🦊 über"
    assert tok(text).input_ids == tiny_pipe.tokenizer(text).input_ids
    assert tok.model_max_length == 512 and tok.pad_token == "<pad>"


def test_load_local_dir_reproduces_weights_and_output(tiny_checkpoint, tiny_pipe):
    loaded = load_pipeline(str(tiny_checkpoint), dtype=torch.float32)
    for name in COMPONENTS:
        assert _same_weights(getattr(loaded, name), getattr(tiny_pipe, name)), name
    # Not bit-exact on the CPU: loaded tensors sit at unaligned addresses inside the safetensors
    # buffer, which changes the kernels' summation order (differences ~2e-7).
    np.testing.assert_allclose(_small_run(loaded), _small_run(tiny_pipe), rtol=0, atol=1e-5)
    assert np.abs(_small_run(loaded, seed=1) - _small_run(tiny_pipe)).max() > 1e-3


@pytest.mark.parametrize("source", ["dir", TINY_MODEL_ID])
def test_vae_stays_fp32_while_transformer_is_bf16(tiny_checkpoint, source):
    pipe = load_pipeline(str(tiny_checkpoint) if source == "dir" else source, dtype=torch.bfloat16)
    assert pipe.vae.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in pipe.vae.parameters())
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert np.isfinite(_small_run(pipe)).all()


def test_tiny_bf16_matches_a_bf16_load_from_disk_tensor_for_tensor(tiny_checkpoint):
    # from_pretrained keeps some modules in fp32; "tiny" must get exactly the same mix.
    from_disk = load_pipeline(str(tiny_checkpoint), dtype=torch.bfloat16)
    tiny = load_pipeline(TINY_MODEL_ID, dtype=torch.bfloat16)
    for name in COMPONENTS:
        assert _same_weights(getattr(from_disk, name), getattr(tiny, name)), name
    kept = [k for k, v in tiny.transformer.state_dict().items() if v.dtype == torch.float32]
    assert any("scale_shift_table" in k for k in kept)


def test_hub_id_is_loaded_from_the_hf_cache(tiny_checkpoint, offline_hub):
    repo = "someone/tiny-wan"
    offline_hub(repo, tiny_checkpoint)
    pipe = load_pipeline(repo, dtype=torch.float32)
    assert pipe.transformer.config.num_layers == 2


def test_offline_hub_id_not_in_cache_raises_with_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as err:
        load_pipeline(DEFAULT_HUB_ID)
    msg = str(err.value)
    assert DOWNLOAD_HINT in msg and "\n" not in msg and "HF_HUB_OFFLINE" in msg


@pytest.mark.parametrize("model", ["./weights/nope", "/nonexistent/wan", "~/no-such-wan-dir", "a/b/c"])
def test_missing_local_path_raises_with_download_command(model, monkeypatch, tmp_path):
    """Guards: a missing directory is reported as one, with the command that fills exactly that
    directory (the 1.3B repo when the name implies no other), `~` expanded for the shell."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist") as err:
        load_pipeline(model)
    target = str(Path(model).expanduser())
    assert f"hf download {DEFAULT_HUB_ID} --local-dir {target}" in str(err.value) and "\n" not in str(err.value)


def test_file_instead_of_directory_is_refused(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\0" * 8)
    with pytest.raises(ModelNotFoundError, match="is a file"):
        load_pipeline(str(f))


def test_pickle_only_weights_are_refused(tiny_checkpoint, tmp_path):
    model_dir = shutil.copytree(tiny_checkpoint, tmp_path / "pickled")
    st = model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), model_dir / "transformer" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(ModelNotFoundError) as err:
        load_pipeline(str(model_dir), dtype=torch.float32)
    msg = str(err.value)
    assert "transformer" in msg and "diffusion_pytorch_model.bin" in msg and "refused" in msg


@pytest.mark.parametrize("missing", ["scheduler", "tokenizer", "model_index.json"])
def test_incomplete_directory_names_what_is_missing(tiny_checkpoint, tmp_path, missing):
    model_dir = shutil.copytree(tiny_checkpoint, tmp_path / "partial")
    target = model_dir / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelNotFoundError, match=f"missing: {missing}"):
        load_pipeline(str(model_dir))


def test_corrupt_safetensors_becomes_model_not_found(tiny_checkpoint, tmp_path):
    model_dir = shutil.copytree(tiny_checkpoint, tmp_path / "corrupt")
    (model_dir / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelNotFoundError, match="cannot load model directory"):
        load_pipeline(str(model_dir))


# --- resolution and scheduler ---------------------------------------------------------------


def test_resolve_model_order(tmp_path):
    weights = tmp_path / "weights"
    assert resolve_model(None, None, weights_root=weights) == DEFAULT_HUB_ID
    (weights / DEFAULT_LOCAL_DIR.name).mkdir(parents=True)
    assert resolve_model(None, None, weights_root=weights) == str(weights / DEFAULT_LOCAL_DIR.name)
    assert resolve_model(None, "from/config", weights_root=weights) == "from/config"
    assert resolve_model("tiny", "from/config", weights_root=weights) == "tiny"


def test_hub_id_shape():
    assert looks_like_hub_id(DEFAULT_HUB_ID) and looks_like_hub_id("a/b")
    for not_hub in ("./a/b", "/a/b", "~/a", "a/b/c", "a", "a/", "/a"):
        assert not looks_like_hub_id(not_hub), not_hub


def test_set_flow_shift_changes_only_the_shift(tiny_pipe):
    holder = types.SimpleNamespace(scheduler=tiny_pipe.scheduler)  # leave the shared pipeline alone
    set_flow_shift(holder, 5.0)
    new, old = holder.scheduler, tiny_pipe.scheduler
    assert type(new) is type(old) and new is not old
    assert new.config.flow_shift == 5.0 and old.config.flow_shift == 3.0
    assert {k: v for k, v in new.config.items() if k != "flow_shift"} == {
        k: v for k, v in old.config.items() if k != "flow_shift"
    }
    new.set_timesteps(4)
    ref = type(old).from_config(old.config)
    ref.set_timesteps(4)
    assert (new.sigmas[1:-1] > ref.sigmas[1:-1]).all(), "a larger shift keeps sigmas higher"


@pytest.mark.parametrize(
    ("model", "repo", "local_dir"),
    [
        ("weights/Wan2.1-T2V-1.3B-Diffusers", DEFAULT_HUB_ID, "weights/Wan2.1-T2V-1.3B-Diffusers"),
        ("weights/Wan2.1-T2V-14B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "weights/Wan2.1-T2V-14B-Diffusers"),
        ("models/wan2.1-t2v-14b-diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "models/wan2.1-t2v-14b-diffusers"),
        ("existing/my-model", DEFAULT_HUB_ID, "existing/my-model"),
        ("my-model", DEFAULT_HUB_ID, "my-model"),
    ],
)
def test_a_path_is_never_taken_for_a_hub_id(model, repo, local_dir, tmp_path, monkeypatch):
    """Guards the README's own real-weights command run before downloading: it took
    `weights/Wan2.1-T2V-1.3B-Diffusers` for a hub repo, retried the hub for ~23 s and printed
    `hf download weights/Wan2.1-T2V-1.3B-Diffusers ...`. A path (a known Wan2.1 directory name,
    an existing parent directory, no 'owner/name' shape) is reported as a missing directory, at
    once and without any hub request, with the real repo id and that directory."""
    from huggingface_hub import HfApi

    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    monkeypatch.setattr(HfApi, "model_info", lambda *a, **k: pytest.fail("asked the hub about a local path"))
    assert not looks_like_hub_id(model)
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        check_available(model)
    assert time.perf_counter() - t0 < 1.0
    assert str(err.value) == (
        f"model directory {model!r} does not exist; get the weights with: hf download {repo} --local-dir {local_dir}"
    )
    assert repo_id_for(model) == repo


def test_repo_for_the_download_command_follows_name_then_config():
    """A hub id is its own repo; a path ending in a known Wan2.1 name maps to Wan-AI/<name>;
    anything else falls back to the config's hub id, then to the 1.3B model."""
    assert repo_id_for("someone/thing") == "someone/thing"
    assert repo_id_for("/data/Wan2.1-T2V-14B-Diffusers/") == "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    assert repo_id_for("/data/my-wan", "Wan-AI/Wan2.1-T2V-14B-Diffusers") == "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    assert repo_id_for("/data/my-wan", "./not-a-hub-id") == DEFAULT_HUB_ID


def test_uncached_hub_id_without_network_fails_fast_with_the_command(tmp_path, monkeypatch):
    """Guards: a hub id that is not cached, on a machine that cannot reach the hub (HF_HUB_OFFLINE
    not set), failed only after huggingface_hub's 5 retries with backoff (~23 s) and printed each
    retry warning twice; now one request decides (refused connection here), in well under the
    probe timeout, with the download command and no retry warning."""
    import logging

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    warnings = []
    handler = logging.Handler()
    handler.emit = warnings.append
    logging.getLogger("huggingface_hub").addHandler(handler)
    try:
        for call in (lambda: check_available(DEFAULT_HUB_ID), lambda: load_pipeline("someone/tiny-wan")):
            t0 = time.perf_counter()
            with pytest.raises(ModelNotFoundError) as err:
                call()
            assert time.perf_counter() - t0 < 3.0
            assert "cannot be reached" in str(err.value) and "hf download " in str(err.value)
    finally:
        logging.getLogger("huggingface_hub").removeHandler(handler)
    assert not [r for r in warnings if "Retry" in r.getMessage()]
    assert str(err.value).endswith("hf download someone/tiny-wan --local-dir weights/tiny-wan")


def test_sampler_limit_is_exactly_where_diffusers_fails():
    """Guards the steps/shift preflight against the real scheduler: for several shifts, the
    limit app.check_sampler enforces is the largest step count that diffusers' UniPC runs to
    the end (a dummy model output, the real `step` loop), and one step more fails there with the
    assertion a user met 8.6 minutes into a run."""
    from diffusers import UniPCMultistepScheduler

    from wan_nabla.app import item_check
    from wan_nabla.config import AttentionConfig, ConfigError, GenerationConfig
    from wan_nabla.model_source import ModelFacts
    from wan_nabla.sampling import set_timesteps

    facts = ModelFacts("tiny")
    check = item_check(facts, AttentionConfig())

    def runs(steps, shift):
        sched = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift
        )
        set_timesteps(sched, steps)  # Wan's schedule, as the pipeline runs it
        x = torch.randn(1, 2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
        try:
            for t in sched.timesteps:
                x = sched.step(torch.zeros_like(x) + 0.1, t, x, return_dict=False)[0]
        except AssertionError:
            return False
        return bool(torch.isfinite(x).all())

    limits = {}
    for shift in (3.0, 5.0, 17.0, 100.0):
        top = None
        for steps in range(1, 1001):
            try:
                check(GenerationConfig(steps=steps, shift=shift, size=(128, 128), frames=17))
            except ConfigError as e:
                assert f"use at most {steps - 1} steps" in str(e)
                top = steps - 1
                break
        assert top is not None and runs(top, shift) and not runs(top + 1, shift), (shift, top)
        limits[shift] = top
    assert limits[3.0] == 500 and limits[5.0] == 250 and limits[100.0] == 11
    check(GenerationConfig(steps=1000, shift=0.5, size=(128, 128), frames=17))  # small shifts run 1000
    assert runs(1000, 0.5)
