"""`halo-compile eval`: perplexity of a compiled plan under simulated packet loss, with the runtime's math.

The plan with nothing lost gives the reference perplexity: its own weight format, computed by the
runtime's kernels (equal to the single-device model's; for fp32 plans, to the reassembled full
model's up to fp32 rounding). The plan
is then executed by `halo_runtime`'s Coordinator over an InProcessExchange: the same aggregation,
predictor, deadline and compensation code the devices run, without sockets. Each lossy device's
relaxed part of each (token, layer) is missed with the probability the runtime's delivery policy
gives for its loss rate (`DeliveryPolicy.miss_probability`: request or reply lost on every
attempt before the deadline); critical and awaited parts always arrive, as they are
retransmitted until they do. A link that loses in bursts (its profile's `burst`, or `--burst L`,
which runs each loss rate both ways) is simulated as a Gilbert channel (`core.policy.BurstyLink`):
a burst takes a device's parts in consecutive layers and tokens, and its re-requests with them.
Text is scored in non-overlapping windows (context 512), each fed
at once like a prefill while loss is drawn per token row, as decode would see it. Every method
at one loss rate sees the same random draws, so their differences do not come from different draws.

Perplexity can hide a near-tie that flips a free-running reply, so each run also reports how often
the plan's most likely next token is the lossless plan's (`top1_agreement`, teacher-forced over the
text) and, for a few prompts (each window's first PROMPT_TOKENS tokens), how many tokens of a
greedy reply generated under loss equal the lossless reply before the first difference
(`greedy_matched`, mean over prompts; a flip early in a reply changes everything after it).

Methods (see METHODS): "zero", "mean", "lowrank" (compensation only, never wait); "predictor"
and "predictor+lowrank" (wait where the predictor flags a group, compensate the rest);
"loss-blind" (the runtime's default method on the same groups re-placed by
`place.place_loss_blind`, which ignores loss). The default, listed first, is what
`Coordinator(plan, shard, exchange)` does.

Example (`evaluate(plan_dir, EvalOptions(plrs=(0.05,)))` scores a compiled plan with its shards;
the checked-in plan.json alone gives the miss rates it simulates, at 5% loss on the lossy links):
    >>> from halo_compile.evaluate import METHODS, EvalOptions, miss_rates
    >>> from halo_runtime.core.plan import load_plan
    >>> from halo_runtime.core.policy import DeliveryPolicy
    >>> rates = miss_rates(load_plan("artifacts/smollm2-135m-pi5"), plr=0.05, policy=DeliveryPolicy())
    >>> {d: round(q, 6) for d, q in rates.items()}     # the plan sends 2 copies to and from each
    {'pi5-1': 0.0, 'pi5-2': 2.5e-05, 'pi5-3': 2.5e-05}
    >>> rates = miss_rates(load_plan("artifacts/smollm2-135m-pi5"), plr=0.05, policy=DeliveryPolicy(redundancy=1))
    >>> {d: round(q, 4) for d, q in rates.items()}     # one copy: both attempts must be lost
    {'pi5-1': 0.0, 'pi5-2': 0.0095, 'pi5-3': 0.0095}
    >>> EvalOptions(methods=("lowrank", "retry"))
    Traceback (most recent call last):
    ...
    ValueError: unknown method 'retry' (known: predictor+lowrank, predictor, lowrank, mean, zero, loss-blind)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from halo_runtime.core.coordinator import Coordinator, TokenStats
from halo_runtime.core.exchange import DeviceStats, InProcessExchange
from halo_runtime.core.plan import Plan, PlanError, load_plan
from halo_runtime.core.plandir import TOKENIZER_FILE
from halo_runtime.core.policy import DeliveryPolicy
from halo_runtime.core.predictor import layer_predictor, predict_groups
from halo_runtime.core.push import ROUNDS, InProcessPush, PushCoordinator
from halo_runtime.core.shards import load_shard
from tqdm import tqdm

from .calib import CalibError, evaluation_text, read_text_file, token_chunks
from .predict import group_contributions, matters
from .reference import KVCache, attention_partial, decoder_layer, mlp_partial
from .slicing import assemble, slice_device


@dataclass(frozen=True)
class Method:
    """How the coordinator copes with a missing relaxed part, and on which placement."""

    compensation: str | None
    """A halo_runtime.coordinator.COMPENSATIONS entry; None = the plan's default."""
    await_predicted: bool
    """Wait for relaxed parts on the tokens where the predictor flags them."""
    loss_blind: bool = False
    """Run on the groups re-placed ignoring loss."""


