"""Speed levers that stack with sparse attention: LoRA merging, the CFG-free path, step caches,
the Euler sampler, compiled blocks; each checked on the tiny model against the plain run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from wan_nabla import adapter
from wan_nabla.cli import main
from wan_nabla.config import ConfigError, LoraSpec, RunConfig, SpeedConfig, load_config
from wan_nabla.pipeline import VideoGenerator
from wan_nabla.sampling import set_timesteps
from wan_nabla.tiny import build_tiny_pipeline

# 64x64 px, 5 frames: 2 latent frames of one (padded) tile each; STA 1-1-1 keeps half the blocks.
SMALL = dict(size=(64, 64), frames=5, steps=2)
STA = {"type": "sta", "sta_window": [1, 1, 1]}


def _gen(attention=None, speed=None, lora=(), **gen) -> VideoGenerator:
    cfg = RunConfig.from_mapping(
        {
            "attention": attention or STA,
            "speed": {"compile": "none", **(speed or {})},
            "lora": list(lora),
            "generation": {"dtype": "float32", "device": "cpu", **gen},
        }
    )
    return VideoGenerator(build_tiny_pipeline(seed=0), cfg, torch.device("cpu"), model_id="tiny")


# ---- LoRA --------------------------------------------------------------------------------------
RANK, ALPHA = 4, 8.0


def _lora_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA in original Wan naming as LightX2V ships it: lora_down/lora_up, alpha, diff_b bias
    deltas, and modulation deltas (diff_m). Tiny model: dim 64, ffn 64, 2 blocks."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for b in range(2):
        for att in ("self_attn", "cross_attn"):
            for o in "qkvo":
                sd[f"diffusion_model.blocks.{b}.{att}.{o}.lora_down.weight"] = torch.randn(RANK, 64, generator=g) * 0.3
                sd[f"diffusion_model.blocks.{b}.{att}.{o}.lora_up.weight"] = torch.randn(64, RANK, generator=g) * 0.3
                sd[f"diffusion_model.blocks.{b}.{att}.{o}.alpha"] = torch.tensor(ALPHA)
                sd[f"diffusion_model.blocks.{b}.{att}.{o}.diff_b"] = torch.randn(64, generator=g) * 0.1
        for f, (n_in, n_out) in (("ffn.0", (64, 64)), ("ffn.2", (64, 64))):
            sd[f"diffusion_model.blocks.{b}.{f}.lora_down.weight"] = torch.randn(RANK, n_in, generator=g) * 0.3
            sd[f"diffusion_model.blocks.{b}.{f}.lora_up.weight"] = torch.randn(n_out, RANK, generator=g) * 0.3
            sd[f"diffusion_model.blocks.{b}.{f}.alpha"] = torch.tensor(ALPHA)
        sd[f"diffusion_model.blocks.{b}.diff_m"] = torch.randn(1, 6, 64, generator=g)
    return sd


_TARGETS = {"self_attn": "attn1", "cross_attn": "attn2"}
_PROJ = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}


def _to_diffusers_naming(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LoRA written by hand in diffusers/PEFT naming, alpha/rank folded into lora_A."""
    out = {}
    for key, t in sd.items():
        body = key.removeprefix("diffusion_model.")
        parts = body.split(".")
        if body.endswith(".alpha"):
            continue
        if body.endswith(".diff_m"):  # a difference key keeps its suffix in diffusers naming
            out[f"transformer.{body}"] = t
            continue
        b = parts[1]
        if parts[2] in _TARGETS:
            layer = f"blocks.{b}.{_TARGETS[parts[2]]}.{_PROJ[parts[3]]}"
        else:
            layer = f"blocks.{b}.ffn." + ("net.0.proj" if parts[3] == "0" else "net.2")
        kind = body.rsplit(".", 2)[-2] if body.endswith(".weight") else "diff_b"
        if kind == "lora_down":
            out[f"transformer.{layer}.lora_A.weight"] = t * (ALPHA / RANK)
        elif kind == "lora_up":
            out[f"transformer.{layer}.lora_B.weight"] = t
        else:
            out[f"transformer.{layer}.lora_B.bias"] = t
    return out


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    sd = _lora_tensors()
    save_file(sd, str(d / "original.safetensors"))
    save_file(_to_diffusers_naming(sd), str(d / "diffusers.safetensors"))
    return d


