"""`wan-nabla batch`: many prompts, one loaded pipeline, resumable, one bad item never stops the run.

    wan-nabla batch examples/example_prompts.jsonl --config nabla_0.7 --out-dir outputs/run1
    run_batch(args)   # 0: every item ok or already done; 1: some item failed; bad input: UsageError (2)

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
from pathlib import Path
from typing import Any, Callable

from ..app import (UsageError, agreed, check_parallel, check_text, load_generator, model_label, parallel_session,
                   resolve_run_config, validate_run)
from .item import HeldOutDir, record_planned, run_item
from .manifest import MANIFEST_NAME, ManifestWriter, read_manifest
from .plan import PlannedItem, plan_item
from .prompts import PromptFileError, read_prompt_file
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
        print(f"{i.index:>5} {i.line:>5}  {status:<10} {g.seed:>10} {size:>9} {g.frames:>6} "
              f"{g.steps:>5}  {p.output.name}")
    invalid = sum(1 for p in planned if p.error)
    skip = sum(1 for p in planned if p.done)
    print(f"dry run: {len(planned)} items: {len(planned) - invalid - skip} would run, {skip} already done, "
          f"{invalid} invalid; output directory {out_dir}")


def run_batch(args, on_record: Callable[[dict[str, Any]], None] | None = None) -> int:
    """The `batch` subcommand (see module doc); `on_record` sees every manifest record as it is written.
    `args.engine` "ray" runs the same plan on a pool of Ray actors (ray_engine.py)."""
    engine = getattr(args, "engine", None) or "local"
    if engine == "ray":
        from .ray_engine import RayOptions

        ray_options = RayOptions.from_args(args)  # bad --ray-* values and a missing ray: exit 2 first
    cfg = resolve_run_config(args)
    try:
        items = read_prompt_file(args.prompts)
    except PromptFileError as e:
        raise UsageError(str(e)) from None
    out_dir = Path(args.out_dir).expanduser()
    check_text(str(out_dir), "--out-dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir: {str(out_dir)!r} exists and is not a directory")
    if engine == "ray":
        ray_options.check(cfg)
    ranks = check_parallel(cfg, "batch")  # every rank, before anything is written or loaded
    # device, model, LoRAs, sampler and rotary limits (exit 2, nothing written); under Ray the
    # actors check the device, which the driver's machine need not have
    facts = validate_run(cfg if engine == "local" else cfg.override(device="auto"))
    model_id = model_label(cfg)
    planned = [plan_item(cfg, it, model_id, check=facts.check) for it in items]
    if cfg.parallel.cfg_parallel:
        for p in planned:
            if p.settings is not None and p.settings.guidance_scale <= 1.0:
                p.error = (f"line {p.item.line}: guidance_scale: {p.settings.guidance_scale:g} turns classifier-free "
                           f"guidance off, which --cfg-parallel needs; use a value > 1")
    if args.dry_run:
        if ranks is None or ranks[0].rank == 0:
            assign_outputs(planned, out_dir, read_manifest(out_dir / MANIFEST_NAME))
            print_plan(planned, out_dir)
        return 1 if any(p.error for p in planned) else 0
    if engine == "ray":
        from .ray_engine import run_ray

        counts = run_ray(ray_options, cfg, planned, out_dir, args.quiet, on_record, facts.model)
        print(f"batch: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped (already done) "
              f"of {len(planned)}; outputs and {MANIFEST_NAME} in {out_dir}")
        return 1 if counts["failed"] else 0
    gen = None
    if ranks is not None and _preview_pending(planned, out_dir):
        gen = load_generator(cfg, ranks, facts.model)  # before the process group, like generate (app.py)
    with parallel_session(ranks) as ctx:
        counts = _execute(cfg, planned, out_dir, args.quiet, ctx, on_record, gen, facts.model)
    if ctx is None or ctx.is_main:
        print(f"batch: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped (already done) "
              f"of {len(planned)}; outputs and {MANIFEST_NAME} in {out_dir}")
    return 1 if counts["failed"] else 0


def _preview_pending(planned: list[PlannedItem], out_dir: Path) -> bool:
    """Whether anything is left to do, from a read-only look at the directory (every rank, before
    the process group; rank 0's plan under the lock is the one that counts)."""
    preview = [dataclasses.replace(p) for p in planned]
    assign_outputs(preview, out_dir, read_manifest(out_dir / MANIFEST_NAME))
    return any(p.error is None and p.done is None for p in preview)


def _share_outputs(ctx, planned: list[PlannedItem], out_dir: Path) -> set[str]:
    """Rank 0's names and done records on every rank (all ranks planned the same items)."""
    shared = ctx.broadcast([(p.output.name if p.output else None, p.done) for p in planned])
    for p, (name, done) in zip(planned, shared):
        p.output, p.done = (out_dir / name if name else None), done
    return {name for name, _ in shared if name}


def _execute(cfg, planned, out_dir: Path, quiet: bool, ctx, on_record, gen=None,
             model: str | None = None) -> dict[str, int]:
    main = ctx is None or ctx.is_main
    try:
        held = agreed(ctx, lambda: HeldOutDir(out_dir, planned), here=main)
    except BaseException:
        if gen is not None:
            gen.close()
        raise
    names = held.names if held is not None else set()
    if ctx is not None:
        names = _share_outputs(ctx, planned, out_dir)
    manifest = held.manifest if held is not None else None
    try:
        pending = [p for p in planned if p.error is None and p.done is None]
        if pending and gen is None:  # one process; or the directory changed since the ranks' preview
            log.info("resolved config: %s", cfg.to_dict())
            try:
                gen = agreed(ctx, lambda: load_generator(cfg, ctx, model))
            except BaseException:
                if held is not None:
                    held.discard(out_dir)
                raise
        if gen is not None:
            gen.use_parallel(ctx)
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
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    main = ctx is None or ctx.is_main
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    total = len(planned)
    claims = None
    if ctx is not None:
        from ..distributed.claims import WorkClaims

        claims = WorkClaims(ctx)

    def write(rec: dict[str, Any]) -> None:
        manifest.append(rec)
        counts[rec["status"]] += 1
        if on_record is not None:
            on_record(rec)

    if main:
        record_planned(planned, write)
    initial = total - len(pending)
    bar = tqdm(total=total, initial=initial, desc="batch", unit="video", position=0,
               disable=quiet or not main, dynamic_ncols=True)
    bar.set_postfix(failed=counts["failed"])
    with bar, (contextlib.nullcontext() if quiet else logging_redirect_tqdm()):
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
