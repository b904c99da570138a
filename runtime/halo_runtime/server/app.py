"""`halo-run serve`: the model over an OpenAI-compatible HTTP API, with health, metrics and a chat page.

Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (`stream: true`
answers with server-sent events in OpenAI's chunk format), `GET /health`, `GET /metrics`
(Prometheus text), `GET /` (the chat page). Starlette and uvicorn: a small, well-kept ASGI pair
(StreamingResponse for SSE, disconnect detection for cancellation) with no framework around it;
only the coordinator installs them (`halo-runtime[serve]`), workers never import this package.

A request's text work (chat template, tokenizer) runs in a thread pool so the event loop keeps
streaming other replies; generation runs on the engine's one thread (`server.engine`). A
streamed reply's headers wait for its first token, so a request that fails before it (a lost
device: 503) still gets a proper status; after that an error arrives as an SSE `error` event.

Example:
    >>> from halo_runtime.server.app import context_budget, ApiError
    >>> context_budget(max_context=256, prompt_tokens=10, max_tokens=None, param="messages")
    246
    >>> try:
    ...     context_budget(256, 250, 16, "messages")
    ... except ApiError as e:
    ...     print(e.status, e.code)
    400 context_length_exceeded
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .jobs import Failed, Finished, Job, Piece, Work
from .schemas import ApiError, Reply, parse_chat, parse_completion, sse

POLL_S = 0.25
"""How often a waiting request checks whether its client went away."""


class _Gone(Exception):
    """The client disconnected."""


def context_budget(max_context: int, prompt_tokens: int, max_tokens: int | None, param: str) -> int:
    """Tokens the reply may have: max_tokens, or what the context leaves; ApiError(400) if it does not fit."""
    if prompt_tokens >= max_context:
        raise ApiError(400, f"This model's maximum context length is {max_context} tokens. However, your "
                            f"prompt has {prompt_tokens} tokens. Please shorten it.", param=param,
                       code="context_length_exceeded")
    room = max_context - prompt_tokens
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {max_context} tokens. However, you requested "
                            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for "
                            f"the completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    return max_tokens


class Service:
    """What the routes need: the engine, the tokenizer and chat template, and the plan's identity."""

    def __init__(self, engine, tokenizer, template, info: dict, max_body: int, procs: dict | None = None):
        """info: model, plan_fingerprint, model_fingerprint, weights_format, sync, wire, max_context,
        devices (name, role, address, holds); procs: device -> local worker process (--local)."""
        self.engine, self.tok, self.template, self.info = engine, tokenizer, template, info
        self.max_body, self.procs = max_body, procs or {}
        self.model = info["model"]
        self.fingerprint = "fp_" + info["plan_fingerprint"][:12]

    # ---- requests ---------------------------------------------------------------------------------

    async def body(self, request: Request) -> dict:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {self.max_body} bytes",
                           code="request_too_large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_body:
                raise ApiError(413, f"request body exceeds the limit of {self.max_body} bytes",
                               code="request_too_large")
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON in the request body ({e})", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return obj

    def check_model(self, model: str) -> None:
        if model != self.model:
            raise ApiError(404, f"The model '{model}' does not exist (this server serves '{self.model}')",
                           param="model", code="model_not_found")

    async def chat(self, request: Request) -> Response:
        req = parse_chat(await self.body(request))
        self.check_model(req.options.model)
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        try:
            prompt = await run_in_threadpool(lambda: self.tok.encode(self.template.render(messages)))
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        return await self.generate(request, "chat", req.options, prompt, "messages")

    async def completion(self, request: Request) -> Response:
        req = parse_completion(await self.body(request))
        self.check_model(req.options.model)
        if isinstance(req.prompt, str):
            prompt = await run_in_threadpool(self.tok.encode, req.prompt)
        else:
            prompt = list(req.prompt)
            if max(prompt) >= self.info["vocab_size"]:
                raise ApiError(400, f"token id {max(prompt)} is outside the vocabulary ({self.info['vocab_size']})",
                               param="prompt")
        return await self.generate(request, "text", req.options, prompt, "prompt")

    async def generate(self, request: Request, kind: str, options, prompt: list[int], param: str) -> Response:
        if not prompt:
            raise ApiError(400, "the prompt is empty after tokenization", param=param)
        budget = context_budget(self.info["max_context"], len(prompt), options.max_tokens, param)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone: the server is shutting down
                pass

        job = Job(Work(tuple(prompt), budget, options.sampling, options.stop, options.ignore_eos), deliver)
        if not self.engine.submit(job):
            self.engine.metrics.requests.labels("rejected").inc()
            raise ApiError(429, "too many requests are waiting; try again later", type="rate_limit_error",
                           code="queue_full")
        reply = Reply(kind, self.model, self.fingerprint)
        try:
            first = await _next(events, request, job)
            if isinstance(first, Failed):
                return _failure(first)
            if options.stream:
                return StreamingResponse(_stream(reply, first, events, job, options), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text, event = [], first
            while isinstance(event, Piece):
                text.append(event.text)
                event = await _next(events, request, job)
        except _Gone:
            return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
        if isinstance(event, Failed):
            return _failure(event)
        return JSONResponse(reply.full("".join(text), event.reason, event.prompt_tokens, event.completion_tokens,
                                       event.summary, event.cached_tokens))

    # ---- the rest ---------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        self.check_model(request.path_params["model"])
        return JSONResponse(self.model_card())

    def model_card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.info.get("created", 0), "owned_by": "halo"}

    def health_body(self) -> dict:
        status = self.engine.device_status()
        for d, proc in self.procs.items():
            if proc.poll() is not None and status.get(d) != "replaced":
                status[d] = "exited"
        devices = []
        for dev in self.info["devices"]:
            state = "up" if dev["role"] == "coordinator" else status.get(dev["name"], "up")
            devices.append({**dev, "status": state, "up": state == "up"})
        # a critical device replaced by the plan's failover costs speed, not service
        critical_out = any(not d["up"] and d["holds"] == "critical" and d["status"] != "replaced" for d in devices)
        overall = "unavailable" if critical_out else "degraded" if any(not d["up"] for d in devices) else "ok"
        keys = ("model", "plan_fingerprint", "model_fingerprint", "weights_format", "sync", "rounds", "wire", "max_context")
        return {"status": overall, **{k: self.info[k] for k in keys}, "devices": devices,
                "requests_waiting": self.engine.waiting, "requests_served": self.engine.served}

    async def health(self, request: Request) -> Response:
        body = self.health_body()
        return JSONResponse(body, status_code=503 if body["status"] == "unavailable" else 200)

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def page(self, request: Request) -> Response:
        return HTMLResponse(resources.files(__package__).joinpath("chat.html").read_text(encoding="utf-8"))


