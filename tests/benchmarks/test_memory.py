"""benchmarks/jobs/gpu_memory.py: the CPU quick mode runs every memory mode end to end, the GPU parts are
well formed and fit their time budget, and the recommendation picks what the numbers say."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks.harness import memory, memory_report
from benchmarks.harness.random_init import WAN_SIZES
from tests.support import ROOT
from wan_nabla.presets import preset_names


def _script():
    spec = importlib.util.spec_from_file_location("gpu_memory_script", ROOT / "benchmarks" / "jobs" / "gpu_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_cpu_mode_measures_every_mode_and_writes_reports(tmp_path):
    """Guards the GPU run against typos: the script's own entry point runs the tiny model through
    none / model / group / sequential (dense and sparse) on the CPU and writes JSON + markdown;
    --report merges part files."""
    script = _script()
    assert script.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "memory_quick.json").read_text())
    assert [r["offload"] for r in res["runs"]] == ["none", "model", "group", "sequential", "group"]
    assert all(r["status"] == "ok" and r["s_per_step"] > 0 for r in res["runs"]), res["runs"]
    assert {r["backend"] for r in res["runs"]} == {"flex"}  # the attention backend each run used
    assert {(d["video"], d["tiling"]) for d in res["vae"]} == {("quick", False), ("quick", True)}
    assert res["environment"]["command"].startswith("benchmarks/jobs/gpu_memory.py") and "commit" in res["environment"]
    md = (tmp_path / "memory_quick.md").read_text()
    assert "Which mode for my GPU" in md and "random weights" in md
    assert f"commit {res['environment']['commit']}." in md
    assert script.main(["--report", str(tmp_path / "memory_quick.json"), "--out", str(tmp_path / "merged")]) == 0
    assert f"commit {res['environment']['commit']}." in (tmp_path / "merged" / "memory.md").read_text()
    assert json.loads((tmp_path / "merged" / "memory.json").read_text())["runs"] == res["runs"]


def _walk(run):
    yield run
    for f in run.fallback:
        yield from _walk(f)


@pytest.mark.parametrize("part", [p for p in memory.PARTS if p != "quick"])
def test_gpu_parts_are_well_formed_and_fit_the_time_budget(part):
    """Guards the GPU parts (which cannot run here): known sizes, videos, presets, modes and cards;
    the primary runs' pessimistic time estimate stays under 500 s (a GPU command may run 600 s;
    the run-time budget guard, 460 s by default, skips what would not fit)."""
    runs = memory.plan(part)
    for run in (x for r in runs for x in _walk(r)):
        assert run.size in WAN_SIZES and run.video in memory_report.VIDEOS and run.offload in memory_report.MODES
        assert run.attention == "full" or run.attention in preset_names()
        assert run.card_gib is None or run.card_gib in memory_report.CARDS_GIB
        assert run.steps > run.warmup
    assert sum(memory.estimate_s(r) for r in runs) < 500
    labels = [r.label() for r in runs]
    if part == "14B-720p":  # the goal: 14B 720p on a 24 GB card, against none on the whole GPU
        assert "14B 720p full offload=group CFG batch 2 on 24 GiB" in labels
        assert "14B 720p full offload=none CFG batch 2 on whole GPU" in labels
    if part == "1.3B":  # 1.3B 480p within 12 GB
        assert "1.3B 480p full offload=model CFG batch 2 on 12 GiB" in labels


def test_budget_skips_runs_without_building_anything():
    """Guards the time budget: runs that would overrun it are listed as skipped, not started."""
    import torch

    res = memory.run_part("14B-720p", torch.device("cpu"), budget_s=0, log=lambda s: None)
    assert res["runs"] == [] and len(res["skipped"]) == len(memory.plan("14B-720p"))


def _row(size, offload, s, peaks, b2=True, card=None, status="ok", video="720p"):
    """A measured run as memory.measure records it; peaks = (encode, denoise, resident before decode)."""
    row = {
        "size": size,
        "video": video,
        "attention": "full",
        "offload": offload,
        "batch_cfg": b2,
        "card_gib": card,
        "status": status,
        "s_per_step": s,
        "peak_gib": None,
    }
    if peaks:
        row.update(peak_gib={"encode": peaks[0], "denoise": peaks[1]}, resident_before_decode_gib=peaks[2])
    return row


def test_recommendation_is_the_fastest_mode_that_fits_each_card():
    """Guards the README table's logic: per card, the fastest ok run whose overall peak (encode,
    denoise, estimated decode = resident + measured VAE decode peak) fits card - CONTEXT_GIB;
    OOM runs never qualify; nothing fitting gives None."""
    rows = [
        _row("14B", "none", 25.0, (38.0, 55.0, 38.0)),
        _row("14B", "model", 25.5, (10.6, 45.0, 0.5), card=48),
        _row("14B", "group", 27.0, (10.6, 20.0, 0.5), card=24),
        _row("14B", "group", 28.0, (10.6, 14.0, 0.5), b2=False, card=16),
        _row("14B", "sequential", 60.0, (1.0, 9.0, 0.5), b2=False, card=16),
        _row("14B", "sequential", 9.0, None, status="oom", card=12),
    ]
    memory_report.add_decode_estimates(
        rows,
        [
            {"video": "720p", "tiling": True, "decode_extra_gib": 4.0},
            {"video": "720p", "tiling": False, "decode_extra_gib": 30.0},
        ],
    )
    # none at 1280x720 on the whole GPU: 79.25 - 38 GiB free leaves room for the untiled decode
    # (20.3 GiB x 1.25), so auto decodes untiled there; on a 48 GB card it would decode tiled
    assert rows[0]["decode_gib_est"] == 38.0 + 30.0 and rows[0]["vae_tiling"] is False
    assert rows[0]["peak_by_card_gib"][80] == 68.0 and rows[0]["peak_by_card_gib"][48] == 55.0
    assert rows[0]["tiled_by_card"] == {80: False, 48: True, 24: True, 16: True, 12: True}
    assert rows[2]["vae_tiling"] is True and rows[2]["decode_gib_est"] == 0.5 + 4.0  # group: always tiled
    rec = memory_report.recommend(rows)[("14B", "720p")]
    pick = {card: (r["offload"], r["batch_cfg"]) if r else None for card, r in rec.items()}
    assert pick == {
        80: ("none", True),
        48: ("model", True),
        24: ("group", True),
        16: ("group", False),
        12: ("sequential", False),
    }
    rows[4]["peak_gib"]["denoise"] = 12.0
    memory_report.add_decode_estimates(rows, [{"video": "720p", "tiling": True, "decode_extra_gib": 4.0}])
    assert memory_report.recommend(rows)[("14B", "720p")][12] is None
    md = memory_report.render_markdown({"runs": rows, "vae": [], "skipped": []})
    assert "| 24 GB |" in md and "group* (27.00 s/step, 20.0 GiB, t)" in md and "does not fit" in md


def test_recommendation_counts_the_tiled_decode_a_smaller_card_gets():
    """Guards: a run whose whole-GPU peak comes from an untiled decode still fits a smaller card,
    because vae_tiling auto decodes tiled there (the 1.3B 480p case: none peaks at 24.5 GiB untiled,
    17.5 GiB on a 24 GB card); the card's peak is what decides, and the cell says it is tiled."""
    rows = [
        _row("1.3B", "none", 0.97, (16.0, 17.5, 15.5), video="480p"),
        _row("1.3B", "sequential", 1.08, (2.0, 3.1, 0.4), b2=True, card=12, video="480p"),
    ]
    vae = [
        {"video": "480p", "tiling": False, "decode_extra_gib": 9.0, "seconds": 3.8},
        {"video": "480p", "tiling": True, "decode_extra_gib": 1.9, "seconds": 6.7},
    ]
    memory_report.add_decode_estimates(rows, vae)
    assert rows[0]["total_peak_gib"] == pytest.approx(24.5) and rows[0]["vae_tiling"] is False
    assert rows[0]["peak_by_card_gib"][24] == 17.5 and rows[0]["tiled_by_card"][24] is True
    rec = memory_report.recommend(rows)[("1.3B", "480p")]
    assert {c: r["offload"] for c, r in rec.items()} == {
        80: "none",
        48: "none",
        24: "none",
        16: "sequential",
        12: "sequential",
    }
    md = memory_report.render_markdown({"runs": rows, "vae": vae, "skipped": []})
    assert "none (0.97 s/step, 17.5 GiB, t)" in md and "none (0.97 s/step, 24.5 GiB)" in md
    assert "24.50 untiled" in md
