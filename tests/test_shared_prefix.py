"""A session whose prompt starts like another's (every chat's system prompt) copies that session's
KV rows instead of computing them (issue 24): a span names its source slot, every device copies
the rows before it attends, and the logits are the ones a cold session gets, bit for bit, in
process and over the network.
"""
from __future__ import annotations

import numpy as np
import pytest
from halo_runtime.core.coordinator import Coordinator, Feed, TokenStats
from halo_runtime.core.device import DeviceCompute
from halo_runtime.core.exchange import InProcessExchange
from halo_runtime.core.policy import DeliveryPolicy
from halo_runtime.core.spans import Span
from halo_runtime.net.exchange import UdpExchange
from halo_runtime.net.recovery import History
from halo_runtime.net.tcpexchange import TcpExchange
from test_batch import AwaitAll, roomy, thread_workers  # noqa: F401 (fixtures)

FIRST = [1, 17, 300, 400, 12, 99, 7, 8]
SECOND = FIRST[:5] + [33, 44, 55]
SHARED = 5
TOKENS = 6


def attention_holder(plan):
    dev = next(d for d in plan.device_names if any(g.device == d and g.kind == "attn" for g in plan.groups))
    return dev, next(g.layer for g in plan.groups if g.device == dev and g.kind == "attn")


def test_a_slot_that_takes_anothers_prefix_attends_as_if_it_had_computed_it(roomy):  # noqa: F811
    plan, shards = roomy
    dev, layer = attention_holder(plan)
    x = np.random.default_rng(0).standard_normal((8, plan.model.hidden_size)).astype(np.float32)
    other = np.random.default_rng(1).standard_normal((3, plan.model.hidden_size)).astype(np.float32)
    copied = DeviceCompute(plan, dev, shards[dev])
    copied.attention(layer, x[:6], 0, slot=2)
    both = copied.attention_spans(layer, np.concatenate([x[6:8], other]), (Span(2, 6, 2), Span(5, 4, 3, source=2)))
    cold = DeviceCompute(plan, dev, shards[dev])
    assert np.array_equal(both[2:], cold.attention(layer, np.concatenate([x[:4], other]), 0)[4:])
    assert copied.cache_length(layer, 5) == 7 and copied.cache_length(layer, 2) == 8
    with pytest.raises(ValueError, match="slot 3 takes 9 rows of slot 2, which holds 8"):
        copied.attention_spans(layer, other[:1], (Span(3, 9, 1, source=2),))


def test_history_copies_a_source_slots_rows_for_a_rejoin():
    h = History(layers=1, width=2, wire="fp32")
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    h.append(0, x[:4], (Span(0, 0, 4),))
    h.append(0, x[4:6], (Span(0, 4, 1), Span(1, 3, 1, source=0)))
    assert np.array_equal(h.inputs(0, slot=1), x[[0, 1, 2, 5]])
    assert np.array_equal(h.inputs(0, slot=0), x[[0, 1, 2, 3, 4]])


def greedy_sharing(coord: Coordinator) -> list[tuple[list[int], list[np.ndarray]]]:
    """FIRST in slot 0; from the second pass SECOND in slot 4, taking slot 0's first SHARED rows;
    greedy TOKENS each: per prompt (tokens, logits of each)."""
    coord.reset(11)
    out = {0: ([], []), 4: ([], [])}
    feeds = [Feed(0, 0, tuple(FIRST))]
    while any(len(t) < TOKENS for t, _ in out.values()):
        coord.step += 1
        logits = coord.run(feeds, coord.step - 1, [TokenStats() for _ in feeds])
        nxt = []
        for f, lg in zip(feeds, logits):
            tokens, kept = out[f.slot]
            tokens.append(int(np.argmax(lg[-1])))
            kept.append(lg[-1].copy())
            if len(tokens) < TOKENS:
                nxt.append(Feed(f.slot, f.start + len(f.tokens), (tokens[-1],)))
        if len(feeds) == 1 and feeds[0].slot == 0 and not out[4][0]:
            nxt.append(Feed(4, SHARED, tuple(SECOND[SHARED:]), 1, source=0))
        feeds = nxt
    assert coord.fed[4][:SHARED] == FIRST[:SHARED]
    return [out[0], out[4]]


@pytest.mark.parametrize("sync", ["in-process", "strict", "relaxed"])
def test_a_session_that_copies_a_prefix_gets_the_cold_logits(roomy, thread_workers, sync):  # noqa: F811
    plan, shards = roomy
    peers, _ = thread_workers
    exchanges = []

    def make():
        if sync == "in-process":
            return Coordinator(plan, shards[plan.coordinator], InProcessExchange(plan, shards))
        policy = DeliveryPolicy(wire="fp32", dead_after_s=30)
        ex = TcpExchange(plan, peers, policy) if sync == "strict" else UdpExchange(plan, peers, policy,
                                                                                    bind_host="127.0.0.1")
        exchanges.append(ex)
        return AwaitAll(plan, shards[plan.coordinator], ex)

    try:
        shared = greedy_sharing(make())
        cold = [make().generate(p, TOKENS, session=200 + i, keep_logits=True) for i, p in enumerate((FIRST, SECOND))]
    finally:
        for ex in exchanges:
            ex.close()
    for (tokens, logits), ref in zip(shared, cold):
        assert tokens == ref.tokens
        assert all(np.array_equal(a, b) for a, b in zip(logits, ref.logits))
