"""The generation loop of `wan-nabla serve`: take the oldest queued job, generate, publish, repeat.

    loaded = load_weights_for(server.config, device, server.model)   # once per process (main._work)
    with parallel_session(server.parallel) as ctx:
        gen = loaded.generator(ctx)
        Worker(server, JobQueue(db), videos_dir, gen, ctx, stop=threading.Event()).run()

One process: one Worker. Under torchrun every rank runs one, and the ranks form the groups of
`batch` (one rank per video, or ulysses_degree x (2 with --cfg-parallel) ranks per video). A
group's leader claims the next job from the shared SQLite queue (queue.py: claims take its write
lock, so two groups never get the same job) and hands it to its group; while idle it sends its
group an empty message every POLL_S, so the other ranks wait in a short CPU collective rather
than a long one that would hit parallel.timeout_s. The group generates the job together
(pipeline.VideoGenerator.generate); the leader writes MP4 + sidecar with output.sidecar.
publish_video (temp file, fsync, rename) as `<id>.mp4` / `<id>.json` in the videos directory,
then marks the job completed.

Per step the leader records progress (0-95 while denoising, 100 when completed) and learns
whether the job was deleted (stop at this step, remove its files) or the server is stopping
(the job goes back to the queue); under torchrun it tells its group, so all ranks stop at the
same step. A job that raises (bad luck, out of memory) is marked failed with its one-line reason
and the group goes on with the next job. Exactly once: a job whose MP4 and sidecar (naming this
job) already exist, from a run killed between the rename and the commit, is marked completed
without running again; temp files of killed writes are removed at start (remove_stale_temps).

Each job's preset (attention only) is swapped in before it runs (use_job_config) and stays until a
job needs another. Limits: the groups share one host (the queue is a local SQLite file).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..app import agreed, describe_failure
from ..output.files import temp_target
from ..output.publish import publish_video
from ..output.sidecar import sidecar_output, sidecar_path
from .preflight import JobSpec, ServerPlan
from .queue import JobQueue

log = logging.getLogger(__name__)

POLL_S = 0.2
CONTINUE, CANCELLED, STOPPING = 0, 1, 2


class _Stop(Exception):
    """Raised inside the step callback: the job was deleted (CANCELLED) or the server stops."""

    def __init__(self, flag: int):
        super().__init__("job deleted" if flag == CANCELLED else "server stopping")
        self.flag = flag


def video_paths(videos: Path, jid: str) -> tuple[Path, Path]:
    mp4 = videos / f"{jid}.mp4"
    return mp4, sidecar_path(mp4)


def remove_video(videos: Path, jid: str) -> None:
    for p in video_paths(videos, jid):
        p.unlink(missing_ok=True)


def remove_stale_temps(videos: Path) -> int:
    """Temp files that killed writes left in the videos directory (nothing else is there)."""
    removed = 0
    for entry in os.scandir(videos):
        if temp_target(entry.name) is not None and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


def published(videos: Path, jid: str) -> bool:
    """True if `<id>.mp4` and the sidecar that names it are both there (a finished publish)."""
    mp4, side = video_paths(videos, jid)
    owner = sidecar_output(side)
    return mp4.is_file() and owner is not None and Path(owner).name == mp4.name


def use_job_config(gen, cfg) -> None:
    """Give the loaded generator this job's config (VideoGenerator.use_config: attention is
    reinstalled when the job's preset differs from the last job's)."""
    gen.use_config(cfg)


class Worker:
    """One rank's loop (module doc). `stop` ends it: between jobs, or at the next step of a job,
    which then goes back to the queue."""

    def __init__(
        self, server: ServerPlan, queue: JobQueue, videos: Path, gen, ctx=None, stop: threading.Event | None = None
    ):
        self.server = server
        self.queue = queue
        self.videos = videos
        self.gen = gen
        self.ctx = ctx
        self.stop = stop or threading.Event()
        self.leader = ctx is None or ctx.is_leader
        self.name = "local" if ctx is None else f"rank{ctx.rank}"
        self.done = 0

    def _share(self, obj: Any) -> Any:
        """The leader's `obj` on every rank of the group."""
        return obj if self.ctx is None else self.ctx.broadcast(obj, scope="item")

    def run(self) -> None:
        base = self.server.config
        try:
            while True:
                msg = None
                if self.leader:
                    if self.stop.is_set():
                        msg = "stop"
                    else:
                        job = self.queue.claim(self.name)
                        msg = job if job is not None else None
                msg = self._share(msg)
                if msg == "stop":
                    return
                if msg is None:
                    if self.leader:
                        self.queue.heartbeat(self.name, "idle", pid=os.getpid())
                        self.stop.wait(POLL_S)
                    continue
                self.run_job(msg)
        finally:
            use_job_config(self.gen, base)
            if self.leader:
                self.queue.heartbeat(self.name, "stopped", pid=os.getpid())

    def run_job(self, job: dict[str, Any]) -> None:
        jid, spec = job["id"], JobSpec.from_dict(job["spec"])
        leader, ctx = self.leader, self.ctx
        if leader:
            self.queue.heartbeat(self.name, "busy", jid, os.getpid())
        t0 = time.perf_counter()
        if self._share(leader and published(self.videos, jid)):
            if leader:  # killed after the rename, before the commit: the files are this job's
                self.queue.finish(jid, f"{jid}.mp4", 0.0, spec.frames / spec.fps)
            return

        def on_step(i: int, _noise, _latents) -> None:
            flag = CONTINUE
            if leader:
                alive = self.queue.step(jid, int(95 * (i + 1) / spec.steps))
                flag = CANCELLED if not alive else STOPPING if self.stop.is_set() else CONTINUE
            flag = self._share(flag)
            if flag != CONTINUE:
                raise _Stop(flag)

        def write(result) -> dict[str, Any]:
            mp4, _ = video_paths(self.videos, jid)
            extra = {"serve": {"id": jid, "model_requested": spec.model, "preset": spec.preset, "worker": self.name}}
            return publish_video(self.gen, result, spec.prompt, mp4, extra=extra)

        try:
            cfg = spec.run_config(self.server)
            use_job_config(self.gen, cfg)
            result = agreed(
                ctx,
                lambda: self.gen.generate(spec.prompt, settings=cfg.generation, progress=False, on_step=on_step),
                scope="item",
            )
            record = agreed(ctx, lambda: write(result), here=leader, scope="item")
            steps_s = float(sum(result.timings.get("per_step_s") or ()))
            result = None
            if leader:
                if self.queue.is_deleted(jid):  # deleted between its last step and the publish
                    remove_video(self.videos, jid)
                    self.queue.forget(jid)
                else:
                    self.queue.finish(jid, f"{jid}.mp4", steps_s, record["video"].get("frames", spec.frames) / spec.fps)
                    log.info("%s: %s done in %.2fs", self.name, jid, time.perf_counter() - t0)
            self.done += 1
        except _Stop as s:
            if leader:
                remove_video(self.videos, jid)
                if s.flag == CANCELLED:
                    self.queue.forget(jid)
                    log.info("%s: %s cancelled", self.name, jid)
                else:
                    self.queue.requeue(jid)
        except Exception as exc:  # noqa: BLE001 - a failed job must not stop the server
            if leader:
                reason = describe_failure(exc)
                log.warning("%s: %s failed: %s", self.name, jid, reason)
                remove_video(self.videos, jid)
                if self.queue.is_deleted(jid):
                    self.queue.forget(jid)
                else:
                    self.queue.fail(jid, "generation_failed", reason)
            _release_memory()
        except BaseException:  # interrupted (Ctrl-C): the job goes back to the queue
            if leader:
                remove_video(self.videos, jid)
                self.queue.requeue(jid)
            raise


def _release_memory() -> None:
    gc.collect()

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
