"""`wan-nabla batch`: many prompts, one loaded pipeline, resumable, one bad item never stops the run.

    wan-nabla batch scripts/example_prompts.jsonl --config nabla_0.7 --out-dir outputs/run1
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
0. Preflight (app.validate_run): the whole-run values (flags, config, device, model) are
   checked before anything is planned or written; a problem there is exit 2 with nothing
   written, not even the output directory.
4. Run: lock manifest.jsonl, load the pipeline once (only if something is left to do), then per
   item generate, write MP4 + sidecar atomically and append one manifest record (fsynced). Any
   exception of an item (CUDA out-of-memory included) is recorded as failed; memory is released
   (gc, CUDA cache) and the run goes on. Leftover temp files of killed writes are removed.
   SIGINT/SIGTERM stop the run between bytecodes like Ctrl-C: the item in progress is abandoned
   (its temp files removed), no manifest line is cut (interrupts.py), exit 130/143; the same
   command resumes.

Limits: resuming after editing the file re-keys items whose index moved (a line inserted above
them), so those are generated again under new names; the old files are left alone. Verifying done
items decodes each of their MP4s once per run (fast for clips, linear in their number).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..app import UsageError, check_text, describe_failure, load_generator, resolve_run_config, validate_run
from ..output.files import ensure_writable_dir, remove_created_dirs
from ..output.naming import unique_path
from ..output.sidecar import publish_video, sidecar_path
from .manifest import MANIFEST_NAME, ManifestWriter, read_manifest
from .plan import PlannedItem, plan_item
from .prompts import PromptFileError, read_prompt_file
from .resume import assign_outputs, free_or_own, remove_stale_temps

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _record(p: PlannedItem, status: str, **fields: Any) -> dict[str, Any]:
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
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_item(gen, p: PlannedItem, names: set[str], out_dir: Path, progress: bool) -> dict[str, Any]:
    """Generate and write one item; returns its manifest record (ok or failed), never raises Exception."""
    g, error = p.settings, None
    t0 = time.perf_counter()
    try:
        if not free_or_own(p.output, p.key):  # someone put a file there since planning: never overwrite it
            p.output = unique_path(out_dir, p.item.name or p.item.prompt, taken=names,
                                   available=lambda c: free_or_own(c, p.key))
            names.add(p.output.name)
        result = gen.generate(p.item.prompt, negative_prompt=g.negative_prompt, progress=progress, size=g.size,
                              frames=g.frames, steps=g.steps, guidance_scale=g.guidance_scale, shift=g.shift,
                              seed=g.seed, fps=g.fps)
        density = result.attention.get("overall")
        side = _write_video(gen, result, p)
        del result
        timings = {k: v for k, v in side["timings"].items() if k not in ("per_step_s", "load_s")}
        timings["total_s"] = time.perf_counter() - t0
        return _record(p, "ok", timings=timings, attention_density=density)
    except Exception as exc:  # noqa: BLE001 - isolation is the point; KeyboardInterrupt still stops the run
        error = f"line {p.item.line}: {describe_failure(exc)}"
        log.debug("item %d failed", p.item.index, exc_info=True)
    _release_memory()  # after the except block, so the traceback (and its tensors) is already gone
    return _record(p, "failed", error=error)


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
    """The `batch` subcommand (see module doc); `on_record` sees every manifest record as it is written."""
    cfg = resolve_run_config(args)
    try:
        items = read_prompt_file(args.prompts)
    except PromptFileError as e:
        raise UsageError(str(e)) from None
    out_dir = Path(args.out_dir).expanduser()
    check_text(str(out_dir), "--out-dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir: {str(out_dir)!r} exists and is not a directory")
    facts = validate_run(cfg)
    model_id = facts.model
    planned = [plan_item(cfg, it, model_id, check=facts.check) for it in items]
    if args.dry_run:
        assign_outputs(planned, out_dir, read_manifest(out_dir / MANIFEST_NAME))
        print_plan(planned, out_dir)
        return 1 if any(p.error for p in planned) else 0

    created: list[Path] = []
    ensure_writable_dir(out_dir, created)
    manifest_path = out_dir / MANIFEST_NAME
    had_manifest = manifest_path.exists()

    def undo() -> None:  # a run stopped before its first record leaves nothing behind
        if not had_manifest:
            manifest_path.unlink(missing_ok=True)
        remove_created_dirs(created)

    try:
        manifest = ManifestWriter(manifest_path)
    except BaseException:  # e.g. locked by another batch: its manifest is not ours to remove
        remove_created_dirs(created)
        raise
    with manifest:
        names = assign_outputs(planned, out_dir, read_manifest(manifest_path))
        remove_stale_temps(out_dir, names)
        pending = [p for p in planned if p.error is None and p.done is None]
        gen = None
        if pending:
            log.info("resolved config: %s", cfg.to_dict())
            try:
                gen = load_generator(cfg, model_id)
            except BaseException:
                undo()
                raise
        try:
            counts = _run_all(planned, pending, gen, manifest, names, out_dir, args.quiet, on_record)
        finally:
            if gen is not None:
                gen.close()
            remove_stale_temps(out_dir, names)
    print(f"batch: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped (already done) "
          f"of {len(planned)}; outputs and {MANIFEST_NAME} in {out_dir}")
    return 1 if counts["failed"] else 0


def _run_all(planned, pending, gen, manifest, names, out_dir, quiet, on_record) -> dict[str, int]:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    counts = {"ok": 0, "failed": 0, "skipped": 0}
    total = len(planned)

    def write(rec: dict[str, Any]) -> None:
        manifest.append(rec)
        counts[rec["status"]] += 1
        if on_record is not None:
            on_record(rec)

    for p in planned:
        if p.error:
            log.warning("item %d failed: %s", p.item.index, p.error)
            write(_record(p, "failed", error=p.error))
        elif p.done:
            write(_record(p, "skipped", attention_density=p.done.get("attention_density")))
    bar = tqdm(total=total, initial=total - len(pending), desc="batch", unit="video", position=0,
               disable=quiet, dynamic_ncols=True)
    bar.set_postfix(failed=counts["failed"])
    with bar, (contextlib.nullcontext() if quiet else logging_redirect_tqdm()):
        for n, p in enumerate(pending, start=total - len(pending) + 1):
            rec = run_item(gen, p, names, out_dir, progress=not quiet)
            write(rec)
            if rec["status"] == "ok":
                log.info("[%d/%d] item %d: %s (%.1fs)", n, total, p.item.index, p.output.name,
                         rec["timings"]["total_s"])
            else:
                log.warning("[%d/%d] item %d failed: %s", n, total, p.item.index, rec["error"])
            bar.set_postfix(failed=counts["failed"])
            bar.update(1)
    return counts
