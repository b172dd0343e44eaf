"""The commands the docs show run as printed: every fenced block preceded by the line
`<!-- test: run -->` in README.md and docs/*.md is run, line by line, in a temp directory.

    <!-- test: run -->
    ```bash
    wan-nabla presets
    ```

Rules: a line is one shell command (a trailing backslash continues it); `#` comments are dropped;
`pip install ...` and `python -m pytest ...` are not run (the environment is the one under test),
so `pip install -e ".[dev]" && wan-nabla generate ...` runs its second half. The temp directory
holds links to the repository's examples/, scripts/ and configs/ (whichever exist), so relative
paths work as printed, and nothing is written into the checkout. The environment is offline
(HF_HUB_OFFLINE=1): a marked command must not need weights, so mark only commands that use
`--model tiny`, a dry run, or no model at all. Each must exit 0.
Limits: a block that generates takes tens of seconds on a CPU (marked slow).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

MARK = "<!-- test: run -->"
SKIPPED = (re.compile(r"^pip3? install\b"), re.compile(r"^python3? -m (pip|pytest)\b"))
LINKED = ("examples", "scripts", "configs")


def marked_blocks(path: Path) -> list[tuple[str, list[str]]]:
    """(where, commands) of each block marked in `path`; where = 'file:line'."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != MARK:
            i += 1
            continue
        start = i + 1
        while start < len(lines) and not lines[start].strip():
            start += 1
        assert start < len(lines) and lines[start].lstrip().startswith("```"), (
            f"{path.name}:{i + 1}: {MARK} is not followed by a fenced block"
        )
        end = start + 1
        while end < len(lines) and not lines[end].lstrip().startswith("```"):
            end += 1
        blocks.append((f"{path.name}:{start + 1}", commands(lines[start + 1 : end])))
        i = end + 1
    return blocks


def commands(block: list[str]) -> list[str]:
    """The shell commands of a block's lines (module doc rules)."""
    out, pending = [], ""
    for raw in block:
        line = raw.strip()
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("&&")]
        parts = [p for p in parts if not any(rx.match(p) for rx in SKIPPED)]
        if parts:
            out.append(" && ".join(parts))
    return out


def all_blocks() -> list[tuple[str, list[str]]]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [b for doc in docs if doc.is_file() for b in marked_blocks(doc)]


def _generates(cmds: list[str]) -> bool:
    return any(
        re.search(r"\b(generate|compare)\b", c) or (" batch " in f" {c} " and "--dry-run" not in c) for c in cmds
    )


BLOCKS = all_blocks()


def test_block_extraction_follows_the_rules(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n<!-- test: run -->\n\n```bash\n# a comment\nwan-nabla presets\n"
        'pip install -e ".[dev]" && wan-nabla generate --model tiny \\\n    --prompt x\n'
        "python -m pytest -q\n```\n```bash\nnot marked\n```\n",
        encoding="utf-8",
    )
    assert marked_blocks(doc) == [("x.md:4", ["wan-nabla presets", "wan-nabla generate --model tiny --prompt x"])]


@pytest.mark.parametrize(
    "where,cmds",
    [pytest.param(w, c, id=w, marks=[pytest.mark.slow] if _generates(c) else []) for w, c in BLOCKS]
    or [pytest.param("none", [], marks=pytest.mark.skip(reason="no block is marked with <!-- test: run -->"))],
)
def test_marked_command_runs_as_printed(where, cmds, tmp_path):
    for name in LINKED:
        if (ROOT / name).is_dir():
            (tmp_path / name).symlink_to(ROOT / name)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "XDG_CACHE_HOME": str(tmp_path / ".cache"),
    }
    env.pop("WAN_NABLA_OUTPUT_DIR", None)
    for cmd in cmds:
        proc = subprocess.run(
            ["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200, check=False
        )
        assert proc.returncode == 0, f"{where}: `{cmd}` exited {proc.returncode}: {proc.stderr[-1500:]}"
