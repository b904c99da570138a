"""The strict baseline: the same requests as `UdpExchange`, over TCP, every part awaited, as
distributed-llama does; TCP's own retransmission handles loss. A device whose connection breaks
(its worker process died) and that takes a new one within `dead_after_s` goes on in the session:
restarted, its KV caches are rebuilt from the session's attention inputs, as in `UdpExchange`'s
rejoin. A device that does not come back, or is silent for `dead_after_s`, is replaced by the
plan's failover.

Example (the checked-in plan, its workers nowhere: connecting names the device that is missing):
    >>> from halo_runtime.core.plan import load_plan
    >>> from halo_runtime.net.tcpexchange import TcpExchange
    >>> plan = load_plan("artifacts/smollm2-135m-pi5")
    >>> TcpExchange(plan, {d: ("127.0.0.1", 9) for d in plan.device_names if d != plan.coordinator})
    Traceback (most recent call last):
    ...
    halo_runtime.core.exchange.DeviceLost: device pi5-1: ...
"""
from __future__ import annotations

import json
import time
from dataclasses import fields

import numpy as np

from ..core.codec import decode_tensor, encode_request
from ..core.exchange import Drops, ExchangeStats, RoundResult
from ..core.plan import Plan
from ..core.policy import DeliveryPolicy
from .auth import Authenticator, ReplayGuard
from .rounds import PHASE_REQUEST, RETURN_GRACE_S, _layout, _warn, attention_layers
from .recovery import (RESUME, DeviceLost, History, adopted_inputs, adopters, hand_over, kv_inputs, rebuild,
                       rebuild_restarted, rejoin_inputs, why_not_replaced)
from .shim import LINUX_RTO_MIN_MS, LossShim
from .transport import TcpChannel, TransportError
from .wire import Kind, Message
from .worker import WorkerStats

REPLY_KINDS = (Kind.REPLY_ATTN, Kind.REPLY_MLP_CRITICAL, Kind.REPLY_MLP_RELAXED)


