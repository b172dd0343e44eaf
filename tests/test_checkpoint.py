"""--transformer: DiT weights in Wan's original layout (shards + index, original key names) or
diffusers', loaded into --model's transformer architecture; every bad checkpoint exits with 2."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.wan_original import save_original_checkpoint, to_original
from wan_nabla import checkpoint
from wan_nabla.app import load_generator, warn_if_zero_shot
from wan_nabla.cli import main
from wan_nabla.config import RunConfig
from wan_nabla.models import load_transformer, same_checkpoint
from wan_nabla.preflight import resolve_run_config
from wan_nabla.requests import RunFlags

FAST = ["--model", "tiny", "--size", "128x128", "--frames", "5", "--steps", "1", "--quiet"]
SHARD1 = "diffusion_pytorch_model-00001-of-00002.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _args(**kw):
    """The flags of `wan-nabla generate` as resolve_run_config reads them."""
    base = dict(
        config=None,
        model="tiny",
        size="128x128",
        frames=5,
        steps=1,
        negative_prompt=None,
        guidance_scale=None,
        shift=None,
        seed=3,
        fps=None,
        device="cpu",
        dtype=None,
        transformer=None,
        offload=None,
        vae_tiling=None,
    )
    return RunFlags(**{**base, **kw})


def _video(**kw) -> np.ndarray:
    gen = load_generator(resolve_run_config(_args(**kw)), None, "tiny")
    try:
        return gen.generate("a red fox", progress=False).frames
    finally:
        gen.close()


def _state(module):
    return module.state_dict()


def _copy(src, tmp_path, name="ckpt"):
    return shutil.copytree(src, tmp_path / name)


def test_inverse_key_map_round_trips_through_diffusers_converter(tiny_pipe):
    """Guards the test fixture itself: our original-layout writer is the exact inverse of
    diffusers' converter (so the equality tests below compare the same weights), and it produces
    Wan's names (self_attn.q, ffn.0, modulation, head.head, norm3 = cross-attention norm)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd = tiny_pipe.transformer.state_dict()
    orig = {to_original(k): v for k, v in sd.items()}
    assert {
        "blocks.0.self_attn.q.weight",
        "blocks.1.ffn.0.weight",
        "blocks.0.modulation",
        "head.modulation",
        "head.head.weight",
        "blocks.0.norm3.weight",
        "time_projection.1.weight",
    } <= set(orig)
    assert not any("attn1" in k or "scale_shift_table" in k or "norm2" in k for k in orig)
    back = convert_wan_transformer_to_diffusers(dict(orig))
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)


@pytest.fixture(scope="module")
def original_video(tiny_original_checkpoint):
    """The video of `--model tiny --transformer <original-layout checkpoint>` (bf16, seed 3)."""
    return _video(transformer=str(tiny_original_checkpoint))


