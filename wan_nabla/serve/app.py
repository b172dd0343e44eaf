"""The HTTP API of `wan-nabla serve` (FastAPI): the shape of the OpenAI video API, plus a web page.

    app = create_app(state)        # state: ServeState (plan, queue, videos dir, key, limits)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes (the official `openai` SDK's client.videos works against them):
    POST   /v1/videos                 multipart form or JSON -> the video object (status queued)
    GET    /v1/videos/{id}            status, progress 0-100, completed_at, error {code, message}
    GET    /v1/videos                 newest first; limit (1-100, default 20), after, order
    DELETE /v1/videos/{id}            queued: removed; running: stops at its next step; files removed
    GET    /v1/videos/{id}/content    video/mp4, Range requests (variant=video only)
    GET    /health                    200 {"status": "ok"} once the model is loaded; 503 "loading"
    GET    /metrics                   Prometheus text: queue depth, jobs by status, step/video seconds
    GET    /                          the web page (page/index.html; no build step)

Errors are OpenAI-style: `{"error": {"message", "type", "param", "code"}}` with a 4xx status
naming the field and what is allowed; nothing is queued on any error. Request values go through
preflight.plan_job (the product's own validation). An `Idempotency-Key` header returns the job
of an earlier request with the same key and body (409 if the body differs).

Security: with an API key every route but /health needs `Authorization: Bearer <key>` (the web
page also accepts HTTP Basic with the key as password, so a browser can open it); keys are
compared in constant time. Bodies over max_body bytes are refused (413) before they are read in
full; prompts over preflight.MAX_PROMPT_CHARS are refused (400). Ids are made by the queue and
must match `video_<32 hex>` before they reach the database or a file name; files are only ever
served from the videos directory. Database calls run in the thread pool (a commit's fsync does
not stall other requests). Limits: one model per server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..presets import preset_names
from .preflight import JobSpec, RequestError, ServerPlan, plan_job
from .queue import IdempotencyConflict, JobQueue, QueueFull
from .worker import published, remove_video, video_paths

PAGE = Path(__file__).resolve().parent / "page"
ID = re.compile(r"^video_[0-9a-f]{32}$")
MAX_BODY = 64 * 1024
MAX_IDEMPOTENCY_KEY = 256


@dataclass
class ServeState:
    """What the routes share; `status` is loading -> ok (or error, with `error` set)."""

    server: ServerPlan
    queue_path: Path
    videos: Path
    api_key: str | None = None
    max_queue: int = 100
    max_body: int = MAX_BODY
    status: str = "loading"
    error: str | None = None
    started: float = field(default_factory=time.time)
    accepted: int = 0
    rejected: int = 0
    _local: threading.local = field(default_factory=threading.local)

    @property
    def queue(self) -> JobQueue:
        q = getattr(self._local, "queue", None)
        if q is None:
            q = self._local.queue = JobQueue(self.queue_path)
        return q


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def video_object(job: dict[str, Any]) -> dict[str, Any]:
    pub = job["public"]
    out = {
        "id": job["id"],
        "object": "video",
        "status": job["status"],
        "progress": int(job["progress"]),
        "created_at": job["created_at"],
        "completed_at": job["completed_at"],
        "expires_at": None,
        "model": pub["model"],
        "prompt": pub["prompt"],
        "size": pub["size"],
        "seconds": pub["seconds"],
        "remixed_from_video_id": None,
        "error": None,
    }
    if job["status"] == "failed":
        out["error"] = {"code": job["error_code"] or "generation_failed", "message": job["error_message"] or ""}
    return out


def _authorized(header: str | None, key: str) -> bool:
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode("utf-8", "surrogatepass"), key.encode("utf-8"))


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "Content-Length: not a number")
        if int(length) > limit:
            raise ApiError(413, f"request body of {length} bytes is too large; at most {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is too large; at most {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # starlette's form parser reads the cached body
    return body


async def _fields(request: Request, limit: int) -> dict[str, Any]:
    """The create request's fields from JSON, a multipart form or a urlencoded form."""
    body = await _read_body(request, limit)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"body: not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "body: must be a JSON object", code="invalid_json")
        return data
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=1, max_fields=32)
        except Exception as e:  # noqa: BLE001 - a malformed form is the client's error
            raise ApiError(400, f"body: not a valid form ({type(e).__name__})", code="invalid_form") from None
        out: dict[str, Any] = {}
        for k, v in form.multi_items():
            if k in out:
                raise ApiError(400, f"{k}: given more than once", param=k)
            out[k] = v if isinstance(v, str) else "<file>"
        return out
    raise ApiError(
        415,
        f"Content-Type {ctype or '(none)'!r} is not supported; use application/json or multipart/form-data",
        code="unsupported_media_type",
    )


