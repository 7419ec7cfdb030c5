"""Every ```python block of the docs (docs/**/*.md and README.md) runs for real.

A page's blocks run in order in one fresh namespace, as a reader runs them one after another, in a
folder that holds what the pages name: ``models/base``, ``models/math`` and ``models/code`` (the tiny
zoo's base and two of its experts) and ``runs/demo`` (a finished tiny run of the demo config, only for
pages that name it). A block that includes a file of docs/examples (``--8<-- "file"``) runs that file
in its place (tests/test_docs.py tests the examples themselves); registrations are undone afterwards.
Pages whose blocks continue code of another page get that code from ``PREAMBLE`` (kept out of the docs);
``CHECKS`` holds what a page's blocks must have computed, where running them alone would prove little.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
PAGES = sorted([*(ROOT / "docs").rglob("*.md"), ROOT / "README.md"])
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.M | re.S)
INCLUDE = re.compile(r'^-+8\s*<\s*-+\s*"([^"]+)"\s*$')  # an include of docs/examples
MARKER = re.compile(r'^-+8<-+[ \t]+"[^"]+"[ \t]*$')  # pymdownx.snippets' marker, as it reads it
EXPERTS = {"math": "addition", "code": "script"}  # models/<name> -> the zoo's expert


def blocks(page: Path) -> list[str]:
    """The page's python blocks, an include replaced by the file it includes."""
    out = []
    for block in BLOCK.findall(page.read_text()):
        found = INCLUDE.match(block.strip())
        out.append((EXAMPLES / found[1]).read_text() if found else block)
    return out


# Code that the extending guide's usage lines continue: the merge guide's state dicts `b` and two
# experts, and an estimate's item parameters and answers (docs/guides/irt.md builds them for real).
PREAMBLE = {
    "docs/extending.md": """
import numpy as np
import torch

import evomerge
from evomerge import irt

torch.manual_seed(0)
b = {"w": torch.randn(4, 6)}
a, c = ({"w": b["w"] + 0.05 * torch.randn(4, 6)} for _ in range(2))
rng = np.random.default_rng(0)
params = irt.IrtParams("2pl", a=rng.uniform(0.5, 2, 30), b=rng.normal(size=30))
idx = np.arange(10)
y = (rng.random(10) < 0.7).astype(float)
""",
}


def check_fitness(ns: dict[str, Any], zoo: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(zoo / "base")
    with torch.no_grad():  # as a worker calls it
        values = ns["fitness"](model, AutoTokenizer.from_pretrained(zoo / "base"))
    assert set(values) == {"loss"} and math.isfinite(values["loss"]) and values["loss"] > 0


def check_irt(ns: dict[str, Any], zoo: Path) -> None:
    assert len(ns["idx"]) == 20 and 0 <= ns["acc"] <= 1


def check_merge(ns: dict[str, Any], zoo: Path) -> None:
    import torch

    b, merged, model = ns["b"], ns["merged"], ns["model"]
    assert set(merged) == set(b) and all(t.isfinite().all() for t in merged.values())
    written = model.state_dict()
    assert any(not torch.equal(written[n], b[n]) for n in b)  # the merge went into the model


def check_runs(ns: dict[str, Any], zoo: Path) -> None:
    run, model = ns["run"], ns["model"]
    assert len(run.candidates) and len(run.pareto_front()) and len(run.history) == 2
    assert model.config.num_hidden_layers > 0 and ns["tok"] is not None


def check_extending(ns: dict[str, Any], zoo: Path) -> None:
    assert set(ns["merged"]) == {"w"} and 0 <= ns["acc"] <= 1


CHECKS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "docs/guides/fitness.md": check_fitness,
    "docs/guides/irt.md": check_irt,
    "docs/guides/merge.md": check_merge,
    "docs/guides/runs.md": check_runs,
    "docs/extending.md": check_extending,
}
WITH_CODE = [p.relative_to(ROOT).as_posix() for p in PAGES if BLOCK.search(p.read_text())]


@pytest.mark.parametrize("page", WITH_CODE)
def test_page_snippets_run(page, zoo_dir, registries, request, tmp_path, monkeypatch):
    text = (ROOT / page).read_text()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(zoo_dir / "base")
    for name, expert in EXPERTS.items():
        (tmp_path / "models" / name).symlink_to(zoo_dir / "experts" / expert)
    if '"runs/demo"' in text:
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "demo").symlink_to(request.getfixturevalue("tiny_run"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")

    ns: dict[str, Any] = {"__name__": f"docs_{Path(page).stem}"}
    exec(compile(PREAMBLE.get(page, ""), f"{page} (preamble)", "exec"), ns)
    for i, block in enumerate(blocks(ROOT / page)):
        exec(compile(block, f"{page} (python block {i + 1})", "exec"), ns)
    if page in CHECKS:
        CHECKS[page](ns, zoo_dir)


def test_every_page_with_code_is_checked():
    """A new page with python blocks runs anyway; this names it so that it gets a check too."""
    assert set(WITH_CODE) <= set(CHECKS), sorted(set(WITH_CODE) - set(CHECKS))


def test_includes_use_the_marker_the_site_reads():
    """``ruff format`` turns ``--8<-- "file"`` inside a python block into ``--8 < --"file"``, which
    pymdownx.snippets does not read: the page would show the marker instead of the example."""
    mangled = [
        (p.relative_to(ROOT).as_posix(), line)
        for p in PAGES
        for block in BLOCK.findall(p.read_text())
        for line in block.splitlines()
        if INCLUDE.match(line) and not MARKER.match(line)
    ]
    assert not mangled
