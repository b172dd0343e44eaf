"""`wan-nabla generate` end to end on the tiny model, and its handling of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wan_nabla.cli import main
from wan_nabla.output.video import probe_mp4

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "wan_nabla" / "presets").glob("*.yaml"))
FAST = ["--model", "tiny", "--size", "128x128", "--frames", "17", "--steps", "2", "--quiet"]


def test_generate_writes_mp4_and_sidecar(tmp_path):
    out = tmp_path / "fox.mp4"
    rc = main(["generate", "--prompt", "a red fox running through snow", "--config", "nabla_0.7",
               "--output", str(out), "--seed", "5", "--size", "144x208", "--frames", "9", "--steps", "3",
               "--model", "tiny", "--quiet", "--fps", "12"])
    assert rc == 0
    info = probe_mp4(out)
    assert (info["frames"], info["width"], info["height"], info["codec"]) == (9, 144, 208, "h264")
    side = json.loads((tmp_path / "fox.json").read_text())
    assert side["prompt"] == "a red fox running through snow" and side["seed"] == 5 and side["model"] == "tiny"
    assert side["config"]["attention"]["type"] == "nabla" and side["config"]["attention"]["threshold"] == 0.7
    assert side["config"]["generation"]["size"] == "144x208" and side["config"]["generation"]["steps"] == 3
    assert side["config"]["generation"]["fps"] == 12 and side["video"]["frames"] == 9
    assert set(side["timings"]) >= {"load_s", "text_encoding_s", "denoising_s", "decode_s", "write_s", "per_step_s"}
    assert len(side["attention"]["per_step"]) == 3 and 0 < side["attention"]["overall"] < 1
    assert set(side["versions"]) >= {"wan_nabla", "torch", "diffusers", "gpu"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.json", "fox.mp4"]  # no temp files left


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_preset_runs_end_to_end_and_is_sparse(tmp_path, config):
    """Guards: every bundled preset runs by name, and at a size where its masks can be sparse
    (512x128 px, 29 frames: 8 latent frames x 1 x 4 tiles, so STA 11-x-x and 5-wide windows leave
    tiles out) its sparse steps keep less than everything; dense steps keep everything."""
    out = tmp_path / "v.mp4"
    steps = 13 if config.stem == "sta_11_3_3" else 2  # the STA preset runs 12 dense steps first
    args = ["--model", "tiny", "--size", "512x128", "--frames", "29", "--steps", str(steps), "--quiet"]
    assert main(["generate", "--prompt", "a fox", "--config", config.stem, "--output", str(out), *args]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert probe_mp4(out)["frames"] == 29
    dens = side["attention"]["per_step"]
    dense_steps = side["config"]["attention"]["dense_steps"]
    if config.stem == "full":
        assert dens == [1.0] * steps
    else:
        assert dens[:dense_steps] == [1.0] * dense_steps
        assert all(0 < d < 1 for d in dens[dense_steps:]), dens


def test_presets_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    """Guards: `--config nabla_0.7.yaml` / `--config nabla_0.7` find the bundled preset from any
    working directory; a file that exists at the given path wins over the preset."""
    from wan_nabla.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)
    assert load_config("nabla_0.7.yaml").attention.threshold == 0.7
    assert load_config("nabla_0.7").attention.threshold == 0.7
    (tmp_path / "nabla_0.7.yaml").write_text("attention:\n  type: nabla\n  threshold: 0.3\n")
    assert load_config("nabla_0.7.yaml").attention.threshold == 0.3  # the existing file wins
    assert load_config("nabla_0.7").attention.threshold == 0.7
    with pytest.raises(ConfigError, match="nabla_0.7.*sta_11_3_3"):  # the error lists the presets
        load_config("nabla_0.77")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("somewhere/nabla_0.7.yaml")  # a path with a directory is never a preset name
    out = tmp_path / "o.mp4"
    assert main(["generate", "--prompt", "x", "--config", "nabla_0.7", "--output", str(out), *FAST]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["config"]["attention"]["threshold"] == 0.7


def test_presets_command_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    for c in CONFIGS:
        assert c.stem in listed
    assert main(["presets", "--show", "sta_11_3_3"]) == 0
    assert "dense_steps: 12" in capsys.readouterr().out
    assert main(["presets", "--show", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_tiny_model_defaults_when_flags_absent(tmp_path):
    out = tmp_path / "t.mp4"
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--config", "full.yaml",
                 "--output", str(out), "--quiet"]) == 0
    info = probe_mp4(out)
    assert (info["frames"], info["width"], info["height"]) == (17, 128, 128)


def test_generate_from_saved_diffusers_directory(tmp_path, tiny_checkpoint):
    out = tmp_path / "d.mp4"
    args = ["generate", "--prompt", "x", "--model", str(tiny_checkpoint), "--size", "128x128", "--frames", "5",
            "--steps", "2", "--output", str(out), "--quiet", "--dtype", "float32"]
    assert main(args) == 0
    assert json.loads(out.with_suffix(".json").read_text())["model"] == str(tiny_checkpoint)


def _bad_yaml(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (lambda t: ["--config", _bad_yaml(t, "attention: {type: nabla, threshold: 0.5, windo: 3}\n")], "attention.windo"),
        (lambda t: ["--config", _bad_yaml(t, "attention: {type: nabla, threshold: '0.5'}\n")], "attention.threshold"),
        (lambda t: ["--config", _bad_yaml(t, "attention: {type: nabla, threshold: 0}\n")], "(0, 1]"),
        (lambda t: ["--config", _bad_yaml(t, "attention: {type: sta, sta_window: [4, 3, 3]}\n")], "odd"),
        (lambda t: ["--config", str(t / "nope.yaml")], "does not exist"),
        (lambda t: ["--frames", "18"], "--frames"),
        (lambda t: ["--size", "130x128"], "--size"),
        (lambda t: ["--steps", "-2"], "--steps"),
        (lambda t: ["--guidance-scale", "-1"], "--guidance-scale"),
        (lambda t: ["--device", "gpu7"], "--device"),
        (lambda t: ["--model", str(t / "no-such-model")], "hf download"),
    ],
)
def test_bad_input_exit_2_one_line_nothing_written(tmp_path, capsys, extra, needle):
    out = tmp_path / "out" / "v.mp4"
    out.parent.mkdir()
    args = ["generate", "--prompt", "x", "--output", str(out), "--model", "tiny", "--quiet", *extra(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wan-nabla: error:") and needle in err[0]
    assert list(out.parent.iterdir()) == []


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["generate", "--prompt", "x", "--output", str(blocker / "sub" / "v.mp4"), *FAST]) == 2
    assert str(blocker) in capsys.readouterr().err


def test_output_must_be_mp4(tmp_path, capsys):
    assert main(["generate", "--prompt", "x", "--output", str(tmp_path / "v.avi"), *FAST]) == 2
    assert ".mp4" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Guards: atomic outputs: a crash after part of the MP4 is encoded, or while the sidecar is
    written, leaves neither file (and no temp file) behind; the run ends with exit 1 and one line
    naming the failure, not a traceback (the traceback only with --verbose)."""
    import wan_nabla.output.files as wio
    import wan_nabla.output.video as video

    real = video.write_mp4

    def crash_mid_write(frames, path, fps=16, **kw):
        real(frames[:3], path, fps=fps)  # some bytes really land in the temp file
        raise RuntimeError("encoder died")

    monkeypatch.setattr(video, "write_mp4", crash_mid_write)
    assert main(["generate", "--prompt", "x", "--output", str(tmp_path / "a.mp4"), *FAST]) == 1
    assert capsys.readouterr().err.strip().splitlines() == ["wan-nabla: error: RuntimeError: encoder died"]
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(video, "write_mp4", real)

    def bad_json(path, obj, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(wio, "atomic_write_json", bad_json)
    assert main(["generate", "--prompt", "x", "--output", str(tmp_path / "new" / "b.mp4"), *FAST, "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "wan-nabla: error: OSError: disk full"
    assert list(tmp_path.iterdir()) == []  # the directory it created is gone too


def test_default_output_name_is_a_safe_slug(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--prompt", "../../etc/passwd", *FAST]) == 0
    assert main(["generate", "--prompt", "../../etc/passwd", *FAST]) == 0
    names = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert names == ["etc-passwd-2.json", "etc-passwd-2.mp4", "etc-passwd.json", "etc-passwd.mp4"]
