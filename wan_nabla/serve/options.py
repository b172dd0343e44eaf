"""The flags of `wan-nabla serve` and their checks: light (no torch, no web stack), so `serve --help`
and a bad flag answer at once; cli.py builds the parser from here and serve/main.py runs the server.

    add_serve_flags(parser)      # --host --port --data-dir --api-key --max-queue
    key = check_flags(req)       # a ServeRequest -> the API key to use; UsageError (exit 2) naming the bad flag

Binding an address other than loopback needs an API key (--api-key or WAN_NABLA_API_KEY).
"""

from __future__ import annotations

import ipaddress
import os

from ..errors import UsageError
from ..requests import ServeRequest

API_KEY_ENV = "WAN_NABLA_API_KEY"
HEALTH_FILE_ENV = "WAN_NABLA_HEALTH_FILE"


def add_serve_flags(p) -> None:
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other address needs --api-key)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--data-dir", default="serve-data", help="queue database and videos (default ./serve-data; created if missing)"
    )
    p.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' on every route but /health "
        f"(default: ${API_KEY_ENV}); required off loopback",
    )
    p.add_argument("--max-queue", type=int, default=100, help="queued jobs before POST answers 429 (default 100)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_flags(args: ServeRequest) -> str | None:
    """The API key to use; UsageError for bad serve flags."""
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None and (len(key) < 8 or len(key) > 512 or not key.isprintable() or " " in key):
        raise UsageError("--api-key: use 8..512 printable characters without spaces")
    if not is_loopback(args.host) and key is None:
        raise UsageError(
            f"--host {args.host}: binding a non-loopback address needs an API key; give --api-key KEY "
            f"or set {API_KEY_ENV}"
        )
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port: {args.port} is not a port; use 0..65535")
    if not 1 <= args.max_queue <= 1_000_000:
        raise UsageError(f"--max-queue: {args.max_queue} is not allowed; use 1..1000000")
    return key
