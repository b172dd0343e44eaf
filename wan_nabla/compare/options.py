"""Command-line input of `compare` and `generate --save-masks`: checked before any work is done.

    require_extras("compare")                          # UsageError naming the missing packages
    wanted = plan.sampling                             # syntax checked by preflight.parse_sampling
    sampling = resolve_sampling(wanted, pipe.transformer, steps=50)   # ranges, once loaded
    spread(30)                                         # (0, 14, 29): the default sample
    created = claim_out_dir(Path("cmp"), overwrite=False)   # the directory, made by this run
    remove_if_empty(Path("cmp"), created)              # undo that after a failure

Every problem is a UsageError (exit code 2, one line naming the flag and what is allowed) raised
before anything is written.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import UsageError
from ..output.files import OutputError, ensure_writable_dir
from ..preflight import parse_indices, parse_sampling  # noqa: F401 - the light half, checked in preflight
from .metrics import missing_extras
from .probe import Sampling

SAMPLE_FLAGS = ("steps", "layers", "heads")


def spread(n: int, start: int = 0) -> tuple[int, ...]:
    """First, middle and last of start..n-1 (fewer when they coincide)."""
    start = min(max(start, 0), n - 1)
    return tuple(sorted({start, (start + n - 1) // 2, n - 1}))


def resolve_indices(wanted: tuple[int, ...] | None, n: int, what: str, start: int = 0) -> tuple[int, ...]:
    """Sorted unique indices in 0..n-1 (negative ones count from the end); `spread` when None."""
    if wanted is None:
        return spread(n, start)
    bad = [i for i in wanted if not -n <= i < n]
    if bad:
        raise ValueError(f"{bad} out of range; this run has {what} 0..{n - 1} (negative counts from the end)")
    return tuple(sorted({i % n for i in wanted}))


def require_extras(what: str) -> None:
    missing = missing_extras()
    if missing:
        raise UsageError(f"{what} needs {' and '.join(missing)}: pip install 'wan-nabla[compare]'")


def resolve_sampling(
    wanted: dict[str, tuple[int, ...] | None], transformer, steps: int, dense_steps: int = 0
) -> Sampling:
    """Indices checked against the loaded transformer and the step count; defaults: the first
    sparse step, the middle and the last step; first, middle and last block and head."""
    sizes = {"steps": steps, "layers": len(transformer.blocks), "heads": int(transformer.config.num_attention_heads)}
    start = {"steps": dense_steps if dense_steps < steps else 0}
    out = {}
    for what in SAMPLE_FLAGS:
        try:
            out[what] = resolve_indices(wanted.get(what), sizes[what], what, start.get(what, 0))
        except ValueError as e:
            raise UsageError(f"--sample-{what}: {e}") from None
    return Sampling(**out)


def claim_out_dir(path: Path, overwrite: bool) -> Path | None:
    """Check `path` can take the outputs and create it; return the topmost directory this call
    created (None if it existed). A non-empty directory is refused unless `overwrite`."""
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise UsageError(f"--out: {str(path)!r} exists and is not a directory")
        if any(path.iterdir()) and not overwrite:
            raise UsageError(f"--out: {str(path)!r} exists and is not empty; give a new directory or --overwrite")
        ensure_writable_dir(path)
        return None
    root = path
    while not root.parent.exists() and root.parent != root:
        root = root.parent
    try:
        ensure_writable_dir(path)
    except OutputError:
        remove_if_empty(path, root)
        raise
    return root


def remove_if_empty(path: Path, created: Path | None) -> None:
    """Remove the empty directories from `path` up to `created` (what claim_out_dir made)."""
    if created is None:
        return
    d = path
    while True:
        with contextlib.suppress(OSError):
            d.rmdir()
        if d == created or d.parent == d:
            return
        d = d.parent
