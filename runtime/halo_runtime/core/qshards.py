"""Quantised shards: cut the plan's quantised model per device, put it back, fingerprint it.

`shards.slice_device` and `shards.assemble` call here when `Plan.weights` is not fp32. A device
takes whole rows of the row-sliced projections (with their scales) and whole segments (neuron
groups) of the column-sliced ones, so nothing is requantised: assembling the shards gives back
the plan's quantised model bit for bit, which `quant_fingerprint` checks.

Example (the checked-in plan, re-formatted as int8 over random weights of its shape):
    >>> import dataclasses, torch
    >>> from halo_runtime.core.plan import load_plan
    >>> from halo_runtime.core.qshards import assemble_quantised, quant_fingerprint
    >>> from halo_runtime.core.shards import quantise_model, slice_device
    >>> plan = load_plan("artifacts/smollm2-135m-pi5")
    >>> cfg = dataclasses.replace(plan.model, num_layers=1, vocab_size=64)
    >>> plan = dataclasses.replace(plan, model=cfg, groups=tuple(plan.layer_groups(0)), weights="int8",
    ...                            weights_fingerprint="-")
    >>> h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    >>> shapes = {"embed_tokens": (64, h), "norm": (h,), "layers.0.input_layernorm": (h,),
    ...           "layers.0.post_attention_layernorm": (h,), "layers.0.self_attn.q_proj": (q, h),
    ...           "layers.0.self_attn.k_proj": (kv, h), "layers.0.self_attn.v_proj": (kv, h),
    ...           "layers.0.self_attn.o_proj": (h, q), "layers.0.mlp.gate_proj": (i, h),
    ...           "layers.0.mlp.up_proj": (i, h), "layers.0.mlp.down_proj": (h, i)}
    >>> w = {f"model.{n}.weight": torch.randn(s) for n, s in shapes.items()}
    >>> q = quantise_model(plan, w)
    >>> shards = {d: slice_device(plan, d, w, q) for d in plan.device_names}
    >>> back, norms = assemble_quantised(plan, shards)
    >>> quant_fingerprint(back) == quant_fingerprint(q), shards["pi5-1"]["layers.0.mlp.down_proj"].dtype
    (True, torch.int8)
"""
from __future__ import annotations

import hashlib
import json

import torch

from .plan import Plan, PlanError
from .quant import QuantWeight, cat_segments, take_rows, take_segments, to_tensors
from .shards import (
    COLUMN_SLICED,
    COORDINATOR_WEIGHTS,
    LAYER_NORMS,
    PROJ,
    QUANTISED_EXTRAS,
    device_indices,
    read_weight,
)


def _row_index(plan: Plan, device: str, layer: int, proj: str) -> list[int]:
    """Model rows of a row-sliced projection that `device` holds, in shard order."""
    s, hd = device_indices(plan, device, layer), plan.model.head_dim
    if proj == "q_proj":
        return [h * hd + j for h in s.q_heads for j in range(hd)]
    if proj in ("k_proj", "v_proj"):
        return [h * hd + j for h in s.kv_heads for j in range(hd)]
    return list(s.neurons)


def _segment_index(plan: Plan, device: str, layer: int, proj: str) -> list[int]:
    """Segments (group indices among the layer's groups of that kind) `device` holds, in shard order."""
    kind = "attn" if proj == "o_proj" else "mlp"
    order = {g.id: i for i, g in enumerate(sorted(plan.layer_groups(layer, kind), key=lambda g: g.index))}
    return [order[g.id] for g in plan.groups_on(device, layer, kind)]


def shard_segments(plan: Plan, device: str, layer: int, proj: str) -> tuple[int, ...]:
    """Column counts of the segments of a column-sliced projection in `device`'s shard."""
    g, hd = plan.model.group_size, plan.model.head_dim
    kind = "attn" if proj == "o_proj" else "mlp"
    width = (lambda gr: len(gr.members) * g * hd) if kind == "attn" else (lambda gr: len(gr.members))
    return tuple(width(gr) for gr in plan.groups_on(device, layer, kind))


def _holds(plan: Plan, device: str, layer: int, proj: str) -> bool:
    s = device_indices(plan, device, layer)
    return bool(s.neurons) if proj in ("gate_proj", "up_proj", "down_proj") else bool(s.kv_heads)


def slice_quantised(plan: Plan, device: str, weights: dict[str, torch.Tensor],
                    qmodel: dict[str, QuantWeight]) -> dict[str, torch.Tensor]:
    """What `device` holds of the quantised model (values and scales), plus its fp32 norms."""
    out: dict[str, torch.Tensor] = {}
    for layer in range(plan.model.num_layers):
        out.update(slice_quantised_layer(plan, device, layer, weights, qmodel))
    if device == plan.coordinator:
        out.update(slice_quantised_extras(plan, weights, qmodel))
    return out


def slice_quantised_layer(plan: Plan, device: str, layer: int, weights, qmodel) -> dict[str, torch.Tensor]:
    """`slice_quantised`'s part for one layer (`weights`, `qmodel`: that layer's tensors suffice)."""
    out: dict[str, torch.Tensor] = {}
    pre = f"layers.{layer}"
    for proj, path in PROJ.items():
        if not _holds(plan, device, layer, proj):
            continue
        q = qmodel[f"model.layers.{layer}.{path}.weight"]
        part = take_segments(q, _segment_index(plan, device, layer, proj)) if proj in COLUMN_SLICED \
            else take_rows(q, _row_index(plan, device, layer, proj))
        out.update(to_tensors(f"{pre}.{path.split('.')[0].replace('self_attn', 'attn')}.{proj}", part))
    if device == plan.coordinator:
        for norm in LAYER_NORMS:
            out[f"{pre}.{norm}"] = weights[f"model.layers.{layer}.{norm}.weight"].contiguous()
    return out


