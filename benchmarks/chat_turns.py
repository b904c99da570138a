"""A chat's later turns against the same requests sent cold: what reusing the devices' KV cache saves.

`halo-run serve --local` on a plan; a 3-turn conversation (each turn's prompt: the earlier turns,
the replies, a new question) streamed with the openai client. Turns 2 and 3 run warm (right after
the turn before: the devices hold its prefix, `usage.prompt_tokens_details.cached_tokens`) and
cold (the same messages right after an unrelated request, which the cache then holds instead).
Recorded per turn and repetition: time to first token seen by the client, cached tokens, prompt
tokens, and whether warm and cold replies are equal (they must be: greedy, exact reuse).

    python -m benchmarks.chat_turns --plan artifacts/smollm2-135m-pi5 [--reps 3] [--tokens 32]

Example:
    >>> from benchmarks.chat_turns import QUESTIONS
    >>> len(QUESTIONS)
    3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.benchcommon import machine
from benchmarks.serving import Serve

HERE = Path(__file__).resolve().parent
QUESTIONS = ("What is a Raspberry Pi, and what do people build with one at home?",
             "Which of those projects need a network, and why?",
             "How would you keep such a network reliable when the Wi-Fi drops packets?")
UNRELATED = [{"role": "user", "content": "Name three rivers of Europe."}]


def ask(server: Serve, messages: list[dict], tokens: int) -> dict:
    """One streamed reply: time to its first token (client side), its text and usage."""
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    for chunk in server.client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    return {"ttft_ms": round(1e3 * (first - t0), 1), "text": "".join(text), "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.prompt_tokens_details.cached_tokens}


def conversation(server: Serve, tokens: int) -> list[dict]:
    """Every turn warm, then turns 2 and 3 again cold; per turn {warm, cold}."""
    messages, turns = [], []
    for i, q in enumerate(QUESTIONS):
        messages = messages + [{"role": "user", "content": q}]
        warm = ask(server, messages, tokens)
        turns.append({"turn": i + 1, "messages": list(messages), "warm": warm})
        messages = messages + [{"role": "assistant", "content": warm["text"]}]
    for t in turns[1:]:
        ask(server, UNRELATED, 4)  # the cache now holds an unrelated prompt
        t["cold"] = ask(server, t["messages"], tokens)
        t["same_reply"] = t["cold"]["text"] == t["warm"]["text"]
    for t in turns:
        del t["messages"]
    return turns


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for turn, x in ((2, 0), (3, 1)):
        warm = [t["warm"]["ttft_ms"] for rep in doc["reps"] for t in rep if t["turn"] == turn]
        cold = [t["cold"]["ttft_ms"] for rep in doc["reps"] for t in rep if t["turn"] == turn]
        ax.scatter([x - 0.1] * len(cold), cold, color="tab:red", label="cold" if x == 0 else None)
        ax.scatter([x + 0.1] * len(warm), warm, color="tab:green", label="warm (KV cache reused)" if x == 0 else None)
    ax.set_xticks([0, 1], ["turn 2", "turn 3"])
    ax.set_ylabel("time to first token, ms")
    ax.set_ylim(bottom=0)
    ax.set_title(f"chat turns, {Path(doc['plan']).name}, {doc['sync']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True)
    p.add_argument("--sync", choices=["relaxed", "strict"], default="strict")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "chat_turns.json"))
    a = p.parse_args(argv)
    doc = {"machine": machine(), "plan": a.plan, "sync": a.sync, "tokens": a.tokens, "load_before": os.getloadavg(),
           "reps": []}
    server = Serve(a.plan, a.sync)
    try:
        ask(server, UNRELATED, 4)  # warm-up: graphs built, pages read
        for _ in range(a.reps):
            doc["reps"].append(conversation(server, a.tokens))
    finally:
        server.close()
    doc["load_after"] = os.getloadavg()
    for turn in (2, 3):
        rows = [t for rep in doc["reps"] for t in rep if t["turn"] == turn]
        warm = sorted(t["warm"]["ttft_ms"] for t in rows)
        cold = sorted(t["cold"]["ttft_ms"] for t in rows)
        doc[f"turn{turn}"] = {"warm_ttft_ms_median": warm[len(warm) // 2], "cold_ttft_ms_median": cold[len(cold) // 2],
                              "warm_over_cold": round(warm[len(warm) // 2] / cold[len(cold) // 2], 3),
                              "prompt_tokens": rows[0]["warm"]["prompt_tokens"],
                              "cached_tokens": rows[0]["warm"]["cached_tokens"],
                              "same_replies": all(t["same_reply"] for t in rows)}
        print(f"turn {turn}: {doc[f'turn{turn}']}", file=sys.stderr)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
