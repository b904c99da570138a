"""Exact multi-token verification (core.draft): drafts change how many passes a reply takes, never
its tokens; rejected guesses never reach a later token; sampling keeps its distribution.

Uses the tiny compiled plan in process and over UDP (`halo-run local`), and tiny draft checkpoints.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from halo_runtime.core.coordinator import Coordinator
from halo_runtime.core.draft import (
    CheckpointDraft,
    DraftOptions,
    LookupDraft,
    SelfDraft,
    lookup_draft,
    prepare_draft,
    verify,
)
from halo_runtime.core.exchange import InProcessExchange
from halo_runtime.core.plan import PlanError
from halo_runtime.core.sampling import Sampler, SamplingParams
from halo_runtime.core.shards import load_shard

PROMPT_IDS = [5, 17, 300, 42, 500, 77]


@pytest.fixture(scope="module")
def shards(tiny_plan):
    plan, directory = tiny_plan
    return {d: load_shard(directory, plan, d) for d in plan.device_names}


def coordinator(tiny_plan, shards) -> Coordinator:
    plan, _ = tiny_plan
    return Coordinator(plan, shards[plan.coordinator], InProcessExchange(plan, shards))


class RandomDraft:
    """Guesses at random: nearly every guess is rejected, so every pass rewinds."""

    name = "random"

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab, self.gen = vocab, np.random.default_rng(seed)

    def propose(self, tokens, k):
        return self.gen.integers(self.vocab, size=k).tolist()


def test_lookup_drafts_the_latest_match_and_continues_loops():
    assert lookup_draft([1, 2, 3, 9, 1, 2, 4, 8, 1, 2], 2) == [4, 8]   # latest "1 2"
    assert lookup_draft([5, 6, 5, 6, 5], 5) == [6, 5, 6, 5, 6]        # runs on from its own guesses
    assert lookup_draft([1, 2, 3], 4) == [] and lookup_draft([], 3) == [] and lookup_draft([4], 3) == []
    assert lookup_draft([7, 1, 2, 9, 3, 7], 4) == [1]                 # a 1-token match drafts one token only


def test_greedy_tokens_identical_whatever_the_draft(tiny_plan, shards, tiny_vocab_dir):
    plan, directory = tiny_plan
    base = coordinator(tiny_plan, shards).generate(PROMPT_IDS, 40, keep_logits=True)
    for make in (lambda c: LookupDraft(), SelfDraft, lambda c: CheckpointDraft(tiny_vocab_dir, plan, directory),
                 lambda c: RandomDraft(plan.model.vocab_size)):
        for k in (1, 3, 8):
            coord = coordinator(tiny_plan, shards)
            gen = coord.generate(PROMPT_IDS, 40, keep_logits=True, draft=make(coord), draft_tokens=k)
            assert gen.tokens == base.tokens, (make, k)
            assert len(gen.token_stats) == len(gen.tokens) == len(gen.logits)
            for ours, ref in zip(gen.logits, base.logits):   # a verification pass's rows are decoding's bits
                assert np.array_equal(ours, ref)
            assert gen.drafted > 0 and gen.passes < len(gen.tokens) + gen.drafted


def test_the_model_as_its_own_draft_is_always_accepted(tiny_plan, shards, tiny_vocab_dir):
    plan, directory = tiny_plan
    coord = coordinator(tiny_plan, shards)
    gen = coord.generate(PROMPT_IDS, 25, draft=CheckpointDraft(tiny_vocab_dir, plan, directory), draft_tokens=4)
    assert gen.acceptance == 1.0 and gen.passes == 1 + 24 // 5 + 1 and gen.tokens_per_pass > 4
    # time per generated token: a pass's time is shared by its tokens
    assert [s.pass_tokens for s in gen.token_stats] == [1] + [5] * 20 + [4] * 4


def test_rejected_positions_never_leak(tiny_plan, shards):
    """Random guesses are written to every device's KV cache and rejected; what follows must not
    see them: the tokens and logits are those of plain decoding, and every cache ends where the
    accepted tokens end."""
    plan, _ = tiny_plan
    base = coordinator(tiny_plan, shards).generate(PROMPT_IDS, 30, keep_logits=True)
    coord = coordinator(tiny_plan, shards)
    gen = coord.generate(PROMPT_IDS, 30, keep_logits=True, draft=RandomDraft(plan.model.vocab_size), draft_tokens=8)
    assert gen.tokens == base.tokens and gen.acceptance < 0.2
    for ours, ref in zip(gen.logits, base.logits):
        assert np.allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    # one more pass feeds the last token at the right position, wherever the caches stood
    assert coord.position == len(PROMPT_IDS) + len(gen.tokens) - 1
    devices = [coord.local, *coord.exchange.devices.values()]
    lengths = {d.cache_length(i) for d in devices for i in range(plan.model.num_layers) if d.has_attention(i)}
    assert max(lengths) >= coord.position  # the last pass wrote past it (rejected rows); the next truncates


def test_lookup_pays_on_text_that_repeats(tiny_plan, shards):
    """The tiny random model's greedy continuation, fed back after the prompt: the model says it again."""
    first = coordinator(tiny_plan, shards).generate(PROMPT_IDS, 24).tokens
    prompt = PROMPT_IDS + first + PROMPT_IDS
    base = coordinator(tiny_plan, shards).generate(prompt, 24)
    gen = coordinator(tiny_plan, shards).generate(prompt, 24, draft=LookupDraft(), draft_tokens=4)
    assert gen.tokens == base.tokens
    assert gen.tokens_per_pass > 1.5, gen.tokens_per_pass


