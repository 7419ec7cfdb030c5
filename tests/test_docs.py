"""The docs: every worked example of docs/extending.md runs for real (each registers into the live
registries, which a fixture restores afterwards), the README stays short, and every docs page it links
exists."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def load_example(name: str):
    """Import docs/examples/<name>.py under a module name of its own (its registrations run)."""
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merge_method_example(registries):
    from evomerge.merge import get_method, merge_state_dicts

    load_example("merge_method")
    assert [p.name for p in get_method("clipped_sum").params] == ["weight", "clip"]
    torch.manual_seed(0)
    base = {"w": torch.randn(4, 6), "b": torch.randn(6)}
    experts = {k: {n: t + 0.05 * torch.randn_like(t) for n, t in base.items()} for k in ("a", "c")}
    merged = merge_state_dicts(
        {"base": base, **experts}, "clipped_sum", base="base", parameters={"weight": [0.7, 0.3], "clip": 0.02}
    )
    for n, t in base.items():
        want = (
            t
            + 0.7 * (experts["a"][n] - t).clamp(-0.02, 0.02)
            + 0.3 * (experts["c"][n] - t).clamp(-0.02, 0.02)
        )
        torch.testing.assert_close(merged[n], want)
    with pytest.raises(Exception, match="clip"):  # the declared range is the validation
        merge_state_dicts(
            {"base": base, **experts}, "clipped_sum", base="base", parameters={"weight": 1, "clip": 2}
        )


def test_estimator_example(registries):
    from evomerge import irt

    load_example("estimator")
    rng = np.random.default_rng(0)
    params = irt.IrtParams("2pl", a=rng.uniform(0.5, 2, 30), b=rng.normal(size=30))
    idx = np.arange(10)
    y = (rng.random(10) < 0.7).astype(float)
    assert irt.estimate_accuracy(params, idx, y, estimator="laplace") == pytest.approx((y.sum() + 1) / 12)
    assert "laplace" in irt.ESTIMATORS


def test_fitness_backend_example(registries):
    from tiny import random_models

    from evomerge.config import parse_config
    from evomerge.errors import EvomergeError
    from evomerge.fitness import FitnessBackend, fitness_spec, make_fitness
    from evomerge.zoos.tiny import build_tokenizer

    load_example("fitness_backend")
    fitness = make_fitness(texts=["12+34=46.", "abc|cba."])
    assert isinstance(fitness, FitnessBackend)
    result = fitness.evaluate(random_models(1)[0], build_tokenizer(), "search")
    assert np.isfinite(result.values["loglik"]) and result.values["loglik"] < 0
    assert result.n_items == 2 and result.n_tokens > 0
    # a run config selects it and sets its option; the options model checks them
    config = {
        "models": {"base": "zoo:base", "experts": {"a": "zoo:addition"}},
        "fitness": {"texts": ["12+34=46."], "max_tokens": 8},
        "objectives": [{"name": "loglik", "of": "loglik"}],
    }
    assert fitness_spec(parse_config(config).fitness) == {"texts": ["12+34=46."], "max_tokens": 8}
    with pytest.raises(EvomergeError, match=r"^config: fitness.max_tokens: Input should be greater than or"):
        parse_config({**config, "fitness": {"texts": ["12+34=46."], "max_tokens": 0}})


def test_algorithm_example():
    from pymoo.core.problem import Problem

    from evomerge.algorithms import check_algorithm, check_initial, make_algorithm

    sys.path.insert(0, str(EXAMPLES))  # as a user's module on PYTHONPATH
    try:
        name = "algorithm:WideMutationGA"
        check_algorithm(name, {"eta": 3.0}, 1)
        check_initial(name, "experts", {})
        with pytest.raises(Exception, match="no option 'etta'"):
            check_algorithm(name, {"etta": 3.0}, 1)
        algorithm = make_algorithm(name, 8, {"eta": 3.0}, 1)
        problem = Problem(n_var=3, n_obj=1, xl=0.0, xu=1.0)
        algorithm.setup(problem, termination=("n_gen", 3), seed=0, verbose=False)
        best = np.inf
        while algorithm.has_next():  # evomerge's ask/tell loop, with a sphere for fitness
            pop = algorithm.ask()
            pop.set("F", ((pop.get("X") - 0.3) ** 2).sum(axis=1, keepdims=True))
            algorithm.tell(infills=pop)
            best = min(best, float(pop.get("F").min()))
        assert best < 0.1
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop("algorithm", None)


def test_search_space_example():
    from evomerge.searchspace import SearchSpace, load_space_config

    cfg = load_space_config({"name": str(EXAMPLES / "search_space.yaml"), "layer_groups": 2})
    space = SearchSpace(cfg, ["a", "b"], num_layers=4)
    # per group (2 layer groups + other): lines.deep, then weight and density for each expert
    assert space.n_var == 3 * (1 + 2 * 2)
    recipe = space.decode(np.full(space.n_var, 0.5))
    assert {g.method for g in recipe.groups} == {"ties"}
    assert recipe.groups[0].lines == {"shallow": 1.0, "deep": 1.0}
    assert recipe.groups[0].parameters["density"] == {"a": 0.6, "b": 0.6}


def test_report_section_example(tiny_run):
    from evomerge.report.page import SECTIONS, build_report
    from evomerge.run import Run

    example = load_example("report_section")
    run = Run(tiny_run)
    table = example.section_generations(run)
    assert len(run.history) == 2 and table.count("<tr") == 1 + 2  # the header, the 2 generations
    SECTIONS.append(example.generations)
    try:
        page = build_report(run)
    finally:
        SECTIONS.remove(example.generations)
    assert '<h2 id="generations">Generations</h2>' in page and table in page


def test_readme_is_short_and_its_docs_links_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    found = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)]*))?\)", readme)
    links = [link for link, _ in found]
    assert len(links) >= 10, links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing
    for link, anchor in found:  # an anchor names a heading of the page (mkdocs' slugs)
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / link).read_text(), flags=re.M)
            slugs = {re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings}
            assert anchor in slugs, (link, anchor)
    nav = (ROOT / "mkdocs.yml").read_text()
    for link in links:  # every page the README sends a reader to is in the site's navigation
        if link.endswith(".md"):
            assert link.removeprefix("docs/") in nav, link


@pytest.mark.skipif(
    importlib.util.find_spec("material") is None,
    reason="mkdocs-material is not installed (pip install -e '.[docs]')",
)
def test_site_builds_strict(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "clipped_sum" in (tmp_path / "site" / "extending" / "index.html").read_text()
    assert "race_confidence" in (tmp_path / "site" / "config" / "index.html").read_text()
