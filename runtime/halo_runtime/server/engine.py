"""The generation engine: one thread owns the coordinator and its exchange and serves requests in
the order they came.

Every request is a fresh session (`Coordinator.generate` says HELLO with a new random session id,
and each device drops its KV cache), except where its prompt starts with tokens the devices hold
from the request before (a chat's next turn: the earlier turns and the reply): that session goes
on from there (`reuse`), skipping the prefill of the shared prefix. The reply is the same either
way (a row's bits do not depend on its pass), so nothing of one conversation leaks into another. Requests
are not batched into shared rounds, although that would pay: a round's cost hardly grows with the
token rows it carries (docs/BENCHMARKS.md, "Serving"); but a device holds one session's KV cache
and a request message one start position, so batching needs several sessions per device first.
A device that holds critical groups and dies is replaced by the plan's failover (`core.failover`):
the survivors take its groups, rebuild its KV cache, and the request in flight completes; /metrics
counts the failover (`halo_failovers`), /health shows the device "replaced", and it takes its groups
back at the first request after it answers again. Where the plan has no failover for it (the
survivors cannot hold its groups), a lost device (`DeviceLost`) fails only the request it happened
in (503); the engine drops that exchange and builds a new one for the next request, so a restarted
device is used again. A relaxed-only device that dies mid-stream
is marked down by the exchange and compensated: the reply completes.

Results go back through a `deliver` callback (the HTTP side hands one that wakes its event loop):
`Piece` per token, then `Finished` or `Failed`.

Example:
    >>> from halo_runtime.server.engine import lost_device, Job, Work, Failed
    >>> lost_device("device dev2 (127.0.0.1:7702) stopped answering: no reply ...", ["dev1", "dev2"])
    'dev2'
    >>> got = []
    >>> job = Job(Work(prompt=(1, 2), max_tokens=4), got.append)
    >>> job.cancel(); job.cancelled.is_set()
    True
    >>> job.fail(503, "device dev2 stopped answering", "device_lost"); got
    [Failed(status=503, message='device dev2 stopped answering', code='device_lost')]
"""
from __future__ import annotations

import queue
import re
import secrets
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from ..core.coordinator import Coordinator
from ..core.sampling import Sampler, SamplingParams
from ..core.textstream import TextStream
from ..net.recovery import DeviceLost
from ..net.transport import TransportError
from .metrics import Metrics, exchange_counters


@dataclass(frozen=True)
class Work:
    """One generation to run."""

    prompt: tuple[int, ...]
    """Prompt token ids (chat template applied)."""
    max_tokens: int
    """Most tokens to generate."""
    sampling: SamplingParams = SamplingParams()
    """How tokens are chosen (greedy by default)."""
    stop: tuple[str, ...] = ()
    """Strings that end the reply."""
    ignore_eos: bool = False
    """Do not stop at the end-of-sequence token."""

    def __post_init__(self):
        if not self.prompt or self.max_tokens < 1:
            raise ValueError("a generation needs a prompt and max_tokens >= 1")


@dataclass(frozen=True)
class Piece:
    """Text that became final after a token (may be empty), with that token's statistics."""

    text: str
    """New text (stop strings and incomplete characters held back)."""
    step: int
    """Index of the token in the reply."""
    token_ms: float | None
    """Time the token took (the first one includes the prompt); None for text held back until the end."""
    compensated: int
    """Relaxed parts compensated on this token, all devices."""


@dataclass(frozen=True)
class Finished:
    """The reply ended normally."""

    reason: str
    """OpenAI's finish_reason: "stop" (end token or stop string) or "length"."""
    prompt_tokens: int
    """Tokens in the prompt."""
    completion_tokens: int
    """Tokens generated (the end token included)."""
    summary: dict = field(default_factory=dict)
    """ttft_ms, tpot_ms_p50, compensated_share, tokens_per_s."""
    cached_tokens: int = 0
    """Prompt tokens the devices held from the conversation's earlier request (not computed again)."""


@dataclass(frozen=True)
class Failed:
    """The reply could not be produced."""

    status: int
    """HTTP status (503: a device holding critical groups is lost; 500: a bug)."""
    message: str
    """One line naming what failed."""
    code: str
    """OpenAI error code."""


