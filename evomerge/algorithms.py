"""Search algorithms by name: the catalogue, option checking, and objective-count checking.

``algorithm.name`` is a short name below (pymoo's algorithms, and optuna's samplers through
:mod:`evomerge.bo`) or any pymoo algorithm class as ``module:Class``
(``pymoo.algorithms.moo.spea2:SPEA2``). Options are the class's (or the sampler's) keyword arguments;
unknown ones are refused, since pymoo itself would silently ignore them.

The short names are :data:`ALGORITHMS`, a registry of :class:`AlgorithmSpec`: another package adds one
through the ``evomerge.algorithms`` entry points (``name = "module:SPEC"``, SPEC an AlgorithmSpec).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from evomerge.errors import EvomergeError, unknown
from evomerge.registry import Registry

FAILED_F = 1e6  # what an algorithm sees for a failed candidate: worse than any real objective


@dataclass(frozen=True)
class AlgorithmSpec:
    target: str  # "module:Class"
    objectives: str  # "single", "multi" or "any"
    pop_option: str | None = "pop_size"  # the constructor argument that takes the population size
    ref_dirs: bool = False  # needs reference directions (one per population member)
    seeded: bool = True  # takes its first population as an array (``sampling``), for ``initial: experts``
    # cma (behind pymoo's CMAES) draws its seed from the clock when given 0: seed 0 is given as this
    zero_seed: int | None = None
    options_from: str | None = None  # "module:Class" whose keyword arguments the options are (else target)
    max_genes: int | None = None  # the most genes the algorithm models
    batch_of_workers: bool = False  # pop_size, unless the config sets it, is the number of workers
    # its pickled state can be resumed from (pymoo's CMAES pickles without its cma generator and then
    # ends one generation after the resume): otherwise a resume replays the generations from the store
    checkpoints: bool = True


_BUILT_IN = {
    "ga": AlgorithmSpec("pymoo.algorithms.soo.nonconvex.ga:GA", "single"),
    "de": AlgorithmSpec("pymoo.algorithms.soo.nonconvex.de:DE", "single"),
    "cmaes": AlgorithmSpec(
        "pymoo.algorithms.soo.nonconvex.cmaes:CMAES", "single", zero_seed=2**31 - 1, checkpoints=False
    ),
    "pso": AlgorithmSpec("pymoo.algorithms.soo.nonconvex.pso:PSO", "single"),
    "nsga2": AlgorithmSpec("pymoo.algorithms.moo.nsga2:NSGA2", "multi"),
    "nsga3": AlgorithmSpec("pymoo.algorithms.moo.nsga3:NSGA3", "multi", ref_dirs=True),
    "smsemoa": AlgorithmSpec("pymoo.algorithms.moo.sms:SMSEMOA", "multi"),
    "spea2": AlgorithmSpec("pymoo.algorithms.moo.spea2:SPEA2", "multi"),
    "random": AlgorithmSpec(
        "pymoo.algorithms.soo.nonconvex.random_search:RandomSearch",
        "any",
        pop_option="n_points_per_iteration",
        seeded=False,  # draws from `sampling` every generation
    ),
    # optuna's samplers behind the same ask/tell (evomerge.bo); options are the sampler's
    # (bo's Gaussian process refits over every gene each generation: beyond 200 it is slow and no better
    # than the evolutionary algorithms)
    "bo": AlgorithmSpec(
        "evomerge.bo:BO",
        "any",
        options_from="optuna.samplers:GPSampler",
        max_genes=200,
        batch_of_workers=True,
    ),
    "tpe": AlgorithmSpec(
        "evomerge.bo:TPE", "any", options_from="optuna.samplers:TPESampler", batch_of_workers=True
    ),
    "optuna_cmaes": AlgorithmSpec(
        "evomerge.bo:OptunaCmaEs", "single", options_from="optuna.samplers:CmaEsSampler"
    ),
}

ALGORITHMS: Registry[AlgorithmSpec] = Registry("algorithm", AlgorithmSpec, group="evomerge.algorithms")
for _name, _spec in _BUILT_IN.items():
    ALGORITHMS.add(_name, _spec)


def load_target(target: str) -> type:
    module, _, name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise EvomergeError(f"algorithm {target!r} does not import: {e}") from None
    except Exception as e:  # the module's own code failed (SyntaxError, ...) or a bad name (".x")
        first = (str(e).splitlines() or [""])[0]
        raise EvomergeError(f"algorithm {target!r} does not import: {type(e).__name__}: {first}") from None
    if not isinstance(cls, type):
        raise EvomergeError(f"algorithm {target!r} is not a class")
    return cls


def spec_for(name: str) -> AlgorithmSpec:
    if name in ALGORITHMS:
        return ALGORITHMS.get(name)
    if ":" in name:
        return AlgorithmSpec(name, "any")
    raise EvomergeError(
        f"{unknown('algorithm', name, ALGORITHMS.names())}, or any pymoo algorithm as module:Class"
    )


def _accepted(cls: type) -> set[str] | None:
    """Keyword arguments the class and its bases name explicitly (None: accepts anything)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return names - {"self"} or None


