"""Draft tokens for exact multi-token verification (speculative decoding).

A decode pass costs about the same whether its rounds carry one token row or a few (a round is
latency, not arithmetic). So before a pass the coordinator asks a draft for k tokens that may
follow, feeds the last token and the k guesses in one pass of T = k + 1 rows, and keeps what
its own choice confirms (`verify`): the longest prefix of the guesses that greedy decoding would
have produced, plus the one token its logits give after that prefix. The answer never changes;
only the number of passes does. Rejected rows were written to every KV cache at positions past
what is kept; the next pass starts at the first of them, and every device overwrites a cache
from the start position a request carries (`DeviceCompute.attention` truncates to it).

Sources (`DraftOptions.source`):
- `lookup`: prompt lookup. The latest earlier occurrence of the last n tokens (n = 3, 2, 1) in
  the prompt and the output so far, and what followed it. Free; pays on text that quotes or
  repeats its context.
- `self`: HALO's own placement as the draft: the coordinator's own attention heads and MLP
  groups, run on its own KV cache; every MLP group held elsewhere is replaced by its calibration
  mean (relaxed ones by the plan's low-rank estimate when it has one), remote attention heads are
  left out (nothing estimates them). No second model, but k sequential passes over the
  coordinator's share of the model per decode pass.
- a path: a small HF LLaMA checkpoint (config.json + *.safetensors) with the plan's vocabulary,
  run whole on the coordinator (`segment.LocalModel`: one graph per pass) with its own KV cache.

Every source drafts greedily, so its draft distribution is one-hot and the speculative-sampling
rule (Leviathan et al. 2023, Chen et al. 2023) accepts guess x with probability p(x) and, on a
rejection, draws from p with x removed: the tokens keep exactly the target distribution.

Example (lookup continues the text after the latest earlier "and the cat"; verification keeps
the guesses greedy decoding confirms, and the token after them):
    >>> import numpy as np
    >>> from halo_runtime.core.draft import DraftOptions, lookup_draft, verify
    >>> seen = [7, 1, 2, 3, 4, 9, 7, 1, 2]       # "and the cat sat on ... and the cat"
    >>> lookup_draft(seen, 3)
    [3, 4, 9]
    >>> rows = np.eye(10, dtype=np.float32)[[3, 4, 5, 6]]   # one-hot rows: the model's argmaxes
    >>> verify(rows, [3, 4, 9], seen)            # 3 and 4 confirmed, 9 replaced by 5
    ([3, 4, 5], 2)
    >>> DraftOptions(source="none").enabled, DraftOptions().enabled
    (False, True)
    >>> DraftOptions(tokens=99)
    Traceback (most recent call last):
    ...
    ValueError: --draft-tokens must be in 0..16, got 99
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from .config import ModelConfig
from .hfconfig import ConfigError, config_from_hf
from .plan import Plan, PlanError
from .sampling import draw

SOURCES = ("none", "lookup", "self")
"""Named draft sources; any other value of `--draft` is a checkpoint directory."""
MAX_DRAFT_TOKENS = 16
"""Most guesses per pass (a pass then carries 17 rows per round)."""
LOOKUP_NGRAM = 3
"""Longest suffix lookup matches; it tries shorter ones (down to one token) when that finds nothing."""


@dataclass(frozen=True)
class DraftOptions:
    """Where guesses come from, and how many per pass."""

    source: str = "lookup"
    """Draft source: none, lookup (n-grams of the prompt and output), self (the coordinator's own groups), or PATH of a small HF LLaMA checkpoint with the plan's vocabulary."""
    # 4: on the built-in model it gained on every prompt measured (docs/BENCHMARKS.md, "Several tokens
    # per pass"); 8 gains more on text that repeats itself but costs chat replies, whose guesses mostly fail
    tokens: int = 4
    """Guesses verified per pass (0 = none)."""

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise ValueError("--draft must be none, lookup, self or a checkpoint directory")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or not 0 <= self.tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"--draft-tokens must be in 0..{MAX_DRAFT_TOKENS}, got {self.tokens}")

    @property
    def enabled(self) -> bool:
        return self.source != "none" and self.tokens > 0


class Draft(Protocol):
    """Guesses the tokens that follow."""

    name: str
    """What `--json` reports as the source."""

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k guesses of what follows `tokens` (the prompt, then every token generated so far)."""


# ---- verification --------------------------------------------------------------------------------

def verify(logits: np.ndarray, guesses: list[int], seen: list[int], choose=None) -> tuple[list[int], int]:
    """(tokens, guesses accepted) of a pass whose rows [len(guesses) + 1, vocab] followed `seen`,
    then `seen` + guesses[:i] for row i.

    choose(logits, tokens so far) -> token, as `Coordinator.generate` takes it [default: argmax].
    A choice with a `distribution(logits, tokens)` that returns probabilities (a sampling
    `core.sampling.Sampler`) gets the speculative-sampling rule, its draws from its `generator`;
    any other choice must be deterministic, and is applied row by row: the tokens are exactly
    the ones it would choose one pass at a time from the same logits.
    """
    out = []
    distribution = getattr(choose, "distribution", None)
    for i in range(len(guesses) + 1):
        context = seen + out
        p = distribution(logits[i], context) if distribution is not None else None
        if p is None:
            token = int(np.argmax(logits[i])) if choose is None else int(choose(logits[i], context))
            if i < len(guesses) and token == guesses[i]:
                out.append(token)
                continue
            return out + [token], i
        if i < len(guesses):
            # the draft is one-hot on the guess x: accept with min(1, p(x) / 1), else draw from
            # max(0, p - onehot(x)) normalised, i.e. p without x
            x = guesses[i]
            if choose.generator.random() < float(p[x]):
                out.append(x)
                continue
            p = p.copy()
            p[x] = 0.0
            return out + [draw(p, choose.generator)], i
        return out + [draw(p, choose.generator)], i
    raise AssertionError("unreachable")


# ---- lookup ----------------------------------------------------------------------------------------

def shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def lookup_draft(tokens: list[int], k: int, ngram: int = LOOKUP_NGRAM) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens, for the
    longest n <= ngram that occurs; a continuation that runs into the end goes on from its own
    guesses (so a repeating loop is drafted whole). [] when nothing matches.

    A short match is weak evidence: an n-gram shorter than `ngram` drafts at most n tokens. In the
    loss sweep's prose prompts a 1-token match drafted 4 tokens that were accepted ~5% of the time,
    and every drafted row costs bytes on every link (a 5-row fp16 request is ~5 datagrams)."""
    end = len(tokens)
    for n in range(min(ngram, end - 1), 0, -1):
        suffix = tokens[end - n:]
        first = suffix[0]
        for i in range(end - n - 1, -1, -1):  # latest first: recent text predicts best
            if tokens[i] == first and tokens[i:i + n] == suffix:
                seq = list(tokens)
                for j in range(k if n >= ngram else min(k, n)):
                    seq.append(seq[i + n + j])
                return seq[end:]
    return []


class LookupDraft:
    """Prompt lookup: n-grams of the prompt and the output so far."""

    name = "lookup"

    def propose(self, tokens: list[int], k: int) -> list[int]:
        return lookup_draft(tokens, k)


# ---- drafts that run a model -----------------------------------------------------------------------

class _CachedDraft:
    """A draft model with its own KV cache, kept across passes: each proposal feeds only the tokens
    it has not seen, after rewinding its cache to the longest prefix it shares with them."""

    name = "model"

    def __init__(self):
        self.fed: list[int] = []
        """Tokens whose keys and values the draft's cache holds, in order."""

    def _logits(self, tokens: list[int], start: int) -> np.ndarray:
        """Last-row logits [vocab] of `tokens` fed at position `start`, the cache cut there first."""
        raise NotImplementedError

    def propose(self, tokens: list[int], k: int) -> list[int]:
        if k <= 0 or not tokens:
            return []
        keep = min(shared_prefix(self.fed, tokens), len(tokens) - 1)  # at least one token fed: its logits guess first
        logits = self._logits(tokens[keep:], keep)
        self.fed = list(tokens)
        out = []
        for j in range(k):
            out.append(int(np.argmax(logits)))
            if j + 1 < k:
                logits = self._logits(out[-1:], len(self.fed))
                self.fed.append(out[-1])
        return out


class CheckpointDraft(_CachedDraft):
    """A small HF LLaMA checkpoint run whole on the coordinator."""

    def __init__(self, path: str | Path, plan: Plan, plan_dir: str | Path | None = None, threads: int = 1):
        from .segment import LocalModel

        super().__init__()
        path = Path(path)
        self.name = str(path)
        cfg, weights = load_checkpoint(path)
        if cfg.vocab_size != plan.model.vocab_size:
            raise PlanError(f"--draft {path}: vocabulary of {cfg.vocab_size} tokens; the plan's model has "
                            f"{plan.model.vocab_size} (a draft must use the plan's tokenizer)")
        if plan_dir is not None:
            _check_same_tokenizer(path, Path(plan_dir))
        self.model = LocalModel(cfg, weights, "fp32", plan.max_context + MAX_DRAFT_TOKENS, threads)

    def _logits(self, tokens: list[int], start: int) -> np.ndarray:
        return self.model.logits(tokens, start)


class SelfDraft(_CachedDraft):
    """The coordinator's own groups, with calibration means (or low-rank estimates) for the MLP
    groups other devices hold and nothing for their attention heads."""

    name = "self"

    def __init__(self, coordinator):
        from .device import DeviceCompute
        from .segment import Runner, Segment

        super().__init__()
        c = self.coord = coordinator
        plan, L = c.plan, c.cfg.num_layers
        # the same (mapped) weights, its own KV cache
        self.local = DeviceCompute(plan, plan.coordinator, c.shard, c.threads)
        self.runner = Runner(self.local, c.tables, plan.max_context, c.threads)
        self.embed = Segment((), embed=True, head=False, predictor_layer=None)
        self.head = Segment((), embed=False, head=True, predictor_layer=None)
        self.extra: list[np.ndarray | None] = []
        """Per layer: the summed means of the remote MLP groups no relaxed part covers."""
        for i in range(L):
            covered = {g for part in c.relaxed[i].values() for g in part.groups}
            remote = [g.index for g in plan.groups if g.layer == i and g.kind == "mlp"
                      and g.device != plan.coordinator and g.index not in covered]
            means = np.asarray(c.shard[f"compensation.{i}.mean"], dtype=np.float32)
            self.extra.append(means[remote].sum(0) if remote else None)

    def _logits(self, tokens: list[int], start: int) -> np.ndarray:
        from .coordinator import rms_norm, sum_parts

        c, eps = self.coord, self.coord.cfg.rms_norm_eps
        h, _, _ = self.runner.run("embed", self.embed, np.asarray(tokens, dtype=np.int32), start)
        every = np.ones(h.shape[0], dtype=bool)  # every row of every relaxed part is "missing"
        for i in range(c.cfg.num_layers):
            x = rms_norm(h, c.tables.norms[i][0], eps)
            if self.local.has_attention(i):
                h = h + self.local.attention(i, x, start)
            m = rms_norm(h, c.tables.norms[i][1], eps)
            local = list(self.local.mlp(i, m)) if self.local.has_mlp(i) else []
            estimates = [c._compensate(i, dev, m, every) for dev in c.relaxed[i]]
            h = h + sum_parts(local + estimates + [self.extra[i]], m)
        _, _, logits = self.runner.run("head", self.head, h, start)
        return logits[-1]


# ---- opening a source ------------------------------------------------------------------------------

def prepare_draft(options: DraftOptions, plan: Plan, plan_dir: str | Path | None = None
                  ) -> Callable[[object], Draft] | None:
    """What makes the draft of a Coordinator (None: no drafts). A checkpoint is loaded and checked
    here, once: a bad path fails before any device starts."""
    if not options.enabled:
        return None
    if options.source == "lookup":
        return lambda coordinator: LookupDraft()
    if options.source == "self":
        return SelfDraft
    draft = CheckpointDraft(options.source, plan, plan_dir)
    return lambda coordinator: draft


def load_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, float32 weights under shard names) of an HF LLaMA directory; PlanError names what is wrong."""
    from .shards import PROJ, read_safetensors, shard_name

    where = f"--draft {path}"
    if not path.is_dir():
        raise PlanError(f"{where}: not a directory (expected none, lookup, self or a checkpoint directory)")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"{where}: config.json unreadable ({e.__class__.__name__}: {e})") from None
    try:
        cfg = config_from_hf(raw, f"{where}/config.json")
    except ConfigError as e:
        raise PlanError(str(e)) from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PlanError(f"{where}: no *.safetensors weights")
    weights = {}
    for f in files:
        try:
            weights.update(read_safetensors(f, floats=True))
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise PlanError(f"{where}: {f.name} unreadable ({e})") from None
    names = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight"}
    for i in range(cfg.num_layers):
        names.update({shard_name(i, p): f"model.layers.{i}.{hf}.weight" for p, hf in PROJ.items()})
        names.update({f"layers.{i}.{n}": f"model.layers.{i}.{n}.weight"
                      for n in ("input_layernorm", "post_attention_layernorm")})
    if not cfg.tie_word_embeddings:
        names["lm_head"] = "lm_head.weight"
    missing = [hf for hf in names.values() if hf not in weights]
    if missing:
        raise PlanError(f"{where}: weights lack {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return cfg, {short: np.ascontiguousarray(weights[hf], dtype=np.float32) for short, hf in names.items()}


def _check_same_tokenizer(path: Path, plan_dir: Path) -> None:
    """Refuse a draft whose tokenizer.json maps tokens to other ids than the plan's."""
    from .plandir import TOKENIZER_FILE

    theirs, ours = path / "tokenizer.json", plan_dir / TOKENIZER_FILE
    if not theirs.exists() or not ours.exists():
        return  # the vocabulary size was checked; nothing more to compare

    def vocab(p: Path) -> dict:
        data = json.loads(p.read_text(encoding="utf-8"))
        added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        return {**data.get("model", {}).get("vocab", {}), **added}

    try:
        same = vocab(theirs) == vocab(ours)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PlanError(f"--draft {path}: tokenizer.json unreadable ({e})") from None
    if not same:
        raise PlanError(f"--draft {path}: its tokenizer.json differs from the plan's (a draft must use the "
                        "plan's tokenizer)")
