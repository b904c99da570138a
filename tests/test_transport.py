"""Wire format, reassembly, tensor codec, RTT estimator, UDP/TCP transport and the loss shim.

Loopback only; every socket and thread is closed before a test returns.
"""
from __future__ import annotations

import random
import socket
import struct
import threading
import time

import numpy as np
import pytest
from halo_runtime.core.codec import (HEADER_SIZE, MAX_DATAGRAM, TAG_LEN, WireError, as_wire, decode_tensor,
                                     encode_tensor)
from halo_runtime.net.auth import Authenticator
from halo_runtime.net.shim import LossShim
from halo_runtime.net.rtt import RttEstimator
from halo_runtime.net.transport import TcpChannel, TcpListener, TransportError, UdpEndpoint
from halo_runtime.net.wire import (
    HEADER,
    MAGIC,
    VERSION,
    Kind,
    Message,
    Reassembler,
    attempt_of,
    check_datagram,
    encode,
    make_flags,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def _msg(size: int, step: int = 3, kind: int = Kind.REPLY_MLP_RELAXED, seed: int = 0) -> Message:
    payload = random.Random(seed).randbytes(size)
    return Message(kind, session=0xDEADBEEF, step=step, layer=29, sender=3, payload=payload)


# --- wire format --------------------------------------------------------------------------------

def test_header_is_33_bytes_and_tag_16():
    assert HEADER_SIZE == HEADER.size == 33
    assert TAG_LEN == 16


@pytest.mark.parametrize("size", [0, 1, 1350, 1351, 1352, 1399, 1400, 5000, 100_000])
def test_round_trip_shuffled_and_duplicated(size):
    msg = _msg(size)
    datagrams = encode(msg)
    assert all(len(d) <= MAX_DATAGRAM for d in datagrams)
    assert len(datagrams) == max(1, -(-size // (MAX_DATAGRAM - HEADER_SIZE - TAG_LEN)))
    # a copy (the same bytes) of a chunk held or delivered is dropped unopened; so is one sealed again
    resealed = encode(msg)[::2]
    feed = datagrams + datagrams[::2] + resealed
    random.Random(size).shuffle(feed)
    r = Reassembler()
    out = [m for m in (r.feed(d) for d in feed) if m is not None]
    assert len(out) == 1 and out[0].payload == msg.payload
    assert r.counters.completed == 1 and r.counters.replayed == 0
    assert r.counters.duplicates == len(datagrams[::2]) + len(resealed)
    assert r.pending == 0


def test_a_copy_is_opened_only_when_its_original_was_lost():
    msg, key = _msg(3000), Authenticator(bytes(range(32)))
    datagrams = encode(msg, auth=key)
    r = Reassembler(auth=key)
    assert r.feed(datagrams[0]) is None and r.feed(datagrams[0]) is None  # held: the copy is not opened
    assert (r.counters.duplicates, r.counters.forged) == (1, 0)
    # a copy whose original was lost is opened and counts; one altered in transit is refused
    assert r.feed(datagrams[1][:-1] + bytes([datagrams[1][-1] ^ 1])) is None and r.counters.forged == 1
    assert r.feed(datagrams[2]) is None and r.feed(datagrams[1]) == msg
    assert r.feed(datagrams[2]) is None and r.counters.duplicates == 2 and r.counters.replayed == 0


def test_small_max_datagram_and_flags():
    msg = _msg(1000)
    datagrams = encode(msg, max_datagram=100, flags=make_flags(attempt=3))
    assert all(len(d) <= 100 for d in datagrams) and len(datagrams) == 20
    got = [m for m in map(Reassembler().feed, datagrams) if m]
    assert got[0].payload == msg.payload and got[0].flags == make_flags(attempt=3)
    with pytest.raises(ValueError):
        encode(msg, max_datagram=HEADER_SIZE)
    with pytest.raises(ValueError):
        Message(Kind.HELLO, session=2 ** 32, step=0, layer=0, sender=0)


def test_retransmission_is_delivered_again_but_a_copy_is_not():
    msg = _msg(3000)
    r = Reassembler()
    assert [m for m in map(r.feed, encode(msg)) if m] == [msg]
    assert not [m for m in map(r.feed, encode(msg)) if m]
    again = [m for m in map(r.feed, encode(msg, flags=make_flags(attempt=1))) if m]
    assert len(again) == 1 and attempt_of(again[0].flags) == 1 and again[0].payload == msg.payload
    assert not [m for m in map(r.feed, encode(msg, flags=make_flags(attempt=1))) if m]
    # Past 15 attempts the counter saturates and every copy is delivered, so retries never starve.
    for _ in range(2):
        assert len([m for m in map(r.feed, encode(msg, flags=make_flags(attempt=99))) if m]) == 1


def _seal(header: bytes, chunk: bytes) -> bytes:
    """A datagram sealed under the default (test) key, whatever its header says."""
    _, _, _, session, _, _, sender, *_, seq, _ = HEADER.unpack(header)
    return header + Authenticator().seal(session, sender, seq, header, chunk)


def test_malformed_datagrams_are_rejected():
    good = encode(_msg(2000))[0]
    assert check_datagram(good)[0] is not None
    pad = b"\0" * TAG_LEN
    bad_length = [b"", good[:HEADER_SIZE - 1], good[:-1], good + b"x", "text"]
    malformed = [
        b"XX" + good[2:], good[:2] + b"\x09" + good[3:], good[:2] + b"\x02" + good[3:],   # HMAC-era version
        HEADER.pack(MAGIC, VERSION, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0) + pad,      # count 0
        HEADER.pack(MAGIC, VERSION, 1, 0, 0, 0, 0, 2, 2, 0, 0, 1, 0) + pad,      # index >= count
        None, 12,
    ]
    forged = [good[:40] + bytes([good[40] ^ 1]) + good[41:], good[:-1] + bytes([good[-1] ^ 0x80])]
    for reason, bad in (("bad_length", bad_length), ("malformed", malformed), ("forged", forged)):
        for b in bad:
            assert check_datagram(b) == (None, reason), b
    assert check_datagram(good, max_datagram=len(good) - 1) == (None, "bad_length")
    assert check_datagram(good, auth=Authenticator(b"k" * 32)) == (None, "forged")
    r = Reassembler()
    for b in bad_length + malformed + forged:
        assert r.feed(b) is None
    c = r.counters
    assert (c.bad_length, c.malformed, c.forged) == (len(bad_length), len(malformed), len(forged))
    assert c.datagrams == len(bad_length) + len(malformed) + len(forged) and c.completed == 0


def test_wrong_key_and_replay_are_counted():
    key = Authenticator(b"a" * 32)
    msg = _msg(10)
    r = Reassembler(auth=key, remember=1)
    assert r.feed(encode(msg)[0]) is None and r.counters.forged == 1     # test key, not ours
    d = encode(msg, auth=key)[0]
    assert r.feed(d) == msg
    assert r.feed(d) is None and r.counters.duplicates == 1              # the same bytes again: a copy
    assert r.feed(encode(_msg(10, step=4), auth=key)[0]) is not None      # ... and once forgotten,
    assert r.feed(d) is None and r.counters.replayed == 1                 # a replay
    # a retransmission is a new datagram (new sequence number), so it is delivered
    assert r.feed(encode(msg, flags=make_flags(attempt=1), auth=key)[0]) is not None
    assert r.counters.completed == 3


def test_chunk_count_mismatch_is_malformed():
    a, b = encode(_msg(2000))
    forged = bytearray(b[:HEADER_SIZE])
    struct.pack_into("!H", forged, 18, 3)  # same message key, different chunk count
    struct.pack_into("!Q", forged, 23, struct.unpack_from("!Q", b, 23)[0] + 100)  # a fresh sequence number
    r = Reassembler()
    assert r.feed(a) is None and r.feed(_seal(bytes(forged), check_datagram(b)[1])) is None
    assert r.counters.malformed == 1 and r.feed(b) is not None


_VALID = [d for size in (0, 50, 3000) for d in encode(_msg(size, seed=size))]


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1500))
def test_random_bytes_never_raise(data):
    r = Reassembler()
    assert r.feed(data) is None or data[:2] == MAGIC
    assert r.counters.datagrams == 1


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(_VALID), st.integers(0, 1500), st.integers(0, 255), st.integers(0, 1500))
def test_mutated_datagrams_never_raise(datagram, pos, value, cut):
    d = bytearray(datagram)
    if pos < len(d):
        d[pos] = value
    r = Reassembler(max_partials=4)
    for x in (bytes(d), bytes(d[:cut]), datagram):
        r.feed(x)  # must not raise, whatever the bytes
    assert r.counters.datagrams == 3 and r.pending <= 4


