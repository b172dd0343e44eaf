"""Parity with the reference implementations: what wan-nabla computes where Wan2.1
(Wan-Video/Wan2.1), the NABLA fork (gen-ai-team/Wan2.1-NABLA), LightX2V (ModelTC/LightX2V) and
MagCache (Zehong-Ma/MagCache) define the answer. Every expected value is written out here from the
reference's source (file named in a comment), not read from wan-nabla, so a diffusers upgrade or a
local edit that moves one fails a test. docs/parity.md lists the items and the differences kept.

Pinned elsewhere against the fork's own code: the NABLA rule and STA masks (test_masks.py), the
original-layout checkpoint keys and forward (test_checkpoint.py, test_models.py).
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import types

import ftfy
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from wan_nabla import adapter
from wan_nabla.config import GenerationConfig, RunConfig, SpeedConfig, load_config
from wan_nabla.pipeline import VideoGenerator
from wan_nabla.sampling import set_timesteps
from wan_nabla.tiny import build_tiny_pipeline

# Wan2.1 wan/configs/shared_config.py: wan_shared_cfg.sample_neg_prompt
WAN_SAMPLE_NEG_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)
SMALL = dict(size=(64, 64), frames=5, steps=2)


def _gen(speed=None, lora=(), **gen) -> VideoGenerator:
    cfg = RunConfig.from_mapping(
        {
            "speed": {"compile": "none", **(speed or {})},
            "lora": list(lora),
            "generation": {"dtype": "float32", "device": "cpu", **gen},
        }
    )
    return VideoGenerator(build_tiny_pipeline(seed=0), cfg, torch.device("cpu"), model_id="tiny")


def wan_flow_unipc_schedule(steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Wan2.1 wan/utils/fm_solvers_unipc.py, FlowUniPCMultistepScheduler built with shift=1 as
    wan/text2video.py does, then set_timesteps(steps, shift=shift): sigma_max is the float32
    training sigma 1 - 1/1000 read back with .item(), sigma_min 0."""
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    train_sigmas = torch.from_numpy(1.0 - alphas).to(torch.float32)
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = (sigmas * 1000).astype(np.int64)  # torch .to(int64) truncates the same way
    return np.concatenate([sigmas, [0.0]]).astype(np.float32), timesteps


# ---- Same: pinned ------------------------------------------------------------------------------
def test_generation_defaults_are_wans():
    """Wan2.1 generate.py: sample_steps 50 (t2v), sample_guide_scale 5.0, frame_num 81;
    wan/configs/shared_config.py: sample_fps 16, text_len 512, num_train_timesteps 1000."""
    g = GenerationConfig()
    assert (g.steps, g.guidance_scale, g.frames, g.fps) == (50, 5.0, 81, 16)
    assert adapter.TEXT_MAX_TOKENS == 512
    assert adapter.WAN_SCHEDULER_CONFIG["num_train_timesteps"] == 1000


