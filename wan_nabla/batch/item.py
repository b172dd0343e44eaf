"""One batch item, as every engine runs it: generate, publish MP4 + sidecar, make its manifest record.

    rec = run_item(gen, planned_item, names, out_dir, progress=False)   # never raises Exception
    held = HeldOutDir(out_dir, planned)     # the directory lock, the manifest writer, the names
    record_planned(planned, write)          # the failed (planning) and skipped (done) records

run.py (this process, or torchrun groups) and ray_engine.py (Ray actors) both call run_item, so
a local and a Ray batch write the same files and records; only the planner (run.py's process, or
the Ray driver) holds the directory (HeldOutDir) and writes the manifest.

Limits: run_item turns every Exception of an item into a failed record (KeyboardInterrupt and
SIGTERM still stop the run); with rename=False a file that appeared at the planned name since
planning fails the item instead of taking another name.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..app import agreed, describe_failure, warn_long_prompt
from ..output.files import ensure_writable_dir, remove_created_dirs
from ..output.naming import unique_path
from ..output.publish import publish_video
from ..output.sidecar import sidecar_path
from .manifest import MANIFEST_NAME, ManifestWriter, read_manifest
from .plan import PlannedItem
from .resume import assign_outputs, free_or_own, remove_stale_temps

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def item_record(p: PlannedItem, status: str, **fields: Any) -> dict[str, Any]:
    out = p.output
    rec = {
        "index": p.item.index, "line": p.item.line, "key": p.key, "prompt": p.item.prompt,
        "name": out.stem if out else None, "status": status,
        "output": out.name if out and status != "failed" else None,
        "sidecar": sidecar_path(out).name if out and status != "failed" else None,
        "seed": p.settings.seed if p.settings else None,
        "settings": p.settings.to_dict() if p.settings else None,
        "timings": None, "attention_density": None, "error": None, "time": _now(),
    }  # fmt: skip
    rec.update(fields)
    return rec


def _write_video(gen, result, p: PlannedItem) -> dict[str, Any]:
    """The batch entry (the item's key) goes into the sidecar in the same atomic step as the
    video: a resumed run must recognise its own files even after a kill right after the write."""
    batch = {"key": p.key, "index": p.item.index, "line": p.item.line, "manifest": MANIFEST_NAME}
    return publish_video(gen, result, p.item.prompt, p.output, extra={"batch": batch})


def _release_memory() -> None:
    """After a failed item: free what its frames held, and hand cached CUDA blocks back to the
    driver so the next item (often a smaller one after an out-of-memory) starts from a clean pool."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_item(
    gen, p: PlannedItem, names: set[str], out_dir: Path, progress: bool, ctx=None, rename: bool = True
) -> dict[str, Any] | None:
    """Generate and write one item; returns its manifest record (ok or failed), never raises Exception.
    With a ParallelContext all ranks of the group call it; the leader writes and gets the record,
    the others get None. Every engine runs its items through this function (ray_engine.py too).
    rename=False: other processes name outputs concurrently (torchrun groups, Ray actors), so a
    file that appeared at the planned name fails the item instead of taking another name."""
    g, error = p.settings, None
    writer = ctx is None or ctx.is_leader
    t0 = time.perf_counter()
    try:
        if writer and not free_or_own(p.output, p.key):  # someone put a file there since planning: never overwrite it
            if ctx is not None or not rename:  # others name concurrently; only the planner's names are collision-free
                raise RuntimeError(
                    f"{p.output.name} appeared since planning and is not this item's; run the batch "
                    f"again to give the item a new name"
                )
            p.output = unique_path(
                out_dir, p.item.name or p.item.prompt, taken=names, available=lambda c: free_or_own(c, p.key)
            )
            names.add(p.output.name)
        if writer:
            warn_long_prompt(gen, p.item.prompt, f"item {p.item.index}'s prompt (line {p.item.line})")
        result = agreed(
            ctx,
            lambda: gen.generate(p.item.prompt, settings=g, progress=progress),
            scope="item",
        )
        density = result.attention.get("overall")
        side = agreed(ctx, lambda: _write_video(gen, result, p), here=writer, scope="item")
        result = None  # the frames go before the record is made
        if not writer:
            return None
        timings = {k: v for k, v in side["timings"].items() if k not in ("per_step_s", "load_s")}
        timings["total_s"] = time.perf_counter() - t0
        return item_record(p, "ok", timings=timings, attention_density=density)
    except Exception as exc:  # noqa: BLE001 - isolation is the point; KeyboardInterrupt still stops the run
        error = f"line {p.item.line}: {describe_failure(exc)}"
        log.debug("item %d failed", p.item.index, exc_info=True)
    _release_memory()  # after the except block, so the traceback (and its tensors) is already gone
    return item_record(p, "failed", error=error) if writer else None


class HeldOutDir:
    """Rank 0's hold on the output directory: its lock (the manifest writer), the output names."""

    def __init__(self, out_dir: Path, planned: list[PlannedItem]):
        self.created: list[Path] = []
        ensure_writable_dir(out_dir, self.created)
        self.manifest_path = out_dir / MANIFEST_NAME
        self.had_manifest = self.manifest_path.exists()
        try:
            self.manifest = ManifestWriter(self.manifest_path)
        except BaseException:  # e.g. locked by another batch: its manifest is not ours to remove
            remove_created_dirs(self.created)
            raise
        try:
            self.names = assign_outputs(planned, out_dir, read_manifest(self.manifest_path))
            remove_stale_temps(out_dir, self.names)
        except BaseException:
            self.manifest.close()
            raise

    def discard(self, out_dir: Path) -> None:
        """A run stopped before its first record (a model that cannot be loaded, an interrupt)
        leaves nothing behind: no manifest it created, no directory it created."""
        if not self.had_manifest:
            self.manifest_path.unlink(missing_ok=True)
            remove_created_dirs(self.created)


def record_planned(planned: list[PlannedItem], write: Callable[[dict[str, Any]], None]) -> None:
    """The records every run starts with: planning failures, and items already done (skipped)."""
    for p in planned:
        if p.error:
            log.warning("item %d failed: %s", p.item.index, p.error)
            write(item_record(p, "failed", error=p.error))
        elif p.done:
            write(item_record(p, "skipped", attention_density=p.done.get("attention_density")))