def test_watermark_evicts_and_rejects_stale():
    r = Reassembler()
    for step in range(5):
        r.feed(encode(_msg(3000, step=step))[0])
    assert r.pending == 5
    r.set_watermark(3)
    assert r.pending == 2 and r.counters.evicted == 3
    assert r.feed(encode(_msg(10, step=1))[0]) is None and r.counters.stale == 1
    hello = Message(Kind.HELLO, session=1, step=0, layer=0, sender=0)
    assert r.feed(encode(hello)[0]) == hello  # control messages are never stale


def test_memory_is_bounded():
    r = Reassembler(max_partials=8, remember=16)
    for step in range(100):
        r.feed(encode(_msg(3000, step=step))[0])
    assert r.pending == 8 and r.counters.evicted == 92
    for step in range(100):
        r.feed(encode(_msg(10, step=step))[0])
    assert len(r._done) == 16


# --- tensor codec -------------------------------------------------------------------------------

def test_tensor_fp32_exact():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 576)) * np.logspace(-30, 30, 576)).astype(np.float32)
    x[0, :4] = [float("inf"), float("-inf"), -0.0, 1e-45]
    y = decode_tensor(encode_tensor(x, "fp32"), "fp32", width=576)
    assert y.dtype == np.float32 and np.array_equal(y.view(np.int32), x.view(np.int32))