def test_text_encoding_is_wans(tiny_pipe):
    """Wan2.1 wan/modules/tokenizers.py (basic_clean: ftfy.fix_text, html.unescape twice, strip;
    whitespace_clean: \\s+ -> ' ') and wan/modules/t5.py (tokens padded to text_len 512 with the
    mask, context trimmed to the mask length), wan/modules/model.py (context zero-padded back to
    text_len): the embeddings the transformer gets."""
    prompt = "  a &amp;amp; fox\n\t in   snow &lt;3  schÃ¶n "
    clean = re.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(prompt))).strip()).strip()
    tok = tiny_pipe.tokenizer(
        clean,
        padding="max_length",
        max_length=512,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    n = int(tok.attention_mask.sum())
    with torch.no_grad():
        ctx = tiny_pipe.text_encoder(tok.input_ids, tok.attention_mask).last_hidden_state[0, :n]
    want = torch.cat([ctx, ctx.new_zeros(512 - n, ctx.shape[1])])
    pos, _ = adapter.encode_prompts(tiny_pipe, prompt, "", False, torch.device("cpu"))
    assert pos.shape == (1, 512, ctx.shape[1]) and 1 < n < 512
    assert torch.equal(pos[0, n:], want[n:])  # exact zeros past the mask
    torch.testing.assert_close(pos[0], want, atol=1e-5, rtol=1e-5)  # (encoder run batched differently)


def test_latent_shape_and_vae_scaling_are_wans(tiny_pipe):
    """Wan2.1 wan/text2video.py: noise (z_dim 16, (F-1)//4+1, H//8, W//8) in float32;
    wan/modules/vae.py: mean/std below, decode(z) = model.decode(z / (1/std) + mean) in float32."""
    wan_mean = [
        -0.7571,
        -0.7089,
        -0.9113,
        0.1075,
        -0.1745,
        0.9653,
        -0.1517,
        1.5508,
        0.4134,
        -0.0715,
        0.5517,
        -0.3632,
        -0.1922,
        -0.9497,
        0.2503,
        -0.2921,
    ]
    wan_std = [
        2.8184,
        1.4541,
        2.3275,
        2.6558,
        1.2196,
        1.7708,
        2.6052,
        2.0743,
        3.2687,
        2.1526,
        2.8652,
        1.5579,
        1.6382,
        1.1253,
        2.8251,
        1.9160,
    ]
    from diffusers import AutoencoderKLWan

    for cfg in (AutoencoderKLWan().config, tiny_pipe.vae.config):  # diffusers' defaults, kept by the tiny VAE
        assert list(cfg.latents_mean) == wan_mean and list(cfg.latents_std) == wan_std
    lat = adapter.initial_latents(tiny_pipe, 96, 64, 17, 0, torch.device("cpu"))
    assert lat.shape == (1, 16, 5, 8, 12) and lat.dtype == torch.float32
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = tiny_pipe.vae.decode(
            z / (1.0 / torch.tensor(wan_std).view(1, 16, 1, 1, 1)) + torch.tensor(wan_mean).view(1, 16, 1, 1, 1),
            return_dict=False,
        )[0]
        got = adapter.decode_video(tiny_pipe, z)
    want = ((x[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) / 2).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_unipc_solver_settings_are_wans(tiny_pipe):
    """Wan2.1 wan/utils/fm_solvers_unipc.py FlowUniPCMultistepScheduler defaults: solver_order 2,
    flow_prediction, predict_x0, bh2, lower_order_final, no disabled corrector, final sigma zero,
    no thresholding, no dynamic shifting."""
    s = adapter.make_scheduler(tiny_pipe, 5.0).config
    assert (s.solver_order, s.prediction_type, s.predict_x0, s.solver_type, s.lower_order_final) == (
        2,
        "flow_prediction",
        True,
        "bh2",
        True,
    )
    assert (list(s.disable_corrector), s.final_sigmas_type, s.thresholding, s.use_dynamic_shifting) == (
        [],
        "zero",
        False,
        False,
    )
    assert s.use_flow_sigmas and s.flow_shift == 5.0 and s.num_train_timesteps == 1000


def test_euler_four_steps_are_lightx2vs(tiny_pipe):
    """LightX2V's 4-step distilled schedule at shift 5: sigma 1, 0.9375, 0.8333, 0.625 -> 0
    (timesteps 1000, 750, 500, 250 before the shift)."""
    sched = adapter.make_scheduler(tiny_pipe, 5.0, "euler")
    set_timesteps(sched, 4, torch.device("cpu"))
    np.testing.assert_allclose(sched.sigmas.numpy(), [1.0, 0.9375, 5 * 0.5 / 3, 0.625, 0.0], rtol=1e-6)
    np.testing.assert_allclose(sched.timesteps.numpy(), [1000.0, 937.5, 2500 / 3, 625.0], rtol=1e-6)


def test_sta_warm_up_is_the_forks():
    """gen-ai-team/Wan2.1-NABLA wan/text2video.py set_sparse_attention: an `sta-*` algorithm runs
    dense for steps t < 12; NABLA and NABLA+STA are sparse from step 0."""
    assert load_config("sta_11_3_3").attention.dense_steps == 12
    for name in ("nabla_0.7", "nabla_0.6_sta_11_3_3", "nabla_0.5_sta_11_5_5"):
        assert load_config(name).attention.dense_steps == 0, name


# ---- Different, fixed --------------------------------------------------------------------------
def test_negative_prompt_defaults_to_wans_when_guidance_is_on():
    """Wan2.1 wan/text2video.py: `if n_prompt == "": n_prompt = self.sample_neg_prompt` (the fork
    the same). wan-nabla: not given -> Wan's; given "" -> empty; guidance <= 1 encodes none."""
    assert GenerationConfig().to_dict()["negative_prompt"] == WAN_SAMPLE_NEG_PROMPT
    assert GenerationConfig(negative_prompt="").to_dict()["negative_prompt"] == ""
    assert GenerationConfig(negative_prompt="blur").to_dict()["negative_prompt"] == "blur"
    assert GenerationConfig(guidance_scale=1.0).to_dict()["negative_prompt"] == ""
    cfg = load_config(None).override(negative_prompt=None)  # a flag not given keeps the default
    assert cfg.generation.to_dict()["negative_prompt"] == WAN_SAMPLE_NEG_PROMPT


def test_negative_prompt_that_is_encoded(monkeypatch):
    """The prompt pair handed to the text encoder: Wan's negative prompt by default, "" when given."""
    seen = []
    real = adapter.encode_prompts
    monkeypatch.setattr(
        adapter, "encode_prompts", lambda pipe, p, n, cfg, dev: seen.append(n) or real(pipe, p, n, cfg, dev)
    )
    gen = _gen()
    gen.generate("a fox", progress=False, **SMALL)
    gen.generate("a fox", negative_prompt="", progress=False, **SMALL)
    assert seen == [WAN_SAMPLE_NEG_PROMPT, ""]


def test_shift_is_five_at_every_size():
    """Wan2.1 generate.py _validate_args: sample_shift 5.0 for t2v at every size (3.0 only for
    i2v at 480p)."""
    for size in ((832, 480), (480, 832), (1280, 720), (128, 128)):
        assert GenerationConfig(size=size).to_dict()["shift"] == 5.0, size


@pytest.mark.parametrize("steps, shift", [(50, 5.0), (50, 3.0), (4, 5.0), (37, 8.0), (50, 12.0)])
def test_unipc_schedule_is_wans(tiny_pipe, steps, shift):
    """diffusers' UniPC runs Wan's FlowUniPC sigmas and timesteps (diffusers' own starts at 1.0:
    27 of 50 timesteps differ by up to 4 at shift 5)."""
    sched = adapter.make_scheduler(tiny_pipe, shift)
    set_timesteps(sched, steps, torch.device("cpu"))
    sigmas, timesteps = wan_flow_unipc_schedule(steps, shift)
    np.testing.assert_allclose(sched.sigmas.numpy(), sigmas, atol=1e-6, rtol=0)
    assert sched.timesteps.tolist() == timesteps.tolist() and sched.sigmas[-1] == 0


def test_sidecar_of_a_run_with_no_flags_records_wans_settings(tmp_path, monkeypatch):
    """A tiny run with no flags records Wan's negative prompt, shift 5.0 and
    Wan's sigmas and timesteps in its sidecar."""
    from wan_nabla.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "v.mp4"
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny",
                "--prompt",
                "a fox",
                "--output",
                str(out),
                "--quiet",
                "--size",
                "64x64",
                "--frames",
                "5",
                "--steps",
                "3",
            ]
        )
        == 0
    )
    side = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    sigmas, timesteps = wan_flow_unipc_schedule(3, 5.0)
    assert side["negative_prompt"] == WAN_SAMPLE_NEG_PROMPT and side["config"]["generation"]["shift"] == 5.0
    sched = side["schedule"]
    assert sched["sampler"] == "unipc" and sched["shift"] == 5.0
    np.testing.assert_allclose(sched["sigmas"], sigmas, atol=1e-6, rtol=0)
    assert sched["timesteps"] == timesteps.tolist()


