"""ggml, through the PyPI package ggml-python: weights that live in numpy arrays, and graphs that
run a device's whole round in one native call.

ggml is llama.cpp's tensor library: block formats (q8_0, q4_0) multiplied with integer dot
products (AVX2/AVX-512 on x86, NEON `sdot` on ARM), threads inside the kernels. Two objects:

- `Arena`: tensors whose bytes are numpy arrays we own or map (shard weights, KV caches). Its
  ggml context allocates nothing; each tensor points into an array the arena keeps alive, so a
  shard mapped from disk is multiplied in place, never copied.
- `Graph`: a computation built once by a Python function and computed many times by one call
  (`compute`); ggml's graph allocator gives its intermediate tensors one buffer; its inputs and
  outputs are numpy views, written and read without copies through ctypes.

Products go through `mul_mat`: ggml's own, except fp32 weights, which take `f32rows` (each weight
read once for all of a pass's rows) where it is built.

Example (one q8_0 matrix times two vectors, against the dequantised matrix; ggml rounds the
input to 8-bit blocks too, so they agree to about 1%):
    >>> import numpy as np
    >>> from halo_runtime.core.formats import FORMATS, dequantise, quantise
    >>> from halo_runtime.core.ggmlops import Arena, Graph, new_input
    >>> import ggml.ggml as G
    >>> w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    >>> stored = quantise(w, "q8_0")
    >>> arena = Arena()
    >>> W = arena.matrix(stored, FORMATS["q8_0"], cols=64)
    >>> def build(ctx):
    ...     x = new_input(ctx, G.GGML_TYPE_F32, 2, 64)              # 2 rows of 64 inputs
    ...     return {"x": x}, {"y": G.ggml_mul_mat(ctx, W, x)}
    >>> graph = Graph(build)
    >>> x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    >>> graph.inputs["x"][:] = x
    >>> graph.compute()
    >>> y, ref = graph.outputs["y"], x @ dequantise(stored, "q8_0").T
    >>> y.shape, bool(np.abs(y - ref).max() < 0.01 * np.abs(ref).max())
    ((2, 8), True)
"""
from __future__ import annotations

import ctypes
import weakref
from functools import cache

import ggml.ggml as G  # PyPI ggml-python: the `ggml` package; nothing of ours shares the name
import numpy as np

from . import f32rows
from .formats import WeightFormat

_NUMPY = {G.GGML_TYPE_F32: np.float32, G.GGML_TYPE_F16: np.uint16, G.GGML_TYPE_BF16: np.uint16,
          G.GGML_TYPE_I32: np.int32, G.GGML_TYPE_I64: np.int64}
"""numpy dtype of the element types a graph's inputs and outputs use (F16 as raw bits)."""
MAX_NODES = 8192
"""Nodes one graph may hold (a whole 1B-class model's token is ~1,000)."""
_compute = G.lib.ggml_graph_compute  # the raw ctypes function: the one call of a round
# ggml-python 0.0.45 declares this one's result as a 32-bit int, which truncates the pointer
G.lib.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p


