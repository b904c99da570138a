"""Cutting the model into shards, and putting shards back together (the compiler's side of
`halo_runtime.core.shards`, whose definitions of who holds what it follows).

First the plan's *stored model*: every projection, the embeddings and the (untied) LM head in the
plan's weight format (`halo_runtime.core.formats`), with the columns of the column-sliced
projections (o_proj, down_proj) taken group by group, in group-index order. In the block formats
every group is whole blocks, so a group's bytes never share a block with another's, and the
stored model depends on the groups but never on their placement. A device's shard is then cut
from it without requantising: whole rows of q/k/v/gate/up (its heads' and neurons' rows, in shard
order), whole group segments of o and down, and on the coordinator the embeddings, norms and LM
head. `assemble_stored` puts the shards back into the stored model, which `stored_fingerprint`
hashes (a quantised plan's `weights_fingerprint`); `assemble` also dequantises it, columns back at
their model positions (what `verify` compares with the model, and `eval` runs as the reference).

Example (the checked-in plan, re-formatted as q8_0 over random weights of its shape, one layer):
    >>> import dataclasses, torch
    >>> from halo_runtime.core.plan import load_plan
    >>> from halo_compile.slicing import assemble_stored, slice_device, stored_fingerprint, stored_model
    >>> plan = load_plan("artifacts/smollm2-135m-pi5")
    >>> cfg = dataclasses.replace(plan.model, num_layers=1, vocab_size=64)
    >>> groups = tuple(dataclasses.replace(g, members=tuple(range(96 * g.index, 96 * g.index + 96)))
    ...                if g.kind == "mlp" else g for g in plan.layer_groups(0))
    >>> plan = dataclasses.replace(plan, model=cfg, groups=groups, weights="q8_0", weights_fingerprint="-", failover=())
    >>> h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    >>> shapes = {"embed_tokens": (64, h), "norm": (h,), "layers.0.input_layernorm": (h,),
    ...           "layers.0.post_attention_layernorm": (h,), "layers.0.self_attn.q_proj": (q, h),
    ...           "layers.0.self_attn.k_proj": (kv, h), "layers.0.self_attn.v_proj": (kv, h),
    ...           "layers.0.self_attn.o_proj": (h, q), "layers.0.mlp.gate_proj": (i, h),
    ...           "layers.0.mlp.up_proj": (i, h), "layers.0.mlp.down_proj": (h, i)}
    >>> w = {f"model.{n}.weight": torch.randn(s) for n, s in shapes.items()}
    >>> stored = stored_model(plan, w)
    >>> shards = {d: slice_device(plan, d, w, stored) for d in plan.device_names}
    >>> back, norms = assemble_stored(plan, shards)
    >>> stored_fingerprint(back, plan.weights) == stored_fingerprint(stored, plan.weights)
    True
    >>> shards["pi5-1"]["layers.0.mlp.down_proj"].dtype, len(norms)
    (dtype('uint8'), 3)
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np
import torch
from halo_runtime.core.formats import cat_columns, dequantise, quantise, take_columns, take_rows, weight_format
from halo_runtime.core.plan import Plan, PlanError
from halo_runtime.core.shards import (
    COLUMN_SLICED,
    COORDINATOR_WEIGHTS,
    LAYER_NORMS,
    PROJ,
    QUANTISED_EXTRAS,
    adopted_plan,
    column_groups,
    device_indices,
    failover_tensor,
    shard_name,
)


def _np(t) -> np.ndarray:
    """A weight as contiguous float32 numpy (torch tensors from the checkpoint, or arrays)."""
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float32).contiguous().numpy()
    return np.ascontiguousarray(t, dtype=np.float32)


def stored_names(plan: Plan) -> list[str]:
    """HF names of the tensors the stored model holds in the plan's format."""
    names = [f"model.layers.{layer}.{path}.weight" for layer in range(plan.model.num_layers) for path in PROJ.values()]
    extras = [hf for hf in QUANTISED_EXTRAS.values() if hf != "lm_head.weight" or not plan.model.tie_word_embeddings]
    return names + extras


