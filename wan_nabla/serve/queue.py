"""The durable job queue of `wan-nabla serve`: one SQLite database in WAL mode, fsync'd commits.

    q = JobQueue(data_dir / "queue.sqlite3")
    q.recover()                                    # at start: jobs left running go back to the queue
    job, new = q.submit(spec_dict, public, idempotency_key="k1", max_queue=100)   # QueueFull past it
    job = q.claim("rank0")                         # the oldest queued job, now in_progress (or None)
    q.step(job["id"], 40)                          # progress; False once the job was deleted
    q.finish(job["id"], output="video_x.mp4")      # or q.fail(job["id"], "generation_failed", "...")
    q.delete(job["id"])                            # "removed" | "cancelling" | None (unknown id)

Durability: every state change is one transaction committed with `synchronous=FULL`, which in WAL
mode fsyncs the log at each commit, so a job is on disk before submit() returns (and before the
HTTP response). Progress updates go through a second connection with `synchronous=NORMAL`: losing
the last few percent of progress in a power cut is harmless and saves an fsync per step.
A SIGKILL at any moment loses no committed job; recover() turns in_progress back to queued, keeping
the submission order (the integer `seq`). Claims take the write lock (BEGIN IMMEDIATE), so several
processes of one host (torchrun ranks) never claim the same job. Ids are made here
(`video_` + 32 hex digits from the OS's random source), never taken from a request.

Deleting: a queued, completed or failed job's row goes at once (its files are the caller's); a
running job is marked `deleted` (hidden from the API at once) and its worker removes the row when it
stops at its next step. Limits: one host (SQLite over a network file system is not safe); each
thread opens its own connections (sqlite3 objects are per-thread).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    started_at REAL,
    completed_at INTEGER,
    progress INTEGER NOT NULL DEFAULT 0,
    spec TEXT NOT NULL,
    public TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT,
    error_code TEXT,
    error_message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    output TEXT,
    deleted INTEGER NOT NULL DEFAULT 0,
    step_seconds REAL NOT NULL DEFAULT 0,
    video_seconds REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    job TEXT,
    pid INTEGER,
    updated_at REAL NOT NULL
);
"""
STATUSES = ("queued", "in_progress", "completed", "failed")


class QueueFull(RuntimeError):
    """The number of queued jobs reached max_queue (HTTP 429)."""


class IdempotencyConflict(RuntimeError):
    """An Idempotency-Key reused with a different request (HTTP 409)."""


def new_id() -> str:
    return "video_" + secrets.token_hex(16)


