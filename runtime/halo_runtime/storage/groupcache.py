"""Neuron-group loading for a device whose memory budget is smaller than its shard.

The shard stays on storage, memory-mapped; each group's rows (q/k/v/gate/up) and columns
(o/down) are copied out of the mapping when needed. The most-selected groups that fit are kept
resident (pinned); the rest pass through a bounded window, loaded on a background thread in the
order the coming layers will need them, so storage reads overlap the compute and the network
round trips of the layers before. `exact` mode computes every group (a group not loaded in
time is read on demand, so the output equals the full model's); `predictive` mode skips the
MLP groups the predictor marks inactive for this token, neither reading nor computing them.

Storage is emulated honestly on machines whose page cache would serve reads at memory speed:
`Storage(cold=True)` drops the shard's pages after every read (madvise + posix_fadvise
DONTNEED), and `mbps` throttles reads to the profile's bandwidth; one lock makes the storage a
single queue, as a real SD card or USB disk is.

Which groups stay resident is decided by the pure planner `halo_runtime.core.residency`.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.formats import FORMATS, WeightFormat
from ..core.plan import Plan, PlanError
from ..core.residency import Residency
from ..core.shards import SAFETENSORS_DTYPES

MODES = ("exact", "predictive")


# ---- the shard on storage ------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """One tensor slice of a group: rows (dim 0) or columns (dim 1, model inputs; whole blocks in
    the block formats) start:stop of a shard tensor."""

    name: str
    """Shard tensor name."""
    dim: int
    """0 rows, 1 columns."""
    start: int
    """First row or column."""
    stop: int
    """One past the last."""


def group_parts(plan: Plan, device: str, layer: int, kind: str) -> dict[str, tuple[Part, ...]]:
    """Group id -> its slices of the device's shard, for the device's groups of one layer and kind."""
    cfg, out, at = plan.model, {}, 0
    pre = f"layers.{layer}.{kind}"
    for g in plan.groups_on(device, layer, kind):
        if kind == "attn":
            q, kv = cfg.group_size * cfg.head_dim * len(g.members), cfg.head_dim * len(g.members)
            a, b = at * cfg.group_size * cfg.head_dim, at * cfg.head_dim
            out[g.id] = (Part(f"{pre}.q_proj", 0, a, a + q), Part(f"{pre}.k_proj", 0, b, b + kv),
                         Part(f"{pre}.v_proj", 0, b, b + kv), Part(f"{pre}.o_proj", 1, a, a + q))
        else:
            n = len(g.members)
            out[g.id] = (Part(f"{pre}.gate_proj", 0, at, at + n), Part(f"{pre}.up_proj", 0, at, at + n),
                         Part(f"{pre}.down_proj", 1, at, at + n))
        at += len(g.members)
    return out


class Storage:
    """A safetensors shard, memory-mapped; `read` copies a slice out and (cold) drops its pages."""

    def __init__(self, path: str | Path, mbps: float = 0.0, cold: bool = False, fmt: WeightFormat = FORMATS["fp32"]):
        """mbps: throttle reads to this many MB/s (0: as fast as the disk); cold: drop pages after reads;
        fmt: the weight format of its matrices (column slices are whole blocks of it)."""
        self.path, self.mbps, self.cold, self.fmt = Path(path), mbps, cold, fmt
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise PlanError(f"{self.path}: cannot open shard ({e.strerror})") from None
        self.map = mmap.mmap(self.fd, 0, prot=mmap.PROT_READ)
        (n,) = struct.unpack("<Q", self.map[:8])
        self.header = {k: v for k, v in json.loads(self.map[8:8 + n]).items() if k != "__metadata__"}
        self.base = 8 + n
        self.lock = threading.Lock()  # one storage queue: background and on-demand reads take turns

    def names(self) -> list[str]:
        return sorted(self.header)

    def _array(self, name: str) -> np.ndarray:
        meta = self.header[name]
        begin, end = meta["data_offsets"]
        return np.ndarray(tuple(meta["shape"]), dtype=SAFETENSORS_DTYPES[meta["dtype"]], buffer=self.map,
                          offset=self.base + begin), (self.base + begin, self.base + end)

    def tensor(self, name: str) -> np.ndarray:
        """A whole tensor, copied into RAM."""
        return self.read((Part(name, 0, 0, self.header[name]["shape"][0]),))[0][0]

    def per_col(self, name: str) -> float:
        """Stored elements per model column of a matrix (column slices are cut in these units)."""
        itemsize = np.dtype(SAFETENSORS_DTYPES[self.header[name]["dtype"]]).itemsize
        return self.fmt.bytes_per_col / itemsize

    def read(self, parts) -> tuple[list[np.ndarray], int]:
        """Copies of the slices, and the bytes they hold; throttled and page-dropped as configured."""
        with self.lock:
            t0, out, nbytes, spans = time.perf_counter(), [], 0, []
            for p in parts:
                arr, span = self._array(p.name)
                if p.dim == 0:
                    piece = arr[p.start:p.stop]
                else:
                    f = self.per_col(p.name)
                    piece = arr[:, int(p.start * f):int(p.stop * f)]
                out.append(np.ascontiguousarray(piece).copy())
                nbytes += piece.nbytes
                spans.append(span)
            if self.cold:
                for begin, end in spans:
                    # unmap our pages, then evict them from the page cache: the next read hits storage
                    page = begin - begin % mmap.PAGESIZE
                    self.map.madvise(mmap.MADV_DONTNEED, page, end - page)
                    os.posix_fadvise(self.fd, page, end - page, os.POSIX_FADV_DONTNEED)
            if self.mbps > 0:
                left = nbytes / (self.mbps * 1e6) - (time.perf_counter() - t0)
                if left > 0:
                    time.sleep(left)
            return out, nbytes

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


# ---- the cache ----------------------------------------------------------------------------------

@dataclass
class CacheStats:
    """What loading cost and how much of it the overlap hid."""

    needed: int = 0
    """Group loads the compute asked for (resident groups included)."""
    hits: int = 0
    """Of those, found in RAM: resident, or prefetched and ready."""
    waited: int = 0
    """Found in flight on the background thread: the compute waited for the rest of the read."""
    demand: int = 0
    """Not prefetched: read on demand by the compute thread."""
    skipped: int = 0
    """MLP groups skipped as predicted inactive (predictive mode)."""
    loads: int = 0
    """Storage reads of one group."""
    bytes_loaded: int = 0
    """Bytes read from storage."""
    load_s: float = 0.0
    """Seconds spent reading (throttle included), on either thread."""
    stall_s: float = 0.0
    """Seconds the compute waited for weights: the load time the overlap did not hide."""

    def summary(self) -> dict:
        hidden = 1.0 - self.stall_s / self.load_s if self.load_s > 0 else 1.0
        return {**self.__dict__, "hit_rate": self.hits / self.needed if self.needed else 1.0,
                "hidden_share": max(0.0, hidden)}


@dataclass
class _Entry:
    tensors: list
    nbytes: int
    pinned: bool
    used: bool = False


class GroupCache:
    """Bounded RAM for one device's groups: pinned residents plus a window of streamed groups."""

    def __init__(self, storage: Storage, parts: dict[str, tuple[Part, ...]], residency: Residency):
        """parts: every group id of the device -> its shard slices."""
        self.storage, self.parts, self.res = storage, parts, residency
        self.entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order among streamed entries
        self.streamed_bytes = 0
        self.stats = CacheStats()
        self.queue: deque[str] = deque()
        self.loading: set[str] = set()  # being read, by either thread
        self.cond = threading.Condition()
        self.closed = False
        for gid in parts:
            if gid in residency.resident:
                tensors, n = storage.read(parts[gid])
                self.entries[gid] = _Entry(tensors, n, pinned=True)
        self.loader = threading.Thread(target=self._run, name="group-loader", daemon=True)
        self.loader.start()

    # the compute side

    def prefetch(self, gids) -> None:
        """Queue groups for the background thread, in the order they will be needed."""
        with self.cond:
            for gid in gids:
                if gid not in self.entries and gid not in self.loading and gid not in self.queue:
                    self.queue.append(gid)
            self.cond.notify_all()

    def get(self, gids) -> list[list[np.ndarray]]:
        """Each group's tensors, waiting for in-flight reads and reading the rest on demand."""
        out = []
        for gid in gids:
            t0 = time.perf_counter()
            with self.cond:
                self.stats.needed += 1
                entry = self.entries.get(gid)
                if entry is None and gid in self.loading:
                    self.stats.waited += 1
                    while gid in self.loading:
                        self.cond.wait()
                    entry = self.entries.get(gid)
                elif entry is not None:
                    self.stats.hits += 1
                if entry is None:
                    if gid in self.queue:
                        self.queue.remove(gid)
                    self.stats.demand += 1
                    self.loading.add(gid)
            if entry is None:
                try:
                    entry = self._load(gid, demand=True)
                finally:
                    with self.cond:
                        self.loading.discard(gid)
                        self.cond.notify_all()
            with self.cond:
                if not entry.pinned:
                    self.entries.move_to_end(gid)
                self.stats.stall_s += time.perf_counter() - t0
            out.append(entry.tensors)
        return out

    def release(self, gids) -> None:
        """These groups are computed for this token: their streamed copies may be evicted."""
        with self.cond:
            for gid in gids:
                e = self.entries.get(gid)
                if e is not None and not e.pinned:
                    e.used = True
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.loader.join(timeout=2)

    # the loading side

    def _room(self, nbytes: int, demand: bool) -> bool:
        """Evict used streamed entries (least recently used first) until nbytes fit; on demand,
        also unused ones. Caller holds the lock."""
        limit = self.res.window
        for only_used in (True, False) if demand else (True,):
            for gid in [g for g, e in self.entries.items() if not e.pinned and (e.used or not only_used)]:
                if self.streamed_bytes + nbytes <= limit:
                    return True
                self.streamed_bytes -= self.entries.pop(gid).nbytes
        return self.streamed_bytes + nbytes <= limit or (demand and self.streamed_bytes == 0)

    def _load(self, gid: str, demand: bool) -> _Entry:
        t0 = time.perf_counter()
        tensors, n = self.storage.read(self.parts[gid])
        with self.cond:
            self.stats.loads += 1
            self.stats.bytes_loaded += n
            self.stats.load_s += time.perf_counter() - t0
            entry = _Entry(tensors, n, pinned=False)
            if demand:
                self._room(n, demand=True)
            self.entries[gid] = entry
            self.streamed_bytes += n
            self.cond.notify_all()
        return entry

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not (self.queue and self._room(
                        sum_bytes(self.storage, self.parts[self.queue[0]]), demand=False)):
                    self.cond.wait(0.05)
                if self.closed:
                    return
                gid = self.queue.popleft()
                if gid in self.entries or gid in self.loading:
                    continue
                self.loading.add(gid)
            try:
                self._load(gid, demand=False)
            finally:
                with self.cond:
                    self.loading.discard(gid)
                    self.cond.notify_all()


def sum_bytes(storage: Storage, parts) -> int:
    """Bytes a read of these slices copies."""
    total = 0
    for p in parts:
        shape = storage.header[p.name]["shape"]
        item = np.dtype(SAFETENSORS_DTYPES[storage.header[p.name]["dtype"]]).itemsize
        if p.dim == 0:
            total += (p.stop - p.start) * shape[1] * item
        else:
            total += int((p.stop - p.start) * storage.per_col(p.name)) * shape[0] * item
    return total


@dataclass(frozen=True)
class LoadConfig:
    """How a streaming device loads its groups."""

    budget: int
    """Bytes of weights it may hold in RAM."""
    mode: str = "exact"
    """exact: compute every group; predictive: skip MLP groups predicted inactive for the token."""
    mbps: float = 0.0
    """Emulated storage read bandwidth in MB/s (0: the real disk's speed)."""
    cold: bool = True
    """Drop the shard's pages after each read, so reads come from storage, not the page cache."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"load mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.budget <= 0:
            raise ValueError("memory budget must be positive")
        if self.mbps < 0:
            raise ValueError("storage bandwidth must be >= 0")
