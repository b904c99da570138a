"""LLaMA math as ggml graph pieces, on a *subset* of a layer: some KV-head groups, some MLP neurons.

The same pieces build a worker's round (`device.DeviceCompute`: its heads with their KV cache, or
its neurons), the coordinator's own part of a round, and the coordinator's runs of rounds that no
remote device takes part in (`segment.Segment`: whole layers, norms and residual adds included; on
a one-device plan, the whole token in one graph). Numerics follow transformers' LlamaForCausalLM:
RMSNorm in fp32, rotate-half RoPE (ggml's NEOX mode; llama3 scaling through frequency factors),
GQA (query head i reads KV head i // group_size), SwiGLU; what ggml adds is its input rounding
for bf16 and the block formats (`formats`).

Every piece takes a `Rows` of graph inputs: where the T rows of this pass sit in the sequence and
which cached keys they may see. Decode graphs are kept per (T, number of keys rounded up to
`KV_BUCKET`): the mask hides the keys past each row's position, so one graph serves a bucket's
worth of tokens, and a new graph is built (a few ms) only when the cache grows past it.

Example (one layer's attention on 3 tokens, then a 4th through the cache):
    >>> import numpy as np
    >>> from halo_runtime.core.config import ModelConfig
    >>> from halo_runtime.core.layers import KV_BUCKET, kv_keys
    >>> kv_keys(start=0, rows=3, capacity=256), kv_keys(start=40, rows=1, capacity=256), KV_BUCKET
    (32, 64, 32)
"""
from __future__ import annotations

import ctypes
import math
import mmap
from dataclasses import dataclass

import ggml.ggml as G
import numpy as np

from .config import ModelConfig
from .ggmlops import Arena, mul_mat, new_input

KV_BUCKET = 32
"""Keys a decode graph is built for, rounded up to this (its mask hides the rest)."""
F16_NEG_INF = 0xFC00
"""-inf in fp16 bits: what the mask holds for a key a row may not see."""


def kv_keys(start: int, rows: int, capacity: int) -> int:
    """Keys a graph for `rows` rows at `start` reads: the cache's filled length rounded up to KV_BUCKET."""
    return min(capacity, -(-(start + rows) // KV_BUCKET) * KV_BUCKET)


def rope_factors(cfg: ModelConfig) -> np.ndarray | None:
    """ggml's frequency factors for llama3 RoPE scaling (None without scaling): plain RoPE's inverse
    frequency of each dimension pair divided by the scaled one, as llama.cpp computes them."""
    s = cfg.rope_scaling or {}
    if s.get("rope_type") != "llama3":
        return None
    dim = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor, low, high, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    scaled = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return (inv / scaled).astype(np.float32)


@dataclass
class Rows:
    """The graph inputs every piece of a pass shares: T rows, each at its position in its session,
    in windows (one per session in the pass, `spans`) that each attend to their slot's keys."""

    positions: object
    """int32 [T]: each row's position (RoPE)."""
    slots: object
    """int64 [T]: the KV-cache row each new key and value is written to (its window's base + position)."""
    masks: tuple
    """Per window, fp16 [rows, keys]: 0 where a row may see a cached key, -inf where not (causal,
    and the bucket's tail)."""
    windows: tuple
    """Per window, in row order: (rows, base, keys): its rows, the KV-cache row of its session's
    position 0 (the slot's offset in a cache of several) and the cached keys it reads (`kv_keys`)."""
    factors: object = None
    """llama3 RoPE frequency factors (a float32 tensor), or None."""

    @classmethod
    def inputs(cls, ctx, T: int, keys: int, factors=None, base: int = 0) -> Rows:
        """One window: T rows of one session."""
        return cls.of_windows(ctx, ((T, base, keys),), factors)

    @classmethod
    def of_windows(cls, ctx, windows: tuple, factors=None) -> Rows:
        T = sum(w[0] for w in windows)
        masks = tuple(new_input(ctx, G.GGML_TYPE_F16, rows, keys) for rows, _, keys in windows)
        return cls(new_input(ctx, G.GGML_TYPE_I32, T), new_input(ctx, G.GGML_TYPE_I64, T), masks, windows, factors)

    @staticmethod
    def fill(views: dict, start: int, base: int = 0) -> None:
        """Write a one-window pass's row inputs for rows at `start` of the session whose position 0
        is KV-cache row `base`."""
        Rows.fill_windows(views, ((start, base),))

    @staticmethod
    def fill_windows(views: dict, starts) -> None:
        """Write the row inputs (views named positions, slots, mask, mask1, ...): per window, the
        (start position, base) of its rows."""
        pos, kv_rows, at = views["positions"], views["slots"], 0
        for i, (start, base) in enumerate(starts):
            mask = views[_mask_name(i)]
            rows, keys = mask.shape
            p = np.arange(start, start + rows)
            pos[at:at + rows] = p
            kv_rows[at:at + rows] = p + base
            mask[:] = np.where(np.arange(keys)[None, :] <= p[:, None], 0, F16_NEG_INF)
            at += rows

    def named(self) -> dict:
        return {"positions": self.positions, "slots": self.slots,
                **{_mask_name(i): m for i, m in enumerate(self.masks)}}


def _mask_name(i: int) -> str:
    return "mask" if i == 0 else f"mask{i}"


class KVCache:
    """Keys and values of some KV heads of one layer, for the plan's whole context in each of `slots`
    sessions: [heads, slots * capacity, head_dim] float32 each, slot s from row s * capacity, zeros
    until written (untouched pages cost no memory: a slot nobody uses costs nothing). A row is
    written at its position, so a rewind (a retransmission, rejected drafts) just writes over it."""

    def __init__(self, arena: Arena, kv_heads: int, capacity: int, head_dim: int, slots: int = 1):
        self.capacity, self.slots = capacity, slots
        shape = (kv_heads, slots * capacity, head_dim)
        self.arrays = (_lazy_zeros(shape), _lazy_zeros(shape))
        """The keys' and values' numpy arrays (the tensors' bytes)."""
        self.keys, self.values = (arena.array(a) for a in self.arrays)

    def copy_prefix(self, source: int, slot: int, rows: int) -> None:
        """Slot `slot`'s keys and values at positions 0..rows-1 := slot `source`'s (a shared prompt
        prefix: the rows computing them would give, bit for bit)."""
        a, b = source * self.capacity, slot * self.capacity
        for arr in self.arrays:
            arr[:, b:b + rows] = arr[:, a:a + rows]


def _lazy_zeros(shape: tuple) -> np.ndarray:
    """float32 zeros in anonymous memory of ordinary 4 KiB pages: a row costs memory once written.
    (numpy asks for 2 MiB huge pages on arrays of 4 MiB and more, so one key written into a fresh
    slot would make 2 MiB resident: 8 slots' caches then cost what 8 full contexts would.)"""
    n = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(4 * n, 1)), dtype=np.float32, count=n).reshape(shape)


