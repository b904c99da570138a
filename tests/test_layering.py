"""The house's walls: the compiler loads only the runtime's socket-free core; the runtime never
imports the compiler; the core never imports its shells."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "runtime" / "halo_runtime"


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved inside halo_runtime)."""
    tree = ast.parse(path.read_text())
    package = list(path.relative_to(RUNTIME.parent).with_suffix("").parts[:-1]) if RUNTIME in path.parents else []
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def test_importing_the_compiler_loads_no_network_module():
    code = ("import importlib, pkgutil, sys, halo_compile, halo_compile.cli\n"
            "for m in pkgutil.iter_modules(halo_compile.__path__):\n"
            "    importlib.import_module('halo_compile.' + m.name)\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('halo_runtime'))))\n")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=ROOT).stdout.split()
    assert "halo_runtime.core.plan" in loaded
    shells = [m for m in loaded if m.startswith(("halo_runtime.net", "halo_runtime.storage", "halo_runtime.cli"))]
    assert shells == [], f"the compiler loads the runtime's shells: {shells}"


@pytest.mark.parametrize("path", sorted((RUNTIME / "core").glob("*.py")), ids=lambda p: p.name)
def test_the_core_imports_neither_sockets_nor_its_shells(path):
    bad = {m for m in _imports(path)
           if m in ("socket", "selectors", "select") or m.startswith(("halo_runtime.net", "halo_runtime.storage",
                                                                       "halo_runtime.cli", "halo_compile"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted(RUNTIME.rglob("*.py")), ids=lambda p: str(p.relative_to(RUNTIME)))
def test_the_runtime_never_imports_the_compiler(path):
    bad = {m for m in _imports(path) if m.split(".")[0] in ("halo_compile", "transformers", "ortools")}
    assert not bad, f"{path.relative_to(RUNTIME)} imports {sorted(bad)}"
