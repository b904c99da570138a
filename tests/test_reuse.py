"""A conversation's next turn reuses what the devices hold (issue 24, item 3): its prompt starts with
the earlier turns and the reply, whose KV rows every device still has, so only the rest is fed.
The reply is the one a cold request gets, to the last bit of every logit (a row's bits do not
depend on its pass), in process and through `halo-run serve` with the openai client.
"""
from __future__ import annotations

import numpy as np
import pytest
from halo_runtime.core.draft import LookupDraft
from test_draft import coordinator

PROMPT = [1, 17, 300, 400, 12, 99, 7]


@pytest.mark.parametrize("draft", [None, LookupDraft()], ids=["no-draft", "lookup"])
def test_the_next_turn_feeds_only_what_is_new_and_gives_the_cold_logits(tiny_plan, tiny_shards, draft):
    warm = coordinator(tiny_plan, tiny_shards)
    first = warm.generate(PROMPT, 10, session=5, draft=draft, draft_tokens=3)
    second_prompt = PROMPT + first.tokens + [5, 6, 250]
    kw = {"keep_logits": True, "draft": draft, "draft_tokens": 3}
    second = warm.generate(second_prompt, 12, session=6, reuse=True, **kw)
    # every token of the first turn was fed but its last reply token
    assert second.reused == len(PROMPT) + len(first.tokens) - 1 and warm.session == 5
    cold = coordinator(tiny_plan, tiny_shards).generate(second_prompt, 12, session=7, **kw)
    assert cold.reused == 0
    assert second.tokens == cold.tokens
    for a, b in zip(second.logits, cold.logits):
        assert np.array_equal(a, b)


def test_a_prompt_that_departs_reuses_only_the_shared_prefix_and_none_without_reuse(tiny_plan, tiny_shards):
    coord = coordinator(tiny_plan, tiny_shards)
    coord.generate(PROMPT, 6, session=5)
    other = PROMPT[:4] + [33, 44, 55]
    departs = coord.generate(other, 6, session=6, reuse=True, keep_logits=True)
    assert departs.reused == 4 and coord.session == 5
    cold = coordinator(tiny_plan, tiny_shards).generate(other, 6, session=7, keep_logits=True)
    assert departs.tokens == cold.tokens and all(np.array_equal(a, b) for a, b in zip(departs.logits, cold.logits))
    assert coord.generate(other, 6, session=8).reused == 0 and coord.session == 8  # reuse is asked for
    assert coord.generate(other, 3, session=9, reuse=True).reused == len(other) - 1  # the same prompt again
    assert coordinator(tiny_plan, tiny_shards).generate(other, 3, reuse=True).reused == 0  # a fresh coordinator


def test_a_chats_second_turn_is_served_from_the_cache_with_the_cold_reply(plan_dir, tmp_path):
    openai = pytest.importorskip("openai")
    pytest.importorskip("starlette")
    from live_server import Server, plan_with_template

    assert openai
    chat = plan_with_template(plan_dir, tmp_path / "chat")
    turn1 = [{"role": "user", "content": "Tell me about the sea."}]
    ask = {"max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    with Server(chat, "--sync", "strict") as server:
        def chat_(messages):
            return server.client.chat.completions.create(model=server.model, messages=messages, **ask)
        first = chat_(turn1)
        turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And the mountains?"}]
        warm = chat_(turn2)
        assert warm.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens // 2, warm.usage
        chat_([{"role": "user", "content": "Something else entirely, please."}])  # the cache now holds this
        cold = chat_(turn2)
        assert cold.usage.prompt_tokens_details.cached_tokens < warm.usage.prompt_tokens_details.cached_tokens
        assert warm.choices[0].message.content == cold.choices[0].message.content
