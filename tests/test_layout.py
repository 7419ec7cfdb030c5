"""The package's shape: no import circles (function-level imports included), a docstring per module,
and a core that knows nothing of the demo zoos."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "evomerge"


def modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the evomerge modules it imports anywhere in its code (a package's own parents are left
    out: Python imports them first whatever the code says)."""
    mods = modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = m.split(".")[: len(m.split(".")) - node.level + (f.name == "__init__.py")]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                target = known(name)
                if target and target != m and not m.startswith(target + "."):
                    graph[m].add(target)
    return graph


def test_no_import_circles():
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import circle: {' -> '.join(e.args[1])}")


def test_every_module_says_what_it_owns():
    missing = [m for m, f in modules().items() if not ast.get_docstring(ast.parse(f.read_text()))]
    assert not missing


def test_the_core_imports_no_zoo():
    graph = import_graph()
    core = {m for m in graph if not m.startswith("evomerge.zoos") and m not in ("evomerge.cli",)}
    assert not [(m, t) for m in core for t in graph[m] if t.startswith("evomerge.zoos")]
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, evomerge.search; print(sorted(m for m in sys.modules if 'zoos' in m))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert loaded == "[]"


def test_validating_a_config_imports_no_torch_and_no_kernel():
    """Every config under experiments/ is checked against the methods' declarations (evomerge.methods)
    without importing torch or any merge kernel: `evomerge check` answers bad input before either loads."""
    root = PKG.parent
    configs = sorted(str(p) for p in (root / "experiments").glob("*.yaml"))
    code = (
        "import sys\n"
        "from evomerge.config import load_config\n"
        f"for path in {configs!r}: load_config(path)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('evomerge.merge')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    ).stdout.strip()
    assert loaded == "[]"


def test_the_declarations_are_the_kernels_declarations():
    """Each built-in kernel implements exactly its entry of evomerge.methods.BUILTIN (one source)."""
    from evomerge.merge import METHODS
    from evomerge.methods import BUILTIN, Declaration

    assert sorted(BUILTIN) == sorted(
        n for n in METHODS if METHODS.get(n).fn.__module__.startswith("evomerge.")
    )
    for name, declared in BUILTIN.items():
        method = METHODS.get(name)
        assert all(getattr(method, f) == getattr(declared, f) for f in Declaration.__dataclass_fields__)
