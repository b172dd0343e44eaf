"""Helpers for tests that read what a run wrote: prompt files, manifests, MP4s, fsync order."""

from __future__ import annotations

import json
import os
from pathlib import Path

import imageio_ffmpeg
import pytest

from wan_nabla.batch.manifest import read_manifest


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def last_by_index(out: Path) -> dict[int, dict]:
    return {r["index"]: r for r in read_manifest(out / "manifest.jsonl")}


def mp4_names(out: Path) -> list[str]:
    """Every .mp4 in out, hidden temp files included."""
    return sorted(n for n in os.listdir(out) if n.endswith(".mp4"))


def decoded(path: Path) -> bytes:
    """Raw RGB bytes of every frame."""
    reader = imageio_ffmpeg.read_frames(str(path))
    next(reader)
    return b"".join(bytes(f) for f in reader)


def fsync_recorder(monkeypatch):
    """Replace os.fsync by a recorder of (path, is_dir, content or None, paths existing) per call,
    resolving each descriptor through /proc; the real fsync still runs."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to map descriptors to paths")
    events = []
    real = os.fsync

    def record(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        is_dir = os.path.isdir(path)
        content = None if is_dir else open(path, "rb").read()
        events.append(
            {"path": path, "dir": is_dir, "content": content, "listing": sorted(os.listdir(path)) if is_dir else None}
        )
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return events
