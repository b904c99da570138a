"""The compiler's torch reference math (`halo_compile.reference`) is transformers' math, and the
devices' ggml graphs (`halo_runtime.core.layers`, `device.DeviceCompute`) are the reference's.

Reference: the one-call RMSNorm and the rolled RoPE give transformers' bits, decode's fused
attention agrees with the masked path to fp32 rounding, SwiGLU of stacked rows is the two products.
ggml: RMSNorm and llama3 RoPE frequency factors agree with the reference, and a device's attention
on T rows at once (prefill, draft verification) equals feeding them one at a time through its KV
cache (decode), and the reference's attention, to fp32 rounding.
"""
from __future__ import annotations

import dataclasses

import ggml.ggml as G
import numpy as np
import pytest
import torch
from halo_runtime.core.config import ModelConfig
from halo_runtime.core.device import DeviceCompute
from halo_runtime.core.ggmlops import Arena, Graph, new_input
from halo_runtime.core.layers import KV_BUCKET, rope_factors
from halo_runtime.core.layers import rms_norm as ggml_rms_norm
from halo_runtime.core.shards import shard_name

from halo_compile.reference import (
    KVCache,
    apply_rope,
    attend,
    attention_partial,
    inv_frequencies,
    rms_norm,
    rope_tables,
    swiglu,
)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cfg(heads=6, kv=2, hd=16, scaling=None):
    return ModelConfig(vocab_size=32, hidden_size=heads * hd, intermediate_size=8, num_layers=1,
                       num_heads=heads, num_kv_heads=kv, head_dim=hd, rope_scaling=scaling)


# ---- the reference is transformers' math -------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (33, 2048)])
def test_rms_norm_is_transformers_bit_for_bit(shape):
    torch.manual_seed(0)
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    x32 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(rms_norm(x, w, 1e-5), w * x32)


@pytest.mark.parametrize("start,length", [(0, 1), (5, 1), (3, 9)])
def test_rolled_rope_is_rotate_half_bit_for_bit(start, length):
    cfg = _cfg()
    torch.manual_seed(1)
    x = torch.randn(4, length, cfg.head_dim)
    cos, signed_sin = rope_tables(cfg, start, length)
    pos = torch.arange(start, start + length).float()[:, None]
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    emb = torch.cat((pos * inv, pos * inv), -1)
    assert torch.equal(cos, emb.cos())
    assert torch.equal(apply_rope(x, cos, signed_sin), x * emb.cos()[None] + _rotate_half(x) * emb.sin()[None])


def test_decode_attention_agrees_with_the_masked_path():
    """Feeding tokens one at a time (fused attention) gives what one prefill (masked matmuls) gives."""
    cfg = _cfg()
    torch.manual_seed(2)
    qkv = torch.randn(12, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim)
    whole = attend(cfg, qkv, 0, KVCache())
    cache = KVCache()
    steps = torch.cat([attend(cfg, qkv[t:t + 1], t, cache) for t in range(12)])
    torch.testing.assert_close(steps, whole, rtol=1e-5, atol=1e-6)
    assert cache.length == 12


def test_swiglu_of_stacked_rows():
    torch.manual_seed(3)
    x, gate, up = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5, 8)
    # the products are made once: a GEMM of another shape may sum in another order (MKL picks its
    # kernel by shape and CPU), and what is tested here is the slicing, not the GEMM
    g, u = x @ gate.T, x @ up.T
    assert torch.equal(swiglu(torch.cat((g, u), 1)), torch.nn.functional.silu(g) * u)


# ---- ggml's pieces are the reference's ----------------------------------------------------------------

def test_ggml_rms_norm_agrees_with_the_reference():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((7, 576)) * 3).astype(np.float32)
    w = rng.standard_normal(576).astype(np.float32)
    arena = Arena()
    weight = arena.array(w)

    def build(ctx):
        xin = new_input(ctx, G.GGML_TYPE_F32, 7, 576)
        return {"x": xin}, {"y": ggml_rms_norm(ctx, xin, weight, 1e-5)}

    graph = Graph(build)
    graph.inputs["x"][:] = x
    graph.compute()
    ref = rms_norm(torch.from_numpy(x), torch.from_numpy(w), 1e-5).numpy()
    assert np.abs(graph.outputs["y"] - ref).max() <= 1e-6 * np.abs(ref).max()
    graph.close()
    arena.close()


