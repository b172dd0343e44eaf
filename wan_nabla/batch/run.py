"""`wan-nabla batch`: many prompts, one loaded pipeline, resumable, one bad item never stops the run.

    wan-nabla batch examples/example_prompts.jsonl --config nabla_0.7 --out-dir outputs/run1
    run_batch(plan, request)   # after preflight.plan_batch; 0: all ok or done; 1: some item failed

Algorithm
1. Plan (nothing loaded, nothing written; plan.py): config < command-line flags < the item's own
   fields give each item's settings, seed and key; a line that is malformed or has a bad value
   becomes a failed item with a one-line reason (prompts.py reads the file).
2. Identity: the item's `key` is stored in the manifest and in the sidecar (`batch.key`).
   An item is done iff the last ok/skipped manifest record with its key names an MP4 in the output
   directory that decodes completely with the expected frame count and whose sidecar carries the
   key. A changed prompt, setting or position is a new key, so it is never mistaken for done.
3. Names: a done item keeps its file; every other item gets safe_slug(name or prompt) + ".mp4",
   suffixed -2, -3, ... past names of this run and past any existing file whose sidecar is not
   this item's (its own leftover from a killed attempt is reused; other files are never touched).
4. Run: lock the output directory, load the pipeline once (only if something is left to do), then
   per item generate, write MP4 + sidecar atomically and append one manifest record (fsynced). Any
   exception of an item (CUDA out-of-memory included) is recorded as failed; memory is released
   (gc, CUDA cache) and the run goes on. Leftover temp files of killed writes are removed.
   SIGINT/SIGTERM stop the run between bytecodes like Ctrl-C: the item in progress is abandoned
   (its temp files removed), no manifest line is cut (interrupts.py), exit 130/143; the same
   command resumes.

Under torchrun (`torchrun --nproc-per-node N -m wan_nabla batch ...`) the ranks form groups of
ulysses_degree x (2 if cfg_parallel else 1) ranks (one rank each without those flags: one pipeline
per GPU). Every rank plans the same items from the same file; rank 0 alone locks the directory,
checks what is done and names the outputs (steps 2-3), then sends those names to all. Each
group's leader claims the next pending item from a counter rank 0 serves (distributed/claims.py),
so every item runs exactly once and fast groups take more items; the group generates it together,
its leader writes the files and appends the record (one manifest, one line per append). Resume,
names and failure isolation are those of one process; a failure of one rank in the middle of a
step (not of the whole group) cannot be isolated: its partners wait in a collective until
parallel.timeout_s, and torchrun ends the run (rerun to resume).

Across nodes, `--engine ray` runs the same plan on a pool of Ray actors (ray_engine.py,
docs/scale_out.md): this process plans, names and writes the manifest, the actors call
item.run_item.

Limits: resuming after editing the file re-keys items whose index moved (a line inserted above
them), so those are generated again under new names; the old files are left alone. Verifying done
items decodes each of their MP4s once per run (fast for clips, linear in their number).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..app import (
    agreed,
    check_environment,
    item_check,
    load_generator,
    load_weights_for,
    parallel_plan,
    parallel_session,
)
from ..distributed.claims import WorkClaims
from ..preflight import RunPlan, window_covers_grid
from ..requests import BatchRequest
from .item import HeldOutDir, record_planned, run_item
from .manifest import MANIFEST_NAME, ManifestWriter, read_manifest
from .plan import PlannedItem, plan_item
from .ray_engine import run_ray
from .resume import assign_outputs, remove_stale_temps

log = logging.getLogger(__name__)


def print_plan(planned: list[PlannedItem], out_dir: Path) -> None:
    print(f"{'index':>5} {'line':>5}  {'status':<10} {'seed':>10} {'size':>9} {'frames':>6} {'steps':>5}  name")
    for p in planned:
        i = p.item
        if p.error:
            print(f"{i.index:>5} {i.line:>5}  {'invalid':<10} {'-':>10} {'-':>9} {'-':>6} {'-':>5}  {p.error}")
            continue
        g, status = p.settings, ("would-skip" if p.done else "would-run")
        size = f"{g.width}x{g.height}"
        print(
            f"{i.index:>5} {i.line:>5}  {status:<10} {g.seed:>10} {size:>9} {g.frames:>6} {g.steps:>5}  {p.output.name}"
        )
    invalid = sum(1 for p in planned if p.error)
    skip = sum(1 for p in planned if p.done)
    print(
        f"dry run: {len(planned)} items: {len(planned) - invalid - skip} would run, {skip} already done, "
        f"{invalid} invalid; output directory {out_dir}"
    )


def run_batch(plan: RunPlan, req: BatchRequest, on_record: Callable[[dict[str, Any]], None] | None = None) -> int:
    """The `batch` subcommand after preflight (see module doc); `on_record` sees every manifest
    record as it is written. `req.engine` "ray" runs the same plan on a pool of Ray actors
    (ray_engine.py; preflight checked its options)."""
    engine = req.engine or "local"
    if engine != "ray":
        check_environment(plan)  # under Ray the actors check the device, which this machine need not have
    cfg, out_dir = plan.config, plan.output
    check = item_check(plan.facts, cfg.attention)
    planned = [plan_item(cfg, it, plan.model_label, check=check) for it in plan.items]
    if cfg.parallel.cfg_parallel:
        for p in planned:
            if p.settings is not None and p.settings.guidance_scale <= 1.0:
                p.error = (
                    f"line {p.item.line}: guidance_scale: {p.settings.guidance_scale:g} turns classifier-free "
                    f"guidance off, which --cfg-parallel needs; use a value > 1"
                )
    _warn_covered(plan, planned)
    if req.dry_run:
        if plan.parallel is None or plan.parallel.launch.rank == 0:
            assign_outputs(planned, out_dir, read_manifest(out_dir / MANIFEST_NAME))
            print_plan(planned, out_dir)
        return 1 if any(p.error for p in planned) else 0
    if engine == "ray":
        assert plan.ray is not None, "preflight.plan_batch checks the Ray options"
        counts = run_ray(plan.ray, cfg, planned, out_dir, req.flags.quiet, on_record, plan.model)
        print(
            f"batch: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped (already done) "
            f"of {len(planned)}; outputs and {MANIFEST_NAME} in {out_dir}"
        )
        return 1 if counts["failed"] else 0
    pplan = parallel_plan(plan)
    loaded = None
    if pplan is not None and _preview_pending(planned, out_dir):
        loaded = load_weights_for(cfg, pplan.device, plan.model)  # before the process group, like generate
    with parallel_session(pplan) as ctx:
        counts = _execute(cfg, planned, out_dir, req.flags.quiet, ctx, on_record, loaded, plan.model)
    if ctx is None or ctx.is_main:
        print(
            f"batch: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped (already done) "
            f"of {len(planned)}; outputs and {MANIFEST_NAME} in {out_dir}"
        )
    return 1 if counts["failed"] else 0


def _warn_covered(plan: RunPlan, planned: list[PlannedItem]) -> None:
    """One warning for items whose size makes the STA window cover the whole grid (full attention)."""
    covered = [
        p
        for p in planned
        if p.settings is not None and window_covers_grid(plan.config.attention, plan.facts, p.settings)
    ]
    if covered and not plan.notes:
        first = window_covers_grid(plan.config.attention, plan.facts, covered[0].settings)
        log.warning("%d of %d items: %s", len(covered), len(planned), first)


def _preview_pending(planned: list[PlannedItem], out_dir: Path) -> bool:
    """Whether anything is left to do, from a read-only look at the directory (every rank, before
    the process group; rank 0's plan under the lock is the one that counts)."""
    preview = [dataclasses.replace(p) for p in planned]
    assign_outputs(preview, out_dir, read_manifest(out_dir / MANIFEST_NAME))
    return any(p.error is None and p.done is None for p in preview)


def _share_outputs(ctx, planned: list[PlannedItem], out_dir: Path) -> set[str]:
    """Rank 0's names and done records on every rank (all ranks planned the same items)."""
    shared = ctx.broadcast([(p.output.name if p.output else None, p.done) for p in planned])
    for p, (name, done) in zip(planned, shared, strict=False):
        p.output, p.done = (out_dir / name if name else None), done
    return {name for name, _ in shared if name}


def _execute(
    cfg, planned, out_dir: Path, quiet: bool, ctx, on_record, loaded=None, model: str | None = None
) -> dict[str, int]:
    main = ctx is None or ctx.is_main
    held = agreed(ctx, lambda: HeldOutDir(out_dir, planned), here=main)
    names = held.names if held is not None else set()
    if ctx is not None:
        names = _share_outputs(ctx, planned, out_dir)
    manifest = held.manifest if held is not None else None
    gen = None
    try:
        pending = [p for p in planned if p.error is None and p.done is None]
        if pending:
            if loaded is None:  # one process; or the directory changed since the ranks' preview
                log.info("resolved config: %s", cfg.to_dict())
            try:
                # Built once, bound to this run's parallel context (weights read earlier under torchrun).
                gen = agreed(
                    ctx, lambda: loaded.generator(ctx) if loaded is not None else load_generator(cfg, ctx, model)
                )
            except BaseException:
                if held is not None:
                    held.discard(out_dir)
                raise
        if manifest is None and ctx is not None and ctx.is_leader:
            manifest = ManifestWriter(out_dir / MANIFEST_NAME, owner=False)
        return _run_all(planned, pending, gen, manifest, names, out_dir, quiet, on_record, ctx)
    finally:
        if gen is not None:
            gen.close()
        if manifest is not None:
            manifest.close()
        if held is not None and out_dir.is_dir():  # a discarded run may have removed it
            remove_stale_temps(out_dir, names)


def _claimed(pending: list[PlannedItem], claims):
    """The items this rank works on: all in order (one process), or its group's claims."""
    if claims is None:
        yield from pending
        return
    while (k := claims.next()) < len(pending):
        yield pending[k]


def _run_all(planned, pending, gen, manifest, names, out_dir, quiet, on_record, ctx) -> dict[str, int]:
    main = ctx is None or ctx.is_main
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    total = len(planned)
    claims = None
    if ctx is not None:
        claims = WorkClaims(ctx)

    def write(rec: dict[str, Any]) -> None:
        manifest.append(rec)
        counts[rec["status"]] += 1
        if on_record is not None:
            on_record(rec)

    if main:
        record_planned(planned, write)
    initial = total - len(pending)
    bar = tqdm(
        total=total,
        initial=initial,
        desc="batch",
        unit="video",
        position=0,
        disable=quiet or not main,
        dynamic_ncols=True,
    )
    bar.set_postfix(failed=counts["failed"])
    with bar, contextlib.nullcontext() if quiet else logging_redirect_tqdm():
        for p in _claimed(pending, claims):
            rec = run_item(gen, p, names, out_dir, progress=not quiet and main, ctx=ctx)
            if rec is None:
                continue
            write(rec)
            if rec["status"] == "ok":
                log.info("item %d: %s (%.1fs)", p.item.index, p.output.name, rec["timings"]["total_s"])
            else:
                log.warning("item %d failed: %s", p.item.index, rec["error"])
            if claims is None:
                bar.update(1)
            else:  # every group's finished items, as counted by the claims counter
                bar.update(initial + claims.count("done") - bar.n)
            bar.set_postfix(failed=counts["failed"])
    if ctx is None:
        return counts
    ctx.barrier()  # every group is done with its last item (parallel.timeout_s bounds the wait)
    return ctx.broadcast(_totals(ctx, counts))


def _totals(ctx, counts: dict[str, int]) -> dict[str, int]:
    """The counts of all leaders' records (gathered on rank 0)."""
    every = ctx.gather_to_main(counts)
    return {k: sum(c[k] for c in every) for k in counts} if every is not None else counts
