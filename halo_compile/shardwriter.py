"""Write a safetensors file tensor by tensor (torch tensors or numpy arrays), byte-identical to
`safetensors.torch.save_file`.

`save_file` needs every tensor in memory at once; a device's shard of an 8B model is gigabytes.
`ShardWriter.put` appends each tensor's bytes to a scratch file as it comes (the compiler makes
them one layer at a time), and `finish` writes the real file: the header `save_file` would write
(tensors sorted by dtype, largest first, then by name; compact JSON padded with spaces to 8 bytes)
and the bytes copied from the scratch file in that order, a chunk at a time.

Example:
    >>> import tempfile, pathlib, torch
    >>> from safetensors.torch import save_file
    >>> from halo_compile.shardwriter import ShardWriter
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> tensors = {"b": torch.arange(6, dtype=torch.int8).reshape(2, 3), "a": torch.ones(2, 2),
    ...            "c": torch.tensor([7]), "z": torch.zeros(3, dtype=torch.bfloat16)}
    >>> save_file(tensors, str(d / "ref.safetensors"))
    >>> w = ShardWriter(d / "mine.safetensors")
    >>> for name, t in tensors.items():
    ...     w.put(name, t)
    >>> w.finish()
    >>> (d / "mine.safetensors").read_bytes() == (d / "ref.safetensors").read_bytes()
    True
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

# safetensors' Dtype enum order (the header sorts by it, largest first) and names.
_DTYPES = {torch.bool: ("BOOL", 0), torch.uint8: ("U8", 4), torch.int8: ("I8", 5), torch.int16: ("I16", 9),
           torch.uint16: ("U16", 10), torch.float16: ("F16", 11), torch.bfloat16: ("BF16", 12),
           torch.int32: ("I32", 13), torch.uint32: ("U32", 14), torch.float32: ("F32", 15),
           torch.float64: ("F64", 17), torch.int64: ("I64", 18), torch.uint64: ("U64", 19)}
_NUMPY = {np.dtype(np.bool_): torch.bool, np.dtype(np.uint8): torch.uint8, np.dtype(np.int8): torch.int8,
          np.dtype(np.int16): torch.int16, np.dtype(np.uint16): torch.uint16, np.dtype(np.float16): torch.float16,
          np.dtype(np.int32): torch.int32, np.dtype(np.uint32): torch.uint32, np.dtype(np.float32): torch.float32,
          np.dtype(np.float64): torch.float64, np.dtype(np.int64): torch.int64, np.dtype(np.uint64): torch.uint64}
COPY_CHUNK = 64 << 20
"""Bytes copied from the scratch file per read."""


def tensor_bytes(t) -> memoryview:
    """The tensor's (or array's) raw little-endian bytes, as safetensors stores them."""
    if isinstance(t, np.ndarray):
        return memoryview(np.ascontiguousarray(t).reshape(-1).view(np.uint8)) if t.size else memoryview(b"")
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class ShardWriter:
    """One safetensors file written incrementally: `put` each tensor once, then `finish`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._scratch_path = self.path.with_name(f".{self.path.name}.scratch")
        self._scratch = open(self._scratch_path, "wb")
        self._entries: dict[str, tuple[str, int, list[int], int, int]] = {}

    def put(self, name: str, tensor) -> None:
        if name in self._entries:
            raise ValueError(f"{self.path}: tensor {name} written twice")
        dt = _NUMPY.get(tensor.dtype) if isinstance(tensor, np.ndarray) else tensor.dtype
        if dt not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {tensor.dtype}")
        data = tensor_bytes(tensor)
        dtype, rank = _DTYPES[dt]
        self._entries[name] = (dtype, rank, list(tensor.shape), self._scratch.tell(), data.nbytes)
        self._scratch.write(data)

    def put_all(self, tensors: dict) -> None:
        for name, t in tensors.items():
            self.put(name, t)

    def header(self) -> bytes:
        """The header save_file writes for the tensors put so far (length prefix included)."""
        order = sorted(self._entries, key=lambda n: (-self._entries[n][1], n))
        meta, offset = {}, 0
        for name in order:
            dtype, _, shape, _, n = self._entries[name]
            meta[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * ((8 - len(text) % 8) % 8)
        return struct.pack("<Q", len(text)) + text

    def finish(self) -> None:
        """Write the file and remove the scratch file."""
        self._scratch.close()
        order = sorted(self._entries, key=lambda n: (-self._entries[n][1], n))
        try:
            with open(self._scratch_path, "rb") as src, open(self.path, "wb") as dst:
                dst.write(self.header())
                for name in order:
                    *_, start, n = self._entries[name]
                    src.seek(start)
                    while n > 0:
                        chunk = src.read(min(n, COPY_CHUNK))
                        dst.write(chunk)
                        n -= len(chunk)
        finally:
            os.unlink(self._scratch_path)

    def abort(self) -> None:
        """Drop the scratch file (after a failure)."""
        self._scratch.close()
        if self._scratch_path.exists():
            os.unlink(self._scratch_path)
