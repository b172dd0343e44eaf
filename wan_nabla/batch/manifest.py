"""`manifest.jsonl`: the batch's append-only log, one JSON record per item per attempt.

    with ManifestWriter(out_dir / "manifest.jsonl") as m:   # directory lock; OutputError if held
        m.append({"index": 0, "status": "ok", ...})          # written and fsynced
    ManifestWriter(path, owner=False)   # another rank of the same torchrun batch: appends only
    records = read_manifest(out_dir / "manifest.jsonl")       # every complete record, in order

Each record is written as one line with a single write, then fsynced, so a run killed at any
moment leaves at worst a truncated last line (SIGINT/SIGTERM wait until the line is written and
fsynced: interrupts.deferred). The reader skips lines that are not a JSON object
(and says how many); the writer first ends such a dangling line with "\\n", so a new record never
glues onto it. Two advisory `flock`s: the owner (the batch, rank 0 under torchrun) holds one on
the output directory for its lifetime, so a second batch on the same directory fails at once
instead of interleaving work (released by the kernel even on SIGKILL); every append holds one on
the manifest itself for that append only, so the group leaders of a data-parallel batch append
whole lines to one manifest.

Limits: the locks are POSIX-only (on Windows two concurrent batches are not detected), and they
are advisory: tools that ignore flock (an editor) can still write the file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..interrupts import deferred
from ..output.files import OutputError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """All well-formed records of a manifest, oldest first; [] if the file does not exist."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise OutputError(f"manifest {str(path)!r} cannot be read: {e.strerror or e}") from None
    records, bad = [], 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:  # a line truncated by a kill, or hand-edited garbage
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    if bad:
        log.warning("%s: ignored %d unreadable line(s) (e.g. cut off by a killed run)", path, bad)
    return records


class ManifestWriter:
    """Appends records to a manifest; the owner also holds the batch's directory lock (module doc)."""

    def __init__(self, path: str | Path, owner: bool = True):
        self.path = Path(path)
        self._dir_fd: int | None = None
        if owner and fcntl is not None:
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(
                    f"{str(self.path.parent)!r} is locked by another running batch; wait for it or use another --out-dir"
                ) from None
            self._dir_fd = fd
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        except BaseException:
            self._unlock_dir()
            raise

    def _unlock_dir(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # also releases the lock
            self._dir_fd = None

    def append(self, record: dict[str, Any]) -> None:
        """One record as one line: under an exclusive lock of the manifest for this append only
        (several ranks of a torchrun batch append to one manifest), a dangling line left by a
        killed writer is ended first; then one write and an fsync."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(self._fd).st_size
            if size:
                os.lseek(self._fd, size - 1, os.SEEK_SET)  # reads honour the offset; O_APPEND writes go to the end
                if os.read(self._fd, 1) != b"\n":
                    data = b"\n" + data
            with deferred():  # a signal (SIGINT/SIGTERM) never cuts a record in half
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
                os.fsync(self._fd)
        finally:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._unlock_dir()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
