"""Config schema: presets load, bad values are rejected with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from wan_nabla.config import AttentionConfig, ConfigError, GenerationConfig, RunConfig, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("wan_nabla", "presets").glob("*.yaml"))
EXPECTED = {
    "full.yaml": ("full", None, None, 0),
    "nabla_0.7.yaml": ("nabla", 0.7, None, 0),
    "nabla_0.4.yaml": ("nabla", 0.4, None, 0),
    "nabla_0.2_sta_11_3_3.yaml": ("nabla_sta", 0.2, (11, 3, 3), 0),
    "nabla_0.6_sta_11_3_3.yaml": ("nabla_sta", 0.6, (11, 3, 3), 0),
    "nabla_0.5_sta_11_5_5.yaml": ("nabla_sta", 0.5, (11, 5, 5), 0),
    "sta_11_3_3.yaml": ("sta", None, (11, 3, 3), 12),
    "distill_4step_sta.yaml": ("sta", None, (11, 3, 3), 0),
}


def test_every_preset_exists_and_says_what_its_name_says():
    assert {p.name for p in CONFIGS} == set(EXPECTED)
    for p in CONFIGS:
        a = load_config(p).attention
        assert (a.type, a.threshold, a.sta_window, a.dense_steps) == EXPECTED[p.name], p.name


def test_round_trip_through_dict():
    for p in CONFIGS:
        cfg = load_config(p)
        again = RunConfig.from_mapping({**cfg.to_dict(), "generation": {
            k: v for k, v in cfg.to_dict()["generation"].items() if k != "shift"}})
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


def test_shift_defaults_follow_resolution():
    assert GenerationConfig(size="1280x720").resolved_shift == 5.0
    assert GenerationConfig(size="832x480").resolved_shift == 3.0
    assert GenerationConfig(size="832x480", shift=7).resolved_shift == 7.0


def test_attention_config_from_plain_mapping():
    a = AttentionConfig.from_mapping({"type": "nabla_sta", "threshold": 0.6, "sta_window": [11, 3, 3],
                                      "dense_layers": [3, 1, 3]})
    assert a.sta_window == (11, 3, 3) and a.dense_layers == (1, 3) and a.label() == "nabla 0.6 + sta 11-3-3"
