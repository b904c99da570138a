"""LLaMA math in torch, without transformers: the compiler's reference model.

The compiler profiles, groups, trains the predictor and fits compensation on these functions
(torch, batched, with autograd where training needs it); devices run the same math as ggml graphs
(`halo_runtime.core.layers`), and tests hold the two to fp32 rounding. Every function works on a
*subset* of the model (some KV-head groups, some MLP neurons). Numerics follow transformers'
LlamaForCausalLM exactly (fp32 RMSNorm, rotate-half RoPE, optional llama3 RoPE scaling, GQA,
SwiGLU).

`decoder_layer` is where a torch layer's structure is written (normalise, add attention,
normalise, add MLP); whoever runs one passes its own attention and MLP parts: `FullModel` its
local weights, the compiler's profiling and eval the same math plus what they record.

Example:
    >>> import torch
    >>> from halo_runtime.core.config import ModelConfig
    >>> from halo_compile.reference import rope_tables, rms_norm
    >>> cfg = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1, head_dim=4)
    >>> cos, sin = rope_tables(cfg, start=0, length=3)
    >>> tuple(cos.shape), float(rms_norm(torch.ones(1, 8), torch.ones(8), cfg.rms_norm_eps).sum())
    ((3, 4), 7.999...)

The whole model (FullModel, the reference a plan must match), from HF-named random weights;
decoding one token after a cached prefix gives what a prefill of all of them gives:
    >>> from halo_compile.reference import FullModel
    >>> shapes = {"embed_tokens": (32, 8), "norm": (8,), "layers.0.input_layernorm": (8,),
    ...           "layers.0.post_attention_layernorm": (8,), "layers.0.self_attn.q_proj": (8, 8),
    ...           "layers.0.self_attn.k_proj": (4, 8), "layers.0.self_attn.v_proj": (4, 8),
    ...           "layers.0.self_attn.o_proj": (8, 8), "layers.0.mlp.gate_proj": (16, 8),
    ...           "layers.0.mlp.up_proj": (16, 8), "layers.0.mlp.down_proj": (8, 16)}
    >>> model = FullModel(cfg, {f"model.{n}.weight": torch.randn(s) for n, s in shapes.items()})
    >>> prefill = model.logits(torch.tensor([1, 2, 3, 4]))
    >>> model.reset()
    >>> _ = model.logits(torch.tensor([1, 2, 3]))
    >>> tuple(prefill.shape), torch.allclose(model.logits(torch.tensor([4]))[-1], prefill[-1], atol=1e-5)
    ((4, 32), True)

A layer with stand-in parts: attention returns its input x, the MLP its input m (the
normalised residual after attention, here 2 * norm(1 + x) = 2), so the output is 1 + 1 + 2:
    >>> from halo_compile.reference import decoder_layer
    >>> seen = []
    >>> out = decoder_layer(cfg, torch.ones(3, 8), torch.ones(8), 2 * torch.ones(8),
    ...                     attention=lambda x: seen.append("attention") or x,
    ...                     mlp=lambda x, m: seen.append("mlp") or m)
    >>> seen, tuple(out.shape), round(float(out.mean()), 4)
    (['attention', 'mlp'], (3, 8), 4.0)
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from halo_runtime.core.config import ModelConfig


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for a weight tensor [out, in]."""
    return x @ w.T


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == weight.dtype == torch.float32:
        # torch's own op: the same bits as the lines below (checked in tests), in one call instead
        # of seven; decode runs two per layer, and each call costs ~20 us once weights flush the caches
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # transformers normalises half types in fp32; the compiler's float64 stays float64
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * wide.to(x.dtype)