def test_tensor_fp16_and_bf16_tolerance():
    x = (np.random.default_rng(1).standard_normal((3, 576)) * 10).astype(np.float32)
    b = encode_tensor(x, "fp16")
    assert len(b) == 9 + 3 * 576 * 2
    np.testing.assert_allclose(decode_tensor(b, "fp16", 576), x, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(decode_tensor(encode_tensor(x, "bf16")), x, rtol=8e-3, atol=1e-2)
    big = np.array([[1e6, -1e6, 3.0]], np.float32)
    assert decode_tensor(encode_tensor(big, "fp16")).tolist() == [[65504.0, -65504.0, 3.0]]
    assert decode_tensor(encode_tensor(np.ones(576, np.float32))).shape == (1, 576)
    assert decode_tensor(encode_tensor(np.ones((0, 576), np.float32), "fp32")).shape == (0, 576)


@pytest.mark.parametrize("wire", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", [(1, 576), (5, 64), (576,), (0, 8)])
def test_as_wire_is_what_the_receiver_decodes_bit_for_bit(wire, shape):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * rng.choice([1e-8, 1.0, 1e6], shape)).astype(np.float32)
    if x.size:
        x.flat[0] = np.nan
    got, want = as_wire(x, wire), decode_tensor(encode_tensor(x, wire), wire)
    if wire == "fp32":
        assert got is x
        return
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_tensor_decode_errors():
    b = encode_tensor(np.ones((2, 4), np.float32), "fp16")
    for data, wire, width in [(b[:5], None, None), (b[:-1], None, None), (b + b"\0", None, None),
                              (b, "fp32", None), (b, None, 5), (b"\x07" + b[1:], None, None)]:
        with pytest.raises(WireError):
            decode_tensor(data, wire, width)


# --- RTT estimator ------------------------------------------------------------------------------

def test_rtt_estimator():
    e = RttEstimator()
    assert e.rto_s == pytest.approx(0.02)
    e.sample(0.0001)
    assert e.rto_s == 0.002  # floor
    for _ in range(100):
        e.sample(0.010)
    assert e.srtt_s == pytest.approx(0.010, rel=1e-3) and e.rto_s == pytest.approx(0.010, rel=0.05)
    steady = e.rto_s
    for i in range(50):
        e.sample(0.002 if i % 2 else 0.018)
    assert e.rto_s > steady + 0.01  # variance raises the timeout
    e.sample(5.0)
    assert e.rto_s == 0.2  # ceiling
    f = RttEstimator()
    f.sample(0.004)
    before = (f.srtt_s, f.rttvar_s, f.rto_s)
    f.sample(float("nan")), f.sample(-1.0)  # ignored
    assert (f.srtt_s, f.rttvar_s, f.rto_s) == before


# --- UDP ----------------------------------------------------------------------------------------

def test_udp_send_recv():
    with UdpEndpoint() as a, UdpEndpoint() as b:
        assert a.address[0] == "127.0.0.1" and a.address[1] > 0
        assert b.rcvbuf_bytes >= 208 * 1024
        small, big = _msg(1152, seed=1), _msg(100_000, step=4, seed=2)
        assert a.send(small, b.address) == 1
        assert a.send(big, b.address) == 75
        got = [b.recv(timeout_s=2.0) for _ in range(2)]
        assert [g[0] for g in got] == [small, big] and got[0][1] == a.address
        assert b.recv(timeout_s=0) is None
        waited = {}
        for timeout in (0.05, 0.5):  # nothing arrives: recv returns after its timeout, not before
            t0 = time.monotonic()
            assert b.recv(timeout_s=timeout) is None
            waited[timeout] = time.monotonic() - t0
        # relative, not absolute (a loaded machine only adds time): never early, and it follows the timeout
        assert waited[0.05] >= 0.04 and waited[0.5] >= 0.45 and waited[0.05] < waited[0.5], waited
        b.send(small, a.address)
        assert a.recv(1.0)[0] == small
        assert a.counters.datagrams_sent == 76 and b.counters.datagrams_received == 76
        assert b.counters.bytes_received == a.counters.bytes_sent > 100_000
        assert b.counters.messages_received == 2


def test_udp_garbage_is_counted_not_raised():
    with UdpEndpoint() as b, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        for junk in (b"", b"hello", MAGIC + b"\x01" * 40, bytes(1400)):
            raw.sendto(junk, b.address)
        raw.sendto(encode(_msg(10), auth=Authenticator(b"w" * 32))[0], b.address)   # wrong key
        raw.sendto(encode(_msg(10))[0], b.address)
        msg, _ = b.recv(1.0)
        c = b.reassembler.counters
        assert msg == _msg(10) and (c.bad_length, c.malformed, c.forged) == (3, 1, 1)


def test_port_in_use():
    with UdpEndpoint() as a:
        host, port = a.address
        with pytest.raises(TransportError, match=f"cannot bind 127.0.0.1:{port}: address already in use"):
            UdpEndpoint(host, port)
    with TcpListener() as lst:
        host, port = lst.address
        with pytest.raises(TransportError, match=f"cannot bind 127.0.0.1:{port}: address already in use"):
            TcpListener(host, port)


def test_bad_address():
    with UdpEndpoint() as a, pytest.raises(TransportError, match="cannot send to"):
        a.send(_msg(1), ("no.such.host.invalid", 1))


# --- TCP ----------------------------------------------------------------------------------------

def _congestion(channel: TcpChannel) -> str:
    """Congestion control in force on a channel's socket, e.g. 'cubic'."""
    raw = channel._sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_CONGESTION", 13), 16)
    return raw.split(b"\0", 1)[0].decode()


def test_tcp_round_trip():
    with TcpListener() as lst:
        client = TcpChannel.connect(lst.address)
        server = lst.accept(timeout_s=2.0)
        try:
            assert server is not None
            assert _congestion(client) == "cubic" and _congestion(server) == "cubic"
            assert client._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            small, big = _msg(1152), _msg(200_000, seed=5)
            client.send(small)
            client.send(big)
            assert server.recv(2.0) == small and server.recv(2.0) == big
            assert server.recv(0.01) is None
            server.send(small)
            assert client.recv(2.0) == small
            client.send(Message(Kind.BYE, 0, 0, 0, 0))
            client.close()
            assert server.recv(2.0).kind == Kind.BYE
            with pytest.raises(TransportError, match="closed by peer"):
                server.recv(2.0)
        finally:
            client.close()
            if server is not None:
                server.close()
    with TcpListener() as lst:
        port = lst.address[1]
    with pytest.raises(TransportError, match=f"cannot connect to 127.0.0.1:{port}"):
        TcpChannel.connect(("127.0.0.1", port))


def test_tcp_bad_frame_length_closes_with_peer_named():
    with TcpListener() as lst, socket.create_connection(lst.address) as raw:
        server = lst.accept(2.0)
        try:
            raw.sendall(struct.pack("!I", 5) + b"\0" * 5)
            with pytest.raises(TransportError, match="invalid length 5"):
                server.recv(2.0)
        finally:
            server.close()


def test_tcp_frames_are_authenticated_and_replays_refused_across_connections():
    from halo_runtime.net.auth import ReplayGuard

    key, guard = Authenticator(b"t" * 32), ReplayGuard()
    good = encode(_msg(3000), 65535, auth=key)
    frames = b"".join(struct.pack("!I", len(d)) + d for d in good)
    forged = b"".join(struct.pack("!I", len(d)) + d for d in encode(_msg(10, step=9), 65535,
                                                                    auth=Authenticator(b"u" * 32)))
    with TcpListener(auth=key, guard=guard) as lst:
        with socket.create_connection(lst.address) as raw:
            first = lst.accept(2.0)
            raw.sendall(forged + frames)
            assert first.recv(2.0) == _msg(3000)
            assert first.reassembler.counters.forged == 1
            first.close()
        with socket.create_connection(lst.address) as raw:   # the recorded connection, played again
            second = lst.accept(2.0)
            raw.sendall(frames)
            assert second.recv(0.3) is None
            assert second.reassembler.counters.replayed == len(good)
            second.close()


# --- loss shim ----------------------------------------------------------------------------------

def test_shim_drop_rate_is_seeded():
    def run(seed):
        sent = []
        with LossShim(loss=0.05, seed=seed) as shim:
            for i in range(10_000):
                shim.send_datagram(lambda d, a: sent.append(d), i.to_bytes(2, "big"), None)
        return shim.counters.dropped, sent
    dropped, sent = run(1)
    assert 430 <= dropped <= 570 and len(sent) == 10_000 - dropped
    assert run(1) == (dropped, sent) and run(2)[1] != sent


def test_shim_delay():
    """Datagrams arrive delay_ms +- jitter late: no earlier, and no later than a plain timer of
    delay_ms started at the same moment (the reference absorbs how late this machine wakes threads)."""
    arrivals, reference = [], []
    with LossShim(loss=0.0, delay_ms=20, jitter_ms=2, seed=3) as shim:
        for _ in range(20):
            t = time.monotonic()
            shim.send_datagram(lambda d, a, t=t: arrivals.append(time.monotonic() - t), b"x", None)
            threading.Timer(0.020, lambda t=t: reference.append(time.monotonic() - t)).start()
        deadline = time.monotonic() + 5
        while (len(arrivals) < 20 or len(reference) < 20) and time.monotonic() < deadline:
            time.sleep(0.005)
    assert len(arrivals) == 20 and len(reference) == 20 and shim.counters.delayed == 20
    mean, ref = sum(arrivals) / 20, sum(reference) / 20
    assert mean > 0.015 and min(arrivals) > 0.010, arrivals  # 20 ms, Gaussian jitter of std 2 ms
    assert mean < ref + 0.010, (mean, ref)  # not delayed twice, nor queued behind other packets


def test_shim_through_udp_endpoints():
    with LossShim(loss=0.0, delay_ms=10) as shim, UdpEndpoint(shim=shim) as a, UdpEndpoint() as b:
        t = time.monotonic()
        a.send(_msg(5000), b.address)
        assert b.recv(1.0)[0] == _msg(5000) and time.monotonic() - t >= 0.009
        assert shim.counters.delayed == 4


def test_shim_tcp_frames_stay_in_order():
    got = []
    with LossShim(loss=0.3, seed=7, tcp_rto_ms=5) as shim:
        stream = object()
        t0 = time.monotonic()
        for i in range(50):
            shim.send_frame(stream, lambda f: got.append((f, time.monotonic() - t0)), bytes([i]))
        deadline = time.monotonic() + 5
        while len(got) < 50 and time.monotonic() < deadline:
            time.sleep(0.005)
    assert [f[0] for f in got] == [bytes([i]) for i in range(50)]
    assert shim.counters.tcp_losses > 5 and shim.counters.dropped == 0
    assert got[-1][1] >= 0.005 * shim.counters.tcp_losses / 4


def test_shim_tcp_through_channel():
    with LossShim(loss=0.5, seed=1, tcp_rto_ms=20) as shim, TcpListener() as lst:
        client = TcpChannel.connect(lst.address, shim=shim)
        server = lst.accept(2.0)
        try:
            msgs = [_msg(100, step=s) for s in range(10)]
            t0 = time.monotonic()
            for m in msgs:
                client.send(m)
            assert [server.recv(5.0) for _ in msgs] == msgs
            assert shim.counters.tcp_losses > 0 and time.monotonic() - t0 >= 0.019
        finally:
            client.close()
            server.close()


def test_no_threads_left():
    assert not [t for t in threading.enumerate() if t.name == "halo-loss-shim"]


def test_fan_out_sends_every_first_copy_before_any_second_and_copies_are_the_same_bytes():
    with UdpEndpoint() as tx, UdpEndpoint() as rx:
        addr = rx._sock.getsockname()
        msg, other = _msg(100, kind=Kind.PUSH_H), _msg(2000, kind=Kind.PART_ATTN)
        assert tx.fan_out([(msg, addr, 1, 3, None), (other, addr, 2, 1, make_flags(1)), (msg, addr, 3, 2, None)]) == [1, 2, 1]
        raw = [rx._sock.recvfrom(65536)[0] for _ in range(7)]
        assert [HEADER.unpack_from(d)[-1] for d in raw] == [1, 2, 2, 3, 1, 3, 1]
        assert raw[0] == raw[4] == raw[6] and raw[3] == raw[5] and raw[0] != raw[3]
        assert HEADER.unpack_from(raw[1])[10] == make_flags(1) and HEADER.unpack_from(raw[0])[10] == 0
        assert tx.counters.datagrams_sent == 7 and tx.counters.messages_sent == 6
