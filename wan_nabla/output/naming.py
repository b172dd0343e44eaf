"""Safe output file names derived from prompts.

    safe_slug("../../etc/passwd")          # 'etc-passwd'
    unique_path(out_dir, "a red fox")      # out_dir / 'a-red-fox.mp4', or 'a-red-fox-2.mp4', ...

A slug keeps unicode letters and digits (NFKC-normalised, lower-cased) and turns every other run
of characters (separators, dots, spaces, control characters, NUL, emoji, bidi controls) into one
'-', so it can hold no path separator, no '..' and nothing invisible. It is cut to `max_len`
characters and `max_bytes` UTF-8 bytes (60 / 120 by default): a 255-byte file-name limit must
still hold once a '-NNN' suffix, '.mp4' and the '.<name>.<random>.tmp.mp4' temp wrapping of
io.atomic_output are added, even for 4-byte characters. It is never empty (`fallback`) and never
a Windows reserved device name (CON, NUL, COM1, ...). `unique_path` never returns a path that is
taken (by default: one that exists, even as a dangling link) and always stays inside `directory`.

Cost: with `counters` (one dict per run, kept by the caller) a slug's suffixes that are already in
`taken` are skipped without probing, so n items with the same slug cost O(n) in all, not O(n^2)
(10,000 equal prompts plan in well under a second of naming). Only names in `taken` are
skipped that way, never names `available()` refused: that answer may differ from one caller to
the next (a batch item may reuse its own leftover file), so the result is exactly the linear
probe's.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path

_SEP = re.compile(r"[^\w]+|_+", flags=re.UNICODE)
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def has_control_chars(text: str) -> bool:
    """Whether `text` holds a control character (Unicode category Cc: newline, tab, NUL, ESC, ...)."""
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def safe_slug(text: str, max_len: int = 60, fallback: str = "video", max_bytes: int = 120) -> str:
    """A file-name-safe slug of `text` (see module doc)."""
    norm = unicodedata.normalize("NFKC", str(text)).lower()
    slug = _SEP.sub("-", norm).strip("-")
    slug = slug[:max_len]
    while len(slug.encode("utf-8")) > max_bytes:  # lone surrogates are not \w: already '-'
        slug = slug[:-1]
    slug = slug.rstrip("-")
    if not slug or slug in _RESERVED:
        slug = fallback if not slug else f"{slug}-{fallback}"
    return slug


def unique_path(
    directory: Path,
    stem_text: str,
    suffix: str = ".mp4",
    taken: set[str] | None = None,
    available: Callable[[Path], bool] | None = None,
    counters: dict[str, int] | None = None,
) -> Path:
    """directory/<slug><suffix>, adding -2, -3, ... until the name is not in `taken` and
    `available(candidate)` holds (default: nothing exists at that path, not even a dangling link).
    Give the same `counters` dict (and `taken` set) to every call of a run to make repeated slugs
    cheap (module doc); the caller adds the returned name to `taken`."""
    directory = Path(directory)
    base = safe_slug(stem_text)
    taken = taken if taken is not None else set()
    available = available or (lambda p: not os.path.lexists(p))
    counters = counters if counters is not None else {}

    def name(n: int) -> str:
        return f"{base}{suffix}" if n == 1 else f"{base}-{n}{suffix}"

    key = base + suffix
    first = counters.get(key, 1)
    while name(first) in taken:  # every suffix below `first` is taken for good within this run
        first += 1
    counters[key] = first
    n = first
    while True:
        text = name(n)
        if text not in taken and available(directory / text):
            # A slug has no separator and no leading dot, so this cannot fail; checked lexically
            # (resolve() costs a syscall per path component, and planning calls this per item).
            if os.path.basename(text) != text or text.startswith("."):
                raise ValueError(f"refusing output name {text!r}: it leaves {directory}")
            return directory / text
        n += 1
