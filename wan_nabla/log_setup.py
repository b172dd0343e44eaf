"""Logging for the command line and the processes it starts (Ray actors): wan_nabla follows
--quiet/--verbose, every other library stays at WARNING, one stderr handler each.

    setup_logging(quiet=args.quiet, verbose=args.verbose)

Limits: standard library only (the CLI imports it before it knows whether torch is needed).
"""

from __future__ import annotations

import logging
import os
import sys

THIRD_PARTY_LOGGERS = (
    "filelock",
    "urllib3",
    "httpx",
    "httpx2",
    "httpcore",
    "huggingface_hub",
    "fsspec",
    "torch",
    "diffusers",
    "transformers",
    "PIL",
    "matplotlib",
    "asyncio",
    "imageio",
    "imageio_ffmpeg",
)

# Import-time chatter of the optional torchao (the FP8 extra), which diffusers imports whenever it
# is installed: its CUDA extensions fail to load on machines without them, and it registers enums
# that torch's pytree now warns about. Neither affects a run (the fp8 path checks the GPU itself);
# left at WARNING they made every command's stderr several lines long.
QUIET_AT_IMPORT = ("torchao", "torch.utils._pytree", "diffusers.quantizers")


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """wan_nabla's loggers at INFO (WARNING with `quiet`, DEBUG with `verbose`; other torchrun ranks
    WARNING), every other library's at WARNING, one stderr handler."""
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    if os.environ.get("RANK", "0").strip() not in ("", "0"):  # torchrun: rank 0 reports, the others warn
        level = max(level, logging.WARNING)
    # The root logger (every other library) stays at WARNING; only wan_nabla follows the flags.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("wan_nabla").setLevel(level)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in QUIET_AT_IMPORT:
        logging.getLogger(name).setLevel(logging.ERROR)
    keep_one_handler()


def keep_one_handler() -> None:
    """huggingface_hub, diffusers and transformers each add their own stderr handler on top of the
    propagation to ours when they are imported, so every warning of theirs was printed twice:
    keep only ours. Called again once the runner has imported them (they load after preflight)."""
    for name in ("huggingface_hub", "diffusers", "transformers"):
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            if type(handler) is logging.StreamHandler:
                lib.removeHandler(handler)
