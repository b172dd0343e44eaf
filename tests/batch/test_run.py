"""`wan-nabla batch` end to end on the tiny model: bad lines, resume after SIGKILL, file names,
seeds, failure isolation, exit codes, and memory over 200 items.

Runs go through `wan_nabla.cli.main` in-process (the real argument parsing and exit codes), except
the SIGKILL test, which needs a real process to kill. Sizes are the smallest the VAE accepts.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.support import ROOT
from tests.support.outputs import decoded, fsync_recorder, last_by_index, mp4_names, write_jsonl
from wan_nabla import cli, preflight
from wan_nabla.batch import plan as batch_plan
from wan_nabla.batch import run as batch
from wan_nabla.batch.manifest import ManifestWriter, read_manifest
from wan_nabla.batch.resume import remove_stale_temps
from wan_nabla.output.video import probe_mp4
from wan_nabla.pipeline import GenerationResult, VideoGenerator
from wan_nabla.requests import BatchRequest

SMALL = ["--model", "tiny", "--size", "16x16", "--frames", "1", "--steps", "1"]
RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def sidecar(out: Path, rec: dict) -> dict:
    return json.loads((out / rec["sidecar"]).read_text())


# ---- prompt files with bad lines ----------------------------------------------------------------
def test_txt_batch_generates_good_lines_and_records_the_malformed_one(tmp_path, capsys):
    """Blank and comment lines are not items; an undecodable line fails alone; the progress bar
    reports the failure; identical prompts get distinct files; exit 1."""
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(
        b"# my prompts\n\na red fox in snow\n\xff\xfe not utf-8\n   # indented comment\n"
        b"a red fox in snow\na paper boat\n"
    )
    out = tmp_path / "out"
    rc = run("batch", prompts, "--out-dir", out, "--model", "tiny", "--size", "32x32", "--frames", "5", "--steps", "1")
    assert rc == 1
    err = capsys.readouterr().err
    assert "failed=1" in err  # the overall bar's postfix
    last = last_by_index(out)
    assert {i: r["status"] for i, r in last.items()} == {0: "ok", 1: "failed", 2: "ok", 3: "ok"}
    assert last[1]["error"] == "line 4: not valid UTF-8 (byte 1)" and last[1]["output"] is None
    assert [last[i]["output"] for i in (0, 2, 3)] == [
        "a-red-fox-in-snow.mp4", "a-red-fox-in-snow-2.mp4", "a-paper-boat.mp4"]  # fmt: skip
    assert mp4_names(out) == sorted(last[i]["output"] for i in (0, 2, 3))
    for i in (0, 2, 3):
        video = probe_mp4(out / last[i]["output"])
        assert (video["frames"], video["width"], video["height"]) == (5, 32, 32)
        rec = last[i]
        assert set(rec) >= {
            "index",
            "key",
            "prompt",
            "name",
            "status",
            "output",
            "sidecar",
            "seed",
            "settings",
            "timings",
            "attention_density",
            "error",
            "time",
        }
        assert rec["attention_density"] == 1.0 and rec["timings"]["denoising_s"] > 0
        assert sidecar(out, rec)["batch"]["key"] == rec["key"]


def test_jsonl_batch_records_each_bad_record_with_its_reason(tmp_path, capsys):
    """Per-item values are validated against the same rules as the config, and against what the
    model and sampler can run (steps at the shift, size against the rotary table) before any
    compute; each bad record is one failed manifest record naming its line and value; per-item
    size/frames really apply."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        "# comment", "",
        {"prompt": "a red fox", "name": "fox"},
        {"prompt": "a wide shot", "size": "32x16", "frames": 5, "seed": None},
        '{"prompt": "broken json",',
        {"prompt": "bad size", "size": "100x100"},
        {"prompt": "bad frames", "frames": 6},
        {"prompt": "bad steps", "steps": "2"},
        {"prompt": "bad seed", "seed": 1.5},
        {"negative_prompt": "no prompt"},
        {"prompt": "x", "colour": "red"},
        ["not", "an", "object"],
        {"prompt": "more steps than the sampler runs at shift 5", "steps": 400},
        {"prompt": "wider than the tiny model's rotary table", "size": "2048x16"},
    ])  # fmt: skip
    out = tmp_path / "out"
    assert run("batch", prompts, "--out-dir", out, *SMALL, "--quiet") == 1
    assert capsys.readouterr().out.strip().startswith("batch: 2 ok, 10 failed, 0 skipped")
    last = last_by_index(out)
    reasons = {i: r["error"] for i, r in last.items() if r["status"] == "failed"}
    assert reasons == {
        2: "line 5: not valid JSON: Expecting property name enclosed in double quotes (column 26)",
        3: "line 6: size: width and height must be positive multiples of 16, got 100x100",
        4: "line 7: frames: 6 is not allowed; use 4k+1 frames (1, 5, ..., 17, ..., 81)",
        5: "line 8: steps: '2' is not allowed; use an integer in [1, 1000]",
        6: "line 9: seed: 1.5 is not allowed; use an integer in [0, 2**63)",
        7: "line 10: missing 'prompt'; every record needs a non-empty \"prompt\" string",
        8: "line 11: unknown key 'colour'; allowed keys: prompt, negative_prompt, seed, size, frames, steps, "
           "guidance_scale, name",
        9: "line 12: expected a JSON object, got list",
        10: "line 13: steps: 400 steps at shift 5 cannot run: the UniPC sampler's first two timesteps coincide "
            "and diffusers fails at the last step; use at most 250 steps at this shift (--steps), or a smaller --shift",
        11: "line 14: size/frames: 2048x16, 1 frames needs 128 rotary positions on the width axis, but model 'tiny' "
            "has 64; use at most 1024 px per side and 253 frames",
    }  # fmt: skip
    assert (last[0]["status"], last[0]["output"]) == ("ok", "fox.mp4")
    wide = probe_mp4(out / last[1]["output"])
    assert (wide["frames"], wide["width"], wide["height"]) == (5, 32, 16)
    assert last[1]["settings"]["size"] == "32x16" and last[1]["seed"] == batch_plan.derive_seed(0, 1)
    assert mp4_names(out) == ["a-wide-shot.mp4", "fox.mp4"]


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path, capsys, monkeypatch):
    """--dry-run validates every line and prints the plan, without loading a model or writing."""
    _no_load(monkeypatch, lambda *a, **k: pytest.fail("dry run loaded a model"))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a fox", "seed": 9}, {"prompt": "x", "frames": 2}])
    out = tmp_path / "out"
    assert run("batch", prompts, "--out-dir", out, *SMALL, "--dry-run") == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["0", "1", "would-run", "9", "16x16", "1", "1", "a-fox.mp4"]
    assert lines[2].split()[:3] == ["1", "2", "invalid"] and "frames: 2 is not allowed" in lines[2]
    assert lines[-1].startswith("dry run: 2 items: 1 would run, 0 already done, 1 invalid")
    assert not out.exists()