class JobQueue:
    """See the module doc. Safe to share between threads (connections are per thread)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        self._db().executescript(SCHEMA)  # executescript commits by itself: no _tx around it

    def _connect(self, durable: bool) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=True)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        db.execute("PRAGMA busy_timeout=60000")
        return db

    def _db(self, durable: bool = True) -> sqlite3.Connection:
        name = "durable" if durable else "light"
        db = getattr(self._local, name, None)
        if db is None:
            db = self._connect(durable)
            setattr(self._local, name, db)
        return db

    def close(self) -> None:
        for name in ("durable", "light"):
            db = getattr(self._local, name, None)
            if db is not None:
                db.close()
                setattr(self._local, name, None)

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self, durable: bool = True) -> JobQueue._Tx:
        return JobQueue._Tx(self._db(durable))

    # ---- the server's side --------------------------------------------------------------
    def submit(
        self,
        spec: dict[str, Any],
        public: dict[str, Any],
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        max_queue: int | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """(the job, True) once it is committed; (the earlier job, False) for a repeated key."""
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    if row["request_hash"] != request_hash:
                        raise IdempotencyConflict(idempotency_key)
                    if not row["deleted"]:
                        return _job(row), False
                    raise IdempotencyConflict(idempotency_key)
            if max_queue is not None:
                depth = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND deleted = 0").fetchone()[0]
                if depth >= max_queue:
                    raise QueueFull(f"{depth} jobs are queued (--max-queue {max_queue})")
            jid = new_id()
            db.execute(
                "INSERT INTO jobs (id, status, created_at, spec, public, idempotency_key, request_hash) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                (jid, int(time.time()), json.dumps(spec), json.dumps(public), idempotency_key, request_hash),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (jid,)).fetchone()
        return _job(row), True

    def get(self, jid: str) -> dict[str, Any] | None:
        row = self._db().execute("SELECT * FROM jobs WHERE id = ? AND deleted = 0", (jid,)).fetchone()
        return _job(row) if row is not None else None

    def list(
        self, limit: int, after: str | None = None, newest_first: bool = True
    ) -> tuple[list[dict[str, Any]], bool]:
        """Up to `limit` jobs after the job `after` (exclusive), and whether more follow.
        KeyError if `after` is not a job."""
        db = self._db()
        op, order = ("<", "DESC") if newest_first else (">", "ASC")
        where, args = "deleted = 0", []
        if after is not None:
            row = db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
            if row is None:
                raise KeyError(after)
            where += f" AND seq {op} ?"
            args.append(row["seq"])
        rows = db.execute(
            f"SELECT * FROM jobs WHERE {where} ORDER BY seq {order} LIMIT ?", (*args, limit + 1)
        ).fetchall()
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, jid: str) -> tuple[str, dict[str, Any]] | None:
        """("removed", job) or ("cancelling", job) (see module doc); None if there is no such job."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ? AND deleted = 0", (jid,)).fetchone()
            if row is None:
                return None
            if row["status"] == "in_progress":
                db.execute("UPDATE jobs SET deleted = 1 WHERE id = ?", (jid,))
                return "cancelling", _job(row)
            db.execute("DELETE FROM jobs WHERE id = ?", (jid,))
            return "removed", _job(row)

    def counts(self) -> dict[str, int]:
        rows = self._db().execute("SELECT status, COUNT(*) AS n FROM jobs WHERE deleted = 0 GROUP BY status").fetchall()
        out = dict.fromkeys(STATUSES, 0)
        out.update({r["status"]: r["n"] for r in rows})
        return out

    def totals(self) -> dict[str, float]:
        row = (
            self._db()
            .execute(
                "SELECT COALESCE(SUM(step_seconds), 0) AS s, COALESCE(SUM(video_seconds), 0) AS v, "
                "COUNT(*) AS n FROM jobs WHERE status = 'completed'"
            )
            .fetchone()
        )
        return {"step_seconds": row["s"], "video_seconds": row["v"], "completed_rows": row["n"]}

    def workers(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db().execute("SELECT * FROM workers ORDER BY name").fetchall()]

    def recover(self) -> list[str]:
        """At start, before any worker runs: running jobs back to the queue (deleted ones go)."""
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE status = 'in_progress' AND deleted = 1")
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE status = 'in_progress'").fetchall()]
            db.execute("UPDATE jobs SET status = 'queued', progress = 0, worker = NULL WHERE status = 'in_progress'")
            db.execute("DELETE FROM workers")
        return ids

    # ---- the workers' side --------------------------------------------------------------
    def claim(self, worker: str) -> dict[str, Any] | None:
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE status = 'queued' AND deleted = 0 ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status = 'in_progress', started_at = ?, worker = ?, attempts = attempts + 1, "
                "progress = 0 WHERE id = ?",
                (time.time(), worker, row["id"]),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return _job(row)

    def step(self, jid: str, progress: int) -> bool:
        """Record progress; False if the job was deleted meanwhile (the worker stops)."""
        db = self._db(durable=False)
        db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND deleted = 0", (progress, jid))
        row = db.execute("SELECT deleted FROM jobs WHERE id = ?", (jid,)).fetchone()
        return row is not None and not row["deleted"]

    def finish(self, jid: str, output: str, step_seconds: float = 0.0, video_seconds: float = 0.0) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?, output = ?, "
                "step_seconds = ?, video_seconds = ? WHERE id = ?",
                (int(time.time()), output, step_seconds, video_seconds, jid),
            )

    def fail(self, jid: str, code: str, message: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status = 'failed', completed_at = ?, error_code = ?, error_message = ? WHERE id = ?",
                (int(time.time()), code, message[:2000], jid),
            )

    def requeue(self, jid: str) -> None:
        """A job abandoned by a stopping worker goes back to its place in the queue."""
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE id = ? AND deleted = 1", (jid,))
            db.execute("UPDATE jobs SET status = 'queued', progress = 0, worker = NULL WHERE id = ?", (jid,))

    def forget(self, jid: str) -> None:
        """The row of a job deleted while it ran (its worker stopped and removed its files)."""
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (jid,))

    def is_deleted(self, jid: str) -> bool:
        row = self._db().execute("SELECT deleted FROM jobs WHERE id = ?", (jid,)).fetchone()
        return row is None or bool(row["deleted"])

    def heartbeat(self, worker: str, state: str, job: str | None = None, pid: int | None = None) -> None:
        db = self._db(durable=False)
        db.execute(
            "INSERT INTO workers (name, state, job, pid, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET state = excluded.state, job = excluded.job, pid = excluded.pid, "
            "updated_at = excluded.updated_at",
            (worker, state, job, pid, time.time()),
        )


def _job(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["spec"] = json.loads(d["spec"])
    d["public"] = json.loads(d["public"])
    return d
