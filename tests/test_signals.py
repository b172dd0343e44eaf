"""SIGTERM (docker stop, schedulers) ends generate and batch like Ctrl-C: clean, with exit 143.

The runs are real processes (a signal has to arrive from outside): a small driver script makes
the MP4 encoder slow after it has written a complete temp file, the test waits for that moment
and sends SIGTERM, then looks at what is left on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import ROOT
from wan_nabla.batch.manifest import read_manifest
from wan_nabla.interrupts import Interrupted, deferred, handle_signals

SMALL = ["--model", "tiny", "--size", "16x16", "--frames", "1", "--steps", "1", "--guidance-scale", "1", "--quiet"]

# Writes a real temp MP4, then (for the N-th video of the process) signals readiness and hangs the
# way a slow encoder would, inside atomic_output: the temp file exists when SIGTERM arrives.
DRIVER = """
import os, sys, time
import wan_nabla.output.video as video
real, calls = video.write_mp4, []
def slow(frames, path, fps=16, **kw):
    real(frames, path, fps=fps, **kw)
    calls.append(path)
    if len(calls) == int(os.environ["HANG_AT"]):
        open(os.environ["READY"], "w").close()
        time.sleep(600)
video.write_mp4 = slow
from wan_nabla.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_and_terminate(tmp_path: Path, argv: list[str], hang_at: int) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "READY": str(ready), "HANG_AT": str(hang_at)}
    proc = subprocess.Popen(
        [sys.executable, str(driver), *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "never reached the write"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_sigterm_during_generate_write_leaves_nothing_and_exits_143(tmp_path):
    """Guards: SIGTERM killed the process at once (exit -15), leaving the hidden temp MP4 and
    the directories it had created; now it is handled like Ctrl-C: temp file removed, new
    directories removed, one line on stderr, exit 143."""
    out = tmp_path / "new" / "dir" / "fox.mp4"
    res = _run_and_terminate(tmp_path, ["generate", "--prompt", "a fox", "--output", str(out), *SMALL], hang_at=1)
    assert res.returncode == 143, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == "wan-nabla: terminated (SIGTERM)"
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["driver.py", "ready"]


@pytest.mark.slow
def test_sigterm_during_batch_keeps_manifest_consistent_and_resumes(tmp_path):
    """Guards: SIGTERM in the middle of item 2's write ends the batch with exit 143, leaves no
    temp file, and a manifest whose every line is a whole record (item 1 ok, nothing for item 2);
    the same command then finishes the rest without redoing item 1."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("first clip\nsecond clip\nthird clip\n")
    argv = ["batch", str(prompts), "--out-dir", str(tmp_path / "out"), *SMALL]
    res = _run_and_terminate(tmp_path, argv, hang_at=2)
    assert res.returncode == 143, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == "wan-nabla: terminated (SIGTERM)"
    out = tmp_path / "out"
    raw = (out / "manifest.jsonl").read_bytes()
    assert raw.endswith(b"\n") and all(isinstance(json.loads(ln), dict) for ln in raw.splitlines())
    records = read_manifest(out / "manifest.jsonl")
    assert [(r["index"], r["status"]) for r in records] == [(0, "ok")]
    assert sorted(os.listdir(out)) == ["first-clip.json", "first-clip.mp4", "manifest.jsonl"]
    stamp = (out / "first-clip.mp4").stat().st_mtime_ns

    proc = subprocess.run(
        [sys.executable, "-m", "wan_nabla", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = {r["index"]: r["status"] for r in read_manifest(out / "manifest.jsonl")}
    assert last == {0: "skipped", 1: "ok", 2: "ok"}
    assert (out / "first-clip.mp4").stat().st_mtime_ns == stamp


def test_deferred_holds_a_signal_until_the_critical_section_ends():
    """Guards the manifest's protection: a SIGTERM inside deferred() is raised only when the
    block is done (a record is never cut in half), then as Interrupted with exit code 143."""
    done = []
    before = signal.getsignal(signal.SIGTERM)
    with handle_signals():
        with pytest.raises(Interrupted) as err:
            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now; it must not have raised
                done.append("block finished")
    assert done == ["block finished"] and err.value.exit_code == 143 and str(err.value) == "terminated (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_manifest_record_is_fsynced_before_a_signal_stops_the_run(tmp_path, monkeypatch):
    """Guards the manifest's critical section: a SIGTERM that arrives while a record is being
    written (here: inside its fsync) is raised only after the record is written and fsynced."""
    from wan_nabla.batch.manifest import ManifestWriter

    calls = []
    real = os.fsync

    def fsync_with_signal(fd):
        os.kill(os.getpid(), signal.SIGTERM)
        calls.append("signalled")
        real(fd)
        calls.append("fsynced")

    with handle_signals(), ManifestWriter(tmp_path / "manifest.jsonl") as m:
        monkeypatch.setattr(os, "fsync", fsync_with_signal)
        with pytest.raises(Interrupted):
            m.append({"index": 0, "status": "ok"})
    assert calls == ["signalled", "fsynced"]
    assert read_manifest(tmp_path / "manifest.jsonl") == [{"index": 0, "status": "ok"}]
