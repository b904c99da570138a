"""Weight formats and the ggml engine that multiplies by them.

Covers `halo_runtime.core.formats` (fp32, bf16, q8_0, q4_0: byte sizes, round-trip error bounds,
ggml's block layouts re-derived in numpy, determinism, slicing by whole rows and whole blocks, the
names of the replaced int8/int4), `ggmlops` (a graph's product is the dequantised weight times the
input as ggml rounds it; threads do not change the bits), `segment.LocalModel` against the torch
reference `halo_compile.reference.FullModel` (prefill, decode through the KV cache, rewinds, llama3
RoPE scaling, the cache's last position and a refusal past it, the same bits on two threads and
in any pass; the block formats within a loose bound), and `device.DeviceCompute.mlp_groups`: a
column-sliced group's contribution is the same bits whatever else its device holds. The modules'
own examples run in tests/test_doctests.py.
"""
from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
from pathlib import Path

import ggml.ggml as G
import numpy as np
import pytest
import torch
from halo_runtime.core.config import ModelConfig
from halo_runtime.core.formats import (
    BLOCK,
    FORMATS,
    cat_columns,
    dequantise,
    quantise,
    take_columns,
    take_rows,
    weight_format,
)
from halo_runtime.core.ggmlops import Arena, Graph, new_input
from halo_runtime.core.segment import LocalModel
from halo_runtime.core.shards import PROJ, shard_name

from halo_compile.reference import FullModel

ROOT = Path(__file__).resolve().parents[1]
FORMAT_NAMES = list(FORMATS)
BLOCK_FORMATS = [f for f in FORMAT_NAMES if FORMATS[f].quantised]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
"""llama3 scaling whose three regimes (kept, smoothed, divided) all occur at head_dim 16."""


