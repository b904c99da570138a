"""Step 7, emit: plan.json, one safetensors shard per device, the tokenizer (tokenizer.json, and
tokenizer_config.json with the chat template and special tokens), view.safetensors (what every
device's view of push rounds needs of the coordinator's shard) and manifest.json.

Everything is written into a temporary sibling directory first and swapped in at the end, so
a failed or interrupted compile never leaves a half-written plan where a good one was.

The deployment key (`halo_runtime.core.plandir.KEY_FILE`, random, mode 0600, git-ignored) is written
next to the plan unless one is there already: recompiling keeps it, so devices that have it keep
working. It is not in the manifest, so plan.json and manifest.json stay byte-identical.

File names and the manifest format are defined once, in `halo_runtime.core.plandir`.

`emit` takes shards made in memory; `emit_streaming` makes them from a lazily read checkpoint one
layer at a time (`ShardWriter` assembles each device's file), computing the plan's model and
weights fingerprints on the way, so a compile never holds more than a layer of weights. A
survivor's shard also holds the projections of the groups it adopts in the plan's failovers
(`slicing.slice_adopted`, named `shards.failover_tensor`): on disk, mapped, read only if needed.

Example:
    >>> import tempfile, pathlib
    >>> from halo_compile.emit import _swap_in
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "old").mkdir(); _ = (root / "old" / "halo.key").write_text("k"); _ = (root / "old" / "plan.json").write_text("1")
    >>> (root / "new").mkdir(); _ = (root / "new" / "plan.json").write_text("2")
    >>> _swap_in(root / "new", root / "old")
    >>> sorted(p.name for p in (root / "old").iterdir()), (root / "old" / "plan.json").read_text()
    (['halo.key', 'plan.json'], '2')
"""
from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from halo_runtime.core.chat import TokenizerConfig
from halo_runtime.core.plan import Plan
from halo_runtime.core.push import is_view_tensor
from halo_runtime.core.plandir import (
    KEY_FILE,
    MANIFEST_FILE,
    PLAN_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    VIEW_FILE,
    ensure_key,
    manifest_text,
    read_key,
)

from .load import fingerprint_update, tokenizer_config
from .shardwriter import ShardWriter
from .slicing import (
    adopted_layouts,
    slice_adopted,
    slice_extras,
    slice_layer,
    store_weight,
    stored_fingerprint_update,
    stored_names,
)


def emit(out_dir: str | Path, plan: Plan, shards: dict[str, dict[str, torch.Tensor]],
         tokenizer_file: str | Path, tok_config: TokenizerConfig | None = None) -> Path:
    """Write the plan directory atomically; returns its path. shards: every device's tensors, the
    failover ones (`slicing.slice_device`, or shards read back) included. tok_config: the chat
    template and special tokens [default: read from the checkpoint directory that holds `tokenizer_file`]."""
    def write(tmp: Path) -> Plan:
        for device in plan.device_names:
            writer = ShardWriter(tmp / plan.shard_file(device))
            writer.put_all(shards[device])
            writer.finish()
        return plan
    return _emit(out_dir, plan, write, tokenizer_file, tok_config)[1]


def emit_streaming(out_dir: str | Path, plan: Plan, weights: Mapping[str, torch.Tensor],
                   coordinator_tensors: dict[str, torch.Tensor], tokenizer_file: str | Path,
                   tok_config: TokenizerConfig | None = None) -> tuple[Plan, Path]:
    """`emit` for a plan whose shards are cut from `weights` (HF-named fp32, read one tensor at a
    time) a layer at a time, plus `coordinator_tensors` on the coordinator. Fills in the plan's
    model fingerprint (and, quantised, its weights fingerprint) as they are read; returns the plan
    written and the directory."""
    def write(tmp: Path) -> Plan:
        writers = {dev: ShardWriter(tmp / plan.shard_file(dev)) for dev in plan.device_names}
        try:
            fps = _write_shards(plan, weights, writers)
            writers[plan.coordinator].put_all(coordinator_tensors)
            for w in writers.values():
                w.finish()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        return replace(plan, model_fingerprint=fps[0], weights_fingerprint=fps[1])
    return _emit(out_dir, plan, write, tokenizer_file, tok_config)


