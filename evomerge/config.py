"""The run config: a frozen pydantic model. YAML is only how it is saved."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    batch_size: int | None = Field(
        None,
        ge=1,
        description="sequences per lm-eval batch; default: on a GPU the memory plan picks the largest, up to "
        "64, whose activations fit beside the merge state; elsewhere 64",
    )
    memory: str | None = Field(
        None,
        description="device memory a Python fitness (fitness.function) uses per worker, e.g. 6GiB: what the "
        "memory plan reserves for it (default: 2GiB)",
    )
    max_length: int | None = Field(
        None,
        ge=1,
        description="tokens per sequence the fitness sees (lm-eval truncates longer ones from the left); "
        "the memory plan reserves activations for batch_size sequences of this length "
        "(default: the model's context, at most 2048)",
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="few-shot examples per prompt (default: each task's own num_fewshot)"
    )
    max_gen_toks: int | None = Field(
        None,
        ge=1,
        description="tokens a generative task may generate per item (default: each task's own, else 256)",
    )
    apply_chat_template: bool = Field(
        False, description="write each prompt with the tokenizer's chat template (instruct models)"
    )
    fewshot_as_multiturn: bool = Field(
        False, description="with apply_chat_template: the few-shot examples as earlier turns of the chat"
    )
    system_instruction: str | None = Field(None, description="a system message put before each prompt")
    confirm_run_unsafe_code: bool = Field(
        False, description="allow tasks that run the code the model writes (MBPP, HumanEval)"
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

    @field_validator("memory", mode="before")
    @classmethod
    def _a_size(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)  # a number of bytes
        if isinstance(v, str):
            from evomerge.plan import parse_bytes

            try:
                parse_bytes(v, "fitness.memory")
            except EvomergeError:
                shown = repr(v) if len(v) <= 40 else repr(v[:37] + "...")
                raise ValueError(f"{shown} is not a size; write e.g. 6GiB, 6GB or 512MiB") from None
        return v

    @model_validator(mode="after")
    def _multiturn_needs_chat(self) -> FitnessConfig:
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise EvomergeError(
                "fewshot_as_multiturn needs apply_chat_template: true (the turns are chat turns)"
            )
        if self.memory is not None and self.tasks:
            raise EvomergeError(
                "memory is what a Python fitness (function) declares; lm-eval's memory is planned from "
                "batch_size and max_length: remove memory"
            )
        return self


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
        description="GPUs Ray gives each worker (0.5: two workers share a GPU; an integer above 1 spreads a "
        "worker's model over that many GPUs); default on cuda: 1, or the fewest whole GPUs that hold a "
        "worker where one does not (the memory plan's choice)",
    )
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
            data = {**data, "search_space": space_data(data["search_space"])}
        return data

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
        for o in estimated:
            if o.items is None:
                raise EvomergeError(
                    f"objective {o.name!r} has estimator {o.estimator!r} but no `items` (subset size)"
                )
            needed = get_estimator(o.estimator).min_calibration_merges
            if merges < needed:
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


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys of the config section at ``loc`` (list indexes step into a tuple of sections)."""
    annotation: Any = RunConfig
    for part in loc:
        annotation = _child(_unwrap(annotation)[0], part)
    annotation = _unwrap(annotation)[0]
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
