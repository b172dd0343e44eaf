"""FP8 linears (quantize.py) and the VAE dtype option: parsing, refusals, composition, the filter,
the torchao float8 path itself on the CPU (its GPU-only hardware assertion patched out), and
LoRA-fuse-then-quantise order."""

from __future__ import annotations

import pytest
import torch

from wan_nabla import app, quantize
from wan_nabla import pipeline as pl
from wan_nabla.cli import main
from wan_nabla.config import ConfigError, RunConfig, load_config
from wan_nabla.tiny import TINY_LAYERS, build_tiny_pipeline

BLOCK_LINEARS = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
]


def test_config_parses_quantize_and_vae_dtype_and_names_bad_values():
    """Guards: speed.quantize and memory.vae_dtype are typed fields with one-line errors, the CLI
    overrides reach them, and the VAE default stays the measured one (fp32 until GPU numbers)."""
    cfg = RunConfig.from_mapping({"speed": {"quantize": "fp8"}, "memory": {"vae_dtype": "bf16"}})
    assert (cfg.speed.quantize, cfg.memory.vae_dtype) == ("fp8", "bf16")
    assert RunConfig().speed.quantize == "none" and RunConfig().memory.vae_dtype == "fp32"
    assert cfg.to_dict()["speed"]["quantize"] == "fp8" and cfg.to_dict()["memory"]["vae_dtype"] == "bf16"
    assert RunConfig().with_levers(quantize="fp8").speed.quantize == "fp8"
    assert RunConfig().override(vae_dtype="bf16").memory.vae_dtype == "bf16"
    with pytest.raises(ConfigError, match=r"speed.quantize: 'int4' is not allowed; use one of none, fp8"):
        RunConfig.from_mapping({"speed": {"quantize": "int4"}})
    with pytest.raises(ConfigError, match=r"memory.vae_dtype: 'float16' is not allowed; use one of fp32, bf16"):
        RunConfig.from_mapping({"memory": {"vae_dtype": "float16"}})


