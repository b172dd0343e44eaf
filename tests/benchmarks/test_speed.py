"""The FP8 / fast-decode GPU job's pieces on the CPU: decode variants, the split-decode estimate, the need fit,
and the script's argument check (benchmarks/jobs/gpu_speed.sh), so the H200 run does not die on a slip."""

from __future__ import annotations

import json
import subprocess

import pytest

from benchmarks.harness import decode
from tests.support import ROOT


def test_split_estimate_is_the_slowest_rank_plus_assembly():
    """Guards: tiles are dealt round-robin as split_tiled_decode deals them (rank r: tiles r, r+n, ...)."""
    tiles = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert decode.split_estimate(tiles, 0.5, 2) == 1.0 + 3.0 + 5.0 + 0.5
    assert decode.split_estimate(tiles, 0.0, 4) == 1.0 + 5.0
    assert decode.split_estimate(tiles, 0.0, 1) == sum(tiles)


def test_need_fit_per_dtype_takes_the_largest_per_pixel_figure():
    rows = [
        {"variant": "fp32", "size": [1000, 1000, 10], "extra_peak_gib": 2.72},
        {"variant": "fp32", "size": [500, 1000, 10], "extra_peak_gib": 1.5},
        {"variant": "bf16", "size": [1000, 1000, 10], "extra_peak_gib": 1.4},
        {"variant": "bf16-tiled", "size": [1000, 1000, 10], "extra_peak_gib": 0.2},
    ]
    need = decode.fit_need(rows)
    assert need["fp32"]["rule"] == pytest.approx(0.3) and need["bf16"]["rule"] == pytest.approx(0.14)
    assert set(need["fp32"]["gib_per_mpixel_frame"]) == {"1000x1000x10", "500x1000x10"}


@pytest.mark.slow
def test_decode_bench_quick_runs_and_compares_against_fp32(tmp_path, capsys):
    """Guards: the decode bench end to end on the tiny VAE: the fp32 reference, a tiled bf16 decode
    (per-tile times -> split estimates), channels-last weights; JSON + markdown, table printed."""
    assert (
        decode.main(
            [
                "--quick",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
                "--no-fit",
                "--variants",
                "fp32",
                "bf16-tiled",
                "bf16-channels-last",
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "decode.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"fp32", "bf16-tiled", "bf16-channels-last"}
    assert rows["bf16-tiled"]["tiles"] == 6 and set(rows["bf16-tiled"]["split_estimate_s"]) == {"2", "4"}  # JSON keys
    assert 20 < rows["bf16-channels-last"]["psnr_db"] < 200 and 0 < rows["bf16-tiled"]["ssim"] <= 1
    assert "| bf16-tiled | 64x48x5 |" in capsys.readouterr().out and data["env"]["commit"]


def test_gpu_speed_script_refuses_unknown_parts(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "jobs" / "gpu_speed.sh"), str(tmp_path / "o"), "levers", "lever"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "unknown argument 'lever'" in proc.stderr
    assert not (tmp_path / "o").exists()
