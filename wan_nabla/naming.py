"""Safe output file names derived from prompts.

    safe_slug("../../etc/passwd")          # 'etc-passwd'
    unique_path(out_dir, "a red fox")      # out_dir / 'a-red-fox.mp4', or 'a-red-fox-2.mp4', ...

A slug keeps unicode letters and digits (NFKC-normalised, lower-cased), turns every other run of
characters into one '-', so it can hold no path separator, no '..', no control character and no
NUL; it is cut to `max_len` characters (on a character boundary, 80 by default so name + suffix
stays far below the 255-byte limit of common file systems even in 4-byte UTF-8), and is never
empty or a reserved name. `unique_path` never returns an existing path and always stays inside
the directory it is given.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

_SEP = re.compile(r"[^\w]+|_+", flags=re.UNICODE)
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def safe_slug(text: str, max_len: int = 60, fallback: str = "video") -> str:
    """A file-name-safe slug of `text` (see module doc)."""
    norm = unicodedata.normalize("NFKC", str(text)).lower()
    slug = _SEP.sub("-", norm).strip("-")
    if len(slug) > max_len:
        slug = slug[:max_len].rstrip("-")
    if not slug or slug in _RESERVED:
        slug = fallback if not slug else f"{slug}-{fallback}"
    return slug


def unique_path(directory: Path, stem_text: str, suffix: str = ".mp4", taken: set[str] | None = None) -> Path:
    """directory/<slug><suffix>, adding -2, -3, ... until neither the file nor `taken` has it."""
    directory = Path(directory)
    base = safe_slug(stem_text)
    taken = taken or set()
    n = 1
    while True:
        name = f"{base}{suffix}" if n == 1 else f"{base}-{n}{suffix}"
        candidate = directory / name
        if name not in taken and not candidate.exists():
            if candidate.resolve().parent != directory.resolve():
                raise ValueError(f"refusing output name {name!r}: it leaves {directory}")
            return candidate
        n += 1
