"""Resume: which batch items are already done, and which file each item may write.

    names = assign_outputs(planned, out_dir, read_manifest(out_dir / "manifest.jsonl"))
    remove_stale_temps(out_dir, names)

Every item has a `key` (batch.plan_item) that is stored in its manifest records and in its
sidecar JSON (`"batch": {"key": ...}`). Files are matched to items by that key, never by name:
- done: the last ok/skipped manifest record with the item's key names a plain file in out_dir, the
  MP4 decodes completely with the expected frame count (video.is_complete_mp4), and the sidecar
  beside it carries the key. Such an item keeps its file and is skipped.
- not done: the item gets safe_slug(name or prompt) + ".mp4", suffixed -2, -3, ... past the names
  already given in this run and past every existing MP4 or sidecar that is not this item's own
  (its own is a partial or unrecorded output of a killed attempt, and is overwritten). A file
  written by anything else, even a dangling symlink, is never overwritten.
Temp files that a killed write left beside this batch's outputs are deleted.

Limits: a sidecar deleted by hand makes its MP4 foreign (the item is redone under a new name);
only names of this batch's items are cleaned of temps, other hidden files are left alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..output.files import temp_target
from ..output.naming import unique_path
from ..output.sidecar import sidecar_path
from ..output.video import is_complete_mp4
from .plan import PlannedItem


def sidecar_key(path: Path) -> str | None:
    """The batch key a sidecar JSON carries, or None (missing, unreadable, not from a batch)."""
    try:
        if path.stat().st_size > 2**22:  # a sidecar is a few KB; do not read an arbitrary big file
            return None
        batch = json.loads(path.read_text(encoding="utf-8")).get("batch") or {}
        return batch.get("key") if isinstance(batch, dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def free_or_own(candidate: Path, key: str) -> bool:
    """Nothing at the MP4 or sidecar path, or what is there is this item's own (by sidecar key)."""
    side = sidecar_path(candidate)
    if not os.path.lexists(candidate) and not os.path.lexists(side):
        return True
    return sidecar_key(side) == key


def verified_output(rec: dict[str, Any], p: PlannedItem, out_dir: Path) -> Path | None:
    """The output of `rec` if it is this item's complete video (see module doc), else None."""
    name = rec.get("output")
    if not isinstance(name, str) or not name.endswith(".mp4") or name.startswith(".") or Path(name).name != name:
        return None  # only plain file names inside out_dir are trusted
    out = out_dir / name
    if sidecar_key(sidecar_path(out)) != p.key or not is_complete_mp4(out, p.settings.frames):
        return None
    return out


def assign_outputs(planned: list[PlannedItem], out_dir: Path, records: list[dict[str, Any]]) -> set[str]:
    """Mark done items (manifest + files verified) and give every other valid item a unique path."""
    last_done = {r["key"]: r for r in records if r.get("status") in ("ok", "skipped") and isinstance(r.get("key"), str)}
    names: set[str] = set()
    counters: dict[str, int] = {}  # makes repeated slugs O(1) each (naming.unique_path)
    valid = [p for p in planned if p.error is None]
    for p in valid:
        rec = last_done.get(p.key)
        out = verified_output(rec, p, out_dir) if rec else None
        if out is not None and out.name not in names:
            p.output, p.done = out, rec
            names.add(out.name)
    for p in valid:
        if p.done is None:
            p.output = unique_path(
                out_dir,
                p.item.name or p.item.prompt,
                taken=names,
                available=lambda c, k=p.key: free_or_own(c, k),
                counters=counters,
            )
            names.add(p.output.name)
    return names


def remove_stale_temps(out_dir: Path, names: set[str]) -> int:
    """Delete temp files that killed writes of this batch's MP4s/sidecars left behind."""
    targets = names | {str(sidecar_path(Path(n))) for n in names}
    removed = 0
    for entry in os.scandir(out_dir):
        if temp_target(entry.name) in targets and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed
