"""`halo-run worker`: one device process. It answers the coordinator's requests with partial sums.

It listens on one port for both UDP (relaxed synchronisation) and TCP (the strict baseline).
Replies are cached per (step, layer, phase) so that a retransmitted request gets the same answer
again instead of appending the tokens to the KV cache twice.

Requests are `core.codec.encode_request` payloads; replies use the request's wire dtype. A request
may carry the rows of several sessions (`core.spans`): each has its own KV cache (slot) here.

Sessions: only the coordinator's HELLO starts one (and resets the KV cache). A request for any
other session is dropped and counted (`unknown_session`), and answered with a RESET so that a
coordinator talking to a restarted device learns it must say HELLO and rebuild the device's KV
cache (REBUILD_ATTN) before it can use it again. When a device holding critical groups dies, the
coordinator sends each survivor the plan's failover for it (FAILOVER naming the dead device): the
survivor adds the groups it adopts (`core.failover`), rebuilds their KV cache from REBUILD_ATTN,
and answers as before with the sums; a new session starts from the plan's own placement again.
Every datagram must open under its session's key (derived from the deployment key) and carry a
fresh sequence number (`auth`); rejects are counted, never raised.

Example:
    $ halo-run worker --plan artifacts/smollm2-135m-pi5 --device pi5-1 --bind 0.0.0.0:7700
"""
from __future__ import annotations

import json
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..core.codec import WireError, decode_request, encode_tensor
from ..core.device import DeviceBackend, DeviceCompute
from ..core.exchange import DeviceLost
from ..core.failover import WithAdopted, adopt
from ..core.plan import Plan
from ..core.plandir import PlanError
from ..core.push import view_over_memory
from ..core.spans import Span
from .auth import Authenticator, ReplayGuard
from .mesh import Mesh
from .push import HELLO_PUSH, PushHello
from .pushworker import PushWorker
from .recovery import REBUILD, RESUME
from .pushtcp import PUSH_KINDS, start_worker_mesh
from .shim import LossShim
from .transport import TcpListener, TransportError, UdpEndpoint
from .wire import Kind, Message, attempt_of, make_flags

REPLY_CACHE = 256  # replies kept for retransmitted requests: a few steps of every layer
RESET_EVERY_S = 0.05  # at most one RESET per this interval: a flood of stale requests gets few answers
BIND_TRIES = 8  # ports tried when asked for any (UDP's free port may be taken for TCP)
DROP_REASONS = ("malformed", "bad_length", "forged", "misdirected", "replayed", "duplicates", "stale")


@dataclass(frozen=True)
class WorkerStats:
    """A worker's own counters, as it answers a STATS request (a JSON object with these keys)."""

    device: str = ""
    """The device's name in the plan."""
    requests: int = 0
    """Requests of the running session (retransmitted ones included)."""
    computed: int = 0
    """Requests computed (the others were answered from the reply cache, or failed)."""
    resent: int = 0
    """Requests answered again from the reply cache (a retransmission, or a redundant copy)."""
    malformed: int = 0
    """Requests whose payload did not decode."""
    out_of_order: int = 0
    """Requests this device's state could not answer correctly (e.g. a KV cache position gap)."""
    unknown_session: int = 0
    """Requests of another session (answered with RESET, at most one per RESET_EVERY_S)."""
    rebuilt_tokens: int = 0
    """Tokens of KV cache rebuilt for a coordinator after a restart."""
    dropped_malformed: int = 0
    """Datagrams or frames dropped as undecodable (UDP and TCP together, as below)."""
    dropped_bad_length: int = 0
    """Dropped as truncated, oversized, or not as long as their header says."""
    dropped_forged: int = 0
    """Dropped because their tag does not verify (wrong key or session, or altered in transit)."""
    dropped_misdirected: int = 0
    """Authentic, but addressed to another device."""
    dropped_replayed: int = 0
    """Authentic, but their sender's sequence number was seen before or is too old."""
    dropped_duplicates: int = 0
    """Repeats of a chunk or of a completed message."""
    dropped_stale: int = 0
    """Their step is below the watermark."""
    datagrams_received: int = 0
    """UDP datagrams read from the socket, garbage included."""
    view_compensated: int = 0
    """Push rounds, this session: relaxed parts this device's view estimated (missed its deadline here)."""
    pulls: int = 0
    """Push rounds, this session: PULLs it sent for parts that had not come."""
    cpu_ms: int = 0
    """CPU time of the worker's process this session (user and system, every thread), ms."""

    def __post_init__(self):
        if not isinstance(self.device, str):
            raise ValueError(f"device: expected a name, got {self.device!r}")
        for f in fields(self)[1:]:
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{f.name}: expected a count, got {v!r}")

    @classmethod
    def from_json(cls, obj) -> WorkerStats:
        """From a STATS reply's JSON; keys this version does not know are ignored. ValueError if not counts."""
        if not isinstance(obj, dict):
            raise ValueError("worker stats: expected a JSON object")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})

    def to_json(self) -> dict:
        return asdict(self)