def test_guidance_is_combined_in_float32(monkeypatch):
    """Wan2.1 runs its head and `noise_pred_uncond + guide_scale * (cond - uncond)` in float32
    (wan/modules/model.py Head under autocast float32): bf16 predictions are upcast once, the
    combination is float32 and equals the float64 formula to float32 rounding."""
    from wan_nabla.pipeline import predict_noise

    g = torch.Generator().manual_seed(0)
    cond = (torch.randn(1, 16, 2, 8, 8, generator=g) * 3).bfloat16()
    uncond = (torch.randn(1, 16, 2, 8, 8, generator=g) * 3).bfloat16()
    pred = {"cond": cond, "uncond": uncond, "cfg": torch.cat([cond, uncond])}
    monkeypatch.setattr(adapter, "denoise", lambda pipe, x, t, e, context=None: pred[context])
    x, t = torch.zeros(1, 16, 2, 8, 8), torch.tensor(999)
    want = uncond.double() + 5.0 * (cond.double() - uncond.double())
    for both in (None, torch.zeros(2, 4, 8)):
        got = predict_noise(None, x, t, torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), 5.0, both)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-6)
    bf16 = uncond + 5.0 * (cond - uncond)  # the old combination: off by far more than fp32 rounding
    assert (bf16.double() - want).abs().max() > 1e-2


