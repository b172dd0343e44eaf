"""The denoising loop: equals diffusers' WanPipeline, dense-step schedule, no recompiles, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from wan_nabla.attention.backends import flex
from wan_nabla.config import RunConfig
from wan_nabla.pipeline import VideoGenerator
from wan_nabla.tiny import build_tiny_pipeline

SMALL = {"size": (128, 128), "frames": 17, "steps": 4}


def _gen(attention: dict, **gen) -> VideoGenerator:
    cfg = RunConfig.from_mapping({"attention": attention, "generation": {"dtype": "float32", "device": "cpu", **gen}})
    return VideoGenerator(build_tiny_pipeline(seed=0), cfg, torch.device("cpu"), model_id="tiny")


def test_full_attention_loop_equals_diffusers_pipeline():
    """Guards: our loop (batched CFG, shift, seeded CPU noise, VAE decode) is Wan2.1's loop:
    same frames as diffusers' WanPipeline.__call__ for the same seed, given the same negative
    prompt (Wan's, our default) and the same schedule (Wan's FlowUniPC sigmas at shift 5, which
    WanPipeline cannot be asked for: its scheduler is given them here; test_parity pins them)."""
    from diffusers import UniPCMultistepScheduler

    from wan_nabla.config import WAN_NEGATIVE_PROMPT
    from wan_nabla.sampling import wan_unshifted_sigmas

    class WanSchedule(UniPCMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
            super().set_timesteps(device=device, sigmas=wan_unshifted_sigmas(num_inference_steps))

    gen = _gen({"type": "full"})
    ours = gen.generate("a red fox", progress=False, seed=3, **SMALL).frames
    gen.close()
    pipe = build_tiny_pipeline(seed=0)
    pipe.scheduler = WanSchedule.from_config(pipe.scheduler.config, flow_shift=5.0)
    ref = pipe(
        prompt="a red fox",
        negative_prompt=WAN_NEGATIVE_PROMPT,
        height=128,
        width=128,
        num_frames=17,
        num_inference_steps=4,
        guidance_scale=5.0,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(3),
    ).frames[0]
    assert ours.shape == ref.shape == (17, 128, 128, 3)
    np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_batched_cfg_equals_two_passes():
    """Guards: running cond/uncond as one batch of 2 with per-item NABLA masks == two calls."""
    a = _gen({"type": "nabla", "threshold": 0.5}, batch_cfg=True)
    b = _gen({"type": "nabla", "threshold": 0.5}, batch_cfg=False)
    fa = a.generate("a fox", progress=False, **SMALL).frames
    fb = b.generate("a fox", progress=False, **SMALL).frames
    np.testing.assert_allclose(fa, fb, atol=2e-4)


def test_dense_steps_switch_at_the_right_step(monkeypatch):
    """Guards: steps < dense_steps use the dense kernel only; later steps the sparse kernel only."""
    kernel_steps = []
    gen = _gen({"type": "sta", "sta_window": [1, 1, 1], "dense_steps": 2})
    run = gen.handle.run
    real_s, real_d = flex.sparse_attention, flex.dense_attention
    monkeypatch.setattr(
        flex, "sparse_attention", lambda *a, **k: kernel_steps.append(("sparse", run.step)) or real_s(*a, **k)
    )
    monkeypatch.setattr(
        flex, "dense_attention", lambda *a, **k: kernel_steps.append(("dense", run.step)) or real_d(*a, **k)
    )
    res = gen.generate("a fox", progress=False, **SMALL)
    per_step = res.attention["per_step"]
    assert per_step[:2] == [1.0, 1.0]
    assert all(d == pytest.approx(0.2) for d in per_step[2:])  # 5 frames, 1 tile each, window 1
    n_layers = len(gen.pipe.transformer.blocks)
    assert res.attention["per_layer"] == [pytest.approx(0.6)] * n_layers  # (1 + 1 + 0.2 + 0.2) / 4
    assert (
        kernel_steps
        == [("dense", 0)] * n_layers
        + [("dense", 1)] * n_layers
        + [("sparse", 2)] * n_layers
        + [("sparse", 3)] * n_layers
    )


def test_no_recompilation_across_steps_prompts_and_seeds():
    """Guards: flex compiles once per shape; new masks, prompts and seeds reuse it."""
    gen = _gen({"type": "nabla_sta", "threshold": 0.5, "sta_window": [3, 1, 1]})
    gen.generate("first prompt", progress=False, seed=1, **SMALL)
    graphs = counters["stats"]["unique_graphs"]
    frames = []
    for prompt, seed in [("another prompt entirely", 2), ("a third, with ünïcödé 🦊", 3)]:
        frames.append(gen.generate(prompt, progress=False, seed=seed, **SMALL).frames)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not np.allclose(frames[0], frames[1])


def test_seed_reproduces_and_differs():
    gen = _gen({"type": "nabla", "threshold": 0.7})
    a = gen.generate("a fox", progress=False, seed=11, **SMALL)
    b = gen.generate("a fox", progress=False, seed=11, **SMALL)
    c = gen.generate("a fox", progress=False, seed=12, **SMALL)
    assert np.array_equal(a.frames, b.frames)
    assert not np.allclose(a.frames, c.frames)
    assert a.seed == 11 and a.settings["steps"] == 4
    assert set(a.timings) >= {"text_encoding_s", "denoising_s", "per_step_s", "decode_s"}
    assert len(a.attention["per_step"]) == 4 and 0 < a.attention["overall"] <= 1


def test_sparse_generation_differs_from_dense():
    """Guards: end to end, a sparse config really changes the video (masks reach the kernel)."""
    dense = _gen({"type": "full"}).generate("a fox", progress=False, **SMALL).frames
    sparse = _gen({"type": "sta", "sta_window": [1, 1, 1]}).generate("a fox", progress=False, **SMALL).frames
    assert np.abs(dense - sparse).max() > 1e-3


def test_use_config_swaps_attention_like_a_fresh_generator():
    """Guards VideoGenerator.use_config (serve's per-job preset): the swapped-in attention gives the
    video a generator built with it gives, swapping back gives the first video again, a bad
    attention section leaves the working one installed, and load-time sections cannot change."""
    import dataclasses

    from wan_nabla.config import ConfigError
    from wan_nabla.wan.hooks import handle_of

    small = dict(SMALL, steps=2)
    sta = {"type": "sta", "sta_window": [1, 1, 1]}
    gen = _gen({"type": "full"})
    dense = gen.generate("a fox", progress=False, **small).frames
    fresh = _gen(sta)
    want = fresh.generate("a fox", progress=False, **small).frames
    base = gen.config
    gen.use_config(dataclasses.replace(base, attention=fresh.config.attention))
    np.testing.assert_array_equal(gen.generate("a fox", progress=False, **small).frames, want)
    gen.use_config(base)
    np.testing.assert_array_equal(gen.generate("a fox", progress=False, **small).frames, dense)
    bad = dataclasses.replace(fresh.config.attention, dense_layers=(99,))
    with pytest.raises(ConfigError, match="dense_layers"):
        gen.use_config(dataclasses.replace(base, attention=bad))
    assert gen.config is base and gen.handle.run.config == base.attention
    assert handle_of(gen.pipe.transformer) is gen.handle
    with pytest.raises(ValueError, match="speed"):
        gen.use_config(dataclasses.replace(base, speed=dataclasses.replace(base.speed, cache="first-block:0.05")))


def test_verbose_logs_density_per_step(caplog):
    import logging

    gen = _gen({"type": "nabla", "threshold": 0.5})
    with caplog.at_level(logging.DEBUG, logger="wan_nabla.attention.run"):
        gen.generate("a fox", progress=False, **SMALL)
    lines = [r.getMessage() for r in caplog.records if "density" in r.getMessage()]
    assert len(lines) == 4 and lines[0].startswith("step 0: nabla 0.5 mean kept-block density")


def test_on_step_sees_each_step_and_the_final_latents():
    """Guards the compare tool's hook: on_step is called once per step, in order, with the guided
    noise prediction and the latents after the step; the last latents decode to the returned
    frames, and a callback does not change the video."""
    from wan_nabla import adapter

    gen = _gen({"type": "full"})
    seen = []
    res = gen.generate("a fox", progress=False, on_step=lambda i, n, x: seen.append((i, n.clone(), x.clone())), **SMALL)
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    assert all(n.shape == x.shape == (1, 16, 5, 16, 16) for _, n, x in seen)
    assert not torch.equal(seen[0][2], seen[-1][2])
    with torch.no_grad():
        np.testing.assert_array_equal(adapter.decode_video(gen.pipe, seen[-1][2]), res.frames)
    np.testing.assert_array_equal(gen.generate("a fox", progress=False, **SMALL).frames, res.frames)


def test_generate_with_whole_settings_equals_the_same_overrides():
    """Guards generate(settings=...), the path batch items and served jobs take: a GenerationConfig
    gives the video its fields give as overrides (and not the config's defaults), is refused next
    to overrides, and cannot change the dtype the generator was built for."""
    gen = _gen({"type": "sta", "sta_window": [1, 1, 1]})
    small = {"size": (64, 64), "frames": 5, "steps": 2}
    g = gen.settings(seed=7, guidance_scale=3.0, shift=4.0, negative_prompt="blurry", **small)
    whole = gen.generate("a red fox", settings=g, progress=False)
    fields = gen.generate(
        "a red fox", negative_prompt="blurry", seed=7, guidance_scale=3.0, shift=4.0, progress=False, **small
    )
    defaults = gen.generate("a red fox", progress=False, **small)
    np.testing.assert_array_equal(whole.frames, fields.frames)
    assert whole.settings == fields.settings and whole.seed == 7
    assert np.abs(whole.frames - defaults.frames).max() > 0.01  # the settings were used, not the defaults
    with pytest.raises(TypeError, match="not both"):
        gen.generate("a red fox", settings=g, seed=1, progress=False)
    with pytest.raises(ValueError, match="built for float32"):
        gen.generate("a red fox", settings=gen.settings(dtype="bfloat16", **small), progress=False)
