"""Several sessions share passes (issue 24, items 1, 2 and 4): a device holds one KV cache per
session slot, a request carries its rows' slots and positions, and no request's output depends on
what else is in its pass: every reply equals the one it gets alone, to the last bit of every logit
in process and over the network, and through `halo-run serve` with the openai client.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
from halo_runtime.core.codec import WireError, decode_request, encode_request
from halo_runtime.core.coordinator import Coordinator, Feed, TokenStats
from halo_runtime.core.device import DeviceCompute
from halo_runtime.core.exchange import InProcessExchange
from halo_runtime.core.policy import DeliveryPolicy
from halo_runtime.core.shards import load_shard
from halo_runtime.core.spans import MAX_SLOTS, BatchOptions, Span
from halo_runtime.net.exchange import UdpExchange
from halo_runtime.net.recovery import History
from halo_runtime.net.tcpexchange import TcpExchange
from halo_runtime.net.worker import Worker
import threadworkers

PROMPTS = [[1, 17, 300, 400, 12, 99, 7, 8, 9, 10, 11], [5, 6], [250, 251, 252, 253, 254, 3], [42]]
JOIN = [0, 0, 3, 5]
"""The pass at which each prompt joins the batch (continuous batching: the others are decoding)."""
TOKENS = 8


class AwaitAll(Coordinator):
    """Awaits every relaxed part: over UDP the output then depends only on what arrives, not on timing."""

    def _awaited(self, layer, x):
        return {d: np.ones(x.shape[0], dtype=bool) for d in self.relaxed[layer]}


def batched_greedy(coord: Coordinator, prompts, tokens: int, chunk: int = 4, join=JOIN, after_pass=None):
    """Greedy generation of every prompt in shared passes (a prompt fed `chunk` tokens a pass, joining
    at pass join[i]; after_pass(n) runs after pass n); per prompt (tokens, logits of each)."""
    coord.reset(11)
    pending = [list(p) for p in prompts]
    out = [([], []) for _ in prompts]
    rows_seen, passes = [], 0
    while any(len(t) < tokens for t, _ in out):
        live = [i for i in range(len(prompts)) if join[i] <= passes and len(out[i][0]) < tokens]
        feeds = []
        for i in live:
            start = len(coord.fed[i])
            last = len(pending[i]) <= chunk
            feeds.append(Feed(i, start, tuple(pending[i][:chunk]), 1 if last else 0))
        rows_seen.append(sum(len(f.tokens) for f in feeds))
        coord.step += 1
        logits = coord.run(feeds, coord.step - 1, [TokenStats() for _ in feeds])
        passes += 1
        if after_pass is not None:
            after_pass(passes)
        for i, f, lg in zip(live, feeds, logits):
            pending[i] = pending[i][len(f.tokens):]
            if lg is not None:
                token = int(np.argmax(lg[-1]))
                out[i][0].append(token)
                out[i][1].append(lg[-1].copy())
                pending[i] = [token]
    assert max(rows_seen) > 4, rows_seen  # several sessions did share passes
    return out


def alone(make, prompt, tokens: int = TOKENS):
    # a session of its own: a worker keeps its state across coordinators of the same session
    return make().generate(prompt, tokens, session=100 + PROMPTS.index(prompt), keep_logits=True)


def assert_same(batched, lone) -> None:
    for (tokens, logits), ref in zip(batched, lone):
        assert tokens == ref.tokens
        for a, b in zip(logits, ref.logits):
            assert np.array_equal(a, b)


@pytest.fixture(scope="module")
def roomy(roomy_plan):
    """(plan, shards) of the tiny model on devices with room for every session slot."""
    plan, directory = roomy_plan
    assert plan.session_slots() == MAX_SLOTS
    return plan, {d: load_shard(directory, plan, d) for d in plan.device_names}


def test_sessions_sharing_passes_get_the_lone_logits_bit_for_bit_in_process(roomy):
    plan, shards = roomy

    def make():
        return Coordinator(plan, shards[plan.coordinator], InProcessExchange(plan, shards))

    assert_same(batched_greedy(make(), PROMPTS, TOKENS), [alone(make, p) for p in PROMPTS])


@pytest.fixture(scope="module")
def thread_workers(roomy):
    """Every remote device as a `Worker` on loopback, in threads of this process."""
    plan, shards = roomy
    with threadworkers.thread_workers(plan, shards) as workers:
        yield threadworkers.peers(workers), workers


def restart(worker: Worker) -> None:
    """What a worker process that restarted looks like to the coordinator: no session, empty caches."""
    with worker.lock:
        worker.session = None
        worker.compute.reset()
        worker.replies.clear()


@pytest.mark.parametrize("sync,restarts", [("strict", False), ("relaxed", False), ("relaxed", True)],
                         ids=["strict", "relaxed", "relaxed-rejoin"])
def test_sessions_sharing_passes_get_the_lone_logits_over_the_network(roomy, thread_workers, sync, restarts):
    """relaxed-rejoin: a device holding attention restarts mid-batch; the coordinator rebuilds every
    session slot's KV cache on it from what it sent (`History`), and no token changes."""
    plan, shards = roomy
    peers, workers = thread_workers
    policy = DeliveryPolicy(wire="fp32", dead_after_s=30)
    exchanges = []
    holder = next(d for d in peers if any(g.device == d and g.kind == "attn" for g in plan.groups))

    def make():
        ex = (TcpExchange(plan, peers, policy) if sync == "strict" else
              UdpExchange(plan, peers, policy, bind_host="127.0.0.1"))
        exchanges.append(ex)
        return AwaitAll(plan, shards[plan.coordinator], ex)

    try:
        lone = [alone(make, p) for p in PROMPTS]
        coord = make()
        batched = batched_greedy(coord, PROMPTS, TOKENS,
                                 after_pass=(lambda n: n == 7 and restart(workers[holder])) if restarts else None)
        if restarts:
            assert coord.exchange.counters["rejoins"] == 1
            assert workers[holder].stats().rebuilt_tokens > sum(map(len, PROMPTS))
    finally:
        for ex in exchanges:
            ex.close()
    assert_same(batched, lone)


