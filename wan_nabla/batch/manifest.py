"""`manifest.jsonl`: the batch's append-only log, one JSON record per item per attempt.

    with ManifestWriter(out_dir / "manifest.jsonl") as m:   # exclusive lock; OutputError if held
        m.append({"index": 0, "status": "ok", ...})          # written, flushed and fsynced
    records = read_manifest(out_dir / "manifest.jsonl")       # every complete record, in order

Each record is written as one line with a single write, then fsynced, so a run killed at any
moment leaves at worst a truncated last line (SIGINT/SIGTERM wait until the line is written and
fsynced: interrupts.deferred). The reader skips lines that are not a JSON object
(and says how many); the writer first ends such a dangling line with "\\n", so a new record never
glues onto it. The writer holds an advisory `flock` on the manifest for its lifetime: a second
batch on the same directory fails at once instead of interleaving work (released by the kernel
even on SIGKILL).

Limits: the lock is POSIX-only (on Windows two concurrent batches are not detected), and it is
advisory: tools that ignore flock (an editor) can still write the file.
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
    """Appends records to a manifest under an exclusive lock (see module doc)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "ab")  # noqa: SIM115 - held open (and locked) for the whole run
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise OutputError(
                        f"{str(self.path)!r} is locked by another running batch; wait for it or use another --out-dir"
                    ) from None
            if self._f.tell() > 0:
                with open(self.path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        self._write(b"\n")
        except BaseException:
            self._f.close()
            raise

    def _write(self, data: bytes) -> None:
        with deferred():  # a signal never cuts a record in half
            self._f.write(data)
            self._f.flush()
            os.fsync(self._f.fileno())

    def append(self, record: dict[str, Any]) -> None:
        self._write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        self._f.close()  # also releases the lock

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