async def _next(events: asyncio.Queue, request: Request, job: Job):
    """The engine's next event for `job`; _Gone (and the job cancelled) if the client left meanwhile."""
    getter = asyncio.ensure_future(events.get())  # one getter throughout: no event lost to a timeout
    while True:
        done, _ = await asyncio.wait({getter}, timeout=POLL_S)
        if done:
            return getter.result()
        if await request.is_disconnected():
            getter.cancel()
            job.cancel()
            raise _Gone


async def _stream(reply: Reply, event, events: asyncio.Queue, job: Job, options):
    """The SSE body. Starlette cancels it when the client disconnects; `finally` then cancels the job."""
    try:
        if reply.kind == "chat":
            yield sse(reply.chunk(role=True))
        while True:
            if isinstance(event, Piece):  # every token gets a chunk (its text may be held back: "")
                stats = None if event.token_ms is None else {"step": event.step, "token_ms": event.token_ms,
                                                             "compensated": event.compensated}
                yield sse(reply.chunk(text=event.text, halo=stats))
            elif isinstance(event, Finished):
                yield sse(reply.chunk(finish=event.reason, halo=event.summary))
                if options.include_usage:
                    yield sse(reply.usage_chunk(event.prompt_tokens, event.completion_tokens, event.cached_tokens))
                yield sse("[DONE]")
                return
            else:
                yield sse(_error(event).body())
                return
            event = await events.get()
    finally:
        job.cancel()  # no-op once finished; stops generation for a client that went away


