"""The generation engine: one thread owns the coordinator and its exchange, and advances every
active request by one pass per round trip (continuous batching).

A device holds the KV caches of `Plan.session_slots()` sessions (slots). Each pass carries, for
every active request, its next rows: a chunk of its prompt (at most `BatchOptions.prefill_chunk`,
`--prefill-chunk`, tokens, so a long prompt does not stall the others' decoding for its whole
prefill), or its last token and its draft's guesses (as many as are worth their rows' compute,
`passcost`); the requests share the round trips, which cost the same with one row or eight. A
new request joins at the next pass when a slot is free (else it waits in the queue, and is
refused only when `max_waiting` are queued or running); a finished or cancelled one leaves at
once. Sampling, stop strings, seeds and drafts are per request, and so is
the loss: a relaxed part missing on a request's rows is compensated on those rows only. A row's
bits never depend on what else is in its pass (each session attends in its own graph, MLP rows
are independent), so at temperature 0 a reply equals the one it gets alone.

A request whose prompt starts with tokens a free slot still holds (a chat's earlier turns and
the reply) takes that slot and skips their prefill; otherwise the least recently used free slot.
Where a busy slot holds a longer start of it (the system prompt every chat begins with, while
eight chats arrive at once), its first pass has every device copy those KV rows into its slot
instead of computing them (`Feed.source`; the source slot is not given away until then).
A device that holds critical groups and dies is replaced by the plan's failover (`core.failover`):
the survivors take its groups, the running sessions' KV rows of its heads are rebuilt from what
it was sent, and the interrupted pass runs again; /metrics counts it (`halo_failovers`), /health
shows the device "replaced", and it takes its groups back at the first pass after it answers
again with no request active. Where
the plan has no failover for it, a lost device (`DeviceLost`) fails the requests in flight (503);
the engine drops that exchange and builds a new one for the next request, so a restarted device is
used again. A relaxed-only device that dies is marked down by the exchange and compensated.

With `serve --rounds push` the coordinator is a `core.push.PushCoordinator`: the sessions share
push passes as they share star ones (each view attends with each session's own KV cache).

Results go back through each `jobs.Job`'s `deliver` callback: `Piece` per token, then `Finished`
or `Failed`.

Example:
    >>> from halo_runtime.server.engine import lost_device
    >>> lost_device("device dev2 (127.0.0.1:7702) stopped answering: no reply ...", ["dev1", "dev2"])
    'dev2'
"""
from __future__ import annotations

import queue
import re
import secrets
import sys
import threading
import time
import traceback
from typing import Callable

from ..core.coordinator import Coordinator, Feed
from ..core.draft import shared_prefix, verify
from ..core.generation import TokenStats, share
from ..core.push import PushCoordinator
from ..core.sampling import Sampler
from ..core.spans import MAX_SLOTS, BatchOptions
from ..core.textstream import TextStream
from ..net.recovery import DeviceLost
from ..net.transport import TransportError
from .jobs import Failed, Finished, Job, Piece
from .metrics import Metrics, exchange_counters
from .passcost import PassCost, acceptance, worth_guessing


def lost_device(message: str, devices) -> str | None:
    """The device a DeviceLost message names (they all start "device NAME ...")."""
    m = re.match(r"device ([^\s:,()]+)", message)
    return m.group(1) if m and m.group(1) in devices else None


def _warn(msg: str) -> None:
    print(f"halo-run: warning: {msg}", file=sys.stderr, flush=True)


class _Active:
    """A request holding a session slot: what it fed, what it still has to feed, what it made."""

    def __init__(self, job: Job, slot: int, reused: int, tokenizer, source: int | None = None):
        work = job.work
        self.job, self.slot, self.reused, self.source = job, slot, reused, source
        """source: the slot whose first `reused` rows its first pass copies (None: its own slot's)."""
        self.seen = list(work.prompt)
        """Prompt and tokens generated so far."""
        self.feed = list(work.prompt[reused:])
        """Tokens not yet in the devices' KV caches (the prompt's rest, then the last token)."""
        self.sampler = Sampler(work.sampling, prompt_tokens=len(work.prompt))
        self.stream = TextStream(lambda ids: tokenizer.decode(ids, skip_special=True), work.stop)
        self.generated = self.compensated = 0
        self.proposed = self.accepted = 0
        """Draft guesses verified for this request, and how many of them were accepted."""
        self.times: list[float] = []
        self.eos = False
        self.started = time.perf_counter()
        self.first = TokenStats()
        """The prompt's passes, summed: the first token's statistics."""

    def done(self) -> bool:
        return self.eos or self.stream.stopped or self.generated >= self.job.work.max_tokens


