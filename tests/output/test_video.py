"""MP4 writing/probing and atomic output files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from tests.support.outputs import fsync_recorder
from wan_nabla.output import files as wio
from wan_nabla.output.files import (
    OutputError,
    atomic_output,
    atomic_write_bytes,
    atomic_write_json,
    ensure_writable_dir,
)
from wan_nabla.output.video import is_complete_mp4, probe_mp4, write_mp4


def _gradient_video(t: int, h: int, w: int) -> np.ndarray:
    """Smooth float frames in [0, 1] that survive H.264 nearly unchanged, different per frame."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = [np.stack([x / w, y / h, np.full_like(x, i / max(t - 1, 1))], axis=-1) for i in range(t)]
    return np.stack(frames).astype(np.float32)


def _decode_all(path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    return np.stack(frames)


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(("width", "height"), [(208, 144), (128, 128)])
def test_write_and_probe_round_trip(tmp_path, width, height):
    frames = _gradient_video(17, height, width)
    out = write_mp4(frames, tmp_path / "clip.mp4", fps=16)
    info = probe_mp4(out)
    assert info == {"frames": 17, "width": width, "height": height, "codec": "h264", "fps": 16.0}
    decoded = _decode_all(out)
    assert decoded.shape == (17, height, width, 3)
    # Orientation and colour survive (catches swapped W/H or channels), within H.264 loss.
    expected = np.round(frames * 255)
    assert np.abs(decoded.astype(np.float32) - expected).mean() < 3.0
    assert _leftovers(tmp_path) == []
    assert is_complete_mp4(out, 17) and is_complete_mp4(out) and not is_complete_mp4(out, 16)


def test_uint8_input_and_single_frame(tmp_path):
    frames = (_gradient_video(1, 32, 48) * 255).astype(np.uint8)
    out = write_mp4(frames, tmp_path / "one.mp4", fps=8)
    info = probe_mp4(out)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (1, 48, 32, 8.0)


@pytest.mark.parametrize(
    ("shape", "match"),
    [((3, 31, 32, 3), "even"), ((3, 32, 33, 3), "even"), ((0, 32, 32, 3), "at least one"),
     ((3, 32, 32, 4), r"\[T, H, W, 3\]"), ((32, 32, 3), r"\[T, H, W, 3\]")],
)  # fmt: skip
def test_bad_shapes_are_refused_and_nothing_is_written(tmp_path, shape, match):
    with pytest.raises(ValueError, match=match):
        write_mp4(np.zeros(shape, np.float32), tmp_path / "bad.mp4")
    assert list(tmp_path.iterdir()) == []


def test_nan_frames_are_refused(tmp_path):
    frames = _gradient_video(5, 32, 32)
    frames[2, 3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_mp4(frames, tmp_path / "nan.mp4")
    assert list(tmp_path.iterdir()) == []


def test_is_complete_false_for_truncated_and_garbage(tmp_path):
    good = write_mp4(_gradient_video(17, 64, 64), tmp_path / "good.mp4")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert is_complete_mp4(good, 17)
    for bad in (truncated, garbage, empty, tmp_path / "missing.mp4", tmp_path):
        assert not is_complete_mp4(bad), bad.name
        assert not is_complete_mp4(bad, 17), bad.name
    with pytest.raises(ValueError, match="not a readable video"):
        probe_mp4(garbage)


def test_failed_encode_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "clip.mp4"
    write_mp4(_gradient_video(5, 32, 32), target)
    before = target.read_bytes()

    def broken_writer(*args, **kwargs):
        raise RuntimeError("ffmpeg died")

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", broken_writer)
    with pytest.raises(RuntimeError, match="ffmpeg died"):
        write_mp4(_gradient_video(9, 32, 32), target)
    assert target.read_bytes() == before and _leftovers(tmp_path) == []


# --- atomic files ---------------------------------------------------------------------------


def test_atomic_output_publishes_only_on_success(tmp_path):
    target = tmp_path / "fox.mp4"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".fox.mp4.") and tmp.name.endswith(".tmp.mp4")
        assert not target.exists()
        tmp.write_bytes(b"video")
    assert target.read_bytes() == b"video" and _leftovers(tmp_path) == []

    with pytest.raises(KeyError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half a video")
            raise KeyError("interrupted")
    assert target.read_bytes() == b"video" and _leftovers(tmp_path) == []


def test_atomic_output_exception_leaves_no_file_and_no_temp(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "new.mp4") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_json_success_and_failure(tmp_path):
    target = tmp_path / "run.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2], "prompt": "🦊"})
    text = target.read_text(encoding="utf-8")
    assert text.endswith("}\n") and json.loads(text) == {"b": 1, "a": [1, 2], "prompt": "🦊"}
    assert '\n  "b": 1' in text  # indent=2
    assert list(tmp_path.iterdir()) == [target]

    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": {1, 2}})
    assert list(tmp_path.iterdir()) == [target] and json.loads(target.read_text())["b"] == 1


def test_atomic_write_cleans_up_when_the_rename_fails(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(wio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(tmp_path / "x.bin", b"data")
    with pytest.raises(OSError, match="disk full"):
        with atomic_output(tmp_path / "y.mp4") as tmp:
            tmp.write_bytes(b"data")
    assert list(tmp_path.iterdir()) == []


def test_atomic_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"1")
        with atomic_output(tmp_path / "b.mp4") as tmp:
            tmp.write_bytes(b"2")
    finally:
        os.umask(old)
    for name in ("a.bin", "b.mp4"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


# --- output directories ---------------------------------------------------------------------


def test_ensure_writable_dir_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    assert ensure_writable_dir(target) == target
    assert target.is_dir() and list(target.iterdir()) == []


def test_ensure_writable_dir_under_a_regular_file(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    for target in (blocker, blocker / "out"):
        with pytest.raises(OutputError) as err:
            ensure_writable_dir(target)
        assert str(target) in str(err.value) and "\n" not in str(err.value)
        assert isinstance(err.value, ValueError)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_ensure_writable_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot be created"):
            ensure_writable_dir(ro / "out")
        with pytest.raises(OutputError, match="not writable"):
            ensure_writable_dir(ro)
    finally:
        ro.chmod(0o700)


# --- durability -----------------------------------------------------------------------------


def test_atomic_write_fsyncs_the_data_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    """Guards the durability claim of files.py (a mutation audit found no test would notice the
    fsyncs gone): the temp file is fsynced holding the complete data while the target does not
    exist yet, and the directory is fsynced once the renamed file is in it."""
    events = fsync_recorder(monkeypatch)
    atomic_write_bytes(tmp_path / "a.bin", b"payload")
    files = [e for e in events if not e["dir"]]
    dirs = [e for e in events if e["dir"]]
    assert len(files) == 1 and Path(files[0]["path"]).name.startswith(".a.bin.")
    assert files[0]["content"] == b"payload"
    assert [d["path"] for d in dirs] == [str(tmp_path)] and dirs[0]["listing"] == ["a.bin"]
    assert events.index(files[0]) < events.index(dirs[0])
