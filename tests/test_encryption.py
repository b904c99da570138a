"""Encryption of the wire (net/auth.py): what a captured datagram reveals, session keys, nonces.

A captured datagram holds none of its activation's bytes and opens only under its deployment key
and session; session keys are RFC 5869 HKDF of the deployment key; the key cache is bounded and
forgeries take no slot; sequence numbers (half of every nonce) never repeat in a process.
"""
from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from halo_runtime.core.codec import HEADER_SIZE, TAG_LEN, decode_tensor, encode_tensor
from halo_runtime.net.auth import Authenticator
from halo_runtime.net.wire import Kind, Message, Reassembler, encode


def _plain_runs(plain: bytes, step: int) -> set[bytes]:
    """Every 8-byte run of `plain` that starts at a value boundary (`step` bytes per value)."""
    return {plain[i:i + 8] for i in range(0, len(plain) - 7, step)}


@pytest.mark.parametrize("wire,step", [("fp32", 4), ("fp16", 2)])
def test_a_captured_datagram_reveals_nothing_of_the_activation(wire, step):
    key = b"c" * 32
    rng = np.random.default_rng(11)
    # known values: random ones, and a constant row that a cipher without a fresh nonce per block
    # would give away as a repeating pattern
    x = np.vstack([rng.standard_normal(576), np.full(576, 1.5), np.arange(576) / 64]).astype(np.float32)
    payload = encode_tensor(x, wire)
    msg = Message(Kind.REPLY_MLP_RELAXED, session=77, step=3, layer=4, sender=2, payload=payload)
    captured = encode(msg, auth=Authenticator(key))
    runs = _plain_runs(payload[9:], step)  # after the 9-byte tensor prefix, the values themselves
    assert len(captured) > 1 and len(runs) > 500
    for d in captured:
        assert not any(d[i:i + 8] in runs for i in range(len(d) - 7))
        assert d[HEADER_SIZE:-TAG_LEN] not in payload
    # with the key it decodes, values and all
    r = Reassembler(auth=Authenticator(key))
    got = [m for m in map(r.feed, captured) if m]
    assert got == [msg] and np.array_equal(decode_tensor(got[0].payload, wire, 576), decode_tensor(payload, wire, 576))
    # under another deployment key, or relabelled to another session (that session's key), every
    # datagram is refused as forged
    other = Reassembler(auth=Authenticator(b"d" * 32))
    assert not [m for m in map(other.feed, captured) if m] and other.counters.forged == len(captured)
    spliced = [d[:4] + struct.pack("!I", 78) + d[8:] for d in captured]
    r = Reassembler(auth=Authenticator(key))
    assert not [m for m in map(r.feed, spliced) if m] and r.counters.forged == len(captured)
    # the same message sealed again (new sequence numbers, hence nonces) shares no ciphertext
    again = encode(msg, auth=Authenticator(key))
    assert all(a[HEADER_SIZE:] != b[HEADER_SIZE:] for a, b in zip(captured, again))


def test_session_keys_are_hkdf_of_the_deployment_key():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from halo_runtime.net.auth import HKDF_SALT, SESSION_INFO

    key = bytes(range(32))
    info = SESSION_INFO + struct.pack("!I", 0xDEADBEEF)
    assert Authenticator(key).derive(info) == HKDF(hashes.SHA256(), 32, HKDF_SALT, info).derive(key)


def test_session_key_cache_is_bounded_and_forgeries_do_not_enter_it():
    from halo_runtime.net.auth import SESSION_KEYS

    a = Authenticator(b"e" * 32)
    for session in range(SESSION_KEYS + 10):
        a.seal(session, 0, a.next_seq(), b"h", b"x")
    assert len(a._sessions) == SESSION_KEYS and 0 not in a._sessions
    b = Authenticator(b"e" * 32)
    assert b.unseal(5, 0, 1, b"h", bytes(17)) is None and not b._sessions   # a forgery: no slot
    seq = a.next_seq()
    assert b.unseal(5, 0, seq, b"h", a.seal(5, 0, seq, b"h", b"x")) == b"x" and list(b._sessions) == [5]


def test_sequence_numbers_are_unique_across_authenticators_of_a_process():
    a, b = Authenticator(b"f" * 32), Authenticator(b"f" * 32)
    seqs = [x.next_seq() for _ in range(1000) for x in (a, b)]
    assert len(set(seqs)) == len(seqs) and seqs == sorted(seqs)
    # a new Authenticator numbers from the clock on (within the ~1 ms of slack the swap needs), as a
    # process started now would
    from halo_runtime.net.auth import _SEQ_SLACK

    last = a.next_seq()
    time.sleep(0.01)
    now = time.time_ns()
    first = Authenticator(b"f" * 32).next_seq()
    assert first >= now - _SEQ_SLACK and first - last > 5_000_000
