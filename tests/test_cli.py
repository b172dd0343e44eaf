"""`wan-nabla generate` end to end on the tiny model, and its handling of bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import ROOT
from wan_nabla import app, preflight
from wan_nabla.cli import main
from wan_nabla.output.sidecar import git_commit
from wan_nabla.output.video import probe_mp4

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FAST = ["--model", "tiny", "--size", "128x128", "--frames", "17", "--steps", "2", "--quiet"]


def test_generate_writes_mp4_and_sidecar(tmp_path):
    out = tmp_path / "fox.mp4"
    rc = main(
        [
            "generate",
            "--prompt",
            "a red fox running through snow",
            "--config",
            "nabla_0.7",
            "--output",
            str(out),
            "--seed",
            "5",
            "--size",
            "144x208",
            "--frames",
            "9",
            "--steps",
            "3",
            "--model",
            "tiny",
            "--quiet",
            "--fps",
            "12",
        ]
    )
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
    assert side["device"] == "cpu"  # the resolved device, not "auto"
    assert side["versions"]["commit"] == git_commit()
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", side["versions"]["commit"] or "")
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
    if side["config"]["attention"]["type"] == "full":  # full, wan_1.3b
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
    assert (
        main(["generate", "--model", "tiny", "--prompt", "x", "--config", "full.yaml", "--output", str(out), "--quiet"])
        == 0
    )
    info = probe_mp4(out)
    assert (info["frames"], info["width"], info["height"]) == (17, 128, 128)


def test_generate_from_saved_diffusers_directory(tmp_path, tiny_checkpoint):
    out = tmp_path / "d.mp4"
    args = [
        "generate",
        "--prompt",
        "x",
        "--model",
        str(tiny_checkpoint),
        "--size",
        "128x128",
        "--frames",
        "5",
        "--steps",
        "2",
        "--output",
        str(out),
        "--quiet",
        "--dtype",
        "float32",
    ]
    assert main(args) == 0
    assert json.loads(out.with_suffix(".json").read_text())["model"] == str(tiny_checkpoint)


def _bad_yaml(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (
            lambda t: ["--config", _bad_yaml(t, "attention: {type: nabla, threshold: 0.5, windo: 3}\n")],
            "attention.windo",
        ),
        (lambda t: ["--config", _bad_yaml(t, "attention: {type: nabla, threshold: '0.5'}\n")], "attention.threshold"),
        (lambda t: ["--config", _bad_yaml(t, "attention: {type: nabla, threshold: 0}\n")], "(0, 1]"),
        (lambda t: ["--config", _bad_yaml(t, "attention: {type: sta, sta_window: [4, 3, 3]}\n")], "odd"),
        (lambda t: ["--config", str(t / "nope.yaml")], "does not exist"),
        (lambda t: ["--frames", "18"], "--frames"),
        (lambda t: ["--size", "130x128"], "--size"),
        (lambda t: ["--steps", "-2"], "--steps"),
        (lambda t: ["--guidance-scale", "-1"], "--guidance-scale"),
        (lambda t: ["--device", "gpu7"], "--device"),
        (lambda t: ["--attention-backend", "triton"], "--attention-backend (attention.backend): 'triton'"),
        (lambda t: ["--config", _bad_yaml(t, "attention: {type: full, backend: cudnn}\n")], "attention.backend"),
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


# ---- everything checked before a model loads ---------------------------------------------------
@pytest.mark.parametrize(
    "extra, needle",
    [
        (lambda t: ["--device", "cuda"], "device 'cuda': CUDA is not available"),
        (lambda t: ["--device", "cuda:3", "--with-one-gpu"], "device 'cuda:3': this machine has 1 CUDA device"),
        (lambda t: ["--prompt", "a \udcff fox"], "--prompt: is not valid UTF-8 (byte 0xff at character 3)"),
        (lambda t: ["--negative-prompt", "caf\udce9"], "not valid UTF-8 (byte 0xe9"),
        (lambda t: ["--output", str(t / "new" / "dir" / "\udcff.mp4")], "--output: is not valid UTF-8"),
        (lambda t: ["--guidance-scale", "1e9"], "use a number in [0, 100]"),
        (lambda t: ["--shift", "1e-30"], "use a number in [0.01, 100]"),
        (lambda t: ["--steps", "400"], "400 steps at shift 5 cannot run"),
        (lambda t: ["--steps", "12", "--shift", "100"], "use at most 11 steps at this shift"),
        (lambda t: ["--size", "2048x128"], "model 'tiny' has 64; use at most 1024 px per side"),
        (lambda t: ["--frames", "257"], "model 'tiny' has 64"),
        (lambda t: ["--frames", "9999"], "at most 4093"),
        (lambda t: ["--config", _bad_yaml(t, "attention: {dense_layers: [5]}\n")], "model 'tiny' has blocks 0..1"),
        (lambda t: ["--model", str(t / "new")], "hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir"),
    ],
)
def test_preflight_exit_2_before_loading_and_creates_nothing(tmp_path, capsys, monkeypatch, extra, needle):
    """Guards validate-before-compute: each of these used to be accepted and fail late (a
    19-line traceback for a missing GPU, a traceback at the sidecar write for a non-UTF-8 prompt,
    NaN frames or a scheduler assertion after all the steps, a shape error in the first step);
    now each is one line and exit 2 before any model is loaded, and the output directories the
    run would have created do not exist."""
    monkeypatch.setattr(app, "load_weights_for", lambda *a, **k: pytest.fail("loaded a model despite bad input"))
    args = extra(tmp_path)
    if "--with-one-gpu" in args:
        args.remove("--with-one-gpu")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "new" / "dir" / "v.mp4"
    assert main(["generate", "--prompt", "x", "--output", str(out), "--model", "tiny", "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wan-nabla: error:") and needle in err[0], err
    assert not (tmp_path / "new" / "dir").exists()


def test_failed_load_removes_the_directories_the_run_created(tmp_path, capsys, tiny_checkpoint):
    """Guards exit-2 cleanliness: a model directory that passes the preflight but cannot be
    loaded (a corrupt safetensors file) is exit 2 after `--output new/dir/x.mp4` had created its
    directories; the run now takes them away again (an existing parent stays)."""
    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "new" / "dir" / "x.mp4"
    assert main(["generate", "--prompt", "x", "--model", str(model), "--output", str(out), "--quiet"]) == 2
    assert "cannot load model directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_existing_outputs_are_never_replaced_by_surprise(tmp_path, capsys, monkeypatch):
    """Guards: `generate --output` silently replaced an existing MP4 and an unrelated <name>.json.
    Now an existing MP4 or sidecar needs --overwrite, and a <name>.json that is not that MP4's
    sidecar is refused even then; both before loading anything, both leaving the files as they
    were. The default name skips a stem whose .json alone is taken."""
    monkeypatch.setattr(app, "load_weights_for", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "v.mp4").write_bytes(b"precious video")
    (tmp_path / "notes.json").write_text('{"mine": true}')
    cases = [
        (["--output", str(tmp_path / "v.mp4")], "already exists; give another --output, or --overwrite"),
        (["--output", str(tmp_path / "notes.mp4")], "already exists"),
        (["--output", str(tmp_path / "notes.mp4"), "--overwrite"], "is not the sidecar of"),
    ]
    for args, needle in cases:
        assert main(["generate", "--prompt", "x", *args, *FAST]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert (tmp_path / "v.mp4").read_bytes() == b"precious video"
    assert (tmp_path / "notes.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json", "v.mp4"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "a-fox.json").write_text("{}")
    assert preflight.default_output("a fox") == Path("outputs") / "a-fox-2.mp4"


def test_overwrite_replaces_the_video_and_its_own_sidecar(tmp_path):
    """--overwrite does what it says for a pair that wan-nabla wrote (the sidecar names the MP4)."""
    out = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "x", "--output", str(out), "--seed", "1", *FAST]) == 0
    assert main(["generate", "--prompt", "x", "--output", str(out), "--seed", "1", *FAST]) == 2
    assert main(["generate", "--prompt", "x", "--output", str(out), "--seed", "2", "--overwrite", *FAST]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json", "v.mp4"]


def test_help_shows_defaults_and_exit_codes(capsys):
    """Guards: --help gave no defaults (not the tiny model's either) and no exit codes."""
    for command, needles in (
        (
            "generate",
            [
                "(default: 50; tiny 4)",
                "(default: 832x480; with --model tiny 128x128)",
                "(default: 5)",
                "--overwrite",
                "exit codes:",
                "143 terminated (SIGTERM)",
            ],
        ),
        ("batch", ["(default: 81; tiny 17)", "exit codes:", "1    at least one item failed"]),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for needle in needles:
            assert " ".join(needle.split()) in text, (command, needle)


def test_each_warning_once_and_verbose_shows_only_wan_nabla_debug(tmp_path):
    """Guards the log: huggingface_hub/diffusers warnings were printed twice (their own handler
    and ours), and --verbose flooded stderr with filelock's lock debugging. Run in a fresh
    process, as a user would, with --verbose."""
    code = (
        "import logging, sys\n"
        "from wan_nabla.cli import build_parser, setup_logging\n"
        "logging.getLogger('httpx').setLevel(logging.DEBUG)  # as a library or env config may do\n"
        "args = build_parser().parse_args(sys.argv[1:])\n"
        "setup_logging(quiet=args.quiet, verbose=args.verbose)\n"
        "logging.getLogger('huggingface_hub.utils._http').warning('hub-warning')\n"
        "logging.getLogger('diffusers.models.modeling_utils').warning('diffusers-warning')\n"
        "logging.getLogger('filelock').debug('lock-debug')\n"
        "logging.getLogger('urllib3.connectionpool').debug('http-debug')\n"
        "logging.getLogger('httpx').debug('httpx-debug')\n"
        "logging.getLogger('some.other.library').info('other-info')\n"
        "logging.getLogger('wan_nabla.pipeline').debug('our-debug')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "generate", "--prompt", "x", "--verbose"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert err.count("hub-warning") == 1 and err.count("diffusers-warning") == 1, err
    assert "lock-debug" not in err and "http-debug" not in err and err.count("our-debug") == 1, err
    assert "httpx-debug" not in err and "other-info" not in err, err


def test_quick_start_outputs_are_git_ignored_but_benchmark_json_is_not():
    """Guards: the quick start writes fox.mp4 and fox.json into the checkout; the MP4 was
    ignored, its sidecar was not. Benchmark results must stay visible."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a checkout")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT).returncode == 0

    assert ignored("fox.json") and ignored("fox.mp4") and ignored("outputs/fox-2.json")
    assert not ignored("benchmarks/results/h100_new.json") and not ignored("configs/new.yaml")