class TcpExchange:
    """Strict synchronisation over TCP: every part awaited, like distributed-llama."""

    def __init__(self, plan: Plan, peers: dict[str, tuple[str, int]], policy: DeliveryPolicy = DeliveryPolicy(),
                 shims: dict[str, LossShim] | None = None, auth: Authenticator | None = None, warn=_warn,
                 lost_ok: bool = False):
        """lost_ok: a device that takes no connection is left out (`unreachable`) instead of ending it."""
        self.plan = self.full = plan
        self.policy, self.peers, self.shims = policy, peers, shims or {}
        self.auth, self.guard = auth or Authenticator(), ReplayGuard()
        self.width = plan.model.hidden_size
        self.index = {d: i for i, d in enumerate(plan.device_names)}
        self.me = self.index[plan.coordinator]
        self.remote = [d for d in plan.device_names if d != plan.coordinator]
        self.layout = _layout(plan)
        self.failed = None
        self.history = History(plan.model.num_layers, self.width, policy.wire)
        self.channels, self.unreachable = {}, set()
        for d in self.remote:
            try:
                self.channels[d] = self._connect(d)
            except TransportError as e:
                if lost_ok:
                    self.unreachable.add(d)
                    continue
                self.close()
                raise DeviceLost(f"device {d}: {e}", d) from None
        if any(ch.rto_min_ms is None for ch in self.channels.values()):
            warn(f"this kernel keeps TCP's {LINUX_RTO_MIN_MS:g} ms minimum retransmission timeout (lowering it per "
                 "socket needs Linux 6.15): in strict sync a lost segment costs that much; `sysctl -w "
                 "net.ipv4.tcp_rto_min_us=8000` (Linux 6.11+) lowers it for the whole machine")
        self.session, self.pending = 0, None
        self.last: Message | None = None
        """The request of the round in flight (sent again to a device that rejoins)."""
        self.warn, self.rejoins = warn, 0

    def _connect(self, d: str, timeout_s: float = 5.0) -> TcpChannel:
        return TcpChannel.connect(self.peers[d], timeout_s=timeout_s, shim=self.shims.get(d), auth=self.auth,
                                  guard=self.guard, me=self.me)

    def begin(self, session: int) -> None:
        self.session = session
        self.history = History(self.plan.model.num_layers, self.width, self.policy.wire)
        if self.failed:  # replaced by its failover: back if it takes a connection now
            try:
                self.channels[self.failed] = self._connect(self.failed, RETURN_GRACE_S)
                self.layout, self.plan, self.failed = _layout(self.full), self.full, None
            except TransportError:
                pass
        self.pending = self.last = None
        for d in list(self.channels):
            hello = Message(Kind.HELLO, session, 0, 0, self.me)
            try:
                self.channels[d].send(hello, dest=self.index[d])
            except TransportError:  # restarted since the last session: a new connection will do
                ch = self._reconnect(d, time.monotonic() + self.policy.dead_after_s)
                if ch is None:
                    raise DeviceLost(f"device {d} at {self.peers[d][0]}:{self.peers[d][1]} takes no connection", d) \
                        from None
                ch.send(hello, dest=self.index[d])
        for d in self.channels:
            self._await(d, lambda m: m.kind == Kind.HELLO, "the session handshake")
        if self.failed:
            self._hand_over(self.failed, {})

    def resume(self, session: int, history: History, timeout_s: float, start=0) -> tuple[set[str], set[str]]:
        """Go on with `session`, run in strict push rounds so far (`pushtcp.TcpPush.to_star`), in star
        rounds: a HELLO of the same session on each new connection (`recovery.RESUME`: a device keeps
        its KV cache and leaves push rounds), `history` what a failover or a rejoin rebuilds from. A
        device restarted since answers RESET: it rejoins, its KV caches rebuilt up to `start` (slot
        0's position, or slot -> position). Returns (the devices that took no connection, did not
        echo within `timeout_s` or could not be rebuilt, the devices that rejoined)."""
        self.session, self.history = session, history
        silent, restarted = set(self.unreachable), set()
        for d, ch in self.channels.items():
            ch.send(Message(Kind.HELLO, session, 0, 0, self.me, RESUME), dest=self.index[d])
        deadline = time.monotonic() + timeout_s
        for d, ch in self.channels.items():
            try:
                while (msg := ch.recv(max(0.0, deadline - time.monotonic()))) is not None:
                    if msg.kind == Kind.HELLO and msg.session == session:
                        break
                    if msg.kind == Kind.RESET and msg.session == session:  # restarted: no need to wait
                        restarted.add(d)
                        break
                else:
                    silent.add(d)
            except TransportError:
                silent.add(d)
        rejoined, failed = rebuild_restarted(self, restarted, history, start)
        self.rejoins += len(rejoined)
        return silent | failed, rejoined

    def fail_over(self, dead: str, start) -> dict[int, dict[int, np.ndarray]]:
        """See `core.exchange.FailingOver`: the survivors take over `dead`'s groups."""
        if self.failed or not self.full.replaceable(dead):
            raise DeviceLost(f"device {dead} cannot be replaced: {why_not_replaced(self.full, dead, self.failed)}",
                             dead)
        inputs = kv_inputs(self.history, attention_layers(self.layout, dead),
                           start if isinstance(start, dict) else {0: start})
        ch = self.channels.pop(dead, None)
        if ch is not None:
            ch.close()
        self.plan, self.failed = self.full.without(dead), dead
        self.layout = _layout(self.plan)
        self._hand_over(dead, inputs)
        return inputs

    def _hand_over(self, dead: str, inputs: dict[int, dict[int, np.ndarray]]) -> None:
        """`recovery.hand_over` to each survivor adopting some of `dead`'s groups, on its connection."""
        for s in sorted(adopters(self.full, dead), key=self.remote.index):
            try:
                hand_over(self.channels[s], s, self.me, self.index[s], self.session, dead,
                          adopted_inputs(self.full, dead, s, inputs), self.policy.wire, self.policy.dead_after_s)
            except TransportError as e:
                raise DeviceLost(f"device {s} cannot take over {dead}'s groups: {e}", s) from None

    def _await(self, d: str, match, what: str) -> Message:
        while True:
            try:
                msg = self.channels[d].recv(self.policy.dead_after_s)
            except TransportError as e:
                if self.pending is not None and self._rejoin(d):
                    continue
                raise DeviceLost(f"device {d}: {e}", d) from None
            if msg is None:
                raise DeviceLost(f"device {d} stopped answering ({what}; {self.policy.dead_after_s:g} s)", d)
            if msg.session == self.session and match(msg):
                return msg

    def post(self, phase: str, step: int, layer: int, x: np.ndarray, at) -> None:
        if phase == "attn":
            targets = self.layout["attn"][layer]
            if targets:
                self.history.append(layer, x, at)
        else:
            targets = [d for d in self.remote if d in self.layout["crit"][layer] or d in self.layout["relaxed"][layer]]
        self.last = Message(PHASE_REQUEST[phase], self.session, step, layer, self.me,
                            encode_request(x, at, self.policy.wire))
        self.pending = targets
        for d in targets:
            try:
                self.channels[d].send(self.last, dest=self.index[d])
            except TransportError as e:
                if not self._rejoin(d):  # which sends it the request
                    raise DeviceLost(f"device {d}: {e}", d) from None

    def collect(self, phase: str, step: int, layer: int, awaited: dict[str, np.ndarray]) -> RoundResult:
        result = RoundResult(parts=[])
        for d in self.pending:
            # by kind: a device that rejoined mid-round sends every part of it again
            want = ([Kind.REPLY_ATTN] if phase == "attn" else
                    [k for k, held in ((Kind.REPLY_MLP_CRITICAL, self.layout["crit"][layer]),
                                       (Kind.REPLY_MLP_RELAXED, self.layout["relaxed"][layer])) if d in held])
            got = {}
            while len(got) < len(want):
                msg = self._await(d, lambda m: m.step == step and m.layer == layer and m.kind in want,
                                  f"layer {layer} {phase}, step {step}")
                got[msg.kind] = decode_tensor(msg.payload, self.policy.wire, self.width)
            result.parts += [got[k] for k in want]  # critical before relaxed, as the device sends them
        return result

    def _reconnect(self, d: str, deadline: float) -> TcpChannel | None:
        """A new connection to d before `deadline` (a restarting worker refuses until it listens), or None."""
        old = self.channels.pop(d, None)
        if old is not None:
            old.close()
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.channels[d] = self._connect(d, min(left, 1.0))
                return self.channels[d]
            except TransportError:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return None

    def _rejoin(self, d: str) -> bool:
        """d's connection broke (its worker process died): True if it takes a new one within
        `dead_after_s` and goes on in this session. A worker that kept its state echoes a RESUME
        HELLO; one restarted answers RESET and gets its KV caches rebuilt from the session's
        attention inputs (all but the round in flight's: `recovery.rebuild`, as `UdpExchange.rejoin`).
        Either way the round in flight is sent to it again."""
        deadline = time.monotonic() + self.policy.dead_after_s
        while True:
            ch = self._reconnect(d, deadline)
            if ch is None:
                return False
            try:
                restarted = self._resume_on(ch, d, deadline)
                break
            except TransportError:  # a dying worker's backlog took the connection: again, until it listens anew
                continue
            except DeviceLost:
                return False
        if restarted is None:
            return False
        self.rejoins += 1
        self.warn(f"device {d} " + ("restarted and rejoined the session (KV cache rebuilt)" if restarted else
                                    "reconnected") + "; the round in flight is sent to it again")
        return True

    def _resume_on(self, ch: TcpChannel, d: str, deadline: float) -> bool | None:
        """`_rejoin`'s handshake on d's new connection: whether d restarted (its KV caches rebuilt
        then), None if it did not answer by `deadline`; the round in flight sent to it again."""
        r = self.last
        ch.send(Message(Kind.HELLO, self.session, 0, 0, self.me, RESUME), dest=self.index[d])
        while (msg := ch.recv(max(0.0, deadline - time.monotonic()))) is not None:
            if msg.session == self.session and msg.kind in (Kind.HELLO, Kind.RESET):
                break
        else:
            return None
        restarted = msg.kind == Kind.RESET
        if restarted:
            in_flight = r.layer if r is not None and r.kind == Kind.REQUEST_ATTN else None
            inputs = rejoin_inputs(self.history, attention_layers(self.layout, d), in_flight)
            rebuild(d, self.peers[d], self.auth, self.guard, self.me, self.index[d], self.session,
                    r.step if r else 0, inputs, self.policy.wire, max(1.0, deadline - time.monotonic()))
        if r is not None and d in (self.pending or ()):
            ch.send(r, dest=self.index[d])
        return restarted

    def stats(self) -> ExchangeStats:
        # TCP retransmits and orders in the kernel: this exchange counts only bytes and drops
        rcs = [c.reassembler.counters for c in self.channels.values()]
        drops = {k: sum(getattr(rc, k) for rc in rcs)
                 for k in ("malformed", "bad_length", "forged", "misdirected", "replayed", "stale")}
        kept = {"rejoins": self.rejoins, "bytes_sent": sum(c.counters.bytes_sent for c in self.channels.values()),
                "bytes_received": sum(c.counters.bytes_received for c in self.channels.values()),
                "dropped": Drops(**drops, unknown_session=None)}
        return ExchangeStats(**{**{f.name: None for f in fields(ExchangeStats)}, **kept})

    def device_stats(self, timeout_s: float = 1.0) -> dict[str, WorkerStats]:
        """Each remote device's own counters, by name."""
        me, out = self.index[self.plan.coordinator], {}
        for d, ch in self.channels.items():
            try:
                ch.send(Message(Kind.STATS, self.session, 0, 0, me), dest=self.index[d])
                msg = self._await(d, lambda m: m.kind == Kind.STATS, "stats")
                out[d] = WorkerStats.from_json(json.loads(msg.payload))
            except (DeviceLost, TransportError, ValueError):
                continue
        return out

    def close(self) -> None:
        for d, c in self.channels.items():
            try:
                c.send(Message(Kind.BYE, self.session, 0, 0, self.index[self.plan.coordinator]), dest=self.index[d])
            except TransportError:
                pass
            c.close()
