"""Helpers shared by the tests (not tests themselves).

- reference.py: independent float64 references (brute-force masks, masked attention, FA4's list
  semantics) and the tiny transformer used by kernel-level tests.
- wan_original.py: the tiny model's weights written in Wan2.1's original checkpoint layout.
- dist_worker.py, split_decode_worker.py: torchrun worker scripts (run as files, by path).
- serve_util.py: a real `wan-nabla serve` process and its HTTP client for the serve tests.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (the directory holding pyproject.toml)."""