METHODS = {
    "predictor+lowrank": Method("lowrank", True),
    "predictor": Method("mean", True),
    "lowrank": Method("lowrank", False),
    "mean": Method("mean", False),
    "zero": Method("zero", False),
    "loss-blind": Method(None, True, loss_blind=True),
}
CONTEXT = 512
RECALL_WINDOWS = 4
"""Windows on which the predictor's recall is measured (one extra full-model pass each)."""
PROMPT_TOKENS = 32
"""Tokens at the start of a window that prompt its greedy reply (see `greedy_replies`)."""


@dataclass(frozen=True)
class EvalOptions:
    """Knobs of `halo-compile eval`."""

    plrs: tuple[float, ...] | None = None
    """Loss rates to put on the plan's lossy links; None = the profile's own rates."""
    burst: float | None = None
    """Mean loss burst length (datagrams) to compare: each loss rate is then run with independent
    losses and with bursts of this length on the lossy links; None = the profile's own bursts."""
    tokens: int = 8192
    """Evaluation tokens (the text is cut into windows of `context`)."""
    context: int = CONTEXT
    """Window length; windows do not overlap."""
    text_file: str | None = None
    """UTF-8 text to score; None = the evaluation half of the built-in Wikipedia articles."""
    seed: int = 0
    """Seed of the simulated loss."""
    methods: tuple[str, ...] | None = None
    """Subset of METHODS to run; None = every method the plan supports."""
    policy: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    """The runtime delivery policy whose miss rates are simulated."""
    wire: str = "fp32"
    """Wire dtype simulated in process: fp32 isolates loss from rounding; fp16 is what halo-run sends."""
    recall_windows: int = RECALL_WINDOWS
    """Windows on which the predictor's recall is measured (0 = skip)."""
    greedy_prompts: int = 8
    """Windows whose first PROMPT_TOKENS tokens prompt a greedy reply under loss, compared token by
    token with the reply nothing lost gives (0 = skip)."""
    greedy_tokens: int = 32
    """Tokens of each greedy reply."""
    solver_time: float = 10.0
    """CP-SAT deterministic time for the loss-blind re-placement."""
    progress: bool = True
    """Progress bar on stderr."""
    rounds: str = "plan"
    """How network rounds travel: "plan" (as the plan says, what halo-run does by default), "star"
    (through the coordinator) or "push" (every device adds the parts on its own view of the
    residual, drawing its own misses; the plan's star rounds among them)."""
    predictive: tuple[str, ...] = ()
    """Devices that skip the MLP groups the predictor marks inactive per token (`halo-run worker
    --load-mode predictive`); the perplexity then includes what that costs."""

    def __post_init__(self):
        if self.tokens < 2 or self.context < 2:
            raise ValueError("tokens and context must be >= 2")
        if self.burst is not None and self.burst < 1:
            raise ValueError(f"burst {self.burst}: a mean burst length is at least 1 datagram")
        if self.greedy_prompts < 0 or self.greedy_tokens < 1:
            raise ValueError("greedy_prompts must be >= 0 and greedy_tokens >= 1")
        for p in self.plrs or ():
            if not 0.0 <= p < 1.0:
                raise ValueError(f"loss rate {p} is outside [0, 1)")
        if self.wire not in ("fp32", "fp16"):
            raise ValueError(f"wire {self.wire!r}: fp32 or fp16")
        if self.rounds not in ("plan", *ROUNDS):
            raise ValueError(f"rounds {self.rounds!r}: one of plan, {', '.join(ROUNDS)}")
        unknown = sorted(set(self.methods or ()) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r} (known: {', '.join(METHODS)})")