def test_eos_and_max_tokens_cut_exactly_as_without_drafts(tiny_plan, shards, tiny_vocab_dir):
    plan, directory = tiny_plan
    base = coordinator(tiny_plan, shards).generate(PROMPT_IDS, 30).tokens
    eos = base[9]
    cut = base[:base.index(eos) + 1]
    same_model = CheckpointDraft(tiny_vocab_dir, plan, directory)
    for n in (1, 2, 7, 30):
        gen = coordinator(tiny_plan, shards).generate(PROMPT_IDS, n, draft=same_model, draft_tokens=4)
        assert gen.tokens == base[:n]
    gen = coordinator(tiny_plan, shards).generate(PROMPT_IDS, 30, eos=eos, draft=same_model, draft_tokens=4)
    assert gen.tokens == cut
    calls = []
    gen = coordinator(tiny_plan, shards).generate(PROMPT_IDS, 30, draft=same_model, draft_tokens=4,
                                                  on_token=lambda step, tok, st: calls.append(step),
                                                  stop=lambda: len(calls) >= 6)
    assert gen.tokens == base[:6] and calls == list(range(6))


def test_sampling_with_drafts_is_seeded_and_close_to_the_target(tiny_plan, shards, tiny_vocab_dir):
    plan, directory = tiny_plan
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=11)
    same_model = CheckpointDraft(tiny_vocab_dir, plan, directory)
    runs = [coordinator(tiny_plan, shards).generate(PROMPT_IDS, 20, choose=Sampler(params, len(PROMPT_IDS)),
                                                    draft=same_model, draft_tokens=4).tokens for _ in range(2)]
    assert runs[0] == runs[1]


def exact_two_token_distribution(target, vocab):
    """P(first two tokens) when a one-pass-per-token sampler draws from target(context)."""
    out = np.zeros((vocab, vocab))
    p0 = target(())
    for a in range(vocab):
        out[a] = p0[a] * target((a,))
    return out


def test_speculative_sampling_keeps_the_target_distribution():
    """Two tokens from a toy model whose next-token distribution depends on the context, drafted
    with fixed guesses: the empirical joint distribution matches the exact one."""
    vocab, guesses = 4, [1, 2]
    table = np.exp([[0.2, 1.0, -0.5, 0.3], [1.5, 0.0, 0.4, -1.0], [0.0, 0.1, 2.0, 0.0],
                    [-0.3, 0.5, 0.5, 0.9], [0.6, 0.6, 0.0, -2.0]])
    table /= table.sum(1, keepdims=True)  # softmax per row

    def target(context):  # the toy model: a distribution per (last token or none)
        return table[context[-1] if context else 4]

    class Toy:
        """A Sampler-like choice: probabilities straight from the toy table (the logits are row ids)."""

        def __init__(self, seed):
            self.generator = np.random.default_rng(seed)

        def distribution(self, logits, tokens):
            return target(tuple(tokens))

    n, counts = 20000, np.zeros((vocab, vocab))
    toy = Toy(5)
    for _ in range(n):
        rows = np.zeros((3, vocab), dtype=np.float32)
        tokens, _ = verify(rows, guesses, [], toy)
        if len(tokens) == 1:  # the first guess was rejected: the next pass draws the second token
            tokens = tokens + verify(rows[:1], [], tokens, toy)[0]
        counts[tokens[0], tokens[1]] += 1
    expected = exact_two_token_distribution(target, vocab) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 40, chi2  # 15 degrees of freedom: p < 0.001 beyond ~37.7


