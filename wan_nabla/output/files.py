"""Atomic output files: a reader never sees a half-written video, JSON or text file.

    atomic_write_json(out / "run.json", {"steps": 50})
    with atomic_output(out / "fox.mp4") as tmp:       # tmp = out/.fox.mp4.<random>.tmp.mp4
        encoder.write(tmp)                            # replaced onto fox.mp4 only on success
    temp_target(".fox.mp4.k2j4x9ab.tmp.mp4")          # 'fox.mp4': whose temp file this is
    out = ensure_writable_dir("outputs/today", created)  # OutputError if it cannot be written;
    remove_created_dirs(created)                      # the directories it made, if still empty

Everything is written to a hidden temp file in the destination directory (so os.replace is a
same-filesystem rename), fsynced, then renamed. On any exception the temp file is removed and the
destination is left as it was. Limits: the directory entry itself is fsynced only on POSIX; a crash
(power loss, SIGKILL) between the temp write and its removal can leave a `.*.tmp*` file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# mkstemp's names: ".<target>." + 8 random characters + ".tmp" + the target's suffix.
_TEMP = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[^.]*)?$")


def temp_target(name: str) -> str | None:
    """The file name a temp file of atomic_output is meant to become, or None if `name` is not one."""
    m = _TEMP.match(name)
    if m is None or not m["target"].endswith(m["suffix"] or ""):
        return None
    return m["target"]


class OutputError(ValueError):
    """An output location cannot be used; the message is one line naming the path and the reason."""


def _mkstemp_beside(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    # mkstemp creates 0600; the published file should get the usual umask-derived mode instead.
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
    except (AttributeError, OSError):  # no fchmod on Windows; keep the private mode there
        pass
    return fd, Path(name)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on Windows, where directories cannot be opened.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; on failure nothing appears at `path` and no temp is left."""
    path = Path(path)
    with atomic_output(path) as tmp:  # fsync, rename and cleanup live there
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, obj: Any, sort_keys: bool = False) -> Path:
    """JSON with indent=2 and a final newline. Serialisation happens before any file is created."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`, with the same suffix so encoders can infer the format;
    it is renamed onto `path` only if the block finishes without an exception."""
    path = Path(path)
    fd, tmp = _mkstemp_beside(path, suffix=".tmp" + path.suffix)
    os.close(fd)  # the writer opens (and usually truncates) the file by name itself
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def _missing_ancestors(path: Path) -> list[Path]:
    """`path` and its parents that do not exist yet, outermost first."""
    missing = []
    for p in (path, *path.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    return missing[::-1]


def probe_writable(path: Path, flag: str | None = None) -> None:
    """OutputError unless a file can be created (and removed) in the existing directory `path`."""
    try:
        # A real write is the only reliable check: os.access ignores ACLs, read-only mounts, root.
        fd, probe = _mkstemp_beside(path / "write-probe")
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        # /proc, /sys and some FUSE mounts answer "No such file or directory" for a file that
        # could not be created in a directory that exists: say what that means.
        why = (
            "it does not accept new files (a virtual file system such as /proc or /sys)"
            if exc.errno == errno.ENOENT
            else f"creating a file there failed: {exc.strerror or exc}"
        )
        where = f"{flag}: " if flag else ""
        raise OutputError(f"{where}output directory {str(path)!r} is not writable: {why}") from None


def ensure_writable_dir(path: str | Path, created: list[Path] | None = None) -> Path:
    """Create `path` (with parents) if needed and prove it is writable; OutputError otherwise.
    The directories this call created are appended to `created` (outermost first), so a run that
    then fails on bad input can take them away again (remove_created_dirs)."""
    path = Path(path).expanduser()
    new = _missing_ancestors(path)
    try:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OutputError(
                f"output directory {str(path)!r} cannot be used: it exists and is not a directory"
            ) from None
        except OSError as exc:
            raise OutputError(f"output directory {str(path)!r} cannot be created: {exc.strerror or exc}") from None
        probe_writable(path)
    finally:
        if created is not None:
            created.extend(p for p in new if p.is_dir())
    return path


def remove_created_dirs(created: list[Path]) -> None:
    """Remove the directories recorded by ensure_writable_dir, innermost first, if they are empty
    (anything someone put there meanwhile stays, and so does its directory)."""
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir()
    created.clear()