@pytest.mark.parametrize("example", ["example_prompts.txt", "example_prompts.jsonl"])
def test_shipped_example_prompt_files_are_valid(example, capsys):
    """Guards: every item of the shipped examples plans for the real Wan2.1 models (their rotary
    table, their sampler); the CLI dry run reads them with the tiny model too (its 64-position
    rotary table allows 1024 px per side): every item plans, nothing is invalid."""
    from wan_nabla.app import item_check
    from wan_nabla.batch.prompts import read_prompt_file
    from wan_nabla.config import RunConfig
    from wan_nabla.model_source import ModelFacts

    prompts = ROOT / "examples" / example
    wan = ModelFacts("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", num_layers=30)
    check = item_check(wan, RunConfig().attention)
    planned = [batch_plan.plan_item(RunConfig(), it, wan.model, check=check) for it in read_prompt_file(prompts)]
    assert planned and [p.error for p in planned] == [None] * len(planned)
    rc = run("batch", prompts, "--out-dir", "/nonexistent/out", "--model", "tiny", "--dry-run")
    lines = capsys.readouterr().out.splitlines()
    invalid = [ln for ln in lines if " invalid " in ln]
    assert rc == 0 and invalid == [] and lines[-1].endswith("output directory /nonexistent/out")


def _no_load(monkeypatch, fail):
    for name in ("load_generator", "load_weights_for"):
        monkeypatch.setattr(batch, name, fail)


