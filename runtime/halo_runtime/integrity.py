"""Check a device's plan files against the plan's manifest (SHA-256) before serving from them.

`halo-compile plan` writes manifest.json with the size and SHA-256 of plan.json, tokenizer.json
and every shard. A shard that was damaged in the copy, or comes from another compile, would
otherwise load fine and compute wrong partial sums; `halo-run` refuses it with one line naming
the file. Hashing runs at disk speed (a SmolLM2 shard: well under a second).

Example:
    >>> # check_files("artifacts/smollm2-135m-pi5", ["plan.json", "shard-pi5-1.safetensors"])
    >>> # PlanError: .../shard-pi5-1.safetensors: SHA-256 does not match manifest.json (...)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .plan import MANIFEST_FILE, PlanError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: str | Path) -> dict[str, dict]:
    """File name -> {"bytes", "sha256"}; PlanError if the manifest is missing or damaged."""
    path = Path(directory) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("format") != "halo-manifest-1" or not isinstance(files, dict):
            raise ValueError("unknown format")
        return {str(k): {"bytes": int(v["bytes"]), "sha256": str(v["sha256"])} for k, v in files.items()}
    except FileNotFoundError:
        raise PlanError(f"{path}: missing (it is written by halo-compile plan; copy it with the plan)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PlanError(f"{path}: not a HALO manifest ({e})") from None


def check_files(directory: str | Path, names: list[str]) -> None:
    """PlanError naming the first of `names` whose size or SHA-256 differs from the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name in names:
        path = directory / name
        entry = manifest.get(name)
        if entry is None:
            raise PlanError(f"{path}: not listed in {MANIFEST_FILE}")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise PlanError(f"{path}: missing (recompile or copy it here)") from None
        if size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise PlanError(f"{path}: SHA-256 does not match {MANIFEST_FILE} (damaged in the copy, or from "
                            f"another compile; copy the whole plan directory again)")
