"""`wan-nabla batch --engine ray`: the same batch on a pool of Ray actors, one pipeline per GPU.

    wan-nabla batch prompts.jsonl --out-dir /shared/run1 --engine ray [--ray-address HOST:6379]
        [--ray-actors N] [--max-retries 2] [--ray-transfer]
    run_ray(ray_options(request), cfg, planned, out_dir, quiet, on_record, model)  # run.py calls it

The driver (this process) plans exactly as a local batch (plan.py, resume.py: the same names,
seeds and keys), holds the output directory's lock, is the only writer of manifest.jsonl (no lock
shared between nodes) and alone decides what is done on resume. Each actor loads one pipeline on
one GPU (on the CPU when the cluster has none) and runs one item at a time through item.run_item,
the local batch's own per-item function; the driver hands the next pending item to whichever
actor is free, so fast actors take more items.

Outputs: by default every actor publishes its MP4 + sidecar into --out-dir itself (atomic
writers of output/files.py), so --out-dir must be storage every node can write at the same path
(NFS, Lustre, a FUSE bucket mount); an actor that cannot see a probe file the driver put there
refuses to start, naming the node. `--ray-transfer`: the actor encodes into a private temp
directory and returns the bytes; the driver publishes them (for an --out-dir on the driver's disk
only; costs one copy of the MP4 through Ray's object store per item, see docs/scale_out.md).

Faults: an actor that dies while running an item (process killed, node lost, out of memory) is
replaced by a fresh actor, and the item goes back to the queue for the next free actor, at most
--max-retries times; then it is recorded failed with the reason. If the dead actor had already
published the item completely (the MP4 decodes, the sidecar carries its key), it is recorded ok
and not run again: no item is published twice. An item that fails inside a live actor (an
exception, CUDA out of memory) is failed at once, as in a local batch. A killed driver takes its
actors with it (Ray ends the actors of a dead job); the manifest holds whole records only, and the
same command, with either engine, resumes.

Limits: one pipeline per actor (no --ulysses-degree / --cfg-parallel under Ray; use torchrun
within a node for that); an actor that cannot be placed (no free GPU) waits until one frees up;
if every actor fails to load, the run stops with the last reason and the items not yet run stay
unrecorded (a rerun does them). Ray is imported here only, when the engine is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..app import load_generator
from ..errors import UsageError, describe_failure
from ..log_setup import setup_logging
from ..output.files import atomic_output, atomic_write_bytes
from ..output.sidecar import sidecar_path
from .item import HeldOutDir, item_record, record_planned, run_item
from .plan import PlannedItem
from .ray_options import RAY_REQUIREMENT, RayOptions, ray_options  # noqa: F401 - re-exported
from .resume import free_or_own, remove_stale_temps, sidecar_key, verified_output

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_MB = 256
"""Object store of a local cluster started here: it carries item plans and, with --ray-transfer,
one MP4 per item in flight (a few MB), not tensors; Ray's default (30% of RAM) is far too much."""
PROBE_PREFIX = ".wan-nabla-ray-probe-"


