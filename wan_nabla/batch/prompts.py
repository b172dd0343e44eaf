"""Prompt files for `wan-nabla batch`: every non-blank line is an item, a bad line a failed item.

    items = read_prompt_file("examples/example_prompts.jsonl")
    [(it.index, it.line, it.prompt, it.overrides, it.error) for it in items]

`.txt`: one prompt per line (surrounding whitespace stripped).
`.jsonl`: one JSON object per line: `prompt` (required, non-empty string) and optionally
`negative_prompt`, `seed`, `size` ("832x480" or [832, 480]), `frames`, `steps`,
`guidance_scale`, `name` (the output file name's source instead of the prompt). `null` means
"not set". In both formats blank lines and lines whose first non-blank character is `#` are
skipped; every other line is an item, numbered from 0 in file order (`index`, from which seeds
are derived), with its 1-based `line` number for messages.

Only the shape of a line is checked here (UTF-8, JSON, an object, known keys, string fields,
no duplicate keys); value ranges (size, frames, steps, seed, ...) are the batch's job because they
depend on the config. A line that fails becomes an item whose `error` is one line,
"line 7: ...": the batch records it as failed and goes on with the others. Only whole-file
problems raise PromptFileError: missing, unreadable, not a regular file (a FIFO or /dev/zero is
refused, not read: input_files.py), larger than 256 MiB, an unknown extension, no items, or a
file that is evidently not UTF-8 at all: a UTF-16/UTF-32 byte order mark, NUL bytes in a quarter
of its first 4 KiB (UTF-16/32 without a mark), or at least two item lines that are not UTF-8
while no line holds UTF-8 beyond ASCII (a legacy 8-bit encoding such as Windows-1252). One bad
line in an otherwise UTF-8 file stays a failed item.

Limits: the file is read whole (a million 200-byte prompts is 200 MB); lines end in "\\n" (a
"\\r" before it is dropped), so a U+2028 inside a prompt does not split it. A legacy-encoded file
with a single non-ASCII line is indistinguishable from one corrupt line and is treated as such.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..input_files import PROMPT_FILE_MAX_BYTES, InputFileError, read_input_file

FORMATS = (".txt", ".jsonl")
ITEM_KEYS = ("prompt", "negative_prompt", "seed", "size", "frames", "steps", "guidance_scale", "name")
GENERATION_KEYS = ("seed", "size", "frames", "steps", "guidance_scale")


class PromptFileError(ValueError):
    """The prompt file as a whole cannot be used; one line naming the file and the reason."""


@dataclass(frozen=True)
class PromptItem:
    index: int
    """Position among the file's items (blank and comment lines do not count), from 0."""
    line: int
    """1-based line number in the file."""
    prompt: str | None = None
    negative_prompt: str | None = None
    name: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    """Per-item generation values as given (seed, size, frames, steps, guidance_scale), unchecked."""
    error: str | None = None
    """Why this line is not a usable item ("line N: ..."), or None."""


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def _check_text(key: str, value: Any, required: bool) -> str | None:
    """A string field: None if absent; raises ValueError with the reason otherwise."""
    if value is None:
        if required:
            raise ValueError(f"missing '{key}'; every record needs a non-empty \"{key}\" string")
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key}: {value!r} is not allowed; use a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{key}: contains an unpaired UTF-16 surrogate escape; use valid unicode") from None
    if required and not value.strip():
        raise ValueError(f"{key}: must be a non-empty string")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key '{k}'")
        seen[k] = v
    return seen


