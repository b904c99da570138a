"""What a board can give a device: memory available, product throughput per weight format, storage reads.

Part of `halo-run probe` (`halo_runtime.probe`). Compute is measured on the ggml products devices
run (one graph of matrix x vector products, `core.ggmlops`), over distinct matrices filling a
working set larger than the caches, as decode streams its weights: first, sustained (median of the
second half) and p10-p90 GFLOP/s, at 2 x rows x cols flops a product. Storage: a temporary file
written, synced, dropped from the page cache, read back.

Example:
    >>> from halo_runtime.probe.board import speed_of
    >>> s = speed_of("fp32", [10.0, 9.0, 8.0, 8.0], matrices=4)    # a board warming up: 10 -> 8
    >>> s.first_gflops, s.sustained_gflops, s.p10_gflops, s.p90_gflops
    (10.0, 8.0, 8.0, 10.0)
"""
from __future__ import annotations

import ctypes
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

from ..runstats import percentile

MIB = 1024 * 1024
"""A profile's `memory_mb` counts MiB (halo_compile.cluster.MB)."""
FORMAT_ORDER = ("fp32", "bf16", "q8_0", "q4_0")


# ---- memory ----------------------------------------------------------------------------------------

def memory_available() -> tuple[int, str]:
    """(bytes this board can give a device now, where the figure comes from)."""
    avail, source = None, "MemAvailable"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024  # kB in /proc/meminfo are KiB
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:  # not Linux, or an old kernel: free pages (page cache not counted: lower)
        avail, source = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages"
    try:  # a container's cgroup v2 limit binds before the machine's memory does
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                room = int(limit) - int(f.read())
            if room < avail:
                avail, source = room, "cgroup memory.max - memory.current"
    except (OSError, ValueError):
        pass
    return max(avail, 0), source


# ---- compute ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ComputeProbe:
    """How the compute probe runs."""

    shape: tuple[int, int] = (1536, 576)
    """ROWSxCOLS of each product's matrix (default: a SmolLM2-135M MLP projection, 1536x576)."""
    reps: int = 20
    """Timed passes over the working set per format, at least 20."""
    duration_s: float = 1.0
    """Keep repeating until this many seconds per format (a thermal soak: e.g. 300)."""
    working_set_mb: float = 64.0
    """MB (1e6 bytes) of distinct matrices per format, cycled so that they do not stay in cache
    (at most 512 matrices)."""
    formats: tuple[str, ...] = FORMAT_ORDER
    """Weight formats measured (fp32 among them: it is compute_gflops)."""

    def __post_init__(self):
        from ..core.formats import weight_format

        rows, cols = self.shape
        if rows < 1 or cols < 32 or cols % 32:
            raise ValueError(f"--shape {rows}x{cols}: need rows >= 1 and cols a multiple of 32 (the block formats)")
        if self.reps < 20 or self.duration_s < 0 or self.working_set_mb <= 0:
            raise ValueError("--reps must be at least 20, --duration >= 0, --working-set-mb > 0")
        for f in self.formats:
            weight_format(f)
        if "fp32" not in self.formats:
            raise ValueError("--formats must include fp32 (the profile's compute_gflops)")


@dataclass(frozen=True)
class FormatSpeed:
    """One weight format's matrix-vector throughput."""

    format: str
    """Weight format."""
    first_gflops: float
    """GFLOP/s of the first timed pass (a cool board)."""
    sustained_gflops: float
    """Median GFLOP/s of the second half of the passes (what a board holds)."""
    p10_gflops: float
    """10th percentile over all passes."""
    p90_gflops: float
    """90th percentile over all passes."""
    reps: int
    """Timed passes."""
    matrices: int
    """Distinct matrices per pass."""

    def __post_init__(self):
        if min(self.first_gflops, self.sustained_gflops, self.p10_gflops) <= 0 or self.p10_gflops > self.p90_gflops:
            raise ValueError(f"{self.format}: inconsistent speeds {self}")


