"""Step 7, emit: plan.json, one safetensors shard per device, the tokenizer (tokenizer.json, and
tokenizer_config.json with the chat template and special tokens), and manifest.json.

Everything is written into a temporary sibling directory first and swapped in at the end, so
a failed or interrupted compile never leaves a half-written plan where a good one was.

The deployment key (`halo_runtime.core.plandir.KEY_FILE`, random, mode 0600, git-ignored) is written
next to the plan unless one is there already: recompiling keeps it, so devices that have it keep
working. It is not in the manifest, so plan.json and manifest.json stay byte-identical.

File names and the manifest format are defined once, in `halo_runtime.core.plandir`.

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

import os
import shutil
from pathlib import Path

import torch
from halo_runtime.core.chat import TokenizerConfig
from halo_runtime.core.plan import Plan
from halo_runtime.core.plandir import (
    KEY_FILE,
    MANIFEST_FILE,
    PLAN_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    ensure_key,
    manifest_text,
    read_key,
)
from safetensors.torch import save_file

from .load import tokenizer_config


def emit(out_dir: str | Path, plan: Plan, shards: dict[str, dict[str, torch.Tensor]],
         tokenizer_file: str | Path, tok_config: TokenizerConfig | None = None) -> Path:
    """Write the plan directory atomically; returns its path. tok_config: the chat template and
    special tokens [default: read from the checkpoint directory that holds `tokenizer_file`]."""
    out = Path(out_dir)
    if (out / KEY_FILE).exists():
        read_key(out / KEY_FILE)  # refuse to compile over a damaged key rather than replace it silently
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = [PLAN_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]
        (tmp / PLAN_FILE).write_text(plan.to_json())
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        if tok_config is None:
            tok_config = tokenizer_config(Path(tokenizer_file).parent)
        (tmp / TOKENIZER_CONFIG_FILE).write_text(tok_config.to_json(), encoding="utf-8")
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