def test_original_layout_gives_the_same_transformer_and_video(tiny_original_checkpoint, original_video):
    """Guards point 4: the tiny model saved in Wan's original layout (2 shards + index, original
    names) and loaded with --transformer equals the diffusers-format weights of --model tiny tensor
    for tensor in bf16 (fp32-kept modules as from_pretrained keeps them), and the videos of one
    seed are identical."""
    a = load_generator(resolve_run_config(_args()), None, "tiny")
    b = load_generator(resolve_run_config(_args(transformer=str(tiny_original_checkpoint))), None, "tiny")
    sa, sb = _state(a.pipe.transformer), _state(b.pipe.transformer)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert sb["scale_shift_table"].dtype == torch.float32 and sb["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert b.transformer_source["naming"] == "original"
    base_video = a.generate("a red fox", progress=False).frames
    np.testing.assert_array_equal(base_video, original_video)
    assert base_video.std() > 0.01


@pytest.mark.parametrize("where", ["index", "single_file", "diffusers_dir", "diffusers_model_root", "diffusers_file"])
def test_every_accepted_form_loads_the_same_weights(
    tiny_original_checkpoint, tiny_checkpoint, tiny_pipe, tmp_path, where
):
    """Guards the accepted --transformer forms: an index path, one original .safetensors file, a
    diffusers transformer/ folder, a diffusers model root (descends into transformer/), a diffusers
    weights file: all give the tiny weights, with the naming detected from the keys."""
    if where == "index":
        spec, naming = tiny_original_checkpoint / INDEX, "original"
    elif where == "single_file":
        save_original_checkpoint(tiny_pipe.transformer.state_dict(), tmp_path / "one", shards=1, decoy_pickle=False)
        spec, naming = tmp_path / "one" / "diffusion_pytorch_model-00001-of-00001.safetensors", "original"
    elif where == "diffusers_dir":
        spec, naming = tiny_checkpoint / "transformer", "diffusers"
    elif where == "diffusers_model_root":
        spec, naming = tiny_checkpoint, "diffusers"
    else:
        spec, naming = tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors", "diffusers"
    model, info = load_transformer(str(spec), "tiny", torch.float32)
    assert info["naming"] == naming
    ref = tiny_pipe.transformer.state_dict()
    got = model.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_perturbed_checkpoint_changes_the_video(tiny_original_checkpoint, original_video, tmp_path):
    """Guards: --transformer really is what runs (not the base model's weights): one perturbed
    tensor in the second shard changes the video."""
    ck = _copy(tiny_original_checkpoint, tmp_path)
    index = json.loads((ck / INDEX).read_text())["weight_map"]
    shard = ck / index["blocks.1.self_attn.v.weight"]
    part = load_file(shard)
    part["blocks.1.self_attn.v.weight"] = part["blocks.1.self_attn.v.weight"] * 1.5
    save_file(part, str(shard))
    other = _video(transformer=str(ck))
    assert np.abs(original_video - other).max() > 1e-3


def test_cli_sidecar_records_the_dit_source_and_file_hashes(tiny_original_checkpoint, tmp_path, monkeypatch):
    """Guards the sidecar's `transformer` record: path, naming, the index and both shards (never the
    decoy .pth) with size, mtime and sha256; shards above FULL_HASH_BYTES get a labelled partial
    hash over their first and last PARTIAL_HASH_BYTES."""
    out = tmp_path / "v.mp4"
    assert (
        main(["generate", "--prompt", "x", "--transformer", str(tiny_original_checkpoint), "--output", str(out), *FAST])
        == 0
    )
    rec = json.loads(out.with_suffix(".json").read_text())["transformer"]
    assert rec["source"] == str(tiny_original_checkpoint) and rec["naming"] == "original"
    files = {f["name"]: f for f in rec["files"]}
    assert set(files) == {INDEX, SHARD1, "diffusion_pytorch_model-00002-of-00002.safetensors"}
    shard = tiny_original_checkpoint / SHARD1
    assert files[SHARD1]["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert files[SHARD1]["bytes"] == shard.stat().st_size and files[SHARD1]["mtime"]

    monkeypatch.setattr(checkpoint, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(checkpoint, "PARTIAL_HASH_BYTES", 100)
    rec = checkpoint.fingerprint(checkpoint.locate_checkpoint(tiny_original_checkpoint))
    data = shard.read_bytes()
    big = next(f for f in rec if f["name"] == SHARD1)
    assert "sha256" not in big and big["partial_sha256"] == hashlib.sha256(data[:100] + data[-100:]).hexdigest()
    assert big["partial_sha256_covers"].startswith("first and last")


def test_base_model_needs_no_transformer_weights_with_transformer_flag(
    tiny_checkpoint, tiny_original_checkpoint, tmp_path, capsys
):
    """Guards: with --transformer, a diffusers --model directory without transformer weights (only
    transformer/config.json, e.g. a 14B repo downloaded without its 28 GB DiT) is enough; without
    --transformer the same directory is refused."""
    base = _copy(tiny_checkpoint, tmp_path, "no-dit")
    for f in (base / "transformer").glob("*.safetensors"):
        f.unlink()
    out = tmp_path / "o" / "v.mp4"
    out.parent.mkdir()
    args = [
        "generate",
        "--prompt",
        "x",
        "--model",
        str(base),
        "--size",
        "128x128",
        "--frames",
        "5",
        "--steps",
        "1",
        "--quiet",
        "--output",
        str(out),
    ]
    assert main([*args, "--transformer", str(tiny_original_checkpoint)]) == 0
    out.unlink()
    out.with_suffix(".json").unlink()
    assert main(args) == 2
    assert "transformer" in capsys.readouterr().err and list(out.parent.iterdir()) == []


def _drop(ck, key):
    index_path = ck / INDEX
    index = json.loads(index_path.read_text())
    shard = ck / index["weight_map"].pop(key)
    part = load_file(shard)
    del part[key]
    save_file(part, str(shard))
    index_path.write_text(json.dumps(index))


def _add(ck, key, tensor):
    index_path = ck / INDEX
    index = json.loads(index_path.read_text())
    part = load_file(ck / SHARD1)
    part[key] = tensor
    save_file(part, str(ck / SHARD1))
    index["weight_map"][key] = SHARD1
    index_path.write_text(json.dumps(index))


def _edit_index(ck, fn):
    index = json.loads((ck / INDEX).read_text())
    fn(index["weight_map"])
    (ck / INDEX).write_text(json.dumps(index))


def _bad(kind, ck, tmp_path):
    """Damage the copied checkpoint `ck`; return (--transformer value, text the error must contain)."""
    if kind == "pickle_only_dir":
        for f in ck.iterdir():
            f.unlink()
        (ck / "diffusion_pytorch_model.pth").write_bytes(b"x")
        return ck, "diffusion_pytorch_model.pth"
    if kind == "pickle_file":
        f = tmp_path / "dit.pt"
        f.write_bytes(b"x")
        return f, "dit.pt"
    if kind == "missing_key":
        _drop(ck, "blocks.1.ffn.2.bias")
        return ck, "lacks 'blocks.1.ffn.net.2.bias'"
    if kind == "unexpected_key":
        _add(ck, "blocks.0.self_attn.extra.weight", torch.zeros(2))
        return ck, "'blocks.0.self_attn.extra.weight'"
    if kind == "shape_mismatch":
        index = json.loads((ck / INDEX).read_text())["weight_map"]
        shard = ck / index["blocks.0.ffn.0.weight"]
        part = load_file(shard)
        part["blocks.0.ffn.0.weight"] = torch.zeros(65, 64)
        save_file(part, str(shard))
        return ck, "'blocks.0.ffn.0.weight'"
    if kind == "index_names_missing_shard":
        _edit_index(ck, lambda wm: wm.update({"head.head.bias": "diffusion_pytorch_model-00003-of-00002.safetensors"}))
        return ck, "diffusion_pytorch_model-00003-of-00002.safetensors"
    if kind in ("index_parent_dir", "index_absolute", "index_subdir"):
        outside = tmp_path / "evil.safetensors"  # exists, so only the name check can stop it
        shutil.copy(ck / SHARD1, outside)
        name = {
            "index_parent_dir": "../evil.safetensors",
            "index_absolute": str(outside),
            "index_subdir": "sub/evil.safetensors",
        }[kind]
        _edit_index(ck, lambda wm: wm.update({k: name for k, v in wm.items() if v == SHARD1}))
        return ck, name
    if kind == "index_key_in_wrong_shard":
        _edit_index(
            ck,
            lambda wm: wm.update(
                {
                    "head.head.bias": "diffusion_pytorch_model-00002-of-00002.safetensors"
                    if wm["head.head.bias"] == SHARD1
                    else SHARD1
                }
            ),
        )
        return ck, "'head.head.bias'"
    if kind == "unknown_naming":
        for f in list(ck.iterdir()):
            f.unlink()
        save_file({"foo.weight": torch.zeros(2)}, str(ck / "model.safetensors"))
        return ck, "'foo.weight'"
    if kind == "does_not_exist":
        return tmp_path / "nope", "does not exist"
    raise AssertionError(kind)


BAD = [
    "pickle_only_dir",
    "pickle_file",
    "missing_key",
    "unexpected_key",
    "shape_mismatch",
    "index_names_missing_shard",
    "index_parent_dir",
    "index_absolute",
    "index_subdir",
    "index_key_in_wrong_shard",
    "unknown_naming",
    "does_not_exist",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_checkpoint_exits_2_with_one_line_and_writes_nothing(tiny_original_checkpoint, tmp_path, capsys, kind):
    """Guards point 1's failure modes: pickles refused (naming the diffusers repos to take the
    encoder/VAE from), missing / unexpected keys and shape mismatches name the first offending key,
    index entries that leave the directory or name missing shards are refused even when the target
    exists: exit 2, one stderr line, nothing written."""
    ck = _copy(tiny_original_checkpoint, tmp_path)
    spec, needle = _bad(kind, ck, tmp_path)
    out = tmp_path / "out" / "v.mp4"
    out.parent.mkdir()
    assert main(["generate", "--prompt", "x", "--transformer", str(spec), "--output", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wan-nabla: error:") and needle in err[0], err
    if kind.startswith("pickle"):
        assert "never loads" in err[0] and "Wan-AI/Wan2.1-T2V-14B-Diffusers" in err[0]
    if kind in ("index_parent_dir", "index_absolute", "index_subdir"):
        assert "shards must sit next to the index" in err[0]  # refused by name, before any file is opened
    assert list(out.parent.iterdir()) == []


def test_hub_id_from_cache_and_offline_download_command(tiny_original_checkpoint, tmp_path, offline_hub, capsys):
    """Guards: a hub id for --transformer is found in the HF cache (offline), and a missing one
    exits 2 with the exact `hf download` command (safetensors + json only, no pickles)."""
    offline_hub("someone/Wan-tiny-NABLA", tiny_original_checkpoint)
    _, info = load_transformer("someone/Wan-tiny-NABLA", "tiny", torch.float32)
    assert info["naming"] == "original" and info["source"] == "someone/Wan-tiny-NABLA"
    assert (
        main(
            [
                "generate",
                "--prompt",
                "x",
                "--transformer",
                "someone/missing-dit",
                "--output",
                str(tmp_path / "v.mp4"),
                *FAST,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        'hf download someone/missing-dit --include "*.safetensors" --include "*.json" --local-dir weights/missing-dit'
    ) in err


def test_zero_shot_line_names_the_tuned_checkpoint(caplog):
    """Guards: a config that names the DiT it was tuned for logs one line when the run uses other
    weights (with the download command), and stays quiet when the tuned weights are used."""
    tuned = "ai-forever/Wan2.1-T2V-14B-NABLA-0.7"
    cfg = RunConfig.from_mapping({"model": {"recommended_transformer": tuned}})
    with caplog.at_level(logging.WARNING, logger="wan_nabla"):
        assert warn_if_zero_shot(cfg)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "zero-shot" in lines[0] and f"hf download {tuned}" in lines[0]
    for same in (
        tuned,
        "weights/Wan2.1-T2V-14B-NABLA-0.7",
        "/hf/models--ai-forever--Wan2.1-T2V-14B-NABLA-0.7/snapshots/a",
    ):
        assert not warn_if_zero_shot(cfg.override(transformer=same)), same
    assert not same_checkpoint("weights/Wan2.1-T2V-14B-NABLA-0.6-STA-11-3-3", tuned)
    assert not warn_if_zero_shot(RunConfig())
    assert not warn_if_zero_shot(cfg.override(model="tiny"))  # the tiny test model: no advice to give


def test_batch_item_key_covers_the_dit_weights():
    """Guards resume: a batch item made with other DiT weights (--transformer) is a different
    item, never skipped as done; without --transformer the key is what it was (the base model)."""
    from wan_nabla.batch.plan import plan_item
    from wan_nabla.batch.prompts import PromptItem
    from wan_nabla.model_source import model_facts
    from wan_nabla.preflight import RunPlan

    def model_label(cfg):
        return RunPlan("batch", cfg, "tiny", model_facts("tiny")).model_label

    item = PromptItem(index=0, line=1, prompt="a fox")
    base = RunConfig().override(model="tiny")
    assert model_label(base) == "tiny"
    keys = {
        plan_item(c, item, model_label(c)).key
        for c in (base, base.override(transformer="/w/a"), base.override(transformer="/w/b"))
    }
    assert len(keys) == 3
