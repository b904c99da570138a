"""Step 2, profile: run the model on calibration text, layer by layer, and keep streaming statistics.

`profile_layers` reads one layer's weights at a time, runs every calibration chunk through it
(the chunks' hidden states, calibration tokens x hidden, are what stays between layers) and hands
the layer's statistics and weights to the caller before reading the next layer: peak memory is
one layer plus the calibration activations, whatever the model's size. Each chunk goes through
the same operations as a whole-model pass would, so the numbers are the same.

Per layer it accumulates, over every calibration token, sums of each MLP neuron's activation
act(gate(x))*up(x) (signed, absolute and squared) and of each attention head's output norm
||o_proj[:, h] @ attn_h||. Memory is bounded whatever the token count: the sums are per neuron
and per head, and a fixed-size, seeded sample of tokens keeps the normalised inputs the later
steps need, and those tokens' MLP activations (co-activation grouping and the predictor's labels).

Example (a random two-layer model, saved and loaded as any HF checkpoint):
    >>> import tempfile
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from halo_compile.load import load_model
    >>> from halo_compile.profiling import profile_layers
    >>> path = (tmp := tempfile.TemporaryDirectory()).name
    >>> LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                              num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    >>> [(i, tuple(s.mlp_in.shape), len(w)) for i, s, w in profile_layers(load_model(path, progress=False),
    ...                                                                 [[1, 2, 3, 4] * 8], 16, progress=False)]
    [(0, (16, 16), 9), (1, (16, 16), 9)]
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from halo_runtime.core.config import ModelConfig
from tqdm import tqdm

from .floats import DTYPE
from .load import LAYER_TENSORS
from .reference import KVCache, attention_heads, decoder_layer, mlp_activations


@dataclass
class LayerStats:
    """Streaming sums for one layer, and its sampled tokens, in float64 (`halo_compile.floats`)."""

    tokens: int
    """Tokens accumulated."""
    act_sum: torch.Tensor
    """[intermediate] sum of signed activations."""
    act_abs_sum: torch.Tensor
    """[intermediate] sum of |activation|."""
    act_sq_sum: torch.Tensor
    """[intermediate] sum of activation squared."""
    head_norm_sum: torch.Tensor
    """[heads] sum over tokens of ||o_proj[:, h] @ attn_h||."""
    kv_norm_sum: torch.Tensor
    """[kv heads] sum of the norm of each whole KV-head group's output."""
    attn_in: torch.Tensor
    """[sample, hidden] sampled layer inputs after input_layernorm (the predictor's input)."""
    mlp_in: torch.Tensor
    """[sample, hidden] the same tokens' inputs after post_attention_layernorm (the MLP's input)."""
    mlp_act: torch.Tensor
    """[sample, intermediate] the same tokens' MLP activations act(gate(m))*up(m): computed here
    anyway, and kept so grouping and the predictor's labels need not compute them again."""

    @property
    def mean_act(self) -> torch.Tensor:
        return self.act_sum / max(self.tokens, 1)

    @property
    def mean_abs_act(self) -> torch.Tensor:
        return self.act_abs_sum / max(self.tokens, 1)


def _sample_positions(total: int, sample: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(sample, total)
    return torch.randperm(total, generator=gen)[:k].sort().values


def _layer(weights: dict, i: int, name: str) -> torch.Tensor:
    return weights[f"model.layers.{i}.{name}.weight"]


def _attention(cfg: ModelConfig, w: dict, i: int, s, x: torch.Tensor) -> torch.Tensor:
    """Layer i's attention output on x; adds its per-head and per-KV-group output norms to s."""
    T, H, KV = x.shape[0], cfg.num_heads, cfg.num_kv_heads
    heads = attention_heads(cfg, x, 0, _layer(w, i, "self_attn.q_proj"),
                            _layer(w, i, "self_attn.k_proj"), _layer(w, i, "self_attn.v_proj"), KVCache())
    o = _layer(w, i, "self_attn.o_proj").view(cfg.hidden_size, H, cfg.head_dim)
    # per-head contribution to the residual stream: [T, H, hidden]
    per_head = torch.einsum("thd,khd->thk", heads, o)
    s.head_norm_sum += per_head.norm(dim=-1).sum(0)
    per_kv = per_head.view(T, KV, cfg.group_size, -1).sum(2)
    s.kv_norm_sum += per_kv.norm(dim=-1).sum(0)
    return per_head.sum(1)


def _mlp(w: dict, i: int, keep: torch.Tensor, s, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Layer i's MLP output on m; adds its activation sums to s and keeps the sampled rows of x and m."""
    act = mlp_activations(m, _layer(w, i, "mlp.gate_proj"), _layer(w, i, "mlp.up_proj"))
    s.act_sum += act.sum(0)
    s.act_abs_sum += act.abs().sum(0)
    s.act_sq_sum += act.pow(2).sum(0)
    s.tokens += m.shape[0]
    if keep.numel():
        s.attn_in.append(x[keep].clone())
        s.mlp_in.append(m[keep].clone())
        s.mlp_act.append(act[keep].clone())
    return act @ _layer(w, i, "mlp.down_proj").T


def layer_weights(model, i: int) -> dict[str, torch.Tensor]:
    """Layer i's tensors, HF-named, read from the checkpoint, in the compiler's float type."""
    return {f"model.layers.{i}.{t}.weight": model.weights[f"model.layers.{i}.{t}.weight"].to(DTYPE)
            for t in LAYER_TENSORS}


@torch.no_grad()
def profile_layers(model, chunks: list[list[int]], sample_tokens: int = 4096, seed: int = 0,
                   progress: bool = True) -> Iterator[tuple[int, LayerStats, dict[str, torch.Tensor]]]:
    """Stream `chunks` of token ids (each chunk its own context) through the model one layer at a
    time; yields (layer, its LayerStats, its weights) before reading the next layer. Everything is in
    float64 (`halo_compile.floats`), so the statistics are the same on every CPU to ~1e-14."""
    cfg: ModelConfig = model.config
    L, I, H, KV = cfg.num_layers, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads
    f64 = dict(dtype=DTYPE)
    total = sum(len(c) for c in chunks)
    chosen = _sample_positions(total, sample_tokens, seed)
    embed = model.weights["model.embed_tokens.weight"]
    hidden = [embed[torch.tensor(c, dtype=torch.long)].to(DTYPE) for c in chunks]
    del embed
    starts = [sum(len(c) for c in chunks[:k]) for k in range(len(chunks))]
    for i in tqdm(range(L), desc="profile", unit="layer", disable=not progress, leave=False):
        w = layer_weights(model, i)
        s = LayerStats(0, torch.zeros(I, **f64), torch.zeros(I, **f64), torch.zeros(I, **f64),
                       torch.zeros(H, **f64), torch.zeros(KV, **f64), [], [], [])
        for k, (h, offset) in enumerate(zip(hidden, starts, strict=True)):
            T = h.shape[0]
            keep = chosen[(chosen >= offset) & (chosen < offset + T)] - offset
            hidden[k] = decoder_layer(cfg, h, _layer(w, i, "input_layernorm"), _layer(w, i, "post_attention_layernorm"),
                                      partial(_attention, cfg, w, i, s), partial(_mlp, w, i, keep, s))
        empty = torch.zeros(0, cfg.hidden_size, **f64)
        s.attn_in = torch.cat(s.attn_in) if s.attn_in else empty
        s.mlp_in = torch.cat(s.mlp_in) if s.mlp_in else empty
        s.mlp_act = torch.cat(s.mlp_act) if s.mlp_act else torch.zeros(0, I, **f64)
        yield i, s, w
