"""Several processes (gloo, CPU) give what one process gives: Ulysses 2 and 4, CFG parallel and
both together, for NABLA, STA (with a dense step), NABLA+STA (with a dense layer) and full
attention, on a padded grid with uneven shards; a data-parallel batch through the real
`torchrun ... -m wan_nabla batch` runs every item exactly once into one manifest; bad parallel
combinations exit 2 with the same line on every rank, before any process group exists.

Grid: 208x80 px, 9 frames -> latents [1, 16, 3, 10, 26] -> patch grid 3 x 5 x 13, padded to 3 x 8 x
16 = 6 tiles (384 tokens in tile order, 195 in raster order for `full`), so shards are uneven
(Ulysses 4: 2, 2, 1, 1 tiles; raster: 49, 49, 49, 48 tokens). The tiny model with 4 heads of 16
channels (same weights as the 2-head one) lets 4 ranks split heads. The 2-rank layouts run through
the GPU script's CPU mode (benchmarks/harness/multigpu.py), the 4-rank ones through tests/support/dist_worker.py.
CPU time is mostly process start-up and one flex compile per (shape, mask kind) per process, so
the cases are grouped to reuse them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.harness.multigpu import EXACT_ATTENTION
from tests.support import ROOT
from wan_nabla import cli
from wan_nabla.app import with_device
from wan_nabla.batch.manifest import read_manifest
from wan_nabla.config import ConfigError, RunConfig
from wan_nabla.model_source import ModelFacts, model_facts
from wan_nabla.pipeline import VideoGenerator
from wan_nabla.preflight import check_parallel
from wan_nabla.tiny import build_tiny_pipeline

HEADS = 4
GEN = {"size": [208, 80], "frames": 9, "steps": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n: int, *args: str, cwd: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(n),
        "--master-port",
        str(_free_port()),
        *args,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, timeout: float, ok: bool = True) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout}s:\n{out[-3000:]}")
    assert (proc.returncode == 0) == ok, out[-3000:]
    return out


def _reference(att: dict) -> tuple[np.ndarray, dict]:
    """One process, no parallel context: the result every layout must reproduce."""
    cfg = RunConfig.from_mapping({"attention": att, "generation": {"dtype": "float32", "device": "cpu"}})
    gen = VideoGenerator(build_tiny_pipeline(seed=0, heads=HEADS), cfg, torch.device("cpu"), "tiny")
    res = gen.generate("a fox in the snow", progress=False, **GEN)
    gen.close()
    return res.latents.numpy(), res.attention


@pytest.mark.slow
def test_ulysses_2_and_cfg_parallel_equal_one_process_in_the_gpu_script(tmp_path):
    """Guards: Ulysses over 2 ranks (3 tiles / 98+97 raster tokens and 2 heads per rank) and CFG
    parallel over 2 ranks (one branch per rank, exchanged every step) reproduce the one-process
    latents and densities for NABLA, STA with a dense step, NABLA+STA with a dense layer and full
    attention (the GPU script's own exactness check, run by its CPU mode, which must also produce
    timing rows with separately measured communication, so the GPU run does not die on a typo)."""
    out = tmp_path / "res"
    proc = _torchrun(
        2, "-m", "benchmarks.harness.multigpu", "--quick", "--device", "cpu", "--out", str(out), cwd=tmp_path
    )
    text = _wait(proc, timeout=600)
    res = json.loads((out / "multigpu.json").read_text())
    rows = {(r["layout"], r["attention"]): r for r in res["exactness"]}
    assert set(rows) == {(lay, att) for lay in ("ulysses2", "cfg2") for att in EXACT_ATTENTION}
    for key, r in rows.items():
        assert r["rel_l2"] < 2e-6 and r["max_abs"] < 2e-5, (key, r)
        assert r["density_equal"], (key, r)
        assert r["frames"] == [9, 80, 208, 3]  # rank 0 decoded
        sparse_steps = r["density_one_rank"][1:] if "dense step" in key[1] else r["density_one_rank"]
        assert (max(sparse_steps) < 0.9) == (key[1] != "full"), (key, r)  # the sparse path really ran
    timing = {(r["layout"], r["attention"]): r for r in res["timing"]}
    assert set(timing) == {(lay, att) for lay in ("1gpu", "ulysses2", "cfg2") for att in ("full", "sta 1-1-1")}
    assert all((r["comm_s"] > 0) == (r["layout"] != "1gpu") and r["step_s"] > 0 for r in timing.values())
    assert timing[("1gpu", "full")]["speedup"] == 1.0 and res["env"]["world_size"] == 2
    assert "| tiny-4h | 208x80x9 | sta 1-1-1 | ulysses2 |" in (out / "multigpu.md").read_text()
    assert "| layout | attention | max abs diff |" in text  # the table is printed last


@pytest.mark.slow
def test_ulysses_4_and_cfg_parallel_with_ulysses_2_equal_one_process(tmp_path):
    """Guards: 4 ranks with uneven shards (2, 2, 1, 1 tiles; 49, 49, 49, 48 raster tokens; one head
    each) for every attention type, CFG parallel whose branches are each split by Ulysses 2
    (CFG pairs across Ulysses groups: ranks 0+2 and 1+3), and Ulysses 4 with compiled blocks
    (attention and its all-to-alls as one opaque op) reproduce the one-process latents."""
    cases = [
        {"name": f"ulysses4/{att}", "attention": a, "parallel": {"ulysses_degree": 4}}
        for att, a in EXACT_ATTENTION.items()
    ]
    cases.append(
        {
            "name": "cfg2xulysses2/full",
            "attention": {"type": "full"},
            "parallel": {"ulysses_degree": 2, "cfg_parallel": True},
        }
    )
    # compiled blocks: the all-to-alls and attention run as one opaque op, the rest compiled
    cases.append(
        {
            "name": "ulysses4+compile/full",
            "attention": {"type": "full"},
            "parallel": {"ulysses_degree": 4},
            "speed": {"compile": "blocks"},
        }
    )
    spec = json.dumps({"heads": HEADS, "generation": GEN, "cases": cases})
    proc = _torchrun(4, str(ROOT / "tests" / "support" / "dist_worker.py"), str(tmp_path), spec, cwd=tmp_path)
    refs = {att: _reference(a) for att, a in EXACT_ATTENTION.items()}  # computed while the ranks start
    _wait(proc, timeout=600)
    latents = np.load(tmp_path / "latents.npz")
    results = json.loads((tmp_path / "results.json").read_text())
    for case in cases:
        att = case["name"].split("/")[1]
        ref_latents, ref_attention = refs[att]
        got = results[case["name"]]
        if "compile" in case["name"]:
            assert got["speed"]["compile"]["mode"] == "blocks" and got["speed"]["compile"]["error"] is None, got
            assert got["speed"]["compile"]["graphs_compiled"] > 0, got
        assert (got["parallel"]["world_size"], got["parallel"]["ranks"]) == (4, [0, 1, 2, 3])
        assert got["frames"] == [9, 80, 208, 3]
        np.testing.assert_allclose(latents[case["name"]], ref_latents, rtol=1e-5, atol=2e-5, err_msg=case["name"])
        np.testing.assert_allclose(
            got["attention"]["per_step"], ref_attention["per_step"], atol=1e-6, err_msg=case["name"]
        )


@pytest.mark.slow
def test_data_parallel_batch_through_torchrun_runs_each_item_once(tmp_path):
    """Guards: `torchrun --nproc-per-node 2 -m wan_nabla batch` gives each rank its own items from
    one plan: one manifest with exactly one record per item (a bad line failed once, not per
    rank), distinct output names, sidecars naming the 2-group layout, exit 1 for the bad line;
    a later one-process run of the same command resumes: everything is skipped."""
    prompts = tmp_path / "p.txt"
    prompts.write_text(
        "".join(f"clip number {i}\n" for i in range(5)) + "clip number 1\n\xff bad\n", encoding="latin-1"
    )
    out = tmp_path / "out"
    argv = [
        "batch",
        str(prompts),
        "--out-dir",
        str(out),
        "--model",
        "tiny",
        "--size",
        "16x16",
        "--frames",
        "1",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--quiet",
    ]
    proc = _torchrun(2, "-m", "wan_nabla", *argv, cwd=tmp_path)
    try:
        out_text, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("data-parallel batch did not finish")
    assert proc.returncode != 0  # torchrun reports the ranks' exit code 1 (one bad line)
    assert out_text.count("batch: 6 ok, 1 failed, 0 skipped (already done) of 7") == 1, out_text[-3000:]  # rank 0 only
    records = read_manifest(out / "manifest.jsonl")
    assert sorted(r["index"] for r in records) == list(range(7))  # each item exactly once
    by_index = {r["index"]: r for r in records}
    assert by_index[6]["status"] == "failed" and "not valid UTF-8" in by_index[6]["error"]
    outputs = [by_index[i]["output"] for i in range(6)]
    assert len(set(outputs)) == 6 and "clip-number-1-2.mp4" in outputs
    groups = set()
    for i in range(6):
        side = json.loads((out / by_index[i]["sidecar"]).read_text())
        assert side["batch"]["key"] == by_index[i]["key"]
        assert side["parallel"]["world_size"] == 2 and side["parallel"]["data_parallel_groups"] == 2
        groups.add(side["parallel"]["group"])
    assert sorted(n for n in os.listdir(out) if n.endswith(".mp4")) == sorted(outputs)

    assert cli.main(argv) == 1  # one process resumes the torchrun batch's manifest
    last = {r["index"]: r for r in read_manifest(out / "manifest.jsonl")}
    assert [last[i]["status"] for i in range(7)] == ["skipped"] * 6 + ["failed"]


def _rank_env(rank: int, world: int) -> dict[str, str]:
    return {
        **os.environ,
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
        "PYTHONPATH": str(ROOT),
    }


@pytest.mark.slow  # 42 s on a busy 2-core box (torchrun start-up per rank); CI runs it
def test_bad_combination_exits_2_on_every_rank(tmp_path):
    """Guards: a layout that does not fit the job is one identical line and exit 2 on every rank,
    before any process group exists (MASTER_PORT 1 would make init hang or fail otherwise)."""
    argv = [
        sys.executable,
        "-m",
        "wan_nabla",
        "generate",
        "--prompt",
        "a fox",
        "--model",
        "tiny",
        "--ulysses-degree",
        "4",
        "--output",
        str(tmp_path / "x.mp4"),
        "--quiet",
    ]
    procs = [
        subprocess.Popen(argv, env=_rank_env(r, 2), cwd=tmp_path, stderr=subprocess.PIPE, text=True) for r in range(2)
    ]
    errs = []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=120)[1].strip().splitlines())
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail("a rank did not exit")
    assert [p.returncode for p in procs] == [2, 2]
    assert errs[0] == errs[1] and len(errs[0]) == 1, errs
    assert errs[0][0] == (
        "wan-nabla: error: parallel: --ulysses-degree 4 runs one video on 4 rank(s), but this run "
        "has 2 (WORLD_SIZE); launch with torchrun --nproc-per-node 4"
    )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (["--cfg-parallel", "--guidance-scale", "1"], 2, "parallel.cfg_parallel: needs classifier-free guidance"),
        (["--ulysses-degree", "3"], 3, "parallel.ulysses_degree: 3 does not divide the model's 2 attention heads"),
        (["--ulysses-degree", "2"], 4, "use `batch` for 2 videos at once"),
        ([], 2, "runs one video on 1 rank(s), but this run has 2"),
        (["--ulysses-degree", "0"], 1, "--ulysses-degree (parallel.ulysses_degree): 0 is not allowed"),
        (["--ulysses-degree", "2", "--device", "cuda:1"], 2, "--device: 'cuda:1' under torchrun"),
        (
            ["--ulysses-degree", "2", "--cache", "first-block:0.05"],
            2,
            "--cache (speed.cache): 'first-block:0.05' does not combine with parallel.ulysses_degree 2",
        ),
        (["--ulysses-degree", "2", "--save-masks"], 2, "--save-masks: works in single-process runs only"),
    ],
    ids=[
        "cfg-without-guidance",
        "heads",
        "world-too-big",
        "no-flags",
        "zero",
        "fixed-gpu",
        "cache-ulysses",
        "save-masks",
    ],
)
def test_bad_combinations_are_usage_errors_before_init(argv, world, message, monkeypatch, capsys, tmp_path):
    """Guards: each bad combination is a one-line usage error (exit 2) found before any process
    group or model exists, on any rank."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("process group started"))
    for rank in range(world):
        for k, v in _rank_env(rank, world).items():
            monkeypatch.setenv(k, v)
        rc = cli.main(
            ["generate", "--prompt", "a fox", "--model", "tiny", "--output", str(tmp_path / "x.mp4"), "--quiet", *argv]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], err
    assert os.listdir(tmp_path) == []


