"""Device failure and rejoin: the error that ends a run, the coordinator's record of what it sent,
the rebuild of a restarted device's KV cache, and the hand-over of a dead device's groups to the
survivors the plan's failover names (`hand_over`: FAILOVER, then their KV cache from the same record).

A device that restarts mid-session has an empty KV cache. The coordinator keeps, per session slot
and layer, the attention inputs it broadcast this session (`History`); `rebuild` sends them to the device over
TCP (reliable: a 1,000-token history is ~1 MB per layer, hopeless as UDP datagrams at 10% loss)
after a HELLO that tells the device to drop whatever state it holds, and waits for one REBUILT
per slot and layer. The worker appends them to its KV cache in order (worker.Worker, REBUILD_ATTN).

Example:
    >>> import numpy as np
    >>> from halo_runtime.net.recovery import History
    >>> h = History(layers=2, width=4, wire="fp16")
    >>> h.append(0, np.ones((3, 4), np.float32)); h.append(0, np.zeros((1, 4), np.float32))
    >>> h.inputs(0).shape, h.inputs(0, drop_last=True).shape, h.rows
    ((4, 4), (3, 4), {0: [4, 0]})
"""
from __future__ import annotations

import time
from collections import Counter

import numpy as np

from ..core.codec import encode_request, saturate_fp16
from ..core.exchange import DeviceLost
from ..core.plan import Plan
from ..core.shards import adopted_plan
from ..core.spans import Span, spans_of
from .auth import Authenticator, ReplayGuard
from .rounds import attention_layers
from .transport import TcpChannel, TransportError
from .wire import Kind, Message

REBUILD = b"rebuild"
"""HELLO payload that makes a device drop its KV state even within the same session."""
RESUME = b"resume"
"""HELLO payload of a session going on in star rounds after push rounds (`push.UdpPush.to_star`):
a device that holds the session echoes it and keeps its KV state; one that does not (restarted)
stays silent, and is replaced like a dead one (its KV state is gone)."""


class History:
    """Per session slot and layer, the attention inputs sent this session (one row per position),
    for rejoin.

    Kept as one growing bytearray per slot and layer, in the wire's precision (fp16 values as fp16):
    a tensor per round instead fragmented the heap badly enough that RSS grew by gigabytes over
    1,000 tokens.
    """

    def __init__(self, layers: int, width: int, wire: str):
        self.layers, self.width = layers, width
        self.dtype = np.dtype(np.float16 if wire == "fp16" else np.float32)
        self.rows: dict[int, list[int]] = {}
        """Slot -> rows held per layer."""
        self.data: dict[int, list[bytearray]] = {}
        self.last: dict[int, list[int]] = {}
        self.latest: list[tuple[int, ...]] = [()] * layers
        """Per layer, the slots its latest round carried."""

    def slots(self) -> list[int]:
        """The session slots with rows recorded."""
        return sorted(s for s, rows in self.rows.items() if any(rows))

    def append(self, layer: int, x: np.ndarray, at=None) -> None:
        """Record x's rows at `at` (a position in slot 0, or `Span`s; default: after slot 0's last);
        rows at or past a span's start were rejected draft tokens (core.draft) and are dropped, as
        the devices drop them; a span with a `source` first takes that slot's rows before its start."""
        if at is None:
            at = self.rows.get(0, [0] * self.layers)[layer]
        if self.dtype == np.float16:
            x = saturate_fp16(x)
        offset, spans = 0, spans_of(at, x.shape[0])
        for s in spans:
            if s.slot not in self.rows:
                self.rows[s.slot], self.last[s.slot] = [0] * self.layers, [0] * self.layers
                self.data[s.slot] = [bytearray() for _ in range(self.layers)]
            rows, data = self.rows[s.slot], self.data[s.slot]
            if s.source is not None:  # the slot took another's prefix: so do its recorded inputs
                data[layer] = bytearray(self.data[s.source][layer][:s.start * self.width * self.dtype.itemsize])
                rows[layer] = s.start
            if s.start < rows[layer]:
                del data[layer][s.start * self.width * self.dtype.itemsize:]
                rows[layer] = s.start
            data[layer] += np.ascontiguousarray(x[offset:offset + s.rows], dtype=self.dtype).tobytes()
            rows[layer] += s.rows
            self.last[s.slot][layer] = s.rows
            offset += s.rows
        self.latest[layer] = tuple(s.slot for s in spans)

    def inputs(self, layer: int, drop_last: bool = False, slot: int = 0) -> np.ndarray:
        """[rows, width] float32: every input of `layer` in `slot`, or all but the latest round's."""
        if slot not in self.rows:
            return np.zeros((0, self.width), dtype=np.float32)
        n = self.rows[slot][layer] - (self.last[slot][layer] if drop_last and slot in self.latest[layer] else 0)
        raw = bytes(self.data[slot][layer][:n * self.width * self.dtype.itemsize])
        return np.frombuffer(raw, dtype=self.dtype).reshape(n, self.width).astype(np.float32)


