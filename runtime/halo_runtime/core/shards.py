"""Shard layout: which rows and columns of which weight each device holds, defined once.

The compiler slices shards with `slice_device`; `halo-compile verify` puts them back together
with `assemble`; the runtime loads them with `load_shard`. Rows follow `Plan.groups_on` order
(critical groups first), so a device's critical and relaxed MLP neurons are contiguous slices.

Example (the checked-in plan; device pi5-1's part of layer 0):
    >>> from halo_runtime.core.plan import load_plan
    >>> from halo_runtime.core.shards import device_indices
    >>> s = device_indices(load_plan("artifacts/smollm2-135m-pi5"), "pi5-1", layer=0)
    >>> s.kv_heads, s.q_heads, len(s.neurons), s.n_critical
    ((1,), (3, 4, 5), 676, 627)
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .plan import Plan, PlanError
from .quant import (
    SCALE_SUFFIX,
    QuantWeight,
    dequantise,
    dequantise_columns,
    from_tensors,
    quantise,
    quantise_columns,
)

PROJ = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj"}
COORDINATOR_WEIGHTS = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight"}
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


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


def _rows(w: torch.Tensor, heads_or_neurons, width: int) -> torch.Tensor:
    idx = torch.tensor([i * width + j for i in heads_or_neurons for j in range(width)], dtype=torch.long)
    return w.index_select(0, idx)


def slice_device(plan: Plan, device: str, weights: dict[str, torch.Tensor],
                 qmodel: dict[str, QuantWeight] | None = None) -> dict[str, torch.Tensor]:
    """The model weights one device holds (HF-named `weights` in, shard-named tensors out), in
    the plan's format: quantised plans cut `qmodel` (`quantise_model`, made here if not given)."""
    if plan.weights != "fp32":
        qmodel = qmodel or quantise_model(plan, weights)
    out = {}
    for layer in range(plan.model.num_layers):
        out.update(slice_layer(plan, device, layer, weights, qmodel))
    out.update(slice_extras(plan, device, weights, qmodel))
    return out


