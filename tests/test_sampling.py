"""Sampling (temperature, top-k, top-p, seed, penalties), stop strings and incremental decoding,
and `Coordinator.generate` with a sampler and a stop check; greedy stays the default."""
from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import torch
from halo_runtime.core.sampling import Sampler, SamplingParams, penalize, restrict
from halo_runtime.core.textstream import TextStream
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize("name", ["halo_runtime.core.sampling", "halo_runtime.core.textstream",
                                  "halo_runtime.core.chat"])
def test_module_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted and not result.failed


# ---- sampling -------------------------------------------------------------------------------------

def test_greedy_is_the_default_and_is_argmax():
    gen = np.random.default_rng(0)
    sampler = Sampler(SamplingParams())
    assert SamplingParams().greedy
    for _ in range(20):
        logits = gen.standard_normal(100).astype(np.float32)
        assert sampler(logits, [1, 2, 3]) == int(np.argmax(logits))


def test_a_seed_repeats_its_draws_and_another_seed_does_not():
    logits = np.zeros(1000, np.float32)  # flat: every draw is a fresh choice among 1000
    draw = lambda seed: _run(Sampler(SamplingParams(temperature=1.0, seed=seed)), logits, 30)  # noqa: E731
    assert draw(5) == draw(5)
    assert draw(5) != draw(6)
    unseeded = [_run(Sampler(SamplingParams(temperature=1.0)), logits, 30) for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def _run(sampler, logits, n):
    return [sampler(logits, []) for _ in range(n)]


def test_draws_follow_the_softmax_at_temperature():
    logits = np.array([2.0, 1.0, 0.0, -1.0], np.float32)
    for temperature in (0.5, 1.0, 2.0):
        sampler = Sampler(SamplingParams(temperature=temperature, seed=11))
        counts = np.bincount(_run(sampler, logits, 4000), minlength=4) / 4000
        expected = torch.softmax(torch.from_numpy(logits) / temperature, 0).numpy()
        assert np.allclose(counts, expected, atol=0.03), (temperature, counts, expected)


def test_top_k_and_top_p_keep_what_transformers_keeps():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    gen = np.random.default_rng(1)
    for _ in range(20):
        logits = (gen.standard_normal(50) * 3).astype(np.float32)
        t = torch.from_numpy(logits)
        for k in (1, 5, 49):
            ours = np.isfinite(restrict(logits, k, 1.0))
            theirs = torch.isfinite(TopKLogitsWarper(k)(None, t[None].clone())[0]).numpy()
            assert np.array_equal(ours, theirs) and int(ours.sum()) == k
        for p in (0.05, 0.5, 0.9, 0.999):
            ours = np.isfinite(restrict(logits, 0, p))
            theirs = torch.isfinite(TopPLogitsWarper(p)(None, t[None].clone())[0]).numpy()
            assert np.array_equal(ours, theirs), p


def test_top_k_one_samples_greedily():
    gen = np.random.default_rng(2)
    sampler = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=3))
    for _ in range(20):
        logits = gen.standard_normal(64).astype(np.float32)
        assert sampler(logits, []) == int(np.argmax(logits))


def test_repetition_penalty_is_transformers_and_openai_penalties_count_generated_tokens():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = np.array([1.0, -1.0, 2.0, -2.0, 0.5], np.float32)
    seen = [0, 1, 1, 4]
    ours = penalize(logits, seen, [], SamplingParams(repetition_penalty=1.3))
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), torch.from_numpy(logits)[None].clone())[0]
    assert np.allclose(ours, theirs.numpy())
    # prompt [0, 1], generated [1, 1, 4]: frequency counts 1 twice, presence once each
    out = penalize(logits, [0, 1, 1, 1, 4], [1, 1, 4], SamplingParams(frequency_penalty=0.5, presence_penalty=0.25))
    assert np.allclose(out, logits - np.array([0.0, 1.25, 0.0, 0.0, 0.75]))
    # the sampler passes the generated part: prompt_tokens splits the history
    s = Sampler(SamplingParams(frequency_penalty=2.0), prompt_tokens=2)
    assert s(np.array([1.0, 0.9, 0.0], np.float32), [0, 0]) == 0          # the prompt's 0 is not penalised
    assert s(np.array([1.0, 0.9, 0.0], np.float32), [0, 0, 0]) == 1       # a generated 0 is


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_p": 0}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"), ({"seed": -1}, "seed"), ({"seed": True}, "seed"),
])
def test_bad_sampling_parameters_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


# ---- text stream ----------------------------------------------------------------------------------

