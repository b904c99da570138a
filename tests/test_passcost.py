"""When the engine sends a draft's guesses (server/passcost.py): the cost fit, the rule, and the
engine keeping a greedy reply the same whether or not its guesses ride along."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from halo_runtime.core.draft import LookupDraft
from halo_runtime.core.exchange import InProcessExchange
from halo_runtime.core.sampling import SamplingParams
from halo_runtime.core.shards import load_shard
from halo_runtime.core.tokenizer import Tokenizer
from halo_runtime.server.engine import Engine
from halo_runtime.server.jobs import Failed, Finished, Job, Piece, Work
from halo_runtime.server.metrics import Metrics
from halo_runtime.server.passcost import PassCost, acceptance, worth_guessing


def test_the_fit_waits_for_two_sizes_and_keeps_its_last_estimate():
    cost = PassCost(passes=4)
    cost.observe(8, 100.0)
    assert cost.fit() is None
    cost.observe(16, 180.0)
    a, b = cost.fit()
    assert (a, b) == pytest.approx((20.0, 10.0))
    for _ in range(3):
        cost.observe(8, 101.0)
    last = cost.fit()
    assert last == pytest.approx((22.0, 9.875))  # the window: 16 rows in 180 ms, 8 in 101 ms
    cost.observe(8, 101.0)  # now it holds passes of one size only: they say nothing of b
    assert cost.fit() == last


def test_a_row_never_has_a_negative_cost():
    cost = PassCost()
    cost.observe(1, 60.0)
    cost.observe(4, 50.0)  # noise on a machine that is busy elsewhere
    assert cost.fit()[1] == 0.0


@pytest.mark.parametrize("p, k, row_ms, pass_ms, tokens, want", [
    (0.5, 4, 1.0, 50.0, 1, 4),     # one request, rows nearly free: every guess pays
    (0.5, 4, 11.0, 110.0, 8, 0),   # eight sessions bound by compute: none does
    (0.9, 4, 11.0, 110.0, 8, 2),   # unless they are mostly right (0.9**3 * 110 < 88 < 0.9**2 * 110)
    (0.5, 4, 11.0, 430.0, 8, 2),   # with 2 ms links the round trips make rows cheap again
    (0.9, 0, 0.0, 50.0, 1, 0),     # asked for none
])
def test_a_guess_is_sent_where_it_raises_tokens_per_ms(p, k, row_ms, pass_ms, tokens, want):
    assert worth_guessing(p, k, row_ms, pass_ms, tokens) == want


def test_acceptance_starts_at_one_half_and_follows_the_record():
    assert acceptance(0, 0) == 0.5
    assert acceptance(9, 10) > 0.8 > acceptance(1, 10)


class _Frozen(PassCost):
    """A cost fit that ignores the passes (the tiny model's are too quick to say anything)."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self._fit = (a, b)

    def observe(self, rows: int, ms: float) -> None:
        pass


class _Counting(LookupDraft):
    def __init__(self):
        self.asked: list[int] = []

    def propose(self, tokens, k):
        self.asked.append(k)
        return super().propose(tokens, k)


def _generate(roomy_plan, work: Work, cost: PassCost | None, drafts: bool) -> tuple[list[str], list[int]]:
    """(pieces' text, k of every proposal) of `work` run alone by an in-process engine."""
    plan, directory = roomy_plan
    shards = {d: load_shard(directory, plan, d) for d in plan.device_names}
    draft = _Counting()
    remote = [d for d in plan.device_names if d != plan.coordinator]
    engine = Engine(plan, shards[plan.coordinator], Tokenizer.from_file(Path(directory) / "tokenizer.json"),
                    lambda: InProcessExchange(plan, shards), Metrics(remote, {}), eos_ids=set(),
                    drafts=(lambda coord: draft) if drafts else None, draft_tokens=4 if drafts else 0)
    if cost is not None:
        engine.cost = cost
    got, done = [], threading.Event()

    def deliver(event):
        got.append(event)
        if isinstance(event, (Finished, Failed)):
            done.set()

    engine.start()
    try:
        assert engine.submit(Job(work, deliver))
        assert done.wait(120)
    finally:
        engine.close()
    assert isinstance(got[-1], Finished), got[-1]
    return [e.text for e in got if isinstance(e, Piece)], draft.asked


# repeats itself, so prompt lookup finds guesses
PROMPT = tuple([5, 6, 7, 8, 9] * 6)


def test_greedy_guesses_go_when_rows_are_dear_and_the_reply_stays_the_same(roomy_plan):
    work = Work(PROMPT, 24, ignore_eos=True)
    plain, _ = _generate(roomy_plan, work, None, drafts=False)
    cheap, asked_cheap = _generate(roomy_plan, work, _Frozen(50.0, 0.1), drafts=True)
    dear, asked_dear = _generate(roomy_plan, work, _Frozen(10.0, 50.0), drafts=True)
    assert asked_cheap and max(asked_cheap) == 4
    assert asked_dear == []
    assert cheap == plain == dear


def test_a_sampled_reply_keeps_its_guesses_whatever_the_cost(roomy_plan):
    """Its draws depend on the guesses it verifies: thinning them by the batch's cost would make a
    seeded reply depend on what else runs."""
    work = Work(PROMPT, 16, SamplingParams(temperature=0.8, seed=3), ignore_eos=True)
    cheap, asked_cheap = _generate(roomy_plan, work, _Frozen(50.0, 0.1), drafts=True)
    dear, asked_dear = _generate(roomy_plan, work, _Frozen(10.0, 50.0), drafts=True)
    assert asked_dear == asked_cheap and asked_dear
    assert dear == cheap