def quantise_rows(w: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """float32 [rows, cols] -> ggml blocks [rows, row_bytes] (ggml's reference quantiser)."""
    rows, cols = w.shape
    out = np.zeros((rows, fmt.row_bytes(cols)), dtype=np.uint8)
    src = np.ascontiguousarray(w, dtype=np.float32)
    done = G.ggml_quantize_chunk(fmt.ggml_type, src.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                 out.ctypes.data_as(ctypes.c_void_p), 0, rows, cols, None)
    if done != out.nbytes:
        raise RuntimeError(f"ggml quantised {done} bytes of {fmt.name}, expected {out.nbytes}")
    return out


def dequantise_rows(stored: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """ggml blocks [rows, row_bytes] -> float32 [rows, cols]."""
    raw = np.ascontiguousarray(stored).view(np.uint8)
    rows, cols = raw.shape[0], fmt.cols_of(raw)
    out = np.empty((rows, cols), dtype=np.float32)
    to_float = G.ggml_get_type_traits(fmt.ggml_type).contents.to_float
    to_float(raw.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows * cols)
    return out


@cache
def _f32_rows_op():
    """`f32rows`' ggml custom op as ggml takes it, or None where the kernel is not used."""
    address = f32rows.op_address()
    return None if address is None else G.ggml_custom_op_t(address)


def mul_mat(ctx, w, x):
    """ggml_mul_mat (w [K, N] by x [K, R] -> [N, R]): fp32 weights through `f32rows` where it is
    built (each weight read once for all the pass's rows, a row's bits those of one row), every
    other format, and fp32 where it is not, through ggml's own products."""
    op = _f32_rows_op()
    if op is None or w.contents.type != G.GGML_TYPE_F32 or x.contents.type != G.GGML_TYPE_F32 \
            or G.ggml_n_dims(x) > 2 or w.contents.nb[0] != 4:
        return G.ggml_mul_mat(ctx, w, x)
    if x.contents.nb[0] != 4:
        x = G.ggml_cont(ctx, x)
    args = (ctypes.POINTER(G.ggml_tensor) * 2)(w, x)
    return G.ggml_custom_4d(ctx, G.GGML_TYPE_F32, w.contents.ne[1], x.contents.ne[1], 1, 1, args, 2, op,
                            G.GGML_N_TASKS_MAX, None)


def _view(t, dims: int = 2, dtype=None) -> np.ndarray:
    """A numpy view of a tensor's data with at least `dims` dimensions, shape reversed from ggml's
    ne (ne0 is the innermost; ggml does not keep trailing dimensions of 1, numpy shapes do)."""
    dims = max(dims, G.ggml_n_dims(t))
    shape = tuple(reversed(t.contents.ne[:dims]))
    dtype = dtype or _NUMPY[t.contents.type]
    n = int(np.prod(shape))
    buf = (ctypes.c_uint8 * (n * np.dtype(dtype).itemsize)).from_address(G.ggml_get_data(t))
    return np.frombuffer(buf, dtype=dtype, count=n).reshape(shape)


def new_input(ctx, ggml_type: int, *shape: int):
    """A graph input of numpy shape `shape` (outermost first); `Graph.inputs` gives its view."""
    ne = (ctypes.c_int64 * len(shape))(*reversed(shape))
    t = G.ggml_new_tensor(ctx, ggml_type, len(shape), ne)
    G.ggml_set_input(t)
    _INPUT_DIMS[ctypes.addressof(t.contents)] = len(shape)
    return t


_INPUT_DIMS: dict[int, int] = {}
"""Dimensions each graph input was made with (address -> count), for its numpy view's shape."""


class Arena:
    """Tensors whose data are numpy arrays (see the module docstring); `close` frees the context."""

    def __init__(self, capacity: int = 4096):
        params = G.ggml_init_params(mem_size=capacity * G.ggml_tensor_overhead(), mem_buffer=None, no_alloc=True)
        self.ctx = G.ggml_init(params)
        self._keep: list[np.ndarray] = []
        self._finalizer = weakref.finalize(self, G.ggml_free, self.ctx)

    def _point(self, t, arr: np.ndarray):
        if not arr.flags.c_contiguous:
            raise ValueError("ggml tensors need contiguous arrays")
        self._keep.append(arr)
        t.contents.data = arr.ctypes.data
        return t

    def matrix(self, stored: np.ndarray, fmt: WeightFormat, cols: int):
        """A weight [rows, cols] as a shard stores it (ggml: ne0 = cols inputs, ne1 = rows)."""
        rows = stored.shape[0]
        if stored.nbytes != fmt.nbytes(rows, cols):
            raise ValueError(f"{fmt.name} matrix of {rows}x{cols} needs {fmt.nbytes(rows, cols)} bytes, "
                             f"got {stored.nbytes}")
        return self._point(G.ggml_new_tensor_2d(self.ctx, fmt.ggml_type, cols, rows), stored)

    def array(self, arr: np.ndarray):
        """A float32 array of 1 to 4 dimensions (norm weights, KV caches)."""
        if arr.dtype != np.float32 or not 1 <= arr.ndim <= 4:
            raise ValueError(f"arena arrays are float32 of 1-4 dims, got {arr.dtype} {arr.shape}")
        ne = (ctypes.c_int64 * arr.ndim)(*reversed(arr.shape))
        return self._point(G.ggml_new_tensor(self.ctx, G.GGML_TYPE_F32, arr.ndim, ne), arr)

    def close(self) -> None:
        self._finalizer()
        self._keep.clear()


class Graph:
    """A computation built once by `build(ctx) -> (inputs, outputs)` (dicts of tensors) and computed
    many times; `inputs` and `outputs` are numpy views of those tensors (valid until `close`)."""

    def __init__(self, build, max_nodes: int = MAX_NODES):
        size = max_nodes * G.ggml_tensor_overhead() + G.ggml_graph_overhead_custom(max_nodes, False)
        self.ctx = G.ggml_init(G.ggml_init_params(mem_size=size, mem_buffer=None, no_alloc=True))
        self.galloc = None
        try:
            inputs, outputs = build(self.ctx)
            self.graph = G.ggml_new_graph_custom(self.ctx, max_nodes, False)
            for t in outputs.values():
                G.ggml_set_output(t)
                G.ggml_build_forward_expand(self.graph, t)
            self.galloc = G.ggml_gallocr_new(G.ggml_backend_cpu_buffer_type())
            if not G.ggml_gallocr_alloc_graph(self.galloc, self.graph):
                raise MemoryError("ggml could not allocate a graph's buffer")
        except BaseException:
            self._free(self.ctx, self.galloc)
            raise
        self._finalizer = weakref.finalize(self, self._free, self.ctx, self.galloc)
        self.inputs = {k: _view(t, _INPUT_DIMS.pop(ctypes.addressof(t.contents), 1)) for k, t in inputs.items()}
        self.outputs = {k: _view(t) for k, t in outputs.items()}
        self._plans: dict[int, tuple] = {}

    @staticmethod
    def _free(ctx, galloc) -> None:
        if galloc is not None:
            G.ggml_gallocr_free(galloc)
        G.ggml_free(ctx)

    def compute(self, threads: int = 1, workspace: Workspace | None = None) -> None:
        """Run the graph once on `threads` threads (ggml's threads, inside the kernels), its scratch
        memory in `workspace` if given (shared by graphs computed in turn), else its own."""
        plan = self._plans.get(threads)
        if plan is None:
            cplan = G.ggml_graph_plan(self.graph, threads, None)
            # ggml's reference attention: each row on its own, masked keys skipped, in every pass.
            # Its tiled (64+ rows) and split-key (one row, 512+ keys) variants sum in another order,
            # so a row's bits would depend on the pass it travels in, and on the thread count
            cplan.use_ref = True
            work = None
            if workspace is None:
                work = np.empty(max(cplan.work_size, 1), dtype=np.uint8)
                cplan.work_data = work.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
            plan = self._plans[threads] = (cplan, work, ctypes.byref(cplan))
        if workspace is not None:
            plan[0].work_data = workspace.pointer(plan[0].work_size)
        status = _compute(self.graph, plan[2])
        if status != G.GGML_STATUS_SUCCESS:
            raise RuntimeError(f"ggml graph compute failed (status {status})")

    def close(self) -> None:
        self._finalizer()
        self._plans.clear()


class Workspace:
    """One scratch buffer for the graphs a device computes one after another: a buffer per graph
    would hold its work size in every cached graph (a device keeps hundreds: layers x row counts x
    session slots)."""

    def __init__(self):
        self.buffer = np.empty(1, dtype=np.uint8)
        self._pointer = self.buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))

    def pointer(self, size: int):
        """The buffer, grown to at least `size` bytes if need be."""
        if self.buffer.nbytes < size:
            self.buffer = np.empty(size, dtype=np.uint8)
            self._pointer = self.buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        return self._pointer