def _error(failed: Failed) -> ApiError:
    kind = "server_error" if failed.status >= 500 else "invalid_request_error"
    return ApiError(failed.status, failed.message, type=kind, code=failed.code)


def _failure(failed: Failed) -> Response:
    return JSONResponse(_error(failed).body(), status_code=failed.status)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind).body(),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").body(),
                        status_code=500)


def create_app(service: Service) -> Starlette:
    routes = [Route("/", service.page), Route("/health", service.health), Route("/metrics", service.metrics),
              Route("/v1/models", service.models), Route("/v1/models/{model:path}", service.model),
              Route("/v1/chat/completions", service.chat, methods=["POST"]),
              Route("/v1/completions", service.completion, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                                       Exception: _internal_error})


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one); OSError names the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run(service: Service, sock: socket.socket) -> None:
    """Serve until SIGINT or SIGTERM; the engine is closed on the way out."""
    import uvicorn

    # uvicorn re-raises the signal that stopped it once it is done; with Python's default SIGTERM
    # action that would kill the process before the callers' `finally` stops the local workers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    config = uvicorn.Config(create_app(service), log_level=os.environ.get("HALO_LOG_LEVEL", "warning"),
                            access_log=False, lifespan="off", timeout_graceful_shutdown=3)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"halo-run serve: http://{shown}:{port}/ serving {service.model} "
          f"({len(service.info['devices'])} devices, {service.info['sync']})", flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.engine.close()


def build_service(plan, plan_dir: str, shard: dict, tokenizer, template, make_exchange, peers: dict,
                  sync: str, wire: str, max_body: int, max_waiting: int, procs: dict | None = None,
                  drafts=None, draft_tokens: int = 0, batch=None, rounds: str = "star") -> Service:
    """The metrics, the engine (started) and the routes' view of the plan; drafts: what makes a
    coordinator's draft (core.draft.prepare_draft), None for none; batch: `core.spans.BatchOptions`;
    rounds: star or push (`core.push`; make_exchange must make the matching exchange)."""
    from ..core.plandir import PLAN_FILE, read_manifest
    from ..core.spans import BatchOptions
    from .engine import Engine
    from .metrics import Metrics

    remote = [d for d in plan.device_names if d != plan.coordinator]
    layers = range(plan.model.num_layers)
    relaxed_layers = {d: n for d in remote
                      if (n := sum(any(not g.critical for g in plan.groups_on(d, i, "mlp")) for i in layers))}

    def holds(d: str) -> str:
        groups = [g for g in plan.groups if g.device == d]
        if d == plan.coordinator:
            return "coordinator"
        if any(g.kind == "attn" or g.critical for g in groups):
            return "critical"
        return "relaxed" if groups else "nothing"

    devices = [{"name": d, "role": "coordinator" if d == plan.coordinator else "worker",
                "address": "local" if d == plan.coordinator else "%s:%d" % tuple(peers[d][:2]), "holds": holds(d)}
               for d in plan.device_names]
    info = {"model": plan.model_name, "plan_fingerprint": read_manifest(plan_dir)[PLAN_FILE]["sha256"],
            "model_fingerprint": plan.model_fingerprint,
            "weights_format": plan.weights,
            "sync": sync, "rounds": rounds, "wire": wire, "max_context": plan.max_context, "devices": devices,
            "vocab_size": min(plan.model.vocab_size, tokenizer.vocab_size),
            "created": int(os.stat(os.path.join(plan_dir, PLAN_FILE)).st_mtime)}
    eos = {plan.model.eos_token_id} - {None}
    if template.config.eos_token in tokenizer.added:
        eos.add(tokenizer.added[template.config.eos_token])
    engine = Engine(plan, shard, tokenizer, make_exchange, Metrics(remote, relaxed_layers), eos, max_waiting,
                    drafts=drafts, draft_tokens=draft_tokens, batch=batch or BatchOptions(), rounds=rounds)
    engine.start()
    return Service(engine, tokenizer, template, info, max_body, procs)