def default_method(plan_dir: str | Path, plan: Plan | None = None) -> str:
    """The METHODS name of what the runtime coordinator does with this plan."""
    shard = _coordinator_keys(plan_dir, plan or load_plan(plan_dir))
    return "predictor+lowrank" if "compensation.0.groups" in shard else "predictor"


def _coordinator_keys(plan_dir, plan: Plan) -> set[str]:
    from safetensors import safe_open

    path = Path(plan_dir) / plan.shard_file(plan.coordinator)
    if not path.exists():
        raise PlanError(f"{path}: shard of device {plan.coordinator} is missing (recompile or copy it here)")
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def evaluation_windows(plan_dir: str | Path, text_file: str | None, tokens: int, context: int) -> list[list[int]]:
    """Token windows of the evaluation text, tokenised with the plan's own tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tok_file = Path(plan_dir) / TOKENIZER_FILE
    if not tok_file.exists():
        raise PlanError(f"{tok_file}: missing (it is written by halo-compile plan)")
    text = read_text_file(text_file) if text_file else evaluation_text()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
    ids = tok(text[: tokens * 8], add_special_tokens=False)["input_ids"]  # ~4 characters a token
    windows = token_chunks(ids, context, tokens)
    if not windows:
        raise CalibError(f"{text_file or 'evaluation text'}: too short to score")
    return windows


def link_losses(plan: Plan, plr: float | None, burst: float | None = None) -> dict[str, tuple[float, float]]:
    """Per remote device, (loss rate, mean burst length; 0 = independent) of its link: plr and burst
    override the profile's on its lossy links (None keeps them)."""
    out = {}
    for d in plan.devices:
        if d.name != plan.coordinator:
            lossy = d.loss > 0
            out[d.name] = (plr if lossy and plr is not None else d.loss,
                           burst if lossy and burst is not None else d.burst)
    return out


def miss_rates(plan: Plan, plr: float | None, policy: DeliveryPolicy, burst: float | None = None) -> dict[str, float]:
    """Per remote device, the chance a relaxed part misses its deadline (plr, burst override lossy links)."""
    return {name: policy.miss_probability(loss, plan.model.hidden_size, b, plan.link_copies(name))
            for name, (loss, b) in link_losses(plan, plr, burst).items()}


def bursty_links(plan: Plan, plr: float | None, burst: float | None = None) -> dict[str, tuple[float, float]]:
    """The links of `link_losses` that lose in bursts (the in-process exchange's `bursty`)."""
    return {name: lb for name, lb in link_losses(plan, plr, burst).items() if lb[0] > 0 and lb[1] > 0}


def _nll(logits: np.ndarray, window: torch.Tensor) -> float:
    logits = torch.from_numpy(np.asarray(logits))
    return float(torch.nn.functional.cross_entropy(logits[:-1].double(), window[1:], reduction="sum"))


def _windows(windows: list[list[int]]) -> list[torch.Tensor]:
    return [torch.tensor(w, dtype=torch.long) for w in windows if len(w) >= 2]


def full_nll(plan: Plan, shards: dict, windows: list[torch.Tensor], bar=None) -> tuple[list[float], np.ndarray]:
    """Negative log-likelihood per window of the plan with nothing lost (the single-device model),
    and its most likely next token at every scored position."""
    nll, _, top1, _ = plan_nll(plan, shards, windows, METHODS["zero"], {}, 0, bar=bar)
    return nll, top1


