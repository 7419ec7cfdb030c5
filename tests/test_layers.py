"""The package's layering (experiments/benchmarks/layers.py's table of roles) holds: no module-level
import of a higher layer, no import cycle, every module given a role."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "benchmarks_layers", ROOT / "experiments" / "benchmarks" / "layers.py"
)
layers = importlib.util.module_from_spec(spec)
sys.modules.setdefault("benchmarks_layers", layers)  # its dataclass looks its module up
spec.loader.exec_module(layers)


def test_every_module_has_a_role_and_no_module_level_import_points_upward():
    assert not [m for m in layers.modules(ROOT) if layers.role(m) is None]
    up = layers.upward(layers.imports(ROOT))
    assert not [f"evomerge.{i.source}:{i.line} imports evomerge.{i.target}" for i in up]


def test_no_import_cycle_module_level_or_in_functions():
    found = layers.imports(ROOT)
    assert layers.cycles(layers.graph(found)) == []
    assert layers.cycles(layers.graph(found, ("module", "function"))) == []


def test_the_reader_sees_what_python_runs():
    """The reader's own check: imports sort as Python runs them, and a cycle is found where one is."""
    found = {(i.source, i.target, i.kind) for i in layers.imports(ROOT)}
    assert ("search", "workers", "module") in found
    assert ("merge", "merge.ties", "module") in found  # a package imports its modules
    assert not [i for i in found if i[1] == "" or i[0].startswith(i[1] + ".")]  # parents left out
    assert layers.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layers.role("errors")[0] < layers.role("merge.ties")[0] < layers.role("search")[0]
    assert layers.role("search")[0] < layers.role("report.page")[0] < layers.role("cli")[0]