def _column_proj(name: str) -> tuple[int, str] | None:
    """(layer, proj) of a column-sliced projection's HF name, else None."""
    parts = name.split(".")
    if len(parts) > 3 and parts[-2] in COLUMN_SLICED:
        return int(parts[2]), parts[-2]
    return None


def store_weight(plan: Plan, name: str, w) -> np.ndarray:
    """One entry of the stored model: the fp32 weight `name` in the plan's format, column-sliced
    projections with their columns group by group (so a compiler can store one tensor at a time)."""
    cp = _column_proj(name)
    if cp is not None:
        groups = column_groups(plan, *cp)
        fmt = weight_format(plan.weights)
        for g in groups:
            if len(g) % fmt.block:
                raise PlanError(f"{name}: a group of {len(g)} columns is not whole {plan.weights} blocks of "
                                f"{fmt.block} (group MLP neurons in multiples of {fmt.block})")
        return quantise(_np(w)[:, np.concatenate([np.asarray(g) for g in groups])], plan.weights)
    return quantise(_np(w), plan.weights)


def stored_model(plan: Plan, weights: Mapping) -> dict[str, np.ndarray]:
    """The plan's stored model (HF-named); `weights` may hold only some layers."""
    return {name: store_weight(plan, name, weights[name]) for name in stored_names(plan) if name in weights}


def _segments(plan: Plan, layer: int, proj: str, device: str | None = None, layout: Plan | None = None
              ) -> list[tuple[int, int]]:
    """Column ranges in the stored matrix of each group (by index), or of `device`'s groups in shard
    order; layout: the plan whose groups `device` holds (default `plan`; a failover's adopted plan)."""
    starts, at = [], 0
    for g in column_groups(plan, layer, proj):
        starts.append((at, at + len(g)))
        at += len(g)
    if device is None:
        return starts
    kind = "attn" if proj == "o_proj" else "mlp"
    return [starts[g.index] for g in (layout or plan).groups_on(device, layer, kind)]


def _row_index(plan: Plan, device: str, layer: int, proj: str) -> list[int]:
    """Model rows of a row-sliced projection that `device` holds, in shard order."""
    s, hd = device_indices(plan, device, layer), plan.model.head_dim
    if proj == "q_proj":
        return [h * hd + j for h in s.q_heads for j in range(hd)]
    if proj in ("k_proj", "v_proj"):
        return [h * hd + j for h in s.kv_heads for j in range(hd)]
    return list(s.neurons)


def _holds(plan: Plan, device: str, layer: int, proj: str) -> bool:
    s = device_indices(plan, device, layer)
    return bool(s.neurons) if proj in ("gate_proj", "up_proj", "down_proj") else bool(s.kv_heads)


def slice_layer(plan: Plan, device: str, layer: int, weights: Mapping, stored: Mapping | None = None
                ) -> dict[str, np.ndarray]:
    """What `device` holds of one layer: its rows and group segments of the stored model (made here
    from `weights` where `stored` lacks them), plus the coordinator's fp32 norms."""
    out = _projections(plan, plan, device, layer, weights, stored)
    if device == plan.coordinator:
        for norm in LAYER_NORMS:
            out[f"layers.{layer}.{norm}"] = _np(weights[f"model.layers.{layer}.{norm}.weight"])
    return out


def _projections(plan: Plan, layout: Plan, device: str, layer: int, weights: Mapping, stored: Mapping | None
                 ) -> dict[str, np.ndarray]:
    """The projections of one layer that `device` holds under `layout` (`plan` itself, or a failover's
    adopted plan), cut from `plan`'s stored model: a layout's rows are model rows whatever groups
    it holds, but o and down columns sit where `plan`'s groups put them."""
    fmt = weight_format(plan.weights)
    out = {}
    for proj, path in PROJ.items():
        if not _holds(layout, device, layer, proj):
            continue
        hf = f"model.layers.{layer}.{path}.weight"
        q = stored[hf] if stored is not None and hf in stored else store_weight(plan, hf, weights[hf])
        if proj in COLUMN_SLICED:
            out[shard_name(layer, proj)] = take_columns(q, fmt, _segments(plan, layer, proj, device, layout))
        else:
            out[shard_name(layer, proj)] = take_rows(q, _row_index(layout, device, layer, proj))
    return out