def _weight(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[0, 3] = 0.5      # an outlier, as real checkpoints have
    w[1] = 0.0         # an all-zero row
    w[2, :BLOCK] = 0.0  # an all-zero block in an otherwise normal row
    return w


def _blocks(a: np.ndarray) -> np.ndarray:
    """[rows, cols] -> [rows, cols / 32, 32]."""
    return a.reshape(a.shape[0], -1, BLOCK)


# ---- sizes, names, round trips --------------------------------------------------------------------

@pytest.mark.parametrize("fmt,row_bytes,dtype", [("fp32", 4 * 256, np.float32), ("bf16", 2 * 256, np.uint16),
                                                  ("q8_0", 8 * 34, np.uint8), ("q4_0", 8 * 18, np.uint8)])
def test_byte_sizes_and_stored_arrays(fmt, row_bytes, dtype):
    f = FORMATS[fmt]
    assert f.row_bytes(256) == row_bytes and f.nbytes(10, 256) == 10 * row_bytes
    assert f.bits == 8 * f.nbytes(10, 256) / (10 * 256)
    stored = quantise(_weight(10, 256), fmt)
    assert stored.dtype == dtype and stored.nbytes == f.nbytes(10, 256)
    assert stored.shape == f.stored_shape(10, 256) and f.cols_of(stored) == 256
    assert dequantise(stored, fmt).shape == (10, 256)
    if f.quantised:
        with pytest.raises(ValueError, match="not a multiple"):
            f.row_bytes(48)


def test_formats_are_the_documented_ggml_types():
    assert [(f.name, f.ggml_type) for f in FORMATS.values()] == [
        ("fp32", G.GGML_TYPE_F32), ("bf16", G.GGML_TYPE_BF16), ("q8_0", G.GGML_TYPE_Q8_0), ("q4_0", G.GGML_TYPE_Q4_0)]
    for f in FORMATS.values():  # ggml's own idea of a block's size agrees with ours
        assert (G.ggml_blck_size(f.ggml_type), G.ggml_type_size(f.ggml_type)) == (f.block, f.block_bytes)


def test_replaced_and_unknown_formats_name_the_way_out():
    with pytest.raises(ValueError, match=r"'int8' was replaced by q8_0.*--weights q8_0"):
        weight_format("int8")
    with pytest.raises(ValueError, match=r"'int4' was replaced by q4_0.*--weights q4_0"):
        weight_format("int4")
    with pytest.raises(ValueError, match="unknown weight format 'fp8' .*fp32, bf16, q8_0, q4_0"):
        weight_format("fp8")
    assert weight_format(FORMATS["q4_0"]) is FORMATS["q4_0"]


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_round_trip_error_bounds(fmt):
    w = _weight(48, 256)
    stored = quantise(w, fmt)
    back = dequantise(stored, fmt)
    err = np.abs(back - w)
    if fmt == "fp32":
        assert np.array_equal(back, w)
    elif fmt == "bf16":  # round to nearest: at most half a unit of bf16's 8-bit significand
        assert (err <= np.abs(w) * 2.0 ** -8).all()
        assert err.max() > 0
    else:
        amax = np.abs(_blocks(w)).max(-1, keepdims=True)
        e = _blocks(err)
        if fmt == "q8_0":  # scale amax/127, rounded to nearest: half a step (and the scale's fp16 rounding)
            assert (e <= amax / 127 * (0.5 + 2.0 ** -4)).all()
        else:  # scale amax/8 (the block's extreme maps to -8): half a step, a whole one where +8 clamps to +7
            assert (e <= amax / 8 * (1 + 2.0 ** -8)).all()
            assert (e <= amax / 16 * (1 + 2.0 ** -8)).mean() > 0.95
        assert e.max() > amax.max() / 1000, "a block format that loses nothing is not quantising"
    assert not back[1].any() and not back[2, :BLOCK].any(), "zeros stay zero"


def test_bf16_rounds_like_torch():
    w = np.random.default_rng(1).standard_normal((16, 96)).astype(np.float32) * 10.0 ** np.arange(-3, 3).repeat(16)
    ours = quantise(w, "bf16")
    theirs = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_quantise_refuses_what_it_cannot_store(fmt):
    with pytest.raises(ValueError, match="non-finite"):
        quantise(np.array([[1.0, np.nan] * 16], dtype=np.float32), fmt)
    with pytest.raises(ValueError, match="expected a matrix"):
        quantise(np.ones(64, dtype=np.float32), fmt)


# ---- ggml's block layouts ---------------------------------------------------------------------------

def _fp16_bytes(d: np.ndarray) -> np.ndarray:
    return d.astype(np.float16)[..., None].view(np.uint8)


def _q8_0_in_numpy(w: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_0_ref: d = amax / 127 (fp16), q = round-half-away(x / d) as int8."""
    b = _blocks(w)
    d = (np.abs(b).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = b * inv[..., None]
    q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)
    return np.concatenate([_fp16_bytes(d), q.view(np.uint8)], -1).reshape(w.shape[0], -1)


def _q4_0_in_numpy(w: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q4_0_ref: d = (signed extreme) / -8 (fp16), q = min(15, trunc(x / d + 8.5));
    byte j holds input j in its low nibble and input j + 16 in its high one."""
    b = _blocks(w)
    extreme = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)[..., 0]
    d = (extreme / np.float32(-8)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.minimum(15, np.trunc(b * inv[..., None] + np.float32(8.5))).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), q[..., :16] | (q[..., 16:] << 4)], -1).reshape(w.shape[0], -1)


@pytest.mark.parametrize("fmt,ours", [("q8_0", _q8_0_in_numpy), ("q4_0", _q4_0_in_numpy)])
def test_blocks_are_ggmls_reference_quantiser_and_deterministic(fmt, ours):
    w = _weight(40, 256, seed=2)
    stored = quantise(w, fmt)
    assert np.array_equal(stored, ours(w)), "the bytes follow the layout formats.py documents"
    assert np.array_equal(quantise(w.copy(), fmt), stored), "the same weight gives the same bytes again"
    # each row and each block is quantised on its own: a slice of the weight quantises to the slice
    assert np.array_equal(quantise(w[7:9], fmt), stored[7:9])
    assert np.array_equal(quantise(w[:, 64:160], fmt), take_columns(stored, FORMATS[fmt], [(64, 160)]))
    # and dequantising is the documented arithmetic: w = d * q
    raw = stored.reshape(40, -1, FORMATS[fmt].block_bytes)
    d = raw[..., :2].copy().view(np.float16).astype(np.float32)
    b = raw[..., 2:]
    if fmt == "q8_0":
        q = b.view(np.int8).astype(np.float32)
    else:
        q = np.concatenate([b & 15, b >> 4], -1).astype(np.float32) - 8
    assert np.array_equal(dequantise(stored, fmt), (d * q).reshape(40, 256))