# ---- resume --------------------------------------------------------------------------------------
def _ok_count(manifest: Path) -> int:
    return sum(r.get("status") == "ok" for r in read_manifest(manifest))


def test_sigkill_mid_batch_then_resume(tmp_path):
    """A batch killed with SIGKILL, rerun with the same command: every item ends with exactly one
    ok record (nothing lost, nothing done twice), items done before the kill are skipped and their
    files untouched, no partial or temp file remains, and a truncated manifest line is tolerated."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"clip number {i}\n" for i in range(10)) + "clip number 3\n")
    out = tmp_path / "out"
    argv = ["batch", str(prompts), "--out-dir", str(out), *SMALL, "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "wan_nabla", *argv], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 180
        while _ok_count(out / "manifest.jsonl") < 2:
            assert proc.poll() is None, f"batch exited (rc {proc.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "batch made no progress"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    done_before = {r["index"]: r for r in read_manifest(out / "manifest.jsonl") if r["status"] == "ok"}
    assert 2 <= len(done_before) < 11
    stat_before = {i: (out / r["output"]).stat() for i, r in done_before.items()}
    with open(out / "manifest.jsonl", "ab") as f:  # what a kill in the middle of a record write leaves
        f.write(b'{"index": 10, "key": "0123", "status": "o')

    assert run(*argv) == 0

    lines = (out / "manifest.jsonl").read_bytes().split(b"\n")
    unreadable = [ln for ln in lines if ln.strip() and not _parses(ln)]
    assert len(unreadable) == 1  # only the injected fragment; new records did not glue onto it
    records = read_manifest(out / "manifest.jsonl")
    ok_per_index = {i: sum(r["index"] == i and r["status"] == "ok" for r in records) for i in range(11)}
    assert ok_per_index == dict.fromkeys(range(11), 1)
    last = last_by_index(out)
    assert sorted(last) == list(range(11))
    for i, rec in last.items():
        assert rec["status"] == ("skipped" if i in done_before else "ok"), (i, rec)
        assert sidecar(out, rec)["batch"]["key"] == rec["key"]
        video = probe_mp4(out / rec["output"])
        assert (video["frames"], video["width"], video["height"]) == (1, 16, 16)
    for i, st in stat_before.items():
        now = (out / last[i]["output"]).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"item {i} was redone"
    outputs = sorted(r["output"] for r in last.values())
    assert len(set(outputs)) == 11 and "clip-number-3-2.mp4" in outputs
    assert mp4_names(out) == outputs  # exactly one MP4 per item, no partial or hidden temp MP4
    assert sorted(os.listdir(out)) == sorted(outputs + [r["sidecar"] for r in last.values()] + ["manifest.jsonl"])


def _parses(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_resume_redoes_missing_partial_and_changed_items_only(tmp_path, capsys):
    """Deleted and truncated outputs are redone in place; a different prompt at the same index (same
    name) is a new item that gets a new file and leaves the old one alone; a third run does nothing."""
    rows = [{"prompt": p, "name": f"clip {p}"} for p in "abcd"]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    argv = ["batch", prompts, "--out-dir", out, *SMALL, "--guidance-scale", "1", "--quiet"]
    assert run(*argv) == 0
    first = last_by_index(out)
    (out / "clip-b.mp4").unlink()
    data = (out / "clip-c.mp4").read_bytes()
    (out / "clip-c.mp4").write_bytes(data[: len(data) // 2])
    write_jsonl(prompts, rows[:3] + [{"prompt": "e", "name": "clip d"}])
    keep = {n: (out / n).stat().st_mtime_ns for n in ("clip-a.mp4", "clip-d.mp4")}
    capsys.readouterr()

    assert run(*argv[:-1], "--dry-run") == 0
    plan = [ln.split() for ln in capsys.readouterr().out.splitlines()[1:5]]
    assert [(row[2], row[-1]) for row in plan] == [
        ("would-skip", "clip-a.mp4"),
        ("would-run", "clip-b.mp4"),
        ("would-run", "clip-c.mp4"),
        ("would-run", "clip-d-2.mp4"),
    ]
    assert run(*argv) == 0
    second = last_by_index(out)
    assert [second[i]["status"] for i in range(4)] == ["skipped", "ok", "ok", "ok"]
    assert [second[i]["output"] for i in range(4)] == ["clip-a.mp4", "clip-b.mp4", "clip-c.mp4", "clip-d-2.mp4"]
    assert second[3]["key"] != first[3]["key"]
    assert {n: (out / n).stat().st_mtime_ns for n in keep} == keep
    assert json.loads((out / "clip-d.json").read_text())["prompt"] == "d"  # the old video is still the old one
    for name in ("clip-b.mp4", "clip-c.mp4", "clip-d-2.mp4"):
        assert probe_mp4(out / name)["frames"] == 1

    stamps = {n: (out / n).stat().st_mtime_ns for n in mp4_names(out)}
    assert run(*argv) == 0
    assert [r["status"] for r in last_by_index(out).values()] == ["skipped"] * 4
    assert {n: (out / n).stat().st_mtime_ns for n in mp4_names(out)} == stamps


def test_resume_checks_the_sidecar_key_not_only_the_manifest(tmp_path):
    """Guards the resume rule's sidecar check: the manifest says ok and the MP4 decodes completely,
    but the sidecar beside it now belongs to something else (another key): the item is not done,
    and the foreign pair is never overwritten (the item is redone under a new name)."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "name": "clip a"}, {"prompt": "b", "name": "clip b"}])
    out = tmp_path / "out"
    argv = ["batch", prompts, "--out-dir", out, *SMALL, "--guidance-scale", "1", "--quiet"]
    assert run(*argv) == 0
    side = out / "clip-a.json"
    record = json.loads(side.read_text())
    record["batch"]["key"] = "0" * 20  # e.g. replaced by another run's output of the same name
    side.write_text(json.dumps(record))
    stamp = (out / "clip-a.mp4").stat().st_mtime_ns
    assert run(*argv) == 0
    again = last_by_index(out)
    assert [again[0]["status"], again[1]["status"]] == ["ok", "skipped"]
    assert again[0]["output"] == "clip-a-2.mp4"
    assert (out / "clip-a.mp4").stat().st_mtime_ns == stamp
    assert json.loads(side.read_text())["batch"]["key"] == "0" * 20


