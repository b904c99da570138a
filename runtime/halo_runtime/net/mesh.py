"""One device's end of push rounds (`net.push`), the coordinator's and every worker's alike: it
sends the device's parts to every other device (copies on lossy links), keeps them for PULLs,
answers PULLs, and collects the others' parts of a round (`Mesh.collect`: awaited parts pulled
again after the sender's lateness timeout, relaxed parts given up at their deadline).

Example (the mesh is built by `net.push.UdpPush` on the coordinator and `net.worker` on a worker):
    >>> from halo_runtime.net.mesh import FIRST, take_start
    >>> inbox = {(_H, 3, FIRST, "pi5-0"): "residual of step 3", (_H, 2, FIRST, "pi5-0"): "of step 2"}
    >>> take_start(inbox, 2, lambda step: None)
    'residual of step 3'
"""
from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np

from ..core.codec import datagrams, rows_of_chunks
from ..core.exchange import DeviceLost
from ..core.plan import Plan
from ..core.policy import DeliveryPolicy, pair_link
from .rtt import RttEstimator
from .transport import UdpEndpoint
from .wire import Kind, Message, attempt_of, make_flags

_H, _ATTN, _CRIT, _RLX, _PULL = (int(k) for k in (Kind.PUSH_H, Kind.PART_ATTN, Kind.PART_CRIT, Kind.PART_RLX,
                                                   Kind.PULL))
_PARTS = (_H, _ATTN, _CRIT, _RLX)
SENT_KEPT = 512
"""Messages a device keeps for PULLs: a few passes of every round."""


