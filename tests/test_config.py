"""Config schema: presets load, bad values are rejected with one line naming the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import ROOT
from wan_nabla.config import AttentionConfig, ConfigError, GenerationConfig, RunConfig, load_config

CONFIGS = sorted(ROOT.joinpath("configs").glob("*.yaml"))
EXPECTED = {
    "full.yaml": ("full", None, None, 0),
    "nabla_0.7.yaml": ("nabla", 0.7, None, 0),
    "nabla_0.4.yaml": ("nabla", 0.4, None, 0),
    "nabla_0.2_sta_11_3_3.yaml": ("nabla_sta", 0.2, (11, 3, 3), 0),
    "nabla_0.6_sta_11_3_3.yaml": ("nabla_sta", 0.6, (11, 3, 3), 0),
    "nabla_0.5_sta_11_5_5.yaml": ("nabla_sta", 0.5, (11, 5, 5), 0),
    "sta_11_3_3.yaml": ("sta", None, (11, 3, 3), 12),
    "distill_4step_sta.yaml": ("sta", None, (11, 3, 3), 0),
    "wan_1.3b.yaml": ("full", None, None, 0),
}


def test_every_preset_exists_and_says_what_its_name_says():
    assert {p.name for p in CONFIGS} == set(EXPECTED)
    for p in CONFIGS:
        a = load_config(p).attention
        assert (a.type, a.threshold, a.sta_window, a.dense_steps) == EXPECTED[p.name], p.name


def test_round_trip_through_dict():
    for p in CONFIGS:
        cfg = load_config(p)
        again = RunConfig.from_mapping(
            {**cfg.to_dict(), "generation": {k: v for k, v in cfg.to_dict()["generation"].items() if k != "shift"}}
        )
        assert again.attention == cfg.attention


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, key",
    [
        ("atention: {type: full}\n", "atention"),
        ("attention: {type: nabla, threshold: high}\n", "attention.threshold"),
        ("attention: {type: nabla, threshold: 1.2}\n", "attention.threshold"),
        ("attention: {type: nabla, threshold: true}\n", "attention.threshold"),
        ("attention: {type: sta, sta_window: [11, 4, 3]}\n", "attention.sta_window"),
        ("attention: {type: sta, sta_window: 3}\n", "attention.sta_window"),
        ("attention: {type: full, threshold: 0.5}\n", "attention.threshold"),
        ("attention: {type: full, dense_layers: [a]}\n", "attention.dense_layers"),
        ("attention: [full]\n", "attention"),
        ("attention: {type: nabla, threshold: 0.5, time_pairs: 2}\n", "attention.time_pairs"),
        ("attention: {type: nabla, threshold: 0.5, block_size: [128, 32]}\n", "attention.block_size"),
        ("generation: {frames: 80}\n", "generation.frames"),
        ("generation: {size: 830x480}\n", "generation.size"),
        ("generation: {size: big}\n", "generation.size"),
        ("generation: {steps: -3}\n", "generation.steps"),
        ("generation: {steps: 2.5}\n", "generation.steps"),
        ("generation: {guidance_scale: x}\n", "generation.guidance_scale"),
        ("generation: {dtype: int8}\n", "generation.dtype"),
        ("generation: {device: tpu}\n", "generation.device"),
        ("generation: {seed: -1}\n", "generation.seed"),
        ("generation: {fps: 0}\n", "generation.fps"),
        ("generation: {resolution: 480p}\n", "generation.resolution"),
        ("model: 3\n", "model"),
        ("parallel: {ulysses_degree: 0}\n", "parallel.ulysses_degree"),
        ("parallel: {ulysses_degree: '2'}\n", "parallel.ulysses_degree"),
        ("parallel: {cfg_parallel: yes please}\n", "parallel.cfg_parallel"),
        ("parallel: {timeout_s: 0}\n", "parallel.timeout_s"),
        ("parallel: {ranks: 2}\n", "parallel.ranks"),
        ("attention: {type: full\n", "not valid YAML"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    msg = str(e.value)
    assert key in msg
    assert "\n" not in msg


def test_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path)  # a directory
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError):
        load_config(bad)


def test_overrides_win_and_are_validated():
    cfg = RunConfig()
    o = cfg.override(steps=3, size=(128, 64), model="tiny", seed=None)
    assert (o.generation.steps, o.generation.size, o.model.base, o.generation.seed) == (3, (128, 64), "tiny", 0)
    with pytest.raises(ConfigError, match="generation.frames"):
        cfg.override(frames=4)
    par = cfg.override(ulysses_degree=2, cfg_parallel=True, cfg_parallel_typo=None)  # None values are ignored
    assert (par.parallel.ulysses_degree, par.parallel.cfg_parallel, par.parallel.group_size) == (2, True, 4)
    assert par.generation == cfg.generation and RunConfig.from_mapping(par.to_dict()).parallel == par.parallel


def test_shift_default_is_wans_at_every_size():
    assert GenerationConfig(size="1280x720").resolved_shift == 5.0
    assert GenerationConfig(size="832x480").resolved_shift == 5.0
    assert GenerationConfig(size="832x480", shift=7).resolved_shift == 7.0


def test_attention_config_from_plain_mapping():
    a = AttentionConfig.from_mapping(
        {"type": "nabla_sta", "threshold": 0.6, "sta_window": [11, 3, 3], "dense_layers": [3, 1, 3]}
    )
    assert a.sta_window == (11, 3, 3) and a.dense_layers == (1, 3) and a.label() == "nabla 0.6 + sta 11-3-3"


# ---- reading defensively ------------------------------------------------------------------------
def _timed_load(path, limit_s=1.0):
    """load_config in a thread with a deadline, so a regression that blocks fails instead of hanging."""
    import threading
    import time

    box: dict = {}

    def target():
        t0 = time.perf_counter()
        try:
            box["value"] = load_config(path)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e
        box["s"] = time.perf_counter() - t0

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(limit_s * 10)
    assert not th.is_alive(), f"load_config({path}) did not return within {limit_s * 10} s"
    assert box["s"] < limit_s, box
    return box


def _alias_bomb(levels: int = 9) -> str:
    """~400 bytes that expand to 9**levels values: the "billion laughs" shape."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nattention: *a{levels - 1}\n"


