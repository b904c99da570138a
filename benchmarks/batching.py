"""Several clients at once against one: what sharing passes (continuous batching) buys, back to back
in one run.

`halo-run serve --local` on a plan; N different questions, `--tokens` each, streamed with the
openai client at temperature 0 (`ignore_eos`). First one client asks them one after another
(aggregate tokens/s of one client), then N clients ask them all at once. Recorded: both tokens/s,
their ratio, each client's time to first token and decode time per token, whether every reply
equals its single-client reply (it must: a row's bits do not depend on its pass), from /metrics
the rows and requests per pass, and every process's resident memory after each phase (the
sessions' KV caches are what should grow). Then the same N at once with `--plr` loss on the lossy
boards (relaxed sync): every reply completes, and each request's compensated share is reported.
The strict runs repeat with `--delays` of one-way link delay (the serve shim's), where a round
trip rather than compute sets a pass's time, as on boards over Wi-Fi.

    python -m benchmarks.batching --plan DIR [--clients 8] [--tokens 64] [--plr 0.05] [--delays 0,2]
        [--threads 1] [--serve-arg=--multi-datagram-copies=1] [--out FILE.json]   # --delays '': no strict runs

Example:
    >>> from benchmarks.batching import histogram_mean
    >>> histogram_mean({"halo_batch_rows_sum": 24.0, "halo_batch_rows_count": 4.0}, "halo_batch_rows")
    6.0
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.benchcommon import machine, percentiles
from benchmarks.serving import Serve

QUESTIONS = ("What is a Raspberry Pi?", "Why is the sky blue?", "How do bees make honey?",
             "What is a neural network?", "Describe the sea in winter.", "How does Wi-Fi work?",
             "What is the capital of France, and why?", "Tell me about the history of bread.")


def histogram_mean(samples: dict, name: str) -> float | None:
    """Mean of a Prometheus histogram from its _sum and _count samples."""
    n = samples.get(f"{name}_count", 0.0)
    return round(samples[f"{name}_sum"] / n, 3) if n else None


class Server(Serve):
    """`benchmarks.serving.Serve`, asked one streamed question at a time, with /metrics and RSS."""

    def ask(self, question: str, tokens: int) -> dict:
        """One streamed reply: its text, client-side TTFT and ms per later token, the server's summary."""
        t0 = time.perf_counter()
        arrivals, text, summary = [], [], {}
        for chunk in self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": question}], max_tokens=tokens,
                temperature=0, stream=True, extra_body={"ignore_eos": True}):
            halo = (chunk.model_extra or {}).get("halo") or {}
            if "compensated_share" in halo:  # the last chunk carries the reply's summary
                summary = halo
            if "token_ms" in halo:  # a token's piece (its text may be held back: a partial character)
                arrivals.append(time.perf_counter())
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
        gaps = [1e3 * (b - a) for a, b in zip(arrivals, arrivals[1:])]
        return {"text": "".join(text), "ttft_ms": round(1e3 * (arrivals[0] - t0), 1),
                "tpot_ms": round(sorted(gaps)[len(gaps) // 2], 2) if gaps else None,
                "compensated_share": summary.get("compensated_share")}

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of the server (the coordinator) and of each worker process it started, in MB."""
        out = {"coordinator": _rss_mb(self.proc.pid)}
        for entry in Path("/proc").iterdir():
            try:
                stat, cmd = (entry / "stat").read_text(), (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid and b"--device" in cmd:
                out[cmd[cmd.index(b"--device") + 1].decode()] = _rss_mb(int(entry.name))
        return out

    def metrics(self) -> dict:
        from urllib.request import urlopen

        from prometheus_client.parser import text_string_to_metric_families

        page = urlopen(f"{self.base}/metrics", timeout=30).read().decode()
        return {s.name: s.value for f in text_string_to_metric_families(page) for s in f.samples if not s.labels}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def at_once(server: Server, questions, tokens: int) -> tuple[list[dict], float]:
    """Every question by its own client, all at once: (replies, seconds for all)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(questions)) as pool:
        replies = list(pool.map(lambda q: server.ask(q, tokens), questions))
    return replies, time.perf_counter() - t0


def one_by_one(server: Server, questions, tokens: int) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    replies = [server.ask(q, tokens) for q in questions]
    return replies, time.perf_counter() - t0


def summary(replies: list[dict], seconds: float, tokens: int) -> dict:
    return {"tokens_per_s": round(len(replies) * tokens / seconds, 2), "seconds": round(seconds, 2),
            "ttft_ms": percentiles([r["ttft_ms"] for r in replies]),
            "tpot_ms": percentiles([r["tpot_ms"] for r in replies if r["tpot_ms"] is not None])}


def condition(plan: str, questions, tokens: int, sync: str, *extra: str) -> dict:
    """One client asking every question in turn, then one client per question all at once, on a
    fresh `serve --local`: throughput, latency, per-pass batch from /metrics, memory, replies."""
    server = Server(plan, sync, *extra)
    try:
        server.ask("Hello.", 4)  # warm-up: graphs built, pages mapped
        lone, t_lone = one_by_one(server, questions, tokens)
        before, rss_one = server.metrics(), server.rss_mb()
        together, t_together = at_once(server, questions, tokens)
        after, rss_many = server.metrics(), server.rss_mb()
    finally:
        server.close()
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return {"server_args": [sync, *extra],
            "one_client": summary(lone, t_lone, tokens), "clients_at_once": summary(together, t_together, tokens),
            "speedup": round(t_lone / t_together, 2),
            "replies_equal": [a["text"] == b["text"] for a, b in zip(lone, together)],
            "complete": [len(r["text"]) > 0 and r["tpot_ms"] is not None for r in together],
            "compensated_share": [r["compensated_share"] for r in together],
            "rows_per_pass": histogram_mean(delta, "halo_batch_rows"),
            "requests_per_pass": histogram_mean(delta, "halo_batch_sessions"),
            "passes": int(delta.get("halo_batch_rows_count", 0)),
            "rss_mb": {"after_one_client": rss_one, f"after_{len(questions)}_at_once": rss_many}}


def run(plan: str, clients: int, tokens: int, plr: float, delays: list[float], delayed_tokens: int,
        threads: int = 1, serve_args: tuple[str, ...] = ()) -> dict:
    questions = list(QUESTIONS[:clients])
    from halo_runtime.core.f32rows import library

    # the servers run in this environment: HALO_F32_ROWS=0 leaves their fp32 products to ggml
    out = {"machine": machine(), "plan": plan, "clients": clients, "tokens": tokens, "threads": threads,
           "f32_rows": library()[1]}
    more = ("--threads", str(threads), *serve_args)
    for d in delays:
        n = tokens if d == 0 else delayed_tokens
        out[f"strict_delay{d:g}"] = {"tokens": n, **condition(plan, questions, n, "strict", "--delay-ms", str(d), *more)}
    out[f"relaxed_loss{plr:g}"] = {"tokens": tokens,
                                   **condition(plan, questions, tokens, "relaxed", "--plr", str(plr), *more)}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in result if k.startswith(("strict_", "relaxed_"))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, k in enumerate(keys):
        one, many = result[k]["one_client"]["tokens_per_s"], result[k]["clients_at_once"]["tokens_per_s"]
        ax.bar([i - 0.2, i + 0.2], [one, many], width=0.38, color=["#999", "#2a7"])
        ax.text(i + 0.2, many, f"{result[k]['speedup']:.1f}x", ha="center", va="bottom")
    ax.set_xticks(range(len(keys)), [k.replace("_", "\n").replace("delay", "delay ").replace("loss", "loss ")
                                     for k in keys])
    ax.set_ylabel("tokens/s, all clients")
    ax.set_title(f"one client vs {result['clients']} at once")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--plr", type=float, default=0.05, help="loss on the lossy boards, relaxed run")
    p.add_argument("--delays", default="0,2", help="one-way delays (ms, serve --local's shim) of the strict runs")
    p.add_argument("--delayed-tokens", type=int, default=32, help="tokens per reply in the runs with delay")
    p.add_argument("--threads", type=int, default=1,
                   help="the coordinator's ggml threads (serve --threads; each worker keeps one)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for every serve, e.g. --serve-arg=--multi-datagram-copies=1")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if not 1 <= a.clients <= len(QUESTIONS):
        p.error(f"--clients must be in 1..{len(QUESTIONS)}")
    result = run(a.plan, a.clients, a.tokens, a.plr, [float(d) for d in a.delays.split(",") if d], a.delayed_tokens,
                 a.threads, tuple(a.serve_arg))
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        plot(result, Path(a.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
