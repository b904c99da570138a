"""The coordinator: residual stream, per-layer aggregation with relaxed synchronisation, generation.

Per token and layer: normalise the residual, ask every device holding attention heads for its
partial output (awaited: attention holds KV state), add them; normalise again, ask the MLP
devices for their partial sums. Critical MLP parts are awaited. Relaxed parts are used if they
arrive before the deadline, else replaced by compensation, an estimate of the device's relaxed
groups' output (see COMPENSATIONS); the predictor promotes a device's relaxed part to awaited on
tokens where it predicts one of its groups matters. How messages travel is the Exchange's
business (in process, UDP, or TCP for the strict baseline), so every path shares this code.

Rounds no remote device takes part in are computed here without asking anyone, runs of them as
one ggml graph each (`segment`): on a one-device plan a token is one native call. In a network
round the coordinator posts the input, computes its own groups (`device.DeviceCompute`, one call)
while the devices compute theirs, and adds what comes back in a fixed device order (numpy).

Loss and waiting are per token: a round carries T tokens (T = 1 in decode, the whole prompt in
prefill), `awaited` and `RoundResult.missing` hold a bool per token, and compensation fills only
the missing rows. The network exchanges send one message per round: over UDP a relaxed reply's
rows whose datagrams arrived are used and the others compensated, and a part awaited for its
flagged rows is done once those are in (TCP delivers whole messages); the in-process exchange
draws loss per token row, which is what decode sees, so `halo-compile eval` can score a whole
window at once.

A pass may carry several sessions (`run` with a `Feed` per session: `server.engine` batches
requests so): each device holds a KV cache per session slot, the request names each session's
rows (`spans`), MLP rows are multiplied together and each session attends to its own cache, so a
row's result is the one its session alone would get; statistics are per feed.

With a draft (core.draft), a decode pass feeds the last token and k guesses (T = k + 1 rows),
keeps what greedy decoding (or the speculative-sampling rule) confirms plus one token, and moves
`position` back past the rejected rows: every device overwrites its KV cache from the start
position the next request carries. A verification pass is an ordinary pass: same deadlines,
same compensation.

A device holding critical groups that dies (`DeviceLost` from the exchange) is replaced by the
plan's failover: the exchange hands its groups to the survivors (`core.failover`), this device
adopts its own share, its adopted heads' KV cache rebuilt from the session's attention inputs,
and the interrupted pass runs again (`FailoverEvent`s in `Generation.failovers`).

Example (what stands in for a relaxed part that missed its deadline; a whole generation is
`Coordinator(plan, shard, exchange).generate(prompt_ids, max_tokens)`, as tests/test_runtime.py runs it
on a compiled plan):
    >>> from halo_runtime.core.coordinator import COMPENSATIONS
    >>> COMPENSATIONS
    ('zero', 'mean', 'lowrank')
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from .device import DeviceCompute
from .draft import shared_prefix, verify
from .exchange import DeviceLost, Exchange
from .failover import WithAdopted, adopt
from .generation import FailoverEvent, Generation, TokenStats, share
from .plan import Plan
from .predictor import layer_predictor
from .relaxed import RelaxedPart, awaited_rows, estimate, relaxed_parts
from .segment import Runner, Segment, Tables, schedule
from .spans import Span

__all__ = ["COMPENSATIONS", "Coordinator", "Feed", "FailoverEvent", "Generation", "TokenStats"]

COMPENSATIONS = ("zero", "mean", "lowrank")
"""What stands in for a missing relaxed part: nothing; the calibration mean of the device's relaxed
groups (`compensation.{layer}.mean`); or a low-rank estimate of their output from the MLP input,
fitted at compile time: each group's most important neurons, kept exactly, with a refit down
projection and a bias (`compensation.{layer}.{groups,gate,up,down,bias}`, halo_compile.compensate)."""


class Feed(NamedTuple):
    """One session's rows in a pass (`Coordinator.run`)."""

    slot: int
    """The session slot: whose KV cache on every device."""
    start: int
    """Position of the first token."""
    tokens: tuple
    """Token ids fed."""
    logits: int = 1
    """How many of its last rows' logits to return (0: none, a prompt chunk that is not the last)."""
    source: int | None = None
    """A slot whose tokens before `start` this session shares: every device copies their KV rows
    instead of computing them (`spans.Span.source`); None: its own slot holds them."""


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm of every row (float32), for the inputs the coordinator posts in network rounds."""
    # np.mean's own bits (the same sum, divided by the count), without its Python wrapper
    ms = np.add.reduce(x * x, axis=-1, keepdims=True) / x.shape[-1]
    return (x * (1.0 / np.sqrt(ms + eps))).astype(np.float32, copy=False) * weight


def sum_parts(parts: list, like: np.ndarray) -> np.ndarray:
    """Sum partials in a fixed order (float addition is not associative; order fixes the bits)."""
    total = None
    for p in parts:
        if p is not None:
            total = p if total is None else total + p
    return np.zeros_like(like) if total is None else total


class Coordinator:
    def __init__(self, plan: Plan, shard: dict[str, np.ndarray], exchange: Exchange,
                 compensation: str | None = None, await_predicted: bool = True, threads: int = 1):
        """compensation: one of COMPENSATIONS; None = "lowrank" if the plan has it, else "mean".
        await_predicted: await relaxed parts on the tokens where the predictor flags them.
        threads: ggml threads for the coordinator's own products. `generate` runs one session (slot
        0); `run` passes of up to `plan.session_slots()` sessions at once (server.engine)."""
        self.plan, self.cfg, self.exchange, self.threads = plan, plan.model, exchange, threads
        self.shard = shard
        self.local = DeviceCompute(plan, plan.coordinator, shard, threads)
        self.tables = Tables(plan.model, plan.weights, shard, self.local.arena)
        self.runner = Runner(self.local, self.tables, plan.max_context, threads)
        L = self.cfg.num_layers
        self.predictors = [layer_predictor(shard, i) for i in range(L)]
        self.await_predicted = await_predicted
        has_lowrank = all(f"compensation.{i}.groups" in shard for i in range(L))
        self.compensation = compensation or ("lowrank" if has_lowrank else "mean")
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"compensation must be one of {', '.join(COMPENSATIONS)}, got {self.compensation!r}")
        if self.compensation == "lowrank" and not has_lowrank:
            raise ValueError("this plan has no low-rank compensation (recompile it with a newer halo-compile)")
        self.remote = [d for d in plan.device_names if d != plan.coordinator]
        self.steps = schedule(plan)
        self.relaxed = self._relaxed_parts(plan)
        # after a failover: the groups this device adopted, added to its own in network rounds (one
        # more graph call); the plan's own segments never held the dead device's groups
        self.part = self.local
        self.failed: str | None = None
        self.failovers: list[FailoverEvent] = []
        self.step = 0
        """The next pass's step number: it only grows within a session (a device's reply cache is by step)."""
        self.slots = plan.session_slots()
        self.fed: list[list[int]] = [[] for _ in range(self.slots)]
        """Per session slot, the tokens whose rows every device's KV cache holds, by position."""
        self.position = 0
        self.session = 0

    def _relaxed_parts(self, plan: Plan) -> list[dict[str, RelaxedPart]]:
        """Per layer: which remote devices hold relaxed groups under `plan`, and what stands in for them."""
        return relaxed_parts(plan, self.shard, self.remote, self.compensation == "lowrank")

    def reset(self, session: int) -> None:
        self.part.reset()
        self.position = self.step = 0
        self.fed = [[] for _ in range(self.slots)]
        self.session = session
        self.exchange.begin(session)
        failed = getattr(self.exchange, "failed", None)  # begin may replace a device, or find it back
        if failed != self.failed:
            t0 = time.perf_counter()
            self._switch(failed, {})
            if failed is not None:
                self.failovers.append(FailoverEvent(failed, time.time(), 0, 1e3 * (time.perf_counter() - t0)))

    # ---- failover -----------------------------------------------------------------------------

    def _switch(self, dead: str | None, inputs: dict[int, dict[int, np.ndarray]]) -> None:
        """Compute what the plan's failover for `dead` gives this device (None: the plan's own
        groups again), its adopted heads' KV caches filled from `inputs` (slot -> layer -> rows from 0)."""
        if self.part is not self.local:
            self.part.close()
        self.part, self.failed = self.local, dead
        plan = self.plan if dead is None else self.plan.without(dead)
        if dead is not None:
            adopted = adopt(self.plan, dead, self.plan.coordinator, self.shard, self.threads)
            if adopted is not None:
                self.part = WithAdopted(self.local, adopted)
                for slot, layers in inputs.items():
                    for layer, x in layers.items():
                        self.part.rebuild(layer, x, slot)
        self.relaxed = self._relaxed_parts(plan)

    def _fail_over(self, lost: DeviceLost, start) -> None:
        """Replace the device `lost` names by the plan's failover, its KV state rebuilt up to `start`
        (slot 0's position, or slot -> position); `lost` again, with why, when that cannot be done."""
        fail_over = getattr(self.exchange, "fail_over", None)
        if lost.device is None or fail_over is None:
            raise lost
        t0 = time.perf_counter()
        try:
            inputs = fail_over(lost.device, start)
        except DeviceLost as why:
            raise DeviceLost(f"{lost}; {why}", lost.device) from None
        self._switch(lost.device, inputs)
        rows = sum(start.values()) if isinstance(start, dict) else start
        self.failovers.append(FailoverEvent(lost.device, time.time(), rows, 1e3 * (time.perf_counter() - t0)))

    def replace_lost(self, lost: DeviceLost, slots: list[int]) -> None:
        """After `lost` in a pass of several sessions: the plan's failover, the adopted heads' KV
        caches of `slots` (the sessions running) rebuilt from what they were sent, so the
        interrupted pass can run again; the other slots' caches are dropped (never reused). `lost`
        again if the device cannot be replaced."""
        self._fail_over(lost, {s: len(self.fed[s]) for s in slots})
        for s in range(self.slots):
            if s not in slots:
                self.fed[s] = []

    # ---- one pass -----------------------------------------------------------------------------

    def forward(self, tokens, step: int, stats: TokenStats, all_positions: bool = False) -> np.ndarray:
        """Feed tokens at the current position (slot 0); returns last-position logits [vocab], or [T, vocab]."""
        tokens = tuple(np.asarray(tokens, dtype=np.int64).reshape(-1).tolist())
        T = len(tokens)
        (logits,) = self.run([Feed(0, self.position, tokens, T if all_positions else 1)], step, [stats])
        self.position += T
        return logits if all_positions else logits[-1]

    def run(self, feeds: list[Feed], step: int, stats: list[TokenStats]) -> list[np.ndarray | None]:
        """One pass of every feed's rows (several sessions share its rounds: one message per device
        and round); per feed its last `logits` rows' logits [n, vocab] (None for 0). `stats[j]` gets
        feed j's share: the pass's times, and the relaxed parts missing on its own rows."""
        spans = tuple(Span(f.slot, f.start, len(f.tokens), f.source) for f in feeds)
        copying = [f for f in feeds if f.source is not None]
        for f in copying:
            if len(self.fed[f.source]) < f.start:
                raise ValueError(f"slot {f.slot} takes {f.start} rows of slot {f.source}, which holds "
                                 f"{len(self.fed[f.source])}")
            self.fed[f.slot] = self.fed[f.source][:f.start]
        if copying:
            self.local.take_prefixes(spans)  # its own rounds' caches (segments); each round's part copies its layer
        bounds = np.cumsum([0] + [s.rows for s in spans])
        tokens = np.fromiter((t for f in feeds for t in f.tokens), dtype=np.int32, count=int(bounds[-1]))
        h = x_pred = None
        out: list = [None] * len(feeds)
        for i, st in enumerate(self.steps):
            if isinstance(st, Segment):
                t0 = time.perf_counter()
                h, x_seg, out = self._segment(i, st, tokens if st.embed else h, feeds, spans, bounds)
                x_pred = x_seg if x_seg is not None else x_pred
                self._segment_done(i, h, x_seg)
                for s in stats:
                    s.compute_ms += 1e3 * (time.perf_counter() - t0)
                continue
            layer, kind = st
            if kind == "attn":
                x_pred = rms_norm(h, self.tables.norms[layer][0], self.cfg.rms_norm_eps)
                h = h + self._attention(step, layer, spans, stats, x_pred)
            else:
                m = rms_norm(h, self.tables.norms[layer][1], self.cfg.rms_norm_eps)
                h = h + self._mlp(step, layer, spans, bounds, stats, x_pred, m)
            self._round_done(i, h, x_pred)
        for f in feeds:
            self.local.lengths[f.slot, :] = f.start + len(f.tokens)
            self.fed[f.slot][f.start:] = f.tokens
        return out

    def _segment(self, i: int, st: Segment, inp: np.ndarray, feeds: list[Feed], spans: tuple, bounds):
        """A run of local rounds (`segment`) for the pass's rows: (h, the predictor's x, per-feed
        logits). Rounds that attend run span by span (each session's own KV cache); the others once."""
        if st.attends and len(spans) > 1:
            parts = [self._segment(i, st, inp[a:b], [f], (s,), np.array([0, s.rows]))
                     for f, s, a, b in zip(feeds, spans, bounds[:-1], bounds[1:])]
            hs, xs = [p[0] for p in parts], [p[1] for p in parts]
            return (None if hs[0] is None else np.concatenate(hs),
                    None if xs[0] is None else np.concatenate(xs), [p[2][0] for p in parts])
        s, f = spans[0], feeds[0]
        if not st.head:
            h, x, _ = self.runner.run(i, st, inp, s.start, slot=s.slot)
            return h, x, [None] * len(feeds)
        if st.attends:  # one session: its rounds write the cache, then its last rows' logits
            _, _, logits = self.runner.run(i, st, inp, s.start, f.logits > 1, s.slot)
            return None, None, [logits[-f.logits:] if f.logits else None]
        # rows are independent past the last attention: only those whose logits are wanted go on
        pick = np.concatenate([np.arange(b - f.logits, b) for f, b in zip(feeds, bounds[1:])]).astype(np.int64)
        if not len(pick):
            return None, None, [None] * len(feeds)
        _, _, logits = self.runner.run(i, st, inp[pick], 0, all_positions=True)
        at = np.cumsum([0] + [f.logits for f in feeds])
        return None, None, [logits[a:b] if b > a else None for a, b in zip(at[:-1], at[1:])]

    def _segment_done(self, i: int, h: np.ndarray | None, x: np.ndarray | None) -> None:
        """After the segment at schedule step i (h: the residual it leaves, x: the predictor's input
        it gave, if any): in
        the star, nothing more (push rounds hand h to the other devices: `core.push`)."""

    def _round_done(self, i: int, h: np.ndarray, x: np.ndarray | None) -> None:
        """After the network round at schedule step i (h: the residual, x: the predictor's input of
        its layer): in the star, nothing more (push rounds hand h out after a round that came to
        the coordinator alone: `core.push`)."""

    def _attention(self, step: int, layer: int, spans: tuple, stats: list[TokenStats], x: np.ndarray) -> np.ndarray:
        """Every device's attention heads on x, all awaited (they hold KV state)."""
        self.exchange.post("attn", step, layer, x, spans)
        t0 = time.perf_counter()
        local = self.part.attention_spans(layer, x, spans) if self.part.has_attention(layer) else None
        t1 = time.perf_counter()
        remote = self.exchange.collect("attn", step, layer, {})
        compute_ms, wait_ms = 1e3 * (t1 - t0), 1e3 * (time.perf_counter() - t1)
        for s in stats:
            s.compute_ms += compute_ms
            s.wait_ms += wait_ms
        return sum_parts([local] + remote.parts, x)

    def _mlp(self, step: int, layer: int, spans: tuple, bounds, stats: list[TokenStats], x: np.ndarray,
             m: np.ndarray) -> np.ndarray:
        """Every device's MLP part on m: critical and predicted ones (the predictor reads x) awaited,
        relaxed ones that miss the deadline compensated (each row on its own)."""
        awaited = self._awaited(layer, x)
        self.exchange.post("mlp", step, layer, m, spans)
        t0 = time.perf_counter()
        crit, rlx = self.part.mlp(layer, m) if self.part.has_mlp(layer) else (None, None)
        t1 = time.perf_counter()
        result = self.exchange.collect("mlp", step, layer, awaited)
        t2 = time.perf_counter()
        comp = [self._compensate(layer, dev, m, result.missing[dev]) for dev in self.remote
                if dev in result.missing] if result.missing else []
        self._count(layer, stats, bounds, result.missing, awaited)
        compute_ms, wait_ms = 1e3 * (t1 - t0), 1e3 * (t2 - t1)
        for s in stats:
            s.compute_ms += compute_ms
            s.wait_ms += wait_ms
        return sum_parts([crit, rlx] + result.parts + comp, m)

    def _count(self, layer: int, stats: list[TokenStats], bounds, missing: dict[str, np.ndarray],
               awaited: dict[str, np.ndarray]) -> None:
        """Each feed's share of an MLP round's relaxed parts: those missing (compensated) and
        awaited on its rows, and how many the round had."""
        for dev in self.remote if missing else ():  # decode: mostly nothing missing
            if dev in missing:
                for s, n in zip(stats, _per_feed(missing[dev], bounds)):
                    if n:
                        s.missing[dev] = s.missing.get(dev, 0) + 1
                        s.missing_rows += n
        for rows in awaited.values():
            for s, n in zip(stats, _per_feed(rows, bounds)):
                s.awaited_rows += n
        for s in stats:
            s.relaxed_parts += len(self.relaxed[layer])

    def _awaited(self, layer: int, x: np.ndarray, relaxed: dict[str, RelaxedPart] | None = None) -> dict[str, np.ndarray]:
        """Device -> bool [T]: tokens where the predictor says one of its relaxed groups matters
        (devices: `relaxed`'s keys, default the remote devices holding relaxed groups in `layer`)."""
        relaxed = self.relaxed[layer] if relaxed is None else relaxed
        return awaited_rows(relaxed, self.predictors[layer], x) if self.await_predicted else {}

    def _compensate(self, layer: int, dev: str, m: np.ndarray, rows: np.ndarray,
                    part: RelaxedPart | None = None) -> np.ndarray | None:
        """The estimate that stands in for `dev`'s relaxed part (`part`, default the plan's) on the
        missing `rows` (zeros elsewhere)."""
        return estimate(self.compensation, self.relaxed[layer][dev] if part is None else part, m, rows)

    # ---- generation ----------------------------------------------------------------------------

    def reusable(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` the devices' KV caches hold from this session (at
        most all but one: the last prompt token must be fed for its logits)."""
        return min(shared_prefix(self.fed[0], prompt), len(prompt) - 1) if self.session else 0

    def generate(self, prompt: list[int], max_tokens: int, session: int = 1, keep_logits: bool = False,
                 eos: int | None = None, on_token=None, choose=None, stop=None, draft=None,
                 draft_tokens: int = 0, reuse: bool = False) -> Generation:
        """choose(logits, tokens so far, prompt first) -> the next token [default: argmax, greedy;
        see core.sampling.Sampler]; stop() -> True ends generation before the next token (a client
        that went away, a stop string). draft: a core.draft.Draft; each decode pass then verifies up
        to draft_tokens of its guesses (core.draft.verify): same tokens, fewer passes. reuse: where
        the prompt starts with tokens the devices hold from this coordinator's session (a chat's
        earlier turns), continue that session from there instead of starting `session` (the same
        tokens: a row's bits do not depend on its pass)."""
        if len(prompt) + max_tokens > self.plan.max_context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max tokens ({max_tokens}) exceeds the plan's "
                             f"max context {self.plan.max_context}")
        if not prompt:
            raise ValueError("the prompt is empty")
        before = len(self.failovers)
        reused = self.reusable(prompt) if reuse else 0
        if reused:  # the KV rows past the shared prefix are overwritten as the prompt's rest is fed
            self.position = reused
            del self.fed[0][reused:]
        else:
            self.reset(session)
        gen = Generation([], [], [], failovers=self.failovers[before:], reused=reused)
        seen = list(prompt)
        feed = list(prompt[reused:])
        while len(gen.tokens) < max_tokens:
            if stop is not None and stop():
                break
            # the prompt's pass drafts nothing; a pass never verifies past max_tokens
            k = min(draft_tokens, max_tokens - len(gen.tokens) - 1) if draft is not None and gen.tokens else 0
            stats = TokenStats()
            t0 = time.perf_counter()  # drafting is part of the pass's time
            guesses = [int(t) for t in draft.propose(seen, k)][:k] if k > 0 else []
            stats.draft_ms = 1e3 * (time.perf_counter() - t0)
            start = self.position
            while True:
                self.step += 1  # a pass run again after a failover gets a new step: no reply cache answers it
                try:
                    if guesses:
                        logits = self.forward(feed + guesses, self.step - 1, stats, all_positions=True)
                    else:
                        logits = self.forward(feed, self.step - 1, stats)[None]
                    break
                except DeviceLost as lost:  # replaced by the plan's failover, then the pass runs again
                    replaced = len(self.failovers)
                    self._fail_over(lost, start)
                    if len(self.failovers) > replaced:  # not when it restarted and rejoined (push rounds)
                        gen.failovers.append(self.failovers[-1])
                        gen.failovers[-1].token = len(gen.tokens)
            tokens, accepted = verify(logits, guesses, seen, choose)
            if guesses:
                # rejected rows are past the new position: the next pass overwrites them on every device
                self.position = start + len(tokens)
                del self.fed[0][self.position:]
            stats.total_ms = 1e3 * (time.perf_counter() - t0)
            gen.passes += 1
            gen.drafted += len(guesses)
            gen.accepted += accepted
            for j, (token, st) in enumerate(zip(tokens, share(stats, len(tokens)))):
                if j and stop is not None and stop():
                    return gen
                seen.append(token)
                gen.tokens.append(token)
                gen.token_stats.append(st)
                if keep_logits:
                    gen.logits.append(logits[j].copy())
                if on_token:
                    on_token(len(gen.tokens) - 1, token, st)
                if (eos is not None and token == eos) or len(gen.tokens) >= max_tokens:
                    return gen
            feed = tokens[-1:]
        return gen


def _per_feed(rows: np.ndarray, bounds: np.ndarray) -> list[int]:
    """How many of `rows` (bool per row of a pass) are true in each feed's rows (`bounds`: row offsets)."""
    if len(bounds) == 2:
        return [int(rows.sum())]
    return np.add.reduceat(rows.astype(np.int64), bounds[:-1]).tolist()
