"""A relaxed reply of several rows (a batched pass, a prefill) is cut at row boundaries, and the rows
of the datagrams that arrived are used: only the rows whose datagram was lost are compensated,
each on its own, instead of the whole reply.
"""
from __future__ import annotations

import numpy as np
import pytest
from halo_runtime.core.codec import encode_tensor, row_chunks, rows_of_chunks
from halo_runtime.core.coordinator import Coordinator, Feed, TokenStats
from halo_runtime.core.policy import DeliveryPolicy
from halo_runtime.core.shards import load_shard
from halo_runtime.core.push import PushCoordinator, view_tensors
from halo_runtime.net.exchange import UdpExchange
from halo_runtime.net.push import UdpPush
from halo_runtime.net.wire import HEADER, Kind, Message, Reassembler, encode
from threadworkers import peers, thread_workers


@pytest.mark.parametrize("wire", ["fp32", "fp16", "bf16"])
def test_the_rows_of_the_chunks_that_arrived_come_back_exactly(wire):
    x = np.random.default_rng(0).standard_normal((11, 64)).astype(np.float32)
    msg = Message(Kind.REPLY_MLP_RELAXED, 1, 2, 3, 4, encode_tensor(x, wire))
    datagrams = encode(msg, max_datagram=600)
    sizes = row_chunks(msg.payload, 600 - 33 - 16)
    assert sizes and len(datagrams) == len(sizes) > 2
    r = Reassembler()
    for i, d in enumerate(datagrams):
        if i != 1:  # the second datagram is lost
            assert r.feed(d) is None
    count, chunks = r.chunks_of(1, 2, 3, int(Kind.REPLY_MLP_RELAXED), 4)
    rows, present = rows_of_chunks(chunks, count, 11, 64, wire)
    row = 64 * (4 if wire == "fp32" else 2)
    lost = np.arange(11)[(sizes[0] - 9) // row:(sizes[0] - 9) // row * 2]
    assert not present[lost].any() and present.sum() == 11 - len(lost)
    from halo_runtime.core.codec import decode_tensor
    full = decode_tensor(msg.payload, wire, 64)
    assert np.array_equal(rows[present], full[present]) and not rows[~present].any()
    # other message kinds are cut evenly, as before
    even = encode(Message(Kind.REPLY_MLP_CRITICAL, 1, 2, 3, 4, msg.payload), max_datagram=600)
    assert [len(d) for d in even[:-1]] == [600] * (len(even) - 1)


def test_chunks_that_do_not_fit_the_cut_are_not_used():
    x = np.zeros((4, 8), dtype=np.float32)
    assert rows_of_chunks({0: b"\x00" * 13}, 2, 4, 8, "fp32") is None  # not whole rows
    assert row_chunks(encode_tensor(x[:1], "fp32"), 100) is None          # one row: nothing to cut
    assert row_chunks(encode_tensor(x, "fp32"), 20) is None               # a row does not fit


class DropChunk:
    """A worker's shim that loses datagram `index` of every relaxed reply (or push part: `kind`) of
    several datagrams."""

    def __init__(self, index: int, kind: int = Kind.REPLY_MLP_RELAXED):
        self.index, self.kind, self.dropped = index, kind, 0

    def send_datagram(self, send, data, addr):
        fields = HEADER.unpack_from(data)
        kind, index, count = fields[2], fields[7], fields[8]
        if kind == self.kind and count > 1 and index == self.index:
            self.dropped += 1
            return
        send(data, addr)

    def close(self):
        pass


@pytest.mark.parametrize("rounds", ["star", "push"])
def test_a_batched_pass_compensates_only_the_rows_whose_datagram_was_lost(roomy_plan, rounds):
    """Push rounds too: the lossy device's relaxed part reaches every view without that datagram,
    and every view (the coordinator's counted here) uses the rows that came."""
    plan, directory = roomy_plan
    shards = {d: load_shard(directory, plan, d) for d in plan.device_names}
    # the device that loses datagrams: one holding relaxed groups
    lossy = next(d for d in plan.device_names if d != plan.coordinator
                 and any(g.kind == "mlp" and not g.critical for g in plan.groups if g.device == d))
    shim = DropChunk(index=1, kind=Kind.PART_RLX if rounds == "push" else Kind.REPLY_MLP_RELAXED)
    policy = DeliveryPolicy(wire="fp32", dead_after_s=30)
    with thread_workers(plan, shards, {lossy: shim}, view_source=lambda: view_tensors(shards[plan.coordinator])) \
            as workers:
        ex = (UdpPush if rounds == "push" else UdpExchange)(plan, peers(workers), policy, bind_host="127.0.0.1")
        try:
            # no relaxed part awaited: each is used if it came by its deadline, else compensated
            coord = (PushCoordinator if rounds == "push" else Coordinator)(plan, shards[plan.coordinator], ex,
                                                                           await_predicted=False)
            coord.reset(7)
            feeds = [Feed(s, 0, tuple(range(10 + 4 * s, 14 + 4 * s))) for s in range(3)]  # 12 rows, 5 a datagram
            stats = [TokenStats() for _ in feeds]
            coord.run(feeds, 0, stats)
        finally:
            ex.close()
    assert shim.dropped
    relaxed_layers = sum(any(not g.critical for g in plan.groups_on(lossy, i, "mlp"))
                         for i in range(plan.model.num_layers))
    # datagram 1 held rows 5-9: feed 0 (rows 0-3) lost nothing, feed 1 (4-7) three rows, feed 2 (8-11) two
    assert [s.missing_rows for s in stats] == [0, 3 * relaxed_layers, 2 * relaxed_layers]
    assert stats[0].missing == {} and stats[1].missing == {lossy: relaxed_layers}
