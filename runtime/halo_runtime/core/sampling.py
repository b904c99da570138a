"""Choosing the next token from the logits: greedy, or sampled with temperature, top-k, top-p,
a seed and repetition penalties.

Greedy (temperature 0) stays the default everywhere: it is what the exactness tests compare, and
`Coordinator.generate` uses argmax unless it is given a `Sampler`. Sampling draws from a
numpy `Generator` seeded per request, so the same seed and the same logits give the same tokens;
without a seed each request draws a fresh one. Penalties follow the two common definitions:
`repetition_penalty` as in transformers (a seen token's logit is divided by it when positive,
multiplied when negative; prompt included), `frequency_penalty` and `presence_penalty` as in
OpenAI's API (subtracted per occurrence, and once, for tokens generated so far).

Example:
    >>> import numpy as np
    >>> from halo_runtime.core.sampling import Sampler, SamplingParams
    >>> logits = np.array([0.0, 3.0, 2.9, -1.0], np.float32)
    >>> Sampler(SamplingParams())(logits, [])                            # greedy
    1
    >>> Sampler(SamplingParams(repetition_penalty=2.0))(logits, [1])     # 3.0 / 2 < 2.9
    2
    >>> pick = lambda seed: [Sampler(SamplingParams(temperature=1.0, seed=seed))(logits, []) for _ in range(3)]
    >>> pick(7) == pick(7)
    True
    >>> Sampler(SamplingParams(temperature=5.0, top_k=1, seed=1))(logits, [])   # top-k 1 is greedy
    1
    >>> SamplingParams(top_p=0)
    Traceback (most recent call last):
    ...
    ValueError: top_p must be in (0, 1], got 0
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen."""

    temperature: float = 0.0
    """0 = greedy (argmax); above 0, logits are divided by it before sampling."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 = no limit."""
    top_p: float = 1.0
    """Sample only among the most likely tokens whose probabilities add up to top_p (nucleus)."""
    repetition_penalty: float = 1.0
    """transformers' penalty on every token seen so far (prompt included); 1 = none."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it was generated; 0 = none."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token generated so far; 0 = none."""
    seed: int | None = None
    """Seed of the draws; None = a fresh random seed per Sampler."""

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2 ** 63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize(logits: np.ndarray, seen: list[int], generated: list[int], p: SamplingParams) -> np.ndarray:
    """`logits` [vocab] with the repetition, frequency and presence penalties applied (a new array)."""
    out = np.array(logits, dtype=np.float32)
    if p.repetition_penalty != 1.0 and seen:
        idx = np.array(sorted(set(seen)), dtype=np.int64)
        vals = out[idx]
        out[idx] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and generated:
        counts = np.bincount(np.array(generated, dtype=np.int64), minlength=out.shape[0]).astype(np.float32)
        out -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).astype(np.float32)
    return out


def restrict(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """`logits` with every token outside the top-k and the top-p nucleus set to -inf (the most
    likely token always stays)."""
    out = np.array(logits, dtype=np.float32)
    if 0 < top_k < out.shape[0]:
        kth = np.partition(out, -top_k)[-top_k]
        out[out < kth] = -math.inf
    if top_p < 1.0:
        order = np.argsort(-out, kind="stable")
        probs = softmax(out[order])
        # drop a token when the ones before it already reach top_p (transformers' rule)
        drop = (np.cumsum(probs) - probs) >= top_p
        drop[0] = False
        out[order[drop]] = -math.inf
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def draw(p: np.ndarray, generator: np.random.Generator) -> int:
    """One index drawn with probabilities proportional to p (inverse CDF: one uniform draw)."""
    c = np.cumsum(p, dtype=np.float64)
    return int(min(np.searchsorted(c, generator.random() * c[-1], side="right"), len(p) - 1))


class Sampler:
    """Chooses tokens for one request: call it with the logits and every token so far (prompt first)."""

    def __init__(self, params: SamplingParams, prompt_tokens: int = 0):
        """prompt_tokens: how many of the tokens it is given are the prompt (penalties count the rest)."""
        self.params, self.prompt_tokens = params, prompt_tokens
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray, tokens: list[int]) -> int:
        if self.params.greedy:
            p = self.params
            return int(np.argmax(penalize(logits, tokens, tokens[self.prompt_tokens:], p)))
        return draw(self.distribution(logits, tokens), self.generator)

    def distribution(self, logits: np.ndarray, tokens: list[int]) -> np.ndarray | None:
        """The probabilities [vocab] the next token is drawn from; None when greedy (no draw). Draft
        verification (core.draft.verify) needs them for the speculative-sampling rule."""
        p = self.params
        if p.greedy:
            return None
        logits = penalize(logits, tokens, tokens[self.prompt_tokens:], p)
        return softmax(restrict(logits / p.temperature, p.top_k, p.top_p))
