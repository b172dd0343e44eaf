"""Helpers of the serve tests: a real `wan-nabla serve` process on the tiny model, and plain HTTP.

    with ServeProcess(tmp_path / "data", api_key=KEY) as srv:   # 127.0.0.1, a free port (--port 0)
        status, headers, body = srv.http("GET", "/health")
        srv.wait_for(job_id, "completed")

Servers run with OMP_NUM_THREADS=1: the tiny model's jobs take ~0.2 s single-threaded on a busy
2-core machine and several seconds with two threads fighting over the cores. Every process is
started in its own session; when the test ends, whatever happened, it gets SIGTERM, then its
group and every descendant (torchrun's ranks live in sessions of their own) SIGKILL, by id.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import ROOT

TINY_FLAGS = ("--model", "tiny", "--device", "cpu", "--dtype", "float32")
SMALL = {"size": "32x32", "frames": 1, "steps": 1, "guidance_scale": 1.0}


def server_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.pop("WAN_NABLA_API_KEY", None)
    env.update(extra)
    return env


def free_port() -> int:
    """A port that was free a moment ago (torchrun's rendezvous cannot take port 0)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`wan-nabla serve` (or torchrun of it) in a subprocess; see the module doc."""

    def __init__(
        self,
        data_dir: Path,
        *extra: str,
        api_key: str | None = None,
        nproc: int | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 180,
    ):
        self.data_dir = Path(data_dir)
        self.api_key = api_key
        self.log_path = self.data_dir.parent / f"serve-{self.data_dir.name}-{time.time_ns()}.log"
        args = ["serve", *TINY_FLAGS, "--port", "0", "--data-dir", str(self.data_dir), *extra]
        if api_key:
            args += ["--api-key", api_key]
        if nproc:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                str(nproc),
                "--master-port",
                str(free_port()),
                "-m",
                "wan_nabla",
                *args,
            ]
        else:
            cmd = [sys.executable, "-m", "wan_nabla", *args]
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir.parent,
            env=env or server_env(),
            start_new_session=True,
        )
        self.url = self._wait_url(ready_timeout)
        self.wait_healthy(ready_timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def _wait_url(self, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(r"listening on (http://\S+)", self.log_text())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server did not listen within {timeout}s:\n{self.log_text()[-4000:]}")

    def wait_healthy(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status, _, _ = self.http("GET", "/health")
            if status == 200:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not healthy:\n{self.log_text()[-4000:]}")

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        raw: bytes | None = None,
        timeout: float = 30,
    ) -> tuple[int, dict[str, str], bytes]:
        h = dict(self.auth() if auth else {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()
        except (urllib.error.URLError, ConnectionError):
            return 0, {}, b""

    def json(self, method: str, path: str, body: Any = None, **kw) -> tuple[int, Any]:
        status, _, data = self.http(method, path, body, **kw)
        return status, (json.loads(data) if data else None)

    def create(self, **fields: Any) -> dict[str, Any]:
        status, obj = self.json("POST", "/v1/videos", fields)
        assert status == 200, obj
        return obj

    def wait_for(self, jid: str, *statuses: str, timeout: float = 120, progress: int = 0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        obj = None
        while time.monotonic() < end:
            status, obj = self.json("GET", f"/v1/videos/{jid}")
            if status == 200 and obj["status"] in statuses and obj["progress"] >= progress:
                return obj
            if status == 404 and "deleted" in statuses:
                return {"status": "deleted"}
            assert self.proc.poll() is None, self.log_text()[-4000:]
            time.sleep(0.05)
        raise TimeoutError(f"{jid} not {statuses} after {timeout}s: {obj}\n{self.log_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def _descendants(self) -> list[Any]:
        # torchrun starts its ranks in sessions of their own, out of reach of killpg on its group;
        # psutil.Process objects refuse to signal a reused pid
        try:
            import psutil

            return psutil.Process(self.proc.pid).children(recursive=True)
        except Exception:  # noqa: BLE001 - gone already, or no psutil
            return []

    def stop(self, timeout: float = 30) -> int | None:
        children = self._descendants()
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        try:  # anything of ours that outlived the stop, by id
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for child in children:
            with contextlib.suppress(Exception):  # already gone
                child.kill()
        self.log.close()
        return self.proc.returncode
