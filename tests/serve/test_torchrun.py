"""`torchrun --nproc-per-node 2 -m wan_nabla serve` on the CPU (gloo): one process serves HTTP, both
ranks (two groups of one rank, the layout of `batch`) take jobs from the same queue, every job runs
once, and SIGTERM stops both ranks; and one Ulysses group of two ranks serving and cancelling together."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.support.serve_util import ServeProcess


@pytest.mark.slow
def test_two_rank_server_both_ranks_take_jobs(tmp_path):
    data = tmp_path / "data"
    with ServeProcess(data, nproc=2) as srv:
        jobs = [srv.create(prompt=f"job {i}", size="32x32", frames=5, steps=30, guidance_scale=1.0) for i in range(6)]
        for j in jobs:
            srv.wait_for(j["id"], "completed", timeout=240)
        status, _ = srv.json("GET", "/health")
        assert status == 200
        _, _, metrics = srv.http("GET", "/metrics")
        assert 'wan_nabla_jobs{status="completed"} 6' in metrics.decode()
    workers = [json.loads((data / "videos" / f"{j['id']}.json").read_text())["serve"]["worker"] for j in jobs]
    assert set(workers) == {"rank0", "rank1"}, workers
    sides = [json.loads((data / "videos" / f"{j['id']}.json").read_text()) for j in jobs]
    assert {s["parallel"]["world_size"] for s in sides} == {2}
    assert srv.proc.returncode is not None


@pytest.mark.slow
def test_ulysses_group_serves_and_cancels_together(tmp_path):
    """One group of two ranks (--ulysses-degree 2): the leader hands each job to its partner, both
    stop at the same step when the job is deleted, and the group goes on with the next job."""
    data = tmp_path / "data"
    with ServeProcess(data, "--ulysses-degree", "2", nproc=2) as srv:
        long = srv.create(prompt="long", size="64x64", frames=9, steps=250)  # the most UniPC runs at shift 5
        srv.wait_for(long["id"], "in_progress", progress=1, timeout=120)
        assert srv.json("DELETE", f"/v1/videos/{long['id']}")[0] == 200
        nxt = srv.create(prompt="next", size="32x32", frames=5, steps=2)
        srv.wait_for(nxt["id"], "completed", timeout=120)
    side = json.loads((data / "videos" / f"{nxt['id']}.json").read_text())
    assert side["parallel"]["ulysses_degree"] == 2 and side["parallel"]["ranks"] == [0, 1]
    assert sorted(p.name for p in (data / "videos").iterdir()) == [f"{nxt['id']}.json", f"{nxt['id']}.mp4"]