# ---- MagCache ----------------------------------------------------------------------------------
# Zehong-Ma/MagCache MagCache4Wan2.1/magcache_generate.py (mag_ratios: 100 values, cond/uncond
# interleaved) and MagCache4Wan2.1/README.md T2V commands (threshold, K, retention).
MAG_1_3B = dict(
    layers=30,
    heads=12,
    head_dim=128,
    threshold=0.12,
    K=4,
    retention=0.2,
    head=[1.0, 1.0, 1.0124, 1.02213, 1.00166, 1.0041],
    tail=[0.86821, 0.86868, 0.81838, 0.81939],
    total=97.99135,
)
MAG_14B = dict(
    layers=40,
    heads=40,
    head_dim=128,
    threshold=0.24,
    K=6,
    retention=0.2,
    head=[1.0, 1.0, 1.02504, 1.03017, 1.00025, 1.00251],
    tail=[0.8796, 0.87945, 0.86111, 0.86189],
    total=98.0394,
)


@pytest.mark.parametrize("pub", [MAG_1_3B, MAG_14B], ids=["1.3B", "14B"])
def test_mag_cache_uses_the_published_ratios_by_model_shape(pub):
    from wan_nabla.magcache import published_for, resolve

    tc = {"num_layers": pub["layers"], "num_attention_heads": pub["heads"], "attention_head_dim": pub["head_dim"]}
    p = published_for(tc)
    assert len(p.mag_ratios) == 100 and list(p.mag_ratios[:6]) == pub["head"] and list(p.mag_ratios[-4:]) == pub["tail"]
    assert sum(p.mag_ratios) == pytest.approx(pub["total"], abs=1e-9)
    s = resolve(SpeedConfig(cache="mag"), tc)
    assert (s.threshold, s.max_skip_steps, s.retention_ratio) == (pub["threshold"], pub["K"], pub["retention"])
    assert s.mag_ratios == p.mag_ratios[0::2] and "Zehong-Ma/MagCache" in s.source
    t = resolve(SpeedConfig(cache="mag:0.3"), tc)
    assert (t.threshold, t.max_skip_steps) == (0.3, pub["K"])
    assert resolve(SpeedConfig(cache="mag:0.3:1"), tc).max_skip_steps == 1


