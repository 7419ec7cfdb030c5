"""The package's layering, as a figure: evomerge's module import graph against a table of roles.

    python experiments/benchmarks/layers.py [--rev REV ...]

Reads every module of ``evomerge/`` with ``ast`` (no import runs) and sorts its imports of other evomerge
modules into module-level ones (run when the module is imported, class bodies included), function-level
ones (run when the function is called) and type-only ones (under ``if TYPE_CHECKING:``). Each module has
a layer and a role from ``ROLES`` below, bottom first; a module-level import of a module of a higher
layer points upward against the roles. Printed as one row per revision: the modules, the layers the
table gives them, the longest chain of module-level imports, the module-level imports and how many of
them point upward, the import cycles (strongly connected components of the module-level graph, and of
the graph with function-level imports too) and the largest module's line count; the upward imports and
the cycles are listed below the table. Without ``--rev`` it reads the working tree; ``--rev REV`` reads
a git revision instead (``git archive`` into a temporary folder), e.g. ``--rev 3d2cb40 --rev HEAD`` for
the state before and after the restructure of issue 28. ``tests/test_layers.py`` holds the working tree
to no upward import and no cycle with these functions.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Bottom first: a module may import, at module level, modules of its own layer and of the layers below.
# Names are module paths under evomerge (fnmatch patterns; a package's name is its __init__); the first
# matching row gives a module its role. Modules of older revisions (report.py, html_report.py, irt.py)
# match the rows of the roles they had.
ROLES: list[tuple[str, tuple[str, ...]]] = [
    ("foundation: errors, registry, catalogue, cache, machine", ("errors", "registry", "catalog", "cache", "machine")),
    ("records: the recipe, the store, the run folder", ("recipe", "store", "runfolder")),
    ("method declarations: each merge method's name and parameters, no torch", ("methods", "merge.declarations")),
    ("models: references, checkpoints, shapes, memory plan", ("hf", "gguf", "vocab", "adapters", "shapes", "models", "plan")),
    ("kernels: merge methods, data flow, IRT math and item banks, fitness backends", ("merge", "merge.*", "flow", "irt", "irt.*", "bank", "bankimport", "fitness", "fitness.*")),
    ("declarations: objectives, search space, algorithms, config", ("objectives", "spaceconfig", "searchspace", "algorithms", "config")),
    ("formats: the terminal's tables and texts of records", ("report", "report.terminal")),
    ("engine: jobs, evaluations, session, calibration, loop, workers, search", (
        "preflight", "adaptive", "jobs", "evaluations", "session", "calibration", "estimation", "bo", "loop",
        "workers",
        "summary", "search",
    )),
    ("read side: Run, answers, HTML report, export", ("run", "answers", "report.*", "html_report", "export")),
    ("entry points: the CLI, the demo zoos, the package", ("cli_common", "cli_bank", "cli", "zoos", "zoos.*", "")),
]  # fmt: skip


@dataclass(frozen=True)
class Import:
    source: str  # module path under evomerge ("" for the package itself)
    target: str
    line: int
    kind: str  # "module", "function" or "type"


def modules(root: Path) -> dict[str, Path]:
    """Module path under evomerge (``merge.ties``; ``merge`` for a package's __init__) -> its file."""
    pkg = root / "evomerge"
    out = {}
    for f in sorted(pkg.rglob("*.py")):
        parts = list(f.relative_to(pkg).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(root: Path) -> list[Import]:
    """Every import of one evomerge module by another (a package's own parents left out: Python imports
    them first whatever the code says), with where it runs."""
    mods = modules(root)

    def known(name: str) -> str | None:
        name = name.removeprefix("evomerge").removeprefix(".") if name.split(".")[0] == "evomerge" else None
        if name is None:
            return None
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    out: list[Import] = []
    for m, f in mods.items():
        is_pkg = f.name == "__init__.py"

        def visit(node: ast.AST, kind: str, m: str = m, is_pkg: bool = is_pkg) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                    visit(child, "function" if kind == "module" else kind)
                    continue
                if isinstance(child, ast.If) and _type_checking(child):
                    for sub in child.body:
                        visit(ast.Module(body=[sub], type_ignores=[]), "type")
                    for sub in child.orelse:
                        visit(ast.Module(body=[sub], type_ignores=[]), kind)
                    continue
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        here = ["evomerge", *m.split(".")] if m else ["evomerge"]
                        anchor = here[: len(here) - child.level + is_pkg]
                        base = ".".join([*anchor, base] if base else anchor)
                    names = [f"{base}.{a.name}" for a in child.names] + [base]
                for name in names:
                    target = known(name)
                    if target is None or target == m or target == "" or m.startswith(target + "."):
                        continue  # not evomerge's, itself, or a parent package
                    out.append(Import(m, target, child.lineno, kind))
                visit(child, kind)

        visit(ast.parse(f.read_text()), "module")
    return sorted(set(out), key=lambda i: (i.source, i.line, i.target))


def role(module: str) -> tuple[int, str] | None:
    """A module's layer (0: the bottom) and role from ``ROLES``; None where no row names it."""
    for layer, (name, patterns) in enumerate(ROLES):
        if any(fnmatchcase(module, p) for p in patterns):
            return layer, name
    return None


def graph(found: list[Import], kinds: tuple[str, ...] = ("module",)) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for i in found:
        if i.kind in kinds:
            out.setdefault(i.source, set()).add(i.target)
    return out


def upward(found: list[Import], kind: str = "module") -> list[Import]:
    """The imports of ``kind`` (module-level by default) of a module of a higher layer (by ``ROLES``)."""
    up = []
    for i in found:
        src, dst = role(i.source), role(i.target)
        if i.kind == kind and src and dst and dst[0] > src[0]:
            up.append(i)
    return up


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            strong(v)
    return sorted(out)


def longest_chain(edges: dict[str, set[str]]) -> int:
    """Modules on the longest path of imports (each cycle counted as one module)."""
    comp = {m: min(c) for c in cycles(edges) for m in c}
    dag: dict[str, set[str]] = {}
    for s, ts in edges.items():
        for t in ts:
            a, b = comp.get(s, s), comp.get(t, t)
            if a != b:
                dag.setdefault(a, set()).add(b)
    memo: dict[str, int] = {}

    def depth(v: str) -> int:
        if v not in memo:
            memo[v] = 1 + max((depth(w) for w in dag.get(v, ())), default=0)
        return memo[v]

    return max((depth(v) for v in list(dag)), default=1)


def name(module: str) -> str:
    return f"evomerge.{module}" if module else "evomerge"


def figure(root: Path) -> dict:
    mods = modules(root)
    found = imports(root)
    module_level = graph(found)
    lines = {m: len(f.read_text().splitlines()) for m, f in mods.items()}
    largest = max(lines, key=lambda m: lines[m])
    return {
        "modules": len(mods),
        "unassigned": sorted(m for m in mods if role(m) is None),
        "layers": len({role(m)[0] for m in mods if role(m)}),
        "chain": longest_chain(module_level),
        "module_imports": sum(i.kind == "module" for i in found),
        "function_imports": sum(i.kind == "function" for i in found),
        "type_imports": sum(i.kind == "type" for i in found),
        "upward": upward(found),
        "upward_in_functions": upward(found, "function"),
        "cycles": cycles(module_level),
        "cycles_all": cycles(graph(found, ("module", "function"))),
        "largest": (name(largest), lines[largest]),
    }


def checkout(rev: str, into: Path) -> str:
    """``evomerge/`` of git revision ``rev`` extracted into ``into``; returns its short commit."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", f"{rev}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    archive = into / "evomerge.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "archive", commit, "evomerge"], cwd=ROOT, stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rev", action="append", default=[], help="a git revision (repeatable); default: the working tree"
    )
    args = parser.parse_args()

    rows = []
    for rev in args.rev or [None]:
        if rev is None:
            head = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
            )
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "evomerge"], cwd=ROOT, capture_output=True, text=True
            )
            label = f"working tree ({head.stdout.strip()}{' + changes' if dirty.stdout.strip() else ''})"
            rows.append((label, figure(ROOT)))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                commit = checkout(rev, Path(tmp))
                rows.append((f"{rev} ({commit})" if rev != commit else commit, figure(Path(tmp))))

    print(f"command: python experiments/benchmarks/layers.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(
        f"machine: {platform.node()}, {platform.platform()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}"
    )
    print(f"layers (ROLES, bottom first): {'; '.join(f'{i} {r}' for i, (r, _) in enumerate(ROLES))}")
    print()
    head = ["revision", "modules", "layers", "longest chain", "module-level imports", "upward",
            "upward in functions", "cycles (module-level)", "cycles (with function-level)", "largest module (lines)"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for label, f in rows:
        cells = [label, f["modules"], f["layers"], f["chain"],
                 f"{f['module_imports']} (+{f['function_imports']} in functions, {f['type_imports']} type-only)",
                 len(f["upward"]), len(f["upward_in_functions"]), len(f["cycles"]), len(f["cycles_all"]), f"{f['largest'][0]} ({f['largest'][1]})"]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for label, f in rows:
        print(f"\n{label}:")
        if f["unassigned"]:
            print(f"  modules no row of ROLES names: {', '.join(name(m) for m in f['unassigned'])}")
        for i in f["upward"] + f["upward_in_functions"]:
            (a, _), (b, rb) = role(i.source), role(i.target)
            where = "upward" if i.kind == "module" else "upward in a function"
            print(
                f"  {where}: {name(i.source)}:{i.line} (layer {a}) imports {name(i.target)} (layer {b}, {rb.split(':')[0]})"
            )
        for c in f["cycles"]:
            print(f"  cycle (module-level): {' <-> '.join(name(m) for m in c)}")
        for c in f["cycles_all"]:
            print(f"  cycle (with function-level imports): {' <-> '.join(name(m) for m in c)}")
        if not (f["upward"] or f["upward_in_functions"] or f["cycles"] or f["cycles_all"] or f["unassigned"]):
            print("  no upward import, no cycle")


if __name__ == "__main__":
    main()
