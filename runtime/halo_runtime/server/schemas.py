"""The OpenAI wire format: requests parsed into frozen dataclasses, replies and stream chunks built
as OpenAI sends them, errors as OpenAI's JSON error object.

Parsing is strict about what it uses and lenient about the rest: a field HALO reads must have the
right type and range, or the request gets a 400 naming the field (`param`); fields HALO does not
implement but that change nothing when left at their defaults (`user`, `response_format` text,
`logprobs: false`, `n: 1`) are accepted; ones that would change the answer (`n` > 1, `logprobs`,
`echo`, `tools`) are refused rather than silently ignored. Extensions that llama.cpp and vLLM
also accept: `top_k`, `repetition_penalty`, `ignore_eos`.

Example:
    >>> from halo_runtime.server.schemas import parse_chat, ApiError, Reply
    >>> req = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    >>> req.messages[0].content, req.options.sampling.greedy, req.options.stream
    ('hi', True, False)
    >>> try:
    ...     parse_chat({"model": "m", "messages": [], "max_tokens": 8})
    ... except ApiError as e:
    ...     print(e.status, e.body()["error"]["param"])
    400 messages
    >>> Reply("chat", "m", "fp_0").chunk(text="Hel")["choices"][0]["delta"]
    {'content': 'Hel'}
"""
from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass

from ..core.sampling import SamplingParams

MAX_STOP = 4


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    """system, user, assistant, ... (passed to the chat template as given)."""
    content: str
    """Its text (content parts of type text are joined)."""

    def __post_init__(self):
        if not self.role:
            raise ValueError("role must be a non-empty string")


@dataclass(frozen=True)
class Options:
    """What both endpoints share: model, streaming, length, sampling and stop strings."""

    model: str
    """Model id; must be the served model's."""
    stream: bool = False
    """Answer as server-sent events, one chunk per piece of text."""
    include_usage: bool = False
    """stream_options.include_usage: a last chunk with the token counts."""
    max_tokens: int | None = None
    """Most tokens to generate; None = what the context leaves."""
    sampling: SamplingParams = SamplingParams(temperature=1.0)
    """How tokens are chosen (OpenAI's defaults: temperature 1, top_p 1)."""
    stop: tuple[str, ...] = ()
    """Strings that end the reply (not included in it)."""
    ignore_eos: bool = False
    """Generate max_tokens tokens even past the end-of-sequence token (benchmarks)."""

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if len(self.stop) > MAX_STOP:
            raise ValueError(f"stop takes at most {MAX_STOP} strings")


@dataclass(frozen=True)
class ChatRequest:
    """POST /v1/chat/completions."""

    options: Options
    """Shared options."""
    messages: tuple[Message, ...]
    """The conversation so far."""

    def __post_init__(self):
        if not self.messages:
            raise ValueError("messages must not be empty")


@dataclass(frozen=True)
class CompletionRequest:
    """POST /v1/completions."""

    options: Options
    """Shared options."""
    prompt: str | tuple[int, ...]
    """Text, or token ids."""


# ---- parsing --------------------------------------------------------------------------------------

def _bad(param: str, why: str) -> ApiError:
    return ApiError(400, f"'{param}': {why}", param=param)