def test_lora_merges_the_delta_an_independent_formula_gives(lora_files):
    """Guards: original naming is routed to the right layers (q -> to_q, o -> to_out.0, ffn.0 ->
    ffn.net.0.proj, cross_attn -> attn2), alpha/rank and the scale are applied once, diff_b lands on
    the bias: W' = W + s * alpha/r * up @ down, b' = b + s * diff_b, in float64."""
    base = build_tiny_pipeline(seed=0).transformer
    gen = _gen(lora=[f"{lora_files / 'original.safetensors'}:0.7"])
    tr = gen.pipe.transformer
    sd = _lora_tensors()
    for src, dst in [
        ("blocks.0.self_attn.q", "blocks.0.attn1.to_q"),
        ("blocks.1.cross_attn.o", "blocks.1.attn2.to_out.0"),
        ("blocks.1.ffn.0", "blocks.1.ffn.net.0.proj"),
        ("blocks.0.ffn.2", "blocks.0.ffn.net.2"),
    ]:
        down = sd[f"diffusion_model.{src}.lora_down.weight"].double()
        up = sd[f"diffusion_model.{src}.lora_up.weight"].double()
        w0 = base.get_submodule(dst).weight.double()
        want = w0 + 0.7 * ALPHA / RANK * up @ down
        got = tr.get_submodule(dst)
        assert type(got) is torch.nn.Linear  # fused and unloaded: no peft wrapper left in the forward
        torch.testing.assert_close(got.weight.double(), want, atol=1e-5, rtol=1e-5)
        b0 = base.get_submodule(dst).bias.double()
        db = sd.get(f"diffusion_model.{src}.diff_b", torch.zeros(()))  # ffn layers: none, bias unchanged
        torch.testing.assert_close(got.bias.double(), b0 + 0.7 * db.double(), atol=1e-6, rtol=1e-6)
    assert gen.lora[0]["format"] == "original" and gen.lora[0]["rank"] == RANK and gen.lora[0]["modules"] == 20
    assert gen.lora[0]["ignored_keys"] == 0 and gen.lora[0]["diff_keys"] == {"diff": 0, "diff_b": 16, "diff_m": 2}


def test_lora_scale_zero_is_the_base_video_and_scale_one_is_not(lora_files):
    """Guards: scale 0 leaves every weight bit-for-bit (same frames as no LoRA, sparse attention
    installed), scale 1 really changes the video."""
    path = lora_files / "original.safetensors"
    base = _gen().generate("a fox", progress=False, **SMALL).frames
    zero = _gen(lora=[f"{path}:0"]).generate("a fox", progress=False, **SMALL).frames
    one = _gen(lora=[str(path)]).generate("a fox", progress=False, **SMALL).frames
    assert np.array_equal(base, zero)
    assert np.abs(base - one).max() > 1e-2


def test_lora_original_and_diffusers_naming_give_the_same_video(lora_files):
    """Guards: a LoRA in original Wan naming (lora_down/lora_up/alpha/diff_b) and the same LoRA in
    diffusers naming (alpha folded by hand) merge to the same weights and the same video."""
    a = _gen(lora=[lora_files / "original.safetensors"])
    b = _gen(lora=[LoraSpec(str(lora_files / "diffusers.safetensors"))])
    assert b.lora[0]["format"] == "diffusers"
    for (name, pa), pb in zip(a.pipe.transformer.named_parameters(), b.pipe.transformer.parameters(), strict=False):
        torch.testing.assert_close(pa, pb, atol=2e-6, rtol=1e-5, msg=name)
    fa = a.generate("a fox", progress=False, **SMALL).frames
    fb = b.generate("a fox", progress=False, **SMALL).frames
    np.testing.assert_allclose(fa, fb, atol=2e-5)


