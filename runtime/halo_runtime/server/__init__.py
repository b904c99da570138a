"""The coordinator's HTTP server (`halo-run serve`): an OpenAI-compatible API, health, Prometheus
metrics and a chat page, over the generation engine.

    app.py      routes, SSE streaming, start-up (Starlette + uvicorn)
    schemas.py  OpenAI request parsing (frozen dataclasses) and reply/chunk objects
    engine.py   the one thread that runs the coordinator, requests in order
    metrics.py  the Prometheus registry; the one adapter that reads exchange stats
    chat.html   the chat page (static, no build step, no CDN)

Only the coordinator needs this package's dependencies (`pip install 'halo-runtime[serve]'`);
workers never import it, and importing this package alone loads none of them.

Example:
    >>> from importlib import resources
    >>> resources.files("halo_runtime.server").joinpath("chat.html").read_text().startswith("<!doctype html>")
    True
"""
