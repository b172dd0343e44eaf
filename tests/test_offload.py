"""Memory modes (--offload none|model|group|sequential): same video as mode none, the intended
hooks installed and removed, VAE tiling rule, per-phase peak memory bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wan_nabla import pipeline as pipeline_mod
from wan_nabla.config import AttentionConfig, ConfigError, GenerationConfig, MemoryConfig, RunConfig
from wan_nabla.offload import VAE_TILING_AUTO_PIXELS, apply_memory, vae_tiling_on
from wan_nabla.pipeline import VideoGenerator
from wan_nabla.tiny import build_tiny_pipeline

# Sparse attention on a padded-free tiny grid: 2 latent frames x 1 x 2 tiles, STA (1,1,1) keeps
# each tile to itself, so the tile-order hooks and sparse processors really run.
ATT = AttentionConfig(type="nabla_sta", threshold=0.5, sta_window=(1, 1, 1))
GEN = GenerationConfig(size=(256, 128), frames=5, steps=1, device="cpu", dtype="float32")


def _run(mode: str):
    cfg = RunConfig(attention=ATT, generation=GEN, memory=MemoryConfig(offload=mode))
    gen = VideoGenerator(build_tiny_pipeline(seed=0), cfg, torch.device("cpu"))
    try:
        return gen.generate("a red fox", progress=False), gen
    finally:
        gen.close()


@pytest.fixture(scope="module")
def reference():
    result, _ = _run("none")
    assert all(0 < d < 1 for d in result.attention["per_step"]), "the reference must be sparse"
    return result


@pytest.mark.parametrize("mode", ["model", "group", "sequential"])
def test_offload_modes_give_the_same_video_as_none(reference, mode):
    """Guards point 2 on the CPU (onload = offload = cpu, which exercises the hook order, not the
    transfers): under each mode the tile-order hooks, the sparse processors and the VAE path run
    as in mode none: identical frames and per-step densities; close() takes every hook off."""
    result, gen = _run(mode)
    np.testing.assert_array_equal(result.frames, reference.frames)
    assert result.attention["per_step"] == reference.attention["per_step"]
    pipe = gen.pipe
    assert not any(hasattr(m, "_hf_hook") for m in (pipe.text_encoder, pipe.transformer, pipe.vae))
    for module in (pipe.transformer, pipe.text_encoder):
        hooked = [
            n
            for n, m in module.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks
        ]
        assert hooked == [], hooked


def _hooks(module) -> set[str]:
    reg = getattr(module, "_diffusers_hook", None)
    return set(reg.hooks) if reg is not None else set()


@pytest.mark.parametrize("mode", ["none", "model", "group", "sequential"])
def test_each_mode_installs_its_own_hooks(mode):
    """Guards the meaning of each mode: model = accelerate hooks on the three components; group =
    one group per transformer block plus the whole text encoder as one group; sequential = a group
    per leaf layer (transformer and text encoder); none = nothing. VAE never grouped."""
    pipe = build_tiny_pipeline(seed=0)
    handle = apply_memory(pipe, MemoryConfig(offload=mode), torch.device("cpu"))
    tr, te = pipe.transformer, pipe.text_encoder
    leaf, block = tr.blocks[0].attn1.to_q, tr.blocks[0]
    has_hf = [hasattr(m, "_hf_hook") for m in (te, tr, pipe.vae)]
    if mode == "none":
        assert has_hf == [False] * 3 and not _hooks(tr) and not _hooks(block)
    elif mode == "model":
        assert has_hf == [True] * 3 and not _hooks(block)
    elif mode == "group":
        assert has_hf == [False] * 3
        assert all("group_offloading" in _hooks(b) for b in tr.blocks) and not _hooks(leaf)
        assert "group_offloading" in _hooks(te) and not _hooks(te.encoder.block[0])
    else:
        assert "group_offloading" in _hooks(leaf) and "group_offloading" in _hooks(
            te.encoder.block[0].layer[0].SelfAttention.q
        )
    assert not _hooks(pipe.vae)
    handle.remove()
    assert not _hooks(leaf) and not _hooks(block) and not hasattr(tr, "_hf_hook")


def test_model_mode_frees_the_pipeline_after_each_video(monkeypatch):
    """Guards: in model mode every component goes back to the CPU after a video (maybe_free_model_hooks)."""
    pipe = build_tiny_pipeline(seed=0)
    handle = apply_memory(pipe, MemoryConfig(offload="model"), torch.device("cpu"))
    calls = []
    monkeypatch.setattr(pipe, "maybe_free_model_hooks", lambda: calls.append(1))
    handle.after_video()
    assert calls == [1]
    handle.remove()


def test_vae_tiling_rule():
    """Guards the documented auto rule: tiling from VAE_TILING_AUTO_PIXELS per frame, always with
    group/sequential, never when off; before_decode switches the VAE accordingly."""
    assert VAE_TILING_AUTO_PIXELS == 1280 * 720
    assert vae_tiling_on(MemoryConfig(), 1280, 720) and not vae_tiling_on(MemoryConfig(), 832, 480)
    assert vae_tiling_on(MemoryConfig(offload="group"), 832, 480)
    assert vae_tiling_on(MemoryConfig(offload="sequential"), 128, 128)
    assert not vae_tiling_on(MemoryConfig(offload="model"), 832, 480)
    assert not vae_tiling_on(MemoryConfig(offload="group", vae_tiling="off"), 1920, 1088)
    assert vae_tiling_on(MemoryConfig(vae_tiling="on"), 128, 128)
    pipe = build_tiny_pipeline(seed=0)
    handle = apply_memory(pipe, MemoryConfig(), torch.device("cpu"))
    assert handle.before_decode(1280, 720) and pipe.vae.use_tiling
    assert not handle.before_decode(832, 480) and not pipe.vae.use_tiling


def test_vae_tiling_auto_asks_a_cuda_device_for_room(monkeypatch):
    """Guards the memory-aware auto rule: on CUDA an untiled decode is chosen iff its measured need
    (0.272 GiB per million pixel-frames, x1.25) fits in free + cached-unused memory, whatever the
    frame size; group/sequential always tile; off/on are obeyed; no CUDA device: the pixel rule."""
    from wan_nabla import offload

    cuda = torch.device("cuda", 0)
    need_720 = offload.untiled_decode_gib(1280, 720, 81)
    assert abs(need_720 - 20.3) < 0.2 and abs(offload.untiled_decode_gib(832, 480, 81) - 8.8) < 0.1
    for free, tiled in ((40.0, False), (need_720 * 1.25 + 0.01, False), (need_720 * 1.25 - 0.01, True), (8.0, True)):
        monkeypatch.setattr(offload, "free_device_gib", lambda device, free=free: free)
        assert vae_tiling_on(MemoryConfig(), 1280, 720, 81, cuda) is tiled, free
    monkeypatch.setattr(offload, "free_device_gib", lambda device: 9.0)  # a small 480p-sized card: tile
    assert vae_tiling_on(MemoryConfig(), 832, 480, 81, cuda) and not vae_tiling_on(MemoryConfig(), 832, 480, 17, cuda)
    monkeypatch.setattr(offload, "free_device_gib", lambda device: 1000.0)
    assert vae_tiling_on(MemoryConfig(offload="group"), 1280, 720, 81, cuda)
    assert not vae_tiling_on(MemoryConfig(offload="model"), 1280, 720, 81, cuda)
    assert vae_tiling_on(MemoryConfig(vae_tiling="on"), 128, 128, 17, cuda)
    assert vae_tiling_on(MemoryConfig(), 1280, 720, 81, torch.device("cpu"))  # pixel rule off CUDA


def test_untiled_decode_out_of_memory_decodes_again_tiled(monkeypatch):
    """Guards "nothing lost": an untiled decode that runs out of memory is retried with tiling,
    the video comes out and the sidecar timings say so; a tiled decode's OOM is not retried."""
    from wan_nabla import adapter

    real = adapter.decode_video
    calls = []

    def decode(pipe, latents, device=None):
        calls.append(pipe.vae.use_tiling)
        if not pipe.vae.use_tiling:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(pipe, latents, device)

    monkeypatch.setattr(adapter, "decode_video", decode)
    gen = VideoGenerator(
        build_tiny_pipeline(seed=0),
        RunConfig.from_mapping({"generation": {"dtype": "float32", "device": "cpu"}, "memory": {"vae_tiling": "off"}}),
        torch.device("cpu"),
    )
    res = gen.generate("a fox", progress=False, size=(128, 128), frames=9, steps=1)
    assert calls == [False, True] and res.frames.shape == (9, 128, 128, 3)
    assert res.timings["vae_tiling"] is True and res.timings["vae_tiling_retry"] is True
    gen.close()
    gen = VideoGenerator(
        build_tiny_pipeline(seed=0),
        RunConfig.from_mapping({"generation": {"dtype": "float32", "device": "cpu"}, "memory": {"vae_tiling": "on"}}),
        torch.device("cpu"),
    )
    monkeypatch.setattr(adapter, "decode_video", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError):
        gen.generate("a fox", progress=False, size=(128, 128), frames=9, steps=1)
    gen.close()


