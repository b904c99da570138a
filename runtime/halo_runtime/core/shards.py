"""Shard layout and loading: which rows and columns of which weight each device holds, defined once.

The compiler cuts shards by these definitions (`halo_compile.slicing`); devices map them with
`load_shard`. Rows follow `Plan.groups_on` order (critical groups first), so a device's critical
and relaxed MLP neurons are contiguous: the first `n_critical` rows of gate and up, the first
`n_critical` columns of down.

A shard is a safetensors file; `load_shard` maps it read-only and returns numpy views of its
tensors (no copy: a device multiplies by the file's pages, which the kernel reads in as needed and
may drop under memory pressure). Weights are stored as `formats` says.

Example (the checked-in plan; device pi5-1's part of layer 0):
    >>> from halo_runtime.core.plan import load_plan
    >>> from halo_runtime.core.shards import device_indices
    >>> s = device_indices(load_plan("artifacts/smollm2-135m-pi5"), "pi5-1", layer=0)
    >>> s.kv_heads, s.q_heads, len(s.neurons), s.n_critical
    ((1,), (3, 4, 5), 676, 627)
"""
from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .plan import Plan, PlanError

PROJ = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj"}
"""Shard projection name -> its HF module path."""
COLUMN_SLICED = ("o_proj", "down_proj")
"""Projections a device holds whole column segments of: one segment per neuron group."""
COORDINATOR_WEIGHTS = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight"}
"""Coordinator tensors outside the layers (and lm_head.weight when untied)."""
QUANTISED_EXTRAS = {"embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}
"""Coordinator tensors stored in the plan's weight format (the rest is float32)."""
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def shard_name(layer: int, proj: str) -> str:
    """A layer projection's tensor name in a shard, e.g. layers.3.attn.q_proj."""
    return f"layers.{layer}.{'mlp' if proj in ('gate_proj', 'up_proj', 'down_proj') else 'attn'}.{proj}"


@dataclass(frozen=True)
class LayerSlice:
    """A device's part of one layer, as indices into the full model."""

    kv_heads: tuple[int, ...]
    """KV heads it computes, in shard order."""
    q_heads: tuple[int, ...]
    """Query heads served by those KV heads, in shard order."""
    neurons: tuple[int, ...]
    """MLP neurons, critical groups first, in shard order."""
    n_critical: int
    """How many of `neurons` belong to critical groups."""


def device_indices(plan: Plan, device: str, layer: int) -> LayerSlice:
    g = plan.model.group_size
    kv = [h for grp in plan.groups_on(device, layer, "attn") for h in grp.members]
    mlp = plan.groups_on(device, layer, "mlp")
    neurons = [n for grp in mlp for n in grp.members]
    n_crit = sum(len(grp.members) for grp in mlp if grp.critical)
    return LayerSlice(tuple(kv), tuple(h * g + j for h in kv for j in range(g)), tuple(neurons), n_crit)


def column_groups(plan: Plan, layer: int, proj: str) -> list[list[int]]:
    """Model columns of each segment of a column-sliced projection: the layer's groups by index
    (o_proj: a KV-head group's query heads x head_dim; down_proj: an MLP group's neurons)."""
    hd, g = plan.model.head_dim, plan.model.group_size
    kind = "attn" if proj == "o_proj" else "mlp"
    groups = sorted(plan.layer_groups(layer, kind), key=lambda gr: gr.index)
    if kind == "mlp":
        return [list(gr.members) for gr in groups]
    return [[(h * g + j) * hd + d for h in gr.members for j in range(g) for d in range(hd)] for gr in groups]


# ---- failover: the groups a survivor adopts when a device dies --------------------------------------

FAILOVER_PREFIX = "failover."
"""Shard tensors a survivor keeps for another device's groups; mapped, not read, until it dies."""


def failover_tensor(dead: str, name: str) -> str:
    """The shard name of tensor `name` (as `shard_name` calls it) of the groups a survivor adopts
    when `dead` dies, e.g. failover.pi5-1.layers.3.mlp.gate_proj."""
    return f"{FAILOVER_PREFIX}{dead}.{name}"


def adopted_plan(plan: Plan, dead: str, holder: str) -> Plan | None:
    """The plan as `holder` computes what it adopts from `dead`: exactly those groups, on `holder`,
    so `device_indices`, the compiler's slicing and `DeviceCompute` lay them out as for any device.
    None when `holder` adopts nothing."""
    moved = {gid for gid, to in plan.failover_for(dead).moves if to == holder}
    if not moved:
        return None
    after = plan.without(dead)
    return replace(after, groups=tuple(g for g in after.groups if g.id in moved))


def adopted_shard(shard: dict[str, np.ndarray], dead: str) -> dict[str, np.ndarray]:
    """The tensors of a shard that hold what its device adopts from `dead`, by their `shard_name`s."""
    pre = f"{FAILOVER_PREFIX}{dead}."
    return {k[len(pre):]: v for k, v in shard.items() if k.startswith(pre)}


# ---- reading safetensors files ----------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "U8": np.uint8, "I8": np.int8,
           "U16": np.uint16, "I16": np.int16, "I32": np.int32, "U32": np.uint32, "I64": np.int64,
           "U64": np.uint64, "BOOL": np.bool_}


def read_safetensors(path: str | Path, floats: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only numpy view of the file, mapped (not read).

    safetensors' own numpy loader copies the whole file into memory; a device wants the file's
    pages, which the kernel reads on first touch and may evict and read again. floats: bf16 and
    fp16 tensors (an HF checkpoint's) are converted to float32 copies instead (numpy has no bf16)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = path.stat().st_size
        if size < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ValueError("header length beyond the end of the file")
        header = json.loads(f.read(n))
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else b""
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        bf16 = floats and meta["dtype"] == "BF16"
        dtype = np.uint16 if bf16 else SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name}: dtype {meta['dtype']} is not readable without torch")
        a, b = meta["data_offsets"]
        shape = tuple(meta["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if b - a != count * np.dtype(dtype).itemsize or 8 + n + b > size:
            raise ValueError(f"tensor {name}: its offsets do not match its shape")
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=8 + n + a).reshape(shape)
        if bf16:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif floats and arr.dtype == np.float16:
            arr = arr.astype(np.float32)
        out[name] = arr
    return out


def load_shard(directory: str | Path, plan: Plan, device: str) -> dict[str, np.ndarray]:
    """A device's shard, mapped from the plan directory; PlanError naming the file if unusable."""
    path = Path(directory) / plan.shard_file(device)
    if not path.exists():
        raise PlanError(f"{path}: shard of device {device} is missing (recompile or copy it here)")
    try:
        return read_safetensors(path)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise PlanError(f"{path}: shard of device {device} is unreadable ({e})") from None