def test_manifest_reader_skips_truncated_line_and_writer_ends_it(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b'{"index": 0, "status": "ok"}\n{"index": 1, "sta')
    assert read_manifest(path) == [{"index": 0, "status": "ok"}]
    with ManifestWriter(path) as m:
        m.append({"index": 2, "status": "ok", "prompt": "nul\x00 and\nnewline"})
    assert read_manifest(path) == [
        {"index": 0, "status": "ok"},
        {"index": 2, "status": "ok", "prompt": "nul\x00 and\nnewline"},
    ]
    assert path.read_bytes().count(b"\n") == 3  # one line per record, the fragment on its own line


def test_stale_temp_files_of_own_outputs_are_removed(tmp_path):
    """Temps of killed writes of this batch's MP4s and sidecars go; other hidden files, other
    outputs' temps and the outputs themselves stay."""
    from wan_nabla.output.files import atomic_output

    with pytest.raises(RuntimeError):  # the real temp-file naming, not a hand-written imitation
        with atomic_output(tmp_path / "a.mp4") as tmp:
            real_temp = tmp.name
            raise RuntimeError("killed")
    names = [
        "a.mp4",
        real_temp,
        ".a.mp4.ab_d1234.tmp.mp4",
        ".a.json.x1y2z3w4.tmp.json",
        ".other.mp4.abcd1234.tmp.mp4",
        ".a.mp4.tmp.mp4",
        ".hidden",
        "a.json",
    ]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    assert remove_stale_temps(tmp_path, {"a.mp4"}) == 3
    assert sorted(os.listdir(tmp_path)) == sorted(
        [".hidden", ".a.mp4.tmp.mp4", ".other.mp4.abcd1234.tmp.mp4", "a.json", "a.mp4"]
    )