def _one_line(exc: BaseException) -> str:
    """A Ray error's message without its traceback: its first line that says something."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith(("Traceback", "  File"))]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else '(no message)'}"


class BatchActor:
    """One loaded pipeline in one Ray actor process (wrapped by ray.remote in _actor_class).
    Construction never raises: a load failure is reported by info(), as one line."""

    def __init__(self, cfg, model: str, out_dir: str, probe: str | None, verbose: bool):
        setup_logging(quiet=not verbose, verbose=verbose)  # the CLI's levels, no loading bars

        self.out_dir = Path(out_dir)
        self.gen, self.error = None, None
        try:
            if probe is not None and not (self.out_dir / probe).exists():
                raise RuntimeError(
                    f"--out-dir {out_dir} is not the driver's directory on this node (its probe file is missing): "
                    "it must be storage shared by every node at the same path, or use --ray-transfer"
                )
            self.gen = load_generator(cfg, None, model)
        except Exception as exc:  # noqa: BLE001 - reported to the driver as one line
            self.error = describe_failure(exc)

    def info(self) -> dict[str, Any]:
        import ray

        node = ray.get_runtime_context().get_node_id()[:8]
        ip = ray.util.get_node_ip_address()
        device = str(self.gen.device) if self.gen is not None else None
        return {"error": self.error, "node": f"{ip}/{node}", "pid": os.getpid(), "device": device}

    def run(self, p: PlannedItem, transfer: bool) -> tuple[dict[str, Any], dict[str, bytes] | None]:
        """The item's manifest record, and with `transfer` the files for the driver to publish."""
        assert p.output is not None  # the driver names every item it sends
        if not transfer:
            rec = run_item(self.gen, p, set(), self.out_dir, progress=False, rename=False)
            assert rec is not None  # without a ParallelContext every caller is the writer
            return rec, None
        tmp = Path(tempfile.mkdtemp(prefix="wan-nabla-item-"))
        local = tmp / p.output.name
        try:
            rec = run_item(self.gen, dataclasses.replace(p, output=local), set(), tmp, progress=False, rename=False)
            assert rec is not None
            if rec["status"] != "ok":
                return rec, None
            side = json.loads(sidecar_path(local).read_text(encoding="utf-8"))
            side["output"] = str(p.output)  # where the driver publishes it, not this temp directory
            text = json.dumps(side, indent=2, ensure_ascii=False) + "\n"  # as output.files.atomic_write_json
            return rec, {"mp4": local.read_bytes(), "json": text.encode("utf-8")}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _connect(opts: RayOptions) -> bool:
    """Join the cluster (module doc); True if this call started Ray (and must shut it down)."""
    import ray

    if ray.is_initialized():  # an application (or a test) that already joined a cluster
        return False
    address = opts.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": opts.verbose,
        "logging_level": logging.WARNING,
    }
    if address is None:
        kwargs["object_store_memory"] = LOCAL_OBJECT_STORE_MB * 2**20
    log.info("ray: %s", f"joining the cluster at {address}" if address else "starting a local cluster")
    ray.init(address=address, **kwargs)
    return True


@dataclass(eq=False)
class _Slot:
    """One actor as the driver sees it."""

    id: int
    handle: Any
    ready: Any = None
    """The ObjectRef of its info() call until it answered."""
    node: str = "?"
    device: str = "?"
    items: int = 0
    busy_s: float = 0.0

    def rate(self) -> str:
        return f"{self.items / self.busy_s * 60:.1f}/min" if self.busy_s > 0 else "-"


