"""The container HEALTHCHECK: healthy when no server runs here, or when the server's /health is ok.

    python wan_nabla/serve/healthcheck.py       # exit 0 healthy, 1 unhealthy (the image runs it by path)

`wan-nabla serve` writes "<url>/health <pid>" to $WAN_NABLA_HEALTH_FILE (the Docker image sets it)
once it listens, and removes it when it stops. No file, or no variable: the container runs another
command (`generate`, `batch`), which has nothing to probe, so the check passes. A file whose
process is gone, a refused connection, a 503 ("loading", or the model failed) or a timeout is
unhealthy. Only the standard library is imported (run it by path: `-m wan_nabla...` would import
the package, and with it torch), so the check is cheap. Limits: loopback HTTP
only (the URL is the server's own); /health needs no API key.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def check(health_file: str | None, timeout: float = 5.0) -> tuple[bool, str]:
    if not health_file or not os.path.exists(health_file):
        return True, "no wan-nabla server configured here"
    try:
        with open(health_file, encoding="utf-8") as f:
            url, pid = f.read().split()
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False, f"{health_file}: its server is not running"
    if not url.startswith("http://127.0.0.1:") and not url.startswith("http://[::1]:"):
        return False, f"{health_file}: not a loopback URL"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200, f"{url}: HTTP {r.status}"
    except Exception as e:  # noqa: BLE001 - any failure to answer is unhealthy
        return False, f"{url}: {e}"


def main() -> int:
    ok, why = check(os.environ.get("WAN_NABLA_HEALTH_FILE"))
    print(why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
