"""A message of several datagrams to or from a lossy device goes at least twice
(`DeliveryPolicy.copies`): a prefill's requests and replies; a one-datagram decode row goes as
often as the plan chose for the link (`DeviceReport.copies`), or `--redundancy` says; nothing to
or from a clean device is copied. Counted on the wire of a real UDP exchange with loopback workers.
"""
from __future__ import annotations

import threading
from collections import Counter

import pytest
from halo_runtime.core.codec import datagrams, tensor_bytes
from halo_runtime.core.coordinator import Coordinator, Feed, TokenStats
from halo_runtime.core.policy import DeliveryPolicy
from halo_runtime.net.exchange import UdpExchange
from halo_runtime.net.wire import HEADER, Kind, attempt_of
from threadworkers import peers, thread_workers

REQUESTS = {Kind.REQUEST_ATTN, Kind.REQUEST_MLP}
REPLIES = {Kind.REPLY_ATTN, Kind.REPLY_MLP_CRITICAL, Kind.REPLY_MLP_RELAXED}


class CountingShim:
    """Counts first-attempt datagrams by (destination port, kind, step, layer, chunk index, count)."""

    def __init__(self):
        self.sent, self.lock = Counter(), threading.Lock()

    def send_datagram(self, send, data, addr):
        f = HEADER.unpack_from(data)
        if attempt_of(f[10]) == 0:
            with self.lock:
                self.sent[(addr[1], Kind(f[2]), f[4], f[5], f[7], f[8])] += 1
        send(data, addr)

    def close(self):
        pass


@pytest.mark.parametrize("redundancy", [None, 1, 3])
def test_copies_to_and_from_a_lossy_device(tiny_plan, tiny_shards, redundancy):
    plan, _ = tiny_plan
    lossy = next(d.name for d in plan.devices if d.loss > 0)
    assert plan.link_copies(lossy) == 2  # 5% loss: the compiler chose two copies for the link
    one = redundancy or plan.link_copies(lossy)
    policy = DeliveryPolicy(wire="fp32", dead_after_s=30, redundancy=redundancy)
    rows = next(n for n in range(2, 200) if datagrams(tensor_bytes(n, plan.model.hidden_size, "fp32")) > 1)
    out, back = CountingShim(), {d: CountingShim() for d in plan.device_names if d != plan.coordinator}
    with thread_workers(plan, tiny_shards, back) as workers:
        ex = UdpExchange(plan, peers(workers), policy, bind_host="127.0.0.1", shim=out)
        try:
            coord = Coordinator(plan, tiny_shards[plan.coordinator], ex)
            coord.reset(3)
            coord.run([Feed(0, 0, tuple(range(10, 10 + rows)))], 0, [TokenStats()])  # a prefill: several datagrams
            coord.run([Feed(0, rows, (42,))], 1, [TokenStats()])                       # a decode row: one
            port = {ex.endpoint.address[1]: plan.coordinator} | {w.address[1]: d for d, w in workers.items()}
        finally:
            ex.close()
    # (device, step, chunk count) -> copies of each of its datagrams, per layer and chunk
    requests = [((port[k[0]], k[2], k[5]), n) for k, n in out.sent.items() if k[1] in REQUESTS]
    replies = [((d, k[2], k[5]), n) for d, shim in back.items() for k, n in shim.sent.items() if k[1] in REPLIES]
    assert requests and replies
    for (d, step, count), n in requests + replies:
        assert n == (max(one, 2 if count > 1 else 1) if d == lossy else 1), (d, step, count, n)
    # both kinds happened on the lossy link, each way: a prefill and a decode row
    for sent in (requests, replies):
        assert {(step, count > 1) for (d, step, count), _ in sent if d == lossy} == {(0, True), (1, False)}