def _parse_json_item(index: int, line: int, text: str) -> PromptItem:
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        return PromptItem(index, line, error=f"line {line}: not valid JSON: {e.msg} (column {e.colno})")
    except (ValueError, RecursionError) as e:
        why = _first_line(str(e)) or "too deeply nested"
        return PromptItem(index, line, error=f"line {line}: not valid JSON: {why}")
    if not isinstance(data, dict):
        return PromptItem(index, line, error=f"line {line}: expected a JSON object, got {type(data).__name__}")
    prompt = data.get("prompt")
    unknown = [k for k in data if k not in ITEM_KEYS]
    try:
        if unknown:
            raise ValueError(f"unknown key '{unknown[0]}'; allowed keys: {', '.join(ITEM_KEYS)}")
        prompt = _check_text("prompt", prompt, required=True)
        negative = _check_text("negative_prompt", data.get("negative_prompt"), required=False)
        name = _check_text("name", data.get("name"), required=False)
        if name is not None and not name.strip():
            raise ValueError("name: must be a non-empty string or absent")
    except ValueError as e:
        shown = prompt if isinstance(prompt, str) and _encodable(prompt) else None
        return PromptItem(index, line, prompt=shown, error=f"line {line}: {e}")
    overrides = {k: data[k] for k in GENERATION_KEYS if data.get(k) is not None}
    return PromptItem(index, line, prompt=prompt, negative_prompt=negative, name=name, overrides=overrides)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


_BOMS = (
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"),
    (b"\xfe\xff", "UTF-16 (big-endian)"),
    (b"\xff\xfe", "UTF-16 (little-endian)"),
)


def _foreign_encoding(data: bytes) -> str | None:
    """What a prompt file evidently is if it is not UTF-8 (rules in the module doc), else None."""
    for bom, name in _BOMS:  # UTF-32 first: its little-endian mark starts like UTF-16's
        if data.startswith(bom):
            return f"{name} text (byte order mark)"
    head = data[:4096]
    if head and head.count(0) * 4 >= len(head):
        return "UTF-16 or UTF-32 text (every other byte is NUL)"
    bad = good_wide = 0
    for raw in data.split(b"\n"):
        if raw.isascii() or not raw.strip() or raw.lstrip().startswith(b"#"):
            continue
        try:
            raw.decode("utf-8")
            good_wide += 1
        except UnicodeDecodeError:
            bad += 1
    if bad >= 2 and not good_wide:
        return f"in a legacy 8-bit encoding such as Windows-1252 or Latin-1 ({bad} lines are not UTF-8)"
    return None


def read_prompt_file(path: str | Path) -> list[PromptItem]:
    """All items of a .txt or .jsonl prompt file, bad lines included (see module doc)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_dir():  # its name says nothing about a format: say what it is
        raise PromptFileError(f"prompt file {str(p)!r} is a directory; give a .txt or .jsonl file")
    if suffix not in FORMATS:
        what = f"unknown extension {p.suffix!r}" if p.suffix else "no extension"
        raise PromptFileError(
            f"prompt file {str(p)!r}: {what}; use .txt (one prompt per line) or .jsonl (one JSON object per line)"
        )
    try:
        data = read_input_file(p, "prompt file", PROMPT_FILE_MAX_BYTES)
    except InputFileError as e:
        raise PromptFileError(str(e)) from None
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark (Windows editors)
        data = data[3:]
    encoding = _foreign_encoding(data)
    if encoding is not None:
        raise PromptFileError(
            f"prompt file {str(p)!r} is {encoding}, not UTF-8; save it as UTF-8 (e.g. iconv -f <encoding> -t UTF-8)"
        )

    items: list[PromptItem] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        index = len(items)
        if not raw.strip() or raw.lstrip().startswith(b"#"):
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            items.append(PromptItem(index, number, error=f"line {number}: not valid UTF-8 (byte {e.start + 1})"))
            continue
        stripped = text.strip()
        if not stripped:  # unicode-only whitespace (e.g. U+3000)
            continue
        if suffix == ".txt":
            items.append(PromptItem(index, number, prompt=stripped))
        else:
            items.append(_parse_json_item(index, number, stripped))
    if not items:
        raise PromptFileError(f"prompt file {str(p)!r} has no prompts (only blank or '#' comment lines)")
    return items