def _write_shards(plan: Plan, weights: Mapping[str, torch.Tensor], writers: dict[str, ShardWriter]) -> tuple[str, str]:
    """Every tensor once, in name order (the order both fingerprints hash in: a layer's tensors are
    adjacent in it), each layer sliced for every device as soon as it is complete."""
    model_hash, quant_hash = hashlib.sha256(), hashlib.sha256()
    quantised = plan.weights != "fp32"
    qnames = set(stored_names(plan))
    extras_q = {}
    layer, fp32, qmodel = None, {}, {}
    layouts = {dev: adopted_layouts(plan, dev) for dev in writers}  # once: each is a plan, validated

    def flush():
        for dev, w in writers.items():
            w.put_all(slice_layer(plan, dev, layer, fp32, qmodel))
            # what it would adopt if another device died: mapped, unread, until then
            w.put_all(slice_adopted(plan, dev, layer, fp32, qmodel, layouts[dev]))

    for name in sorted(weights):
        at = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if at != layer and layer is not None:
            flush()
            fp32, qmodel = {}, {}
        layer = at
        t = weights[name]
        fingerprint_update(model_hash, name, t)
        if name in qnames and (at is not None or quantised):  # stored once, then cut for every device
            q = store_weight(plan, name, t)
            if quantised:
                stored_fingerprint_update(quant_hash, name, q, plan.weights)
            (qmodel if at is not None else extras_q)[name] = q
        if at is not None:
            fp32[name] = t
        del t
    if layer is not None:
        flush()
    fp32 = {}
    w = writers[plan.coordinator]
    # the coordinator's embeddings, norm and LM head: quantised ones were kept, fp32 ones read again
    w.put_all(slice_extras(plan, plan.coordinator, weights, extras_q))
    return model_hash.hexdigest(), quant_hash.hexdigest() if quantised else plan.weights_fingerprint


def _emit(out_dir: str | Path, plan: Plan, write_shards: Callable[[Path], Plan], tokenizer_file: str | Path,
          tok_config: TokenizerConfig | None) -> tuple[Plan, Path]:
    """Write the directory: `write_shards(tmp)` writes the shard files and returns the plan to save."""
    out = Path(out_dir)
    if (out / KEY_FILE).exists():
        read_key(out / KEY_FILE)  # refuse to compile over a damaged key rather than replace it silently
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        plan = write_shards(tmp)
        _write_view(tmp, plan)
        files = ([PLAN_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, VIEW_FILE]
                 + [plan.shard_file(d) for d in plan.device_names])
        (tmp / PLAN_FILE).write_text(plan.to_json())
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        if tok_config is None:
            tok_config = tokenizer_config(Path(tokenizer_file).parent)
        (tmp / TOKENIZER_CONFIG_FILE).write_text(tok_config.to_json(), encoding="utf-8")
        (tmp / MANIFEST_FILE).write_text(manifest_text(tmp, files))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ensure_key(out)  # after the swap: an existing key was carried over by _swap_in
    return plan, out


def _write_view(directory: Path, plan: Plan) -> None:
    """VIEW_FILE: the coordinator's shard's tensors every device's view of push rounds needs
    (`core.push.is_view_tensor`), so that a board holds them without the coordinator's shard."""
    from safetensors import safe_open

    writer = ShardWriter(directory / VIEW_FILE)
    with safe_open(str(directory / plan.shard_file(plan.coordinator)), "pt") as f:
        writer.put_all({k: f.get_tensor(k) for k in sorted(f.keys()) if is_view_tensor(k)})
    writer.finish()


def _swap_in(new: Path, target: Path) -> None:
    """Replace target by new; files in target that the compiler did not write are kept."""
    if not target.exists():
        new.rename(target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    new.rename(target)
    ours = set(os.listdir(target))
    for name in os.listdir(old):
        if name not in ours and not name.endswith(".safetensors"):
            shutil.move(str(old / name), str(target / name))
    shutil.rmtree(old, ignore_errors=True)
