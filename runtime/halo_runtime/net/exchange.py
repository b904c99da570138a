"""Coordinator side of the network: UDP with relaxed synchronisation (TCP, the strict baseline: tcpexchange).

UDP delivery policy, per layer round:
- critical parts (attention, critical MLP, and relaxed parts the predictor promoted) are awaited;
  a missing one is re-requested after the device's RTO (smoothed RTT + 4 x variance, floored at
  a few ms, not TCP's 200 ms), backing off, until `dead_after_s` says the device is gone;
- a relaxed part is used if it arrives before its deadline, sent + (1 + relaxed_retries) x RTO,
  with one fast re-request at sent + RTO; after the deadline it is compensated (of a reply of
  several rows, the rows whose datagrams came are used: `_partial_rows`);
- to and from a lossy device a message goes `DeliveryPolicy.copies` times (copies are dropped on
  arrival): the plan's choice for the link (or `redundancy`) for one datagram, at least
  `multi_datagram_copies` (2) for several (a prefill, a batch of sessions), turning a miss rate q
  into about q^copies.
RTT is sampled per device and round kind, only from first attempts (Karn's rule); it includes
the device's compute time, which is what a deadline must allow for.

Device failure (UDP): a device asked for something and silent for `down_after_s` that holds only
relaxed groups is marked down with one warning line: its parts are compensated without waiting,
and it is probed with HELLO every `probe_every_s` until it answers again. A device holding
critical parts (attention, critical MLP) silent for `dead_after_s` raises DeviceLost naming it;
the coordinator then calls `fail_over`: the survivors the plan's failover names take its groups
(FAILOVER over UDP, resent until echoed; their adopted heads' KV caches over TCP from `history`),
or, without a failover for it, the run ends. A new session asks the replaced device briefly
(`RETURN_GRACE_S`) and gives it its groups back if it answers. A restarted device answers
requests of the running session with RESET; the coordinator says HELLO, rebuilds its KV caches
over TCP from the attention inputs it sent (`history`, per session slot), and carries on (rejoin).

Example (the checked-in plan, its workers nowhere: `begin` says which device does not answer):
    >>> from halo_runtime.core.plan import load_plan
    >>> from halo_runtime.net.exchange import UdpExchange
    >>> plan = load_plan("artifacts/smollm2-135m-pi5")
    >>> peers = {d: ("127.0.0.1", 9) for d in plan.device_names if d != plan.coordinator}  # discard port
    >>> ex = UdpExchange(plan, peers, bind_host="127.0.0.1")
    >>> ex.begin(session=1, timeout_s=0.2)
    Traceback (most recent call last):
    ...
    halo_runtime.core.exchange.DeviceLost: device pi5-1 at 127.0.0.1:9 does not answer (...)
    >>> ex.close()
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..core.codec import WireError, datagrams, decode_tensor, encode_request, rows_of_chunks, tensor_bytes
from ..core.exchange import Drops, ExchangeStats, RoundResult
from ..core.plan import Plan
from ..core.policy import DeliveryPolicy
from .auth import Authenticator, ReplayGuard
from .recovery import (RESUME, DeviceLost, History, adopted_inputs, adopters, hand_over, kv_inputs, rebuild,
                       rebuild_restarted, rejoin_inputs, why_not_replaced)
from .rounds import PHASE_REQUEST, RETURN_GRACE_S, _layout, _warn, attention_layers, hello_until_echoed
from .rtt import RttEstimator
from .shim import PeerShims
from .transport import TcpChannel, TransportError, UdpEndpoint
from .wire import Kind, Message, attempt_of, make_flags
from .worker import WorkerStats, query_stats

# plain ints for the per-round loop: reading an enum member costs a descriptor call each time
_ATTN, _CRIT, _RLX = int(Kind.REPLY_ATTN), int(Kind.REPLY_MLP_CRITICAL), int(Kind.REPLY_MLP_RELAXED)
_REPLIES, _HELLO, _RESET = (_ATTN, _CRIT, _RLX), int(Kind.HELLO), int(Kind.RESET)


@dataclass(slots=True)
class _Round:
    phase: str
    step: int
    layer: int
    payload: dict
    """Device -> its request message (devices with the same number of reply copies share one)."""
    targets: list
    copies: dict = field(default_factory=dict)
    """Device -> copies of its request sent per attempt (`DeliveryPolicy.copies`)."""
    rows: int = 1
    """Token rows in the round (a relaxed reply's rows whose datagrams arrive are used on their own)."""
    sent: dict = field(default_factory=dict)
    attempts: dict = field(default_factory=dict)
    next_try: dict = field(default_factory=dict)


class UdpExchange:
    def __init__(self, plan: Plan, peers: dict[str, tuple[str, int]], policy: DeliveryPolicy = DeliveryPolicy(),
                 bind_host: str = "0.0.0.0", shim=None, auth: Authenticator | None = None, warn=_warn):
        self.plan, self.policy, self.peers = plan, policy, peers
        if isinstance(shim, PeerShims) and not shim.shims:
            shim = None  # no link to emulate: datagrams go straight to the socket
        self.width = plan.model.hidden_size
        self.index = {d: i for i, d in enumerate(plan.device_names)}
        self.names = {i: d for d, i in self.index.items()}
        self.me = self.index[plan.coordinator]
        self.remote = [d for d in plan.device_names if d != plan.coordinator]
        self.loss = {d: plan.device(d).loss for d in self.remote}
        self.planned = {d: plan.link_copies(d) for d in self.remote}
        self.full, self.failed = plan, None
        self._use(plan)
        self.auth = auth or Authenticator()
        self.guard = ReplayGuard()
        self.endpoint = UdpEndpoint(bind_host, 0, shim=shim, auth=self.auth, guard=self.guard, me=self.me)
        self.warn = warn
        floor = policy.rto_floor_ms / 1000
        self.rtt = {(d, p): RttEstimator(floor_s=floor) for d in self.remote for p in ("attn", "mlp")}
        self.session = 0
        self.round: _Round | None = None
        self.down: set[str] = set()
        self.asked_since: dict[str, float | None] = dict.fromkeys(self.remote)
        self.next_probe = 0.0
        self.rejoined: dict[str, tuple[int, int]] = {}
        self.history = History(plan.model.num_layers, self.width, policy.wire)
        self.counters = {"retransmissions": 0, "late": 0, "malformed": 0, "compensated": 0,
                         "relaxed_parts": 0, "awaited_relaxed": 0, "max_relaxed_overshoot_ms": 0.0,
                         "unknown_session": 0, "devices_down": 0, "rejoins": 0}

    def _use(self, plan: Plan) -> None:
        """Ask the devices `plan` places groups on: the plan's own, or the one after a failover."""
        self.plan = plan
        self.layout = _layout(plan)
        # per phase and layer, the devices asked, in device order (computed once, not per round)
        self.targets = {"attn": self.layout["attn"],
                        "mlp": [sorted(set(c) | set(r), key=self.remote.index)
                                for c, r in zip(self.layout["crit"], self.layout["relaxed"])]}
        # devices whose loss ends the run (or fails over): they hold attention (KV state) or critical MLP groups
        self.critical = {d for d in self.remote
                         if any(d in self.layout["attn"][i] or d in self.layout["crit"][i]
                                for i in range(plan.model.num_layers))}

    # ---- session --------------------------------------------------------------------------------

    def begin(self, session: int, timeout_s: float | None = None) -> None:
        """Start `session` on every device; timeout_s [default: the policy's dead_after_s]."""
        timeout_s = self.policy.dead_after_s if timeout_s is None else timeout_s
        self.session = session
        self.endpoint.reassembler.set_watermark(0)
        self.history = History(self.plan.model.num_layers, self.width, self.policy.wire)
        # a relaxed-only device already down is probed, not awaited: a server does not stall every
        # request for it; it rejoins when it answers a probe
        was_down = self.down & set(self.remote)
        # a device replaced by its failover is asked too, but only briefly: if it answers, it is back
        dead = {self.failed} if self.failed else set()
        waiting, attempt, deadline = set(self.remote) - was_down - dead, 0, time.monotonic() + timeout_s
        grace = time.monotonic() + min(RETURN_GRACE_S, timeout_s)
        self._probe(time.monotonic())
        while waiting or (dead and time.monotonic() < grace):
            for d in sorted(waiting | dead):
                self.endpoint.send(Message(Kind.HELLO, session, 0, 0, self.me), self.peers[d],
                                   make_flags(min(attempt, 15)), dest=self.index[d])
            attempt += 1
            until = min(deadline, time.monotonic() + 0.05 * attempt)
            while (waiting or dead) and time.monotonic() < until:
                got = self.endpoint.recv(until - time.monotonic())
                if got and got[0].kind == Kind.HELLO and got[0].session == session:
                    waiting.discard(self.names.get(got[0].sender))
                    dead.discard(self.names.get(got[0].sender))
            if time.monotonic() >= deadline and waiting:
                lost = sorted(waiting & self.critical)
                if not lost:
                    break  # only relaxed groups are missing: marked down below, the session goes on
                if len(lost) == 1 and not self.failed and self.full.replaceable(lost[0]) \
                        and not waiting & adopters(self.full, lost[0]):
                    dead = {lost[0]}  # replaced below, before any token: nothing to rebuild
                    waiting.discard(lost[0])
                    break
                d = lost[0]
                raise DeviceLost(f"device {d} at {self.peers[d][0]}:{self.peers[d][1]} does not answer "
                                 f"(is `halo-run worker --device {d}` running there, with this plan's key?)", d)
        self.down = set(was_down)
        for d in sorted(waiting):
            self._mark_down(d)
        self.rejoined.clear()
        self.asked_since = dict.fromkeys(self.remote)
        if self.failed and not dead:
            self.warn(f"device {self.failed} answers again: it takes its own groups back from this request on")
            self._use(self.full)
            self.failed = None
        elif self.failed:  # still gone: the survivors take its groups again for this session
            self._announce(self.failed)
        elif dead:  # gone before this session's first token: nothing to rebuild
            self.fail_over(dead.pop(), 0)

    def resume(self, session: int, history: History, timeout_s: float, start=0) -> tuple[set[str], set[str]]:
        """Go on with `session`, run in push rounds so far (`push.UdpPush.to_star`), in star rounds:
        each device is asked back with a HELLO of the same session (`recovery.RESUME`: it keeps its
        KV cache and leaves push rounds), and `history` (the attention inputs the coordinator's view
        computed) is what a failover or a rejoin rebuilds from. A device restarted since answers
        RESET: it rejoins, its KV caches rebuilt up to `start` (slot 0's position, or slot ->
        position: the pass the loss interrupted runs again). Returns (the devices that did not
        answer within `timeout_s` or could not be rebuilt, the devices that rejoined)."""
        self.session, self.history = session, history
        self.endpoint.reassembler.set_watermark(0)
        restarted: set[str] = set()
        silent = hello_until_echoed(self.endpoint, self.plan, session, RESUME, {d: self.peers[d] for d in self.remote},
                                    timeout_s, restarted)
        rejoined, failed = rebuild_restarted(self, restarted, history, start)
        self.counters["rejoins"] += len(rejoined)
        return silent | failed, rejoined

    def fail_over(self, dead: str, start) -> dict[int, dict[int, np.ndarray]]:
        """See `core.exchange.FailingOver`: the survivors take over `dead`'s groups."""
        if self.failed or not self.full.replaceable(dead):
            raise DeviceLost(f"device {dead} cannot be replaced: {why_not_replaced(self.full, dead, self.failed)}",
                             dead)
        inputs = kv_inputs(self.history, attention_layers(self.layout, dead),
                           start if isinstance(start, dict) else {0: start})
        self._use(self.full.without(dead))
        self.failed, self.round = dead, None
        self.down.discard(dead)
        self._announce(dead)
        for s in sorted(adopters(self.full, dead), key=self.remote.index):
            mine = adopted_inputs(self.full, dead, s, inputs)
            if mine:  # KV rows to rebuild: reliably, over TCP (a datagram per row at 10% loss would not do)
                try:
                    with TcpChannel.connect(self.peers[s], timeout_s=self.policy.dead_after_s, auth=self.auth,
                                            guard=self.guard, me=self.me) as ch:
                        hand_over(ch, s, self.me, self.index[s], self.session, dead, mine, self.policy.wire,
                                  self.policy.dead_after_s)
                except TransportError as e:
                    raise DeviceLost(f"device {s} cannot take over {dead}'s groups: {e}", s) from None
        self.asked_since = dict.fromkeys(self.remote)
        return inputs

    def _announce(self, dead: str) -> None:
        """FAILOVER to every survivor that adopts some of `dead`'s groups, over UDP like HELLO (a TCP
        connection would cost a lost SYN its 1 s timeout), resent until each echoes it."""
        waiting, attempt = set(adopters(self.full, dead)), 0
        deadline = time.monotonic() + self.policy.dead_after_s
        while waiting:
            for d in sorted(waiting):
                self.endpoint.send(Message(Kind.FAILOVER, self.session, 0, 0, self.me, dead.encode()), self.peers[d],
                                   make_flags(min(attempt, 15)), dest=self.index[d])
            attempt += 1
            until = min(deadline, time.monotonic() + max(self.rtt[(d, "mlp")].rto_s for d in waiting) * attempt)
            while waiting and time.monotonic() < until:
                got = self.endpoint.recv(until - time.monotonic())
                if got and got[0].kind == Kind.FAILOVER and got[0].session == self.session:
                    waiting.discard(self.names.get(got[0].sender))
            if waiting and time.monotonic() >= deadline:
                d = sorted(waiting)[0]
                raise DeviceLost(f"device {d} did not take over {dead}'s groups in {self.policy.dead_after_s:g} s", d)

    # ---- rounds ---------------------------------------------------------------------------------

    def post(self, phase: str, step: int, layer: int, x: np.ndarray, at) -> None:
        targets = self.targets[phase][layer]
        if phase == "attn" and targets:
            self.history.append(layer, x, at)
        if self.down:
            targets = [d for d in targets if d not in self.down]
        if not targets:  # a round that stays on the coordinator: nothing to send, nothing to await
            self.round = _Round(phase, step, layer, {}, targets, rows=x.shape[0])
            return
        kind = PHASE_REQUEST[phase]
        # one message per number of reply copies (usually one for all): encoded and checked once
        reply_datagrams = datagrams(tensor_bytes(x.shape[0], self.width, self.policy.wire))
        msgs: dict[int, Message] = {}
        payload, copies = {}, {}
        for d in targets:
            c = self.policy.copies(self.loss[d], reply_datagrams, self.planned[d])
            m = msgs.get(c)
            if m is None:
                m = msgs[c] = Message(kind, self.session, step, layer, self.me,
                                      encode_request(x, at, self.policy.wire, c))
            payload[d] = m
            copies[d] = self.policy.copies(self.loss[d], datagrams(len(m.payload)), self.planned[d])
        self.round = _Round(phase, step, layer, payload, targets, copies, rows=x.shape[0])
        if step > 2:
            self.endpoint.reassembler.set_watermark(step - 2)
        self._send(targets, 0)

    def _send(self, targets: list[str], attempt: int) -> None:
        """Send the round's message to `targets` (in one `fan_out`: every first copy before any
        second), as its `attempt`-th transmission."""
        r = self.round
        flags = make_flags(attempt)
        self.endpoint.fan_out([(r.payload[d], self.peers[d], self.index[d], r.copies[d], flags) for d in targets])
        now = time.monotonic()
        # capped backoff: on these links silence means loss, not congestion, and a multi-datagram
        # prefill message loses some chunk often; unbounded doubling stalled the first token for seconds
        backoff = 2 ** min(attempt, 2)
        for d in targets:
            if self.asked_since[d] is None:
                self.asked_since[d] = now
            if attempt == 0:
                r.sent[d] = now
            else:
                self.counters["retransmissions"] += 1
            r.attempts[d] = attempt
            r.next_try[d] = now + self.rtt[(d, r.phase)].rto_s * backoff

    def _silent_for(self, d: str, now: float) -> float:
        since = self.asked_since[d]
        return 0.0 if since is None else now - since

    def _mark_down(self, d: str) -> None:
        self.down.add(d)
        self.counters["devices_down"] += 1
        self.next_probe = time.monotonic() + self.policy.probe_every_s
        host, port = self.peers[d]
        self.warn(f"device {d} ({host}:{port}) stopped answering; its relaxed groups are compensated "
                  f"from now on (it is probed and used again when it answers)")

    def _probe(self, now: float) -> None:
        self.next_probe = now + self.policy.probe_every_s
        for d in sorted(self.down):
            # attempt 15 is never deduplicated: every probe, and the device's echo of it, gets through
            self.endpoint.send(Message(Kind.HELLO, self.session, 0, 0, self.me), self.peers[d], make_flags(15),
                               dest=self.index[d])

    def _control(self, msg: Message, d: str) -> None:
        """A HELLO (answer to a probe) or RESET (a restarted device) of the running session."""
        # a RESET answers one request; those sent before the last rejoin are answered already
        if msg.kind == Kind.RESET and (msg.step, msg.layer) > self.rejoined.get(d, (-1, -1)):
            self.rejoin(d)
        elif msg.kind == Kind.HELLO and d in self.down:
            self.rejoin(d)

    def rejoin(self, d: str) -> None:
        """Bring a restarted or returning device back: HELLO, then rebuild its KV cache over TCP from
        the attention inputs of this session (all but the round in flight, which is re-requested)."""
        r = self.round
        layers = attention_layers(self.layout, d)
        inputs = rejoin_inputs(self.history, layers, r.layer if r and r.phase == "attn" else None)
        try:
            rebuild(d, self.peers[d], self.auth, self.guard, self.me, self.index[d], self.session,
                    r.step if r else 0, inputs, self.policy.wire, self.policy.dead_after_s)
        except TransportError as e:
            if d in self.critical:
                raise DeviceLost(f"device {d} restarted but cannot be rebuilt: {e}", d) from None
            return
        was_down = d in self.down
        if r is not None:
            self.rejoined[d] = (r.step, r.layer)
        self.down.discard(d)
        self.asked_since[d] = None
        self.counters["rejoins"] += 1
        tokens = sum(self.history.rows[slot][layers[0]] for slot in inputs) if layers else 0
        self.warn(f"device {d} rejoined the session" + (f" (KV cache rebuilt: {tokens} tokens in "
                                                        f"{len(layers)} layers)" if layers else "")
                  + ("" if was_down else "; its pending parts are requested again"))
        if r is not None and d in r.payload and d not in self.down:
            self._send([d], r.attempts.get(d, 0) + 1)

    def collect(self, phase: str, step: int, layer: int, awaited: dict[str, np.ndarray]) -> RoundResult:
        # one message per round carries every token: a device flagged on any token is awaited (for
        # several rows: until its flagged rows are in)
        r = self.round
        if not self.targets[phase][layer]:  # nobody holds a part of this round: nothing to wait for
            return RoundResult(parts=[])
        relaxed: set[str] = set()
        if phase == "attn":
            want = {(d, _ATTN) for d in self.layout["attn"][layer]}
        else:
            want = {(d, _CRIT) for d in self.layout["crit"][layer]}
            for d in self.layout["relaxed"][layer]:
                self.counters["relaxed_parts"] += 1
                if d in awaited and d not in self.down:
                    self.counters["awaited_relaxed"] += 1
                    want.add((d, _RLX))
                else:
                    relaxed.add(d)
        flagged = {d for d, kind in want if kind == _RLX}
        deadline = {d: r.sent.get(d, 0.0) + (1 + self.policy.relaxed_retries) * self.rtt[(d, phase)].rto_s
                    for d in relaxed | flagged}
        got: dict[tuple, np.ndarray] = {}
        first_reply: set[str] = set()
        crit_done = time.monotonic()
        wake = 0.0  # when a timer (retransmission, deadline, silence, probe) is next due
        while True:
            now = time.monotonic()
            # an awaited relaxed part of several rows is done once the rows flagged arrived, past
            # its deadline (the others are compensated, row by row)
            pending_crit = [k for k in want if k not in got and k[0] not in self.down
                            and not (k[1] == _RLX and r.rows > 1 and now >= deadline[k[0]]
                                     and (rows := self._partial_rows(r, k[0])) is not None
                                     and rows[1][awaited[k[0]]].all())]
            if pending_crit:
                crit_done = now
            pending_rlx = [d for d in relaxed if (d, _RLX) not in got and now < deadline[d]
                           and d not in self.down]
            if not pending_crit and not pending_rlx:
                break
            if now >= wake:  # replies arriving before any timer is due need no timer work
                wake = self._timers(r, phase, step, layer, pending_crit, pending_rlx, deadline, now)
                if r.rows > 1:  # a flagged part's deadline: its rows may all be here by then
                    wake = min([wake] + [deadline[d] for d in flagged if now < deadline[d]])
            item = self.endpoint.recv(max(0.0, min(wake - now, 0.05)))
            if item is None:
                continue
            msg = item[0]
            d = self.names.get(msg.sender)
            if d is None or d == self.plan.coordinator:
                self.counters["late"] += 1
                continue
            if msg.session != self.session:
                self.counters["unknown_session"] += 1
                continue
            self.asked_since[d] = None  # any authentic message of this session: it is alive
            if msg.kind == _HELLO or msg.kind == _RESET:
                self._control(msg, d)
                wake = 0.0  # a rejoin re-requests and resets timers
                continue
            if msg.step != step or msg.layer != layer:
                self.counters["late"] += 1
                continue
            key = (d, msg.kind)
            if key in got or (key not in want and not (msg.kind == _RLX and d in relaxed)):
                self.counters["late"] += key not in got
                continue
            try:
                got[key] = decode_tensor(msg.payload, self.policy.wire, self.width)
            except WireError:
                self.counters["malformed"] += 1
                continue
            if d not in first_reply:
                first_reply.add(d)
                if r.attempts.get(d) == 0 and attempt_of(msg.flags) == 0:
                    self.rtt[(d, phase)].sample(time.monotonic() - r.sent[d])
        result = RoundResult(parts=[])
        for d in self.remote:  # fixed device order keeps the sum's bits reproducible
            for kind in _REPLIES:
                if (d, kind) in got:
                    result.parts.append(got[(d, kind)])
            if (d in relaxed or (d, _RLX) in want) and (d, _RLX) not in got:
                rows = self._partial_rows(r, d) if r.rows > 1 else None
                if rows is not None:  # the rows of the datagrams that came: the others are compensated
                    result.parts.append(rows[0])
                result.missing[d] = np.ones(r.rows, dtype=bool) if rows is None else ~rows[1]
                self.counters["compensated"] += 1
                if d in relaxed and d not in self.down:
                    # how long past the later of its deadline and the last critical part we waited
                    over = 1e3 * (now - max(deadline[d], crit_done))
                    self.counters["max_relaxed_overshoot_ms"] = max(self.counters["max_relaxed_overshoot_ms"], over)
        return result

    def _partial_rows(self, r: _Round, d: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The rows of `d`'s relaxed reply to round `r` whose datagrams arrived, if some did but not
        all ([rows, width] with zeros elsewhere, and which rows); relaxed replies are cut at row
        boundaries (`codec.row_chunks`)."""
        got = self.endpoint.reassembler.chunks_of(self.session, r.step, r.layer, _RLX, self.index[d])
        if got is None:
            return None
        rows = rows_of_chunks(got[1], got[0], r.rows, self.width, self.policy.wire)
        return rows if rows is not None and rows[1].any() else None

    def _timers(self, r: _Round, phase: str, step: int, layer: int, pending_crit, pending_rlx, deadline,
                now: float) -> float:
        """Re-request what is due, mark silent devices down (or end the run), probe the down ones;
        returns when the next timer is due."""
        timers = []
        crit_devices = {k[0] for k in pending_crit}
        for d in crit_devices | set(pending_rlx):
            if d in crit_devices or r.attempts[d] < self.policy.relaxed_retries:
                if now >= r.next_try[d]:
                    self._send([d], r.attempts[d] + 1)
                timers.append(r.next_try[d])
        timers += [deadline[d] for d in pending_rlx]
        for d in sorted(crit_devices | set(pending_rlx)):
            if d in self.critical and self._silent_for(d, now) > self.policy.dead_after_s:
                raise DeviceLost(f"device {d} ({self.peers[d][0]}:{self.peers[d][1]}) stopped answering: no "
                                 f"reply for layer {layer} {phase} of step {step} in "
                                 f"{self.policy.dead_after_s:g} s; it holds critical groups", d)
            if d not in self.critical and self._silent_for(d, now) > self.policy.down_after_s:
                self._mark_down(d)
        if self.down and now >= self.next_probe:
            self._probe(now)
        return min(timers) if timers else now + 0.05

    def stats(self) -> ExchangeStats:
        c = self.endpoint.counters
        rc = self.endpoint.reassembler.counters
        return ExchangeStats(
            **self.counters, bytes_sent=c.bytes_sent, bytes_received=c.bytes_received,
            datagrams_sent=c.datagrams_sent, datagrams_received=c.datagrams_received, duplicates=rc.duplicates,
            dropped=Drops(malformed=rc.malformed, bad_length=rc.bad_length, forged=rc.forged,
                          misdirected=rc.misdirected, replayed=rc.replayed, stale=rc.stale,
                          unknown_session=self.counters["unknown_session"]),
            down=tuple(sorted(self.down)),
            rto_ms={f"{d}/{p}": round(1e3 * e.rto_s, 2) for (d, p), e in self.rtt.items()})

    def device_stats(self, timeout_s: float = 1.0) -> dict[str, WorkerStats]:
        """Each reachable remote device's own counters (requests, drops by reason), by name."""
        ask = {d: (self.peers[d], self.index[d]) for d in self.remote if d not in self.down and d != self.failed}
        return query_stats(self.endpoint, self.session, self.me, ask, timeout_s,
                           lambda: self.counters.__setitem__("malformed", self.counters["malformed"] + 1))

    def close(self) -> None:
        self.endpoint.close()
