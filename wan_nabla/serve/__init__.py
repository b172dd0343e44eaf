"""`wan-nabla serve`: a GPU node as a video service (OpenAI-style /v1/videos, durable queue, web page).

    pip install -e ".[serve]"
    wan-nabla serve --model tiny --port 8000          # http://127.0.0.1:8000/ : the page; /v1/videos: the API

Modules: preflight.py (a request -> a checked JobSpec, through the product's validation),
queue.py (SQLite WAL queue, fsync'd commits), worker.py (the generation loop, one per rank or
group), app.py (FastAPI routes, auth, limits, metrics), main.py (process layout, torchrun),
healthcheck.py (the Docker HEALTHCHECK), page/index.html (the web page). docs/serve.md is the
user's guide. Limits: one model per server; the queue lives on one host.
"""