def test_peak_memory_is_recorded_per_phase(monkeypatch):
    """Guards the per-phase bookkeeping: the allocator peak is reset as each phase begins and read
    when it ends, so encode / denoise / decode each get their own peak and the overall is the max."""
    peaks = iter([5 * 2**30, 20 * 2**30, 9 * 2**30])
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda dev=None: resets.append(dev))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: next(peaks))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda dev=None: 30 * 2**30)
    p = pipeline_mod._PhasePeaks(torch.device("cuda"))
    for phase in ("encode", "denoise", "decode"):
        p.end(phase)
    assert len(resets) == 4
    assert p.record() == {
        "peak_gpu_memory_gb": 20.0,
        "peak_gpu_memory_gb_by_phase": {"encode": 5.0, "denoise": 20.0, "decode": 9.0},
        "peak_gpu_reserved_gb_by_phase": {"encode": 30.0, "denoise": 30.0, "decode": 30.0},
    }
    assert pipeline_mod._PhasePeaks(torch.device("cpu")).record() == {}


def test_memory_config_and_flags():
    """Guards the `memory:` section and the model mapping: defaults, validation with the key named,
    overrides from flags routed to their sections, and the plain-string `model:` still accepted."""
    assert RunConfig().memory == MemoryConfig("none", "auto")
    cfg = RunConfig.from_mapping({"model": "tiny", "memory": {"offload": "group", "vae_tiling": "off"}})
    assert (cfg.model.base, cfg.memory.offload, cfg.memory.vae_tiling) == ("tiny", "group", "off")
    o = cfg.override(offload="sequential", transformer="/ck", model="x/y", steps=3)
    assert (o.memory.offload, o.memory.vae_tiling, o.model.transformer, o.model.base, o.generation.steps) == (
        "sequential",
        "off",
        "/ck",
        "x/y",
        3,
    )
    assert o.to_dict()["memory"] == {"offload": "sequential", "vae_tiling": "off", "vae_dtype": "fp32"}
    assert o.to_dict()["model"] == {"base": "x/y", "transformer": "/ck", "recommended_transformer": None}
    for bad, key in [
        ({"memory": {"offload": "cpu"}}, "memory.offload"),
        ({"memory": {"vae_tiling": True}}, "memory.vae_tiling"),
        ({"memory": {"offlaod": "group"}}, "memory.offlaod"),
        ({"model": {"base": "tiny", "transformr": "x"}}, "model.transformr"),
        ({"model": {"transformer": 3}}, "model.transformer"),
        ({"model": ["tiny"]}, "model"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            RunConfig.from_mapping(bad)


@pytest.mark.parametrize(
    "flag, value, allowed",
    [("--offload", "cpu", "none, model, group, sequential"), ("--vae-tiling", "maybe", "auto, on, off")],
)
def test_bad_memory_flags_exit_2_naming_the_flag(tmp_path, capsys, flag, value, allowed):
    """Guards: a bad --offload / --vae-tiling is one line naming the flag and the allowed values,
    exit 2, before any model is loaded or file written."""
    from wan_nabla.cli import main

    assert main(["generate", "--prompt", "x", "--model", "tiny", flag, value, "--output", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wan-nabla: error: {flag} (memory.") and allowed in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_vae_tiling_auto_uses_the_need_of_the_vae_dtype(monkeypatch):
    """Guards: the auto rule reads memory.vae_dtype: a bf16 decode needs about half the fp32
    memory, so a card with room for the bf16 decode but not the fp32 one decodes bf16 untiled."""
    from wan_nabla import offload

    fp32, bf16 = offload.untiled_decode_gib(1280, 720, 81), offload.untiled_decode_gib(1280, 720, 81, "bf16")
    assert 0.45 < bf16 / fp32 < 0.56
    monkeypatch.setattr(offload, "free_device_gib", lambda device: bf16 * 1.25 + 0.5)
    cuda = torch.device("cuda", 0)
    assert vae_tiling_on(MemoryConfig(), 1280, 720, 81, cuda)
    assert not vae_tiling_on(MemoryConfig(vae_dtype="bf16"), 1280, 720, 81, cuda)