def test_fp8_refuses_float32_transformer():
    """Guards: an fp32 run cannot be labelled fp8 (the FP8 GEMMs take bf16/fp16 activations)."""
    with pytest.raises(ConfigError, match="does not combine with generation.dtype 'float32'"):
        RunConfig.from_mapping({"speed": {"quantize": "fp8"}, "generation": {"dtype": "float32"}})
    RunConfig.from_mapping(
        {"speed": {"quantize": "fp8"}, "generation": {"dtype": "bfloat16"}, "memory": {"offload": "group"}}
    )  # offload composes (diffusers moves torchao tensors)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (
            ["--quantize", "fp8", "--device", "cpu"],
            "--quantize fp8: FP8 linear layers need an NVIDIA GPU with compute capability >= 8.9",
        ),
        (["--quantize", "fp8"], "this run is on the CPU"),  # device auto on a machine without CUDA
        (["--quantize", "fp4"], "--quantize (speed.quantize): 'fp4' is not allowed"),
        (["--vae-dtype", "half"], "--vae-dtype (memory.vae_dtype): 'half' is not allowed"),
    ],
)
def test_cli_refuses_fp8_where_it_cannot_run_exit_2_one_line(tmp_path, capsys, extra, needle):
    """Guards: an explicit fp8 request on the CPU is refused before loading (never a silent bf16
    run labelled fp8), and bad values name the flag; nothing is written."""
    out = tmp_path / "out" / "v.mp4"
    out.parent.mkdir()
    assert main(["generate", "--prompt", "x", "--output", str(out), "--model", "tiny", "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert list(out.parent.iterdir()) == []


def test_fp8_unsupported_reasons(monkeypatch):
    """Guards: CPU, pre-sm89 GPUs and a missing torchao each give their own reason; sm89+ passes."""
    assert "this run is on the CPU" in quantize.fp8_unsupported("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "compute capability 8.0" in quantize.fp8_unsupported("cuda", capability=(8, 0))
    assert quantize.fp8_unsupported("cuda", capability=(8, 9)) is None
    assert quantize.fp8_unsupported("cuda", capability=(9, 0)) is None
    monkeypatch.setattr(quantize, "torchao_version", lambda: None)
    assert "torchao is not installed" in quantize.fp8_unsupported("cuda", capability=(9, 0))


def test_filter_names_exactly_the_block_linears():
    """Guards: fp8 touches the blocks' attention and FFN Linears and nothing else (patch embedding,
    condition embedders, modulation, norms and the head stay); a Linear off the 16-alignment is
    skipped and listed."""
    tr = build_tiny_pipeline(seed=0).transformer
    expected = [f"blocks.{b}.{n}" for b in range(TINY_LAYERS) for n in BLOCK_LINEARS]
    assert quantize.fp8_targets(tr) == expected
    outside = [n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith("blocks.")]
    assert outside and not set(outside) & set(quantize.fp8_targets(tr))  # e.g. proj_out, condition_embedder.*
    tr.blocks[1].attn1.to_q = torch.nn.Linear(64, 40)
    assert "blocks.1.attn1.to_q" not in quantize.fp8_targets(tr)
    assert quantize.fp8_skipped(tr) == ["blocks.1.attn1.to_q"]


def _allow_cpu_fp8(monkeypatch):
    """torchao asserts an sm89+ GPU before converting, but its float8 tensors compute on the CPU."""
    import torchao.quantization.quant_api as qa

    monkeypatch.setattr(qa, "_check_hardware_support", lambda *a, **k: None)
    monkeypatch.setattr(quantize, "fp8_unsupported", lambda *a, **k: None)
    monkeypatch.setattr(app, "fp8_unsupported", lambda *a, **k: None)  # the CLI's preflight check


def test_torchao_fp8_on_cpu_changes_exactly_the_targets_and_stays_close(monkeypatch):
    """Guards: the real torchao conversion: the targets' weights become float8 e4m3 tensors with
    per-row scales, every other parameter is untouched, and a forward of the tiny transformer
    differs from bf16 by FP8 rounding only (nonzero, small)."""
    _allow_cpu_fp8(monkeypatch)
    from torchao.quantization import Float8Tensor

    pipe = build_tiny_pipeline(seed=0)
    tr = pipe.transformer.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 8, 8, generator=g).to(torch.bfloat16)
    ctx = torch.randn(2, 12, 32, generator=g).to(torch.bfloat16)
    t = torch.tensor([500.0, 100.0])
    with torch.no_grad():
        ref = tr(x, t, ctx, return_dict=False)[0].float()
    before = {n: p.detach().clone() for n, p in tr.named_parameters()}
    rec = quantize.quantize_transformer(tr, "fp8", "cpu")
    targets = set(quantize.fp8_targets(tr))
    for name, module in tr.named_modules():
        if name in targets:
            assert isinstance(module.weight, Float8Tensor) and module.weight.qdata.dtype == torch.float8_e4m3fn
            assert module.weight.scale.numel() == module.out_features  # one scale per output channel
    for n, p in tr.named_parameters():
        if n.rsplit(".", 1)[0] not in targets:
            assert torch.equal(p, before[n]), n
    with torch.no_grad():
        got = tr(x, t, ctx, return_dict=False)[0].float()
    rel = float((got - ref).norm() / ref.norm())
    assert 1e-4 < rel < 0.1, rel
    assert rec["mode"] == "fp8" and rec["linear_modules"] == 10 * TINY_LAYERS and rec["blocks"] == TINY_LAYERS
    assert rec["per_block"] == BLOCK_LINEARS and rec["skipped"] == [] and rec["library"].startswith("torchao")
    assert rec["already_quantized"] == 0
    again = quantize.quantize_transformer(tr, "fp8", "cpu")  # a second generator on the same pipeline
    assert again["already_quantized"] == again["linear_modules"] == 10 * TINY_LAYERS
    with torch.no_grad():
        assert torch.equal(tr(x, t, ctx, return_dict=False)[0].float(), got)


def test_lora_is_fused_before_quantising_and_the_sidecar_says_what_ran(monkeypatch, tmp_path):
    """Guards: the pipeline fuses LoRAs into the bf16 weights first and quantises the fused
    weights (quantising first would drop or double-round the delta); the generation's speed
    record (the sidecar's) carries the quantize record; the VAE runs in memory.vae_dtype."""
    from benchmarks.harness.levers import write_synthetic_lora
    from benchmarks.harness.random_init import WAN_SIZES
    from wan_nabla.config import GenerationConfig, LoraSpec, MemoryConfig, SpeedConfig
    from wan_nabla.pipeline import VideoGenerator

    lora = tmp_path / "l.safetensors"
    import dataclasses

    write_synthetic_lora(lora, dataclasses.replace(WAN_SIZES["tiny"], ffn=64), rank=4)  # the tiny pipeline's FFN
    seen = {}

    def stub(transformer, mode, device):
        seen["q"] = transformer.blocks[0].attn1.to_q.weight.detach().clone()
        return {"mode": mode, "linear_modules": 0, "blocks": 0, "seconds": 0.0, "stub": True}

    monkeypatch.setattr(pl, "quantize_transformer", stub)
    gen_cfg = GenerationConfig(device="cpu", dtype="bfloat16", size=(64, 64), frames=5, steps=1)
    plain = build_tiny_pipeline(seed=0).to(torch.bfloat16)
    base_q = plain.transformer.blocks[0].attn1.to_q.weight.detach().clone()
    fused = VideoGenerator(
        plain, RunConfig(generation=gen_cfg, lora=(LoraSpec(str(lora)),)), torch.device("cpu"), "tiny"
    )
    want = fused.pipe.transformer.blocks[0].attn1.to_q.weight.detach().clone()
    fused.close()
    assert not torch.equal(want, base_q)  # the LoRA changes this weight
    cfg = RunConfig(
        generation=gen_cfg,
        lora=(LoraSpec(str(lora)),),
        speed=SpeedConfig(quantize="fp8", compile="none"),
        memory=MemoryConfig(vae_dtype="bf16"),
    )
    gen = VideoGenerator(build_tiny_pipeline(seed=0).to(torch.bfloat16), cfg, torch.device("cpu"), "tiny")
    assert torch.equal(seen["q"], want)
    assert gen.pipe.vae.dtype == torch.bfloat16
    res = gen.generate("a fox", progress=False)
    gen.close()
    assert res.speed["quantize"]["stub"] and res.frames.dtype.name == "float32" and res.frames.shape[0] == 5


def test_load_config_yaml_quantize(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("speed: {quantize: fp8, compile: blocks}\nmemory: {vae_dtype: bf16}\n")
    cfg = load_config(str(p))
    assert cfg.speed.quantize == "fp8" and cfg.memory.vae_dtype == "bf16"


@pytest.mark.parametrize("mode", ["group", "sequential"])
def test_fp8_layers_survive_diffusers_group_offloading(monkeypatch, mode):
    """Guards the offload composition: diffusers' group offloading moves torchao float8 weights
    (swap_tensors, not `.data =`, which would leave their qdata/scale behind) and the offloaded FP8
    transformer computes exactly what it computes resident (CPU onload device: no streams)."""
    _allow_cpu_fp8(monkeypatch)
    from wan_nabla.config import MemoryConfig
    from wan_nabla.offload import apply_memory

    pipe = build_tiny_pipeline(seed=0).to(torch.bfloat16)
    quantize.quantize_transformer(pipe.transformer, "fp8", "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8, generator=g).to(torch.bfloat16)
    ctx = torch.randn(1, 12, 32, generator=g).to(torch.bfloat16)
    t = torch.tensor([500.0])
    with torch.no_grad():
        ref = pipe.transformer(x, t, ctx, return_dict=False)[0]
    handle = apply_memory(pipe, MemoryConfig(offload=mode), torch.device("cpu"))
    try:
        with torch.no_grad():
            got = pipe.transformer(x, t, ctx, return_dict=False)[0]
            again = pipe.transformer(x, t, ctx, return_dict=False)[0]  # after a full onload/offload cycle
    finally:
        handle.remove()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
    assert type(pipe.transformer.blocks[0].attn1.to_q.weight).__name__ == "Float8Tensor"
