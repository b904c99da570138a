"""No module of ours may be importable under a name that an installed library provides.

Running `python benchmarks/x.py` puts benchmarks/ on sys.path, pytest puts tests/ there, and the
repository root is there for `python -m benchmarks.x`: a module in one of those folders named like
a library wins that library's import for everything in the process. (It happened: transformers
5.25 imports the PyPI package `kernels`, and benchmarks/kernels.py answered it.) The names that
count are every module and package directly in those folders.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the folders that go on sys.path: the root (`-m`, pytest's pythonpath), the runtime's source, and
# the two that hold scripts and test helpers
SEARCHED = (ROOT, ROOT / "runtime", ROOT / "benchmarks", ROOT / "tests")
OUR_DISTRIBUTIONS = {"halo-compile", "halo-runtime"}


def ours() -> dict[str, Path]:
    """Top-level names importable from the folders above -> where each is defined."""
    names = {}
    for folder in SEARCHED:
        for path in sorted(folder.iterdir()):
            if path.suffix == ".py":
                names.setdefault(path.stem, path)
            elif (path / "__init__.py").is_file():  # a folder without it is a namespace portion,
                names.setdefault(path.name, path)   # which any installed package or module beats
    return names


def shadowed(names: dict[str, Path], distributions: dict[str, list[str]]) -> list[str]:
    """One line per name of ours that an installed distribution (other than ours) also provides."""
    return [f"{path.relative_to(ROOT)} shadows the top-level name {name!r} of {', '.join(sorted(others))}"
            for name, path in sorted(names.items())
            if (others := set(distributions.get(name, ())) - OUR_DISTRIBUTIONS)]


def test_no_module_of_ours_shares_a_name_with_an_installed_library():
    problems = shadowed(ours(), importlib.metadata.packages_distributions())
    assert not problems, "rename these modules:\n" + "\n".join(problems)


def test_the_check_names_both_sides():
    found = shadowed({"numpy": ROOT / "benchmarks" / "numpy.py", "halo_compile": ROOT / "halo_compile"},
                     {"numpy": ["numpy"], "halo_compile": ["halo-compile"]})
    assert found == ["benchmarks/numpy.py shadows the top-level name 'numpy' of numpy"]


def test_the_walk_sees_scripts_helpers_and_packages():
    names = ours()
    assert {"benchmarks", "halo_compile", "halo_runtime", "plr_sweep", "tinytok", "conftest"} <= set(names)
