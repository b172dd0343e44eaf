"""Preflight and the light CLI: --help, presets and bad input answer without torch, and the small
input defects of issue 24 each give one clear line (exit 2) or one warning.

Most tests run preflight in-process (it imports no torch); the import test runs the CLI in a fresh
interpreter, since this test process has torch loaded already.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import ROOT
from wan_nabla import cli, preflight
from wan_nabla.config import ConfigError, load_config
from wan_nabla.errors import LoraError, UsageError
from wan_nabla.output.files import OutputError
from wan_nabla.output.sidecar import SIDECAR_PROMPT_CHARS, prompt_record
from wan_nabla.requests import BatchRequest, CompareRequest, GenerateRequest, RunFlags

HEAVY = ("torch", "diffusers", "transformers")
TINY = RunFlags(model="tiny", device="cpu")


def _error(argv: list[str], capsys) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    return err[0]


# ---- 1. the light paths import no torch ------------------------------------------------------------
LIGHT_PATHS = [
    ["--help"],
    ["generate", "--help"],
    ["batch", "--help"],
    ["compare", "--help"],
    ["serve", "--help"],
    ["presets"],
    ["presets", "--show", "nabla_0.7"],
    ["generate", "--prompt", "x", "--size", "100x100"],
    ["generate", "--prompt", "x", "--model", "tiny", "--lora", "x.safetensors:abc"],
    ["generate", "--prompt", "x", "--model", "tiny", "--output", "/proc/x.mp4"],
    ["generate", "--prompt", "x", "--model", "tiny", "--output", "a\nb.mp4"],
    ["generate", "--prompt", "x", "--model", "tiny", "--config", "nope_preset"],
    ["generate", "--prompt", "x", "--model", str(ROOT / "no-such-model-dir")],
    ["batch", ".", "--out-dir", "out"],
    ["compare", "--prompt", "x", "--config", "nabla_0.4", "--against", "nope_preset", "--out", "c"],
]


def test_help_presets_and_input_errors_import_no_torch(tmp_path):
    """Guards issue 24 pt 1: --help, presets and every input error found before the model is
    needed import neither torch nor diffusers (they cost ~7 s of CPU before this). One fresh
    interpreter runs every path and reports sys.modules after each."""
    script = textwrap.dedent("""
        import contextlib, io, json, sys
        from wan_nabla.cli import main
        out = []
        for argv in json.loads(sys.argv[1]):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                try:
                    rc = main(argv)
                except SystemExit as e:
                    rc = e.code
            out.append([argv, rc, [m for m in HEAVY if m in sys.modules], err.getvalue()[-300:]])
        print(json.dumps(out))
    """).replace("HEAVY", repr(HEAVY))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(LIGHT_PATHS)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for argv, rc, heavy, err in json.loads(proc.stdout.splitlines()[-1]):
        assert heavy == [], (argv, heavy)
        assert rc == (0 if "--help" in argv or argv[0] == "presets" else 2), (argv, rc, err)
    assert os.listdir(tmp_path) == []  # no input error left a file or directory behind


def test_package_import_is_light_and_heavy_names_still_resolve():
    """Guards the layering: `import wan_nabla` (and its config, preflight, requests) pulls in no
    torch, while wan_nabla.apply_attention still works for library users."""
    script = (
        "import sys, wan_nabla, wan_nabla.preflight, wan_nabla.distributed; "
        f"assert not [m for m in {HEAVY!r} if m in sys.modules], sys.modules.keys(); "
        "wan_nabla.apply_attention; wan_nabla.distributed.ParallelContext; print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


# ---- 5. the small defects of issue 24 --------------------------------------------------------------
def test_lora_with_a_bad_scale_names_the_scale(capsys):
    """Was: "'x.safetensors:abc' is not allowed; only .safetensors LoRA files are loaded"."""
    line = _error(["generate", "--prompt", "x", "--model", "tiny", "--lora", "x.safetensors:abc"], capsys)
    assert "scale 'abc'" in line and "not a number" in line and "only .safetensors" not in line


def test_output_with_a_newline_is_refused(tmp_path, capsys):
    """Was: a file name with a newline written as asked (batch names strip control characters)."""
    line = _error(["generate", "--prompt", "x", "--model", "tiny", "--output", str(tmp_path / "new\nline.mp4")], capsys)
    assert line.startswith("wan-nabla: error: --output:") and "control characters" in line
    assert os.listdir(tmp_path) == []


def test_output_in_proc_says_what_is_wrong(capsys):
    """Was: "'/proc' is not writable: No such file or directory" (the directory exists)."""
    if not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    line = _error(["generate", "--prompt", "x", "--model", "tiny", "--output", "/proc/x.mp4"], capsys)
    assert "'/proc' is not writable" in line and "No such file or directory" not in line
    assert "virtual file system" in line and line.startswith("wan-nabla: error: --output:")


def test_compare_against_a_missing_preset_names_against(tmp_path, capsys):
    """Was: "config file 'nope_preset' does not exist" without saying which flag named it."""
    line = _error(
        [
            "compare",
            "--prompt",
            "x",
            "--config",
            "nabla_0.4",
            "--model",
            "tiny",
            "--against",
            "nope_preset",
            "--out",
            str(tmp_path / "c"),
        ],
        capsys,
    )
    assert line.startswith("wan-nabla: error: --against: config file 'nope_preset' does not exist")


def test_directory_as_prompt_file_is_called_a_directory(tmp_path, capsys):
    """Was: "prompt file 'prompts': no extension" for a directory."""
    (tmp_path / "prompts.txt").mkdir()
    for name in ("prompts.txt", "."):
        line = _error(["batch", str(tmp_path / name), "--out-dir", str(tmp_path / "o"), "--model", "tiny"], capsys)
        assert "is a directory" in line and "extension" not in line


def test_yaml_tag_error_is_whole(tmp_path):
    """Was: 'could not determine a const...thon/object' (cut mid-word by the repr limit)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("attention: !!python/object/apply:os.system [ls]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "'!!python/object/apply:os.system' is not allowed" in str(e.value) and "..." not in str(e.value)


def _sta_config(tmp_path: Path, window: list[int]) -> str:
    path = tmp_path / f"sta_{'_'.join(map(str, window))}.yaml"
    path.write_text(f"attention: {{type: sta, sta_window: {window}}}\n", encoding="utf-8")
    return str(path)


def test_window_covering_the_grid_gives_one_note(tmp_path):
    """A window covering the whole tile grid runs full attention: one note saying so (logged
    once by the runner). The tiny model at 128x128, 17 frames has a 5x1x1 tile grid, so a
    window reaches everything from wT = 9 on (half-width 4 = 5 - 1), and not at wT = 7."""
    flags = RunFlags(model="tiny", device="cpu")
    notes = {}
    for window in ([999, 999, 999], [9, 1, 1], [7, 1, 1], [1, 1, 1]):
        req = GenerateRequest(
            "x", str(tmp_path / "x.mp4"), flags=RunFlags(**{**flags.__dict__, "config": _sta_config(tmp_path, window)})
        )
        notes[window[0]] = preflight.plan_generate(req).notes
    assert len(notes[999]) == 1 and len(notes[9]) == 1 and notes[7] == () and notes[1] == ()
    assert "full attention (density 1.0)" in notes[999][0] and "5x1x1 tile grid" in notes[999][0]


def test_runner_logs_the_note_once(tmp_path, caplog):
    """The note reaches the user as exactly one warning (app.check_environment)."""
    from wan_nabla import app

    req = GenerateRequest(
        "x",
        str(tmp_path / "x.mp4"),
        flags=RunFlags(model="tiny", device="cpu", config=_sta_config(tmp_path, [999, 999, 999])),
    )
    plan = preflight.plan_generate(req)
    with caplog.at_level(logging.WARNING, logger="wan_nabla"):
        app.check_environment(plan)
    assert [r.message for r in caplog.records if "covers the whole" in r.message] == [plan.notes[0]]


def test_long_prompt_warns_once_and_sidecar_bounds_it(caplog):
    """A prompt far past 512 tokens: one warning saying the encoder reads the first 512; the
    sidecar keeps at most SIDECAR_PROMPT_CHARS characters and the full prompt's sha256."""
    import hashlib
    import types

    from wan_nabla import app
    from wan_nabla.tiny import build_tiny_tokenizer

    gen = types.SimpleNamespace(pipe=types.SimpleNamespace(tokenizer=build_tiny_tokenizer()))
    long = "a red fox " * 12_000  # 120k characters
    with caplog.at_level(logging.WARNING, logger="wan_nabla"):
        assert app.warn_long_prompt(gen, "a red fox") < 512
        assert app.warn_long_prompt(gen, long) > 512
    warned = [r.message for r in caplog.records if "tokens" in r.message]
    assert len(warned) == 1 and "reads the first 512" in warned[0]
    rec = prompt_record(long)
    assert len(rec["prompt"]) == SIDECAR_PROMPT_CHARS and rec["prompt_chars"] == len(long)
    assert rec["prompt_sha256"] == hashlib.sha256(long.encode()).hexdigest() and rec["prompt_truncated"]
    assert prompt_record("a fox") == {
        "prompt": "a fox",
        "prompt_chars": 5,
        "prompt_sha256": hashlib.sha256(b"a fox").hexdigest(),
    }


# ---- the plan ---------------------------------------------------------------------------------------
def test_plan_is_frozen_and_resolves_the_model_once(tmp_path, monkeypatch):
    """Guards issue 20 pt 5: resolve_model runs once per preflight (it ran four times), and the
    plan cannot be changed after it."""
    import dataclasses

    calls = []
    real = preflight.resolve_model
    monkeypatch.setattr(preflight, "resolve_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    plan = preflight.plan_generate(GenerateRequest("a fox", str(tmp_path / "f.mp4"), flags=TINY))
    assert calls == [("tiny", None)] and plan.model == "tiny" and plan.output == tmp_path / "f.mp4"
    assert plan.facts.heads == 2 and plan.parallel is None and plan.levers["compile"] == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.model = "other"
    with pytest.raises(TypeError):  # frozen all the way down: the --sample-* table too
        plan.sampling["steps"] = (0,)


def test_batch_dry_run_never_looks_up_the_model(tmp_path, monkeypatch):
    """Guards issue 24 pt 2: a dry run loads nothing, so it needs no weights: the default hub
    model (not reachable offline) is resolved but never looked up; a real run does look it up."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no weights/ directory here
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n", encoding="utf-8")
    plan = preflight.plan_batch(BatchRequest(str(prompts), "out", dry_run=True))
    assert plan.model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" and not plan.model_checked
    with pytest.raises(Exception) as e:
        preflight.plan_batch(BatchRequest(str(prompts), "out", dry_run=False))
    assert "HF_HUB_OFFLINE" in str(e.value) or "cannot be reached" in str(e.value)


def test_compare_reference_takes_only_the_against_attention(tmp_path):
    plan = preflight.plan_compare(
        CompareRequest(
            "a fox",
            str(tmp_path / "c"),
            against="sta_11_3_3",
            flags=RunFlags(config="nabla_0.4", model="tiny", device="cpu"),
        )
    )
    assert plan.config.attention.type == "nabla" and plan.reference.attention.type == "sta"
    assert plan.reference.generation == plan.config.generation


def test_lora_header_is_read_without_torch(tmp_path):
    """preflight reads a safetensors header by hand (8-byte length + JSON): the keys it finds are
    the keys safetensors itself lists, and a truncated file is one clear line."""
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "l.safetensors"
    save_file(
        {"a.lora_A.weight": np.zeros((2, 2), np.float32), "b": np.ones(3, np.float32)},
        str(path),
        metadata={"format": "pt"},
    )
    assert sorted(preflight.safetensors_keys(path)) == ["a.lora_A.weight", "b"]
    path.write_bytes(b"\x01\x02")
    with pytest.raises(LoraError, match="shorter than its 8-byte header"):
        preflight.safetensors_keys(path)


def test_usage_errors_are_usage_errors():
    assert issubclass(UsageError, ValueError) and issubclass(OutputError, ValueError)


def test_generator_binds_its_parallel_layout_once(monkeypatch):
    """Guards issue 20 pt 5: attention was installed and the blocks compiled, then use_parallel
    removed both and did them again; the layout is bound when the generator is built."""
    import types

    import torch

    from wan_nabla import adapter
    from wan_nabla.config import RunConfig
    from wan_nabla.pipeline import VideoGenerator
    from wan_nabla.tiny import build_tiny_pipeline
    from wan_nabla.wan import hooks

    calls = {"apply": 0, "compile": 0}
    real_apply, real_compile = hooks.apply_attention, adapter.compile_blocks

    def apply(*a, **k):
        calls["apply"] += 1
        return real_apply(*a, **k)

    def compile_blocks(*a, **k):
        calls["compile"] += 1
        return real_compile(*a, **k)

    monkeypatch.setattr(hooks, "apply_attention", apply)
    monkeypatch.setattr(adapter, "compile_blocks", compile_blocks)
    par = types.SimpleNamespace(sequence_parallel=lambda: None, item_mean=lambda x: x)
    cfg = RunConfig.from_mapping({"attention": {"type": "nabla", "threshold": 0.7}, "speed": {"compile": "blocks"}})
    gen = VideoGenerator(build_tiny_pipeline(seed=0), cfg, torch.device("cpu"), "tiny", parallel=par)
    try:
        assert calls == {"apply": 1, "compile": 1} and gen.parallel is par
        assert gen.handle.run.stats_mean is par.item_mean and not hasattr(gen, "use_parallel")
    finally:
        gen.close()
