"""benchmarks/jobs/head_balance.py: the rank-imbalance arithmetic behind the multi-GPU load-balance analysis."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import torch

from tests.support import ROOT

spec = importlib.util.spec_from_file_location("head_balance", ROOT / "benchmarks" / "jobs" / "head_balance.py")
hb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hb)


def test_equal_heads_are_balanced_and_snake_keeps_group_sizes():
    dens = torch.full((40,), 0.2)
    for u in (2, 4, 8):
        groups = hb.snake(dens, u)
        assert sorted(h for g in groups for h in g) == list(range(40)) and {len(g) for g in groups} == {40 // u}
        assert hb.imbalance(dens, groups) == 0.0


def test_contiguous_groups_of_a_density_ramp_are_unequal_and_snake_fixes_it():
    """Guards the analysis: heads ordered from dense to sparse make contiguous Ulysses groups unequal
    (rank 0 gets all dense heads); dealing sorted heads in snake order evens them out."""
    dens = torch.linspace(0.4, 0.05, 40)[None]  # one layer
    r = hb.analyse(dens)
    for u in (2, 4, 8):
        assert r[f"U{u}"]["contiguous_mean"] > 0.2
        assert r[f"U{u}"]["balanced_mean"] < 0.05  # 5 heads per rank at U8: snake is not perfect
    work = torch.tensor([0.4 + 0.39, 0.05 + 0.06])
    assert (
        abs(hb.imbalance(torch.tensor([0.4, 0.39, 0.05, 0.06]), [[0, 1], [2, 3]]) - float(work.max() / work.mean() - 1))
        < 1e-6
    )


def test_quick_run_writes_both_sources_with_provenance(tmp_path):
    """Guards the script end to end (synthetic q/k and the tiny random-weight transformer through
    an Observer subscribed to the run's statistics): exit 0, both sources analysed, and the JSON names
    the commit and the command."""
    script = ROOT / "benchmarks" / "jobs" / "head_balance.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "--quick"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "head_balance.json").read_text())
    assert res["synthetic_qk"] and res["random_weight_model"], list(res)
    assert res["commit"] not in (None, "unknown") and res["command"].endswith("--quick")
    assert res["env"]["commit"] == res["commit"] and res["env"]["device"] == "cpu" and res["env"]["diffusers"]