def slice_layer(plan: Plan, device: str, layer: int, weights, qmodel=None) -> dict[str, torch.Tensor]:
    """`slice_device`'s part for one layer: `weights` (and, quantised, `qmodel`) need hold only
    that layer's tensors, so a compiler can cut shards one layer at a time."""
    if plan.weights != "fp32":
        from .qshards import slice_quantised_layer
        return slice_quantised_layer(plan, device, layer, weights, qmodel)
    hd, out = plan.model.head_dim, {}
    s = device_indices(plan, device, layer)
    w = lambda p: weights[f"model.layers.{layer}.{PROJ[p]}.weight"]  # noqa: E731
    pre = f"layers.{layer}"
    if s.kv_heads:
        out[f"{pre}.attn.q_proj"] = _rows(w("q_proj"), s.q_heads, hd)
        out[f"{pre}.attn.k_proj"] = _rows(w("k_proj"), s.kv_heads, hd)
        out[f"{pre}.attn.v_proj"] = _rows(w("v_proj"), s.kv_heads, hd)
        out[f"{pre}.attn.o_proj"] = _rows(w("o_proj").T, s.q_heads, hd).T
    if s.neurons:
        idx = torch.tensor(s.neurons, dtype=torch.long)
        out[f"{pre}.mlp.gate_proj"] = w("gate_proj").index_select(0, idx)
        out[f"{pre}.mlp.up_proj"] = w("up_proj").index_select(0, idx)
        out[f"{pre}.mlp.down_proj"] = w("down_proj").index_select(1, idx)
    if device == plan.coordinator:
        for norm in LAYER_NORMS:
            out[f"{pre}.{norm}"] = weights[f"model.layers.{layer}.{norm}.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def slice_extras(plan: Plan, device: str, weights, qmodel=None) -> dict[str, torch.Tensor]:
    """`slice_device`'s tensors outside the layers (the coordinator's embeddings, final norm and
    LM head; nothing for other devices): `weights`/`qmodel` need hold only those."""
    if device != plan.coordinator:
        return {}
    if plan.weights != "fp32":
        from .qshards import slice_quantised_extras
        return slice_quantised_extras(plan, weights, qmodel)
    out = {short: weights[hf] for short, hf in COORDINATOR_WEIGHTS.items()}
    if not plan.model.tie_word_embeddings:
        out["lm_head"] = weights["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def assemble(plan: Plan, shards: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of `slice_device`: the full HF-named state dict, or PlanError naming what is off.

    Every row and column must be supplied exactly once; gaps and overlaps are errors. A quantised
    plan's weights come back dequantised to fp32 (`qshards.assemble_quantised` keeps them quantised).
    """
    if plan.weights != "fp32":
        from .qshards import assemble_quantised
        qmodel, rest = assemble_quantised(plan, shards)
        return {**rest, **{name: dequantise_model_weight(plan, name, q) for name, q in qmodel.items()}}
    cfg, hd = plan.model, plan.model.head_dim
    full: dict[str, torch.Tensor] = {}
    filled: dict[str, torch.Tensor] = {}

    def put(name: str, dim: int, index: list[int], part: torch.Tensor, device: str):
        if name not in full:
            shape = {"q_proj": (cfg.num_heads * hd, cfg.hidden_size),
                     "k_proj": (cfg.num_kv_heads * hd, cfg.hidden_size),
                     "v_proj": (cfg.num_kv_heads * hd, cfg.hidden_size),
                     "o_proj": (cfg.hidden_size, cfg.num_heads * hd),
                     "gate_proj": (cfg.intermediate_size, cfg.hidden_size),
                     "up_proj": (cfg.intermediate_size, cfg.hidden_size),
                     "down_proj": (cfg.hidden_size, cfg.intermediate_size)}[name.split(".")[-2]]
            full[name] = torch.zeros(shape, dtype=part.dtype)
            filled[name] = torch.zeros(shape[dim], dtype=torch.int32)
        idx = torch.tensor(index, dtype=torch.long)
        if part.shape[dim] != len(index):
            raise PlanError(f"shard of {device}: {name} has {part.shape[dim]} slices, plan says {len(index)}")
        full[name].index_copy_(dim, idx, part)
        filled[name].index_add_(0, idx, torch.ones(len(index), dtype=torch.int32))

    for device in plan.device_names:
        shard = shards[device]
        for layer in range(cfg.num_layers):
            s = device_indices(plan, device, layer)
            pre, hf = f"layers.{layer}", f"model.layers.{layer}"
            rows = lambda heads: [h * hd + j for h in heads for j in range(hd)]  # noqa: E731
            try:
                if s.kv_heads:
                    put(f"{hf}.self_attn.q_proj.weight", 0, rows(s.q_heads), shard[f"{pre}.attn.q_proj"], device)
                    put(f"{hf}.self_attn.k_proj.weight", 0, rows(s.kv_heads), shard[f"{pre}.attn.k_proj"], device)
                    put(f"{hf}.self_attn.v_proj.weight", 0, rows(s.kv_heads), shard[f"{pre}.attn.v_proj"], device)
                    put(f"{hf}.self_attn.o_proj.weight", 1, rows(s.q_heads), shard[f"{pre}.attn.o_proj"], device)
                if s.neurons:
                    n = list(s.neurons)
                    put(f"{hf}.mlp.gate_proj.weight", 0, n, shard[f"{pre}.mlp.gate_proj"], device)
                    put(f"{hf}.mlp.up_proj.weight", 0, n, shard[f"{pre}.mlp.up_proj"], device)
                    put(f"{hf}.mlp.down_proj.weight", 1, n, shard[f"{pre}.mlp.down_proj"], device)
                if device == plan.coordinator:
                    for norm in LAYER_NORMS:
                        full[f"{hf}.{norm}.weight"] = shard[f"{pre}.{norm}"]
            except KeyError as e:
                raise PlanError(f"shard of {device}: missing tensor {e.args[0]}") from None
    coord = shards[plan.coordinator]
    for short, hf in COORDINATOR_WEIGHTS.items():
        if short not in coord:
            raise PlanError(f"shard of {plan.coordinator}: missing tensor {short}")
        full[hf] = coord[short]
    if not cfg.tie_word_embeddings:
        if "lm_head" not in coord:
            raise PlanError(f"shard of {plan.coordinator}: missing tensor lm_head")
        full["lm_head.weight"] = coord["lm_head"]
    for name, count in filled.items():
        if not bool((count == 1).all()):
            bad = int((count != 1).nonzero()[0])
            what = "missing" if int(count[bad]) == 0 else "held more than once"
            raise PlanError(f"{name}: slice {bad} is {what} across the shards")
    return full


def load_shard(directory: str | Path, plan: Plan, device: str) -> dict[str, torch.Tensor]:
    path = Path(directory) / plan.shard_file(device)
    if not path.exists():
        raise PlanError(f"{path}: shard of device {device} is missing (recompile or copy it here)")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise PlanError(f"{path}: shard of device {device} is unreadable ({e})") from None


# ---- quantised models (the plan's `weights` format) ------------------------------------------------

ROW_SLICED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
"""Projections a device holds whole rows of (one segment: every input column)."""
COLUMN_SLICED = ("o_proj", "down_proj")
"""Projections a device holds whole column segments of: one segment per neuron group."""
QUANTISED_EXTRAS = {"embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}
"""Coordinator tensors stored in the plan's format too (row-sliced: one segment)."""


def column_groups(plan: Plan, layer: int, proj: str) -> list[list[int]]:
    """Model columns of each segment of a column-sliced projection: the layer's groups by index
    (o_proj: a KV-head group's query heads x head_dim; down_proj: an MLP group's neurons)."""
    hd, g = plan.model.head_dim, plan.model.group_size
    kind = "attn" if proj == "o_proj" else "mlp"
    groups = sorted(plan.layer_groups(layer, kind), key=lambda gr: gr.index)
    if kind == "mlp":
        return [list(gr.members) for gr in groups]
    return [[(h * g + j) * hd + d for h in gr.members for j in range(g) for d in range(hd)] for gr in groups]


def quantise_model(plan: Plan, weights: dict[str, torch.Tensor]) -> dict[str, QuantWeight]:
    """The plan's quantised model: every projection, the embeddings and (untied) LM head in
    `plan.weights`, HF-named. It depends on the groups, never on their placement."""
    out = {}
    for name in quantised_names(plan):
        if name in weights or name.startswith("model.layers."):
            out[name] = quantise_weight(plan, name, weights[name])
    return out


def quantised_names(plan: Plan) -> list[str]:
    """HF names of the tensors `quantise_model` quantises."""
    names = [f"model.layers.{layer}.{path}.weight" for layer in range(plan.model.num_layers) for path in PROJ.values()]
    extras = [hf for hf in QUANTISED_EXTRAS.values() if hf != "lm_head.weight" or not plan.model.tie_word_embeddings]
    return names + extras


def quantise_weight(plan: Plan, name: str, w: torch.Tensor) -> QuantWeight:
    """One entry of `quantise_model`: the fp32 weight `name` in the plan's format (column-sliced
    projections by the layer's groups), so a compiler can quantise one tensor at a time."""
    parts = name.split(".")
    if len(parts) > 3 and parts[-2] in COLUMN_SLICED:
        return quantise_columns(w, plan.weights, column_groups(plan, int(parts[2]), parts[-2]))
    return quantise(w, plan.weights)


def dequantise_model_weight(plan: Plan, name: str, q: QuantWeight) -> torch.Tensor:
    """fp32 weight of one `quantise_model` entry, columns back at their model positions."""
    parts = name.split(".")
    if len(parts) > 3 and parts[-2] in COLUMN_SLICED:
        return dequantise_columns(q, column_groups(plan, int(parts[2]), parts[-2]))
    return dequantise(q)


def read_weight(shard: dict[str, torch.Tensor], name: str, plan: Plan, device: str,
                segments=None) -> QuantWeight:
    """One weight of a quantised shard, or PlanError naming the device and tensor. `segments`
    defaults to one run of columns; int4 row-sliced weights read hidden_size inputs."""
    if segments is None and plan.weights == "int4":
        segments = (plan.model.hidden_size,)
    try:
        return from_tensors(shard, name, plan.weights, segments)
    except ValueError as e:
        raise PlanError(f"shard of {device}: {e}") from None


def fuse_rows(shard: dict[str, torch.Tensor], names: list[str], fused: str, device: str) -> dict[str, torch.Tensor]:
    """The row-sliced weights `names` of a shard stacked into one weight called `fused` (values,
    and scales if stored), returned as shard entries: one product then makes all of their outputs.

    The shard's own entries become views of the stacked tensors, so the process still holds each
    weight once and the shard still reads as written (verify, assemble and simulation see no change).
    """
    out, copied = {}, []
    for suffix in ("", SCALE_SUFFIX):
        keys = [n + suffix for n in names]
        present = [k in shard for k in keys]
        if not any(present) and suffix:
            continue
        if not all(present):
            raise PlanError(f"shard of {device}: missing tensor {keys[present.index(False)]}")
        parts = [shard[k] for k in keys]
        if len({(p.dtype, p.shape[1:]) for p in parts}) != 1:
            raise PlanError(f"shard of {device}: {', '.join(keys)} differ in dtype or columns")
        whole = torch.cat(parts)
        at = 0
        for k, p in zip(keys, parts):
            shard[k] = whole[at:at + p.shape[0]]
            at += p.shape[0]
        out[fused + suffix] = whole
        copied += parts
    _drop_pages(copied)
    return out


def _drop_pages(tensors: list[torch.Tensor]) -> None:
    """Give back the resident pages of tensors nobody reads any more (Linux; elsewhere a no-op).

    `load_file` maps the shard file: its tensors are the file's pages, and the ones `fuse_rows`
    copied would stay resident (counted in RSS twice) until the whole file is unmapped. The pages
    lying wholly inside such a tensor are released (MADV_DONTNEED); read again, they fault back
    from the file. Only tensors inside a file mapping are touched: never memory of our own.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/self/maps") as f:
            files = [tuple(int(a, 16) for a in line.split()[0].split("-")) for line in f
                     if len(line.split()) >= 6 and line.split()[5].startswith("/")]
    except (OSError, AttributeError):
        return
    page = os.sysconf("SC_PAGE_SIZE")
    for t in tensors:
        start = -(-t.data_ptr() // page) * page
        end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
        if end > start and t.is_contiguous() and any(lo <= start and end <= hi for lo, hi in files):
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED
