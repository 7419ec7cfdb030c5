"""The run config: a frozen pydantic model. YAML is only how it is saved."""

from __future__ import annotations

import functools
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.errors import EvomergeError, read_yaml
from evomerge.objectives import DEPTH, ObjectiveConfig
from evomerge.spaceconfig import SearchSpaceConfig, load_space_config, space_data


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelsConfig(_Frozen):
    base: str = Field(description="HF folder, hub id, or zoo:base")
    experts: dict[str, str] = Field(
        min_length=1, description="expert name -> HF folder, hub id, or zoo:<skill>"
    )
    tokenizer: str | None = Field(None, description="tokenizer source (default: the base)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="the compute dtype workers load and merge in (default: bfloat16 on cuda, float32 on cpu)",
    )
    vocab: Literal["base", "union"] = Field(
        "base",
        description="tokens experts added to the base's vocabulary: left out (base: the base's tokenizer "
        "and rows) or kept (union: the base's tokenizer with them appended, each added row the expert's)",
    )


class ZooConfig(_Frozen):
    cache_dir: Path | None = Field(None, description="where the tiny zoo is built (default: user cache)")


class CalibrationConfig(_Frozen):
    random_merges: int | Literal["auto"] = Field(
        "auto",
        description="random merges a calibration evaluates besides the base and the experts; auto: the "
        "fewest the estimators need (8 for sgpirt's surrogate, else 4)",
    )
    items: int | Literal["auto", "all"] = Field(
        "auto",
        description="items a calibration evaluates (a sample stratified by task, which the estimates are then "
        "about), or all; auto: all up to 200, else about as many item evaluations as the search itself "
        "makes, at least 100 items",
    )
    model: Literal["2pl", "multidim_2pl"] = "2pl"
    params: Path | None = Field(None, description="a folder of fitted <scope>.json files: skip calibration")

    @field_validator("random_merges", "items")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError(f"must be 0 or more, or auto; got {v}")
        return v


class EstimationConfig(_Frozen):
    bank: Literal["auto", "none"] | Path = Field(
        "auto",
        description="the item bank IRT estimators use: auto (the cached bank for these tasks' items, built by "
        "the first run or `evomerge calibrate`, and grown by every run), a bank file (`evomerge bank import`, "
        "`evomerge calibrate --out`), or none (each run calibrates for itself)",
    )


class FitnessConfig(_Frozen):
    """What every fitness backend shares. Each backend's own options (the tables below) sit beside these
    keys in the same section, and the key that selects a backend (`tasks`, `function`) picks the one that
    scores the candidates."""

    search_split: str = "search"
    test_split: str = "test"
    items: int | None = Field(
        None, ge=1, description="items per task per candidate on the search split (all if null)"
    )
    calibration: CalibrationConfig = CalibrationConfig()
    timeout: float | Literal["auto", "none"] | None = Field(
        "auto",
        description="seconds one evaluation may take before it fails as 'timed out' and its worker is "
        "replaced; auto: 10x the slowest finished evaluation of its kind (at least 60 s; 30 min before "
        "any has finished); none: no limit",
    )

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, (int, float)) and not (0 < v < float("inf")):
            raise ValueError(f"must be a positive number of seconds, auto or none; got {v}")
        return None if v == "none" else v


def fitness_model() -> type[FitnessConfig]:
    """The fitness section a run config is validated against: :class:`FitnessConfig` with every
    registered backend's options model (``tasks``, ``batch_size``, ``function``, ... in one flat
    section, as ``config.fitness.batch_size`` reads them), composed once per set of backends."""
    from evomerge.fitness.base import BACKENDS

    return _compose(tuple((name, BACKENDS.get(name).model) for name in BACKENDS))