def adopted_layouts(plan: Plan, holder: str) -> dict[str, Plan]:
    """Per device whose death `holder` would absorb part of (`plan.failover`), the plan of what it
    adopts (`shards.adopted_plan`), in plan order; a plan without failover gives none."""
    out = {}
    for f in plan.failover:
        sub = adopted_plan(plan, f.device, holder) if f.absorbable else None
        if sub is not None:
            out[f.device] = sub
    return out


def slice_adopted(plan: Plan, holder: str, layer: int, weights: Mapping, stored: Mapping | None = None,
                  layouts: dict[str, Plan] | None = None) -> dict[str, np.ndarray]:
    """What `holder` keeps of one layer for the failovers it takes part in: per dead device, the
    projections of the groups it would adopt, as `slice_layer` lays out any device's (so the
    runtime builds them as a `DeviceCompute` of `shards.adopted_plan`), named `failover_tensor`.
    layouts: `adopted_layouts(plan, holder)`, if already made (a layer at a time, they are)."""
    layouts = adopted_layouts(plan, holder) if layouts is None else layouts
    return {failover_tensor(dead, name): t for dead, sub in layouts.items()
            for name, t in _projections(plan, sub, holder, layer, weights, stored).items()}


def slice_extras(plan: Plan, device: str, weights: Mapping, stored: Mapping | None = None) -> dict[str, np.ndarray]:
    """What `device` holds outside the layers: on the coordinator the embeddings, final norm and LM head."""
    if device != plan.coordinator:
        return {}
    out = {"norm": _np(weights[COORDINATOR_WEIGHTS["norm"]])}
    for short, hf in QUANTISED_EXTRAS.items():
        if hf == "lm_head.weight" and plan.model.tie_word_embeddings:
            continue
        out[short] = stored[hf] if stored is not None and hf in stored else store_weight(plan, hf, weights[hf])
    return out


def slice_device(plan: Plan, device: str, weights: Mapping, stored: Mapping | None = None) -> dict[str, np.ndarray]:
    """Every tensor of `device`'s shard (HF-named fp32 `weights` in, shard-named arrays out), the
    groups it would adopt in a failover included."""
    stored = stored if stored is not None else stored_model(plan, weights)
    out = {}
    layouts = adopted_layouts(plan, device)
    for layer in range(plan.model.num_layers):
        out.update(slice_layer(plan, device, layer, weights, stored))
        out.update(slice_adopted(plan, device, layer, weights, stored, layouts))
    out.update(slice_extras(plan, device, weights, stored))
    return out


# ---- putting shards back ---------------------------------------------------------------------------

def _get(shards, device: str, name: str) -> np.ndarray:
    if name not in shards[device]:
        raise PlanError(f"shard of {device}: missing tensor {name}")
    return np.asarray(shards[device][name])