def _coordinator(plan: Plan, shards: dict, method: Method, miss: dict[str, float], seed: int, wire: str,
                 computes: dict | None, bursty: dict | None, policy: DeliveryPolicy,
                 rounds: str = "star") -> tuple[Coordinator, InProcessExchange | InProcessPush]:
    if rounds == "push":  # a bursty link's misses drawn independently, at their (bursty) rate
        push = InProcessPush(plan, shards, miss=miss, seed=seed, wire=wire, computes=computes)
        return PushCoordinator(plan, shards[plan.coordinator], push, compensation=method.compensation,
                               await_predicted=method.await_predicted), push
    exchange = InProcessExchange(plan, shards, miss=miss, seed=seed, wire=wire, computes=computes, bursty=bursty,
                                 policy=policy)
    return Coordinator(plan, shards[plan.coordinator], exchange, compensation=method.compensation,
                       await_predicted=method.await_predicted), exchange


@torch.no_grad()
def plan_nll(plan: Plan, shards: dict, windows: list[torch.Tensor], method: Method, miss: dict[str, float],
             seed: int, wire: str = "fp32", bar=None, computes: dict | None = None, bursty: dict | None = None,
             policy: DeliveryPolicy = DeliveryPolicy(),
             rounds: str = "star") -> tuple[list[float], dict[str, DeviceStats], np.ndarray, dict | None]:
    """NLL per window of the plan run by the runtime coordinator under simulated loss, what was
    missed, the most likely next token at every scored position (teacher-forced, windows in a row)
    and, for push rounds, how far the devices' views drifted (`core.push.ViewStats`).
    computes: prebuilt devices by name (e.g. predictive StreamingComputes); bursty: `bursty_links`."""
    coord, exchange = _coordinator(plan, shards, method, miss, seed, wire, computes, bursty, policy, rounds)
    out, top1 = [], []
    for i, w in enumerate(windows):
        coord.reset(i + 1)
        logits = coord.forward(w.numpy(), 0, TokenStats(), all_positions=True)
        out.append(_nll(logits, w))
        top1.append(np.asarray(logits)[:-1].argmax(1))
        bar and bar.update(1)
    views = exchange.drift.to_json() if rounds == "push" else None
    return out, exchange.stats().devices, np.concatenate(top1), views


def greedy_replies(plan: Plan, shards: dict, prompts: list[list[int]], tokens: int, method: Method,
                   miss: dict[str, float], seed: int, wire: str = "fp32", bar=None, computes: dict | None = None,
                   bursty: dict | None = None, policy: DeliveryPolicy = DeliveryPolicy(),
                   rounds: str = "star") -> list[list[int]]:
    """The greedy reply of `tokens` tokens to each prompt, free-running under simulated loss (each
    token's loss drawn as decode meets it), as `halo-run generate` would give it."""
    coord, _ = _coordinator(plan, shards, method, miss, seed, wire, computes, bursty, policy, rounds)
    out = []
    for i, prompt in enumerate(prompts):
        out.append(coord.generate(prompt, tokens, session=i + 1).tokens)
        bar and bar.update(1)
    return out


def matched_prefix(reply: list[int], reference: list[int]) -> int:
    """Tokens of `reply` equal to `reference` before the first that differs."""
    n = 0
    for a, b in zip(reply, reference):
        if a != b:
            break
        n += 1
    return n


def loss_blind_variant(plan: Plan, shards: dict, solver_time: float = 10.0) -> tuple[Plan, dict]:
    """The same groups (criticality included) placed by `place_loss_blind`, with shards re-cut to match."""
    from .place import placement_inputs

    coord = shards[plan.coordinator]
    extras = {k: v for k, v in coord.items() if k.startswith(("predictor.", "compensation."))}
    placed = placement_inputs(plan.model, plan.groups, plan.devices, plan.coordinator, coord, plan.max_context,
                              plan.seed, solver_time, weights=plan.weights).place_loss_blind()
    # the plan's failover and star rounds are its own placement's: the re-placed one has none
    blind = replace(plan, groups=tuple(replace(g, device=placed.assignment[g.id]) for g in plan.groups), failover=(),
                    star_rounds=())
    weights = assemble(plan, shards)
    out = {d: slice_device(blind, d, weights) for d in blind.device_names}
    out[blind.coordinator].update(extras)
    return blind, out