@functools.cache
def _compose(backends: tuple[tuple[str, type[BaseModel]], ...]) -> type[FitnessConfig]:
    """FitnessConfig and the backends' options models as one model, whose validators are all of
    theirs. Two that declare one field differently, or validators of one name, are refused: one would
    hide the other."""
    owners: dict[str, tuple[str, Any]] = {}
    checks: dict[str, tuple[str, Any]] = {}
    for owner, model in [("the fitness section", FitnessConfig)] + [
        (f"fitness backend {n!r}", m) for n, m in backends
    ]:
        for name, field in model.model_fields.items():
            first = owners.setdefault(name, (owner, field))
            if (first[1].annotation, first[1].default, first[1].metadata) != (
                field.annotation,
                field.default,
                field.metadata,
            ):
                raise EvomergeError(
                    f"{owner} declares fitness option {name!r} as {_shown(field)}, and {first[0]} as "
                    f"{_shown(first[1])}; one name, one meaning: rename one"
                )
        decorators = model.__pydantic_decorators__
        for kind in (decorators.field_validators, decorators.model_validators):
            for name, decorator in kind.items():
                func = getattr(decorator.func, "__func__", decorator.func)
                if checks.setdefault(name, (owner, func))[1] is not func:
                    raise EvomergeError(
                        f"{owner}'s options model and {checks[name][0]} both have a validator named "
                        f"{name!r}; one would hide the other: rename one"
                    )
    models = dict.fromkeys(model for _, model in backends)
    bases = (FitnessConfig, *reversed(models))  # fields in the order of the backends, then the common ones
    return types.new_class(
        "FitnessConfig",
        bases,
        {},
        lambda ns: ns.update(
            __module__=__name__, __doc__=FitnessConfig.__doc__, model_config=_Frozen.model_config
        ),
    )


def _shown(field: Any) -> str:
    """A field's type and default, as the refusal of a second meaning names them."""
    return f"{getattr(field.annotation, '__name__', field.annotation)} = {field.default!r}"


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
    num_cpus_per_worker: float = Field(1.0, gt=0, allow_inf_nan=False)


