"""Reading files a user names (configs, prompt files): regular files of bounded size only.

    data = read_input_file("my.yaml", "config file", max_bytes=CONFIG_MAX_BYTES)   # bytes
    read_input_file("/dev/zero", "prompt file", 2**20)   # InputFileError: ... it is a character device

Why: `Path.read_text()` on a FIFO blocks until a writer appears (forever in a batch job), on
/dev/zero or /dev/urandom it reads until memory runs out, and on a 50 GB log file given by
mistake it does the same slowly. Here the file is opened with O_NONBLOCK (so opening a FIFO
never blocks), checked with fstat on the open descriptor (no race between check and read: what
is read is what was checked) to be a regular file, and read up to `max_bytes` + 1 bytes, so a
file that is too big (or grows while read) is refused without reading it whole.
Errors are InputFileError (a ValueError) with one line: "<what> '<path>' <reason>"; callers turn
it into their own error type (ConfigError, PromptFileError).
Limits: a regular file on a hung network mount can still block in read(); Windows has no
O_NONBLOCK for files (the flag is skipped there, FIFOs do not exist in its file system).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

CONFIG_MAX_BYTES = 16 << 10
"""16 KiB: a config is a few hundred bytes (the largest preset is under 1 KiB), so this leaves room
for long negative prompts and comments, and keeps PyYAML's pure-Python parser (~15k values/s)
well under a second even for a file that is one long list."""
PROMPT_FILE_MAX_BYTES = 256 << 20
"""256 MiB: over a million prompts of 200 bytes; the file is read whole into memory."""


class InputFileError(ValueError):
    """A named input file cannot be used; one line naming the file and the reason."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"


def _size(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} bytes"


def read_input_file(path: str | Path, what: str, max_bytes: int) -> bytes:
    """The bytes of `path` if it is a regular file of at most `max_bytes` (see module doc)."""
    shown = f"{what} {str(path)!r}"
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputFileError(f"{shown} does not exist") from None
    except IsADirectoryError:
        raise InputFileError(f"{shown} cannot be read: it is a directory, not a regular file") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket, or a FIFO opened without a writer on some systems
            raise InputFileError(f"{shown} cannot be read: it is not a regular file") from None
        raise InputFileError(f"{shown} cannot be read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(f"{shown} cannot be read: it is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > max_bytes:
            raise InputFileError(f"{shown} is {_size(st.st_size)}, more than the {_size(max_bytes)} allowed")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:  # it grew while being read
            raise InputFileError(f"{shown} is more than the {_size(max_bytes)} allowed")
        return b"".join(chunks)
    except OSError as e:
        raise InputFileError(f"{shown} cannot be read: {e.strerror or e}") from None
    finally:
        os.close(fd)