class Engine:
    """Runs Jobs on the coordinator thread, up to `slots` at once in shared passes."""

    def __init__(self, plan, shard, tokenizer, make_exchange: Callable[[], object], metrics: Metrics,
                 eos_ids: set[int], max_waiting: int = 64, warn=_warn, drafts=None, draft_tokens: int = 0,
                 batch: BatchOptions = BatchOptions(), rounds: str = "star"):
        """make_exchange() -> a fresh Exchange (may raise DeviceLost; for push rounds a push mesh,
        `core.push.PushMesh`); eos_ids: tokens that end a reply; drafts(coordinator) -> its draft
        (core.draft.prepare_draft), None: no drafts; draft_tokens: guesses verified per pass; rounds:
        star or push (`core.plan.ROUNDS`)."""
        self.plan, self.shard, self.tok = plan, shard, tokenizer
        self.make_exchange, self.metrics, self.warn = make_exchange, metrics, warn
        self.coordinator = PushCoordinator if rounds == "push" else Coordinator
        self.eos_ids, self.max_waiting = set(eos_ids), max_waiting
        self.slots = min(batch.slots or MAX_SLOTS, plan.session_slots())
        self.chunk = batch.prefill_chunk
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
        self.served = self.passes = 0
        self.closing = False
        self.active: list[_Active] = []
        self.cost = PassCost()
        """A pass's time against its rows: whether a guess is worth its row (`passcost`)."""
        self.used = [0.0] * self.slots
        """When each slot last held a request (least recently used goes first)."""
        self.thread = threading.Thread(target=self._run, name="halo-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> bool:
        """Queue `job`; False when max_waiting requests are queued or running already."""
        with self.lock:
            if self.waiting >= self.max_waiting:
                return False
            self.waiting += 1
            self._gauges()
        self.jobs.put(job)
        return True

    def close(self) -> None:
        """Cancel what runs and what waits, and stop the thread."""
        self.closing = True
        for a in list(self.active):
            a.job.cancel()
        self.jobs.put(None)
        self.thread.join(timeout=30)
        if self.exchange is not None:
            self.exchange.close()

    def _gauges(self) -> None:
        self.metrics.queue.set(self.waiting)
        self.metrics.queued.set(self.waiting - len(self.active))
        self.metrics.slots_active.set(len(self.active))

    def _leave(self, a: _Active) -> None:
        """`a` gives its slot back (finished, cancelled or failed)."""
        self.active.remove(a)
        self.used[a.slot] = time.monotonic()
        with self.lock:
            self.waiting -= 1
            self._gauges()

    # ---- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        self._connect()  # at start-up: greets every device, so that /health knows who answers
        while True:
            if not self._admit():
                for a in list(self.active):
                    self._end(a, Failed(503, "the server is shutting down", "shutting_down"), "cancelled")
                return
            if self.active:
                self._pass()

    def _free(self) -> list[int]:
        """Slots a new request may take: not running, and no running request's copy source before
        its first pass (its rows must stay as they are until copied)."""
        taken = {a.slot for a in self.active} | {a.source for a in self.active}
        return [s for s in range(self.slots) if s not in taken]

    def _admit(self) -> bool:
        """Take queued jobs into free slots (waiting for one when nothing runs); False: shut down."""
        while self._free():
            try:
                job = self.jobs.get(block=not self.active)
            except queue.Empty:
                return True
            if job is None or self.closing:
                if job is not None:
                    job.fail(503, "the server is shutting down", "shutting_down")
                return False
            if job.cancelled.is_set():
                self.metrics.requests.labels("cancelled").inc()
                self._drop(job)
            elif not self._connect():
                self.metrics.requests.labels("failed").inc()
                job.fail(503, next(iter(self.lost.values())), "device_lost")
                self._drop(job)
            else:
                self._start(job)
        return True

    def _drop(self, job: Job) -> None:
        with self.lock:
            self.waiting -= 1
            self._gauges()

    def _start(self, job: Job) -> None:
        """Give `job` the free slot holding the longest prefix of its prompt (else the least recently
        used); where a running request's slot holds a longer one (the same system prompt, say), its
        first pass copies those rows rather than computing them again."""
        prompt = list(job.work.prompt)
        held = [min(shared_prefix(fed, prompt), len(prompt) - 1) for fed in self.coord.fed]
        slot = max(self._free(), key=lambda s: (held[s], -self.used[s]))
        source = max(range(self.slots), key=lambda s: held[s])
        if held[source] > held[slot]:
            self.coord.fed[slot] = []  # its rows are replaced (`Feed.source`)
            self.active.append(_Active(job, slot, held[source], self.tok, source))
        else:
            del self.coord.fed[slot][held[slot]:]  # past the shared prefix, the rows are overwritten
            self.active.append(_Active(job, slot, held[slot], self.tok))
        self.metrics.prompt_tokens.inc(len(prompt))
        with self.lock:
            self._gauges()

    def _reset(self) -> None:
        """A new session on every device (their KV caches dropped)."""
        seen = len(self.coord.failovers)
        self.coord.reset(secrets.randbits(32))
        self._count_failovers(seen)
        self._sync_devices(ok=True)

    def _connect(self) -> bool:
        """Build the exchange and coordinator if there are none and start a session (its HELLO
        greets every device); False, the device named in `lost`, if one does not answer."""
        try:
            if self.exchange is None:
                self.exchange = self.make_exchange()
                self.coord = self.coordinator(self.plan, self.shard, self.exchange)
                self.draft = self.drafts(self.coord) if self.drafts is not None else None
                self.metrics.absorb(exchange_counters(self.exchange), fresh=True)
                self._reset()
            elif not self.active and (self.coord.failed is not None or not getattr(self.coord, "pushing", True)):
                # nothing runs: a replaced device may answer again and take its groups back, and push
                # rounds a loss moved to the star may start again (`net.push.UdpPush.begin`)
                self._reset()
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
        """Device status after a round trip: `ok` means a pass went through, so no critical device is lost."""
        counters = exchange_counters(self.exchange)
        self.metrics.absorb(counters)
        if ok:
            self.lost = {}
        self.down = counters.down
        self.replaced = self.coord.failed if self.coord is not None else None
        for d in self.remote:
            self.metrics.up.labels(d).set(0 if d in self.down or d in self.lost or d == self.replaced else 1)

    # ---- one pass of every active request -------------------------------------------------------------

    def _pass(self) -> None:
        for a in [a for a in self.active if a.job.cancelled.is_set()]:
            self._end(a, None, "cancelled")
        if not self.active:
            return
        feeds, guesses = [], []
        # a prompt is fed in chunks only while others share the passes: alone, one pass is fastest
        chunk = self.chunk if len(self.active) > 1 else len(max((a.feed for a in self.active), key=len))
        rows = sum(min(len(a.feed), chunk) for a in self.active)
        tokens = sum(len(a.feed) <= chunk for a in self.active)
        fit = self.cost.fit()
        for a in self.active:
            start = len(self.coord.fed[a.slot]) if a.source is None else a.reused
            if len(a.feed) > chunk:
                feeds.append(Feed(a.slot, start, tuple(a.feed[:chunk]), 0, a.source))
                guesses.append([])
                continue
            left = a.job.work.max_tokens - a.generated - 1
            k = min(self.draft_tokens, left) if self.draft is not None and a.generated else 0
            if k > 0 and fit is not None and a.sampler.params.greedy:
                k = worth_guessing(acceptance(a.accepted, a.proposed), k, fit[1], fit[0] + fit[1] * rows, tokens)
            g = [int(t) for t in self.draft.propose(a.seen, k)][:k] if k > 0 else []
            feeds.append(Feed(a.slot, start, tuple(a.feed + g), len(g) + 1, a.source))
            guesses.append(g)
        stats = [TokenStats() for _ in feeds]
        t0 = time.perf_counter()
        self.coord.step += 1
        seen = len(self.coord.failovers)
        try:
            outs = self.coord.run(feeds, self.coord.step - 1, stats)
        except DeviceLost as lost:
            return self._replace(lost, seen)
        except TransportError as e:
            return self._fail_all(str(e), seen)
        except Exception as e:  # a bug must not take the server down with it
            traceback.print_exc()
            return self._fail_all(f"internal error: {type(e).__name__}: {e}", seen, 500, "internal_error")
        ms = 1e3 * (time.perf_counter() - t0)
        self.passes += 1
        sent = sum(len(f.tokens) for f in feeds)
        self.cost.observe(sent, ms)
        self.metrics.batch_rows.observe(sent)
        self.metrics.batch_sessions.observe(len(feeds))
        if self.passes % 8 == 1:
            self._sync_devices(ok=True)
        for a, f, g, out, st in zip(list(self.active), feeds, guesses, outs, stats):
            st.total_ms = ms
            a.source = None  # copied
            a.feed = a.feed[len(f.tokens) - len(g):]
            if out is None:  # a prompt chunk: its time and losses go to the first token
                a.first.add(st)
                continue
            if not a.generated:
                a.first.add(st)
                st = a.first
                st.total_ms = 1e3 * (time.perf_counter() - a.started)
            tokens, accepted = verify(out, g, a.seen, a.sampler)
            a.proposed, a.accepted = a.proposed + len(g), a.accepted + accepted
            del self.coord.fed[a.slot][f.start + len(f.tokens) - len(g) + accepted:]
            self._emit(a, tokens, st)

    def _emit(self, a: _Active, tokens: list[int], stats: TokenStats) -> None:
        """Deliver a pass's tokens of request `a`; it leaves when done."""
        work = a.job.work
        for token, st in zip(tokens, share(stats, len(tokens))):
            step = a.generated
            missing = sum(st.missing.values())
            a.seen.append(token)
            a.generated += 1
            a.times.append(st.total_ms)
            a.compensated += missing
            self.metrics.token(step, st.total_ms / 1e3, dict(st.missing))
            if token in self.eos_ids and not work.ignore_eos:
                a.eos = True
            a.job.deliver(Piece(a.stream.push(token), step, round(st.total_ms, 3), missing))
            if a.done() or a.job.cancelled.is_set():
                break
        a.feed = [a.seen[-1]]
        if a.job.cancelled.is_set():
            self._end(a, None, "cancelled")
        elif a.done():
            self._finish(a)

    def _finish(self, a: _Active) -> None:
        tail = a.stream.flush()
        if tail:
            a.job.deliver(Piece(tail, a.generated - 1, None, 0))
        reason = "stop" if a.stream.stopped or a.eos else "length"
        elapsed = time.perf_counter() - a.started
        expected = sum(self.metrics.relaxed_layers.values()) * a.generated
        decode = sorted(a.times[1:])
        summary = {"ttft_ms": round(a.times[0], 3) if a.times else None,
                   "tpot_ms_p50": round(decode[len(decode) // 2], 3) if decode else None,
                   "compensated_share": round(a.compensated / expected, 6) if expected else 0.0,
                   "tokens_per_s": round(a.generated / elapsed, 3) if elapsed else None}
        self.metrics.cached_tokens.inc(a.reused)
        self.served += 1
        self._end(a, Finished(reason, len(a.job.work.prompt), a.generated, summary, a.reused), "completed")

    def _end(self, a: _Active, event, outcome: str) -> None:
        self.metrics.requests.labels(outcome).inc()
        if event is not None:
            a.job.deliver(event)
        self._leave(a)

    def _replace(self, lost: DeviceLost, seen: int) -> None:
        """A device died mid-pass: the plan's failover (the running sessions' KV rows rebuilt on the
        survivors), then the pass runs again."""
        try:
            # a slot a request copies from on its first pass is rebuilt too: the pass runs again
            self.coord.replace_lost(lost, [a.slot for a in self.active] + [a.source for a in self.active
                                                                             if a.source is not None])
        except DeviceLost as e:
            return self._fail_all(str(e), seen)
        self._count_failovers(seen)
        self._sync_devices(ok=True)

    def _fail_all(self, message: str, seen: int, status: int = 503, code: str = "device_lost") -> None:
        """End every active request with `message` and drop the exchange (the next request builds one)."""
        if self.coord is not None:
            self._count_failovers(seen)
        self._lose(message)
        for a in list(self.active):
            self._end(a, Failed(status, message, code), "failed")

    # ---- read from the HTTP side ----------------------------------------------------------------

    def device_status(self) -> dict[str, str]:
        """Remote device -> "up", "down" (relaxed-only, compensated), "replaced" (critical, its groups on
        the survivors by the plan's failover) or "lost" (critical, failing requests)."""
        lost, down, replaced = dict(self.lost), set(self.down), self.replaced
        return {d: "lost" if d in lost else "down" if d in down else "replaced" if d == replaced else "up"
                for d in self.remote}
