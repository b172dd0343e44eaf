"""`wan-nabla serve` against a real server process on the tiny model: the official `openai` SDK's
client.videos round trip, list/delete/idempotency, every bad input class (4xx, nothing queued),
auth, the queue bound, cancelling a running job, Range downloads, metrics; plus the worker's
failure isolation and exactly-once publish without a model (fake generator)."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from tests.support.serve_util import SMALL, ServeProcess, server_env

KEY = "test-key-0123456789"
# The SDK marks the video API deprecated (a vendor's service date): irrelevant to this server.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    health = root / "health"
    with ServeProcess(
        root / "data", "--max-queue", "3", api_key=KEY, env=server_env(WAN_NABLA_HEALTH_FILE=str(health))
    ) as s:
        s.health_file = health
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def _counts(srv) -> dict[str, int]:
    status, _, body = srv.http("GET", "/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("wan_nabla_jobs{"):
            out[line.split('"')[1]] = int(line.split()[-1])
    return out


def _idle(srv) -> None:
    for j in srv.json("GET", "/v1/videos?limit=100")[1]["data"]:
        if j["status"] in ("queued", "in_progress"):
            srv.wait_for(j["id"], "completed", "failed", "deleted")


def test_sdk_create_retrieve_download_gives_the_requested_video(srv, client, tmp_path):
    from wan_nabla.output.video import probe_mp4

    v = client.videos.create(
        prompt="a red fox running through snow", size="32x48", extra_body={"frames": 5, "steps": 2, "seed": 7}
    )
    assert (v.object, v.status, v.progress, v.size, v.model) == ("video", "queued", 0, "32x48", "tiny")
    assert v.id.startswith("video_") and v.seconds == "0.3125"
    done = client.videos.poll(v.id, poll_interval_ms=100)
    assert (done.status, done.progress) == ("completed", 100) and done.completed_at >= done.created_at
    path = tmp_path / "fox.mp4"
    client.videos.download_content(v.id).write_to_file(path)
    info = probe_mp4(path)
    assert (info["frames"], info["width"], info["height"]) == (5, 32, 48)
    side = json.loads((srv.data_dir / "videos" / f"{v.id}.json").read_text())
    assert side["prompt"] == "a red fox running through snow" and side["seed"] == 7
    assert side["serve"]["id"] == v.id and side["config"]["generation"]["steps"] == 2


def test_seconds_become_4k_plus_1_frames_and_presets_apply(srv, client):
    v = client.videos.create(
        prompt="a cat",
        size="32x32",
        seconds="0.5",  # 0.5 s x 16 fps = 8 -> 9 frames
        extra_body={"steps": 1, "preset": "sta_11_3_3"},
    )
    assert v.seconds == "0.5625"
    client.videos.poll(v.id, poll_interval_ms=100)
    side = json.loads((srv.data_dir / "videos" / f"{v.id}.json").read_text())
    assert side["video"]["frames"] == 9
    assert side["config"]["attention"]["type"] == "sta" and side["serve"]["preset"] == "sta_11_3_3"


def test_list_is_newest_first_with_limit_and_after(srv, client):
    ids = [client.videos.create(prompt=f"list {i}", extra_body=SMALL).id for i in range(3)]
    page = client.videos.list(limit=2)
    assert [v.id for v in page.data] == ids[::-1][:2] and page.has_more
    nxt = client.videos.list(limit=2, after=page.data[-1].id)
    assert nxt.data[0].id == ids[0]
    walked = [v.id for v in client.videos.list(limit=1)]  # the SDK's auto-pagination follows `after`
    assert walked[:3] == ids[::-1] and len(walked) == len(set(walked))
    assert [v.id for v in client.videos.list(limit=3, order="asc")][-3:] == ids
    for i in ids:
        srv.wait_for(i, "completed")


def test_delete_removes_the_job_and_its_files(srv, client):
    v = client.videos.create(prompt="to delete", extra_body=SMALL)
    client.videos.poll(v.id, poll_interval_ms=100)
    mp4 = srv.data_dir / "videos" / f"{v.id}.mp4"
    assert mp4.exists()
    r = client.videos.delete(v.id)
    assert (r.id, r.deleted, r.object) == (v.id, True, "video.deleted")
    assert not mp4.exists() and not mp4.with_suffix(".json").exists()
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(v.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(v.id)


def test_idempotency_key_returns_the_same_job_once(srv):
    body = {"prompt": "idempotent", **SMALL}
    before = sum(_counts(srv).values())
    s1, a = srv.json("POST", "/v1/videos", body, headers={"Idempotency-Key": "abc-1"})
    s2, b = srv.json("POST", "/v1/videos", body, headers={"Idempotency-Key": "abc-1"})
    assert (s1, s2) == (200, 200) and a["id"] == b["id"]
    assert sum(_counts(srv).values()) == before + 1
    s3, c = srv.json("POST", "/v1/videos", {**body, "seed": 5}, headers={"Idempotency-Key": "abc-1"})
    assert s3 == 409 and c["error"]["param"] == "Idempotency-Key"
    srv.wait_for(a["id"], "completed")


BAD = [  # (body, param the error must name)
    ({}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 4001}, "prompt"),
    ({"prompt": "bad \ud800 text"}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a", "size": "33x32"}, "size"),
    ({"prompt": "a", "size": "1280"}, "size"),
    ({"prompt": "a", "size": "2048x2048"}, "size"),  # past the tiny model's rotary table (ModelFacts.check)
    ({"prompt": "a", "frames": 4}, "frames"),
    ({"prompt": "a", "frames": "five"}, "frames"),
    ({"prompt": "a", "seconds": "-1"}, "seconds"),
    ({"prompt": "a", "seconds": "nan"}, "seconds"),
    ({"prompt": "a", "steps": 0}, "steps"),
    ({"prompt": "a", "steps": 1.5}, "steps"),
    ({"prompt": "a", "steps": 900}, "steps"),  # UniPC cannot run 900 steps at shift 5 (the sampler check)
    ({"prompt": "a", "guidance_scale": 1e9}, "guidance_scale"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "seed": True}, "seed"),
    ({"prompt": "a", "negative_prompt": "y" * 5000}, "negative_prompt"),
    ({"prompt": "a", "preset": "../../etc/passwd"}, "preset"),
    ({"prompt": "a", "preset": "/work/main/configs/full.yaml"}, "preset"),
    ({"prompt": "a", "preset": "no_such_preset"}, "preset"),
    ({"prompt": "a", "output": "/tmp/x.mp4"}, "output"),
    ({"prompt": "a", "config": "full"}, "config"),
    ({"prompt": "a", "transformer": "/weights/x"}, "transformer"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[f"{i}-{p}" for i, (_, p) in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field_and_queues_nothing(srv, body, param):
    before = sum(_counts(srv).values())  # jobs in the database, whatever their status
    status, err = srv.json("POST", "/v1/videos", body)
    assert status == 400, err
    assert err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error"
    assert param in err["error"]["message"]
    assert sum(_counts(srv).values()) == before


@pytest.mark.parametrize(
    "raw,ctype,status",
    [
        (b"{not json", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b"prompt=a", "text/plain", 415),
        (json.dumps({"prompt": "a" * 70_000}).encode(), "application/json", 413),
    ],
)
def test_bad_bodies_are_refused(srv, raw, ctype, status):
    before = sum(_counts(srv).values())
    code, _, body = srv.http("POST", "/v1/videos", raw=raw, headers={"Content-Type": ctype})
    assert code == status and "error" in json.loads(body)
    assert sum(_counts(srv).values()) == before


def test_sdk_file_upload_and_bad_ids(srv, client):
    with pytest.raises(openai.BadRequestError, match="input_reference"):
        client.videos.create(prompt="a", input_reference=("ref.png", b"\x89PNG....", "image/png"))
    for bad in ("../queue.sqlite3", "video_123", "video_" + "g" * 32):
        status, err = srv.json("GET", f"/v1/videos/{bad}/content")
        assert status == 404, (bad, err)


def test_auth_on_every_route_but_health(srv):
    for method, path in [
        ("GET", "/v1/videos"),
        ("POST", "/v1/videos"),
        ("GET", "/metrics"),
        ("GET", "/"),
        ("GET", "/v1/videos/video_" + "0" * 32),
        ("DELETE", "/v1/videos/video_" + "0" * 32),
    ]:
        assert srv.http(method, path, auth=False)[0] == 401, path
        assert srv.http(method, path, auth=False, headers={"Authorization": "Bearer wrong-key-123"})[0] == 401
    assert srv.http("GET", "/health", auth=False)[0] == 200
    basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()
    status, _, page = srv.http("GET", "/", auth=False, headers={"Authorization": f"Basic {basic}"})
    assert status == 200 and b"wan-nabla serve" in page
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong-key-123", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.videos.list()


def test_non_loopback_host_needs_an_api_key(capsys):
    from wan_nabla.cli import main

    assert main(["serve", "--model", "tiny", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_cancel_a_running_job_bound_the_queue_then_keep_serving(srv):
    _idle(srv)
    long = srv.create(prompt="a long one", size="64x64", frames=9, steps=250)  # the most UniPC runs at shift 5
    srv.wait_for(long["id"], "in_progress", progress=1)
    queued = [srv.create(prompt=f"q{i}", **SMALL) for i in range(3)]
    status, err = srv.json("POST", "/v1/videos", {"prompt": "one too many", **SMALL})
    assert status == 429 and err["error"]["code"] == "queue_full"
    for q in queued:
        assert srv.json("DELETE", f"/v1/videos/{q['id']}")[0] == 200
    assert srv.json("DELETE", f"/v1/videos/{long['id']}")[1]["deleted"] is True
    assert srv.json("GET", f"/v1/videos/{long['id']}")[0] == 404  # hidden at once
    nxt = srv.create(prompt="after the cancel", **SMALL)
    srv.wait_for(nxt["id"], "completed", timeout=60)  # the worker stopped the long job at a step
    names = {p.name for p in (srv.data_dir / "videos").iterdir()}
    assert not any(long["id"] in n or q["id"] in n for n in names for q in queued)
    assert not [n for n in names if n.startswith(".")]


def test_content_supports_range_requests(srv):
    v = srv.create(prompt="range", **SMALL)
    srv.wait_for(v["id"], "completed")
    status, headers, whole = srv.http("GET", f"/v1/videos/{v['id']}/content")
    assert status == 200 and headers["content-type"] == "video/mp4"
    status, headers, part = srv.http("GET", f"/v1/videos/{v['id']}/content", headers={"Range": "bytes=10-49"})
    assert status == 206 and part == whole[10:50]
    assert headers["content-range"] == f"bytes 10-49/{len(whole)}"
    queued = srv.create(prompt="not yet", size="64x64", frames=9, steps=200)
    assert srv.http("GET", f"/v1/videos/{queued['id']}/content")[0] == 409
    srv.json("DELETE", f"/v1/videos/{queued['id']}")


def test_healthcheck_follows_the_server(srv, tmp_path):
    from wan_nabla.serve.healthcheck import check

    assert srv.health_file.read_text().split() == [srv.url + "/health", str(srv.proc.pid)]
    assert check(str(srv.health_file))[0]
    assert check(str(tmp_path / "none"))[0] and check(None)[0]  # no server here: healthy
    dead = tmp_path / "dead"
    dead.write_text(f"{srv.url}/health 999999999\n")
    assert not check(str(dead))[0]
    other = tmp_path / "other"
    other.write_text(f"http://example.com/health {srv.proc.pid}\n")
    assert not check(str(other))[0]


def test_metrics_are_prometheus_text(srv):
    status, headers, body = srv.http("GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in (
        "wan_nabla_queue_depth",
        'wan_nabla_jobs{status="completed"}',
        "wan_nabla_step_seconds_total",
        "wan_nabla_video_seconds_total",
        "wan_nabla_up 1",
    ):
        assert name in text
    values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert values["wan_nabla_video_seconds_total"] > 0 and values["wan_nabla_step_seconds_total"] > 0


# ---- the worker without a model ------------------------------------------------------------
class _FakeGen:
    def __init__(self, server, fail_on: str):
        self.config, self.fail_on, self.calls = server.config, fail_on, []

    def use_config(self, config):
        self.config = config

    def generate(self, prompt, **kw):
        self.calls.append(prompt)
        if prompt == self.fail_on:
            raise RuntimeError("CUDA out of memory. Tried to allocate 80 GiB")
        raise AssertionError("only the failing job should run")


@pytest.fixture
def plan_and_queue(tmp_path):
    from wan_nabla.requests import RunFlags
    from wan_nabla.serve.preflight import server_plan
    from wan_nabla.serve.queue import JobQueue

    server = server_plan(RunFlags(model="tiny", device="cpu", dtype="float32"))
    videos = tmp_path / "videos"
    videos.mkdir()
    return server, JobQueue(tmp_path / "q.sqlite3"), videos


def test_a_failing_job_is_marked_failed_and_the_worker_goes_on(plan_and_queue):
    from wan_nabla.serve.preflight import plan_job
    from wan_nabla.serve.worker import Worker

    server, q, videos = plan_and_queue
    bad, _ = q.submit(plan_job(server, {"prompt": "boom", **SMALL}).to_dict(), {})
    gen = _FakeGen(server, "boom")
    stop = threading.Event()
    w = Worker(server, q, videos, gen, None, stop)
    w.run_job(q.claim("local"))
    job = q.get(bad["id"])
    assert job["status"] == "failed" and "out of memory" in job["error_message"]
    assert job["error_code"] == "generation_failed"
    # an MP4 + sidecar of this job already published (killed before the commit): completed, not run again
    ok, _ = q.submit(plan_job(server, {"prompt": "done before", **SMALL}).to_dict(), {})
    mp4 = videos / f"{ok['id']}.mp4"
    mp4.write_bytes(b"mp4")
    mp4.with_suffix(".json").write_text(json.dumps({"output": str(mp4)}))
    w.run_job(q.claim("local"))
    assert q.get(ok["id"])["status"] == "completed" and gen.calls == ["boom"]


def test_queue_recovery_keeps_submission_order(tmp_path):
    from wan_nabla.serve.queue import JobQueue

    q = JobQueue(tmp_path / "q.sqlite3")
    ids = [q.submit({"n": i}, {})[0]["id"] for i in range(3)]
    assert q.claim("a")["id"] == ids[0] and q.claim("b")["id"] == ids[1]
    q2 = JobQueue(tmp_path / "q.sqlite3")  # a restart
    assert sorted(q2.recover()) == sorted(ids[:2])
    assert [q2.claim("c")["id"] for _ in range(3)] == ids
    assert q2.claim("c") is None


def test_page_file_is_packaged():
    from wan_nabla.serve.app import PAGE

    assert (Path(PAGE) / "index.html").is_file()


def test_health_says_loading_until_the_model_is_ready_and_jobs_wait(plan_and_queue, tmp_path):
    """The app alone (no worker): /health is 503 "loading", metrics say down, and a POST is queued."""
    import time
    import urllib.error
    import urllib.request

    import uvicorn

    from wan_nabla.serve.app import ServeState, create_app

    server, _, videos = plan_and_queue
    state = ServeState(server, tmp_path / "app.sqlite3", videos)
    http = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="error"))
    t = threading.Thread(target=http.run, daemon=True)
    t.start()
    try:
        for _ in range(200):
            if http.started:
                break
            time.sleep(0.05)
        url = f"http://127.0.0.1:{http.servers[0].sockets[0].getsockname()[1]}"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/health", timeout=10)
        assert e.value.code == 503 and json.loads(e.value.read()) == {"status": "loading"}
        assert b"wan_nabla_up 0" in urllib.request.urlopen(url + "/metrics", timeout=10).read()
        req = urllib.request.Request(
            url + "/v1/videos",
            data=json.dumps({"prompt": "early", **SMALL}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        assert json.loads(urllib.request.urlopen(req, timeout=10).read())["status"] == "queued"
        state.status = "ok"
        assert json.loads(urllib.request.urlopen(url + "/health", timeout=10).read()) == {"status": "ok"}
    finally:
        http.should_exit = True
        t.join(10)


def test_a_data_dir_serves_one_server_at_a_time(tmp_path):
    from wan_nabla.output.files import OutputError
    from wan_nabla.serve.main import DataDir

    held = DataDir(tmp_path / "d")
    assert held.videos.is_dir()
    with pytest.raises(OutputError, match="in use by another wan-nabla serve"):
        DataDir(tmp_path / "d")
    held._lock.close()  # what the end of the process does
    DataDir(tmp_path / "d")