def test_batch_layout_must_divide_the_world(tmp_path):
    cfg = RunConfig().override(ulysses_degree=2, cfg_parallel=True)
    with pytest.raises(ConfigError, match=r"6 ranks \(WORLD_SIZE\) cannot form groups of 4"):
        check_parallel(cfg.override(model="tiny"), "batch", model_facts("tiny"), env={"RANK": "0", "WORLD_SIZE": "6"})
    plan = with_device(
        check_parallel(
            cfg.override(model="tiny", device="cpu"), "batch", model_facts("tiny"), env={"RANK": "5", "WORLD_SIZE": "8"}
        ),
        "cpu",
    )
    launch, layout = plan.launch, plan.layout
    assert (launch.rank, launch.local_rank, plan.device.type, layout.groups) == (5, 5, "cpu", 2)
    roles = layout.roles(5)  # group 1 = ranks 4..7: cond 4, 5 and uncond 6, 7
    assert (roles.group, roles.group_rank, roles.branch, roles.ulysses_rank) == (1, 1, 0, 1)
    assert layout.cfg_ranks(1, 1) == [5, 7] and layout.ulysses_ranks(1, 1) == [6, 7]
    assert check_parallel(RunConfig(), "generate", ModelFacts("x"), env={}) is None  # one process: today's path


def test_shards_are_whole_tiles_and_differ_by_at_most_one():
    """Guards the sharding rule: contiguous chunks of whole 64-token tiles in rank order (raster:
    single tokens), sizes differing by at most one unit, covering the sequence exactly."""
    from wan_nabla.distributed import SequenceParallel

    for total, unit, size, expect in [
        (384, 64, 4, [128, 128, 64, 64]),
        (384, 64, 2, [192, 192]),
        (195, 1, 4, [49, 49, 49, 48]),
        (80640, 64, 8, [10112] * 4 + [10048] * 4),
    ]:
        starts = []
        for r in range(size):
            sp = SequenceParallel(None, size, r)
            sp.set_sequence(total, unit)
            assert sp.sizes == expect and sp.local_len == expect[r]
            starts.append(sp.start)
        assert starts == [sum(expect[:r]) for r in range(size)] and sum(expect) == total
    with pytest.raises(ValueError, match="whole number"):
        SequenceParallel(None, 2, 0).set_sequence(100, 64)


def test_gpu_script_layouts_for_any_gpu_count():
    """Guards the layouts the GPU script measures on N GPUs (the 4/8-GPU runs reuse it)."""
    from benchmarks.harness.multigpu import layouts

    def names(n):
        return {k: (v.ulysses_degree, v.cfg_parallel) if v else None for k, v in layouts(n).items()}

    assert names(1) == {"1gpu": None}
    assert names(2) == {"1gpu": None, "ulysses2": (2, False), "cfg2": (1, True)}
    assert names(3) == {"1gpu": None, "ulysses3": (3, False)}
    assert names(8) == {"1gpu": None, "ulysses8": (8, False), "cfg2xulysses4": (4, True)}