@torch.no_grad()
def predictor_recall(plan: Plan, shards: dict, windows: list[torch.Tensor]) -> dict:
    """How the plan's predictor does on relaxed groups on this text: recall and precision against
    its own training label (group output > threshold x MLP output norm), and the share flagged."""
    cfg, w, coord = plan.model, assemble(plan, shards), shards[plan.coordinator]
    tp = flagged = positive = total = 0
    for tokens in windows:
        h = w["model.embed_tokens.weight"][tokens]
        for i in range(cfg.num_layers):
            lw = lambda n: w[f"model.layers.{i}.{n}.weight"]  # noqa: E731

            def attention(x):
                return attention_partial(cfg, x, 0, lw("self_attn.q_proj"), lw("self_attn.k_proj"),
                                         lw("self_attn.v_proj"), lw("self_attn.o_proj"), KVCache())

            def mlp(x, m):
                nonlocal tp, flagged, positive, total
                groups = plan.layer_groups(i, "mlp")
                contrib = group_contributions(m, lw("mlp.gate_proj"), lw("mlp.up_proj"), lw("mlp.down_proj"),
                                              [list(g.members) for g in groups])
                relaxed = [g.index for g in groups if not g.critical]
                label = matters(contrib, plan.predictor.threshold)[:, relaxed]
                pred = torch.from_numpy(predict_groups(x.numpy(), layer_predictor(coord, i))[:, relaxed])
                tp, flagged = tp + int((pred & label).sum()), flagged + int(pred.sum())
                positive, total = positive + int(label.sum()), total + label.numel()
                return mlp_partial(m, lw("mlp.gate_proj"), lw("mlp.up_proj"), lw("mlp.down_proj"))

            h = decoder_layer(cfg, h, lw("input_layernorm"), lw("post_attention_layernorm"), attention, mlp)
    return {"recall": round(tp / max(positive, 1), 4), "precision": round(tp / max(flagged, 1), 4),
            "flagged": round(flagged / max(total, 1), 4), "positive": round(positive / max(total, 1), 4),
            "tokens": sum(len(t) for t in windows)}


def _ppl(nll: float, count: int) -> float:
    return float(torch.tensor(nll / count).exp())