def check_algorithm(name: str, options: dict[str, Any], n_objectives: int) -> None:
    """Refuse unknown algorithms, unknown options, and algorithms that do not fit the objective count."""
    spec = spec_for(name)
    if spec.objectives == "single" and n_objectives != 1:
        raise EvomergeError(
            f"algorithm {name!r} optimises one objective, the config has {n_objectives}; "
            f"multi-objective ones: {', '.join(n for n, s in ALGORITHMS.items() if s.objectives != 'single')}"
        )
    if spec.objectives == "multi" and n_objectives < 2:
        raise EvomergeError(
            f"algorithm {name!r} needs two or more objectives, the config has {n_objectives}; "
            f"single-objective ones: {', '.join(n for n, s in ALGORITHMS.items() if s.objectives != 'multi')}"
        )
    cls = load_target(spec.options_from or spec.target)
    accepted = _accepted(cls)
    if accepted is not None:
        accepted -= {"seed"} if spec.options_from else set()  # the run's seed seeds the sampler
        bad = sorted(set(options) - accepted)
        if bad:
            raise EvomergeError(
                f"algorithm {name!r} has no option {bad[0]!r}; its options: {', '.join(sorted(accepted))}"
            )


def check_initial(name: str, initial: str, options: dict[str, Any]) -> None:
    """Refuse ``initial: experts`` where the algorithm cannot start from a given population."""
    if initial == "random":
        return
    spec = spec_for(name)
    accepted = None if spec.options_from else _accepted(load_target(spec.target))
    if not spec.seeded or (accepted is not None and "sampling" not in accepted):
        seeded = ", ".join(n for n, s in ALGORITHMS.items() if s.seeded)
        raise EvomergeError(
            f"algorithm.initial: {initial} needs an algorithm that starts from a given population; "
            f"{name!r} does not (allowed: {seeded}, or a module:Class taking `sampling`)"
        )
    if "sampling" in options:
        raise EvomergeError(
            f"algorithm.initial: {initial} sets the first population; remove algorithm.options.sampling"
        )


def check_genes(name: str, n_var: int, layout: str) -> None:
    """Refuse a genome larger than the algorithm models (``layout`` says where the genes come from)."""
    limit = spec_for(name).max_genes
    if limit is not None and n_var > limit:
        raise EvomergeError(
            f"algorithm {name!r} models at most {limit} genes; this search space has {n_var} ({layout}): "
            "use fewer layer_groups or genes, or ga, cmaes or tpe"
        )


def setup(algorithm: Any, name: str, problem: Any, generations: int, seed: int) -> Any:
    """``algorithm.setup`` for ``generations`` generations from ``seed``, the same run for the same seed
    (pymoo's CMA-ES would take seed 0 as "random")."""
    zero = spec_for(name).zero_seed
    algorithm.setup(
        problem,
        termination=("n_gen", generations),
        seed=zero if seed == 0 and zero is not None else seed,
        verbose=False,
    )
    return algorithm


def make_algorithm(
    name: str, pop_size: int, options: dict[str, Any], n_objectives: int, initial: Any = None
) -> Any:
    """A fresh pymoo algorithm instance for ``n_objectives`` objectives and ``pop_size`` candidates;
    ``initial``, an array of genomes (pop_size x n_var), is its first population."""
    check_algorithm(name, options, n_objectives)
    spec = spec_for(name)
    kwargs = dict(options)
    if initial is not None:
        kwargs["sampling"] = initial
    if spec.ref_dirs and "ref_dirs" not in kwargs:
        from pymoo.util.ref_dirs import get_reference_directions

        kwargs["ref_dirs"] = get_reference_directions("energy", n_objectives, pop_size, seed=1)
    if spec.pop_option is not None:
        kwargs.setdefault(spec.pop_option, pop_size)
    try:
        return load_target(spec.target)(**kwargs)
    except (TypeError, ValueError) as e:
        raise EvomergeError(f"algorithm {name!r}: bad options {options}: {e}") from None
