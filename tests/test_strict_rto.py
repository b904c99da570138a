"""Strict sync's TCP sockets lower their minimum retransmission timeout to the delivery policy's
floor (`transport.lower_rto`; a lost one-segment message otherwise waits Linux's 200 ms), say so
when the kernel cannot, and the demo's loss shim waits the RTO the socket has.
"""
from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
from halo_runtime.core.policy import DeliveryPolicy
from halo_runtime.net.shim import LossShim
from halo_runtime.net.transport import TcpChannel, TcpListener, lower_rto


def test_tcp_minimum_rto_lowered_to_the_policy_floor():
    """A lost one-segment strict message waits for the minimum RTO: 200 ms unless lowered."""
    with TcpListener() as lst:
        client = TcpChannel.connect(lst.address)
        server = lst.accept(2.0)
        try:
            if client.rto_min_ms is None:
                pytest.skip("this kernel has no TCP_RTO_MIN_US (Linux < 6.15)")
            # the floor, rounded up to the kernel's two-jiffy minimum (HZ >= 100: at most 20 ms)
            assert DeliveryPolicy.rto_floor_ms <= client.rto_min_ms <= 20
            assert server.rto_min_ms == client.rto_min_ms
        finally:
            client.close()
            server.close()


@pytest.mark.parametrize("floor_ms", [0.001, 2.0, 50.0])
def test_lower_rto_grants_at_least_what_was_asked(floor_ms):
    with socket.socket() as s:
        got = lower_rto(s, floor_ms)
        if got is None:
            pytest.skip("this kernel has no TCP_RTO_MIN_US (Linux < 6.15)")
        assert floor_ms <= got <= max(2 * floor_ms, 20)


@pytest.mark.parametrize("kernel_has_it", [True, False])
def test_strict_says_when_the_kernel_keeps_its_200_ms(tiny_plan, tiny_shards, monkeypatch, kernel_has_it):
    """One warning line, naming the machine-wide sysctl, when a strict socket's RTO floor cannot be lowered."""
    import halo_runtime.net.transport as transport
    from halo_runtime.net.tcpexchange import TcpExchange
    from threadworkers import peers, thread_workers

    if not kernel_has_it:
        monkeypatch.setattr(transport, "lower_rto", lambda sock, floor_ms: None)
    else:
        with socket.socket() as s:
            if lower_rto(s, 2.0) is None:
                pytest.skip("this kernel has no TCP_RTO_MIN_US (Linux < 6.15)")
    plan, _ = tiny_plan
    said = []
    with thread_workers(plan, tiny_shards) as workers:
        TcpExchange(plan, peers(workers), warn=said.append).close()
    assert len(said) == (0 if kernel_has_it else 1)
    assert kernel_has_it or ("200 ms" in said[0] and "net.ipv4.tcp_rto_min_us" in said[0])


def test_shim_tcp_waits_the_channels_rto():
    """The demo's emulated TCP loss costs what the real socket's RTO would, not always 200 ms."""
    waits = {}
    for rto_ms in (30.0, None):  # the channel's lowered floor; a kernel that kept its own
        got = []
        with LossShim(loss=0.5, seed=1) as shim:  # seed 1: the first try is lost, the retransmission not
            t0 = time.monotonic()
            shim.send_frame(SimpleNamespace(rto_min_ms=rto_ms), lambda f: got.append(time.monotonic() - t0), b"x")
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                time.sleep(0.002)
        assert shim.counters.tcp_losses == 1
        waits[rto_ms] = got[0]
    assert 0.03 <= waits[30.0] < 0.15 and 0.2 <= waits[None] < 0.5