class _Pool:
    """The actors, the queue and the retry bookkeeping of one run (module doc: Faults)."""

    def __init__(
        self,
        opts: RayOptions,
        cfg,
        model: str,
        out_dir: Path,
        probe: str | None,
        finish: Callable[[PlannedItem, dict[str, Any], _Slot | None, int], None],
    ):
        import ray

        self.ray, self.opts, self.out_dir = ray, opts, out_dir
        self.finish = finish
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if cfg.generation.device == "cuda" and not gpus:
            raise UsageError("--device cuda: the Ray cluster has no GPU (ray.cluster_resources()); use auto or cpu")
        use_gpu = gpus > 0 and cfg.generation.device != "cpu"
        self.count = opts.actors or gpus or 2
        self.cls = ray.remote(BatchActor).options(
            num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=0, max_task_retries=0
        )
        self.args = (cfg, model, str(out_dir), probe, opts.verbose)
        self.slots: list[_Slot] = []
        self.starting: dict[Any, _Slot] = {}
        self.idle: deque[_Slot] = deque()
        self.inflight: dict[Any, tuple[_Slot, PlannedItem, float]] = {}
        self.attempts: dict[int, int] = {}
        self.last_error: str | None = None
        self.next_id = 0
        for _ in range(self.count):
            self._start()

    def _start(self) -> None:
        slot = _Slot(self.next_id, self.cls.remote(*self.args))
        self.next_id += 1
        slot.ready = slot.handle.info.remote()
        self.starting[slot.ready] = slot

    def _drop(self, slot: _Slot) -> None:
        self.ray.kill(slot.handle, no_restart=True)
        if slot in self.slots:
            self.slots.remove(slot)

    def alive(self) -> bool:
        return bool(self.idle or self.inflight or self.starting)

    def wait_ready(self) -> None:
        """Until one actor has loaded its pipeline; RuntimeError if none could."""
        while not self.idle:
            if not self.starting:
                raise RuntimeError(f"no Ray actor could load the pipeline: {self.last_error}")
            done, _ = self.ray.wait(list(self.starting), num_returns=1, timeout=1.0)  # timeout: Ctrl-C works
            for ref in done:
                self._on_ready(ref)

    def _on_ready(self, ref) -> None:
        slot = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # died while loading (killed, node lost)
            info = {"error": _one_line(exc)}
        if info.get("error"):
            self.last_error = f"actor {slot.id}: {info['error']}"
            log.warning("ray actor %d failed to start: %s", slot.id, info["error"])
            self.ray.kill(slot.handle, no_restart=True)
            return
        slot.node, slot.device = info["node"], info["device"]
        log.info("ray actor %d ready on %s (%s, pid %s)", slot.id, slot.node, slot.device, info["pid"])
        self.slots.append(slot)
        self.idle.append(slot)

    def run(self, pending: list[PlannedItem], tick: Callable[[], None]) -> None:
        queue = deque(pending)
        while queue or self.inflight:
            while self.idle and queue:
                self._dispatch(self.idle.popleft(), queue.popleft())
            if not self.alive():
                raise RuntimeError(
                    f"no Ray actor is left for the {len(queue)} remaining item(s) "
                    f"(last: {self.last_error}); run the same command again to resume them"
                )
            done, _ = self.ray.wait([*self.inflight, *self.starting], num_returns=1, timeout=1.0)
            for ref in done:
                if ref in self.starting:
                    self._on_ready(ref)
                else:
                    self._on_result(ref, queue)
            tick()

    def _dispatch(self, slot: _Slot, p: PlannedItem) -> None:
        self.inflight[slot.handle.run.remote(p, self.opts.transfer)] = (slot, p, time.perf_counter())

    def _on_result(self, ref, queue: deque[PlannedItem]) -> None:
        slot, p, t0 = self.inflight.pop(ref)
        attempt = self.attempts.get(p.item.index, 0) + 1
        self.attempts[p.item.index] = attempt
        try:
            rec, files = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:  # raised inside a live actor: the item's own failure
            self.idle.append(slot)
            self.finish(p, item_record(p, "failed", error=f"line {p.item.line}: {_one_line(exc)}"), slot, attempt)
            return
        except self.ray.exceptions.RayError as exc:  # the actor died (killed, node lost, out of memory)
            self._on_death(slot, p, attempt, _one_line(exc), queue)
            return
        slot.items += 1
        slot.busy_s += time.perf_counter() - t0
        self.idle.append(slot)
        if files is not None:
            rec = _publish_transferred(p, rec, files)
        self.finish(p, rec, slot, attempt)

    def _on_death(self, slot: _Slot, p: PlannedItem, attempt: int, why: str, queue: deque[PlannedItem]) -> None:
        log.warning("ray actor %d died running item %d (attempt %d): %s", slot.id, p.item.index, attempt, why)
        self.last_error = f"actor {slot.id}: {why}"
        self._drop(slot)
        name = p.output.name if p.output is not None else None
        if not self.opts.transfer and verified_output({"output": name}, p, self.out_dir) is not None:
            self.finish(p, item_record(p, "ok"), None, attempt)  # published just before the death: keep it
        elif attempt > self.opts.max_retries:
            _remove_own_leftovers(p)
            error = (
                f"line {p.item.line}: the Ray actor running it died {attempt} time(s), last: {why} "
                f"(--max-retries {self.opts.max_retries})"
            )
            self.finish(p, item_record(p, "failed", error=error), None, attempt)
        else:
            queue.appendleft(p)  # the next free actor takes it
        if queue:  # a replacement; bounded: every death costs an item one of its attempts
            self._start()

    def close(self) -> None:
        for slot in [*self.slots, *self.starting.values()]:
            self.ray.kill(slot.handle, no_restart=True)
        self.slots.clear()
        self.starting.clear()