def speed_of(fmt: str, gflops: list[float], matrices: int) -> FormatSpeed:
    """FormatSpeed of the per-pass figures `gflops`, in the order they were measured."""
    s = sorted(gflops)
    return FormatSpeed(fmt, gflops[0], statistics.median(gflops[len(gflops) // 2:]), percentile(s, 0.1),
                       percentile(s, 0.9), len(gflops), matrices)


def measure_format(fmt: str, opts: ComputeProbe, threads: int = 1) -> FormatSpeed:
    """Throughput of `fmt` products: one ggml graph multiplying one vector by every matrix of the
    working set (copies of one quantised matrix: ggml's time does not depend on the values)."""
    import ggml.ggml as G
    import numpy as np

    from ..core.formats import FORMATS, quantise
    from ..core.ggmlops import Arena, Graph, mul_mat, new_input

    rows, cols = opts.shape
    rng = np.random.default_rng(0)
    stored0 = quantise((rng.standard_normal((rows, cols)) * 0.02).astype(np.float32), fmt)
    matrices = max(2, min(512, math.ceil(opts.working_set_mb * 1e6 / stored0.nbytes)))
    stored = [stored0.copy() for _ in range(matrices)]
    arena = Arena(capacity=matrices + 8)
    tensors = [arena.matrix(s, FORMATS[fmt], cols) for s in stored]

    def build(ctx):
        x = new_input(ctx, G.GGML_TYPE_F32, 1, cols)
        return {"x": x}, {f"y{i}": mul_mat(ctx, t, x) for i, t in enumerate(tensors)}

    graph = Graph(build)
    try:
        graph.inputs["x"][:] = rng.standard_normal((1, cols)).astype(np.float32)
        graph.compute(threads)  # warm: page faults, the thread pool, the plan
        graph.compute(threads)
        flops = 2.0 * rows * cols * matrices
        out: list[float] = []
        start = time.perf_counter()
        while len(out) < opts.reps or time.perf_counter() - start < opts.duration_s:
            t0 = time.perf_counter()
            graph.compute(threads)
            out.append(flops / (time.perf_counter() - t0) / 1e9)
    finally:
        graph.close()
        arena.close()
    return speed_of(fmt, out, matrices)


# ---- storage ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StorageSpeed:
    """Sequential read speed of a file just written and dropped from the page cache."""

    mbps: float
    """MB/s (1e6 bytes)."""
    megabytes: float
    """Size of the file read, MB."""
    directory: str
    """Where the file was."""
    cold: bool
    """Whether the file's pages were out of the page cache when the read began."""
    note: str = ""
    """Why the read may not have come from storage, if it may not."""

    def __post_init__(self):
        if self.mbps <= 0 or self.megabytes <= 0:
            raise ValueError(f"inconsistent storage figure {self}")


def _resident_share(fd: int, size: int) -> float | None:
    """Share of the file's pages in the page cache (mincore), or None where that cannot be asked."""
    if not sys.platform.startswith("linux") or size <= 0:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED: maps, reads nothing
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            pages = -(-size // os.sysconf("SC_PAGE_SIZE"))
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return sum(b & 1 for b in bytes(vec)) / pages
        finally:
            libc.munmap(addr, size)
    except (OSError, AttributeError, ValueError):
        return None


def _fs_type(directory: str) -> str | None:
    """File system type of the mount holding `directory` (Linux), e.g. "ext4" or "tmpfs"."""
    best, kind = "", None
    try:
        path = os.path.realpath(directory)
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                mount = parts[1].replace("\\040", " ")
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, kind = mount, parts[2]
    except (OSError, IndexError):
        return None
    return kind


def measure_storage(directory: str, megabytes: float = 256.0, chunk: int = 8 << 20) -> StorageSpeed:
    """Write `megabytes` MB into a temporary file in `directory`, fsync, drop its pages from the page
    cache (posix_fadvise DONTNEED), read it back in `chunk`-byte reads, timed; delete it."""
    size = int(megabytes * 1e6)
    if size < chunk:
        chunk = max(size, 1)
    fd, path = tempfile.mkstemp(prefix=".halo-probe-", dir=directory)
    notes = []
    try:
        block = os.urandom(chunk)  # incompressible: a compressing file system must not shrink the test
        written = 0
        while written < size:
            written += os.write(fd, block[:min(chunk, size - written)])
        os.fsync(fd)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError) as e:
            notes.append(f"the page cache could not be dropped ({e}): the figure may be memory speed")
        resident = _resident_share(fd, size)
        kind = _fs_type(directory)
        if kind in ("tmpfs", "ramfs"):
            notes.append(f"{directory} is on {kind} (memory): the figure is memory speed, not storage")
        elif resident is not None and resident > 0.02:
            notes.append(f"{100 * resident:.0f}% of the file stayed in the page cache: the figure is too high")
        os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        buf = bytearray(chunk)
        view = memoryview(buf)
        got = 0
        start = time.perf_counter()
        while True:
            n = os.readv(fd, [view])
            if n <= 0:
                break
            got += n
        elapsed = time.perf_counter() - start
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
        os.unlink(path)
    cold = not notes
    return StorageSpeed(round(got / elapsed / 1e6, 1), got / 1e6, directory, cold, "; ".join(notes))