def test_batch_records_and_outputs_are_fsynced_when_written(tmp_path, monkeypatch):
    """Guards the manifest's and the outputs' durability (removing every fsync broke no test):
    every manifest record is on disk (fsynced, with all records before it) before the run goes
    on, the MP4 and the sidecar are fsynced as complete temp files before their rename, and the
    output directory is fsynced after the MP4 is in it."""
    from wan_nabla.output.files import temp_target

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a fox", "name": "fox"}, {"prompt": "bad", "frames": 2}])
    out = tmp_path / "out"
    events = fsync_recorder(monkeypatch)
    assert run("batch", prompts, "--out-dir", out, *SMALL, "--guidance-scale", "1", "--quiet") == 1
    lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    synced = [e["content"] for e in events if e["path"] == str(out / "manifest.jsonl")]
    assert len(lines) == 2 and [b"".join(lines[:k]) for k in (1, 2)] == synced
    temps = {temp_target(Path(e["path"]).name): e for e in events if not e["dir"]}
    assert set(temps) == {"fox.mp4", "fox.json", None}  # None: the manifest, not a temp file
    assert temps["fox.mp4"]["content"] == (out / "fox.mp4").read_bytes()
    assert temps["fox.json"]["content"] == (out / "fox.json").read_bytes()
    assert any(e["dir"] and e["path"] == str(out) and "fox.mp4" in e["listing"] for e in events)


