"""The runtime is slim: no module of `halo_runtime` imports torch or transformers, and its package
declares neither, so `pip install ./runtime` on a board pulls no torch (the compiler keeps them).

Checked in a fresh interpreter, because this suite itself imports torch for its reference model.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "ortools", "numba", "safetensors")


def test_no_runtime_module_loads_a_heavy_library():
    code = """
import importlib, json, pkgutil, sys
import halo_runtime
names = sorted(m.name for m in pkgutil.walk_packages(halo_runtime.__path__, prefix="halo_runtime."))
for name in names:
    if name.startswith("halo_runtime.server"):
        continue  # the server's packages are an extra; checked below when installed
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(m.split(".")[0] for m in sys.modules)}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    result = json.loads(out.stdout)
    assert "halo_runtime.net.worker" in result["modules"] and "halo_runtime.cli" in result["modules"]
    loaded = set(result["loaded"])
    assert not loaded & set(HEAVY), f"runtime modules load {sorted(loaded & set(HEAVY))}"
    assert "ggml" in loaded and "numpy" in loaded


def test_the_server_loads_no_heavy_library_either():
    code = """
import json, sys
import halo_runtime.server.app, halo_runtime.server.engine
print(json.dumps(sorted(m.split(".")[0] for m in sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert not set(json.loads(out.stdout)) & set(HEAVY)


def test_the_runtime_package_declares_no_torch():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "runtime" / "pyproject.toml").read_text())["project"]
    declared = meta["dependencies"] + [d for extra in meta.get("optional-dependencies", {}).values() for d in extra]
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for d in declared}
    assert not names & {"torch", "transformers", "ortools", "numba"}, names
    assert "ggml-python" in names and "numpy" in names
