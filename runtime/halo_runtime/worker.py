"""`halo-run worker`: one device process. It answers the coordinator's requests with partial sums.

It listens on one port for both UDP (relaxed synchronisation) and TCP (the strict baseline).
Replies are cached per (step, layer, phase) so that a retransmitted request gets the same answer
again instead of appending the tokens to the KV cache twice.

Request payload: u32 start position, u8 reply copies (redundancy), then an `encode_tensor` blob;
replies use the request's wire dtype.

Example:
    $ halo-run worker --plan artifacts/smollm2-135m-pi5 --device pi5-1 --bind 0.0.0.0:7700
"""
from __future__ import annotations

import struct
import sys
import threading
from collections import OrderedDict

import torch

from .device import DeviceCompute
from .plan import Plan
from .shim import LossShim
from .transport import TcpListener, TransportError, UdpEndpoint
from .wire import TENSOR_HEADER, Kind, Message, WireError, attempt_of, decode_tensor, encode_tensor, make_flags

REQUEST_PREFIX = struct.Struct("<IB")  # start position, reply copies
WIRE_NAMES = {0: "fp32", 1: "fp16", 2: "bf16"}
REPLY_CACHE = 256  # replies kept for retransmitted requests: a few steps of every layer


def encode_request(x: torch.Tensor, start: int, wire: str, copies: int = 1) -> bytes:
    return REQUEST_PREFIX.pack(start, copies) + encode_tensor(x, wire)


def decode_request(payload: bytes, width: int) -> tuple[int, int, str, torch.Tensor]:
    """(start, copies, wire, x); raises WireError on a malformed payload."""
    if len(payload) < REQUEST_PREFIX.size + TENSOR_HEADER.size:
        raise WireError("request too short")
    start, copies = REQUEST_PREFIX.unpack_from(payload)
    body = payload[REQUEST_PREFIX.size:]
    wire = WIRE_NAMES.get(body[0])
    if wire is None:
        raise WireError(f"unknown wire code {body[0]}")
    return start, max(1, min(copies, 4)), wire, decode_tensor(body, wire, width)


class Worker:
    """Serves one device's part of the plan."""

    def __init__(self, plan: Plan, device: str, shard: dict[str, torch.Tensor], host: str, port: int,
                 shim: LossShim | None = None, log=None):
        self.plan, self.device = plan, device
        self.index = plan.device_names.index(device)
        self.compute = DeviceCompute(plan, device, shard)
        self.udp = UdpEndpoint(host, port, shim=shim)
        self.tcp = TcpListener(host, self.udp.address[1], shim=shim)
        self.session: int | None = None
        self.replies: OrderedDict[tuple, list[Message]] = OrderedDict()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.counters = {"requests": 0, "computed": 0, "resent": 0, "malformed": 0, "out_of_order": 0}
        self.log = log or (lambda msg: print(f"[{device}] {msg}", file=sys.stderr, flush=True))

    @property
    def address(self) -> tuple[str, int]:
        return self.udp.address

    def handle(self, msg: Message) -> list[Message]:
        """Replies to one request (the caller sends them); thread-safe."""
        with self.lock:
            if msg.session != self.session:
                self.session = msg.session
                self.compute.reset()
                self.replies.clear()
                self.udp.reassembler.set_watermark(0)
            if msg.kind == Kind.HELLO:
                return [Message(Kind.HELLO, msg.session, 0, 0, self.index, msg.payload, msg.flags)]
            if msg.kind not in (Kind.REQUEST_ATTN, Kind.REQUEST_MLP):
                return []
            self.counters["requests"] += 1
            key = (msg.kind, msg.step, msg.layer)
            cached = self.replies.get(key)
            if cached is not None:
                self.counters["resent"] += 1
                return [Message(m.kind, m.session, m.step, m.layer, m.sender, m.payload,
                                make_flags(attempt_of(msg.flags))) for m in cached]
            try:
                start, copies, wire, x = decode_request(msg.payload, self.plan.model.hidden_size)
                replies = self._compute(msg, start, wire, x)
            except (WireError, StateError) as e:
                self.counters["malformed" if isinstance(e, WireError) else "out_of_order"] += 1
                return []
            self.counters["computed"] += 1
            self.replies[key] = replies
            while len(self.replies) > REPLY_CACHE:
                self.replies.popitem(last=False)
            if msg.step > 2:
                self.udp.reassembler.set_watermark(msg.step - 2)
            flags = make_flags(attempt_of(msg.flags))
            out = [Message(m.kind, m.session, m.step, m.layer, m.sender, m.payload, flags) for m in replies]
            redundant = [Message(m.kind, m.session, m.step, m.layer, m.sender, m.payload,
                                 make_flags(attempt_of(msg.flags), redundant=True)) for m in replies]
            return out + redundant * (copies - 1)

    def _compute(self, msg: Message, start: int, wire: str, x: torch.Tensor) -> list[Message]:
        layer, mk = msg.layer, lambda kind, t: Message(kind, msg.session, msg.step, layer, self.index,  # noqa: E731
                                                       encode_tensor(t, wire))
        if layer >= self.plan.model.num_layers:
            raise WireError(f"layer {layer} out of range")
        if msg.kind == Kind.REQUEST_ATTN:
            if not self.compute.has_attention(layer):
                return []
            if self.compute.cache_length(layer) < start:
                raise StateError(f"layer {layer}: request at position {start}, cache holds "
                                 f"{self.compute.cache_length(layer)}")
            return [mk(Kind.REPLY_ATTN, self.compute.attention(layer, x, start))]
        if not self.compute.has_mlp(layer):
            return []
        critical, relaxed = self.compute.mlp(layer, x)
        out = []
        if critical is not None:
            out.append(mk(Kind.REPLY_MLP_CRITICAL, critical))
        if relaxed is not None:
            out.append(mk(Kind.REPLY_MLP_RELAXED, relaxed))
        return out

    # ---- serving ------------------------------------------------------------------------------

    def serve_udp(self) -> None:
        while not self.stop.is_set():
            got = self.udp.recv(0.2)
            if got is None:
                continue
            msg, addr = got
            for reply in self.handle(msg):
                self.udp.send(reply, addr, reply.flags)

    def _serve_channel(self, channel) -> None:
        try:
            while not self.stop.is_set():
                msg = channel.recv(0.2)
                if msg is None:
                    continue
                if msg.kind == Kind.BYE:
                    break
                for reply in self.handle(msg):
                    channel.send(reply)
        except TransportError:
            pass
        finally:
            channel.close()

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


class StateError(RuntimeError):
    """A request this device cannot answer correctly from its current state."""