# ---- names ---------------------------------------------------------------------------------------
def test_adversarial_prompts_and_names_stay_inside_out_dir(tmp_path):
    """Traversal, separators, 500 characters, emoji, NUL/newline escapes, reserved device names,
    4-byte letters, bidi controls and duplicates all give safe, unique names inside out-dir; an
    existing foreign file and a symlink pointing outside are never written through."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "same-prompt.mp4").write_bytes(b"not ours")
    (tmp_path / "outside.txt").write_bytes(b"precious")
    os.symlink(tmp_path / "outside.txt", out / "etc-passwd.mp4")
    rows = [
        {"prompt": "../../etc/passwd"},
        {"prompt": "a/b\\c"},
        {"prompt": "x" * 500},
        {"prompt": "🦊🎬 fox"},
        {"prompt": "🦊🎬"},
        {"prompt": "nul\u0000byte\nnewline"},
        {"prompt": "a fox", "name": "CON"},
        {"prompt": "a fox", "name": "../../../tmp/evil"},
        {"prompt": "a fox", "name": "/abs/olute"},
        {"prompt": "same prompt"},
        {"prompt": "same prompt"},
        {"prompt": "𠀀" * 200},
        {"prompt": "\u202eevil\u200b.mp4"},
    ]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    assert "\\u0000" in prompts.read_text() and "\\n" in prompts.read_text()
    before = sorted(os.listdir(tmp_path))
    assert run("batch", prompts, "--out-dir", out, *SMALL, "--guidance-scale", "1", "--quiet") == 0

    last = last_by_index(out)
    names = [last[i]["output"] for i in range(len(rows))]
    assert names[:2] == ["etc-passwd-2.mp4", "a-b-c.mp4"]
    assert names[3:11] == [
        "fox.mp4",
        "video.mp4",
        "nul-byte-newline.mp4",
        "con-video.mp4",
        "tmp-evil.mp4",
        "abs-olute.mp4",
        "same-prompt-2.mp4",
        "same-prompt-3.mp4",
    ]
    assert len(set(names)) == len(names)
    for name in names:
        path = out / name
        assert path.resolve().parent == out.resolve()
        assert not any(c in name for c in "/\\\x00\n\r\u202e\u200b") and not name.startswith(".")
        assert len(name.encode()) <= 130 and name.split(".")[0] not in RESERVED  # Windows ignores the extension
        assert probe_mp4(path)["frames"] == 1
    assert len(names[2]) == 60 + 4
    assert (out / "same-prompt.mp4").read_bytes() == b"not ours"
    assert os.readlink(out / "etc-passwd.mp4") == str(tmp_path / "outside.txt")
    assert (tmp_path / "outside.txt").read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == before  # nothing created next to (or above) out-dir
    assert last[5]["prompt"] == "nul\x00byte\nnewline"  # the prompt itself is kept verbatim


# ---- seeds ---------------------------------------------------------------------------------------
def test_seed_derivation_is_stable_and_documented():
    """sha256(f"{base}:{index}")[:8] big-endian mod 2**31; pinned so a change cannot slip through."""
    ref = int.from_bytes(hashlib.sha256(b"5:3").digest()[:8], "big") % 2**31
    assert batch_plan.derive_seed(5, 3) == ref
    assert batch_plan.derive_seed(0, 0) == 1483348161
    seeds = {batch_plan.derive_seed(b, i) for b in range(3) for i in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**31 for s in seeds)


def test_batch_seeds_are_recorded_and_reproduce_the_video_alone(tmp_path):
    """The seed in the manifest and sidecar regenerates the same frames with `generate`."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a fox in snow"}, {"prompt": "a fox in snow", "seed": 7}])
    out = tmp_path / "out"
    flags = ["--model", "tiny", "--size", "32x32", "--frames", "5", "--steps", "2", "--quiet"]
    assert run("batch", prompts, "--out-dir", out, "--seed", "5", *flags) == 0
    last = last_by_index(out)
    assert [last[0]["seed"], last[1]["seed"]] == [batch_plan.derive_seed(5, 0), 7]
    assert [sidecar(out, last[i])["seed"] for i in (0, 1)] == [batch_plan.derive_seed(5, 0), 7]

    alone = tmp_path / "alone.mp4"
    assert run("generate", "--prompt", "a fox in snow", "--seed", last[0]["seed"], *flags, "--output", alone) == 0
    assert decoded(alone) == decoded(out / last[0]["output"])
    assert decoded(out / last[1]["output"]) != decoded(out / last[0]["output"])  # the comparison can fail


# ---- failure isolation ---------------------------------------------------------------------------
def test_out_of_memory_and_other_errors_fail_only_their_item(tmp_path, monkeypatch, capsys):
    """A CUDA OOM (and any other exception) in one item is recorded with a clear message, memory is
    released (gc + CUDA cache), no file is left for it, and the following items still run."""
    real_generate = VideoGenerator.generate

    def flaky(self, prompt, *args, **kwargs):
        if "boom" in prompt:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")
        if "crash" in prompt:
            raise RuntimeError("something else\nbroke")
        return real_generate(self, prompt, *args, **kwargs)

    released = []
    monkeypatch.setattr(VideoGenerator, "generate", flaky)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append("cache"))
    monkeypatch.setattr(gc, "collect", lambda *a: released.append("gc") or 0)
    prompts = tmp_path / "p.txt"
    prompts.write_text("first fine\nboom\ncrash\nlast fine\n")
    out = tmp_path / "out"
    assert run("batch", prompts, "--out-dir", out, *SMALL, "--device", "cpu", "--quiet") == 1
    last = last_by_index(out)
    assert [last[i]["status"] for i in range(4)] == ["ok", "failed", "failed", "ok"]
    assert last[1]["error"].startswith("line 2: out of memory: CUDA out of memory. Tried to allocate 20.00 GiB")
    assert "lower size or frames" in last[1]["error"]
    assert last[2]["error"] == "line 3: RuntimeError: something else broke"
    assert released == ["gc", "cache", "gc", "cache"]
    assert mp4_names(out) == ["first-fine.mp4", "last-fine.mp4"]
    assert capsys.readouterr().out.startswith("batch: 2 ok, 2 failed, 0 skipped")