def _bytes_decoder(pieces: dict[int, bytes]):
    return lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_a_character_split_across_tokens_is_held_until_complete():
    e_acute, emoji = "é".encode(), "😀".encode()
    s = TextStream(_bytes_decoder({1: b"caf", 2: e_acute[:1], 3: e_acute[1:] + b"!", 4: emoji[:1], 5: emoji[1:3],
                                   6: emoji[3:]}))
    assert [s.push(t) for t in (1, 2, 3, 4, 5, 6)] == ["caf", "", "é!", "", "", "😀"]
    assert s.flush() == "" and s.text == "café!😀"


def test_invalid_bytes_come_out_as_replacement_characters_not_stuck():
    s = TextStream(_bytes_decoder({1: b"\x80", 2: b"\xff", 3: b"a", 4: b"\xe2\x82"}))
    assert [s.push(t) for t in (1, 2, 3, 4)] == ["", "\ufffd", "\ufffda", ""]
    assert s.flush() == "\ufffd" and s.text == "\ufffd\ufffda\ufffd"


def test_stop_strings_across_tokens_and_the_earliest_wins():
    pieces = {1: b"a", 2: b"bc", 3: b"de", 4: b"f"}
    s = TextStream(_bytes_decoder(pieces), stop=["def", "cd"])
    assert [s.push(t) for t in (1, 2, 3)] == ["a", "b", ""]
    assert s.stopped and s.text == "ab"
    assert s.push(4) == "" and s.flush() == ""
    # a held-back prefix that does not become a stop string comes out later
    s = TextStream(_bytes_decoder(pieces), stop=["cx"])
    assert [s.push(t) for t in (1, 2, 3)] == ["a", "b", "cde"] and not s.stopped


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab\n:é€", max_size=16), st.lists(st.integers(0, 40), max_size=8),
       st.lists(st.text(alphabet="ab\n:é", min_size=1, max_size=3), max_size=3))
def test_streamed_text_is_never_taken_back(full, cuts, stops):
    """Tokens cut the UTF-8 bytes anywhere (inside characters too); what was emitted is never revised."""
    data = full.encode()
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    table = {i: data[a:b] for i, (a, b) in enumerate(zip(bounds, bounds[1:]))}
    stream = TextStream(_bytes_decoder(table), stop=stops)
    emitted = ""
    for i in range(len(table)):
        emitted += stream.push(i)
        assert stream.text == emitted and full.startswith(emitted)
    emitted += stream.flush()
    # the reply ends at the first token whose text holds a stop string, before the earliest one in
    # it: a longer stop that starts sooner but would complete later never completes (full=':a:',
    # tokens ':a' + ':', stops 'a' and ':a:' -> ':')
    decode, cut, stopped = _bytes_decoder(table), len(full), False
    for i in range(len(table)):
        seen = decode(list(range(i + 1)))
        found = [seen.find(s) for s in stops if s in seen]
        if found:
            cut, stopped = min(found), True
            break
    assert emitted == full[:cut] == stream.text
    assert stream.stopped == stopped


# ---- the coordinator's loop -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def coordinator(plan_dir):
    from halo_runtime.core.coordinator import Coordinator
    from halo_runtime.core.exchange import InProcessExchange
    from halo_runtime.core.plan import load_plan
    from halo_runtime.core.shards import load_shard

    plan = load_plan(plan_dir)
    shards = {d: load_shard(plan_dir, plan, d) for d in plan.device_names}
    ex = InProcessExchange(plan, {d: s for d, s in shards.items() if d != plan.coordinator})
    return Coordinator(plan, shards[plan.coordinator], ex)  # one ggml thread: tiny matrices


PROMPT = [1, 17, 300, 40, 12]


def test_generate_is_greedy_unless_given_a_sampler(coordinator):
    greedy = coordinator.generate(PROMPT, 12, keep_logits=True)
    assert greedy.tokens == [int(np.argmax(x)) for x in greedy.logits]
    assert coordinator.generate(PROMPT, 12, choose=Sampler(SamplingParams())).tokens == greedy.tokens
    sampled = [coordinator.generate(PROMPT, 12, choose=Sampler(SamplingParams(temperature=1.0, seed=9),
                                                                len(PROMPT))).tokens for _ in range(2)]
    assert sampled[0] == sampled[1] != greedy.tokens


def test_generate_sees_the_whole_history_and_stops_when_told(coordinator):
    seen = []

    def choose(logits, tokens):
        seen.append(list(tokens))
        return int(np.argmax(logits))

    calls = []
    gen = coordinator.generate(PROMPT, 10, choose=choose, stop=lambda: calls.append(1) or len(calls) > 4)
    assert len(gen.tokens) == 4
    assert seen[0] == PROMPT and seen[3] == PROMPT + gen.tokens[:3]
