"""What the built-in fitness backends take: the options models of lm-eval (``fitness.tasks``) and of a
Python function (``fitness.function``), each field described. A config is checked against them before
anything slow loads, so this module imports neither torch nor lm-eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from evomerge.errors import EvomergeError
from evomerge.fitness.base import FitnessOptions


class LmEvalOptions(FitnessOptions):
    """lm-eval tasks, scored on the in-memory model."""

    tasks: tuple[str, ...] = Field((), description="lm-eval task names (fitness/ catalogue or lm-eval's)")
    include: tuple[Path, ...] = Field((), description="extra folders of lm-eval task YAMLs")
    batch_size: int | None = Field(
        None,
        ge=1,
        description="sequences per lm-eval batch; default: on a GPU the memory plan picks the largest, up to "
        "64, whose activations fit beside the merge state; elsewhere 64",
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

    @model_validator(mode="after")
    def _multiturn_needs_chat(self) -> Any:
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise EvomergeError(
                "fewshot_as_multiturn needs apply_chat_template: true (the turns are chat turns)"
            )
        return self


class PythonOptions(FitnessOptions):
    """A Python function `(model, tokenizer) -> {name: value}`, called on the in-memory model."""

    function: str | None = Field(
        None, description="a Python fitness 'module:function' (model, tokenizer) -> {name: value}"
    )
    memory: str | None = Field(
        None,
        description="device memory a Python fitness (fitness.function) uses per worker, e.g. 6GiB: what the "
        "memory plan reserves for it (default: 2GiB)",
    )

    @field_validator("memory", mode="before")
    @classmethod
    def _a_size(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)  # a number of bytes
        if isinstance(v, str):
            from evomerge.machine import parse_bytes

            try:
                parse_bytes(v, "fitness.memory")
            except EvomergeError:
                shown = repr(v) if len(v) <= 40 else repr(v[:37] + "...")
                raise ValueError(f"{shown} is not a size; write e.g. 6GiB, 6GB or 512MiB") from None
        return v

    @model_validator(mode="after")
    def _memory_is_the_functions(self) -> Any:
        if self.memory is not None and not self.function:
            raise EvomergeError(
                "memory is what a Python fitness (function) declares; lm-eval's memory is planned from "
                "batch_size and max_length: remove memory"
            )
        return self
