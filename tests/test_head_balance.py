"""scripts/head_balance.py: the rank-imbalance arithmetic behind the multi-GPU load-balance analysis."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("head_balance", Path(__file__).resolve().parents[1] / "scripts" / "head_balance.py")
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
    assert abs(hb.imbalance(torch.tensor([0.4, 0.39, 0.05, 0.06]), [[0, 1], [2, 3]])
               - float(work.max() / work.mean() - 1)) < 1e-6
