"""The JSON record written next to every video: its name, its contents, when it may be replaced.

    check_destination(Path("outputs/fox.mp4"), overwrite=False)           # OutputError if taken
    sidecar_path("outputs/fox.mp4")                                         # outputs/fox.json

Light (no torch): preflight checks a destination with it before any model exists. Writing the
video and its record is publish.py's `publish_video`, which also holds the environment record.

The record holds everything needed to reproduce and
judge the video: prompt, the negative prompt actually encoded (Wan's default when none was
given), the schedule actually run (sampler, shift, sigmas, timesteps), seed, model id, the device it ran on, where the DiT
weights came from (path, key naming, size / mtime / sha256 of each file: checkpoint.py), the fully
resolved config (file values with CLI overrides applied), the video's measured properties,
timings (load, text encoding, denoising with per-step times, decode, write, peak GPU memory per
phase), attention density per step and overall (the mean over all ranks of a parallel run), the
speed levers (compile mode and time, step-cache skips, merged LoRAs with their sha256), the
parallel layout that made it (world size, Ulysses degree, CFG parallel, the ranks of its group;
one process: world size 1), and the package, torch, diffusers, transformers, CUDA and GPU
versions with the git commit of the code when it runs from a checkout (or WAN_NABLA_COMMIT).

Overwriting: `check_destination` refuses an existing MP4 or sidecar unless `overwrite`, and even
then refuses a `<name>.json` that is not this MP4's sidecar (not a JSON object naming a file
called `<name>.mp4` in its "output"): an unrelated file that merely shares the stem is never
replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .files import OutputError

SINGLE_PROCESS = {
    "world_size": 1,
    "ulysses_degree": 1,
    "cfg_parallel": False,
    "group_size": 1,
    "data_parallel_groups": 1,
}


def sidecar_path(video_path: str | Path) -> Path:
    return Path(video_path).with_suffix(".json")


def sidecar_output(path: Path) -> str | None:
    """The "output" a sidecar JSON names, or None (missing, unreadable, not a sidecar)."""
    try:
        if not path.is_file() or path.stat().st_size > 2**22:  # a sidecar is a few KB
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        out = data.get("output") if isinstance(data, dict) else None
        return out if isinstance(out, str) else None
    except (OSError, ValueError):
        return None


def check_destination(output: Path, overwrite: bool) -> None:
    """OutputError unless publishing `output` replaces nothing by surprise (see module doc)."""
    side = sidecar_path(output)
    taken = [p for p in (output, side) if os.path.lexists(p)]
    if not taken:
        return
    if not overwrite:
        names = " and ".join(repr(str(p)) for p in taken)
        raise OutputError(
            f"--output: {names} already exist{'s' if len(taken) == 1 else ''}; "
            "give another --output, or --overwrite to replace the video and its sidecar"
        )
    if os.path.lexists(side):
        owner = sidecar_output(side)
        if owner is None or Path(owner).name != output.name:
            raise OutputError(
                f"--output: {str(side)!r} exists and is not the sidecar of {str(output)!r}; "
                "it is never replaced, even with --overwrite: move it or give another --output"
            )


def git_commit(root: Path | None = None) -> str | None:
    """WAN_NABLA_COMMIT, else the commit checked out at `root` (default: this package's checkout),
    read from .git without running git (plain checkouts and worktrees); None outside a checkout."""
    env = os.environ.get("WAN_NABLA_COMMIT")
    if env and env != "unknown":
        return env
    root = Path(__file__).resolve().parents[2] if root is None else root
    try:
        git = root / ".git"
        if git.is_file():  # a worktree: "gitdir: <path>"
            line = git.read_text().strip()
            git = (root / line[len("gitdir:") :].strip()) if line.startswith("gitdir:") else git
        common = git / "commondir"
        common = (git / common.read_text().strip()).resolve() if common.is_file() else git
        ref = (git / "HEAD").read_text().strip()
        if not ref.startswith("ref: "):
            return ref or None
        name = ref[5:]
        for base in (git, common):
            if (base / name).is_file():
                return (base / name).read_text().strip()
        packed = common / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else []:
            if line.endswith(" " + name):
                return line.split()[0]
    except OSError:
        pass
    return None


SIDECAR_PROMPT_CHARS = 4096
"""Prompts are stored whole up to this length (UMT5 reads 512 tokens, about 2,000 characters of
English); a longer one is cut here and identified by `prompt_sha256` of the full text."""


def prompt_record(prompt: str) -> dict[str, Any]:
    """The sidecar's prompt fields: the text (bounded), its length and the sha256 of the full text."""
    record: dict[str, Any] = {
        "prompt": prompt[:SIDECAR_PROMPT_CHARS],
        "prompt_chars": len(prompt),
        "prompt_sha256": hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest(),
    }
    if len(prompt) > SIDECAR_PROMPT_CHARS:
        record["prompt_truncated"] = True
    return record
