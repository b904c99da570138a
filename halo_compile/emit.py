"""Step 7, emit: plan.json, one safetensors shard per device, the tokenizer, and manifest.json.

Everything is written into a temporary sibling directory first and swapped in at the end, so
a failed or interrupted compile never leaves a half-written plan where a good one was.

The deployment key (`halo_runtime.auth.KEY_FILE`, random, mode 0600, git-ignored) is written
next to the plan unless one is there already: recompiling keeps it, so devices that have it keep
working. It is not in the manifest, so plan.json and manifest.json stay byte-identical.

Example:
    >>> from halo_compile.emit import shard_name
    >>> shard_name("pi5-1")
    'shard-pi5-1.safetensors'
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from halo_runtime.auth import KEY_FILE, ensure_key, read_key
from halo_runtime.integrity import sha256_file
from halo_runtime.plan import MANIFEST_FILE, PLAN_FILE, Plan

TOKENIZER_FILE = "tokenizer.json"


def shard_name(device: str) -> str:
    return f"shard-{device}.safetensors"


def manifest_text(directory: Path, files: list[str]) -> str:
    entries = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
               for name in sorted(files)}
    return json.dumps({"files": entries, "format": "halo-manifest-1"}, indent=1, sort_keys=True) + "\n"


def emit(out_dir: str | Path, plan: Plan, shards: dict[str, dict[str, torch.Tensor]],
         tokenizer_file: str | Path) -> Path:
    """Write the plan directory atomically; returns its path."""
    out = Path(out_dir)
    if (out / KEY_FILE).exists():
        read_key(out / KEY_FILE)  # refuse to compile over a damaged key rather than replace it silently
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = [PLAN_FILE, TOKENIZER_FILE]
        (tmp / PLAN_FILE).write_text(plan.to_json())
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        for device in plan.device_names:
            name = plan.shard_file(device)
            save_file(shards[device], str(tmp / name))
            files.append(name)
        (tmp / MANIFEST_FILE).write_text(manifest_text(tmp, files))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ensure_key(out)  # after the swap: an existing key was carried over by _swap_in
    return out


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