def rebuild(name: str, addr: tuple, auth: Authenticator, guard: ReplayGuard, me: int, dest: int, session: int,
            step: int, inputs: dict[int, dict[int, np.ndarray]], wire: str, timeout_s: float) -> None:
    """Re-introduce device `name` to `session` and replay `inputs` (session slot -> layer -> [rows,
    hidden]) into its KV caches, over TCP. DeviceLost if it does not finish in `timeout_s`;
    TransportError if the connection fails."""
    with TcpChannel.connect(addr, timeout_s=timeout_s, auth=auth, guard=guard, me=me) as ch:
        ch.send(Message(Kind.HELLO, session, 0, 0, me, REBUILD), dest=dest)
        want = _replay(ch, me, dest, session, step, inputs, wire, Counter({(Kind.HELLO, 0): 1}))
        deadline = time.monotonic() + timeout_s
        while +want:
            msg = ch.recv(max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise DeviceLost(f"device {name} restarted but did not finish rebuilding its KV cache "
                                 f"in {timeout_s:g} s", name)
            if msg.session == session:
                want[(msg.kind, msg.layer if msg.kind == Kind.REBUILT else 0)] -= 1
        ch.send(Message(Kind.BYE, session, 0, 0, me), dest=dest)


def hand_over(ch: TcpChannel, name: str, me: int, dest: int, session: int, dead: str,
              inputs: dict[int, dict[int, np.ndarray]], wire: str, timeout_s: float) -> None:
    """Tell survivor `name` on `ch` to take over its share of `dead`'s groups (FAILOVER), and replay
    `inputs` (session slot -> layer -> [rows from position 0, hidden]) into the adopted heads' KV
    caches. Anything else arriving on `ch` meanwhile (replies of a round the death interrupted) is
    dropped. DeviceLost if it does not finish in `timeout_s`; TransportError if the connection fails."""
    ch.send(Message(Kind.FAILOVER, session, 0, 0, me, dead.encode()), dest=dest)
    want = _replay(ch, me, dest, session, 0, inputs, wire, Counter({(Kind.FAILOVER, 0): 1}))
    deadline = time.monotonic() + timeout_s
    while +want:
        msg = ch.recv(max(0.0, deadline - time.monotonic()))
        if msg is None:
            raise DeviceLost(f"device {name} did not take over {dead}'s groups in {timeout_s:g} s", name)
        if msg.session == session:
            want[(msg.kind, msg.layer if msg.kind == Kind.REBUILT else 0)] -= 1


def _replay(ch: TcpChannel, me: int, dest: int, session: int, step: int, inputs: dict[int, dict[int, np.ndarray]],
            wire: str, want: Counter) -> Counter:
    """Send `inputs` (slot -> layer -> rows from position 0) as REBUILD_ATTN messages; `want` counts
    the acknowledgements (REBUILT, layer) to wait for."""
    for slot, layers in inputs.items():
        for layer, xs in layers.items():
            if xs.shape[0]:
                body = encode_request(xs, (Span(slot, 0, xs.shape[0]),), wire)
                ch.send(Message(Kind.REBUILD_ATTN, session, step, layer, me, body), dest=dest)
                want[(Kind.REBUILT, layer)] += 1
    return want


def rebuild_restarted(ex, restarted: set[str], history: History, start) -> tuple[set[str], set[str]]:
    """After a RESUME handshake (`UdpExchange.resume`, `TcpExchange.resume`): rebuild the KV caches
    of the `restarted` devices (they answered RESET) up to `start` (slot 0's position, or slot ->
    position) over TCP; (those rebuilt, those that could not be). `ex`: the exchange (its plan,
    peers, keys, layout, policy, session and `warn`)."""
    starts = start if isinstance(start, dict) else {0: start}
    rejoined, failed = set(), set()
    for d in sorted(restarted):
        layers = attention_layers(ex.layout, d)
        try:
            rebuild(d, ex.peers[d], ex.auth, ex.guard, ex.me, ex.index[d], ex.session, 0,
                    kv_inputs(history, layers, starts), ex.policy.wire, ex.policy.dead_after_s)
        except (TransportError, DeviceLost):
            failed.add(d)
            continue
        rejoined.add(d)
        ex.warn(f"device {d} restarted and rejoined the session (KV cache rebuilt: "
                f"{sum(starts.values())} tokens in {len(layers)} layers)")
    return rejoined, failed


def rejoin_inputs(history: History, layers: list[int], in_flight: int | None) -> dict[int, dict[int, np.ndarray]]:
    """Session slot -> layer -> the attention inputs a device restarted mid-pass is rebuilt from:
    all this session's, but those of the attention round in flight (`in_flight`: its layer), which
    is sent to it again."""
    return {slot: {i: history.inputs(i, i == in_flight, slot) for i in layers} for slot in history.slots()}


def kv_inputs(history: History, layers, starts: dict[int, int]) -> dict[int, dict[int, np.ndarray]]:
    """Per session slot of `starts` (slot -> its position), the attention inputs of `layers` at the
    positions before it: what rebuilds the slot's KV cache up to there."""
    return {slot: {i: history.inputs(i, slot=slot)[:n] for i in layers} for slot, n in starts.items()}


def why_not_replaced(plan: Plan, dead: str, failed: str | None) -> str:
    """Why `dead` cannot be replaced by the plan's failover (for the line that ends the run)."""
    if failed:
        return f"{failed} was replaced already, and a plan's failover covers one dead device at a time"
    f = plan.failover_for(dead)
    if f is None:
        return "the plan has no failover for it (recompile it to get one)"
    return f.reason


def adopters(plan: Plan, dead: str) -> set[str]:
    """The remote devices the plan's failover for `dead` gives groups to."""
    return {to for _, to in plan.failover_for(dead).moves if to != plan.coordinator}


def adopted_inputs(plan: Plan, dead: str, survivor: str, inputs: dict[int, dict[int, np.ndarray]]
                   ) -> dict[int, dict[int, np.ndarray]]:
    """Of `inputs` (slot -> layer -> attention inputs so far), those of the layers in which `survivor`
    adopts attention heads of `dead`: what rebuilding their KV caches needs (slots with none left out)."""
    layers = {g.layer for g in adopted_plan(plan, dead, survivor).groups if g.kind == "attn"}
    out = {slot: {i: x for i, x in per.items() if i in layers and x.shape[0]} for slot, per in inputs.items()}
    return {slot: per for slot, per in out.items() if per}
