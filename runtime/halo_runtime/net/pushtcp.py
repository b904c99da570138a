"""Strict push rounds over TCP (`--sync strict --rounds push`): every device sends its part to
every other on a TCP connection and awaits every part, relaxed ones too; TCP retransmits what the
network loses. The fair strict counterpart of relaxed push rounds (`net.push`), as distributed-
llama's all-gather is: one hop a round, nothing estimated.

Connections: the coordinator connects to every worker and says HELLO (with `push.PushHello`,
strict); each worker then connects to every other worker's listener before it answers, so that
every connection exists before the coordinator sends a pass's residual. A device sends on the
connections it opened (a worker to the coordinator: on the coordinator's connection) and reads
every connection that reaches it, one thread each, into its `TcpMesh`. A broken connection or
silence past `dead_after_s` ends the run (DeviceLost naming the device).

Example (on loopback, as tests/test_push_net.py runs it):
    $ halo-run local --plan artifacts/smollm2-135m-pi5 --rounds push --sync strict --prompt "Hello"
"""
from __future__ import annotations

import threading
import time

from ..core.exchange import DeviceLost, ExchangeStats
from ..core.plan import Plan
from ..core.policy import DeliveryPolicy
from .auth import Authenticator, ReplayGuard
from .mesh import take_start
from .push import PushHello, UdpPush
from .recovery import History
from .transport import TcpChannel, TransportError
from .wire import Kind, Message

PUSH_KINDS = frozenset(int(k) for k in (Kind.PUSH_H, Kind.PART_ATTN, Kind.PART_CRIT, Kind.PART_RLX))


class TcpMesh:
    """One device's end of strict push rounds: sends on its connections, awaits every part."""

    def __init__(self, plan: Plan, me: str, session: int, policy: DeliveryPolicy, channels: dict[str, TcpChannel]):
        """channels: other device -> the connection this device sends to it on."""
        self.plan, self.me, self.session, self.policy, self.channels = plan, me, session, policy, channels
        self.index = {d: i for i, d in enumerate(plan.device_names)}
        self.names = {i: d for d, i in self.index.items()}
        self.inbox: dict[tuple, Message] = {}
        self.cond = threading.Condition()
        self.broken: dict[str, str] = {}  # device -> why its connection ended
        self.counters = {"pulls": 0, "late": 0, "malformed": 0, "unknown_session": 0, "compensated": 0,
                         "relaxed_parts": 0, "awaited_relaxed": 0}
        self.also_resend = None  # TCP resends for us
        self.ended = False
        """Set when the session leaves push rounds (`end`)."""

    def deliver(self, msg: Message) -> None:
        """A message read from a connection (any thread)."""
        d = self.names.get(msg.sender)
        with self.cond:
            if d is None or d == self.me or msg.session != self.session:
                self.counters["unknown_session"] += 1
                return
            self.inbox.setdefault((msg.kind, msg.step, msg.layer, d), msg)
            self.cond.notify_all()

    def lost(self, d: str, why: str) -> None:
        with self.cond:
            self.broken[d] = why
            self.cond.notify_all()

    def push(self, kind: int, step: int, layer: int, payload: bytes, to: list[str] | None = None) -> None:
        msg = Message(kind, self.session, step, layer, self.index[self.me], payload)
        for d in [x for x in self.plan.device_names if x != self.me] if to is None else to:
            try:
                self.channels[d].send(msg, dest=self.index[d])
            except TransportError as e:
                raise DeviceLost(f"device {d}: {e}", d) from None

    def collect(self, step: int, layer: int, must: list, optional: list = ()) -> dict:
        """Every part of `must` and `optional` (strict: nothing is estimated)."""
        wanted = list(must) + list(optional)
        deadline = time.monotonic() + self.policy.dead_after_s
        with self.cond:
            while True:
                missing = [(d, k) for d, k in wanted if (k, step, layer, d) not in self.inbox]
                if not missing:
                    return {(d, k): self.inbox.pop((k, step, layer, d)) for d, k in wanted}
                if self.ended:  # a pass waiting on a lost device's part gives way to the star's rounds
                    raise DeviceLost("the session left push rounds", None)
                for d, _ in missing:
                    if d in self.broken:
                        raise DeviceLost(f"device {d}: {self.broken[d]}", d)
                left = deadline - time.monotonic()
                if left <= 0:
                    d = missing[0][0]
                    raise DeviceLost(f"device {d} stopped answering: no part of layer {layer} of step {step} in "
                                     f"{self.policy.dead_after_s:g} s", d)
                self.cond.wait(left)

    def pump(self, timeout_s: float) -> None:
        with self.cond:
            self.cond.wait(timeout_s)

    def forget_before(self, step: int) -> None:
        with self.cond:
            self._forget(step)

    def take_start(self, done_step: int) -> Message | None:
        with self.cond:
            return take_start(self.inbox, done_step, self._forget)

    def _forget(self, step: int) -> None:  # the lock held
        for key in [k for k in self.inbox if k[1] < step]:
            del self.inbox[key]

    def end(self) -> None:
        """The session left push rounds: a pass waiting in `collect` gives way, and the connections
        this device opened close (not the coordinator's, which it serves)."""
        with self.cond:
            self.ended = True
            self.cond.notify_all()
        for d, ch in self.channels.items():
            if d != self.plan.coordinator:
                ch.close()


def read_into(mesh: TcpMesh, device: str, channel: TcpChannel, stop: threading.Event) -> None:
    """Read `channel` (from `device`) into `mesh` until it breaks or `stop` is set (a thread's body)."""
    try:
        while not stop.is_set():
            msg = channel.recv(0.2)
            if msg is not None and msg.kind in PUSH_KINDS:
                mesh.deliver(msg)
    except TransportError as e:
        if not stop.is_set():
            mesh.lost(device, str(e))


class TcpPush(UdpPush):
    """The coordinator's `core.push.PushMesh` for strict push rounds, over TCP."""

    def __init__(self, plan: Plan, peers: dict[str, tuple[str, int]], policy: DeliveryPolicy = DeliveryPolicy(),
                 shims: dict | None = None, auth: Authenticator | None = None):
        self._common(plan, peers, policy, auth)
        self.shims, self.guard = shims or {}, ReplayGuard()
        self.channels: dict[str, TcpChannel] = {}
        self.stop = threading.Event()
        self.mesh = TcpMesh(plan, self.me, 0, policy, self.channels)

    def _connect(self, d: str) -> TcpChannel:
        try:
            return TcpChannel.connect(self.peers[d], timeout_s=5.0, shim=self.shims.get(d), auth=self.auth,
                                      guard=self.guard, me=self.plan.device_names.index(self.me))
        except TransportError as e:
            raise DeviceLost(f"device {d}: {e}", d) from None

    def begin(self, session: int, timeout_s: float | None = None) -> None:
        """Connect to every device afresh and start `session` in strict push mode; every device has
        connected to every other when its HELLO comes back; in star mode after a device was lost."""
        if self.star is not None and not self._whole_again(session):
            return
        self.history = History(self.plan.model.num_layers, self.width, self.policy.wire)
        self._close_channels()
        self.stop = threading.Event()
        self.channels = {d: self._connect(d) for d in self.remote}
        self.mesh = TcpMesh(self.plan, self.me, session, self.policy, self.channels)
        body = PushHello(self.peers, self.policy, strict=True, **self.rule).payload()
        index = self.plan.device_names.index
        for d, ch in self.channels.items():
            ch.send(Message(Kind.HELLO, session, 0, 0, index(self.me), body), dest=index(d))
        deadline = time.monotonic() + (self.policy.dead_after_s if timeout_s is None else timeout_s)
        for d, ch in self.channels.items():  # the echo, then every later message of d into the mesh
            while True:
                try:
                    msg = ch.recv(max(0.0, deadline - time.monotonic()))
                except TransportError as e:
                    raise DeviceLost(f"device {d}: {e}", d) from None
                if msg is None:
                    raise DeviceLost(f"device {d} does not start strict push rounds (is it this plan's worker, "
                                     "with the coordinator's shard in its plan directory?)", d)
                if msg.kind == Kind.HELLO and msg.session == session:
                    break
            threading.Thread(target=read_into, args=(self.mesh, d, ch, self.stop), daemon=True).start()

    def _star_exchange(self):
        """Strict star rounds on new connections (a device that takes none is the dead one)."""
        from .tcpexchange import TcpExchange  # it imports the worker, which imports this module

        return TcpExchange(self.plan, self.peers, self.policy, self.shims, self.auth, lost_ok=True)

    def _leave(self) -> None:
        self._close_channels()

    def _reopen(self) -> None:
        """Nothing: `begin` connects to every device afresh."""

    def stats(self) -> ExchangeStats:
        if self.star is not None:
            return self._with_star()
        c = self.mesh.counters
        sent = sum(ch.counters.bytes_sent for ch in self.channels.values())
        return ExchangeStats(retransmissions=None, late=None, malformed=c["malformed"], compensated=0,
                             relaxed_parts=c["relaxed_parts"], awaited_relaxed=c["awaited_relaxed"],
                             unknown_session=c["unknown_session"], bytes_sent=sent, bytes_received=None,
                             datagrams_sent=None, datagrams_received=None, dropped=None, devices_down=None,
                             rejoins=None, max_relaxed_overshoot_ms=None, duplicates=None, down=None, rto_ms=None)

    def device_stats(self, timeout_s: float = 1.0) -> dict:
        return {} if self.star is None else self.star.device_stats(timeout_s)

    def _close_channels(self) -> None:
        self.stop.set()
        for ch in self.channels.values():
            ch.close()

    def close(self) -> None:
        self._close_channels()
        if self.star is not None:
            self.star.close()


def start_worker_mesh(plan: Plan, me: str, hello: Message, config: PushHello, coordinator: TcpChannel,
                      auth: Authenticator) -> TcpMesh:
    """A worker's TcpMesh for the strict push session `hello` starts: the coordinator's connection
    to send on, and a new one to every other worker (read by theirs)."""
    index = plan.device_names.index
    channels = {plan.coordinator: coordinator}
    for d in plan.device_names:
        if d not in (me, plan.coordinator):
            try:
                channels[d] = TcpChannel.connect(config.peers[d], timeout_s=5.0, auth=auth, guard=ReplayGuard(),
                                                 me=index(me))
            except TransportError as e:
                for ch in list(channels.values())[1:]:
                    ch.close()
                raise DeviceLost(f"device {d}: {e}", d) from None
    return TcpMesh(plan, me, hello.session, config.policy, channels)
