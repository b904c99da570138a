"""Quantised weights at run time: shard tensors -> `QuantLinear`s with the kernels chosen here.

A device or coordinator of a quantised plan (`Plan.weights` not fp32) turns each projection it
holds into a `kernels.QuantLinear`. The kernel per (format, role) is chosen once per process by
measurement (`kernels.choose`), with a fixed role per matrix: "rows" for row-sliced matrices
(q/k/v/gate/up, LM head), "groups" for column-sliced ones (o/down), whatever the device holds, so
two devices holding the same group run the same kernel on it. `HALO_KERNELS` pins kernels
instead (e.g. so that two processes compared token for token use the same ones):
a comma-separated list of `KERNEL` (both roles of its format) or `ROLE=KERNEL`.

Example:
    >>> import torch
    >>> from halo_runtime.core.qcompute import QuantEmbedding, kernel_pins
    >>> from halo_runtime.core.quant import quantise, dequantise
    >>> kernel_pins("int8.dequant-fp32,groups=int8.dynamic-fbgemm")
    {('int8', 'rows'): 'int8.dequant-fp32', ('int8', 'groups'): 'int8.dynamic-fbgemm'}
    >>> q = quantise(torch.randn(10, 4), "int4")
    >>> bool(torch.equal(QuantEmbedding(q)[torch.tensor([3, 3])], dequantise(q)[[3, 3]]))
    True
"""
from __future__ import annotations

import os

import torch

from . import kernels
from .kernels import PIN_ENV, QuantLinear, choose, kernel
from .plan import Plan, PlanError
from .quant import QuantWeight, dequantise, take_rows
from .shards import read_weight


def kernel_pins(text: str | None) -> dict[tuple[str, str], str]:
    """(format, role) -> kernel name from a `HALO_KERNELS` value; ValueError naming a bad entry."""
    out: dict[tuple[str, str], str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        role, _, name = item.rpartition("=")
        k = kernel(name)
        roles = [role] if role else ["rows", "groups"]
        for r in roles:
            if r not in ("rows", "groups"):
                raise ValueError(f"{PIN_ENV}: role {r!r} in {item!r} must be rows or groups")
            out[k.format, r] = k.name
    return out


def kernel_for(fmt: str, role: str):
    """The kernel this process uses for `fmt` weights in `role` (pinned, or measured once)."""
    try:
        pins = kernel_pins(os.environ.get(PIN_ENV))
    except ValueError as e:
        raise PlanError(str(e)) from None
    return choose(fmt, role, name=pins.get((fmt, role)))


def linear(q: QuantWeight, role: str, parts=None) -> QuantLinear:
    return QuantLinear(q, kernel_for(q.format.name, role), parts)


class QuantEmbedding:
    """An embedding table in a quantised format: `table[tokens]` dequantises only those rows."""

    def __init__(self, weight: QuantWeight):
        self.weight = weight

    def __getitem__(self, tokens: torch.Tensor) -> torch.Tensor:
        return dequantise(take_rows(self.weight, tokens.reshape(-1))).view(*tokens.shape, self.weight.cols)


def coordinator_tables(plan: Plan, shard: dict[str, torch.Tensor]):
    """(embeddings, LM head) of the coordinator: tensors for fp32 plans on one thread, else
    QuantEmbedding and QuantLinear (a tied LM head reads the embeddings' stored values)."""
    if plan.weights == "fp32" and kernels.THREADS == 1:
        embed = shard["embed_tokens"]
        return embed, shard.get("lm_head", embed)
    emb = read_weight(shard, "embed_tokens", plan, plan.coordinator)
    head = read_weight(shard, "lm_head", plan, plan.coordinator) if "lm_head" in shard else emb
    return QuantEmbedding(emb), linear(head, "rows")


def device_weights(plan: Plan, device: str, shard: dict[str, torch.Tensor], fused: dict[str, torch.Tensor],
                   layer: int, one_part: bool = False):
    """((q|k|v), o) and ((gate|up), down) QuantLinears of a device's layer (None where it holds
    none); `fused` holds the stacked rows (`shards.fuse_rows`: layers.L.attn.qkv, layers.L.mlp.gate_up).
    down's parts are (critical groups, relaxed groups), or all groups in one with `one_part`."""
    from .qshards import shard_segments
    from .shards import device_indices

    s, pre = device_indices(plan, device, layer), f"layers.{layer}"
    read = lambda name, segs=None, src=shard: read_weight(src, f"{pre}.{name}", plan, device,  # noqa: E731
                                                          segs if plan.weights == "int4" else None)
    attn = mlp = None
    if s.kv_heads:
        o = _segmented(read("attn.o_proj", shard_segments(plan, device, layer, "o_proj")),
                       shard_segments(plan, device, layer, "o_proj"), device, "o_proj")
        attn = (linear(read("attn.qkv", src=fused), "rows"), linear(o, "groups"))
    if s.neurons:
        segs = shard_segments(plan, device, layer, "down_proj")
        down = _segmented(read("mlp.down_proj", segs), segs, device, "down_proj")
        groups = plan.groups_on(device, layer, "mlp")
        n_crit = sum(1 for g in groups if g.critical)
        mlp = (linear(read("mlp.gate_up", src=fused), "rows"),
               linear(down, "groups", (len(groups),) if one_part else (n_crit, len(groups) - n_crit)))
    return attn, mlp


def group_linear(plan: Plan, device: str, shard: dict[str, torch.Tensor], layer: int) -> QuantLinear:
    """A device's down projection with one part per MLP group (in-process simulation)."""
    from .qshards import shard_segments

    segs = shard_segments(plan, device, layer, "down_proj")
    w = read_weight(shard, f"layers.{layer}.mlp.down_proj", plan, device, segs if plan.weights == "int4" else None)
    return linear(_segmented(w, segs, device, "down_proj"), "groups", (1,) * len(segs))


def _segmented(w: QuantWeight, segments: tuple[int, ...], device: str, what: str) -> QuantWeight:
    """`w` with its columns cut into the plan's group segments (int8/float shards store one run)."""
    if w.segments == segments:
        return w
    if w.cols != sum(segments):
        raise PlanError(f"shard of {device}: {what} has {w.cols} columns, the plan's groups need {sum(segments)}")
    return QuantWeight(w.format, w.rows, segments, w.values, w.scales)
