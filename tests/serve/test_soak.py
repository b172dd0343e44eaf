"""A soak of `wan-nabla serve`: 200 tiny jobs queued at once (32x32, 1 frame, 1 step, no CFG) all
complete, in submission order, with flat server memory (resident set size after the first 40
jobs vs after all 200)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")

from tests.support.serve_util import SMALL, ServeProcess

N = 200
WARM = 40
MAX_GROWTH_MB = 40


def _wait_completed(srv, n: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        _, _, body = srv.http("GET", "/metrics")
        done = next(
            (
                int(line.split()[-1])
                for line in body.decode().splitlines()
                if line.startswith('wan_nabla_jobs{status="completed"}')
            ),
            0,
        )
        if done >= n:
            return
        assert srv.proc.poll() is None, srv.log_text()[-3000:]
        time.sleep(0.25)
    raise TimeoutError(f"fewer than {n} jobs completed in {timeout}s")


@pytest.mark.slow
def test_200_queued_jobs_complete_in_order_with_flat_memory(tmp_path):
    with ServeProcess(tmp_path / "data", "--max-queue", str(N)) as srv:
        ids = [srv.create(prompt=f"soak {i}", **SMALL)["id"] for i in range(N)]
        proc = psutil.Process(srv.proc.pid)
        _wait_completed(srv, WARM, 300)
        rss_warm = proc.memory_info().rss
        _wait_completed(srv, N, 600)
        rss_end = proc.memory_info().rss
        _, listed = srv.json("GET", "/v1/videos?limit=100&order=asc")
        first = listed["data"]
        _, more = srv.json("GET", f"/v1/videos?limit=100&order=asc&after={first[-1]['id']}")
        jobs = first + more["data"]
        assert [j["id"] for j in jobs] == ids and all(j["status"] == "completed" for j in jobs)
        finished = [j["completed_at"] for j in jobs]
        assert finished == sorted(finished)  # one worker: they ran in submission order
    growth_mb = (rss_end - rss_warm) / 2**20
    print(
        f"server RSS after {WARM} jobs {rss_warm / 2**20:.0f} MB, after {N} {rss_end / 2**20:.0f} MB "
        f"(+{growth_mb:.1f} MB)"
    )
    assert growth_mb < MAX_GROWTH_MB
    assert len(list((tmp_path / "data" / "videos").glob("*.mp4"))) == N