CACHED_ROWS = 17
"""Graphs of up to this many rows (decode, and draft verification) are kept; longer ones (prefill)
are built for the pass and freed."""


ROW_BUCKETS = (1, 2, 4, 8, 12, 16, CACHED_ROWS)
"""Row counts short passes are padded to where rows are independent (MLP): a graph per bucket, not
per batch size. 12 because eight sessions with a guess or two (9-12 rows) would otherwise pay 16."""


def row_bucket(rows: int) -> int:
    """Rows a short pass is computed with: the smallest of ROW_BUCKETS that holds it; a longer pass
    as it is.

    >>> [row_bucket(t) for t in (1, 3, 5, 9, 13, 17, 40)]
    [1, 4, 8, 12, 16, 17, 40]
    """
    return rows if rows > CACHED_ROWS else next(b for b in ROW_BUCKETS if b >= rows)


class GraphCache:
    """A device's graphs of short passes, kept per key and rebuilt when the number of cached keys
    they read changes (every KV_BUCKET positions); long passes are built, computed once and freed."""

    def __init__(self):
        self._held: dict[tuple, tuple[int, Graph]] = {}
        self.workspace = Workspace()

    def get(self, key: tuple, rows: int, keys: int, build, max_nodes: int = MAX_NODES) -> Graph:
        """The graph for `key` of `rows` rows reading `keys` cached keys, built by `build` if need be
        (in a context for `max_nodes` nodes: its bookkeeping is held as long as the graph)."""
        held = self._held.get(key)
        if held is not None and held[0] == keys:
            return held[1]
        graph = Graph(build, max_nodes)
        if rows <= CACHED_ROWS:
            if held is not None:
                held[1].close()
            self._held[key] = (keys, graph)
        return graph

    def run(self, graph: Graph, rows: int, threads: int) -> dict[str, np.ndarray]:
        """Compute `graph` and copy its outputs out (the next pass reuses its buffers)."""
        graph.compute(threads, self.workspace)
        out = {k: v.copy() for k, v in graph.outputs.items()}
        if rows > CACHED_ROWS:
            graph.close()
        return out

    def close(self) -> None:
        for _, graph in self._held.values():
            graph.close()
        self._held.clear()
