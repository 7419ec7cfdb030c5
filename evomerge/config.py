"""The run config: a frozen pydantic model. YAML is only how it is saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.errors import EvomergeError
from evomerge.searchspace import SearchSpaceConfig, load_space_config


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelsConfig(_Frozen):
    base: str = Field(description="HF folder, hub id, or zoo:base")
    experts: dict[str, str] = Field(
        min_length=1, description="expert name -> HF folder, hub id, or zoo:<skill>"
    )
    tokenizer: str | None = Field(None, description="tokenizer source (default: the base)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class ZooConfig(_Frozen):
    cache_dir: Path | None = Field(None, description="where the tiny zoo is built (default: user cache)")


class CalibrationConfig(_Frozen):
    random_merges: int = Field(
        20, ge=0, description="random merges evaluated on the full split, besides base and experts"
    )
    model: Literal["2pl", "multidim_2pl"] = "2pl"
    params: Path | None = Field(None, description="a folder of fitted <scope>.json files: skip calibration")


class FitnessConfig(_Frozen):
    tasks: tuple[str, ...] = Field((), description="lm-eval task names (fitness/ catalogue or lm-eval's)")
    function: str | None = Field(
        None, description="a Python fitness 'module:function' (model, tokenizer) -> {name: value}"
    )
    include: tuple[Path, ...] = Field((), description="extra folders of lm-eval task YAMLs")
    search_split: str = "search"
    test_split: str = "test"
    items: int | None = Field(
        None, ge=1, description="items per task per candidate on the search split (all if null)"
    )
    batch_size: int = Field(64, ge=1)
    calibration: CalibrationConfig = CalibrationConfig()


class ObjectiveConfig(_Frozen):
    name: str
    of: str = Field(
        "mean",
        description="a task name or 'mean' (mean accuracy over tasks); with a fitness function, a key it returns",
    )
    direction: Literal["max", "min"] = "max"
    estimator: Literal["mean", "irt", "pirt", "gpirt", "mpirt", "gmpirt", "sgpirt"] | None = Field(
        None,
        description="estimate the full-split accuracy from `items` items with IRT (null: plain accuracy); "
        "sgpirt also uses a surrogate of accuracy over genomes fitted on the calibration models",
    )
    items: int | None = Field(None, ge=1, description="subset size for the estimator")
    selection: Literal["random", "anchor", "information"] = "random"


class AlgorithmConfig(_Frozen):
    name: str = Field(
        "ga", description="ga, de, cmaes, pso, nsga2, nsga3, smsemoa, spea2, random, or module:Class"
    )
    pop_size: int = Field(16, ge=2)
    generations: int = Field(8, ge=1)
    options: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for pymoo")
    initial: Literal["random", "experts"] = Field(
        "random",
        description="first population: random genomes, or one genome reproducing each expert (and the "
        "rest random), so the search starts from its inputs and never ends below the best of them",
    )


class RayConfig(_Frozen):
    address: str | None = Field(None, description="join this Ray cluster (default: start a local Ray)")
    num_cpus_per_worker: float = 1.0


class RunConfig(_Frozen):
    models: ModelsConfig
    search_space: SearchSpaceConfig = Field(default_factory=lambda: load_space_config("per_layer"))
    fitness: FitnessConfig
    objectives: tuple[ObjectiveConfig, ...] = (ObjectiveConfig(name="mean_accuracy"),)
    algorithm: AlgorithmConfig = AlgorithmConfig()
    seed: int = 0
    workers: int = Field(2, ge=1)
    retries: int = Field(1, ge=0, description="re-evaluations on another worker before a candidate fails")
    threads_per_worker: int = Field(1, ge=1)
    ray: RayConfig = RayConfig()
    zoo: ZooConfig = ZooConfig()
    out: Path | None = Field(None, description="run folder (default: runs/<config name>)")

    @model_validator(mode="before")
    @classmethod
    def _resolve_space(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and "search_space" in data
            and not isinstance(data["search_space"], BaseModel)
        ):
            data = {**data, "search_space": load_space_config(data["search_space"])}
        return data

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise EvomergeError(f"objective names must be unique, got {names}")
        fitness = self.fitness
        if bool(fitness.tasks) == bool(fitness.function):
            raise EvomergeError(
                "fitness: give either `tasks` (lm-eval task names) or `function` (module:function)"
            )
        if fitness.function:
            from evomerge.fitness.python import load_function

            load_function(fitness.function)
        else:
            for o in self.objectives:
                if o.of != "mean" and o.of not in fitness.tasks:
                    raise EvomergeError(
                        f"objective {o.name!r} is of {o.of!r}, which is not a fitness task; "
                        f"allowed: mean, {', '.join(fitness.tasks)}"
                    )
        from evomerge.irt import MIN_SURROGATE_MERGES

        estimated = [o for o in self.objectives if o.estimator]
        for o in estimated:
            if o.items is None:
                raise EvomergeError(
                    f"objective {o.name!r} has estimator {o.estimator!r} but no `items` (subset size)"
                )
            if o.estimator == "sgpirt" and fitness.calibration.random_merges < MIN_SURROGATE_MERGES:
                raise EvomergeError(
                    f"objective {o.name!r}: estimator 'sgpirt' fits its surrogate on the calibration merges; "
                    f"set fitness.calibration.random_merges >= {MIN_SURROGATE_MERGES} "
                    f"(got {fitness.calibration.random_merges})"
                )
        if estimated and (fitness.function or fitness.items):
            raise EvomergeError(
                "objective estimators need lm-eval tasks and choose their own items; "
                "remove fitness.function / fitness.items"
            )
        from evomerge.algorithms import check_algorithm, check_initial

        check_algorithm(self.algorithm.name, self.algorithm.options, len(self.objectives))
        check_initial(self.algorithm.name, self.algorithm.initial, self.algorithm.options)
        if self.algorithm.initial == "experts" and self.algorithm.pop_size < len(self.models.experts):
            raise EvomergeError(
                f"algorithm.initial: experts puts {len(self.models.experts)} experts in the first population; "
                f"pop_size is {self.algorithm.pop_size}: raise it to at least {len(self.models.experts)}"
            )
        return self


def format_validation_error(err: ValidationError) -> str:
    """One line naming the first problem: where it is, what is wrong, what is allowed."""
    e = err.errors()[0]
    where = ".".join(str(p) for p in e["loc"]) or "config"
    if e["type"] == "extra_forbidden":
        allowed = _allowed_keys(RunConfig, e["loc"][:-1])
        return f"config: unknown key {where!r}; allowed: {', '.join(allowed)}"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "missing":
        return f"config: missing required key {where!r}"
    return f"config: {where}: {msg}" if where != "config" else f"config: {msg}"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def load_config(path: str | Path, **overrides: Any) -> RunConfig:
    """Read and validate a run config; bad input raises EvomergeError with one line."""
    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise EvomergeError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise EvomergeError(f"config file {str(path)!r} must hold a mapping of keys")
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    if data.get("out") is None:
        data["out"] = str(Path("runs") / path.stem)
    return parse_config(data)


def parse_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig(**data)
    except ValidationError as e:
        raise EvomergeError(format_validation_error(e)) from None
    except EvomergeError:
        raise