def evaluate(plan_dir: str | Path, opts: EvalOptions = EvalOptions()) -> dict:
    """Perplexity of the full model and of the plan per loss rate and method (default method first),
    with the plan's top-1 and greedy agreement with the lossless plan."""
    plan = load_plan(plan_dir)
    shards = {d: load_shard(plan_dir, plan, d) for d in plan.device_names}
    default = default_method(plan_dir, plan)
    wanted = list(opts.methods or METHODS)
    if "compensation.0.groups" not in shards[plan.coordinator]:
        wanted = [m for m in wanted if METHODS[m].compensation != "lowrank"]
    methods = [default] + [m for m in wanted if m != default]  # the default always, and first
    windows = _windows(evaluation_windows(plan_dir, opts.text_file, opts.tokens, opts.context))
    count = sum(len(w) - 1 for w in windows)
    plrs = list(opts.plrs) if opts.plrs else [None]
    losses = [(p, b) for p in plrs for b in ([None] if opts.burst is None else [0.0, opts.burst])]
    # at zero loss nothing is missed, so every method on one placement computes the same thing
    runs = [(p, b, m) for p, b in losses for m in methods
            if any(miss_rates(plan, p, opts.policy, b).values()) or m in (methods[0], "loss-blind")]
    prompts = [w[:PROMPT_TOKENS].tolist() for w in windows[:opts.greedy_prompts] if len(w) > PROMPT_TOKENS]
    if PROMPT_TOKENS + opts.greedy_tokens > plan.max_context:
        prompts = []  # a plan this short has no room for the replies
    bar = tqdm(total=(len(windows) + len(prompts)) * (1 + len(runs)), desc="eval", unit="win",
               disable=not opts.progress)
    recall = predictor_recall(plan, shards, windows[:opts.recall_windows]) if opts.recall_windows else None
    full_windows, full_top1 = full_nll(plan, shards, windows, bar)
    full = _ppl(sum(full_windows), count)
    full_replies = greedy_replies(plan, shards, prompts, opts.greedy_tokens, METHODS["zero"], {}, 0, bar=bar)
    computes = _predictive(plan, plan_dir, opts.predictive)
    rounds = plan.rounds if opts.rounds == "plan" else opts.rounds
    blind = None
    results, done = [], {}
    for plr, burst in losses:
        miss = miss_rates(plan, plr, opts.policy, burst)
        bursty = bursty_links(plan, plr, burst)
        for name in methods:
            method = METHODS[name]
            key = (plr, burst, name) if any(miss.values()) else \
                (plr, None, "loss-blind" if method.loss_blind else methods[0])
            if key not in done:
                p, s = plan, shards
                if method.loss_blind:
                    blind = blind or loss_blind_variant(plan, shards, opts.solver_time)
                    p, s = blind
                    method = replace(method, compensation=METHODS[default].compensation)
                devices = None if method.loss_blind else computes
                nll, per_device, top1, views = plan_nll(p, s, windows, method, miss, opts.seed, opts.wire, bar,
                                                        devices, bursty, opts.policy, rounds)
                replies = greedy_replies(p, s, prompts, opts.greedy_tokens, method, miss, opts.seed, opts.wire,
                                         bar, devices, bursty, opts.policy, rounds)
                done[key] = (nll, per_device, top1, replies, views)
            nll, per_device, top1, replies, views = done[key]
            if key[2] != name and not method.await_predicted:  # a zero-loss copy: this method awaits nothing
                per_device = {d: replace(c, awaited=0) for d, c in per_device.items()}
            ppl = _ppl(sum(nll), count)
            results.append({
                "plr": plr if plr is not None else _profile_link(plan, "loss"),
                "burst": burst if burst is not None else _profile_link(plan, "burst"), "method": name, "ppl": round(ppl, 4),
                "delta": round(ppl / full - 1, 6), "delta_se": _stderr(nll, full_windows, count),
                "top1_agreement": round(float((top1 == full_top1).mean()), 6),
                "greedy_matched": round(float(np.mean([matched_prefix(r, f) for r, f in zip(replies, full_replies)])), 3)
                if prompts else None,
                "miss": {d: round(q, 6) for d, q in miss.items() if q},
                "relaxed": {d: _rates(c) for d, c in per_device.items() if c.rows},
                **({"views": views} if views is not None else {})})
    bar.close()
    return {"plan": str(plan_dir), "full_ppl": round(full, 4), "tokens": sum(len(w) for w in windows),
            "predicted_tokens": count, "windows": len(windows), "context": opts.context, "seed": opts.seed,
            "wire": opts.wire, "rounds": rounds, "policy": {"relaxed_retries": opts.policy.relaxed_retries,
                                          "redundancy": opts.policy.redundancy, "wire": opts.policy.wire,
                                          "link_copies": {d: plan.link_copies(d) for d in plan.device_names
                                                          if d != plan.coordinator}},
            "default_method": default, "predictor": recall, "results": results,
            "greedy": {"prompts": len(prompts), "prompt_tokens": PROMPT_TOKENS, "tokens": opts.greedy_tokens},
            **({"predictive": {d: {"computed_share": round(c.pairs[0] / max(c.pairs[1], 1), 4)}
                               for d, c in computes.items()}} if computes else {})}