def _job_id(video_id: str) -> str:
    if not ID.match(video_id):
        raise ApiError(404, f"no video with id {video_id[:80]!r}", param="video_id", code="not_found")
    return video_id


def create_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="wan-nabla", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    async def _db(fn):
        # SQLite calls (a commit is an fsync) run in the thread pool, not on the event loop;
        # each pool thread has its own connection (ServeState.queue)
        return await run_in_threadpool(lambda: fn(state.queue))

    @app.middleware("http")
    async def auth(request: Request, call_next):
        key = state.api_key
        if (
            key is not None
            and request.url.path != "/health"
            and not _authorized(request.headers.get("authorization"), key)
        ):
            headers = {"WWW-Authenticate": 'Basic realm="wan-nabla"'} if request.url.path == "/" else None
            return JSONResponse(
                error_body(
                    "missing or wrong API key: send Authorization: Bearer <key>",
                    "invalid_request_error",
                    code="invalid_api_key",
                ),
                401,
                headers=headers,
            )
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error", code=str(exc.status_code)), exc.status_code
        )

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)

    @app.post("/v1/videos")
    async def create(request: Request):
        fields = await _fields(request, state.max_body)
        key = request.headers.get("idempotency-key")
        if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY):
            raise ApiError(400, f"Idempotency-Key: use 1..{MAX_IDEMPOTENCY_KEY} characters", param="Idempotency-Key")
        try:
            spec = plan_job(state.server, fields)
        except RequestError as e:
            state.rejected += 1
            raise ApiError(400, str(e), param=e.param, code=e.code) from None
        public = {"model": spec.model, "prompt": spec.prompt, "size": spec.size, "seconds": spec.seconds}
        digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()
        try:
            job, new = await _db(lambda q: q.submit(spec.to_dict(), public, key, digest, state.max_queue))
        except QueueFull as e:
            state.rejected += 1
            raise ApiError(
                429,
                f"the queue is full: {e}; retry later",
                code="queue_full",
                kind="rate_limit_error",
                headers={"Retry-After": "10"},
            ) from None
        except IdempotencyConflict:
            raise ApiError(
                409,
                "Idempotency-Key: already used for a different request",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            ) from None
        if new:
            state.accepted += 1
        return video_object(job)

    @app.get("/v1/videos")
    async def list_videos(limit: str = "20", after: str | None = None, order: str = "desc"):
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise ApiError(400, f"limit: {limit[:20]!r} is not allowed; use an integer in [1, 100]", param="limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order: {order[:20]!r} is not allowed; use asc or desc", param="order")
        if after is not None and not ID.match(after):
            raise ApiError(400, f"after: {after[:80]!r} is not a video id", param="after")
        try:
            jobs, more = await _db(lambda q: q.list(int(limit), after, newest_first=order == "desc"))
        except KeyError:
            raise ApiError(400, f"after: no video with id {after!r}", param="after") from None
        data = [video_object(j) for j in jobs]
        return {
            "object": "list",
            "data": data,
            "has_more": more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }

    @app.get("/v1/videos/{video_id}")
    async def retrieve(video_id: str):
        jid = _job_id(video_id)
        job = await _db(lambda q: q.get(jid))
        if job is None:
            raise ApiError(404, f"no video with id {video_id!r}", param="video_id", code="not_found")
        return video_object(job)

    @app.delete("/v1/videos/{video_id}")
    async def delete(video_id: str):
        jid = _job_id(video_id)
        outcome = await _db(lambda q: q.delete(jid))
        if outcome is None:
            raise ApiError(404, f"no video with id {video_id!r}", param="video_id", code="not_found")
        if outcome[0] == "removed":
            remove_video(state.videos, video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/videos/{video_id}/content")
    async def content(video_id: str, variant: str = "video"):
        jid = _job_id(video_id)
        job = await _db(lambda q: q.get(jid))
        if job is None:
            raise ApiError(404, f"no video with id {video_id!r}", param="video_id", code="not_found")
        if variant != "video":
            raise ApiError(
                400, f"variant: {variant[:40]!r} is not available; this server has variant=video only", param="variant"
            )
        if job["status"] != "completed" or not published(state.videos, video_id):
            raise ApiError(
                409 if job["status"] != "failed" else 400,
                f"video {video_id} is {job['status']}; its content exists once it is completed",
                code="video_not_ready",
            )
        mp4, _ = video_paths(state.videos, video_id)
        return FileResponse(mp4, media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.get("/health")
    async def health():
        body: dict[str, Any] = {"status": state.status}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, 200 if state.status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(await run_in_threadpool(render_metrics, state), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return Response(
            (PAGE / "index.html").read_bytes(),
            media_type="text/html; charset=utf-8",
            headers={
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; "
                "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'",
            },
        )

    @app.get("/presets")
    async def presets():
        return {"presets": preset_names(), "defaults": _defaults(state.server)}

    return app


def _defaults(server: ServerPlan) -> dict[str, Any]:
    g = server.config.generation
    return {
        "size": f"{g.width}x{g.height}",
        "frames": g.frames,
        "steps": g.steps,
        "fps": g.fps,
        "guidance_scale": g.guidance_scale,
        "model": server.model_id,
    }


def render_metrics(state: ServeState) -> str:
    q = state.queue
    counts, totals = q.counts(), q.totals()
    workers = q.workers()
    lines = [
        "# HELP wan_nabla_up 1 once the model is loaded and jobs run.",
        "# TYPE wan_nabla_up gauge",
        f"wan_nabla_up {1 if state.status == 'ok' else 0}",
        "# HELP wan_nabla_queue_depth Jobs waiting to run.",
        "# TYPE wan_nabla_queue_depth gauge",
        f"wan_nabla_queue_depth {counts['queued']}",
        "# HELP wan_nabla_jobs Jobs in the queue database by status.",
        "# TYPE wan_nabla_jobs gauge",
        *(f'wan_nabla_jobs{{status="{s}"}} {n}' for s, n in counts.items()),
        "# HELP wan_nabla_requests_total Create requests since start by outcome.",
        "# TYPE wan_nabla_requests_total counter",
        f'wan_nabla_requests_total{{outcome="accepted"}} {state.accepted}',
        f'wan_nabla_requests_total{{outcome="rejected"}} {state.rejected}',
        "# HELP wan_nabla_step_seconds_total Denoising seconds of completed jobs.",
        "# TYPE wan_nabla_step_seconds_total counter",
        f"wan_nabla_step_seconds_total {totals['step_seconds']:.6f}",
        "# HELP wan_nabla_video_seconds_total Seconds of video in completed jobs.",
        "# TYPE wan_nabla_video_seconds_total counter",
        f"wan_nabla_video_seconds_total {totals['video_seconds']:.6f}",
        "# HELP wan_nabla_workers Worker processes (group leaders) by state.",
        "# TYPE wan_nabla_workers gauge",
        *(
            f'wan_nabla_workers{{state="{s}"}} {sum(w["state"] == s for w in workers)}'
            for s in ("idle", "busy", "stopped")
        ),
    ]
    return "\n".join(lines) + "\n"


__all__ = ["JobSpec", "ServeState", "create_app"]