def _publish_transferred(p: PlannedItem, rec: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
    """--ray-transfer: write what an actor returned, in publish_video's order (the sidecar while
    the MP4 is still a temp file, then the MP4's rename); a failure fails the item, no file stays."""
    t0 = time.perf_counter()
    out = p.output
    assert out is not None  # every item that runs was given a name by assign_outputs
    side = sidecar_path(out)
    try:
        if not free_or_own(out, p.key or ""):
            raise RuntimeError(
                f"{out.name} appeared since planning and is not this item's; run the batch again "
                "to give the item a new name"
            )
        try:
            with atomic_output(out) as tmp:
                tmp.write_bytes(files["mp4"])
                atomic_write_bytes(side, files["json"])
        except BaseException:
            if side.exists() and not out.exists():
                side.unlink()
            raise
    except Exception as exc:  # noqa: BLE001 - the item fails, the run goes on
        return item_record(p, "failed", error=f"line {p.item.line}: {describe_failure(exc)}")
    rec["timings"] = {**(rec.get("timings") or {}), "transfer_s": time.perf_counter() - t0}
    return rec


def _remove_own_leftovers(p: PlannedItem) -> None:
    """A sidecar (and MP4) of this item that a killed actor left incomplete: partial files never stay."""
    if p.output is None:
        return
    side = sidecar_path(p.output)
    if sidecar_key(side) == p.key:
        p.output.unlink(missing_ok=True)
        side.unlink(missing_ok=True)


def run_ray(
    opts: RayOptions,
    cfg,
    planned: list[PlannedItem],
    out_dir: Path,
    quiet: bool,
    on_record: Callable[[dict[str, Any]], None] | None,
    model: str,
) -> dict[str, int]:
    """Run a planned batch on Ray (module doc); returns the counts of ok, failed and skipped records."""
    out_dir = out_dir.absolute()  # actors (other nodes, other working directories) need the full path
    held = HeldOutDir(out_dir, planned)
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    started = written = False
    pool = probe = None

    def write(rec: dict[str, Any]) -> None:
        nonlocal written
        held.manifest.append(rec)
        written = True
        counts[rec["status"]] += 1
        if on_record is not None:
            on_record(rec)

    try:
        pending = [p for p in planned if p.error is None and p.done is None]
        if pending:
            for stale in out_dir.glob(PROBE_PREFIX + "*"):  # a killed driver's (the lock says none runs)
                stale.unlink(missing_ok=True)
            if not opts.transfer:
                probe = out_dir / f"{PROBE_PREFIX}{secrets.token_hex(8)}"
                probe.touch()
            started = _connect(opts)
            bar = tqdm(total=len(planned), desc="batch", unit="video", disable=quiet, dynamic_ncols=True)

            def finish(p: PlannedItem, rec: dict[str, Any], slot: _Slot | None, attempt: int) -> None:
                rec["worker"] = {
                    "engine": "ray",
                    "actor": slot.id if slot else None,
                    "node": slot.node if slot else None,
                    "attempt": attempt,
                }
                write(rec)
                if rec["status"] == "failed":
                    log.warning("item %d failed: %s", p.item.index, rec["error"])
                bar.update(1)

            def tick() -> None:
                rates = " ".join(f"{s.id}:{s.rate()}" for s in pool.slots) if pool is not None else ""
                bar.set_postfix(failed=counts["failed"], actors=rates or "starting", refresh=False)
                bar.refresh()

            with bar, contextlib.nullcontext() if quiet else logging_redirect_tqdm():
                pool = _Pool(opts, cfg, model, out_dir, probe.name if probe else None, finish)
                pool.wait_ready()
                record_planned(planned, write)
                bar.update(len(planned) - len(pending))
                tick()
                pool.run(pending, tick)
            if not quiet:
                for s in pool.slots:
                    print(
                        f"ray actor {s.id} on {s.node} ({s.device}): {s.items} item(s), "
                        f"{s.busy_s / max(s.items, 1):.2f} s/item",
                        file=sys.stderr,
                    )
        else:
            record_planned(planned, write)
        return counts
    except BaseException:
        if probe is not None:
            probe.unlink(missing_ok=True)
        if not written:
            held.discard(out_dir)
        raise
    finally:
        if pool is not None:
            pool.close()
        if started:
            import ray

            ray.shutdown()
        if probe is not None:
            probe.unlink(missing_ok=True)
        held.manifest.close()
        if out_dir.is_dir():
            remove_stale_temps(out_dir, held.names)