def _get(data: dict, key: str, kinds: tuple, default=None, alias: str | None = None):
    if alias and key not in data:
        key = alias
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__.replace("str", "string").replace("int", "integer") for k in kinds)
        raise _bad(key, f"expected {names}, got {json.dumps(value)[:40]}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(key, "must be a finite number")
    return value


def _number(data: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = float(_get(data, key, (int, float), default))
    if not lo <= value <= hi:
        raise _bad(key, f"must be between {lo:g} and {hi:g}, got {value:g}")
    return value


def _refuse(data: dict, key: str, allowed) -> None:
    if key in data and data[key] not in allowed:
        raise _bad(key, f"not supported by this server (only {' or '.join(json.dumps(a) for a in allowed)})")


def _options(data: dict) -> Options:
    model = _get(data, "model", (str,))
    if not model:
        raise _bad("model", "required")
    _refuse(data, "n", (None, 1))
    stop = _get(data, "stop", (str, list), ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) for s in stop):
        raise _bad("stop", "expected a string or a list of strings")
    if len(stop) > MAX_STOP:
        raise _bad("stop", f"at most {MAX_STOP} strings")
    max_tokens = _get(data, "max_completion_tokens", (int,), alias="max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise _bad("max_tokens", f"must be at least 1, got {max_tokens}")
    seed = _get(data, "seed", (int,))
    if seed is not None and not -2 ** 63 <= seed < 2 ** 64:
        raise _bad("seed", "must fit in 64 bits")
    top_k = _get(data, "top_k", (int,), 0)
    if top_k < 0:
        raise _bad("top_k", "must be >= 0")
    sampling = SamplingParams(
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0), top_k=top_k,
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0) or 1e-9,  # OpenAI accepts 0: the single most likely token
        repetition_penalty=_number(data, "repetition_penalty", 1.0, 1e-3, 100.0),
        frequency_penalty=_number(data, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(data, "presence_penalty", 0.0, -2.0, 2.0),
        seed=None if seed is None else seed % 2 ** 63)
    stream_options = _get(data, "stream_options", (dict,), {})
    return Options(model=model, stream=_get(data, "stream", (bool,), False),
                   include_usage=bool(stream_options.get("include_usage")), max_tokens=max_tokens,
                   sampling=sampling, stop=stop, ignore_eos=_get(data, "ignore_eos", (bool,), False))


def _content(i: int, content) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", "expected a string or a list of text parts")


def parse_chat(data: dict) -> ChatRequest:
    """The request in `data` (a parsed JSON object); ApiError(400) naming the first bad field."""
    options = _options(data)
    for key in ("tools", "functions"):
        _refuse(data, key, (None, []))
    _refuse(data, "logprobs", (None, False))
    messages = _get(data, "messages", (list,))
    if not messages:
        raise _bad("messages", "required, and must not be empty")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise _bad(f"messages[{i}]", "expected an object with a string 'role'")
        parsed.append(Message(m["role"], _content(i, m.get("content"))))
    return ChatRequest(options, tuple(parsed))


def parse_completion(data: dict) -> CompletionRequest:
    """The request in `data`; ApiError(400) naming the first bad field."""
    options = _options(data)
    _refuse(data, "echo", (None, False))
    _refuse(data, "best_of", (None, 1))
    _refuse(data, "logprobs", (None, 0))
    _refuse(data, "suffix", (None, ""))
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return CompletionRequest(options, prompt)
    if (isinstance(prompt, list) and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)):
        return CompletionRequest(options, tuple(prompt))
    raise _bad("prompt", "expected a non-empty string or list of token ids (one prompt per request)")


# ---- replies --------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens whose KV cache an earlier request of the
    conversation left on the devices (not computed again)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(obj) -> bytes:
    """One server-sent event carrying `obj` as JSON (or the literal [DONE])."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Reply:
    """Builds one completion's reply objects (ids and timestamps shared by its chunks)."""

    def __init__(self, kind: str, model: str, fingerprint: str):
        """kind: "chat" or "text"."""
        self.kind, self.model, self.fingerprint = kind, model, fingerprint
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def chunk(self, text: str | None = None, role: bool = False, finish: str | None = None,
              halo: dict | None = None) -> dict:
        """A stream chunk: the role (first chunk), a piece of text, or the finish reason."""
        if self.kind == "chat":
            delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = {**self._head("text_completion"), "choices": [choice]}
        if halo:
            out["halo"] = halo
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        """The last chunk when stream_options.include_usage: no choices, the token counts."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}

    def full(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int, halo: dict,
             cached_tokens: int = 0) -> dict:
        """The whole reply of a request without streaming."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
                "halo": halo}