def rms_norm(ctx, x, weight, eps: float):
    """RMSNorm of every row of x [T, hidden] times the norm's weight."""
    return G.ggml_mul(ctx, G.ggml_rms_norm(ctx, x, eps), weight)


def attention(ctx, cfg: ModelConfig, x, q, k, v, o, cache: KVCache, rows: Rows):
    """o[:, heads] @ attention(heads) for the KV-head groups whose rows q, k, v hold (and o's
    columns): [T, hidden]. Writes the T rows' keys and values into `cache`. The projections take
    every row at once; each window (a session) attends to its own slot's keys, so a row's result
    is the one a pass of its session alone gives."""
    hd, T = cfg.head_dim, x.contents.ne[1]
    nq, nkv = q.contents.ne[1] // hd, k.contents.ne[1] // hd

    def rope(t, heads):
        t = G.ggml_reshape_3d(ctx, t, hd, heads, T)
        return G.ggml_rope_ext(ctx, t, rows.positions, rows.factors, hd, G.GGML_ROPE_TYPE_NEOX, 0,
                               cfg.rope_theta, 1.0, 0.0, 1.0, 0.0, 0.0)

    qs = rope(mul_mat(ctx, q, x), nq)
    ks = rope(mul_mat(ctx, k, x), nkv)
    vs = G.ggml_reshape_3d(ctx, mul_mat(ctx, v, x), hd, nkv, T)
    keys = G.ggml_set_rows(ctx, cache.keys, G.ggml_permute(ctx, ks, 0, 2, 1, 3), rows.slots)
    values = G.ggml_set_rows(ctx, cache.values, G.ggml_permute(ctx, vs, 0, 2, 1, 3), rows.slots)
    nb, qnb = cache.keys.contents.nb, qs.contents.nb
    out, at = None, 0
    for (n, base, n_keys), mask in zip(rows.windows, rows.masks):
        wk = G.ggml_view_3d(ctx, keys, hd, n_keys, nkv, nb[1], nb[2], base * nb[1])
        wv = G.ggml_view_3d(ctx, values, hd, n_keys, nkv, nb[1], nb[2], base * nb[1])
        wq = qs if n == T else G.ggml_view_3d(ctx, qs, hd, nq, n, qnb[1], qnb[2], at * qnb[2])
        part = G.ggml_flash_attn_ext(ctx, G.ggml_permute(ctx, wq, 0, 2, 1, 3), wk, wv, mask,
                                     1.0 / math.sqrt(hd), 0.0, 0.0)  # [hd, heads, n]
        part = G.ggml_reshape_2d(ctx, part, hd * nq, n)
        out = part if out is None else G.ggml_concat(ctx, out, part, 1)
        at += n
    return mul_mat(ctx, o, out)


def mlp(ctx, x, gate, up, down, parts: list[tuple[int, int]], down_bytes_per_col: float, act_mask=None):
    """down[:, a:b] @ act[a:b] per part (a, b) of the neurons whose rows gate and up hold, with act =
    silu(gate x) * up x: one [T, hidden] output per part. A part's columns are whole blocks.
    act_mask [T, neurons] (0 or 1) keeps only some neurons per row (predictive loading)."""
    T = x.contents.ne[1]
    act = G.ggml_swiglu_split(ctx, mul_mat(ctx, gate, x), mul_mat(ctx, up, x))
    if act_mask is not None:
        act = G.ggml_mul(ctx, act, act_mask)
    out = []
    hidden, row = down.contents.ne[1], down.contents.nb[1]
    for a, b in parts:
        if (a, b) == (0, down.contents.ne[0]):
            out.append(mul_mat(ctx, down, act))
            continue
        w = G.ggml_view_2d(ctx, down, b - a, hidden, row, int(a * down_bytes_per_col))
        y = G.ggml_view_2d(ctx, act, b - a, T, act.contents.nb[1], a * ctypes.sizeof(ctypes.c_float))
        out.append(mul_mat(ctx, w, y))
    return out