def test_a_slots_cache_is_its_own(roomy):
    """Rows in slot 1 never change what slot 0 attends to, and give what a fresh device gives."""
    plan, tiny_shards = roomy
    dev = next(d for d in plan.device_names if any(g.device == d and g.kind == "attn" for g in plan.groups))
    layer = next(g.layer for g in plan.groups if g.device == dev and g.kind == "attn")
    x = np.random.default_rng(0).standard_normal((6, plan.model.hidden_size)).astype(np.float32)
    mixed, ref = DeviceCompute(plan, dev, tiny_shards[dev]), DeviceCompute(plan, dev, tiny_shards[dev])
    both = mixed.attention_spans(layer, np.concatenate([x[:4], x[2:6]]), (Span(0, 0, 4), Span(1, 0, 4)))
    assert np.array_equal(both[:4], ref.attention(layer, x[:4], 0))
    assert np.array_equal(both[4:], DeviceCompute(plan, dev, tiny_shards[dev]).attention(layer, x[2:6], 0))
    assert mixed.cache_length(layer, 0) == mixed.cache_length(layer, 1) == 4
    assert np.array_equal(mixed.attention(layer, x[4:5], 4, slot=0), ref.attention(layer, x[4:5], 4))
    with pytest.raises(ValueError, match="slot"):
        mixed.attention(layer, x[:1], 0, slot=mixed.slots)


def test_a_request_carries_its_spans_and_a_bad_one_is_refused():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    spans = (Span(2, 7, 1), Span(0, 3, 2, source=5))
    got, copies, wire, y = decode_request(encode_request(x, spans, "fp32", 2), width=4)
    assert got == spans and copies == 2 and wire == "fp32" and np.array_equal(x, y)
    assert decode_request(encode_request(x, 5, "fp32"), 4)[0] == (Span(0, 5, 3),)
    with pytest.raises(ValueError, match="spans hold 2 rows"):
        encode_request(x, (Span(0, 0, 2),), "fp32")
    bad = bytearray(encode_request(x, spans, "fp32"))
    bad[1] = 1  # says one span: the tensor's rows disagree
    with pytest.raises(WireError):
        decode_request(bytes(bad), 4)


def test_history_keeps_each_slot_for_a_rejoin():
    h = History(layers=1, width=2, wire="fp32")
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    h.append(0, x[:3], (Span(0, 0, 2), Span(3, 0, 1)))
    h.append(0, x[3:], (Span(3, 1, 1), Span(0, 1, 1)))  # slot 0 rewinds past a rejected row
    assert h.slots() == [0, 3]
    assert np.array_equal(h.inputs(0, slot=0), x[[0, 4]]) and np.array_equal(h.inputs(0, slot=3), x[[2, 3]])
    assert np.array_equal(h.inputs(0, drop_last=True, slot=3), x[[2]])
    assert h.inputs(0, slot=5).shape == (0, 2)


def test_session_slots_come_from_the_memory_budget(roomy, tiny_plan):
    import dataclasses

    assert tiny_plan[0].session_slots() == 1  # its remote devices hold one KV cache and no more
    plan, _ = roomy
    rep = next(r for r in plan.device_reports if r.kv_cache_bytes)
    tight = dataclasses.replace(plan, devices=tuple(
        dataclasses.replace(d, memory_bytes=rep.weight_bytes + 3 * rep.kv_cache_bytes) if d.name == rep.name else d
        for d in plan.devices))
    assert plan.session_slots() == MAX_SLOTS and tight.session_slots(rep.name) == 3 == tight.session_slots()
    with pytest.raises(ValueError, match="--slots"):
        BatchOptions(slots=MAX_SLOTS + 1)


# ---- through `halo-run serve` -------------------------------------------------------------------

ASK = {"max_tokens": 16, "extra_body": {"ignore_eos": True}}
QUESTIONS = ["Tell me about the sea.", "Why is the sky blue?", "Count to ten.", "Name a fruit.",
             "What is a board?", "Say hi.", "Describe a cat.", "What is rain?"]