@pytest.mark.parametrize(
    "text, needle",
    [
        (_alias_bomb(), "aliases expand to more than 10000 values"),
        ("a: &a [*a]\nattention: *a\n", "refers to itself"),
        ("attention: {type: nabla, threshold: 0.5, threshold: 0.9}\n", "duplicate key 'threshold' (line 1)"),
        ("generation:\n  steps: 4\ngeneration:\n  steps: 8\n", "duplicate key 'generation' (line 3)"),
        ("[" * 5000, "nested more than 32 levels"),
        ("- " * 6000 + "x\n", "nested too deeply"),
        ("attention: []\n", "attention: expected a mapping, got list []"),
        ("generation: [1, 2]\n", "generation: expected a mapping, got list"),
        ('generation: {negative_prompt: "\\udcff bad"}\n', "not valid UTF-8 (byte 0xff at character 1)"),
        ("attention: {type: nabla, threshold: [" + "1, " * 3000 + "1]}\n", "[1, 1, 1, 1, 1, 1, ...]"),
    ],
)
def test_hostile_yaml_is_refused_fast_with_one_short_line(tmp_path, text, needle):
    """Guards the YAML reader: an alias bomb (formatting it took minutes and printed gigabytes),
    recursive aliases, duplicate keys (silently the last value), deep nesting (quadratic in
    PyYAML), a non-mapping section (silently "defaults"), undecodable text and a huge value are
    each refused in well under a second with one short line naming the problem."""
    p = _write(tmp_path, text)
    box = _timed_load(p)
    err = box.get("error")
    assert isinstance(err, ConfigError), box
    msg = str(err)
    assert needle in msg and "\n" not in msg and len(msg) < 300, msg


def test_yaml_merge_keys_and_plain_anchors_still_work(tmp_path):
    """The stricter reader keeps what YAML configs legitimately use: a merge key overridden by
    an explicit key is not a duplicate, and a small anchor is fine."""
    text = "model: tiny\nbase: &b {type: nabla, threshold: 0.5}\n"
    assert "unknown key 'base'" in str(_timed_load(_write(tmp_path, text))["error"])
    text = "attention:\n  <<: {type: nabla, threshold: 0.5}\n  threshold: 0.7\ngeneration: &g {steps: 3}\n"
    cfg = _timed_load(_write(tmp_path, text))["value"]
    assert (cfg.attention.type, cfg.attention.threshold, cfg.generation.steps) == ("nabla", 0.7, 3)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "too_big", "directory"])
def test_config_must_be_a_small_regular_file(tmp_path, kind):
    """Guards: a FIFO blocked forever and /dev/zero read until memory ran out; a config is now a
    regular file of at most 16 KiB, refused at once otherwise, saying why."""
    if kind == "fifo":
        path = tmp_path / "c.yaml"
        os.mkfifo(path)
        needle = "FIFO"
    elif kind == "dev_zero":
        path, needle = Path("/dev/zero"), "character device"
    elif kind == "too_big":
        path = _write(tmp_path, "# padding\n" * 2000)
        needle = "more than the 16 KiB allowed"
    else:
        path, needle = tmp_path, "is a directory"
    err = _timed_load(path)["error"]
    assert isinstance(err, ConfigError) and needle in str(err), err


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("guidance_scale", 1e9, "[0, 100]"),
        ("guidance_scale", 100.5, "[0, 100]"),
        ("shift", 1e-30, "[0.01, 100]"),
        ("shift", 1e30, "[0.01, 100]"),
        ("steps", 1001, "[1, 1000]"),
        ("frames", 4097, "at most 4093"),
        ("size", (16400, 16), "at most 16384"),
        ("size", "²x16", "WIDTHxHEIGHT"),
        ("size", "1" + "0" * 5000 + "x16", "WIDTHxHEIGHT"),
    ],
)
def test_ranges_are_what_the_sampler_and_formats_carry(field, value, allowed):
    """Guards the numeric ranges (reasoning in GenerationConfig's docstrings): values that ran
    and produced NaN frames (guidance 1e9 in fp16, shift 1e-30 / 1e30), or crashed late (steps,
    frames and sizes past the scheduler's or the rotary table's length), or crashed int() ('²',
    5000 digits) are refused up front."""
    with pytest.raises(ConfigError) as e:
        GenerationConfig(**{field: value})
    assert allowed in str(e.value) and len(str(e.value)) < 300
    assert GenerationConfig(guidance_scale=100, shift=0.01, steps=1000, frames=4093, size=(16384, 16)).steps == 1000