def test_greedy_sampler_with_penalties_sees_the_guesses_as_context(tiny_plan, shards):
    params = SamplingParams(repetition_penalty=1.3)
    plan, _ = tiny_plan
    base = coordinator(tiny_plan, shards).generate(PROMPT_IDS, 30, choose=Sampler(params, len(PROMPT_IDS))).tokens
    gen = coordinator(tiny_plan, shards).generate(PROMPT_IDS, 30, choose=Sampler(params, len(PROMPT_IDS)),
                                                  draft=LookupDraft(), draft_tokens=4)
    assert gen.tokens == base


def test_a_draft_with_another_vocabulary_is_refused(tiny_plan, tiny_llama_dir, tmp_path):
    plan, directory = tiny_plan
    other = tiny_llama_dir(seed=9, tie=True, vocab_size=plan.model.vocab_size + 8, num_hidden_layers=1)
    with pytest.raises(PlanError, match="vocabulary of .* tokens; the plan's model has"):
        prepare_draft(DraftOptions(str(other), 4), plan, directory)
    with pytest.raises(PlanError, match="not a directory"):
        prepare_draft(DraftOptions(str(tmp_path / "nowhere"), 4), plan, directory)
    assert prepare_draft(DraftOptions("none", 4), plan, directory) is None
    assert prepare_draft(DraftOptions("lookup", 0), plan, directory) is None


def halo_run(*args, timeout=180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "halo_runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_halo_run_local_gives_the_same_tokens_with_every_draft(tiny_plan, tiny_vocab_dir):
    """Over UDP with 0% loss and an fp32 wire (devices rewind their KV caches from the request's start)."""
    _, directory = tiny_plan
    common = ("local", "--plan", directory, "--prompt", "the cat sat on the mat. the cat sat on the mat. the cat",
              "--max-tokens", "24", "--ignore-eos", "--wire", "fp32", "--plr", "0", "--json", "--quiet")
    runs = {}
    for draft in ("none", "lookup", "self", tiny_vocab_dir):
        r = halo_run(*common, "--draft", draft, "--draft-tokens", "4")
        assert r.returncode == 0, r.stderr[-2000:]
        runs[str(draft)] = json.loads(r.stdout)
    base = runs.pop("none")
    assert base["draft"] == {"source": "none", "tokens": 0, "acceptance": None} and base["tokens_per_pass"] == 1.0
    for source, out in runs.items():
        assert out["tokens"] == base["tokens"], source
        assert out["draft"]["source"] == source and out["draft"]["tokens"] == 4
        assert 0 <= out["draft"]["acceptance"] <= 1
        assert len(out["per_token"]) == len(out["tokens"])
    assert runs[str(tiny_vocab_dir)]["draft"]["acceptance"] == 1.0       # the model drafting for itself
    assert runs[str(tiny_vocab_dir)]["tokens_per_pass"] > 4


def test_halo_run_refuses_a_bad_draft_in_one_line(tiny_plan, tiny_llama_dir, tmp_path):
    plan, directory = tiny_plan
    other = tiny_llama_dir(seed=9, tie=True, vocab_size=plan.model.vocab_size + 8, num_hidden_layers=1)
    for draft, words in ((tmp_path / "nowhere", "not a directory"), (other, "vocabulary of")):
        r = halo_run("generate", "--plan", directory, "--prompt", "hi", "--draft", draft, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("halo-run: error: --draft ") and words in lines[0], r.stderr
    r = halo_run("generate", "--plan", directory, "--prompt", "hi", "--draft-tokens", "99", timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "halo-run: error: --draft-tokens must be in 0..16, got 99"], r.stderr


def test_rejoin_history_drops_rejected_rows():
    """A restarted device's KV cache is rebuilt from the attention inputs the coordinator sent: rows
    of rejected guesses must not be among them."""
    from halo_runtime.net.recovery import History

    h = History(1, 4, "fp32")
    h.append(0, np.full((3, 4), 1.0, np.float32), 0)        # the prompt
    h.append(0, np.full((5, 4), 2.0, np.float32), 3)        # the last token and 4 guesses
    h.append(0, np.full((2, 4), 3.0, np.float32), 5)        # 1 guess accepted: the next pass starts at 3 + 2
    assert h.inputs(0)[:, 0].tolist() == [1, 1, 1, 2, 2, 3, 3]
    assert h.inputs(0, drop_last=True).shape == (5, 4)
    h.append(0, np.full((1, 4), 4.0, np.float32))           # no start: after the last row, as before
    assert h.inputs(0)[:, 0].tolist() == [1, 1, 1, 2, 2, 3, 3, 4]