class RunConfig(_Frozen):
    models: ModelsConfig
    search_space: SearchSpaceConfig = Field(default_factory=lambda: load_space_config("per_layer"))
    fitness: SerializeAsAny[FitnessConfig]  # validated as fitness_model(), dumped whole
    objectives: tuple[ObjectiveConfig, ...] = (ObjectiveConfig(name="mean_accuracy"),)
    algorithm: AlgorithmConfig = AlgorithmConfig()
    seed: int = Field(0, ge=0, lt=2**32, description="0 to 2**32 - 1 (numpy's range)")
    workers: int | Literal["auto"] | None = Field(
        None,
        description="Ray workers, or auto: as many as the GPUs (or CPU cores) and the memory plan allow; "
        "default: auto on a GPU, 2 on a CPU",
    )
    device: str = Field(
        "auto",
        description="where workers merge and evaluate: auto (cuda where torch sees a GPU), cpu, cuda, cuda:N",
    )
    placement: Literal["auto", "device", "streamed", "host"] = Field(
        "auto",
        description="where a worker holds base and task vectors: device, streamed (task vectors in pinned host "
        "memory, copied to the device tensor by tensor), host (cpu); auto: the fastest the memory plan fits",
    )
    gpus_per_worker: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="GPUs Ray gives each worker (0.5: two workers share a GPU; an integer above 1 spreads a "
        "worker's model over that many GPUs); default on cuda: 1, or the fewest whole GPUs that hold a "
        "worker where one does not (the memory plan's choice)",
    )
    retries: int = Field(1, ge=0, description="re-evaluations on another worker before a candidate fails")
    threads_per_worker: int = Field(1, ge=1)
    ray: RayConfig = RayConfig()
    zoo: ZooConfig = ZooConfig()
    estimation: EstimationConfig = EstimationConfig()
    out: Path | None = Field(None, description="run folder (default: runs/<config name>)")

    @model_validator(mode="before")
    @classmethod
    def _resolve_space(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and "search_space" in data
            and not isinstance(data["search_space"], BaseModel)
        ):
            data = {**data, "search_space": space_data(data["search_space"])}
        return data

    @field_validator("fitness", mode="before")
    @classmethod
    def _with_backend_options(cls, v: Any) -> Any:
        return fitness_model().model_validate(v) if isinstance(v, dict) else v

    @field_validator("workers")
    @classmethod
    def _positive_workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be at least 1 or auto; got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N; got {v!r}")
        return v

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_above_one(cls, v: float | None) -> float | None:
        if v is not None and v > 1 and v != int(v):
            raise ValueError(f"must be at most 1 or a whole number of GPUs; got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.device == "cpu" and self.gpus_per_worker:
            raise EvomergeError("gpus_per_worker is set but device is cpu; remove it or set device: cuda")
        if self.device == "cpu" and self.placement in ("device", "streamed"):
            raise EvomergeError(
                f"placement {self.placement!r} needs a GPU; with device: cpu use host or auto"
            )
        if self.device.startswith("cuda") and self.placement == "host":
            raise EvomergeError(
                "placement 'host' runs on the CPU; with device: cuda use device, streamed or auto"
            )
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise EvomergeError(f"objective names must be unique, got {names}")
        fitness = self.fitness
        from evomerge.fitness.base import select_backend

        counted = self._check_depth()
        scored = [o for o in self.objectives if o not in counted]
        backend = select_backend(dict(fitness))
        if backend.check is not None:
            backend.check(fitness, scored)
        from evomerge.irt import get_estimator

        estimated = [o for o in self.objectives if o.estimator]
        merges = fitness.calibration.random_merges
        if estimated and isinstance(self.estimation.bank, Path):
            from evomerge.bank import check_bank_file

            every = getattr(fitness, "tasks", ()) or ()
            scopes = {o.of: list(every) if o.of == "mean" else [o.of] for o in estimated}
            check_bank_file(self.estimation.bank, scopes, fitness.search_split)
        for o in estimated:
            if o.items is None:
                raise EvomergeError(
                    f"objective {o.name!r} has estimator {o.estimator!r} but no `items` (subset size)"
                )
            needed = get_estimator(o.estimator).min_calibration_merges
            if merges != "auto" and merges < needed:
                raise EvomergeError(
                    f"objective {o.name!r}: estimator {o.estimator!r} learns from the calibration merges; "
                    f"set fitness.calibration.random_merges >= {needed} (got {merges})"
                )
        for o in scored:
            if o.items == "adaptive" and o.estimator is None:
                raise EvomergeError(
                    f"objective {o.name!r}: items: adaptive needs an estimator (pirt, irt or sgpirt)"
                )
        adaptive = [o.name for o in scored if o.items == "adaptive"]
        if adaptive and len(adaptive) < len(scored):
            other = next(o.name for o in scored if o.items != "adaptive")
            raise EvomergeError(
                f"objective {adaptive[0]!r} has items: adaptive, objective {other!r} does not; a candidate's "
                "items are chosen adaptively for every objective or for none"
            )
        racing = [o.name for o in scored if o.race]
        if racing and counted:
            raise EvomergeError(
                f"objective {racing[0]!r}: race stops a candidate on its estimates; objective "
                f"{counted[0].name!r} is of depth, which is counted: remove race or that objective"
            )
        if racing and any(o.items != "adaptive" for o in scored):
            raise EvomergeError(
                f"objective {racing[0]!r}: race needs every objective to be items: adaptive "
                "(a candidate is stopped on all its estimates)"
            )
        if estimated and (not backend.item_subsets or fitness.items):
            raise EvomergeError(
                "objective estimators need lm-eval tasks and choose their own items; "
                "remove fitness.function / fitness.items"
            )
        from evomerge.algorithms import check_algorithm, check_initial, spec_for

        check_algorithm(self.algorithm.name, self.algorithm.options, len(self.objectives))
        check_initial(self.algorithm.name, self.algorithm.initial, self.algorithm.options)
        batched = spec_for(self.algorithm.name).options_from is not None  # experts fill several batches
        if (
            self.algorithm.initial == "experts"
            and not batched
            and self.algorithm.pop_size < len(self.models.experts)
        ):
            raise EvomergeError(
                f"algorithm.initial: experts puts {len(self.models.experts)} experts in the first population; "
                f"pop_size is {self.algorithm.pop_size}: raise it to at least {len(self.models.experts)}"
            )
        return self

    def _check_depth(self) -> list[ObjectiveConfig]:
        """The objectives of ``depth`` (the decoder layers of a candidate's data flow), checked: they need
        a data flow, are counted rather than estimated, and trade against another objective."""
        counted = [o for o in self.objectives if o.of == DEPTH]
        for o in counted:
            if self.search_space.data_flow is None:
                raise EvomergeError(
                    f"objective {o.name!r} is of depth, the decoder layers of a candidate, which only a "
                    "search_space.data_flow varies: add one or remove the objective"
                )
            if o.estimator is not None or o.items is not None:
                raise EvomergeError(
                    f"objective {o.name!r} is of depth, which is counted, not estimated: remove its "
                    "estimator and items"
                )
        if counted and len(counted) == len(self.objectives):
            raise EvomergeError(
                f"objective {counted[0].name!r} is of depth; add an objective of accuracy to trade it against"
            )
        return counted


def format_validation_error(err: ValidationError) -> str:
    """One line naming the first problem: where it is, what is wrong, what is allowed, and the value
    given. A value that none of a field's alternatives takes (``float | Literal[...]``) lists them all."""
    errors = err.errors()
    e = errors[0]
    loc = _field_loc(e["loc"])
    where = ".".join(str(p) if str(p).isprintable() else repr(p) for p in loc) or "config"
    if e["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        key = ".".join(str(p) if str(p).isprintable() else repr(p) for p in loc)
        return f"config: unknown key {key!r}" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    if e["type"] == "missing":
        return f"config: missing required key {where!r}"
    same = [x for x in errors if _field_loc(x["loc"]) == loc and x["msg"].startswith("Input should be ")]
    if len(same) > 1 and e in same:
        wanted = [re.sub(r", unable to .*$", "", x["msg"].removeprefix("Input should be ")) for x in same]
        msg = f"Input should be {' or '.join(dict.fromkeys(wanted))}"
    else:
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    msg = re.sub(r"a valid dictionary or instance of \w+", "a mapping of keys", msg)
    if e["type"] not in ("value_error", "assertion_error") and "input" in e:
        given = repr(e["input"])
        msg += f" (got {given if len(given) <= 60 else given[:57] + '...'})"
    msg = " ".join(msg.split())  # one line, whatever a validator's message held
    return f"config: {where}: {msg}" if where != "config" else f"config: {msg}"


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """(the annotation without ``| None``, the members when what is left is still a union)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0], []
        return annotation, members
    return annotation, []


def _child(annotation: Any, part: Any) -> Any:
    """The annotation of ``part`` (a field name, a list index or a mapping key) inside ``annotation``."""
    annotation = _validated_as(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field is not None else None
    args = get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is tuple and isinstance(part, int):
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        return args[part] if part < len(args) else None
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _validated_as(annotation: Any) -> Any:
    """The model a section is validated against: the fitness section's has every backend's options."""
    return fitness_model() if annotation is FitnessConfig else annotation


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys of the config section at ``loc`` (list indexes step into a tuple of sections)."""
    annotation: Any = RunConfig
    for part in loc:
        annotation = _child(_unwrap(annotation)[0], part)
    annotation = _validated_as(_unwrap(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _field_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``loc`` without pydantic's union member tags (``fitness.timeout.float`` is ``fitness.timeout``)."""
    out: list[Any] = []
    annotation: Any = RunConfig
    for part in loc:
        annotation, members = _unwrap(annotation)
        if members and isinstance(part, str):  # the tag of the member that was tried
            annotation = next((m for m in members if getattr(m, "__name__", None) == part), None)
            continue
        out.append(part)
        annotation = _child(annotation, part)
    return tuple(out)


def load_config(path: str | Path, **overrides: Any) -> RunConfig:
    """Read and validate a run config; bad input raises EvomergeError with one line."""
    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"config file {str(path)!r} does not exist")
    data = read_yaml(path, "config file")
    if data is None:  # an empty file: validation names the missing keys
        data = {}
    if not isinstance(data, dict):
        raise EvomergeError(f"config file {str(path)!r} must hold a mapping of keys")
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # `ray: 5`: validation names the bad section below
                break
        else:
            node[last] = value
    if data.get("out") is None:
        data["out"] = str(Path("runs") / path.stem)
    return parse_config(data)


def parse_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise EvomergeError(format_validation_error(e)) from None
    except EvomergeError:
        raise
