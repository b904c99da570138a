"""fp32 products that stream each weight once for all rows of a pass, with the bits of one row.

ggml multiplies fp32 weights by a few rows with one dot product per (weight row, input row): a
pass of 8 rows (8 sessions, a draft's guesses) reads every weight 8 times and costs 2-3x one row.
`f32rows.c` reads a weight chunk once for up to 8 rows and sums every output element in one fixed
order, whatever the rows beside it or the threads, so a row's bits still do not depend on its pass
(compute.py). It is built on first use with the machine's C compiler for this CPU (as ggml-python
builds ggml) and cached; where no compiler is found, or the CPU has no vector fused multiply-add
(then ggml's own products are faster), fp32 products stay ggml's. `HALO_F32_ROWS=0` turns it off
(to measure against ggml's).

Example:
    >>> import numpy as np
    >>> from halo_runtime.core.f32rows import products
    >>> w, x = np.random.default_rng(0).standard_normal((2, 3, 64), dtype=np.float32)
    >>> y = products(w, x)
    >>> y is None or (bool(np.allclose(y, x @ w.T, rtol=1e-5, atol=1e-5))
    ...               and bool((products(w, x[1:]) == y[1:]).all()))   # a row's bits alone = in a pass
    True
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("f32rows.c")
OFF_ENV = "HALO_F32_ROWS"
"""Set to 0 to leave every fp32 product to ggml."""


def cache_dir() -> Path:
    """Where built kernels are kept: $HALO_CACHE_DIR, else $XDG_CACHE_HOME/halo, else ~/.cache/halo."""
    if os.environ.get("HALO_CACHE_DIR"):
        return Path(os.environ["HALO_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "halo"


def _cpu() -> str:
    """What names this CPU's instruction sets (a cached build for another CPU must not be loaded)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command(cc: str, include: Path, out: str) -> list[str]:
    native = "-mcpu=native" if platform.machine().lower() in ("aarch64", "arm64", "armv7l") else "-march=native"
    # no contraction: every multiply-add is the explicit fused one of the source, vectorised or not
    return [cc, "-O3", native, "-ffp-contract=off", "-fPIC", "-shared", "-I", str(include), "-o", out, str(SOURCE)]


@cache
def library() -> tuple[ctypes.CDLL | None, str]:
    """(the kernel's library for this CPU, built or found in `cache_dir()`, else None; what it is
    or why it is not used)."""
    if os.environ.get(OFF_ENV, "1") == "0":
        return None, f"off ({OFF_ENV}=0)"
    import ggml

    include = Path(ggml.__file__).resolve().parent.parent / "include"
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None or not (include / "ggml.h").exists():
        return None, "no C compiler (cc)" if cc is None else f"no ggml.h beside ggml-python ({include})"
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), (include / "ggml.h").read_bytes(),
                                     " ".join(_command(cc, include, "")).encode(), _cpu().encode()]))
    path = cache_dir() / f"f32rows-{key.hexdigest()[:16]}.so"
    if not path.exists():
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
            done = subprocess.run(_command(cc, include, tmp), capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["failed"])[-1]
                return None, f"build failed: {last}"
            os.replace(tmp, path)  # atomic: processes building at once each load a whole file
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"build failed: {e}"
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # a damaged cached build: say so; deleting it rebuilds it
        return None, f"cannot load {path}: {e}"
    width = lib.halo_f32_rows_width()
    if width < 2:
        return None, "no vector fused multiply-add on this CPU (ggml's products are faster)"
    lib.halo_f32_rows.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                  ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int64] * 4
    return lib, f"halo f32rows ({width} lanes a vector)"


def op_address() -> int | None:
    """Address of the ggml custom op (`ggml_custom_4d`) computing fp32 products, or None."""
    lib, _ = library()
    return None if lib is None else ctypes.cast(lib.halo_f32_rows_op, ctypes.c_void_p).value


def products(w: np.ndarray, x: np.ndarray) -> np.ndarray | None:
    """x @ w.T (w [N, K], x [R, K], float32) by the kernel, one thread; None where it is not used."""
    lib, _ = library()
    if lib is None:
        return None
    w, x = np.ascontiguousarray(w, np.float32), np.ascontiguousarray(x, np.float32)
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    lib.halo_f32_rows(w.ctypes.data, w.shape[1], x.ctypes.data, x.shape[1], out.ctypes.data, out.shape[1],
                      w.shape[1], 0, w.shape[0], x.shape[0])
    return out