def inv_frequencies(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RoPE's inverse frequencies [head_dim / 2] (llama3 scaling applied), computed in `dtype`
    (float32 as transformers does; float64 for the compiler, see `halo_compile.exact`); computed
    once per shape and kept, as every attention call of every token needs them (callers must not
    write into it)."""
    scaling = cfg.rope_scaling or {}
    key = (cfg.head_dim, cfg.rope_theta, repr(sorted(scaling.items())), dtype)
    inv = _INV_FREQ.get(key)
    if inv is None:
        inv = _INV_FREQ[key] = _inv_frequencies(cfg, dtype)
    return inv


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def _inv_frequencies(cfg: ModelConfig, dtype: torch.dtype) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype) / dim))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") != "llama3":
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, start: int, length: int,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, shape [T, head_dim], in `dtype`, for positions start .. start+length-1;
    the signed sin is sin with its first half negated, which is what `apply_rope` multiplies.

    Every layer of a forward pass asks for the same positions: the last answer is kept (callers
    must not write into it), so decode computes them once per token, not once per layer.
    """
    last = _ROPE_LAST
    if last[0] is not cfg or last[1] != (start, dtype) or last[2] != length:
        freqs = torch.arange(start, start + length).to(dtype)[:, None] * inv_frequencies(cfg, dtype)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        sin[:, :cfg.head_dim // 2].neg_()
        last[:] = [cfg, (start, dtype), length, (emb.cos(), sin)]
    return last[3]


_ROPE_LAST: list = [None, None, None, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [heads, T, head_dim]. transformers' x * cos + rotate_half(x) * sin, bit for bit:
    rotate_half(x) is roll(x, half) with its first half negated, and the negation sits in the
    signed sin (negating is exact), so this is four ops instead of seven."""
    return x * cos[None] + x.roll(x.shape[-1] // 2, -1) * signed_sin[None]


class KVCache:
    """Keys and values [kv_heads, T, head_dim] of some KV heads of one layer.

    Held in buffers that double when full, so a decode step writes one row instead of copying the
    whole cache; `truncate` (a rewind, for retransmissions and rejected drafts) only moves the end.
    """

    def __init__(self):
        self._keys = self._values = None
        self.length = 0

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[:, :self.length]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[:, :self.length]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[1]
        if self._keys is None or end > self._keys.shape[1]:
            capacity = max(end, 2 * self.length, 16)
            keys, values = k.new_empty(k.shape[0], capacity, k.shape[2]), v.new_empty(v.shape[0], capacity, v.shape[2])
            if self.length:
                keys[:, :self.length], values[:, :self.length] = self.keys, self.values
            self._keys, self._values = keys, values
        self._keys[:, self.length:end] = k
        self._values[:, self.length:end] = v
        self.length = end
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


def attention_heads(cfg: ModelConfig, x: torch.Tensor, start: int, q_proj: torch.Tensor,
                    k_proj: torch.Tensor, v_proj: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Per-head attention outputs [T, local query heads, head_dim], before o_proj.

    x is the normalised hidden state [T, hidden] at absolute positions start .. start+T-1
    (following what the cache already holds). The projections hold only this subset's rows, with query
    heads ordered so that local KV head j serves local query heads j*g .. j*g+g-1.
    """
    return attend(cfg, torch.cat((linear(x, q_proj), linear(x, k_proj), linear(x, v_proj)), 1), start, cache)


def attend(cfg: ModelConfig, qkv: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
    """`attention_heads` from the projections already made: qkv [T, (q heads + 2 KV heads) x head_dim]
    is x times the query, key and value rows side by side (a device multiplies them in one call)."""
    T, hd, g = qkv.shape[0], cfg.head_dim, cfg.group_size
    kv = qkv.shape[1] // (hd * (g + 2))
    heads = qkv.view(T, -1, hd).transpose(0, 1)
    # float32 tables for float32 (transformers' numbers); the compiler's float64 gets float64 ones
    cos, sin = rope_tables(cfg, start, T, torch.float64 if qkv.dtype == torch.float64 else torch.float32)
    qk = apply_rope(heads[:kv * (g + 1)], cos, sin)  # queries and keys rotate alike: one call
    q, k, v = qk[:kv * g], qk[kv * g:], heads[kv * (g + 1):]
    keys, values = cache.append(k, v)
    if T == 1 and q.dtype == torch.float32:
        # decode: torch's fused attention (no mask, GQA by head index) is one call instead of eight,
        # and agrees with the lines below to fp32 rounding; prefill and the compiler keep those
        out = F.scaled_dot_product_attention(q[None], keys[None], values[None], enable_gqa=True)
        return out[0].transpose(0, 1)
    # the g query heads of one KV head read its keys as one batch of g*T rows: no copies of the cache
    q = q.reshape(kv, g * T, hd)
    scores = (q @ keys.transpose(1, 2)) * (hd ** -0.5)
    past = keys.shape[1] - T
    if T > 1:  # one new token sees every cached one: its mask would be all True
        mask = torch.ones(T, keys.shape[1], dtype=torch.bool).tril(diagonal=past).repeat(g, 1)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
    return (probs @ values).view(kv * g, T, hd).transpose(0, 1)


def attention_partial(cfg: ModelConfig, x: torch.Tensor, start: int,
                      q_proj: torch.Tensor, k_proj: torch.Tensor, v_proj: torch.Tensor,
                      o_proj: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Output of some KV-head groups: o_proj[:, heads] @ attention(heads), shape [T, hidden]."""
    heads = attention_heads(cfg, x, start, q_proj, k_proj, v_proj, cache)
    return linear(heads.reshape(x.shape[0], -1), o_proj)


def mlp_activations(x: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor) -> torch.Tensor:
    """SwiGLU intermediate act(gate(x)) * up(x) for the neurons whose rows are given: [T, n]."""
    return F.silu(linear(x, gate_proj)) * linear(x, up_proj)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """`mlp_activations` from the projections already made: gate_up [T, 2n] is x times the gate
    rows and the up rows side by side (a device multiplies them in one call)."""
    n = gate_up.shape[1] // 2
    return F.silu(gate_up[:, :n]) * gate_up[:, n:]


def mlp_partial(x: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor,
                down_proj: torch.Tensor) -> torch.Tensor:
    """down_proj[:, G] @ act[G] for a neuron subset G: [T, hidden]."""
    return linear(mlp_activations(x, gate_proj, up_proj), down_proj)


def lm_logits(cfg: ModelConfig, x: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    return linear(rms_norm(x, norm, cfg.rms_norm_eps), lm_head)


def decoder_layer(cfg: ModelConfig, h: torch.Tensor, input_norm: torch.Tensor, post_norm: torch.Tensor,
                  attention: Callable[[torch.Tensor], torch.Tensor],
                  mlp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The residual stream [T, hidden] after one decoder layer.

    attention(x) is the attention output for x = RMSNorm(h); mlp(x, m) is the MLP output for
    m = RMSNorm(h + attention(x)). The MLP part also gets x because the activation predictor
    reads the layer's input, not the MLP's.
    """
    x = rms_norm(h, input_norm, cfg.rms_norm_eps)
    h = h + attention(x)
    m = rms_norm(h, post_norm, cfg.rms_norm_eps)
    return h + mlp(x, m)


class FullModel:
    """The whole model on one device, from an HF-named state dict: the reference the plan must match."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        # a dict of its own: a lazily read checkpoint (halo_compile.load) is then read once, not per token
        self.cfg, self.w = cfg, dict(weights)
        self.caches = [KVCache() for _ in range(cfg.num_layers)]

    def reset(self) -> None:
        self.caches = [KVCache() for _ in range(self.cfg.num_layers)]

    def layer_weight(self, layer: int, name: str) -> torch.Tensor:
        return self.w[f"model.layers.{layer}.{name}.weight"]

    def attention(self, layer: int, start: int, x: torch.Tensor) -> torch.Tensor:
        """All of the layer's attention heads on x at positions start.., extending its KV cache."""
        lw = partial(self.layer_weight, layer)
        return attention_partial(self.cfg, x, start, lw("self_attn.q_proj"), lw("self_attn.k_proj"),
                                 lw("self_attn.v_proj"), lw("self_attn.o_proj"), self.caches[layer])

    def mlp(self, layer: int, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """All of the layer's MLP neurons on m (x, the layer input, is not needed here)."""
        lw = partial(self.layer_weight, layer)
        return mlp_partial(m, lw("mlp.gate_proj"), lw("mlp.up_proj"), lw("mlp.down_proj"))

    def logits(self, tokens: torch.Tensor, last: bool = False) -> torch.Tensor:
        """Feed `tokens` after what the cache holds; returns logits [T, vocab] (last: [1, vocab], the
        last position only)."""
        cfg, w = self.cfg, self.w
        start = self.caches[0].length
        h = w["model.embed_tokens.weight"][tokens]
        for i in range(cfg.num_layers):
            h = decoder_layer(cfg, h, self.layer_weight(i, "input_layernorm"),
                              self.layer_weight(i, "post_attention_layernorm"),
                              partial(self.attention, i, start), partial(self.mlp, i))
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return lm_logits(cfg, h[-1:] if last else h, w["model.norm.weight"], head)
