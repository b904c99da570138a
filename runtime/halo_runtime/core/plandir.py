"""The plan directory: its file names, its manifest (SHA-256 of every file) and its deployment key.

One definition of each, read by the runtime and written by the compiler (`halo_compile.emit`).
`halo-compile plan` writes manifest.json with the size and SHA-256 of plan.json, tokenizer.json,
tokenizer_config.json and every shard. A shard that was damaged in the copy, or comes from another compile, would
otherwise load fine and compute wrong partial sums; `halo-run` refuses it with one line naming
the file. Hashing runs at disk speed (a SmolLM2 shard: well under a second). The deployment key
(`KEY_FILE`, never committed and not in the manifest) encrypts and authenticates every datagram
(`halo_runtime.net.auth`); `halo-run` finds it with `resolve_key`.

Example:
    >>> import tempfile, pathlib
    >>> from halo_runtime.core.plandir import check_files, manifest_text, shard_file, MANIFEST_FILE
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> (d / shard_file("pi5-1")).write_bytes(b"weights")
    7
    >>> _ = (d / MANIFEST_FILE).write_text(manifest_text(d, [shard_file("pi5-1")]))
    >>> check_files(d, ["shard-pi5-1.safetensors"])
    >>> _ = (d / "shard-pi5-1.safetensors").write_bytes(b"Weights")
    >>> check_files(d, ["shard-pi5-1.safetensors"])
    Traceback (most recent call last):
    ...
    halo_runtime.core.plandir.PlanError: ...shard-pi5-1.safetensors: SHA-256 does not match manifest.json ...
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

PLAN_FILE = "plan.json"
"""The plan (`halo_runtime.core.plan.Plan`), as deterministic JSON."""
MANIFEST_FILE = "manifest.json"
"""Size and SHA-256 of every other file the compiler wrote."""
TOKENIZER_FILE = "tokenizer.json"
"""The model's tokenizer, in HF `tokenizers` format."""
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
"""The model's chat template and special tokens (`halo_runtime.core.chat.TokenizerConfig`)."""
VIEW_FILE = "view.safetensors"
"""What a device's view of push rounds needs beyond its shard: every layer's norms, the predictor
and the compensation (`core.push.view_tensors`), cut from the coordinator's shard."""
KEY_FILE = "halo.key"
"""The deployment key (hex, one line; mode 0600)."""
MANIFEST_FORMAT = "halo-manifest-1"
KEY_BYTES = 32
ENV_KEY_FILE = "HALO_KEY_FILE"
ENV_KEY = "HALO_KEY"


class PlanError(ValueError):
    """A plan or manifest that cannot be used; the message names the file and field."""


def shard_file(device: str) -> str:
    """File name of `device`'s weights."""
    return f"shard-{device}.safetensors"


# --- manifest ------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_text(directory: Path, files: list[str]) -> str:
    """manifest.json's text for `files` (names inside `directory`): deterministic bytes."""
    directory = Path(directory)
    entries = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
               for name in sorted(files)}
    return json.dumps({"files": entries, "format": MANIFEST_FORMAT}, indent=1, sort_keys=True) + "\n"


def read_manifest(directory: str | Path) -> dict[str, dict]:
    """File name -> {"bytes", "sha256"}; PlanError if the manifest is missing or damaged."""
    path = Path(directory) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
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


# --- deployment key ------------------------------------------------------------------------------

class KeyFileError(ValueError):
    """A key file or key string that cannot be used; the message names the source."""


def new_key() -> bytes:
    """A fresh random deployment key."""
    return secrets.token_bytes(KEY_BYTES)


def parse_key(text: str, source: str) -> bytes:
    """The key in `text` (64 hex digits, surrounding whitespace ignored); KeyFileError names `source`."""
    s = text.strip()
    try:
        key = bytes.fromhex(s)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{source}: not a HALO key (expected {2 * KEY_BYTES} hex digits)")
    return key


def read_key(path: str | Path) -> bytes:
    """The key stored in file `path`."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{path}: key file unreadable ({getattr(e, 'strerror', None) or e})") from None
    return parse_key(text, str(path))


def write_key(path: str | Path, key: bytes | None = None) -> bytes:
    """Write `key` (default: a new one) to `path`, readable by its owner only; returns the key."""
    key = new_key() if key is None else key
    if len(key) != KEY_BYTES:
        raise ValueError(f"a key has {KEY_BYTES} bytes, got {len(key)}")
    write_atomically(path, key.hex() + "\n", mode=0o600)
    return key


def write_atomically(path: str | Path, text: str, mode: int = 0o644) -> None:
    """Write `text` to `path` through a temporary file beside it (created with `mode`), synced, then
    renamed: a failure leaves the old file (or none), never half of the new one. An OSError names
    `path`, not the temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; what a failed write left otherwise


def ensure_key(directory: str | Path) -> tuple[Path, bool]:
    """The plan directory's key file, written if missing; (path, created). An existing key is kept
    so that devices already deployed with it keep working after a recompile."""
    path = Path(directory) / KEY_FILE
    if path.exists():
        read_key(path)  # a damaged key is an error, not something to overwrite silently
        return path, False
    write_key(path)
    return path, True


def resolve_key(key_file: str | None, plan_dir: str | Path | None, environ=os.environ) -> tuple[bytes, str]:
    """(key, where it came from): --key-file, then $HALO_KEY_FILE, $HALO_KEY, the plan directory."""
    if key_file:
        return read_key(key_file), key_file
    if environ.get(ENV_KEY_FILE):
        return read_key(environ[ENV_KEY_FILE]), f"${ENV_KEY_FILE}"
    if environ.get(ENV_KEY):
        return parse_key(environ[ENV_KEY], f"${ENV_KEY}"), f"${ENV_KEY}"
    if plan_dir is not None and (Path(plan_dir) / KEY_FILE).exists():
        path = Path(plan_dir) / KEY_FILE
        return read_key(path), str(path)
    where = f"{Path(plan_dir) / KEY_FILE} does not exist and " if plan_dir is not None else ""
    raise KeyFileError(f"no deployment key: {where}neither --key-file nor ${ENV_KEY_FILE} nor ${ENV_KEY} is set "
                    f"(`halo-compile plan` writes {KEY_FILE} next to plan.json; copy it to every device)")