def assemble_stored(plan: Plan, shards: Mapping[str, Mapping[str, np.ndarray]]
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inverse of slicing: (the stored model, HF-named; the fp32 norms), or PlanError naming what is
    off. Every row and group segment must come from exactly one device."""
    cfg, fmt = plan.model, weight_format(plan.weights)
    stored: dict[str, np.ndarray] = {}
    norms: dict[str, np.ndarray] = {}
    for layer in range(cfg.num_layers):
        for proj, path in PROJ.items():
            hf, short = f"model.layers.{layer}.{path}.weight", shard_name(layer, proj)
            cols = cfg.hidden_size
            try:
                if proj in COLUMN_SLICED:
                    segs, pieces = _segments(plan, layer, proj), {}
                    for dev in plan.device_names:
                        if not _holds(plan, dev, layer, proj):
                            continue
                        part, at = _get(shards, dev, short), 0
                        mine = _segments(plan, layer, proj, dev)
                        width = sum(b - a for a, b in mine)
                        if fmt.cols_of(part) != width or part.shape[0] != cfg.hidden_size:
                            raise PlanError(f"shard of {dev}: {short} holds {fmt.cols_of(part)} columns of "
                                            f"{part.shape[0]} rows, plan says {width} of {cfg.hidden_size}")
                        for a, b in mine:
                            i = segs.index((a, b))
                            if i in pieces:
                                raise PlanError(f"{hf}: segment {i} is held more than once")
                            pieces[i] = take_columns(part, fmt, [(at, at + b - a)])
                            at += b - a
                    if sorted(pieces) != list(range(len(segs))):
                        raise PlanError(f"{hf}: a segment is missing across the shards")
                    stored[hf] = cat_columns([pieces[i] for i in range(len(segs))])
                else:
                    total = {"q_proj": cfg.num_heads * cfg.head_dim, "k_proj": cfg.num_kv_heads * cfg.head_dim,
                             "v_proj": cfg.num_kv_heads * cfg.head_dim}.get(proj, cfg.intermediate_size)
                    held = np.zeros(total, dtype=np.int64)
                    out = np.zeros(fmt.stored_shape(total, cols), dtype=fmt.dtype)
                    for dev in plan.device_names:
                        if not _holds(plan, dev, layer, proj):
                            continue
                        part, idx = _get(shards, dev, short), _row_index(plan, dev, layer, proj)
                        if part.shape != (len(idx), out.shape[1]):
                            raise PlanError(f"shard of {dev}: {short} has shape {part.shape}, plan says "
                                            f"{(len(idx), out.shape[1])}")
                        np.add.at(held, idx, 1)  # counted, so a row twice in one shard shows too
                        out[idx] = part
                    if (held != 1).any():
                        bad = int(np.flatnonzero(held != 1)[0])
                        what = "missing" if held[bad] == 0 else "held more than once"
                        raise PlanError(f"{hf}: row {bad} is {what} across the shards")
                    stored[hf] = out
            except PlanError:
                raise
            except ValueError as e:
                raise PlanError(f"{hf}: {e}") from None
        for norm in LAYER_NORMS:
            norms[f"model.layers.{layer}.{norm}.weight"] = _get(shards, plan.coordinator, f"layers.{layer}.{norm}")
    norms[COORDINATOR_WEIGHTS["norm"]] = _get(shards, plan.coordinator, "norm")
    stored[QUANTISED_EXTRAS["embed_tokens"]] = _get(shards, plan.coordinator, "embed_tokens")
    if not cfg.tie_word_embeddings:
        stored[QUANTISED_EXTRAS["lm_head"]] = _get(shards, plan.coordinator, "lm_head")
    return stored, norms


def dequantise_stored(plan: Plan, name: str, q: np.ndarray) -> np.ndarray:
    """float32 weight of one stored-model entry, columns back at their model positions."""
    w = dequantise(q, plan.weights)
    cp = _column_proj(name)
    if cp is None:
        return w
    out = np.empty_like(w)
    out[:, np.concatenate([np.asarray(g) for g in column_groups(plan, *cp)])] = w
    return out


def assemble(plan: Plan, shards: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """The full HF-named state dict the shards stand for, as fp32 torch tensors (quantised weights
    dequantised); PlanError if a row or segment is missing or held twice."""
    stored, norms = assemble_stored(plan, shards)
    full = {name: dequantise_stored(plan, name, q) for name, q in stored.items()}
    return {name: torch.from_numpy(np.array(a, dtype=np.float32)) for name, a in {**full, **norms}.items()}


def stored_fingerprint(stored: Mapping[str, np.ndarray], weights: str) -> str:
    """SHA-256 over a stored model: per weight by name, its format, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(stored):
        stored_fingerprint_update(h, name, stored[name], weights)
    return h.hexdigest()


def stored_fingerprint_update(h, name: str, q: np.ndarray, weights: str) -> None:
    """Feed one weight into a `stored_fingerprint` hash; callers feed every weight, sorted by name."""
    h.update(f"{name}\0{weights}\0{json.dumps(list(q.shape))}\0".encode())
    h.update(np.ascontiguousarray(q).view(np.uint8).reshape(-1).data)
