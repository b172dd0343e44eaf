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
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path

_SEP = re.compile(r"[^\w]+|_+", flags=re.UNICODE)
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


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
) -> Path:
    """directory/<slug><suffix>, adding -2, -3, ... until the name is not in `taken` and
    `available(candidate)` holds (default: nothing exists at that path, not even a dangling link)."""
    directory = Path(directory)
    base = safe_slug(stem_text)
    taken = taken or set()
    available = available or (lambda p: not os.path.lexists(p))
    n = 1
    while True:
        name = f"{base}{suffix}" if n == 1 else f"{base}-{n}{suffix}"
        candidate = directory / name
        if name not in taken and available(candidate):
            if candidate.resolve().parent != directory.resolve():
                raise ValueError(f"refusing output name {name!r}: it leaves {directory}")
            return candidate
        n += 1