class Mesh:
    """One device's end of push rounds: sends its parts to every other device, keeps them for
    PULLs, and collects the others' (`collect`). Messages that are not push parts go to `other`."""

    def __init__(self, plan: Plan, me: str, endpoint: UdpEndpoint, peers: dict[str, tuple], policy: DeliveryPolicy,
                 session: int, other=None):
        self.plan, self.me, self.endpoint, self.peers, self.policy = plan, me, endpoint, dict(peers), policy
        self.session, self.other = session, other
        self.index = {d: i for i, d in enumerate(plan.device_names)}
        self.names = {i: d for d, i in self.index.items()}
        self.others = [d for d in plan.device_names if d != me]
        self.width = plan.model.hidden_size
        self.loss, self.planned = {}, {}
        for d in self.others:
            self.loss[d], self.planned[d] = pair_link(plan.device(me).loss, plan.device(d).loss,
                                                      plan.link_copies(me), plan.link_copies(d))
        self.sent: OrderedDict[tuple, list] = OrderedDict()  # (kind, step, layer) -> [message, attempt]
        self.inbox: dict[tuple, Message] = {}  # (kind, step, layer, sender) -> message
        self.late = {d: RttEstimator(floor_s=policy.rto_floor_ms / 1000) for d in self.others}
        self.also_resend: tuple | None = None  # (kind, step, layer) sent again with every PULL (the coordinator's PUSH_H)
        self.ended = False
        """Set when the session leaves push rounds (the coordinator went on in star rounds)."""
        self.counters = {"pulls": 0, "resent": 0, "late": 0, "malformed": 0, "unknown_session": 0,
                         "compensated": 0, "relaxed_parts": 0, "awaited_relaxed": 0}

    def push(self, kind: int, step: int, layer: int, payload: bytes, to: list[str] | None = None) -> None:
        """Send a part (or the residual) to `to` (default: every other device), keeping it for PULLs."""
        msg = Message(kind, self.session, step, layer, self.index[self.me], payload)
        self.sent[(kind, step, layer)] = [msg, 0]
        while len(self.sent) > SENT_KEPT:
            self.sent.popitem(last=False)
        n = datagrams(len(payload))
        self.endpoint.fan_out([(msg, self.peers[d], self.index[d], self.policy.copies(self.loss[d], n, self.planned[d]),
                                None) for d in (self.others if to is None else to)])

    def _answer_pull(self, msg: Message, d: str) -> None:
        keys = [(k, msg.step, msg.layer) for k in msg.payload]  # the payload: the kinds wanted
        for key in ([self.also_resend] if self.also_resend is not None else []) + keys:
            self._resend(key, d)

    def _resend(self, key: tuple, d: str) -> None:
        """Send a kept message to d again, one attempt later (not sent yet: it goes out when computed)."""
        kept = self.sent.get(key)
        if kept is not None:
            kept[1] += 1
            self.counters["resent"] += 1
            self.endpoint.send(kept[0], self.peers[d], make_flags(kept[1]), dest=self.index[d])

    def pump(self, timeout_s: float) -> tuple | None:
        """Receive one message (or none within `timeout_s`): a part is kept (its inbox key is
        returned), a PULL answered, anything else handed to `other`."""
        got = self.endpoint.recv(timeout_s)
        if got is None:
            return None
        msg, addr = got
        d = self.names.get(msg.sender)
        if msg.kind in _PARTS or msg.kind == _PULL:
            if d is None or d == self.me or msg.session != self.session:
                self.counters["unknown_session" if d is not None and d != self.me else "late"] += 1
                return None
            if msg.kind == _PULL:
                self._answer_pull(msg, d)
                return None
            key = (msg.kind, msg.step, msg.layer, d)
            self.inbox.setdefault(key, msg)
            return key
        if self.other is not None:
            self.other(msg, addr)
        return None

    def partial_rows(self, step: int, layer: int, d: str, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The rows of d's relaxed part of round (step, layer) whose datagrams came, if some did but
        not all (`codec.rows_of_chunks`: the part is cut at row boundaries, on the policy's wire)."""
        got = self.endpoint.reassembler.chunks_of(self.session, step, layer, _RLX, self.index[d])
        if got is None:
            return None
        came = rows_of_chunks(got[1], got[0], rows, self.width, self.policy.wire)
        return came if came is not None and came[1].any() else None

    def end(self) -> None:
        """The session left push rounds: a pass waiting in `collect` gives way."""
        self.ended = True

    def forget_before(self, step: int) -> None:
        """Drop kept arrivals of passes before `step` (they can no longer be used)."""
        for key in [k for k in self.inbox if k[1] < step]:
            del self.inbox[key]

    def take_start(self, done_step: int) -> Message | None:
        """The coordinator's residual that starts the earliest pass after `done_step`, if it came
        (the arrivals of earlier passes are dropped)."""
        return take_start(self.inbox, done_step, self.forget_before)

    def collect(self, step: int, layer: int, must: list[tuple[str, int]],
                optional: list[tuple[str, int]] = ()) -> dict[tuple[str, int], Message]:
        """(sender, kind) -> message of round (step, layer): every `must` one (pulled again until it
        comes; DeviceLost after dead_after_s), and the `optional` ones that come by their deadline."""
        t0 = time.monotonic()
        got: dict[tuple[str, int], Message] = {}
        attempts: dict[str, int] = {}
        # inbox key -> (sender, kind, awaited) of each part not come yet
        wanted = {(kind, step, layer, d): (d, kind, True) for d, kind in must}
        wanted.update({(kind, step, layer, d): (d, kind, False) for d, kind in optional})
        rto = {d: self.late[d].rto_s for d, _, _ in wanted.values()}
        next_pull = {d: t0 + r for d, r in rto.items()}
        # a PULL and the part's second coming take a round trip: two timeouts each, not one
        deadline = {d: t0 + (1 + 2 * self.policy.relaxed_retries) * rto[d] for d, _ in optional}
        due = min(next_pull.values(), default=t0)  # the earliest PULL or deadline: no timer before it
        first = set()
        inbox, floor_s = self.inbox, self.policy.rto_floor_ms / 1000
        arrived = [key for key in wanted if key in inbox]  # came before this device was ready
        while True:
            if self.ended:  # a pass waiting on a lost device's part gives way to the star's rounds
                raise DeviceLost("the session left push rounds", None)
            now = time.monotonic()
            for key in arrived:
                d, kind, _ = wanted.pop(key)
                msg = got[(d, kind)] = inbox.pop(key)
                if d in deadline:  # its relaxed part left right behind this one: let it come
                    deadline[d] = max(deadline[d], now + floor_s)
                if d not in first:  # Karn: only from parts that needed no PULL
                    first.add(d)
                    if not attempts.get(d) and attempt_of(msg.flags) == 0:
                        self.late[d].sample(max(0.0, now - t0))
            if now >= due:  # optional parts past their deadline are given up
                for key in [k for k, (d, _, is_must) in wanted.items() if not is_must and now >= deadline[d]]:
                    del wanted[key]
            if not wanted:
                return got
            if now >= due:
                due = self._pull(step, layer, wanted.values(), attempts, next_pull, deadline, t0, now)
            key = self.pump(max(0.0, min(due, now + 0.05) - time.monotonic()))
            arrived = [key] if key in wanted else ()

    def _pull(self, step: int, layer: int, pending: list, attempts: dict, next_pull: dict, deadline: dict,
              t0: float, now: float) -> float:
        """`collect`'s timers, when one is due: PULL what is awaited or may still be pulled, from
        senders whose timeout passed (DeviceLost after dead_after_s); returns when the next is due."""
        due = now + 0.05
        pull: dict[str, list[int]] = {}
        for d, kind, is_must in pending:
            if now >= next_pull[d] and (is_must or attempts.get(d, 0) < self.policy.relaxed_retries):
                pull.setdefault(d, []).append(kind)
            if is_must and now - t0 > self.policy.dead_after_s:
                raise DeviceLost(f"device {d} ({self.peers[d][0]}:{self.peers[d][1]}) stopped answering: "
                                 f"no part of layer {layer} of step {step} in {self.policy.dead_after_s:g} s", d)
            due = min(due, deadline.get(d, due), next_pull[d] if now < next_pull[d] else due)
        for d, kinds in pull.items():
            attempts[d] = attempts.get(d, 0) + 1
            self.counters["pulls"] += 1
            self.endpoint.send(Message(_PULL, self.session, step, layer, self.index[self.me], bytes(kinds)),
                               self.peers[d], make_flags(attempts[d]), dest=self.index[d])
            if self.also_resend is not None:
                self._resend(self.also_resend, d)
            # capped backoff, as the star's re-requests
            next_pull[d] = now + self.late[d].rto_s * 2 ** min(attempts[d], 2)
            due = min(due, next_pull[d])
        return due


FIRST = 1
"""The schedule step every pass starts at on a device: the coordinator's first segment (the
embedding, at least) is step 0."""


def take_start(inbox: dict, done_step: int, forget_before) -> Message | None:
    """Of a mesh's `inbox`: the residual (PUSH_H at FIRST) of the earliest pass after `done_step`."""
    starts = [k for k in inbox if k[0] == _H and k[1] > done_step and k[2] == FIRST]
    if not starts:
        return None
    key = min(starts, key=lambda k: k[1])
    msg = inbox.pop(key)
    forget_before(key[1])
    return msg