# ---- slicing ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_take_rows_and_columns_slice_whole_blocks(fmt):
    f = FORMATS[fmt]
    w = _weight(12, 192, seed=3)
    stored = quantise(w, fmt)
    full = dequantise(stored, fmt)
    rows = [5, 0, 11, 3]
    assert np.array_equal(take_rows(stored, rows), stored[rows])
    assert np.array_equal(dequantise(take_rows(stored, rows), fmt), full[rows])
    ranges = [(128, 192), (0, 32), (64, 96)]
    part = take_columns(stored, f, ranges)
    assert part.dtype == stored.dtype and f.cols_of(part) == 128
    cols = np.concatenate([np.arange(a, b) for a, b in ranges])
    assert np.array_equal(dequantise(part, fmt), full[:, cols])
    # the pieces of a partition put back side by side are the stored matrix, byte for byte
    pieces = [take_columns(stored, f, [r]) for r in [(0, 32), (32, 128), (128, 192)]]
    assert np.array_equal(cat_columns(pieces), stored)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("bounds", [(0, 16), (16, 64), (32, 40), (32, 32), (64, 32), (-32, 32)])
def test_take_columns_refuses_bounds_inside_a_block(fmt, bounds):
    stored = quantise(_weight(4, 128), fmt)
    with pytest.raises(ValueError, match="not whole blocks of 32"):
        take_columns(stored, FORMATS[fmt], [(0, 32), bounds])


def test_float_formats_slice_any_columns():
    w = _weight(4, 70)
    for fmt in ("fp32", "bf16"):
        stored = quantise(w, fmt)
        assert np.array_equal(dequantise(take_columns(stored, FORMATS[fmt], [(3, 5), (60, 61)]), fmt),
                              dequantise(stored, fmt)[:, [3, 4, 60]])


# ---- ggml graphs ---------------------------------------------------------------------------------------

def _product_graph(W, T: int, cols: int) -> Graph:
    def build(ctx):
        x = new_input(ctx, G.GGML_TYPE_F32, T, cols)
        return {"x": x}, {"y": G.ggml_mul_mat(ctx, W, x)}
    return Graph(build)


def test_fp32_product_is_numpys():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    arena = Arena()
    W = arena.matrix(quantise(w, "fp32"), FORMATS["fp32"], cols=256)
    for T in (1, 3, 20):
        x = rng.standard_normal((T, 256)).astype(np.float32)
        graph = _product_graph(W, T, 256)
        graph.inputs["x"][:] = x
        graph.compute()
        ref = x @ w.T
        assert graph.outputs["y"].shape == (T, 48)
        assert np.abs(graph.outputs["y"] - ref).max() <= 1e-6 * np.abs(ref).max(), f"T={T}"
        graph.close()
    arena.close()


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_product_is_the_dequantised_weight_times_the_rounded_input(fmt):
    """ggml rounds the input to bf16 (bf16 weights) or to q8_0 blocks (block formats), then multiplies
    exactly: so the error against the float product is the input's rounding, nothing else."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    stored = quantise(w, fmt)
    arena = Arena()
    W = arena.matrix(stored, FORMATS[fmt], cols=256)
    rounding = {"fp32": "fp32", "bf16": "bf16", "q8_0": "q8_0", "q4_0": "q8_0"}[fmt]
    for T in (1, 3, 20):
        x = rng.standard_normal((T, 256)).astype(np.float32)
        graph = _product_graph(W, T, 256)
        graph.inputs["x"][:] = x
        graph.compute()
        y = graph.outputs["y"].copy()
        xr = dequantise(quantise(x, rounding), rounding).astype(np.float64)
        ref = xr @ dequantise(stored, fmt).astype(np.float64).T
        assert np.abs(y - ref).max() <= 1e-6 * np.abs(ref).max(), f"T={T}"
        graph.compute(threads=2)  # ggml splits the rows among threads; each row is summed the same way
        assert np.array_equal(graph.outputs["y"], y), f"T={T}: two threads changed the bits"
        graph.close()
    arena.close()


def test_arena_refuses_a_matrix_of_the_wrong_size():
    arena = Arena()
    with pytest.raises(ValueError, match="q8_0 matrix of 4x64 needs 272 bytes, got 256"):
        arena.matrix(np.zeros((4, 64), dtype=np.uint8), FORMATS["q8_0"], cols=64)
    with pytest.raises(ValueError, match="float32 of 1-4 dims"):
        arena.array(np.zeros(3, dtype=np.float64))
    arena.close()


# ---- whole models: LocalModel against the torch reference ------------------------------------------------

def _config(scaling=None, tie=False, layers=2) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=layers, num_heads=4,
                       num_kv_heads=2, head_dim=16, rope_scaling=scaling, tie_word_embeddings=tie)


def _shard_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A random LLaMA under shard names (what LocalModel takes); random norms so they must be applied."""
    rng = np.random.default_rng(seed)
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def norm() -> np.ndarray:
        return rng.uniform(0.5, 1.5, h).astype(np.float32)

    out = {"embed_tokens": rng.standard_normal((cfg.vocab_size, h)).astype(np.float32), "norm": norm()}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = (rng.standard_normal((cfg.vocab_size, h)) * 0.1).astype(np.float32)
    for layer in range(cfg.num_layers):
        for proj, shape in shapes.items():
            out[shard_name(layer, proj)] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[f"layers.{layer}.{n}"] = norm()
    return out