def _bad_lora(tmp, kind: str) -> str:
    sd = _lora_tensors()
    if kind == "unknown_layer":
        sd["diffusion_model.blocks.0.self_attn.zz.lora_down.weight"] = torch.zeros(RANK, 64)
    elif kind == "missing_block":
        sd = {k.replace("blocks.1.", "blocks.7."): v for k, v in sd.items()}
    elif kind == "foreign_prefix":
        sd = {k.replace("diffusion_model.", "model."): v for k, v in sd.items()}
    elif kind == "wrong_size":
        sd["diffusion_model.blocks.0.self_attn.q.lora_down.weight"] = torch.zeros(RANK, 32)
    path = tmp / f"{kind}.safetensors"
    if kind == "not_safetensors":
        path.write_bytes(b"\x80\x04\x95 a pickle, say")
    else:
        save_file(sd, str(path))
    return str(path)


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("unknown_layer", "'diffusion_model.blocks.0.self_attn.zz.lora_down.weight'"),
        (
            "missing_block",
            "'transformer.blocks.7.attn1.to_q.lora_A.weight' targets 'blocks.7.attn1.to_q': no such layer",
        ),
        ("foreign_prefix", "'model.blocks.0.cross_attn.k.alpha' is not a transformer LoRA weight"),
        ("wrong_size", "'blocks.0.attn1.to_q' is 64x64"),
        ("not_safetensors", "not a readable safetensors file"),
        ("missing_file", "does not exist"),
        ("bin", "only .safetensors"),
    ],
)
def test_bad_lora_exit_2_one_line_nothing_written(tmp_path, capsys, kind, needle):
    """Guards: a LoRA diffusers would load partially or ignore silently (a layer the model lacks, a
    foreign prefix), a wrong-size one, a pickle or a missing file: one line naming the first bad
    key, exit code 2, no output."""
    lora = {"missing_file": str(tmp_path / "nope.safetensors"), "bin": str(tmp_path / "x.bin")}.get(kind)
    out = tmp_path / "out" / "v.mp4"
    out.parent.mkdir()
    args = [
        "generate",
        "--prompt",
        "x",
        "--output",
        str(out),
        "--model",
        "tiny",
        "--quiet",
        "--steps",
        "1",
        "--frames",
        "5",
        "--lora",
        lora or _bad_lora(tmp_path, kind),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wan-nabla: error:") and needle in err[0], err
    assert list(out.parent.iterdir()) == []


# ---- CFG-free path -----------------------------------------------------------------------------
def test_guidance_one_runs_one_pass_per_step_and_skips_the_negative_prompt():
    """Guards: guidance 1.0 (distilled models) calls the transformer once per step with batch 1,
    encodes only the prompt, and equals a plain loop that never looks at the negative prompt."""
    gen = _gen(guidance_scale=1.0)
    tr, te = gen.pipe.transformer, gen.pipe.text_encoder
    batches, texts = [], []
    h1 = tr.register_forward_pre_hook(lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    h2 = te.register_forward_pre_hook(lambda m, a, kw: texts.append(1), with_kwargs=True)
    res = gen.generate("a fox", negative_prompt="ugly", progress=False, **{**SMALL, "steps": 3})
    h1.remove(), h2.remove()
    assert batches == [1, 1, 1] and texts == [1]
    assert res.speed["passes_per_step"] == 1
    other = _gen(guidance_scale=1.0).generate(
        "a fox", negative_prompt="something else", progress=False, **{**SMALL, "steps": 3}
    )
    assert np.array_equal(res.frames, other.frames)


# ---- step caches -------------------------------------------------------------------------------
def test_first_block_cache_threshold_zero_equals_no_cache():
    """Guards: the cache hooks, contexts and resets change nothing when nothing is skipped
    (batched CFG, sparse attention and tile hooks installed)."""
    plain = _gen().generate("a fox", progress=False, **SMALL)
    cached = _gen(speed={"cache": "first-block:0"}).generate("a fox", progress=False, **SMALL)
    assert np.array_equal(plain.frames, cached.frames)
    assert cached.speed["cache"]["skipped"] == 0 and cached.speed["cache"]["block_calls"] == 2 * 2


def test_first_block_cache_skips_are_counted_and_state_is_reset_per_video():
    """Guards: with a threshold nothing stays under, blocks 1..N-1 are skipped after step 0, the
    sidecar count equals the attention calls that did not happen, the video changes, and a second
    video starts from a clean cache (same frames as the first)."""
    gen = _gen(speed={"cache": "first-block:1e9"})
    calls = []
    for block in gen.pipe.transformer.blocks:
        block.attn1.register_forward_pre_hook(lambda m, a: calls.append(1))
    a = gen.generate("a fox", progress=False, **{**SMALL, "steps": 3})
    n_calls = len(calls)
    b = gen.generate("a fox", progress=False, **{**SMALL, "steps": 3})
    cache = a.speed["cache"]
    assert cache["computed_per_step"] == [2, 1, 1] and cache["skipped"] == 2 == 6 - n_calls
    assert np.array_equal(a.frames, b.frames)
    plain = _gen().generate("a fox", progress=False, **{**SMALL, "steps": 3}).frames
    assert np.abs(plain - a.frames).max() > 1e-4


def test_mag_cache_skips_whole_steps_and_calibrates():
    """Guards: MagCache through diffusers' hooks skips whole steps after the retention steps (no
    attention at all there: per-step density None), never more than K in a row; calibrate mode
    skips nothing and records one ratio per step."""
    res = _gen(speed={"cache": "mag:100:1", "mag_ratios": [1.0] * 4}).generate(
        "a fox", progress=False, **{**SMALL, "steps": 4}
    )
    assert res.speed["cache"]["computed_per_step"] == [2, 0, 2, 0]
    assert res.attention["per_step"][1] is None and res.attention["per_step"][0] == pytest.approx(0.5)
    cal = _gen(speed={"cache": "mag:calibrate"}).generate("a fox", progress=False, **{**SMALL, "steps": 4})
    assert cal.speed["cache"]["skipped"] == 0
    ratios = cal.speed["cache"]["calibrated_mag_ratios"]
    assert len(ratios) == 4 and ratios[0] == 1.0 and all(r > 0 for r in ratios)


# ---- sampler, config ---------------------------------------------------------------------------
def test_euler_sampler_uses_the_distilled_schedule():
    """Guards: euler = timesteps 1000/750/500/250 before the shift (LightX2V's 4-step list), shifted
    as sigma' = s*sigma / (1 + (s-1)*sigma), ending at sigma 0."""
    pipe = build_tiny_pipeline(seed=0)
    sched = adapter.make_scheduler(pipe, 5.0, "euler")
    set_timesteps(sched, 4, torch.device("cpu"))
    sig = np.array([1.0, 0.75, 0.5, 0.25])
    want = 5 * sig / (1 + 4 * sig)
    np.testing.assert_allclose(sched.timesteps.numpy(), want * 1000, rtol=1e-6)
    np.testing.assert_allclose(sched.sigmas.numpy(), [*want, 0.0], rtol=1e-6)


def test_speed_and_lora_config_round_trip_and_errors(tmp_path):
    """Guards: YAML speed/lora sections parse (strings and mappings), flags replace them, and bad
    values name the key and what is allowed."""
    p = tmp_path / "c.yaml"
    p.write_text(
        "speed: {compile: blocks-split, cache: 'mag:0.1:2', mag_ratios: [1.0, 0.98]}\n"
        "lora: ['a.safetensors:0.5', {path: b.safetensors}]\n"
    )
    cfg = load_config(p)
    assert cfg.speed.cache_params == {"threshold": 0.1, "max_skip_steps": 2}
    assert [(x.path, x.scale) for x in cfg.lora] == [("a.safetensors", 0.5), ("b.safetensors", 1.0)]
    assert cfg.override(steps=3).lora == cfg.lora
    cfg2 = cfg.with_levers(compile="none", lora=["c.safetensors"])
    assert (
        cfg2.speed.compile == "none"
        and cfg2.speed.cache == "mag:0.1:2"
        and [x.path for x in cfg2.lora] == ["c.safetensors"]
    )
    back = RunConfig.from_mapping(cfg2.to_dict())
    assert (back.speed, back.lora) == (cfg2.speed, cfg2.lora)
    for bad, needle in [
        ({"compile": "max"}, "speed.compile"),
        ({"cache": "first-block"}, "first-block:T"),
        ({"cache": "mag", "mag_ratios": [1.0]}, "mag:T"),
        ({"mag_ratios": [0, 1]}, "positive"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            SpeedConfig(**bad)
    with pytest.raises(ConfigError, match="only .safetensors"):
        LoraSpec.parse("x.pt:0.5")
    with pytest.raises(ConfigError, match="unknown key 'lora\\[\\].sclae'"):
        LoraSpec.parse({"path": "a.safetensors", "sclae": 1})


def test_bad_lever_flags_exit_2(tmp_path, capsys):
    for flags, needle in [
        (["--cache", "fbc"], "--cache"),
        (["--compile", "all"], "--compile"),
        (["--sampler", "ddim"], "--sampler"),
    ]:
        assert main(["generate", "--prompt", "x", "--output", str(tmp_path / "v.mp4"), "--model", "tiny", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_distill_preset_generates_with_a_lora_and_records_the_levers(tmp_path, lora_files):
    """Guards: the distilled-LoRA preset (4 Euler steps, guidance 1, STA) runs with --lora and a
    cache; the sidecar records the LoRA (with its sha256), the cache skips and the compile mode."""
    out = tmp_path / "v.mp4"
    assert (
        main(
            [
                "generate",
                "--prompt",
                "a fox",
                "--config",
                "distill_4step_sta",
                "--model",
                "tiny",
                "--quiet",
                "--size",
                "64x64",
                "--frames",
                "5",
                "--dtype",
                "float32",
                "--output",
                str(out),
                "--cache",
                "first-block:0",
                "--lora",
                f"{lora_files / 'original.safetensors'}:0.5",
            ]
        )
        == 0
    )
    side = json.loads(out.with_suffix(".json").read_text())
    gen = side["config"]["generation"]
    assert (gen["steps"], gen["guidance_scale"], gen["sampler"], gen["shift"]) == (4, 1.0, "euler", 5.0)
    assert side["config"]["lora"] == [{"path": str(lora_files / "original.safetensors"), "scale": 0.5}]
    assert len(side["speed"]["lora"][0]["sha256"]) == 64 and side["speed"]["compile"]["mode"] == "none"
    assert side["speed"]["cache"]["block_calls"] == 4 * 2 and side["speed"]["passes_per_step"] == 1


# ---- compiled blocks ---------------------------------------------------------------------------
def _block_graphs() -> int:
    """Graphs TorchDynamo holds for WanTransformerBlock.forward (every block shares this code)."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(WanTransformerBlock.forward.__code__))


def test_compiled_blocks_match_eager_and_never_recompile():
    """Guards: compiled blocks (attention as an opaque custom op inside one graph per block) give
    the eager frames and densities; the dense-to-sparse switch (dense_steps), new prompts, seeds
    and a new generator on another pipeline reuse the one block graph (a processor that exposed
    its step, layer or stats to TorchDynamo would recompile per step or per block)."""
    att = {"type": "nabla_sta", "threshold": 0.5, "sta_window": [1, 1, 1], "dense_steps": 1, "dense_layers": [1]}
    small = {**SMALL, "guidance_scale": 1.0}  # batch 1: block 0's input then has odd strides
    eager = _gen(att).generate("a fox", progress=False, seed=1, **small)
    gen = _gen(att, speed={"compile": "blocks"})
    n0 = _block_graphs()
    a = gen.generate("a fox", progress=False, seed=1, **small)
    assert _block_graphs() == n0 + 1 and a.speed["compile"]["compile_s"] > 0
    np.testing.assert_allclose(a.frames, eager.frames, atol=1e-4)
    assert a.attention["per_step"] == pytest.approx(eager.attention["per_step"]) and a.attention["per_step"][1] < 1
    assert a.attention["per_layer"] == pytest.approx(eager.attention["per_layer"])
    b = gen.generate("another prompt, ünïcödé", progress=False, seed=2, **small)
    c = _gen(att, speed={"compile": "blocks"}).generate("a fox", progress=False, seed=1, **small)
    assert _block_graphs() == n0 + 1
    assert b.speed["compile"]["graphs_compiled"] == 0 == c.speed["compile"]["graphs_compiled"]
    assert np.array_equal(a.frames, c.frames) and not np.allclose(a.frames, b.frames)


# ---- the GPU measurement script, at tiny size ----------------------------------------------------
def test_levers_script_quick_mode_runs_every_row(tmp_path, capsys):
    """Guards: the GPU lever script end to end on the CPU at tiny size, so the H100 run does not
    die on a slip: every row runs (dense, STA, compiled blocks, fused LoRA, cache, split variant),
    nothing compiles inside a timed generate, the cache row has its skips and quality numbers, and
    JSON + markdown are written with the table printed last."""
    from benchmarks.harness import levers

    assert (
        levers.main(
            [
                "--quick",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
                "--deadline-s",
                "1e9",
                "--rows",
                "dense",
                "sta",
                "compiled",
                "lora",
                "cache",
                "variant",
            ]
        )
        == 0
    )  # FP8 rows: the test below
    data = json.loads((tmp_path / "levers.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert len(rows) == 6 and all("error" not in r and "skipped" not in r for r in rows.values()), rows.keys()
    assert data["random_weights"] is True and data["env"]["commit"]
    assert all(r["graphs_compiled_in_generate"] == 0 for r in rows.values())
    assert [r["compile"] for r in rows.values()] == ["none", "none", "blocks", "blocks", "blocks", "blocks-split"]
    # each row names the backend it ran (the dense baseline is SDPA under "flex"; auto is flex on a CPU)
    assert [r["backend"] for r in rows.values()] == ["flex"] * 6
    assert rows["dense (cuDNN SDPA)"]["attention"]["backend"] == "flex"
    assert [type(r["vae_tiling"]) for r in rows.values()] == [type(None)] * 3 + [bool, bool, type(None)]
    lora = rows["+ LoRA, fused"]["lora"][0]
    assert lora["rank"] == 4 and lora["format"] == "original" and lora["diff_keys"]["diff_m"] == 2
    cache = rows["+ cache first-block:0.1"]
    assert 0 <= cache["ssim"] <= 1 and cache["psnr_db"] > 0 and cache["cache_record"]["block_calls"] == 8
    assert data["summary"]["goal"]["row"] == "+ LoRA, fused" and data["summary"]["cfg50_estimates"]
    out = capsys.readouterr().out
    assert (
        out.rstrip().endswith("|") and "| + compiled blocks | flex |" in out and "| dense (cuDNN SDPA) | SDPA |" in out
    )
    assert " untiled |" in out or " tiled |" in out
    assert (tmp_path / "levers.md").read_text() in out
    assert f"commit {data['env']['commit']}." in (tmp_path / "levers.md").read_text()


def test_batch_key_covers_lora_and_cache_and_keeps_earlier_keys():
    """Guards: resume never mistakes a video made with another LoRA or cache for done; compile
    (speed only) does not re-key; a config without levers keys exactly as before they existed."""
    import hashlib

    from wan_nabla.batch.plan import plan_item
    from wan_nabla.batch.prompts import PromptItem

    item = PromptItem(index=0, line=1, prompt="a fox")
    base = load_config("nabla_0.7")
    key = plan_item(base, item, "tiny").key
    g = plan_item(base, item, "tiny").settings
    attention = {k: v for k, v in base.attention.to_dict().items() if k != "backend"}  # added later, not keyed
    before = {
        "index": 0,
        "prompt": "a fox",
        "name": None,
        "model": "tiny",
        "attention": attention,
        "generation": {k: v for k, v in g.to_dict().items() if k not in ("device", "sampler", "crf")},
    }
    assert key == hashlib.sha256(json.dumps(before, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]
    assert plan_item(base.with_levers(compile="blocks"), item, "tiny").key == key
    keys = {
        plan_item(c, item, "tiny").key
        for c in (
            base.with_levers(lora=["a.safetensors"]),
            base.with_levers(lora=["a.safetensors:0.5"]),
            base.with_levers(cache="first-block:0.05"),
            base.override(sampler="euler"),
            base.with_levers(quantize="fp8"),
            base.override(vae_dtype="bf16"),
        )
    }
    assert len(keys) == 6 and key not in keys


def test_auto_compile_falls_back_to_eager_when_compiling_fails(monkeypatch):
    """Guards: the default (`auto`, blocks on CUDA) never costs a video: a TorchDynamo/Inductor
    failure is recorded in the sidecar and the blocks run eagerly (same frames as no compile);
    an explicitly requested mode raises instead."""
    from torch._dynamo.exc import TorchDynamoException

    import wan_nabla.pipeline as pl

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise TorchDynamoException("inductor exploded")

        return run

    monkeypatch.setattr(adapter.torch, "compile", broken_compile)
    monkeypatch.setattr(pl, "AUTO_COMPILE", {"cpu": "blocks"})
    plain = _gen().generate("a fox", progress=False, **SMALL)
    res = _gen(speed={"compile": "auto"}).generate("a fox", progress=False, **SMALL)
    assert res.speed["compile"]["mode"] == "blocks" and "inductor exploded" in res.speed["compile"]["error"]
    assert np.array_equal(res.frames, plain.frames)
    with pytest.raises(TorchDynamoException):
        _gen(speed={"compile": "blocks"}).generate("a fox", progress=False, **SMALL)


def test_levers_backend_option_reaches_sparse_rows_only():
    """Guards: --attention-backend picks the sparse rows' backend while the dense row stays the
    cuDNN SDPA baseline (a dense row on FA4 would make every ratio against the wrong baseline)."""
    from benchmarks.harness import levers

    rows = levers.plan_rows(levers.FULL, "x.safetensors", "first-block:0.1", "fa4")
    assert rows[0].key == "dense" and rows[0].attention.backend == "flex"
    assert {r.attention.backend for r in rows[1:]} == {"fa4"}
    assert levers.build_parser().parse_args(["--out", "o"]).attention_backend == "auto"


@pytest.mark.slow
def test_levers_fp8_and_fast_decode_rows_on_the_cpu(tmp_path):
    """Guards the GPU job's FP8 rows (benchmarks/jobs/gpu_speed.sh levers) on the CPU through torchao's real
    float8 layers: FP8 after the fused LoRA (20 tiny block Linears), the fast-decode row reusing
    them (already quantised, VAE in bf16), every generate free of compiles, the quality records
    (FP8 changes the latents, the bf16 decode only the frames), the goals and the ESTIMATED
    published operating point."""
    from benchmarks.harness import levers

    assert (
        levers.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--rows", "lora", "fp8", "fastdecode"]) == 0
    )
    data = json.loads((tmp_path / "levers.json").read_text())
    rows = {r["key"]: r for r in data["rows"]}
    assert data["fp8_emulated_on_cpu"] is True and list(rows) == ["lora", "fp8", "fastdecode"]
    assert rows["lora"]["quantize"] == {"mode": "none"}
    assert rows["fp8"]["quantize"]["linear_modules"] == 20 and rows["fp8"]["quantize"]["already_quantized"] == 0
    assert rows["fastdecode"]["quantize"]["already_quantized"] == 20 and rows["fastdecode"]["vae_dtype"] == "bf16"
    assert all(
        r["graphs_compiled_in_generate"] == 0 and r["compile"] == "blocks" and r["compile_error"] is None
        for r in rows.values()
    )  # FP8 layers inside the compiled blocks, no eager fallback
    q = data["quality"]
    assert 1e-4 < q["fp8_vs_bf16"]["final_latents_rel_l2"] < 0.1 and len(q["fp8_vs_bf16"]["noise_rel_l2_per_step"]) == 4
    assert q["bf16_decode_vs_fp32_decode"]["final_latents_rel_l2"] == 0.0
    assert 30 < q["bf16_decode_vs_fp32_decode"]["psnr_db"] < 200
    goal = data["summary"]["speed_goal"]
    assert goal["row"] == "+ fast decode (bf16 VAE)" and goal["non_attention_ratio_vs_bf16"] > 0
    assert data["summary"]["cfg50_estimates"][-1]["config"].startswith("published operating point")
    md = (tmp_path / "levers.md").read_text()
    assert "| + FP8 linears vs + LoRA, fused |" in md and "Goals (+ fast decode (bf16 VAE))" in md
