"""Every module's docstring example runs and says what it shows (the examples are the first docs a
newcomer reads; this keeps them from rotting)."""
from __future__ import annotations

import doctest
import importlib
import pkgutil
import sys
from pathlib import Path

import halo_runtime
import pytest

import halo_compile

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PURE_BENCHMARK_MODULES = ["benchcommon", "sweep_report"]  # the others need root, a lab or minutes


def _modules() -> list[str]:
    return [f"{pkg.__name__}.{m.name}" for pkg in (halo_runtime, halo_compile)
            for m in pkgutil.iter_modules(pkg.__path__)] + PURE_BENCHMARK_MODULES


@pytest.mark.parametrize("name", _modules())
def test_module_examples_run(name):
    if name in PURE_BENCHMARK_MODULES:
        sys.path.insert(0, str(BENCHMARKS))
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (run it with -s)"