class Job:
    """A queued generation and the way back to its client."""

    def __init__(self, work: Work, deliver: Callable[[object], None]):
        self.work, self.deliver = work, deliver
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """The client went away: stop before the next token (or never start)."""
        self.cancelled.set()

    def fail(self, status: int, message: str, code: str) -> None:
        self.deliver(Failed(status, message, code))


def lost_device(message: str, devices) -> str | None:
    """The device a DeviceLost message names (they all start "device NAME ...")."""
    m = re.match(r"device ([^\s:,()]+)", message)
    return m.group(1) if m and m.group(1) in devices else None


def _warn(msg: str) -> None:
    print(f"halo-run: warning: {msg}", file=sys.stderr, flush=True)


class Engine:
    """Runs Jobs one at a time on the coordinator thread."""

    def __init__(self, plan, shard, tokenizer, make_exchange: Callable[[], object], metrics: Metrics,
                 eos_ids: set[int], max_waiting: int = 64, warn=_warn, drafts=None, draft_tokens: int = 0):
        """make_exchange() -> a fresh Exchange (may raise DeviceLost); eos_ids: tokens that end a reply;
        drafts(coordinator) -> its draft (core.draft.prepare_draft), None: no drafts; draft_tokens: guesses
        verified per pass."""
        self.plan, self.shard, self.tok = plan, shard, tokenizer
        self.make_exchange, self.metrics, self.warn = make_exchange, metrics, warn
        self.eos_ids, self.max_waiting = set(eos_ids), max_waiting
        self.jobs: queue.Queue = queue.Queue()
        self.waiting = 0
        self.lock = threading.Lock()
        self.exchange = self.coord = self.draft = None
        self.replaced: str | None = None
        """A critical device replaced by the plan's failover (its groups on the survivors)."""
        self.drafts, self.draft_tokens = drafts, draft_tokens
        self.remote = [d for d in plan.device_names if d != plan.coordinator]
        self.lost: dict[str, str] = {}
        """Device -> why, for devices holding critical groups that stopped answering."""
        self.down: tuple[str, ...] = ()
        """Relaxed-only devices the exchange has marked down."""
        self.served = 0
        self.closing = False
        self.current: Job | None = None
        self.thread = threading.Thread(target=self._run, name="halo-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> bool:
        """Queue `job`; False when max_waiting requests are queued already."""
        with self.lock:
            if self.waiting >= self.max_waiting:
                return False
            self.waiting += 1
            self.metrics.queue.set(self.waiting)
        self.jobs.put(job)
        return True

    def close(self) -> None:
        """Cancel what runs and what waits, and stop the thread."""
        self.closing = True
        if self.current is not None:
            self.current.cancel()
        self.jobs.put(None)
        self.thread.join(timeout=30)
        if self.exchange is not None:
            self.exchange.close()

    # ---- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        self._connect(handshake=True)
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.current = job
            try:
                if job.cancelled.is_set() or self.closing:
                    self.metrics.requests.labels("cancelled").inc()
                    job.fail(503, "the server is shutting down", "shutting_down")  # unread if the client left
                else:
                    self._serve(job)
            finally:
                self.current = None
                with self.lock:
                    self.waiting -= 1
                    self.metrics.queue.set(self.waiting)

    def _connect(self, handshake: bool = False) -> bool:
        """Build the exchange and coordinator if there are none; at start-up also greet every device
        so that /health knows who answers before the first request."""
        try:
            if self.exchange is None:
                self.exchange = self.make_exchange()
                self.coord = Coordinator(self.plan, self.shard, self.exchange)
                self.draft = self.drafts(self.coord) if self.drafts is not None else None
                self.metrics.absorb(exchange_counters(self.exchange), fresh=True)
            if handshake:
                self.exchange.begin(secrets.randbits(32))
                self._sync_devices(ok=True)
            return True
        except (DeviceLost, TransportError) as e:
            self._lose(str(e))
            return False

    def _lose(self, message: str) -> None:
        device = lost_device(message, self.remote)
        self.lost[device or "?"] = message
        if device:
            self.metrics.up.labels(device).set(0)
        self.warn(message)
        if self.exchange is not None:
            self.exchange.close()
        self.exchange = self.coord = None

    def _count_failovers(self, seen: int) -> None:
        """Put the coordinator's failovers since `seen` in /metrics, one warning line each."""
        for e in self.coord.failovers[seen:]:
            self.metrics.failover(e.device, e.at, e.switch_ms / 1e3)
            self.warn(f"device {e.device} was replaced by the plan's failover ({e.switch_ms:.0f} ms switch, "
                      f"{e.position} tokens of KV cache rebuilt)")

    def _sync_devices(self, ok: bool) -> None:
        """Device status after a round trip: `ok` means a session began, so no critical device is lost."""
        counters = exchange_counters(self.exchange)
        self.metrics.absorb(counters)
        if ok:
            self.lost = {}
        self.down = counters.down
        self.replaced = self.coord.failed if self.coord is not None else None
        for d in self.remote:
            self.metrics.up.labels(d).set(0 if d in self.down or d in self.lost or d == self.replaced else 1)

    def _serve(self, job: Job) -> None:
        work = job.work
        if not self._connect():
            self.metrics.requests.labels("failed").inc()
            return job.fail(503, next(iter(self.lost.values())), "device_lost")
        self.metrics.prompt_tokens.inc(len(work.prompt))
        stream = TextStream(lambda ids: self.tok.decode(ids, skip_special=True), work.stop)
        sampler = Sampler(work.sampling, prompt_tokens=len(work.prompt))
        ended_by_eos = []
        times, compensated = [], [0]

        def on_token(step, token, st):
            if step == 0:
                self._sync_devices(ok=True)  # the session began: every critical device answered
            missing = sum(st.missing.values())
            times.append(st.total_ms)
            compensated[0] += missing
            self.metrics.token(step, st.total_ms / 1e3, dict(st.missing))
            if step % 8 == 0:
                self._sync_devices(ok=True)
            if token in self.eos_ids and not work.ignore_eos:
                ended_by_eos.append(token)
            job.deliver(Piece(stream.push(token), step, round(st.total_ms, 3), missing))

        started = time.perf_counter()
        seen = len(self.coord.failovers)
        try:
            gen = self.coord.generate(list(work.prompt), work.max_tokens, session=secrets.randbits(32),
                                      on_token=on_token, choose=sampler, draft=self.draft,
                                      draft_tokens=self.draft_tokens, reuse=True,
                                      stop=lambda: bool(ended_by_eos) or stream.stopped or job.cancelled.is_set())
        except (DeviceLost, TransportError) as e:
            self._count_failovers(seen)
            self._lose(str(e))
            self.metrics.requests.labels("failed").inc()
            return job.fail(503, str(e), "device_lost")
        except Exception as e:  # a bug must not take the server down with it
            traceback.print_exc()
            self._lose(f"internal error: {type(e).__name__}: {e}")
            self.metrics.requests.labels("failed").inc()
            return job.fail(500, f"internal error: {type(e).__name__}: {e}", "internal_error")
        self._count_failovers(seen)
        self._sync_devices(ok=True)
        self.served += 1
        if job.cancelled.is_set():
            self.metrics.requests.labels("cancelled").inc()
            return job.fail(503, "the server is shutting down", "shutting_down") if self.closing else None
        tail = stream.flush()
        if tail:
            job.deliver(Piece(tail, len(gen.tokens) - 1, None, 0))
        reason = "stop" if stream.stopped or ended_by_eos else "length"
        elapsed = time.perf_counter() - started
        expected = sum(self.metrics.relaxed_layers.values()) * len(gen.tokens)
        decode = sorted(times[1:])
        summary = {"ttft_ms": round(times[0], 3) if times else None,
                   "tpot_ms_p50": round(decode[len(decode) // 2], 3) if decode else None,
                   "compensated_share": round(compensated[0] / expected, 6) if expected else 0.0,
                   "tokens_per_s": round(len(gen.tokens) / elapsed, 3) if elapsed else None}
        self.metrics.requests.labels("completed").inc()
        self.metrics.cached_tokens.inc(gen.reused)
        job.deliver(Finished(reason, len(work.prompt), len(gen.tokens), summary, gen.reused))

    # ---- read from the HTTP side ----------------------------------------------------------------

    def device_status(self) -> dict[str, str]:
        """Remote device -> "up", "down" (relaxed-only, compensated), "replaced" (critical, its groups on
        the survivors by the plan's failover) or "lost" (critical, failing requests)."""
        lost, down, replaced = dict(self.lost), set(self.down), self.replaced
        return {d: "lost" if d in lost else "down" if d in down else "replaced" if d == replaced else "up"
                for d in self.remote}