def _hf(cfg: ModelConfig, shard: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The same weights under HF names, as torch tensors (what FullModel takes)."""
    out = {"model.embed_tokens.weight": shard["embed_tokens"], "model.norm.weight": shard["norm"]}
    if "lm_head" in shard:
        out["lm_head.weight"] = shard["lm_head"]
    for layer in range(cfg.num_layers):
        for proj, path in PROJ.items():
            out[f"model.layers.{layer}.{path}.weight"] = shard[shard_name(layer, proj)]
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[f"model.layers.{layer}.{n}.weight"] = shard[f"layers.{layer}.{n}"]
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in out.items()}


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


TOKENS = [int(t) for t in np.random.default_rng(6).integers(0, 64, 40)]


@pytest.mark.parametrize("scaling,tie", [(None, False), (LLAMA3, False), (None, True)],
                         ids=["plain", "llama3-rope", "tied"])
def test_local_model_matches_the_reference(scaling, tie):
    cfg = _config(scaling, tie)
    shard = _shard_weights(cfg)
    ref = FullModel(cfg, _hf(cfg, shard)).logits(torch.tensor(TOKENS)).numpy()
    model = LocalModel(cfg, shard, "fp32", capacity=128)
    prefill = model.logits(TOKENS[:30], 0, all_positions=True)
    assert prefill.shape == (30, 64) and _rel(prefill, ref[:30]) <= 1e-5
    assert np.array_equal(model.logits(TOKENS[:30], 0), prefill[-1]), "last position only"
    # decode one token at a time through the cache, across the 32-key bucket's edge
    for t in range(30, 40):
        assert _rel(model.logits([TOKENS[t]], t), ref[t]) <= 1e-5, f"position {t}"
    # a rewind (rejected drafts): rows fed again at an earlier start overwrite the cache from there
    again = model.logits(TOKENS[20:26], 20, all_positions=True)
    assert _rel(again, ref[20:26]) <= 1e-5
    other = model.logits([(TOKENS[26] + 1) % 64], 26)
    assert _rel(model.logits([TOKENS[26]], 26), ref[26]) <= 1e-5 and _rel(other, ref[26]) > 1e-3


def test_local_model_fills_its_cache_to_the_end_and_refuses_past_it():
    """A capacity that is not whole 32-key buckets: the last position decodes right, the next is refused
    with a ValueError (in a child process: ggml aborts the process on a write past the cache's end)."""
    cfg = _config()
    shard = _shard_weights(cfg)
    ref = FullModel(cfg, _hf(cfg, shard)).logits(torch.tensor(TOKENS)).numpy()
    model = LocalModel(cfg, shard, "fp32", capacity=40)
    model.logits(TOKENS[:36], 0)
    assert all(_rel(model.logits([TOKENS[t]], t), ref[t]) <= 1e-5 for t in range(36, 40))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_formats as T\n"
            "from halo_runtime.core.segment import LocalModel\n"
            "m = LocalModel(T._config(), T._shard_weights(T._config()), 'fp32', capacity=40)\n"
            "for tokens, start in (([1], 40), ([1, 2, 3], 38)):\n"
            "    try:\n        m.logits(tokens, start)\n    except ValueError as e:\n        print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["model: positions up to 41 exceed the context 40"] * 2


@pytest.mark.parametrize("fmt", ["fp32", "q8_0"])
def test_threads_do_not_change_a_models_bits(fmt):
    cfg = _config()
    stored = {k: quantise(v, fmt) if v.ndim == 2 else v for k, v in _shard_weights(cfg).items()}
    one, two = (LocalModel(cfg, stored, fmt, capacity=64, threads=n) for n in (1, 2))
    assert np.array_equal(one.logits(TOKENS[:30], 0, all_positions=True),
                          two.logits(TOKENS[:30], 0, all_positions=True))
    for t in range(30, 34):
        assert np.array_equal(one.logits([TOKENS[t]], t), two.logits([TOKENS[t]], t)), f"position {t}"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_a_rows_bits_do_not_depend_on_its_pass(fmt, threads):
    """Token by token against passes of 70 rows (ggml's tiled attention starts at 64) and of 5 rows
    (draft verification), past 512 cached keys (where ggml splits one row's keys over threads): the
    same bits at every position, so drafts and prompt chunking never change a reply."""
    assert not G.ggml_cpu_has_llamafile(), "ggml built with llamafile: `make install` builds it without"
    cfg = _config()
    stored = {k: quantise(v, fmt) if v.ndim == 2 else v for k, v in _shard_weights(cfg).items()}
    tokens = [int(t) for t in np.random.default_rng(7).integers(0, 64, 530)]
    one, many = (LocalModel(cfg, stored, fmt, capacity=544, threads=threads) for _ in range(2))
    by_token = np.stack([one.logits([t], p) for p, t in enumerate(tokens)])
    passes = [(0, 70)] + [(a, a + 5) for a in range(70, 530, 5)]
    by_pass = np.concatenate([many.logits(tokens[a:b], a, all_positions=True) for a, b in passes])
    assert np.array_equal(by_token, by_pass)


def test_llama3_scaling_is_applied():
    """The scaled and the plain model differ, so the test above tells whether scaling was applied."""
    shard = _shard_weights(_config())
    plain, scaled = (LocalModel(_config(s), shard, "fp32", 64).logits(TOKENS[:20], 0) for s in (None, LLAMA3))
    ref = FullModel(_config(LLAMA3), _hf(_config(), shard)).logits(torch.tensor(TOKENS[:20]))[-1].numpy()
    assert _rel(plain, ref) > 1e-3 and _rel(scaled, ref) <= 1e-5


@pytest.mark.parametrize("fmt,vs_fp32,vs_dequantised", [("bf16", 0.02, 0.01), ("q8_0", 0.05, 0.03),
                                                         ("q4_0", 0.4, 0.03)])
def test_local_model_in_a_block_format_is_near_fp32(fmt, vs_fp32, vs_dequantised):
    """Against the fp32 model: the weights' rounding (loose; q4_0 is coarse). Against the torch model
    of the dequantised weights: only ggml's rounding of the inputs (tight for every format)."""
    cfg = _config()
    shard = _shard_weights(cfg)
    stored = {k: quantise(v, fmt) if v.ndim == 2 else v for k, v in shard.items()}
    back = {k: dequantise(v, fmt) if v.ndim == 2 else v for k, v in stored.items()}
    ref = FullModel(cfg, _hf(cfg, shard)).logits(torch.tensor(TOKENS)).numpy()
    ref_dq = FullModel(cfg, _hf(cfg, back)).logits(torch.tensor(TOKENS)).numpy()
    model = LocalModel(cfg, stored, fmt, capacity=64)
    ours = np.concatenate([model.logits(TOKENS[:30], 0, all_positions=True),
                           np.stack([model.logits([TOKENS[t]], t) for t in range(30, 40)])])
    assert _rel(ours, ref) <= vs_fp32 and _rel(ours, ref_dq) <= vs_dequantised
    assert _rel(ours, ref) > 1e-4, "a rounded model that equals fp32 was not rounded"
    assert (ours.argmax(1) == ref_dq.argmax(1)).mean() >= 0.9


# ---- column-sliced groups: the same bits whatever else a device holds ---------------------------------------

def _placement_plan(cfg: ModelConfig, fmt: str, groups: list[list[int]], where: dict[int, str]):
    """The checked-in plan's devices over `cfg`, both attention groups on pi5-1, MLP group i on where[i];
    groups 0 and 1 critical, the rest relaxed."""
    from halo_runtime.core.plan import Group, load_plan

    base = load_plan(ROOT / "artifacts" / "smollm2-135m-pi5")
    placed = [Group(f"L0.attn.{h}", 0, "attn", h, (h,), "pi5-1", True, 0.5) for h in range(cfg.num_kv_heads)]
    placed += [Group(f"L0.mlp.{i}", 0, "mlp", i, tuple(members), where[i], i < 2, 0.25)
               for i, members in enumerate(groups)]
    return dataclasses.replace(base, model=cfg, groups=tuple(placed), max_context=64, weights=fmt,
                               weights_fingerprint="" if fmt == "fp32" else "-", failover=())


def _group_partials(plan, hf_weights, x: np.ndarray) -> dict[int, np.ndarray]:
    """Every MLP group's partial sum, each from the device the plan puts it on (shards cut by the compiler)."""
    from halo_runtime.core.device import DeviceCompute

    from halo_compile.slicing import slice_device, stored_model

    stored = stored_model(plan, hf_weights)
    out = {}
    for name in plan.device_names:
        mine = plan.groups_on(name, 0, "mlp")
        if not mine:
            continue
        dev = DeviceCompute(plan, name, slice_device(plan, name, hf_weights, stored))
        for g, part in zip(mine, dev.mlp_groups(0, x)):
            out[g.index] = part
        if name != plan.coordinator and len(mine) == 2 and mine[0].critical != mine[1].critical:
            crit, relaxed = dev.mlp(0, x)  # the critical/relaxed split is the same two products
            assert np.array_equal(crit, out[mine[0].index]) and np.array_equal(relaxed, out[mine[1].index])
        dev.close()
    return out


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_a_groups_contribution_does_not_depend_on_what_else_its_device_holds(fmt):
    cfg = dataclasses.replace(_config(layers=1), intermediate_size=128, vocab_size=32)
    hf = _hf(cfg, _shard_weights(cfg, seed=7))
    neurons = list(range(128))
    random.Random(8).shuffle(neurons)  # scattered members, as co-activation groups are
    groups = [sorted(neurons[32 * i:32 * i + 32]) for i in range(4)]
    placements = [
        {0: "pi5-1", 1: "pi5-2", 2: "pi5-1", 3: "pi5-2"},   # two groups each, one critical and one relaxed
        {0: "pi5-2", 1: "pi5-2", 2: "pi5-1", 3: "pi5-2"},   # three beside one
        {0: "pi5-0", 1: "pi5-1", 2: "pi5-2", 3: "pi5-3"},   # each alone (the coordinator too)
    ]
    rng = np.random.default_rng(9)
    for T in (1, 3, 20):
        x = rng.standard_normal((T, cfg.hidden_size)).astype(np.float32)
        x[:, 5] *= 50  # an outlier input
        runs = [_group_partials(_placement_plan(cfg, fmt, groups, where), hf, x) for where in placements]
        for i in range(4):
            for run in runs[1:]:
                assert np.array_equal(run[i], runs[0][i]), f"{fmt}, T={T}: group {i} changed with its neighbours"
        # and the groups together are the layer's MLP (dequantised weights, to the inputs' rounding)
        w = {k: v.numpy() for k, v in hf.items()}
        gate, up, down = (w[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
        if fmt != "fp32":
            gate, up = dequantise(quantise(gate, fmt), fmt), dequantise(quantise(up, fmt), fmt)
            order = np.concatenate(groups)  # down is stored with its columns group by group
            down = np.empty_like(down)
            down[:, order] = dequantise(quantise(w["model.layers.0.mlp.down_proj.weight"][:, order], fmt), fmt)
        g = x @ gate.T
        ref = (g / (1 + np.exp(-g)) * (x @ up.T)) @ down.T
        total = sum(runs[0][i] for i in range(4))
        assert _rel(total, ref) <= (1e-5 if fmt == "fp32" else 0.03), f"{fmt}, T={T}"
