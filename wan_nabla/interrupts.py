"""SIGTERM ends a run the way Ctrl-C does: cleanup runs, temp files go, the exit code says why.

    with handle_signals():        # the CLI's main: SIGINT and SIGTERM raise Interrupted
        run()                     # atomic_output, batch's finally blocks clean up as usual
    with deferred():              # a critical section (one manifest line): a signal waits for its end
        manifest.write(line)

`docker stop`, Kubernetes and batch schedulers send SIGTERM (then SIGKILL after a grace period).
Python's default for SIGTERM is to die at once, skipping every `finally`: temp files stay and a
half-written manifest line is possible. Here both signals raise Interrupted, a KeyboardInterrupt
subclass, so `except Exception` (batch's per-item isolation) never swallows it while every
`except BaseException` / `finally` cleanup runs. Exit code: 128 + the signal number, the shell's
convention: 130 for SIGINT, 143 for SIGTERM.

Limits: handlers run in the main thread between Python bytecodes, so a long C call (one
transformer step on a CPU) finishes first; SIGKILL cannot be handled (atomic writes still leave
no partial output, and batch resume removes the temp files such a kill leaves); handlers are only
installed from the main thread (elsewhere handle_signals does nothing).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)

_deferring = 0
_pending: int | None = None


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        return "interrupted (SIGINT)" if self.signum == signal.SIGINT else f"terminated ({name})"


def _handler(signum: int, frame) -> None:
    global _pending
    if _deferring:
        _pending = signum  # raised when the critical section ends
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Install the handlers for the block; the previous ones are restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in HANDLED}
    for s in HANDLED:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a SIGINT/SIGTERM that arrives inside the block until the block is done, then raise it."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)
