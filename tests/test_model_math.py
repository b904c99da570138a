"""The lean decode math is the reference math: the one-call RMSNorm and the rolled RoPE give
transformers' bits, decode's fused attention agrees with the masked path to fp32 rounding, and
stacked projections are the shard's own tensors (views, no second copy)."""
from __future__ import annotations

import pytest
import torch
from halo_runtime.core.model import KVCache, ModelConfig, apply_rope, attend, rms_norm, rope_tables, swiglu
from halo_runtime.core.plan import PlanError
from halo_runtime.core.quant import quantise, to_tensors
from halo_runtime.core.shards import fuse_rows


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cfg(heads=6, kv=2, hd=16):
    return ModelConfig(vocab_size=32, hidden_size=heads * hd, intermediate_size=8, num_layers=1,
                       num_heads=heads, num_kv_heads=kv, head_dim=hd)


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


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4"])
def test_fuse_rows_stacks_without_a_second_copy(fmt):
    torch.manual_seed(4)
    shard = {}
    for name, rows in (("q", 6), ("k", 2), ("v", 2)):
        w = torch.randn(rows, 64)
        shard.update({name: w} if fmt == "fp32" else to_tensors(name, quantise(w, fmt)))
    before = {k: v.clone() for k, v in shard.items()}
    fused = fuse_rows(shard, ["q", "k", "v"], "qkv", "dev1")
    whole = fused["qkv"]
    assert whole.shape[0] == 10 and set(fused) == ({"qkv"} if fmt == "fp32" else {"qkv", "qkv.scale"})
    for k, v in shard.items():  # same values, now views of the stacked tensors
        assert torch.equal(v, before[k])
        assert v.untyped_storage().data_ptr() == fused["qkv" + k[1:]].untyped_storage().data_ptr()


def test_fuse_rows_names_what_is_missing_or_mismatched():
    with pytest.raises(PlanError, match="shard of dev2: missing tensor k"):
        fuse_rows({"q": torch.zeros(2, 4)}, ["q", "k"], "qk", "dev2")
    with pytest.raises(PlanError, match="dev2: q, k differ"):
        fuse_rows({"q": torch.zeros(2, 4), "k": torch.zeros(2, 5)}, ["q", "k"], "qk", "dev2")


def test_fuse_rows_of_a_mapped_shard_file_keeps_every_value(tmp_path):
    """load_file maps the file; the copied tensors' pages are given back, and anything still
    holding an original reads the file's values again."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(5)
    want = {n: torch.randn(rows, 1024) for n, rows in (("q", 64), ("k", 16), ("v", 16), ("o", 8))}
    save_file(want, str(tmp_path / "shard.safetensors"))
    shard = load_file(str(tmp_path / "shard.safetensors"))
    held = shard["k"]
    fused = fuse_rows(shard, ["q", "k", "v"], "qkv", "dev1")
    assert torch.equal(fused["qkv"], torch.cat([want["q"], want["k"], want["v"]]))
    for n in want:
        assert torch.equal(shard[n], want[n])
    assert torch.equal(held, want["k"])
