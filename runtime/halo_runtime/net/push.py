"""Push rounds over UDP (`--rounds push`): each device sends its part of a round to every other
device, and each adds the parts on its own view of the residual (`core.push`): one hop per round.

Per pass the coordinator computes its first segment (the embedding, and any rounds it holds
alone) and sends the residual to every device (PUSH_H, as a request payload with the pass's
spans; again after any later segment of its own). Then every device, the coordinator included,
walks the plan's schedule: in each network round it computes its own part from its own view,
sends it to all the others (PART_ATTN, PART_CRIT, PART_RLX; `DeliveryPolicy.copies` copies on a
lossy link: for two lossy boards, enough to bring the pair's loss to the plan's choice for one,
`pair_link`) and collects theirs with `Mesh.collect`:
- attention and critical MLP parts, and relaxed parts its own predictor flags, are awaited: a
  missing one is pulled again (PULL naming the kinds) from its sender after the sender's
  lateness timeout (RFC 6298 over how long after this device was ready the sender's parts came),
  backing off, until `dead_after_s` ends the run (DeviceLost);
- a relaxed part not flagged is used if it comes before ready + (1 + 2 x relaxed_retries) x that
  timeout (one PULL at the first, whose answer takes a round trip), or within `rto_floor_ms` of
  another part of its sender's (sent right before it: a late sender is late, not lossy), else
  estimated (`core.push.View`).
A device answers PULLs from the parts it sent (kept per (kind, step, layer)); the coordinator
sends its latest PUSH_H again with every PULL, so that a device that lost it joins the pass. In the
plan's `star_rounds` the parts go to the coordinator alone, and it sends PUSH_H before the next: the
residual before a push round, the round's input on the wire (the star's request) before a star round.
Workers learn the others' addresses, the coordinator's rule and its delivery policy from its HELLO
("push" and JSON): every device waits and estimates alike. Here: the coordinator's side
(`UdpPush`); every device's end of the rounds is `mesh.Mesh`; a worker's passes are
`pushworker.PushWorker`.

A device lost in push rounds (`dead_after_s`) moves the session to star rounds, which fail over:
the devices left keep their KV caches, the dead one's heads are rebuilt on their adopters from
the attention inputs the coordinator recorded (`UdpPush.to_star`). A relaxed part of several
rows is cut at row boundaries, and a view uses the rows whose datagrams came (`Mesh.partial_rows`).
A device restarted meanwhile answers the star's HELLO with RESET and rejoins (relaxed rounds:
its KV caches rebuilt over TCP, as the star's rejoin does) instead of being replaced.

Example (on loopback, as tests/test_push_net.py runs it):
    $ halo-run local --plan artifacts/smollm2-135m-pi5 --rounds push --prompt "Hello"
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..core.codec import WireError, decode_tensor, encode_request, encode_tensor
from ..core.exchange import DeviceLost, ExchangeStats
from ..core.plan import Plan
from ..core.policy import DeliveryPolicy
from .auth import Authenticator, ReplayGuard
from .mesh import _ATTN, _CRIT, _H, _RLX, Mesh
from .recovery import History
from .rounds import _warn, hello_until_echoed, holders
from .transport import UdpEndpoint

HELLO_PUSH = b"push"
"""How a HELLO payload that starts push rounds begins (then JSON: addresses, the rule)."""
RESUME_S = 0.5
"""How long the devices left after a loss get to answer the star's HELLO (`UdpPush.to_star`): the
dead one's silence is what names it, so this is what a loss costs beyond `dead_after_s`; a live
device answers within a round trip (the HELLO is resent five times meanwhile)."""


def mlp_want(h: dict, layer: int, me: str, awaited: dict) -> tuple[list, list, list]:
    """Of MLP round `layer`: (awaited (sender, kind) parts, optional relaxed ones, the relaxed senders)."""
    relaxed = [d for d in h["relaxed"][layer] if d != me]
    must = [(d, _CRIT) for d in h["crit"][layer] if d != me] + [(d, _RLX) for d in relaxed if d in awaited]
    return must, [(d, _RLX) for d in relaxed if d not in awaited], relaxed


def decode_parts(got: dict, width: int, order: list[str], own: str, own_parts: tuple,
                 relaxed: list[str], rows: int, partial=None) -> tuple[dict[str, tuple], dict[str, np.ndarray]]:
    """The MLP parts by device (own included) and, per relaxed sender whose part did not come, the
    rows missing: all of them, or those whose datagrams were lost where `partial(d)` gives the rows
    that came ((rows with zeros elsewhere, bool per row): `Mesh.partial_rows`; a part of several rows)."""
    parts = {own: own_parts}
    for d in order:
        if d == own:
            continue
        crit, rlx = got.get((d, _CRIT)), got.get((d, _RLX))
        if crit is not None or rlx is not None:
            parts[d] = tuple(None if m is None else decode_tensor(m.payload, None, width) for m in (crit, rlx))
    missing = {}
    for d in relaxed:
        if (d, _RLX) in got:
            continue
        came = partial(d) if partial is not None and rows > 1 else None
        if came is None:
            missing[d] = np.ones(rows, dtype=bool)
        else:
            parts[d] = (parts.get(d, (None, None))[0], came[0])
            missing[d] = ~came[1]
    return parts, missing


class UdpPush:
    """The coordinator's `core.push.PushMesh` over UDP."""

    def __init__(self, plan: Plan, peers: dict[str, tuple[str, int]], policy: DeliveryPolicy = DeliveryPolicy(),
                 bind_host: str = "0.0.0.0", shim=None, auth: Authenticator | None = None):
        self._common(plan, peers, policy, auth)
        self._bind, self._shim = bind_host, shim
        self._reopen()
        self.mesh = Mesh(plan, self.me, self.endpoint, peers, policy, 0)

    def _reopen(self) -> None:
        """A socket of its own for push rounds (`_leave` closed the last one)."""
        self.endpoint = UdpEndpoint(self._bind, 0, shim=self._shim, auth=self.auth, guard=ReplayGuard(),
                                    me=self.plan.device_names.index(self.me))

    def _common(self, plan: Plan, peers: dict, policy: DeliveryPolicy, auth: Authenticator | None) -> None:
        """What the coordinator's side of push rounds knows whatever carries them (UDP, TCP)."""
        self.plan, self.policy, self.peers, self.wire = plan, policy, peers, policy.wire
        self.me = plan.coordinator
        self.remote = [d for d in plan.device_names if d != self.me]
        self.order = [self.me] + self.remote
        self.width = plan.model.hidden_size
        self.holders = holders(plan)
        self.starred = plan.starred_rounds()
        self.auth = auth or Authenticator()
        self.rule = {"compensation": "lowrank", "await_predicted": True}
        self.history = History(plan.model.num_layers, self.width, policy.wire)
        self.star = None
        """The star exchange the session went on with after a device was lost (`to_star`), or None."""

    def configure(self, compensation: str, await_predicted: bool) -> None:
        self.rule = {"compensation": compensation, "await_predicted": await_predicted}

    def begin(self, session: int, timeout_s: float | None = None) -> None:
        """Start `session` on every device in push mode (HELLO with the addresses and the rule);
        in star mode after a device was lost (`to_star`) until a session finds them all again."""
        if self.star is not None and not self._whole_again(session):
            return
        timeout_s = self.policy.dead_after_s if timeout_s is None else timeout_s
        self.mesh = Mesh(self.plan, self.me, self.endpoint, self.peers, self.policy, session)
        self.history = History(self.plan.model.num_layers, self.width, self.policy.wire)
        body = PushHello(self.peers, self.policy, **self.rule).payload()
        silent = hello_until_echoed(self.endpoint, self.plan, session, body, {d: self.peers[d] for d in self.remote},
                                    timeout_s)
        if silent:
            d = sorted(silent)[0]
            raise DeviceLost(f"device {d} at {self.peers[d][0]}:{self.peers[d][1]} does not start push rounds "
                             f"(is `halo-run worker --device {d}` running there, with this plan's key and the "
                             "coordinator's shard in its plan directory?)", d)

    def _whole_again(self, session: int) -> bool:
        """In star rounds after a loss: start `session` there (where a replaced device may come
        back); True, the star left, if every device answered and none is replaced or down: then
        `session` runs in push rounds (a new session carries nothing over)."""
        self.star.begin(session)
        if self.star.failed is not None or getattr(self.star, "down", None) or getattr(self.star, "unreachable", None):
            return False
        self.star.close()
        self.star = None
        self._reopen()
        _warn("every device answers: push rounds again from this session")
        return True

    def remember(self, layer: int, x: np.ndarray, spans: tuple) -> None:
        """An attention round's input as the star would have sent it: what a failover rebuilds the
        KV caches of a dead device's heads from (`to_star`)."""
        if any(d != self.me for d in self.holders["attn"][layer]):
            self.history.append(layer, x, spans)

    def to_star(self, suspect: str, start=0) -> str | None:
        """After `suspect` went silent: the session goes on in star rounds, which fail over (the
        star's exchange on the same devices, `resume`d with the attention inputs recorded so far;
        `post`, `collect`, `fail_over` and the counters are its from now on). Returns the device to
        replace: the one that does not answer the star's HELLO (a worker that waits for a dead
        device's part is silent in push rounds, but answers), else `suspect`; None if `suspect`
        had restarted and rejoined (relaxed rounds: its KV caches rebuilt up to `start`, slot 0's
        position or slot -> position) and no other is silent."""
        star = self._star_exchange()
        self._pushed = self.stats()  # the counters go on from the push rounds' (`stats`)
        silent, rejoined = star.resume(self.mesh.session, self.history, min(self.policy.dead_after_s, RESUME_S),
                                       start)
        self.star = star
        self._leave()
        if not silent and suspect in rejoined:
            _warn(f"push rounds lost {suspect}, restarted: the session goes on in star rounds with it")
            return None
        dead = sorted(silent)[0] if len(silent) == 1 else suspect
        _warn(f"push rounds lost {dead}: the session goes on in star rounds")
        return dead

    def _star_exchange(self):
        from .exchange import UdpExchange  # it imports the worker, which imports this module

        return UdpExchange(self.plan, self.peers, self.policy, self._bind, self._shim, self.auth)

    def _leave(self) -> None:
        """Stop carrying push rounds (the star's exchange has its own socket)."""
        self.endpoint.close()

    # a session that lost a device in push rounds goes on as the star's: these are the star exchange's
    @property
    def failed(self) -> str | None:
        return None if self.star is None else self.star.failed

    def post(self, *args) -> None:
        self.star.post(*args)

    def collect(self, *args):
        return self.star.collect(*args)

    def fail_over(self, dead: str, start):
        return self.star.fail_over(dead, start)

    def handoff(self, step: int, index: int, spans: tuple, h: np.ndarray, x: np.ndarray | None) -> None:
        hx = h if x is None else np.concatenate([h, x], axis=1)  # `handoff_with_x`: the schedule says which
        # in fp32 whatever the wire: every view must start from the coordinator's residual itself
        self._open(step, index, encode_request(hx, spans, "fp32"))

    def request(self, step: int, index: int, spans: tuple, inp: np.ndarray) -> None:
        self._open(step, index, encode_request(inp, spans, self.wire))  # the star's request: one datagram a row

    def _open(self, step: int, index: int, payload: bytes) -> None:
        """PUSH_H before schedule step `index`, sent again with every PULL."""
        self.mesh.forget_before(step)
        self.mesh.push(_H, step, index, payload, to=self.remote)
        self.mesh.also_resend = (_H, step, index)

    # The coordinator's own parts come rounded to the wire (`PushCoordinator`), as every device's:
    # encoding them on the wire loses nothing, and every view adds what the coordinator adds.

    def attention(self, step: int, layer: int, own: np.ndarray | None, x: np.ndarray) -> list[np.ndarray]:
        if own is not None and (layer, "attn") not in self.starred:  # a star round's parts come here alone
            self.mesh.push(_ATTN, step, layer, encode_tensor(own, self.wire))
        senders = [d for d in self.holders["attn"][layer] if d != self.me]
        got = self.mesh.collect(step, layer, [(d, _ATTN) for d in senders])
        return [decode_tensor(got[(d, _ATTN)].payload, None, self.width) for d in senders]

    def mlp(self, step: int, layer: int, own: tuple, awaited: dict[str, np.ndarray],
            m: np.ndarray) -> tuple[dict[str, tuple], dict[str, np.ndarray]]:
        for kind, t in zip((_CRIT, _RLX), own):
            if t is not None and (layer, "mlp") not in self.starred:
                self.mesh.push(kind, step, layer, encode_tensor(t, self.wire))
        must, optional, relaxed = mlp_want(self.holders, layer, self.me, awaited)
        got = self.mesh.collect(step, layer, must, optional)
        parts, missing = decode_parts(got, self.width, self.order, self.me, own, relaxed, m.shape[0],
                                      lambda d: self.mesh.partial_rows(step, layer, d, m.shape[0]))
        del parts[self.me]
        c = self.mesh.counters
        c["relaxed_parts"] += len(relaxed)
        c["awaited_relaxed"] += sum(d in awaited for d in relaxed)
        c["compensated"] += len(missing)
        return parts, missing

    def stats(self) -> ExchangeStats:
        if self.star is not None:
            return self._with_star()
        e, c = self.endpoint.counters, self.mesh.counters
        return ExchangeStats(retransmissions=c["pulls"], late=c["late"], malformed=c["malformed"],
                             compensated=c["compensated"], relaxed_parts=c["relaxed_parts"],
                             awaited_relaxed=c["awaited_relaxed"], unknown_session=c["unknown_session"],
                             bytes_sent=e.bytes_sent, bytes_received=e.bytes_received,
                             datagrams_sent=e.datagrams_sent, datagrams_received=e.datagrams_received,
                             dropped=None, devices_down=None, rejoins=None, max_relaxed_overshoot_ms=None,
                             duplicates=None, down=None, rto_ms=None)

    def _with_star(self) -> ExchangeStats:
        """The push rounds' counters plus the star's after them (`to_star`)."""
        star = self.star.stats()
        return ExchangeStats(**{f.name: _plus(getattr(self._pushed, f.name), getattr(star, f.name))
                                for f in fields(ExchangeStats)})

    def device_stats(self, timeout_s: float = 1.0) -> dict:
        """Each remote device's own counters (its view's estimates and PULLs among them), by name."""
        from .worker import query_stats  # the worker module imports this one

        if self.star is not None:
            return self.star.device_stats(timeout_s)
        index = self.plan.device_names.index
        return query_stats(self.endpoint, self.mesh.session, index(self.me),
                           {d: (self.peers[d], index(d)) for d in self.remote}, timeout_s)

    def close(self) -> None:
        self.endpoint.close()
        if self.star is not None:
            self.star.close()