def _at_once(fn, items):
    """fn(item) for every item in threads started together; results in order."""
    out, barrier = [None] * len(items), threading.Barrier(len(items))

    def go(i):
        barrier.wait()
        out[i] = fn(items[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


def _samples(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    _, page = server.get("/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(page) for s in family.samples}


@pytest.mark.parametrize(("slots", "rounds"), [("0", "star"), ("3", "star"), ("0", "push")])
def test_eight_clients_at_once_get_their_lone_replies(roomy_plan, tmp_path, slots, rounds):
    """Greedy and seeded sampling: each client's reply is the one it gets alone; with 3 slots the
    others wait their turn (never refused) and no pass holds more than 3 requests. Every request
    at once starts from cached rows of the system prompt: its slot's own, or copied from another's.
    Push rounds too: every device adds the parts of every session's rows on its own view."""
    pytest.importorskip("openai")
    pytest.importorskip("starlette")
    from live_server import Server, plan_with_template

    chat = plan_with_template(roomy_plan[1], tmp_path / "chat")
    with Server(chat, "--sync", "strict", "--slots", slots, "--prefill-chunk", "8", "--rounds", rounds) as server:
        def ask(item):
            question, sampling = item
            reply = server.client.chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": question}], **ASK, **sampling)
            return reply.choices[0].message.content, reply.usage.prompt_tokens_details.cached_tokens

        items = [(q, {"temperature": 0} if i % 2 else {"temperature": 0.9, "seed": i}) for i, q in enumerate(QUESTIONS)]
        lone = [ask(item)[0] for item in items]
        together = _at_once(ask, items)
        assert [text for text, _ in together] == lone
        assert all(cached > 0 for _, cached in together), together
        samples = _samples(server)
        passes = samples[("halo_batch_sessions_count", ())]
        shared = passes - samples[("halo_batch_sessions_bucket", (("le", "1.0"),))]
        assert shared > 0, samples  # requests did share passes
        if slots == "3":
            assert samples[("halo_batch_sessions_bucket", (("le", "3.0"),))] == passes
        assert samples[("halo_requests_total", (("outcome", "completed"),))] == 2 * len(items)
        assert samples[("halo_slots_active", ())] == 0 and samples[("halo_requests_queued", ())] == 0


def test_a_client_that_leaves_mid_stream_frees_its_slot(roomy_plan, tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("starlette")
    from live_server import Server, plan_with_template

    chat = plan_with_template(roomy_plan[1], tmp_path / "chat")
    with Server(chat, "--sync", "strict", "--slots", "2", "--delay-ms", "1") as server:
        msgs = [{"role": "user", "content": "Tell me a long story."}]
        ref = server.client.chat.completions.create(model=server.model, messages=msgs, temperature=0, **ASK)
        stream = server.client.chat.completions.create(model=server.model, messages=msgs, stream=True,
                                                       max_tokens=200, extra_body={"ignore_eos": True})
        next(iter(stream))
        stream.close()  # gone after the first piece
        other = server.client.chat.completions.create(model=server.model, messages=msgs, temperature=0, **ASK)
        assert other.choices[0].message.content == ref.choices[0].message.content
        for _ in range(100):
            samples = _samples(server)
            if samples[("halo_slots_active", ())] == 0:
                break
            threading.Event().wait(0.05)
        assert samples[("halo_slots_active", ())] == 0
        assert samples[("halo_requests_total", (("outcome", "cancelled"),))] == 1


@pytest.mark.parametrize("rounds", ["star", "push"])
def test_requests_sharing_passes_complete_across_a_failover(roomy_plan, tmp_path, rounds):
    """A critical device dies while three streamed replies share passes: the plan's failover takes
    its groups, every request feeds its tokens again, and each reply is the one it got before."""
    pytest.importorskip("openai")
    pytest.importorskip("starlette")
    from live_server import Server, plan_with_template
    from test_failover import victim

    dead = victim(roomy_plan[0])
    chat = plan_with_template(roomy_plan[1], tmp_path / "chat")
    with Server(chat, "--sync", "strict", "--delay-ms", "1", "--rounds", rounds) as server:
        def ask(question, kill_at=None):
            msgs = [{"role": "user", "content": question}]
            text = []
            for chunk in server.client.chat.completions.create(model=server.model, messages=msgs, stream=True,
                                                               temperature=0, **ASK):
                if chunk.choices and chunk.choices[0].delta.content:
                    text.append(chunk.choices[0].delta.content)
                    if len(text) == kill_at:
                        server.kill_worker(dead)
            return "".join(text)

        before = [ask(q) for q in QUESTIONS[:3]]
        assert _at_once(lambda i: ask(QUESTIONS[i], 4 if i == 0 else None), [0, 1, 2]) == before
        samples = _samples(server)
        assert samples[("halo_failovers_total", (("device", dead),))] == 1
        assert samples[("halo_requests_total", (("outcome", "failed"),))] == 0
        assert samples[("halo_batch_sessions_bucket", (("le", "1.0"),))] < samples[("halo_batch_sessions_count", ())]