def test_mag_cache_refuses_other_models_with_one_line(tmp_path, capsys):
    from wan_nabla.cli import main
    from wan_nabla.config import ConfigError
    from wan_nabla.magcache import resolve

    with pytest.raises(ConfigError, match="mag:calibrate"):
        resolve(SpeedConfig(cache="mag"), {"num_layers": 30, "num_attention_heads": 16, "attention_head_dim": 128})
    out = tmp_path / "v.mp4"
    args = ["generate", "--model", "tiny", "--prompt", "x", "--cache", "mag", "--output", str(out), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no published MagCache ratios" in err[0] and "mag:calibrate" in err[0]
    assert not out.exists()


def test_mag_cache_interpolates_as_the_reference():
    """MagCache4Wan2.1/magcache_generate.py nearest_interp: index round(i * (n-1)/(m-1)); diffusers
    applies the same rule to the list wan-nabla hands it."""
    from diffusers.hooks.mag_cache import MagCacheConfig

    from wan_nabla.magcache import PUBLISHED

    cond = np.array(PUBLISHED[0].conditional)
    for m in (30, 8, 50):
        want = cond[np.round(np.arange(m) * ((len(cond) - 1) / (m - 1))).astype(int)]
        got = MagCacheConfig(num_inference_steps=m, mag_ratios=list(cond)).mag_ratios.numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


def test_mag_cache_alone_runs_on_a_registered_shape(monkeypatch):
    """`--cache mag` with no ratios runs the published path. The 1.3B/14B shapes are too big for a
    CPU test, so the tiny transformer's shape is registered as a published model here (test only)."""
    from wan_nabla import magcache

    tiny = magcache.Published("tiny", 2, 64, 0.5, 2, 0.25, (1.0,) * 16)
    monkeypatch.setattr(magcache, "PUBLISHED", [*magcache.PUBLISHED, tiny])
    res = _gen(speed={"cache": "mag"}).generate("a fox", progress=False, size=(64, 64), frames=5, steps=8)
    cache = res.speed["cache"]
    # retention int(0.25 * 8 + 0.5) = 2 steps computed, then at most K=2 skips in a row
    assert cache["computed_per_step"] == [2, 2, 0, 0, 2, 0, 0, 2]
    assert cache["mag"]["threshold"] == 0.5 and cache["mag"]["max_skip_steps"] == 2
    assert cache["mag"]["ratios_source"].startswith("published: tiny")


# ---- LoRA difference keys ----------------------------------------------------------------------
def _diff_lora(path, g):
    """Difference keys only, original naming as LightX2V's LoRAs ship them: the cross-attention
    norm (Wan's norm3 = diffusers' norm2) weight and bias, a q-norm weight, the blocks' and the
    head's modulation tables."""
    sd = {
        "diffusion_model.blocks.0.norm3.diff": torch.randn(64, generator=g) * 0.5,
        "diffusion_model.blocks.0.norm3.diff_b": torch.randn(64, generator=g) * 0.5,
        "diffusion_model.blocks.1.self_attn.norm_q.diff": torch.randn(64, generator=g) * 0.5,
        "diffusion_model.blocks.0.diff_m": torch.randn(1, 6, 64, generator=g) * 0.5,
        "diffusion_model.blocks.1.diff_m": torch.randn(1, 6, 64, generator=g) * 0.5,
        "diffusion_model.head.diff_m": torch.randn(1, 2, 64, generator=g) * 0.5,
    }
    save_file(sd, str(path))
    return sd


# LightX2V lightx2v/utils/lora_loader.py extract_lora_diffs: .diff -> .weight, .diff_b -> .bias,
# .diff_m -> .modulation; Wan -> diffusers names (norm3 is diffusers' norm2, modulation its
# scale_shift_table).
DIFF_TARGETS = {
    "diffusion_model.blocks.0.norm3.diff": "blocks.0.norm2.weight",
    "diffusion_model.blocks.0.norm3.diff_b": "blocks.0.norm2.bias",
    "diffusion_model.blocks.1.self_attn.norm_q.diff": "blocks.1.attn1.norm_q.weight",
    "diffusion_model.blocks.0.diff_m": "blocks.0.scale_shift_table",
    "diffusion_model.blocks.1.diff_m": "blocks.1.scale_shift_table",
    "diffusion_model.head.diff_m": "scale_shift_table",
}


def test_lora_of_difference_keys_only_changes_exactly_those_parameters(tmp_path):
    """LightX2V apply_lora: param.data += lora_diff.to(param.dtype) * strength. The changed
    parameters equal base + scale * diff bit for bit, nothing else moves, the video changes."""
    path = tmp_path / "diff.safetensors"
    sd = _diff_lora(path, torch.Generator().manual_seed(0))
    base = build_tiny_pipeline(seed=0)
    before = {k: v.clone() for k, v in base.transformer.named_parameters()}
    plain = _gen().generate("a fox", progress=False, **SMALL).frames
    gen = _gen(lora=[f"{path}:0.7"])
    after = dict(gen.pipe.transformer.named_parameters())
    for key, target in DIFF_TARGETS.items():
        want = before[target] + sd[key].to(before[target].dtype) * 0.7
        assert torch.equal(after[target], want), target
    for name, p in after.items():
        if name not in DIFF_TARGETS.values():
            assert torch.equal(p, before[name]), name
    assert gen.lora[0]["diff_keys"] == {"diff": 2, "diff_b": 1, "diff_m": 3} and gen.lora[0]["modules"] == 0
    frames = gen.generate("a fox", progress=False, **SMALL).frames
    assert np.abs(frames - plain).max() > 1e-3


def test_lora_difference_keys_add_in_the_parameters_own_dtype(tmp_path):
    """bf16 parameters get diff.to(bf16) * scale in bf16; float32 ones (diffusers keeps the
    modulation tables and norms of a bf16 model in float32) the float32 sum."""
    from wan_nabla.lora import apply_diffs, diff_targets, read_lora

    path = tmp_path / "diff.safetensors"
    sd = _diff_lora(path, torch.Generator().manual_seed(1))
    tr = build_tiny_pipeline(seed=0).transformer.to(torch.bfloat16)
    tr.scale_shift_table.data = tr.scale_shift_table.data.float()
    before = {k: v.clone() for k, v in tr.named_parameters()}
    _, facts = read_lora(path)
    names = diff_targets(tr, facts["diffs"], facts["format"], str(path))
    assert names == DIFF_TARGETS
    apply_diffs(tr, facts["diffs"], names, 1.5)
    params = dict(tr.named_parameters())
    for key, target in DIFF_TARGETS.items():
        p0 = before[target]
        assert params[target].dtype == p0.dtype
        assert torch.equal(params[target], p0 + sd[key].to(p0.dtype) * 1.5), target


def test_lora_difference_key_matching_nothing_is_one_clear_error(tmp_path, capsys):
    from wan_nabla.cli import main

    path = tmp_path / "bad.safetensors"
    save_file({"diffusion_model.blocks.0.norm9.diff": torch.zeros(64)}, str(path))
    out = tmp_path / "v.mp4"
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny",
                "--prompt",
                "x",
                "--lora",
                str(path),
                "--output",
                str(out),
                "--quiet",
                "--steps",
                "1",
                "--frames",
                "5",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'diffusion_model.blocks.0.norm9.diff'" in err[0] and "no such parameter" in err[0]
    assert not out.exists()


# ---- presets, MP4 quality ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nabla_0.7", "nabla_0.6_sta_11_3_3", "nabla_0.5_sta_11_5_5"])
def test_published_presets_run_at_the_fine_tuning_point(name):
    """gen-ai-team/Wan2.1-NABLA README: the fine-tuned 14B DiTs run `--size 1280*720` (cropped to
    1280x640 by the fork; wan-nabla pads instead), generate.py shift 5.0, 50 steps, guidance 5."""
    g = load_config(name).generation
    assert (g.size, g.resolved_shift, g.steps, g.guidance_scale) == ((1280, 720), 5.0, 50, 5.0)


def test_wan_1_3b_preset_is_the_readme_recommendation():
    """Wan2.1 README.md: T2V-1.3B with --sample_guide_scale 6 and --sample_shift 8 (8 to 12), 832*480."""
    g = load_config("wan_1.3b").generation
    assert (g.size, g.guidance_scale, g.resolved_shift) == ((832, 480), 6.0, 8.0)


def test_crf_flag_reaches_the_encoder_and_wans_quality_is_crf_10(monkeypatch, tmp_path):
    """Wan2.1 wan/utils/utils.py cache_video: imageio.get_writer(..., codec='libx264', quality=8);
    imageio-ffmpeg turns quality q into -crf int((1 - q/10) * 51) = 10. wan-nabla: --crf, default
    18 (documented), given to ffmpeg as -crf."""
    from wan_nabla.output import publish, video

    assert int((1 - 8 / 10.0) * 51) == 10
    assert GenerationConfig().crf == 18 and GenerationConfig(crf=10).crf == 10
    seen = []
    real = video.write_mp4
    monkeypatch.setattr(
        video, "write_mp4", lambda frames, path, fps=16, crf=18: seen.append(crf) or real(frames, path, fps, crf)
    )
    frames = np.random.default_rng(0).random((5, 32, 32, 3), dtype=np.float32)
    result = types.SimpleNamespace(
        frames=frames,
        settings={"fps": 16, "crf": 10},
        seed=0,
        timings={},
        attention={},
        speed={},
        parallel=None,
        schedule={},
    )
    gen = types.SimpleNamespace(config=RunConfig(), model_id="tiny", load_s=0.0, device="cpu")
    publish.publish_video(gen, result, "x", tmp_path / "v.mp4")
    assert seen == [10]


@pytest.mark.parametrize("name", ["nabla_0.7", "nabla_0.6_sta_11_3_3", "nabla_0.5_sta_11_5_5"])
def test_published_presets_compute_the_forks_exact_tile_masks(name):
    """gen-ai-team/Wan2.1-NABLA computes the 64x64 tile mask itself: the fine-tuned presets run
    64x64 blocks in plain tile order on CUDA too; zero-shot presets keep the fast blocks."""
    from wan_nabla.attention.backends import geometry

    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    g = geometry(load_config(name).attention, "flex", cuda)
    assert (g.name, g.block_size, g.time_pairs) == ("exact", (64, 64), False)
    fast = geometry(load_config("nabla_0.4").attention, "flex", cuda)
    assert fast.name == "fast" and fast.block_size != (64, 64)


def test_compare_can_put_the_two_geometries_side_by_side():
    """`wan-nabla compare --config nabla_0.7 --against-geometry fast`: the reference is the same
    attention at the other geometry; everything else is the candidate's."""
    from wan_nabla.cli import build_parser, request_from_args
    from wan_nabla.preflight import plan_compare
    from wan_nabla.requests import CompareRequest

    args = build_parser().parse_args(
        [
            "compare",
            "--prompt",
            "x",
            "--config",
            "nabla_0.7",
            "--out",
            "o",
            "--against-geometry",
            "fast",
            "--model",
            "tiny",
        ]
    )
    plan = plan_compare(request_from_args(CompareRequest, args))
    cand, ref = plan.config, plan.reference
    assert cand.attention.geometry == "exact" and ref.attention.geometry == "fast"
    assert ref.attention == dataclasses.replace(cand.attention, geometry="fast")
    assert ref.generation == cand.generation
    args.against = "full"
    with pytest.raises(Exception, match="leave out --against"):
        plan_compare(request_from_args(CompareRequest, args))


def test_geometry_cost_pairs_each_exact_preset_with_its_fast_twin():
    """The GPU job's table: every exact preset row meets its '<name> @fast' twin per backend and
    level; the bench measures both (configs.preset_configs)."""
    from benchmarks.harness.configs import preset_configs
    from benchmarks.harness.geometry_cost import markdown, pairs

    names = [n for n, _ in preset_configs()]
    for p in ("nabla_0.7", "nabla_0.6_sta_11_3_3", "nabla_0.5_sta_11_5_5"):
        assert p in names and f"{p} @fast" in names
    assert "nabla_0.4 @fast" not in names  # zero-shot presets already run fast
    op = {
        "scenario": {"label": "40h 1280x720x81"},
        "rows": [
            {"name": "nabla_0.7 [flex]", "total_ms": 3.0, "density": 0.2},
            {"name": "nabla_0.7 @fast [flex]", "total_ms": 2.0, "density": 0.25},
            {"name": "sta_11_3_3 @fast [fa4]", "total_ms": 1.0},
        ],
    }
    tr = {
        "scenario": "Wan2.1-14B 1280x720x81",
        "rows": [
            {"name": "nabla_0.7 [fa4]", "total_ms": 900.0, "per_layer_attention_ms": 12.0, "density": 0.2},
            {"name": "nabla_0.7 @fast [fa4]", "total_ms": 800.0, "per_layer_attention_ms": 10.0, "density": 0.25},
        ],
    }
    results = {
        "env": {"commit": "abc", "device_name": "H200", "torch": "2.11", "command": "wan-nabla bench ..."},
        "op": [op],
        "transformer": [tr],
    }
    recs = pairs(results)
    assert [(r["level"], r["preset"], r["backend"]) for r in recs] == [
        ("op", "nabla_0.7", "flex"),
        ("op", "sta_11_3_3", "fa4"),
        ("transformer", "nabla_0.7", "fa4"),
    ]
    assert recs[0]["call_ratio"] == 1.5 and recs[1]["missing"] == "exact row"
    assert (recs[2]["call_ratio"], recs[2]["forward_ratio"]) == (1.2, 1.125)
    text = markdown(results, recs)
    assert "commit abc" in text and "H200" in text and "torch 2.11" in text and "| 1.500 |" in text


@pytest.mark.parametrize("pub", [MAG_1_3B, MAG_14B], ids=["1.3B", "14B"])
def test_mag_cache_alone_enables_on_real_shaped_transformers(pub):
    """`--cache mag` on a transformer with the real 1.3B / 14B layer count, heads and head size
    (what selects the ratios; built on the meta device: no weights, no compute) installs diffusers' MagCache with the published values, no calibration:
    the generator's own cache setup, on a stand-in for the generator."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        tr = WanTransformer3DModel(
            num_layers=pub["layers"],
            num_attention_heads=pub["heads"],
            attention_head_dim=pub["head_dim"],
            ffn_dim=256,
            text_dim=64,
            freq_dim=32,
        )
    cfg = RunConfig.from_mapping({"speed": {"cache": "mag"}})
    holder = types.SimpleNamespace(config=cfg, pipe=types.SimpleNamespace(transformer=tr), _cache_key=None, _mag=None)
    VideoGenerator._prepare_cache(holder, 50)
    hook = tr.blocks[0]._diffusers_hook.get_hook("mag_cache_leader_block_hook")
    assert (hook.config.threshold, hook.config.max_skip_steps, hook.config.retention_ratio) == (
        pub["threshold"],
        pub["K"],
        pub["retention"],
    )
    assert hook.config.mag_ratios.tolist()[:3] == pytest.approx([1.0, pub["head"][2], pub["head"][4]])
    assert len(hook.config.mag_ratios) == 50 and holder._mag.source.startswith("published: Wan2.1-T2V-")


def test_presets_show_prints_the_operating_point(capsys):
    from wan_nabla.cli import main

    assert main(["presets", "--show", "nabla_0.7"]) == 0
    text = capsys.readouterr().out
    assert "size: 1280x720" in text and "shift: 5.0" in text and "geometry: exact" in text
