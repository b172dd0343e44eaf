"""`wan-nabla batch --engine ray` on a local Ray cluster (CPU, tiny model): every item exactly
once, the same names/seeds/keys/videos as a local batch, resume across engines, an actor killed
mid-item, a driver killed mid-run, bad lines, --ray-transfer.

One cluster for the module (ray.init(num_cpus=2): two CPU actors; a 200 MB object store so the
2-core, shared CI machine is not asked for Ray's default 30% of RAM); every batch connects to it
and kills its own actors at its end. Runs go through `wan_nabla.cli.main` in-process, except the
driver-kill test, which needs a process to SIGKILL (it joins the same cluster by address).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.outputs import decoded, last_by_index, mp4_names, write_jsonl
from wan_nabla import cli
from wan_nabla.batch import ray_engine
from wan_nabla.batch.manifest import read_manifest
from wan_nabla.output.video import probe_mp4

ray = pytest.importorskip("ray")

SMALL = ["--model", "tiny", "--size", "16x16", "--frames", "1", "--steps", "1"]
SLOW = {
    "size": "64x64",
    "frames": 9,
    "steps": 200,
}  # seconds on any CPU (UniPC at shift 5 allows 250): killed 0.75 s in, mid-item


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def cluster():
    """The GCS address of a 2-CPU local cluster, shut down after the module."""
    import logging

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def oks(out: Path) -> dict[int, list[dict]]:
    res: dict[int, list[dict]] = {}
    for r in read_manifest(out / "manifest.jsonl"):
        if r["status"] == "ok":
            res.setdefault(r["index"], []).append(r)
    return res


def assert_clean(out: Path) -> None:
    """Exactly one MP4 + sidecar per last ok/skipped record, the manifest, nothing else (no temp, no probe)."""
    last = last_by_index(out)
    files = [f for r in last.values() if r["status"] != "failed" for f in (r["output"], r["sidecar"])]
    assert sorted(os.listdir(out)) == sorted(files + ["manifest.jsonl"])


# ---- fast checks (no cluster) --------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--ray-actors", "0"], "--ray-actors: 0 is not allowed"),
    (["--max-retries", "-1"], "--max-retries: -1 is not allowed"),
    (["--ulysses-degree", "2"], "--engine ray runs one pipeline per actor"),
    (["--device", "cuda:1"], "--device cuda:1: under --engine ray"),
])  # fmt: skip
def test_bad_ray_options_exit_2_and_write_nothing(tmp_path, capsys, flags, message):
    (tmp_path / "p.txt").write_text("a fox\n")
    out = tmp_path / "out"
    assert run("batch", tmp_path / "p.txt", "--out-dir", out, *SMALL, "--engine", "ray", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_base_install_does_not_import_ray():
    """Ray is imported only inside ray_engine's functions: the CLI and a local batch never need it."""
    code = "import sys, wan_nabla.cli, wan_nabla.batch.run, wan_nabla.batch.ray_engine; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_ray_extra_is_the_tested_range_and_ci_installs_it():
    """The install hint of RayOptions names the extra's range; CI (the dev extra) installs it."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["ray"] == [ray_engine.RAY_REQUIREMENT] and ray_engine.RAY_REQUIREMENT in extras["dev"]


def test_actor_on_a_node_without_the_shared_out_dir_refuses_to_start(tmp_path):
    """Guards the shared-storage check: an actor that does not see the driver's probe file (its
    node has another disk at that path) reports one line instead of writing where nobody looks."""
    actor = ray_engine.BatchActor(None, "tiny", str(tmp_path), ray_engine.PROBE_PREFIX + "0123", False)
    assert actor.gen is None and "must be storage shared by every node" in actor.error
    assert "--ray-transfer" in actor.error


# ---- on the cluster --------------------------------------------------------------------------------
@pytest.mark.slow
def test_20_items_on_2_actors_each_once_and_a_bad_line_fails_alone(tmp_path, cluster, capsys):
    rows = [{"prompt": f"clip {i % 17}"} for i in range(20)]  # 3 repeated prompts: -2 names
    rows.insert(7, '{"prompt": "broken",')
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    assert run("batch", prompts, "--out-dir", out, *SMALL, "--engine", "ray", "--ray-actors", "2") == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("batch: 20 ok, 1 failed, 0 skipped")
    assert "failed=1" in captured.err and "/min" in captured.err  # the bar: failures, per-actor throughput
    assert "ray actor 0 on " in captured.err and "ray actor 1 on " in captured.err
    records = read_manifest(out / "manifest.jsonl")
    assert len(records) == 21
    assert sorted(r["index"] for r in records) == list(range(21))  # each item exactly one record
    bad = [r for r in records if r["status"] == "failed"]
    assert [(b["index"], b["line"]) for b in bad] == [(7, 8)] and bad[0]["error"].startswith("line 8: not valid JSON")
    good = [r for r in records if r["status"] == "ok"]
    assert {r["worker"]["actor"] for r in good} <= {0, 1} and {r["worker"]["attempt"] for r in good} == {1}
    assert len({r["output"] for r in good}) == 20 and "clip-0-2.mp4" in {r["output"] for r in good}
    for r in good:
        assert json.loads((out / r["sidecar"]).read_text())["batch"]["key"] == r["key"]
        assert probe_mp4(out / r["output"])["frames"] == 1
    assert_clean(out)


@pytest.mark.slow
def test_ray_and_local_give_the_same_batch_and_resume_each_other(tmp_path, cluster):
    """Same names, seeds, keys and decoded frames from both engines; a local batch resumes a Ray
    directory and a Ray batch (--ray-transfer: the driver writes) resumes a local one, redoing
    only what is missing, with the same frames again."""
    rows = [{"prompt": "a fox"}, {"prompt": "a boat", "seed": 7}, {"prompt": "a fox"},
            {"prompt": "a tree", "size": "32x16", "frames": 5}, {"prompt": "a cat", "name": "Kitty"}]  # fmt: skip
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    flags = [*SMALL, "--size", "32x32", "--steps", "2", "--quiet"]  # 16x16 frames of two seeds can agree
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"
    assert run("batch", prompts, "--out-dir", ray_out, *flags, "--engine", "ray") == 0
    assert run("batch", prompts, "--out-dir", local_out, *flags) == 0
    by_ray, by_local = last_by_index(ray_out), last_by_index(local_out)
    fields = ("key", "seed", "output", "sidecar", "name", "settings")
    assert [[by_ray[i][f] for f in fields] for i in range(5)] == [[by_local[i][f] for f in fields] for i in range(5)]
    frames = {i: decoded(local_out / r["output"]) for i, r in by_local.items()}
    assert {i: decoded(ray_out / r["output"]) for i, r in by_ray.items()} == frames
    assert frames[0] != frames[2]  # the comparison can fail: another seed, other frames
    side = json.loads((ray_out / by_ray[0]["sidecar"]).read_text())
    assert side["output"] == str((ray_out / by_ray[0]["output"]).absolute())

    for out in (ray_out, local_out):  # what each engine must redo on the other's directory
        (out / by_ray[1]["output"]).unlink()
        data = (out / by_ray[3]["output"]).read_bytes()
        (out / by_ray[3]["output"]).write_bytes(data[: len(data) // 2])
    assert run("batch", prompts, "--out-dir", ray_out, *flags) == 0  # local resumes Ray's
    assert run("batch", prompts, "--out-dir", local_out, *flags, "--engine", "ray", "--ray-transfer") == 0
    for out in (ray_out, local_out):
        last = last_by_index(out)
        assert [last[i]["status"] for i in range(5)] == ["skipped", "ok", "skipped", "ok", "skipped"], out
        assert [last[i]["output"] for i in range(5)] == [by_ray[i]["output"] for i in range(5)]
        assert {i: decoded(out / r["output"]) for i, r in last.items()} == frames
        assert_clean(out)
    transferred = last_by_index(local_out)[1]
    assert transferred["timings"]["transfer_s"] > 0
    side = json.loads((local_out / transferred["sidecar"]).read_text())
    assert (
        side["output"] == str((local_out / transferred["output"]).absolute())
        and side["batch"]["key"] == transferred["key"]
    )


@pytest.mark.slow
def test_killed_actor_item_is_retried_then_failed_past_max_retries(tmp_path, cluster, monkeypatch):
    """An actor killed mid-item (ray.kill): its item runs again on another actor and completes
    once; an item whose actor is killed on every attempt is recorded failed after --max-retries,
    with the reason, and leaves no file; the other items are unaffected."""
    rows = [{"prompt": f"quick {i}"} for i in range(4)]
    rows[1:1] = [{"prompt": "slow once", **SLOW}, {"prompt": "slow always", **SLOW}]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    kills: list[tuple[str, int]] = []
    real = ray_engine._Pool._dispatch

    def dispatch(self, slot, p):
        real(self, slot, p)
        first = not any(k[0] == "slow once" for k in kills)
        if p.item.prompt == "slow always" or (p.item.prompt == "slow once" and first):
            kills.append((p.item.prompt, slot.id))
            threading.Timer(0.75, ray.kill, [slot.handle]).start()  # mid-item: it takes several seconds

    monkeypatch.setattr(ray_engine._Pool, "_dispatch", dispatch)
    rc = run("batch", prompts, "--out-dir", out, *SMALL, "--engine", "ray", "--max-retries", "1", "--quiet")
    assert rc == 1
    records = read_manifest(out / "manifest.jsonl")
    assert sorted(r["index"] for r in records) == list(range(6))  # one record per item: no double publish
    last = last_by_index(out)
    assert [last[i]["status"] for i in range(6)] == ["ok", "ok", "failed", "ok", "ok", "ok"]
    assert last[1]["worker"]["attempt"] == 2 and last[1]["worker"]["actor"] != kills[0][1]
    assert probe_mp4(out / last[1]["output"])["frames"] == 9
    assert (
        last[2]["worker"]["attempt"] == 2
        and "died 2 time(s)" in last[2]["error"]
        and "--max-retries 1" in last[2]["error"]
    )
    assert [k[0] for k in kills].count("slow always") == 2
    assert_clean(out)


@pytest.mark.slow
def test_killed_driver_then_the_same_command_resumes(tmp_path, cluster):
    """SIGKILL of the driver mid-run: its actors go with it; rerunning the same command completes
    every item with exactly one ok record, items done before the kill are skipped untouched."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"clip number {i}\n" for i in range(10)))
    out = tmp_path / "out"
    argv = ["batch", str(prompts), "--out-dir", str(out), *SMALL, "--quiet", "--engine", "ray"]
    env = {**os.environ, "RAY_ADDRESS": cluster}
    proc = subprocess.Popen(
        [sys.executable, "-m", "wan_nabla", *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while len(oks(out)) < 2:
            assert proc.poll() is None, f"batch exited (rc {proc.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "batch made no progress"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = oks(out)
    assert 2 <= len(before) < 10
    stats = {i: (out / r[0]["output"]).stat().st_mtime_ns for i, r in before.items()}

    assert run(*argv) == 0
    after = oks(out)
    assert sorted(after) == list(range(10)) and all(len(v) == 1 for v in after.values())
    last = last_by_index(out)
    assert all(last[i]["status"] == ("skipped" if i in before else "ok") for i in range(10))
    assert {i: (out / last[i]["output"]).stat().st_mtime_ns for i in before} == stats
    assert len(mp4_names(out)) == 10
    assert_clean(out)