# ---- exit code 2 ---------------------------------------------------------------------------------
def _bad_invocations(tmp_path: Path) -> dict[str, list]:
    good = tmp_path / "good.txt"
    good.write_text("a fox\n")
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\na fox\n")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("generation:\n  frames: 6\n")
    comments = tmp_path / "comments.txt"
    comments.write_text("# nothing\n")
    dup = tmp_path / "dup.yaml"
    dup.write_text("generation: {steps: 2, steps: 3}\n")
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("a fox\n".encode("utf-16"))
    return {
        "no gpu": [good, "--device", "cuda"],
        "steps the sampler cannot run": [good, "--steps", "400"],
        "duplicate yaml key": [good, "--config", dup],
        "utf-16 prompt file": [utf16],
        "missing prompt file": [tmp_path / "missing.txt"],
        "csv extension": [csv],
        "only comments": [comments],
        "missing config": [good, "--config", tmp_path / "nope.yaml"],
        "invalid config": [good, "--config", bad_cfg],
        "bad size": [good, "--size", "100x100"],
        "bad frames": [good, "--frames", "0"],
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing prompt file",
        "csv extension",
        "only comments",
        "missing config",
        "invalid config",
        "bad size",
        "bad frames",
        "no gpu",
        "steps the sampler cannot run",
        "duplicate yaml key",
        "utf-16 prompt file",
    ],
)
@pytest.mark.parametrize("out_exists", [False, True])
def test_bad_invocation_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, case, out_exists):
    """Whole-run problems (command line, config, prompt file, device, sampler limits of the
    defaults) are exit 2 with one line, before a model is loaded or anything is written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _no_load(monkeypatch, lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    rc = run("batch", *_bad_invocations(tmp_path)[case], "--out-dir", out, "--model", "tiny", "--quiet")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("wan-nabla: error: "), err
    assert (os.listdir(out) == []) if out_exists else not out.exists()


def test_unloadable_model_leaves_no_directory_behind(tmp_path, capsys, tiny_checkpoint):
    """Guards exit-2 cleanliness: a model that passes the preflight but fails to load removed
    the manifest and --out-dir itself but left the parents the run had created."""
    import shutil

    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "p.txt").write_text("a fox\n")
    out = tmp_path / "new" / "a" / "b"
    assert run("batch", tmp_path / "p.txt", "--out-dir", out, "--model", model, "--quiet") == 2
    assert "cannot load model directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "p.txt"]


def test_10000_equal_prompts_plan_in_seconds(tmp_path, capsys):
    """Guards against quadratic naming: a dry run of 10,000 equal prompts took ~11 minutes on
    the 2-core CI machine (every name probed every earlier suffix); now it is linear (a few
    seconds), with names -2 ... -10000 in order."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox in the snow\n" * 10_000)
    t0 = time.perf_counter()
    assert run("batch", prompts, "--out-dir", tmp_path / "out", "--model", "tiny", "--dry-run") == 0
    elapsed = time.perf_counter() - t0
    lines = capsys.readouterr().out.splitlines()
    print(f"planned 10,000 equal prompts in {elapsed:.1f} s")
    assert elapsed < 30, elapsed
    assert lines[1].split()[-1] == "a-red-fox-in-the-snow.mp4"
    assert lines[-2].split()[-1] == "a-red-fox-in-the-snow-10000.mp4"
    assert lines[-1].startswith("dry run: 10000 items: 10000 would run")


def test_out_dir_that_is_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a fox\n")
    (tmp_path / "out").write_text("keep me")
    assert run("batch", tmp_path / "p.txt", "--out-dir", tmp_path / "out", *SMALL) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "keep me"


