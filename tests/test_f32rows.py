"""fp32 products through `core.f32rows`: right, the same bits for a row in any pass and on any
thread count, through ggml graphs as the runtime builds them, and ggml's products where it is off."""
from __future__ import annotations

import os
import subprocess
import sys

import ggml.ggml as G
import numpy as np
import pytest
from halo_runtime.core import f32rows
from halo_runtime.core.formats import FORMATS
from halo_runtime.core.ggmlops import Arena, Graph, mul_mat, new_input

pytestmark = pytest.mark.skipif(f32rows.library()[0] is None, reason=f"f32rows not built: {f32rows.library()[1]}")


@pytest.mark.parametrize("cols", [64, 576, 580, 7])  # whole vectors, and a tail of 4 or 7
@pytest.mark.parametrize("rows", [1, 3, 8, 17])
def test_products_are_right_and_a_rows_bits_do_not_depend_on_its_pass(rows, cols):
    rng = np.random.default_rng(rows * 1000 + cols)
    w, x = rng.standard_normal((40, cols), dtype=np.float32), rng.standard_normal((rows, cols), dtype=np.float32)
    y = f32rows.products(w, x)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    for r in range(rows):
        assert np.array_equal(f32rows.products(w, x[r:r + 1]), y[r:r + 1])


def _graph_products(w: np.ndarray, x: np.ndarray, threads: int, part: tuple[int, int] | None = None) -> np.ndarray:
    """x @ w.T (or x[:, a:b] @ w[:, a:b].T: a column view, as an MLP part's down product) in a ggml graph."""
    arena = Arena()
    W = arena.matrix(np.ascontiguousarray(w), FORMATS["fp32"], cols=w.shape[1])

    def build(ctx):
        xin = new_input(ctx, G.GGML_TYPE_F32, *x.shape)
        if part is None:
            return {"x": xin}, {"y": mul_mat(ctx, W, xin)}
        a, b = part
        wv = G.ggml_view_2d(ctx, W, b - a, w.shape[0], W.contents.nb[1], a * 4)
        xv = G.ggml_view_2d(ctx, xin, b - a, x.shape[0], xin.contents.nb[1], a * 4)
        return {"x": xin}, {"y": mul_mat(ctx, wv, xv)}

    graph = Graph(build)
    try:
        graph.inputs["x"][:] = x
        graph.compute(threads)
        return graph.outputs["y"].copy()
    finally:
        graph.close()
        arena.close()


@pytest.mark.parametrize("part", [None, (32, 96)])
def test_graph_products_on_any_thread_count_and_pass(part):
    rng = np.random.default_rng(7)
    w, x = rng.standard_normal((100, 128), dtype=np.float32), rng.standard_normal((9, 128), dtype=np.float32)
    one = _graph_products(w, x, 1, part)
    a, b = part or (0, 128)
    assert np.array_equal(one, f32rows.products(w[:, a:b], x[:, a:b]))
    assert np.array_equal(_graph_products(w, x, 2, part), one)
    assert np.array_equal(_graph_products(w, x[4:5], 1, part), one[4:5])


def _library_in(env: dict) -> str:
    code = "from halo_runtime.core import f32rows; print(f32rows.library()[1])"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def test_off_and_without_a_compiler_ggml_multiplies(tmp_path):
    assert _library_in({f32rows.OFF_ENV: "0"}).startswith("off")
    assert _library_in({"CC": "no-such-compiler-here", "HALO_CACHE_DIR": str(tmp_path)}) == "no C compiler (cc)"
    assert _library_in({"CC": "false", "HALO_CACHE_DIR": str(tmp_path)}).startswith("build failed")
    assert not list(tmp_path.iterdir())  # nothing half-written left behind
    assert _library_in({"HALO_CACHE_DIR": str(tmp_path)}).startswith("halo f32rows")
    (built,) = tmp_path.iterdir()
    built.write_bytes(b"not a library")  # damaged: ggml multiplies, and the reason names the file
    assert _library_in({"HALO_CACHE_DIR": str(tmp_path)}).startswith(f"cannot load {built}")