def slice_quantised_extras(plan: Plan, weights, qmodel) -> dict[str, torch.Tensor]:
    """The coordinator's quantised embeddings and LM head, and its fp32 final norm."""
    out = {"norm": weights[COORDINATOR_WEIGHTS["norm"]].contiguous()}
    for short, hf in QUANTISED_EXTRAS.items():
        if hf in qmodel:
            out.update(to_tensors(short, qmodel[hf]))
    return out


def _shard_name(layer: int, proj: str) -> str:
    return f"layers.{layer}.{'attn' if proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{proj}"


def assemble_quantised(plan: Plan, shards: dict[str, dict[str, torch.Tensor]]
                       ) -> tuple[dict[str, QuantWeight], dict[str, torch.Tensor]]:
    """Inverse of `slice_quantised`: (quantised HF-named weights, fp32 norms), or PlanError naming
    what is off. Every row and segment must come from exactly one device."""
    cfg = plan.model
    qmodel: dict[str, QuantWeight] = {}
    norms: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_layers):
        for proj, path in PROJ.items():
            hf, short = f"model.layers.{layer}.{path}.weight", _shard_name(layer, proj)
            pieces = []
            for dev in plan.device_names:
                if not _holds(plan, dev, layer, proj):
                    continue
                segs = shard_segments(plan, dev, layer, proj) if proj in COLUMN_SLICED else None
                if segs is not None and plan.weights != "int4":
                    segs = None  # one stored run of columns: re-cut below by the plan's widths
                part = read_weight(shards[dev], short, plan, dev, segs)
                if proj in COLUMN_SLICED:
                    widths = shard_segments(plan, dev, layer, proj)
                    if segs is None:
                        if part.cols != sum(widths):
                            raise PlanError(f"shard of {dev}: {short} has {part.cols} columns, plan says {sum(widths)}")
                        part = type(part)(part.format, part.rows, widths, part.values, part.scales)
                    pieces += [(i, take_segments(part, [k]), dev) for k, i in
                               enumerate(_segment_index(plan, dev, layer, proj))]
                else:
                    pieces.append((_row_index(plan, dev, layer, proj), part, dev))
            try:
                qmodel[hf] = _join_segments(hf, pieces) if proj in COLUMN_SLICED else _join_rows(hf, pieces)
            except ValueError as e:
                raise PlanError(f"{hf}: {e}") from None
        for norm in LAYER_NORMS:
            norms[f"model.layers.{layer}.{norm}.weight"] = _get(shards, plan.coordinator, f"layers.{layer}.{norm}")
    norms[COORDINATOR_WEIGHTS["norm"]] = _get(shards, plan.coordinator, "norm")
    coord = shards[plan.coordinator]
    qmodel[QUANTISED_EXTRAS["embed_tokens"]] = read_weight(coord, "embed_tokens", plan, plan.coordinator)
    if not cfg.tie_word_embeddings:
        qmodel[QUANTISED_EXTRAS["lm_head"]] = read_weight(coord, "lm_head", plan, plan.coordinator)
    return qmodel, norms


def _get(shards, device: str, name: str) -> torch.Tensor:
    if name not in shards[device]:
        raise PlanError(f"shard of {device}: missing tensor {name}")
    return shards[device][name]


def _join_rows(name: str, pieces) -> QuantWeight:
    first = pieces[0][1]
    rows = sum(len(idx) for idx, _, _ in pieces)
    values = first.values.new_zeros((rows, first.values.shape[1]))
    scales = None if first.scales is None else first.scales.new_zeros((rows,) + tuple(first.scales.shape[1:]))
    filled = torch.zeros(rows, dtype=torch.int32)
    for idx, part, dev in pieces:
        if part.rows != len(idx) or part.segments != first.segments or part.format != first.format:
            raise ValueError(f"the part from {dev} has {part.rows} rows of {part.segments}, plan says {len(idx)}")
        at = torch.tensor(idx, dtype=torch.long)
        if int(at.max()) >= rows:
            raise ValueError(f"the part from {dev} names row {int(at.max())} beyond {rows}")
        values.index_copy_(0, at, part.values)
        if scales is not None:
            scales.index_copy_(0, at, part.scales)
        filled.index_add_(0, at, torch.ones(len(idx), dtype=torch.int32))
    if not bool((filled == 1).all()):
        raise ValueError(f"row {int((filled != 1).nonzero()[0])} is missing or held more than once")
    return QuantWeight(first.format, rows, first.segments, values, scales)


def _join_segments(name: str, pieces) -> QuantWeight:
    by_index = {}
    for i, part, dev in pieces:
        if i in by_index:
            raise ValueError(f"segment {i} is held more than once")
        by_index[i] = part
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError("a segment is missing across the shards")
    return cat_segments([by_index[i] for i in range(len(by_index))])


def quant_fingerprint(qmodel: dict[str, QuantWeight]) -> str:
    """SHA-256 over a quantised model: per weight by name, its format, segments, values and scales."""
    h = hashlib.sha256()
    for name in sorted(qmodel):
        quant_fingerprint_update(h, name, qmodel[name])
    return h.hexdigest()


def quant_fingerprint_update(h, name: str, q: QuantWeight) -> None:
    """Feed one weight into a `quant_fingerprint` hash; callers feed every weight, sorted by name."""
    h.update(f"{name}\0{q.format.name}\0{json.dumps([q.rows, list(q.segments)])}\0".encode())
    for t in (q.values, q.scales):
        if t is not None:
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