class Worker:
    """Serves one device's part of the plan."""

    def __init__(self, plan: Plan, device: str, shard: dict[str, np.ndarray], host: str, port: int,
                 shim: LossShim | None = None, log=None, compute: DeviceBackend | None = None,
                 auth: Authenticator | None = None, threads: int = 1, view_source=None):
        """compute: a prebuilt DeviceCompute (e.g. a StreamingCompute under a memory budget);
        then `shard` is not read. threads: ggml threads for this device's rounds. view_source() ->
        the tensors a view of push rounds needs (`core.push.view_tensors`); None: no push rounds."""
        self.plan, self.device, self.shard, self.threads = plan, device, shard, threads
        self.index = plan.device_names.index(device)
        self.own = self.compute = compute or DeviceCompute(plan, device, shard, threads)
        self.auth = auth or Authenticator()
        # one replay window per sender for UDP and every TCP connection: a recorded connection
        # replayed on a new one is refused too
        self.guard = ReplayGuard()
        # UDP and TCP share the port number. Asked for any port (0), the one UDP got may be some
        # TCP connection's local port already: then another is tried
        for attempt in range(1 if port else BIND_TRIES):
            self.udp = UdpEndpoint(host, port, shim=shim, auth=self.auth, guard=self.guard, me=self.index)
            try:
                self.tcp = TcpListener(host, self.udp.address[1], shim=shim, auth=self.auth, guard=self.guard,
                                       me=self.index)
                break
            except BaseException as e:
                self.udp.close()
                if port or attempt == BIND_TRIES - 1 or not isinstance(e, TransportError):
                    raise
        self.channels: list = []
        self.closed_drops = dict.fromkeys(DROP_REASONS, 0)
        self.session: int | None = None
        self._session_cpu = time.process_time()  # when this session began, in process CPU seconds
        self.failed: str | None = None
        """The dead device whose groups this one computes too, this session (a FAILOVER)."""
        self.replies: OrderedDict[tuple, list[Message]] = OrderedDict()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.counters = {"requests": 0, "computed": 0, "resent": 0, "malformed": 0, "out_of_order": 0,
                         "unknown_session": 0, "rebuilt_tokens": 0}
        self._last_reset = 0.0
        self.view_source, self._view_tensors = view_source, None
        self.push: PushWorker | None = None
        """This session's push rounds (a HELLO starting with HELLO_PUSH), else None: the star."""
        self.log = log or (lambda msg: print(f"[{device}] {msg}", file=sys.stderr, flush=True))

    @property
    def address(self) -> tuple[str, int]:
        return self.udp.address

    def stats(self) -> WorkerStats:
        """Requests served and datagrams dropped by reason (`dropped_*`), UDP and TCP together."""
        rcs = [self.udp.reassembler.counters] + [c.reassembler.counters for c in list(self.channels)]
        dropped = {f"dropped_{name}": self.closed_drops[name] + sum(getattr(rc, name) for rc in rcs)
                   for name in DROP_REASONS}
        push = self.push.mesh.counters if self.push is not None else {}
        return WorkerStats(self.device, **self.counters, **dropped,
                           datagrams_received=self.udp.counters.datagrams_received,
                           view_compensated=push.get("compensated", 0), pulls=push.get("pulls", 0),
                           cpu_ms=round(1000 * (time.process_time() - self._session_cpu)))

    def handle(self, msg: Message) -> list[Message]:
        """Replies to one request (the caller sends them); thread-safe."""
        with self.lock:
            if msg.kind == Kind.HELLO:
                if msg.payload == RESUME and msg.session != self.session:
                    # restarted since: say so, so that the coordinator rebuilds its KV caches (or
                    # replaces it) rather than use empty ones
                    return [Message(Kind.RESET, msg.session, 0, 0, self.index)]
                # a new session, or a coordinator rebuilding this device's KV cache (payload "rebuild")
                if msg.session != self.session or msg.payload == REBUILD:
                    if msg.session != self.session:
                        self._session_cpu = time.process_time()
                    self.session = msg.session
                    self._own_groups_only()
                    self.compute.reset()
                    self.replies.clear()
                    self.udp.reassembler.set_watermark(0)
                return [Message(Kind.HELLO, msg.session, 0, 0, self.index, msg.payload, msg.flags)]
            if msg.kind == Kind.STATS:
                body = json.dumps(self.stats().to_json()).encode()
                return [Message(Kind.STATS, msg.session, msg.step, 0, self.index, body, msg.flags)]
            if msg.kind == Kind.FAILOVER and msg.session == self.session:
                return self._fail_over(msg)
            if msg.kind not in (Kind.REQUEST_ATTN, Kind.REQUEST_MLP, Kind.REBUILD_ATTN):
                return []
            if msg.session != self.session:
                self.counters["unknown_session"] += 1
                now = time.monotonic()
                if now - self._last_reset < RESET_EVERY_S:
                    return []
                self._last_reset = now
                return [Message(Kind.RESET, msg.session, msg.step, msg.layer, self.index)]
            self.counters["requests"] += 1
            key = (msg.kind, msg.step, msg.layer)
            # a rebuild (over TCP, never repeated) may come once per session slot of a layer
            cached = self.replies.get(key) if msg.kind != Kind.REBUILD_ATTN else None
            if cached is not None:
                self.counters["resent"] += 1
                return [Message(m.kind, m.session, m.step, m.layer, m.sender, m.payload,
                                make_flags(attempt_of(msg.flags))) for m in cached]
            try:
                spans, copies, wire, x = decode_request(msg.payload, self.plan.model.hidden_size)
                replies = self._compute(msg, spans, wire, x)
            except (WireError, StateError) as e:
                self.counters["malformed" if isinstance(e, WireError) else "out_of_order"] += 1
                return []
            self.counters["computed"] += 1
            if msg.kind != Kind.REBUILD_ATTN:
                self.replies[key] = replies
            while len(self.replies) > REPLY_CACHE:
                self.replies.popitem(last=False)
            if msg.step > 2:
                self.udp.reassembler.set_watermark(msg.step - 2)
            flags = make_flags(attempt_of(msg.flags))
            return [Message(m.kind, m.session, m.step, m.layer, m.sender, m.payload, flags) for m in replies] * copies

    def _compute(self, msg: Message, spans: tuple[Span, ...], wire: str, x: np.ndarray) -> list[Message]:
        layer, mk = msg.layer, lambda kind, t: Message(kind, msg.session, msg.step, layer, self.index,  # noqa: E731
                                                       encode_tensor(t, wire))
        if layer >= self.plan.model.num_layers:
            raise WireError(f"layer {layer} out of range")
        highest = max(max(s.slot, s.source or 0) for s in spans)
        if highest >= self.compute.slots:
            raise StateError(f"session slot {highest} out of range: this device holds {self.compute.slots}")
        if msg.kind == Kind.REBUILD_ATTN:
            # earlier tokens' attention inputs of one slot, in order: append them to its KV cache; the ack is empty
            if len(spans) != 1:
                raise WireError("a rebuild carries one session slot")
            s = spans[0]
            if self.compute is not self.own:  # after a FAILOVER: the adopted heads' cache, from position 0
                self.compute.rebuild(layer, x, s.slot)
                self.counters["rebuilt_tokens"] += x.shape[0]
            elif self.compute.has_attention(layer):
                if self.compute.cache_length(layer, s.slot) != s.start:
                    raise StateError(f"layer {layer}: rebuild at position {s.start}, cache holds "
                                     f"{self.compute.cache_length(layer, s.slot)}")
                self.compute.attention(layer, x, s.start, s.slot)
                self.counters["rebuilt_tokens"] += x.shape[0]
            return [Message(Kind.REBUILT, msg.session, msg.step, layer, self.index)]
        if msg.kind == Kind.REQUEST_ATTN:
            if not self.compute.has_attention(layer):
                return []
            for s in spans:
                held = s.slot if s.source is None else s.source  # a slot taking another's prefix reads its rows
                if self.compute.cache_length(layer, held) < s.start:
                    raise StateError(f"layer {layer}: request at position {s.start} of slot {s.slot}, slot "
                                     f"{held}'s cache holds {self.compute.cache_length(layer, held)}")
            return [mk(Kind.REPLY_ATTN, self.compute.attention_spans(layer, x, spans))]
        if not self.compute.has_mlp(layer):
            return []
        critical, relaxed = self.compute.mlp(layer, x)
        out = []
        if critical is not None:
            out.append(mk(Kind.REPLY_MLP_CRITICAL, critical))
        if relaxed is not None:
            out.append(mk(Kind.REPLY_MLP_RELAXED, relaxed))
        return out

    def _fail_over(self, msg: Message) -> list[Message]:
        """Take over what the plan's failover gives this device of the dead one named in the payload
        (the same dead device again: nothing to do); the reply cache goes, replies now change."""
        dead = msg.payload.decode(errors="replace")
        if self.compute is self.own or self.failed != dead:
            if not self.plan.replaceable(dead) or self.shard is None:
                self.log(f"cannot take over the groups of {dead!r}: "
                         + ("the plan has no failover for it" if not self.plan.replaceable(dead) else
                            "this worker streams its weights"))
                return []
            failover = self.plan.failover_for(dead)
            self._own_groups_only()
            adopted = adopt(self.plan, dead, self.device, self.shard, self.threads)
            if adopted is not None:
                self.compute = WithAdopted(self.own, adopted)
                self.log(f"took over {sum(1 for _, to in failover.moves if to == self.device)} of {dead}'s groups")
            self.failed = dead
            self.replies.clear()
        return [Message(Kind.FAILOVER, msg.session, 0, 0, self.index, msg.payload, msg.flags)]

    def _own_groups_only(self) -> None:
        """Back to the plan's own placement (a new session starts with every device in)."""
        if self.compute is not self.own:
            self.compute.close()
        self.compute, self.failed = self.own, None

    # ---- serving ------------------------------------------------------------------------------

    def serve_udp(self) -> None:
        while not self.stop.is_set():
            if self.push is not None and not self.push.strict:  # its mesh receives, hands the rest to _answer
                self.push.serve(0.2)
                continue
            got = self.udp.recv(0.2)
            if got is not None:
                self._answer(*got)

    def _answer(self, msg: Message, addr) -> None:
        replies = self.handle(msg)
        # after handle: a new session's HELLO resets the compute first; no echo if push rounds cannot start
        if msg.kind == Kind.HELLO and not self._rounds(msg, addr):
            return
        # a reply listed k times goes out as k byte-identical copies, every reply's first one first
        self.udp.fan_out([(reply, addr, msg.sender, replies.count(reply), None) for reply in dict.fromkeys(replies)])

    def _rounds(self, hello: Message, addr, channel=None) -> bool:
        """Star or push rounds for the session a HELLO starts (a repeated HELLO changes nothing);
        `addr`: where a UDP one came from; `channel`: the coordinator's TCP connection it came on
        (strict push rounds). False if push rounds were asked for and cannot start (logged)."""
        if not hello.payload.startswith(HELLO_PUSH):
            if hello.payload != REBUILD:
                self._end_push()
            return True
        if self.push is not None and self.push.mesh.session == hello.session:
            return True
        self._end_push()
        try:
            config = PushHello.parse(self.plan, hello.payload, addr)
            view = self.view()
            if config.strict != (channel is not None):
                raise WireError("strict push rounds start over TCP, relaxed ones over UDP")
            if config.strict:
                mesh = start_worker_mesh(self.plan, self.device, hello, config, channel, self.auth)
            else:
                mesh = Mesh(self.plan, self.device, self.udp, config.peers, config.policy, hello.session, self._answer)
            self.push = PushWorker(self.plan, self.device, self.compute, view, mesh, config, self.log, self.lock)
        except (PlanError, WireError, DeviceLost) as e:
            self.log(f"cannot run push rounds: {e}")
            return False
        if config.strict:  # its passes run on a thread of their own, reading what the connections deliver
            threading.Thread(target=self._strict_passes, args=(self.push,), daemon=True).start()
        return True

    def _strict_passes(self, push: PushWorker) -> None:
        while self.push is push and not self.stop.is_set():
            push.serve(0.2)

    def _end_push(self) -> None:
        if self.push is not None:
            self.push.mesh.end()
        self.push = None

    def view(self) -> dict:
        """The tensors a view of push rounds needs (read once); PlanError if this worker has none."""
        if self._view_tensors is None:
            if self.view_source is None:
                raise PlanError("this worker was started without the plan's view tensors")
            self._view_tensors = self.view_source()
            over = view_over_memory(self.plan, sum(t.nbytes for t in self._view_tensors.values())).get(self.device)
            if over:  # a warning, not a refusal: the view is mapped from disk, and the kernel may page it out
                self.log(f"push rounds: with its view this device holds {over[0]:.1f} MB, beyond the {over[1]:.1f} MB "
                         "the plan gave it (placement does not count the view)")
        return self._view_tensors

    def _serve_channel(self, channel) -> None:
        with self.lock:
            self.channels.append(channel)
        try:
            while not self.stop.is_set():
                msg = channel.recv(0.2)
                if msg is None:
                    continue
                if msg.kind == Kind.BYE:
                    break
                push = self.push
                if msg.kind in PUSH_KINDS:  # a part of strict push rounds, from whoever connected
                    if push is not None and push.strict:
                        push.mesh.deliver(msg)
                    continue
                replies = self.handle(msg)
                if msg.kind == Kind.HELLO:
                    with self.lock:  # one session's set-up at a time, whichever connection brings it
                        if not self._rounds(msg, None, channel):
                            continue
                for reply in replies:
                    channel.send(reply, dest=msg.sender)
        except TransportError:
            pass
        finally:
            channel.close()
            with self.lock:  # keep a closed channel's drop counts
                self.channels.remove(channel)
                for name in DROP_REASONS:
                    self.closed_drops[name] += getattr(channel.reassembler.counters, name)

    def serve_tcp(self) -> None:
        while not self.stop.is_set():
            channel = self.tcp.accept(0.2)
            if channel is not None:
                threading.Thread(target=self._serve_channel, args=(channel,), daemon=True).start()

    def serve_forever(self) -> None:
        tcp = threading.Thread(target=self.serve_tcp, daemon=True)
        tcp.start()
        try:
            self.serve_udp()
        finally:
            self.stop.set()
            tcp.join(timeout=1)

    def close(self) -> None:
        self.stop.set()
        self.udp.close()
        self.tcp.close()


def query_stats(endpoint: UdpEndpoint, session: int, me: int, ask: dict[str, tuple], timeout_s: float = 1.0,
                malformed=None) -> dict[str, WorkerStats]:
    """Each device's own counters (STATS), by name; `ask`: name -> (address, device index).
    Devices that do not answer within `timeout_s` are left out; malformed() counts a bad answer."""
    out: dict[str, WorkerStats] = {}
    names = {index: d for d, (_, index) in ask.items()}
    deadline = time.monotonic() + timeout_s
    for _ in range(3):
        for d, (addr, index) in ask.items():
            if d not in out:
                # attempt 15 is never deduplicated: a second query in one session is answered too
                endpoint.send(Message(Kind.STATS, session, 0, 0, me), addr, make_flags(15), dest=index)
        until = min(deadline, time.monotonic() + timeout_s / 3)
        while len(out) < len(ask) and time.monotonic() < until:
            got = endpoint.recv(until - time.monotonic())
            if got and got[0].kind == Kind.STATS and names.get(got[0].sender) in ask:
                try:
                    out[names[got[0].sender]] = WorkerStats.from_json(json.loads(got[0].payload))
                except ValueError:
                    if malformed is not None:
                        malformed()
        if len(out) == len(ask):
            break
    return out


class StateError(RuntimeError):
    """A request this device cannot answer correctly from its current state."""
