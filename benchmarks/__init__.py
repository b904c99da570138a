"""The benchmarks: run each from the repository root as a module, `python -m benchmarks.NAME`.

A package, so that its modules are `benchmarks.NAME` and the folder itself never goes on
`sys.path`, where a module of ours could hide an installed library of the same name (transformers
imports the PyPI package `kernels`; tests/test_shadowing.py keeps every such name free).
"""