def _plus(pushed, star):
    """A counter of push rounds then star rounds: the sum where both kept it, else the star's."""
    numbers = (int, float)
    return pushed + star if isinstance(pushed, numbers) and isinstance(star, numbers) else star


@dataclass(frozen=True)
class PushHello:
    """What the coordinator's HELLO tells every device about this session's push rounds."""

    peers: dict
    """Device -> (host, port) of every other device (the coordinator: where its HELLO came from)."""
    policy: DeliveryPolicy
    """The coordinator's delivery policy: every device waits and estimates alike."""
    compensation: str
    """The coordinator's compensation (core.coordinator.COMPENSATIONS)."""
    await_predicted: bool
    """Whether relaxed parts the predictor flags are awaited."""
    strict: bool = False
    """Strict push rounds: over TCP, every part awaited (`net.pushtcp`)."""

    def payload(self) -> bytes:
        return HELLO_PUSH + json.dumps({"peers": {d: list(a) for d, a in self.peers.items()},
                                        "policy": asdict(self.policy), "compensation": self.compensation,
                                        "await_predicted": self.await_predicted, "strict": self.strict}).encode()

    @classmethod
    def parse(cls, plan: Plan, payload: bytes, coordinator_addr: tuple | None) -> PushHello:
        """From a HELLO's payload (`coordinator_addr`: where it came from; None over TCP); WireError
        naming what is wrong."""
        try:
            cfg = json.loads(payload[len(HELLO_PUSH):])
            peers = {d: tuple(a) for d, a in cfg["peers"].items()}
            if coordinator_addr is not None:  # strict rounds answer it on its own connection
                peers[plan.coordinator] = tuple(coordinator_addr)
            hello = cls(peers, DeliveryPolicy(**cfg["policy"]), str(cfg["compensation"]), bool(cfg["await_predicted"]),
                        bool(cfg.get("strict", False)))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise WireError(f"push HELLO: {e}") from None
        missing = [d for d in plan.device_names if d not in peers and d != plan.coordinator]
        if missing:
            raise WireError(f"push HELLO names no address for {', '.join(missing)}")
        return hello
