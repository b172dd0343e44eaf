"""`wan-nabla serve`: check the flags, open the data directory, serve HTTP, run the worker(s).

    wan-nabla serve --model tiny --port 8000 --data-dir serve-data
    torchrun --nproc-per-node 4 -m wan_nabla serve --config nabla_0.7 --port 8000   # 4 groups of 1 GPU
    run_serve(ServeRequest(port=8000, flags=RunFlags(model="tiny")))   # the subcommand; returns the exit code

Order: the flags are checked like `generate`'s (preflight.server_plan: exit 2, nothing bound or
written); rank 0 (or the only process) takes the data directory's lock (a second server on the
same directory is refused), moves jobs that were running back to the queue, removes temp files of
killed writes, then starts uvicorn on --host/--port in its main thread; /health says "loading"
while its worker thread loads the model once. Every other torchrun rank runs its worker in its
main thread and never opens a port. All ranks load their model before the process group exists
(as generate/batch do), then meet at one barrier after rank 0 has recovered the queue.

Stopping: SIGINT/SIGTERM end uvicorn (rank 0) or the worker loop (other ranks); a job in progress
stops at its next step and goes back to the queue. A SIGKILL loses nothing committed: the next
start requeues what was running. Exit codes: 130 / 143 after SIGINT / SIGTERM (uvicorn first
finishes the requests in flight, then the CLI's convention applies), 1 if the model failed to
load, 2 for bad flags (one line naming the value).

Binding an address other than loopback needs an API key (--api-key or WAN_NABLA_API_KEY).
WAN_NABLA_HEALTH_FILE (set in the Docker image): where rank 0 writes its /health URL for the
container's HEALTHCHECK (healthcheck.py) while it serves.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
from pathlib import Path

from ..app import describe_failure, load_weights_for, parallel_session
from ..distributed import Launch
from ..output.files import OutputError, atomic_write_text, ensure_writable_dir
from ..requests import ServeRequest
from .options import HEALTH_FILE_ENV, check_flags
from .preflight import server_plan
from .queue import JobQueue
from .worker import Worker, remove_stale_temps

log = logging.getLogger(__name__)


class DataDir:
    """The data directory, locked by one server (fcntl; released when the process ends, even by SIGKILL)."""

    def __init__(self, path: Path):
        self.path = ensure_writable_dir(path)
        self.videos = ensure_writable_dir(self.path / "videos")
        self.queue_path = self.path / "queue.sqlite3"

        self._lock = open(self.path / "serve.lock", "a")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise OutputError(f"--data-dir: {str(self.path)!r} is in use by another wan-nabla serve") from None


def run_serve(req: ServeRequest) -> int:
    """The `serve` command (module doc); returns the exit code."""
    key = check_flags(req)
    server = server_plan(req.flags)
    launch = Launch.from_env()
    main = not launch.distributed or launch.rank == 0
    data = Path(req.data_dir).expanduser()
    if main:
        held = DataDir(data)

        queue = JobQueue(held.queue_path)
        back = queue.recover()
        if back:
            log.info("%d job(s) that were running go back to the queue", len(back))
        remove_stale_temps(held.videos)
        queue.close()
        return _serve_http(req, key, server, held)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    _work(server, data / "queue.sqlite3", data / "videos", stop, None)
    return 0


def _work(server, queue_path: Path, videos: Path, stop: threading.Event, state) -> None:
    """Load the model, join the process group, loop over jobs until `stop` (every rank)."""
    pplan = server.parallel
    # weights read before the process group (like generate); the generator is built once, bound to it
    loaded = load_weights_for(server.config, pplan.device if pplan is not None else None, server.model)
    gen = None
    try:
        with parallel_session(pplan) as ctx:
            gen = loaded.generator(ctx)
            if ctx is not None:
                ctx.barrier()  # rank 0 recovered the queue before its worker started
            queue = JobQueue(queue_path)
            if state is not None:
                state.status = "ok"
                log.info("model loaded; serving jobs")
            try:
                Worker(server, queue, videos, gen, ctx, stop).run()
            finally:
                queue.close()
    finally:
        if gen is not None:
            gen.close()


def _serve_http(req: ServeRequest, key: str | None, server, held: DataDir) -> int:
    import uvicorn

    from .app import ServeState, create_app

    state = ServeState(server, held.queue_path, held.videos, api_key=key, max_queue=req.max_queue)
    app = create_app(state)
    config = uvicorn.Config(
        app,
        host=req.host,
        port=req.port,
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=5,
    )
    http = uvicorn.Server(config)
    stop = threading.Event()
    failed: list[BaseException] = []

    def work() -> None:
        try:
            _work(server, held.queue_path, held.videos, stop, state)
        except BaseException as e:  # noqa: BLE001 - told through /health and the exit code
            failed.append(e)
            state.status, state.error = "error", describe_failure(e)
            log.error("worker stopped: %s", state.error)
            http.should_exit = True

    worker = threading.Thread(target=work, name="wan-nabla-worker", daemon=True)
    worker.start()
    health_file = os.environ.get(HEALTH_FILE_ENV)
    try:
        with _announce(http, health_file):
            http.run()
    finally:
        stop.set()
        worker.join(timeout=600)
    return 1 if failed else 0


@contextlib.contextmanager
def _announce(http, health_file: str | None):
    """Log the bound address (and write the health URL for the HEALTHCHECK) once uvicorn listens."""
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not http.started:
            done.wait(0.05)
        if not http.started:
            return
        sock = http.servers[0].sockets[0].getsockname()
        host = sock[0] if sock[0] not in ("0.0.0.0", "::") else "127.0.0.1"
        url = f"http://{'[' + host + ']' if ':' in host else host}:{sock[1]}"
        print(f"wan-nabla serve: listening on {url}", flush=True)
        if health_file:
            with contextlib.suppress(OSError):
                atomic_write_text(health_file, f"{url}/health {os.getpid()}\n")

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        if health_file:
            with contextlib.suppress(OSError):
                Path(health_file).unlink()