def test_second_batch_on_a_locked_out_dir_exits_2(tmp_path, capsys, monkeypatch):
    """Two batches in one directory would race for names and redo each other's items."""
    _no_load(monkeypatch, lambda *a, **k: pytest.fail("loaded a model while locked out"))
    (tmp_path / "p.txt").write_text("a fox\n")
    out = tmp_path / "out"
    out.mkdir()
    with ManifestWriter(out / "manifest.jsonl"):
        assert run("batch", tmp_path / "p.txt", "--out-dir", out, *SMALL, "--quiet") == 2
    assert "locked by another running batch" in capsys.readouterr().err
    assert os.listdir(out) == ["manifest.jsonl"] and (out / "manifest.jsonl").read_bytes() == b""


# ---- long runs -----------------------------------------------------------------------------------
def test_soak_script_smoke(tmp_path):
    """The 1,000-item soak (benchmarks/jobs/batch_soak.py) runs at a tiny size: its exactness checks pass
    on a correct batch and catch a manifest line that is missing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("batch_soak", ROOT / "benchmarks" / "jobs" / "batch_soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    res = soak.soak(3, tmp_path)
    assert res["exit_code"] == 0 and res["manifest"]["exact"] and res["manifest"]["records"] == 3, res
    manifest = tmp_path / "batch" / "manifest.jsonl"
    manifest.write_bytes(b"".join(manifest.read_bytes().splitlines(keepends=True)[:2]))
    assert not soak.check_manifest(tmp_path / "batch", 3)["exact"]


@pytest.mark.slow
def test_200_items_keep_memory_flat(tmp_path):
    """Guards against per-item leaks over a long unattended run.

    RSS is sampled after every item; the bound is on growth from item 20 (allocator and caches
    warmed up) to item 200. Measured growth on the tiny model is under 2 MB; transient peaks of ~16
    MB come and go. 48 MB over 180 items fails for any native leak of >= 0.27 MB per item (one
    leaked 480p frame is 1.2 MB; a real 81-frame video, 97 MB). Python-level leaks too small for
    RSS at this size (a kept GenerationResult, prompt embeddings, latents) are caught exactly: no
    GenerationResult may be alive after its item, and the number of live tensors must not grow."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}: a small animal number {i} walking\n" for i in range(200)))
    out = tmp_path / "out"
    args = cli.build_parser().parse_args(["batch", str(prompts), "--out-dir", str(out), *SMALL, "--quiet"])
    proc = psutil.Process()
    rss: list[int] = []
    live: dict[int, tuple[int, int]] = {}

    def on_record(rec):
        rss.append(proc.memory_info().rss)
        if len(rss) in (20, 200):
            gc.collect()
            objs = gc.get_objects()
            types = [type(o) for o in objs]  # type(), not isinstance: no attribute lookups on lazy modules
            live[len(rss)] = (
                sum(t is GenerationResult for t in types),
                sum(issubclass(t, torch.Tensor) for t in types),
            )

    t0 = time.perf_counter()
    req = cli.request_from_args(BatchRequest, args)
    assert batch.run_batch(preflight.plan_batch(req), req, on_record=on_record) == 0
    elapsed = time.perf_counter() - t0
    assert len(rss) == 200
    growth_mb = (rss[-1] - rss[19]) / 2**20
    print(
        f"200 items in {elapsed:.0f}s; RSS after item 20 {rss[19] / 2**20:.0f} MB, growth to item 200 "
        f"{growth_mb:.1f} MB, peak {max(rss[19:]) / 2**20:.0f} MB; live (results, tensors) {live}"
    )
    assert growth_mb < 48, f"RSS grew {growth_mb:.1f} MB over 180 items"
    assert live[20][0] == 0 and live[200][0] == 0
    assert live[200][1] <= live[20][1], live
    last = last_by_index(out)
    assert all(last[i]["status"] == "ok" for i in range(200))
    assert len(mp4_names(out)) == 200 and all((out / last[i]["output"]).stat().st_size > 0 for i in range(200))