def test_llama3_frequency_factors_are_the_references_scaling():
    """ggml divides plain RoPE's frequencies by these factors; the result must be the reference's."""
    assert rope_factors(_cfg()) is None
    cfg = _cfg(scaling=LLAMA3)
    plain = inv_frequencies(_cfg()).numpy()
    scaled = inv_frequencies(cfg).numpy()
    factors = rope_factors(cfg)
    assert factors.shape == (cfg.head_dim // 2,) and factors.dtype == np.float32
    np.testing.assert_allclose(plain / factors, scaled, rtol=1e-6)
    assert factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(8.0)
    assert ((factors > 1.0 + 1e-6) & (factors < 8.0 - 1e-6)).any(), "the smoothed middle band is exercised"


def _attention_weights(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Shard-named weights of a one-layer model (DeviceCompute.whole_model builds attention and MLP)."""
    rng = np.random.default_rng(seed)
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    return {shard_name(0, p): (rng.standard_normal(s) * 0.2).astype(np.float32) for p, s in shapes.items()}


def _rel(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["plain", "llama3-rope"])
def test_device_attention_on_t_rows_equals_one_row_at_a_time(scaling):
    """Prefill (T rows, masked) = decode (one row at a time through the KV cache) = verification
    (a few rows after a cached prefix) = the reference's attention, across the cache's 32-key buckets."""
    cfg = dataclasses.replace(_cfg(heads=4, kv=2, hd=16, scaling=scaling), intermediate_size=32)
    shard = _attention_weights(cfg, seed=5)
    T = 40  # past the first KV bucket
    assert T > KV_BUCKET
    x = np.random.default_rng(6).standard_normal((T, cfg.hidden_size)).astype(np.float32)
    p = {n: torch.from_numpy(shard[f"layers.0.attn.{n}"]) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    ref = attention_partial(cfg, torch.from_numpy(x), 0, p["q_proj"], p["k_proj"], p["v_proj"], p["o_proj"],
                            KVCache()).numpy()

    prefill = DeviceCompute.whole_model(cfg, shard, "fp32", capacity=64)
    whole = prefill.attention(0, x, start=0)
    assert whole.shape == (T, cfg.hidden_size) and prefill.cache_length(0) == T

    decode = DeviceCompute.whole_model(cfg, shard, "fp32", capacity=64)
    steps = np.concatenate([decode.attention(0, x[t:t + 1], start=t) for t in range(T)])
    assert decode.cache_length(0) == T

    verify = DeviceCompute.whole_model(cfg, shard, "fp32", capacity=64)
    chunks = [verify.attention(0, x[:29], start=0)]
    chunks += [verify.attention(0, x[a:a + 4], start=a) for a in range(29, T - 3, 4)]
    chunked = np.concatenate(chunks)

    assert _rel(whole, ref) <= 1e-5
    assert _rel(steps, whole) <= 1e-5
    assert _rel(chunked, whole[:len(chunked)]) <= 1e-5
    # the cache was written: the last row's attention reads the 39 before it (zeros there would not match)
    assert _rel(decode.attention(0, x[T - 1:], start=T - 1), ref[T - 1]) <= 1e-5
    for dev in (prefill, decode, verify):
        dev.close()


def test_device_attention_refuses_positions_past_its_context():
    cfg = dataclasses.replace(_cfg(heads=4, kv=2, hd=16), intermediate_size=32)
    dev = DeviceCompute.whole_model(cfg, _attention_weights(cfg, seed=7), "fp32", capacity=8)
    with pytest.raises(ValueError, match="exceed the plan's context 8"):
        dev.attention(0, np.zeros((2, cfg.hidden_size), dtype=np.float32), start=7)
    dev.close()