def _predictive(plan: Plan, plan_dir, names) -> dict:
    """Devices in predictive loading mode, every group resident (skipping does not depend on RAM)."""
    from halo_runtime.storage.groupcache import LoadConfig
    from halo_runtime.storage.streaming import open_streaming

    out = {}
    for name in names:
        if name not in plan.device_names or name == plan.coordinator:
            raise ValueError(f"--predictive {name}: not a device of this plan other than the coordinator "
                             f"({', '.join(d for d in plan.device_names if d != plan.coordinator)})")
        out[name] = open_streaming(plan, plan_dir, name, LoadConfig(budget=2**62, mode="predictive", cold=False))
    return out


def _stderr(nll: list[float], full: list[float], count: int) -> float | None:
    """Standard error of the log-perplexity change, from its spread over windows (each draws its own
    loss); None with a single window."""
    diff = torch.tensor(nll, dtype=torch.float64) - torch.tensor(full, dtype=torch.float64)
    return round(float(diff.std() * len(diff) ** 0.5 / count), 6) if len(diff) > 1 else None


def _profile_link(plan: Plan, field: str) -> float | None:
    """The lossy links' common `loss` or `burst` (0 without lossy links, None where they differ)."""
    values = {getattr(d, field) for d in plan.devices if d.loss > 0}
    return values.pop() if len(values) == 1 else (0.0 if not values else None)


def _rates(c: DeviceStats) -> dict:
    """Per device: share of its (token, layer) relaxed parts lost on the wire, awaited, compensated."""
    n = c.rows
    return {"parts": n, "lost": round(c.lost / n, 6), "awaited": round(c.awaited / n, 6),
            "compensated": round(c.compensated / n, 6)}


def format_table(report: dict) -> str:
    """The report as a table a person reads: perplexity and change per loss rate and method."""
    lines = [f"full model: perplexity {report['full_ppl']:.4f} on {report['tokens']} tokens "
             f"({report['windows']} windows of {report['context']}, seed {report['seed']})",
             f"{'PLR':>9}  {'method':<18} {'ppl':>9} {'change':>8} {'s.e.':>6} {'top-1':>6} {'greedy':>6}  "
             "relaxed parts missed / awaited per device"]
    for r in report["results"]:
        plr = "-" if r["plr"] is None else f"{100 * r['plr']:.1f}%"
        plr += f" b{r['burst']:g}" if r["burst"] else ""
        per = ", ".join(f"{d} {100 * c['compensated']:.2f}%/{100 * c['awaited']:.1f}%"
                        for d, c in r["relaxed"].items() if c["lost"] or c["awaited"])
        se = "-" if r["delta_se"] is None else f"±{100 * r['delta_se']:.3f}"
        greedy = "-" if r["greedy_matched"] is None else f"{r['greedy_matched']:.1f}"
        lines.append(f"{plr:>9}  {r['method']:<18} {r['ppl']:>9.4f} {100 * r['delta']:>+7.3f}% {se:>6} "
                     f"{100 * r['top1_agreement']:>5.1f}% {greedy:>6}  {per}")
    p = report["predictor"]
    if p:
        lines.append(f"predictor on relaxed groups ({p['tokens']} tokens): recall {p['recall']:.3f}, precision "
                     f"{p['precision']:.3f}, flags {100 * p['flagged']:.1f}% of (token, group) pairs")
    g = report["greedy"]
    lines.append(f"top-1: share of positions whose most likely next token is the lossless plan's; greedy: "
                 f"tokens of a {g['tokens']}-token greedy reply equal to the lossless one before the first "
                 f"difference (mean of {g['prompts']} prompts of {g['prompt_tokens']} tokens)")
    lines.append(f"default method (what halo-run does): {report['default_method']}")
    return "\n".join(lines)
