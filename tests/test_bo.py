"""optuna's samplers behind the search loop's ask/tell (evomerge.bo): batches, exact resume from a
pickled checkpoint, warm start from models evaluated before the search, and the genome limit of bo."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from pymoo.core.evaluator import Evaluator
from pymoo.core.problem import Problem
from pymoo.problems.static import StaticProblem

from evomerge.algorithms import FAILED_F, check_genes, make_algorithm, setup
from evomerge.cli import app
from evomerge.errors import EvomergeError


def sphere(X: np.ndarray) -> np.ndarray:
    return ((X - 0.3) ** 2).sum(axis=1, keepdims=True)


def drive(name, generations=4, pop=2, seed=0, pickle_after=None, warm=None, fail_first=False, n_var=4):
    """Run ``name`` by ask/tell on a sphere in [0, 1]^n_var; optionally pickle and unpickle it after a
    generation (a checkpoint and its resume). Returns every X and F in order."""
    problem = Problem(n_var=n_var, n_obj=1, xl=0.0, xu=1.0)
    algorithm = setup(make_algorithm(name, pop, {}, 1), name, problem, generations, seed)
    if warm is not None:
        algorithm.warm_start(*warm)
    xs, fs = [], []
    while algorithm.has_next():
        pop_ = algorithm.ask()
        X = pop_.get("X")
        F = sphere(X)
        if fail_first and not xs:
            F[0] = FAILED_F  # a failed candidate
        Evaluator().eval(StaticProblem(problem, F=F), pop_)
        algorithm.tell(infills=pop_)
        xs.append(X)
        fs.append(F)
        if pickle_after == len(xs):
            algorithm = pickle.loads(pickle.dumps(algorithm))
    return np.concatenate(xs), np.concatenate(fs)


@pytest.mark.parametrize("name", ["bo", "tpe", "optuna_cmaes"])
def test_a_pickled_checkpoint_resumes_exactly(name):
    X, F = drive(name, fail_first=True)
    assert X.shape == (8, 4) and np.all((X >= 0) & (X <= 1))
    X2, _ = drive(name, pickle_after=2, fail_first=True)
    np.testing.assert_array_equal(X2, X)
    X3, _ = drive(name, seed=1, fail_first=True)
    assert not np.array_equal(X3, X)  # the seed matters


def test_warm_start_trials_steer_the_first_generation():
    """20 models known before the search (as the calibration's random merges are): the first batch is
    proposed from the Gaussian process fitted on them, near the optimum, not drawn at random."""
    known = np.random.default_rng(0).random((20, 4))
    _, cold = drive("bo", generations=1, pop=2)
    _, warm = drive("bo", generations=1, pop=2, warm=(known, sphere(known)))
    assert warm.min() < 0.05 < sphere(known).min() < cold.min()
    algorithm = setup(make_algorithm("bo", 2, {}, 1), "bo", Problem(n_var=4, n_obj=1, xl=0, xu=1), 2, 0)
    algorithm.warm_start(known, np.vstack([sphere(known[:-1]), [[np.inf]]]))  # a non-finite row is left out
    assert len(algorithm._new_study().trials) == 19


def test_bo_refuses_a_genome_over_its_limit_before_anything_starts(tmp_path):
    check_genes("bo", 200, "layout")
    check_genes("ga", 5000, "layout")
    with pytest.raises(
        EvomergeError, match=r"^algorithm 'bo' models at most 200 genes; this search space has 201"
    ):
        check_genes("bo", 201, "layout")
    config = tmp_path / "big.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": {"base": "zoo:base", "experts": {f"e{i}": "zoo:addition" for i in range(60)}},
                "search_space": {"name": "per_layer", "layer_groups": 4},
                "fitness": {"tasks": ["zoo_addition"]},
                "algorithm": {"name": "bo"},
            }
        )
    )
    done = CliRunner().invoke(app, ["check", str(config), "--out", str(tmp_path / "run")])
    assert done.exit_code == 2
    assert "algorithm 'bo' models at most 200 genes; this search space has 300 (5 layer groups" in done.stderr


def test_sampler_options_are_checked_by_the_sampler():
    with pytest.raises(
        EvomergeError, match=r"algorithm 'bo' has no option 'popsize'; its options: .*n_startup_trials"
    ):
        make_algorithm("bo", 2, {"popsize": 3}, 1)
    with pytest.raises(EvomergeError, match="algorithm 'optuna_cmaes' optimises one objective"):
        make_algorithm("optuna_cmaes", 2, {}, 2)
    assert make_algorithm("tpe", 2, {"n_startup_trials": 4}, 2).options == {"n_startup_trials": 4}


def test_the_batch_is_one_candidate_per_worker_unless_set(tmp_path):
    from tiny import save_model_set

    from evomerge.config import parse_config
    from evomerge.search import Search

    folders = save_model_set(tmp_path / "models", ["base", "a", "b"])
    data = {
        "models": {"base": str(folders["base"]), "experts": {"a": str(folders["a"]), "b": str(folders["b"])}},
        "fitness": {"function": "math:fsum"},
        "algorithm": {"name": "bo", "generations": 3},
        "workers": 2,
    }
    assert Search(parse_config(data), out=tmp_path / "run").config.algorithm.pop_size == 2
    data["algorithm"]["pop_size"] = 5
    assert Search(parse_config(data), out=tmp_path / "run").config.algorithm.pop_size == 5


def test_given_first_genomes_fill_the_first_batches():
    """initial: experts with more experts than a batch holds: they are proposed first, batch by batch."""
    first = np.array([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    problem = Problem(n_var=4, n_obj=1, xl=0.0, xu=1.0)
    algorithm = setup(make_algorithm("bo", 2, {}, 1, initial=first), "bo", problem, 3, 0)
    batches = []
    while algorithm.has_next():
        pop = algorithm.ask()
        Evaluator().eval(StaticProblem(problem, F=sphere(pop.get("X"))), pop)
        algorithm.tell(infills=pop)
        batches.append(pop.get("X"))
    np.testing.assert_array_equal(batches[0], first[:2])
    np.testing.assert_array_equal(batches[1][0], first[2])
    assert not any(np.array_equal(batches[1][1], x) for x in first) and len(batches) == 3
