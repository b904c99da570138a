"""The coordinator: residual stream, per-layer aggregation with relaxed synchronisation, generation.

Per token and layer: normalise the residual, ask every device holding attention heads for its
partial output (awaited: attention holds KV state), add them; normalise again, ask the MLP
devices for their partial sums. Critical MLP parts are awaited. Relaxed parts are used if they
arrive before the deadline, else replaced by compensation (the calibration-mean contribution of
the device's relaxed groups); the predictor promotes a device's relaxed part to awaited on tokens
where it predicts one of its groups matters. How messages travel is the Exchange's business
(in process, UDP, or TCP for the strict baseline), so every path shares this code.

Example:
    >>> # coord = Coordinator(plan, shard, exchange)
    >>> # result = coord.generate(prompt_ids, max_tokens=32)   -> Generation(tokens, stats, ...)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .device import DeviceCompute
from .model import lm_logits, rms_norm
from .plan import Plan
from .predictor import layer_predictor, predict_groups


@dataclass
class RoundResult:
    """What came back for one layer's round."""

    parts: list[torch.Tensor]
    """Partial sums that arrived in time (critical ones always), in device order."""
    missing: list[str] = field(default_factory=list)
    """Devices whose relaxed part missed the deadline and must be compensated."""


class Exchange(Protocol):
    """Moves requests to devices and partial sums back; the coordinator does not care how."""

    def begin(self, session: int) -> None: ...

    def post(self, phase: str, step: int, layer: int, x: torch.Tensor, start: int) -> None: ...

    def collect(self, phase: str, step: int, layer: int, awaited: set[str]) -> RoundResult: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


@dataclass
class TokenStats:
    """Per generated token: where the time went and what was lost."""

    total_ms: float = 0.0
    compute_ms: float = 0.0
    wait_ms: float = 0.0
    missing: dict = field(default_factory=dict)
    """device -> relaxed parts compensated on this token."""
    relaxed_parts: int = 0
    """Relaxed parts expected from remote devices on this token."""


@dataclass
class Generation:
    tokens: list[int]
    """Generated token ids (prompt excluded)."""
    token_stats: list[TokenStats]
    """One per generated token; the first also covers the prompt."""
    logits: list[torch.Tensor]
    """Last-position logits of every step, when asked to keep them."""


class Coordinator:
    def __init__(self, plan: Plan, shard: dict[str, torch.Tensor], exchange: Exchange):
        self.plan, self.cfg, self.exchange = plan, plan.model, exchange
        self.local = DeviceCompute(plan, plan.coordinator, shard)
        self.embed = shard["embed_tokens"]
        self.lm_head = shard.get("lm_head", self.embed)
        self.final_norm = shard["norm"]
        L = self.cfg.num_layers
        self.norms = [(shard[f"layers.{i}.input_layernorm"], shard[f"layers.{i}.post_attention_layernorm"])
                      for i in range(L)]
        self.predictors = [layer_predictor(shard, i) for i in range(L)]
        self.remote = [d for d in plan.device_names if d != plan.coordinator]
        # per layer: which remote devices hold relaxed groups, which group columns are theirs, and
        # the compensation that stands in for their relaxed part when it is missing
        self.relaxed: list[dict[str, tuple[list[int], torch.Tensor]]] = []
        for i in range(L):
            means = shard[f"compensation.{i}.mean"]
            per_dev = {}
            for dev in self.remote:
                idx = [g.index for g in plan.groups_on(dev, i, "mlp") if not g.critical]
                if idx:
                    per_dev[dev] = (idx, means[idx].sum(0))
            self.relaxed.append(per_dev)
        self.position = 0
        self.session = 0

    def reset(self, session: int) -> None:
        self.local.reset()
        self.position = 0
        self.session = session
        self.exchange.begin(session)

    def forward(self, tokens: torch.Tensor, step: int, stats: TokenStats) -> torch.Tensor:
        """Feed tokens at the current position; returns last-position logits."""
        cfg, start = self.cfg, self.position
        h = self.embed[tokens]
        for layer in range(cfg.num_layers):
            in_norm, post_norm = self.norms[layer]
            x = rms_norm(h, in_norm, cfg.rms_norm_eps)
            self.exchange.post("attn", step, layer, x, start)
            t0 = time.perf_counter()
            local = self.local.attention(layer, x, start) if self.local.has_attention(layer) else None
            t1 = time.perf_counter()
            remote = self.exchange.collect("attn", step, layer, set())
            t2 = time.perf_counter()
            h = h + _sum([local] + remote.parts, h)

            m = rms_norm(h, post_norm, cfg.rms_norm_eps)
            awaited = self._awaited(layer, x)
            self.exchange.post("mlp", step, layer, m, start)
            t3 = time.perf_counter()
            crit, rlx = self.local.mlp(layer, m) if self.local.has_mlp(layer) else (None, None)
            t4 = time.perf_counter()
            result = self.exchange.collect("mlp", step, layer, awaited)
            t5 = time.perf_counter()
            comp = [self.relaxed[layer][dev][1].expand_as(h) for dev in result.missing]
            h = h + _sum([crit, rlx] + result.parts + comp, h)
            for dev in result.missing:
                stats.missing[dev] = stats.missing.get(dev, 0) + 1
            stats.relaxed_parts += len(self.relaxed[layer])
            stats.compute_ms += 1e3 * ((t1 - t0) + (t4 - t3))
            stats.wait_ms += 1e3 * ((t2 - t1) + (t5 - t4))
        self.position += tokens.shape[0]
        return lm_logits(cfg, h[-1:], self.final_norm, self.lm_head)[0]

    def _awaited(self, layer: int, x: torch.Tensor) -> set[str]:
        """Remote devices whose relaxed part the predictor says matters for some token here."""
        if not self.relaxed[layer]:
            return set()
        flagged = predict_groups(x, self.predictors[layer]).any(0)
        return {dev for dev, (idx, _) in self.relaxed[layer].items() if bool(flagged[idx].any())}

    @torch.no_grad()
    def generate(self, prompt: list[int], max_tokens: int, session: int = 1, keep_logits: bool = False,
                 eos: int | None = None, on_token=None) -> Generation:
        if len(prompt) + max_tokens > self.plan.max_context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max tokens ({max_tokens}) exceeds the plan's "
                             f"max context {self.plan.max_context}")
        if not prompt:
            raise ValueError("the prompt is empty")
        self.reset(session)
        out, all_stats, kept = [], [], []
        feed = torch.tensor(prompt, dtype=torch.long)
        for step in range(max_tokens):
            stats = TokenStats()
            t0 = time.perf_counter()
            logits = self.forward(feed, step, stats)
            stats.total_ms = 1e3 * (time.perf_counter() - t0)
            token = int(torch.argmax(logits))
            out.append(token)
            all_stats.append(stats)
            if keep_logits:
                kept.append(logits.clone())
            if on_token:
                on_token(step, token, stats)
            if eos is not None and token == eos:
                break
            feed = torch.tensor([token], dtype=torch.long)
        return Generation(out, all_stats, kept)


def _sum(parts: list, like: torch.Tensor) -> torch.Tensor:
    """Sum partials in a fixed order (float addition is not associative; order fixes the bits)."""
    total = torch.zeros_like(like)
    for p in parts:
        if p is not None:
            total = total + p
    return total
