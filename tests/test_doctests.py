"""Every module's docstring example runs and says what it shows (the examples are the first docs a
newcomer reads; this keeps them from rotting). Examples run from the repository root, as the
README's commands do, so they may read the checked-in plan under artifacts/."""
from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import halo_runtime
import pytest

import halo_compile

ROOT = Path(__file__).resolve().parents[1]
PURE_BENCHMARK_MODULES = ["benchmarks.batching", "benchmarks.benchcommon", "benchmarks.compare", "benchmarks.labbench", "benchmarks.passes", "benchmarks.scale",
                          "benchmarks.sweep_report"]  # the others need root, a lab or minutes
TEST_HELPERS = ["tinytok"]  # tests/ is on sys.path (rootdir conftest)
# an example that is skipped or commented out runs nothing and cannot fail
_DEAD_EXAMPLE = re.compile(r"doctest:\s*\+SKIP|^\s*>>>\s*#", re.M)


def _modules() -> list[str]:
    # walk_packages, not iter_modules: the runtime's modules live in subpackages (core, net, storage)
    return sorted(m.name for pkg in (halo_runtime, halo_compile)
                  for m in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + ".")) \
        + PURE_BENCHMARK_MODULES + TEST_HELPERS


def _import(name: str):
    return importlib.import_module(name)


def test_the_walk_reaches_the_runtime_subpackages():
    names = _modules()
    for sub in ("core", "net", "storage"):
        assert any(n.startswith(f"halo_runtime.{sub}.") for n in names), sub
    assert "halo_runtime.core.plan" in names and "halo_compile.pipeline" in names


@pytest.mark.parametrize("name", _modules())
def test_module_examples_run(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    module = _import(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (run it with -s)"


@pytest.mark.parametrize("name", _modules())
def test_no_example_is_skipped_or_commented_out(name):
    module = _import(name)
    for test in doctest.DocTestFinder().find(module):
        if test.docstring and _DEAD_EXAMPLE.search(test.docstring):
            pytest.fail(f"{test.name}: an example is skipped or commented out; make it run or remove it")
