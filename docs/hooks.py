"""mkdocs hook: the configuration reference, generated from the pydantic models of evomerge.config.

A page holding the marker below gets, in its place, one table per config section (field, type,
default, description), read from ``RunConfig`` and the sections it nests, and after ``fitness`` one
table per fitness backend, read from its options model: the field descriptions in the code are the one
source of truth.
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

MARKER = "<!-- config-reference -->"


def _type(annotation: Any) -> str:
    """An annotation as a reader writes it: ``int | 'auto' | None``, ``list[str]``, ``{str: float}``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{_type(args[0])}]"
        return f"[{', '.join(_type(a) for a in args)}]"
    if origin is dict:
        return f"{{{_type(args[0])}: {_type(args[1])}}}"
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        if issubclass(annotation, enum.Enum):
            return " | ".join(repr(m.value) for m in annotation)
        return annotation.__name__
    return str(annotation)


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):  # a section: what its default sets besides the section's own defaults
        changed = value.model_dump(mode="json", exclude_defaults=True)
        return f"`{changed}`" if changed else "the section's defaults"
    if isinstance(value, tuple) and value and isinstance(value[0], BaseModel):
        value = [v.model_dump(mode="json", exclude_defaults=True) for v in value]
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, tuple):  # YAML writes a tuple as a list
        value = list(value)
    if isinstance(value, dict):
        value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
    return f"`{value!r}`" if value is not None else "`None`"


def _constraints(field: Any) -> str:
    """The bounds pydantic checks (ge=1, gt=0, ...), as text."""
    out = []
    for m in field.metadata:
        for name, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >=")):
            if getattr(m, name, None) is not None:
                out.append(f"{sign} {getattr(m, name)}")
    return ", ".join(out)


def _cell(text: str) -> str:
    """Text safe in a table cell: pipes escaped, <name> shown rather than read as HTML, ** not bold."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return text.replace("|", "\\|").replace("\n", " ")


def _sections(model: type[BaseModel], prefix: str) -> list[tuple[str, type[BaseModel]]]:
    """(dotted key, model) for ``model`` and every section it nests, depth first."""
    out = [(prefix, model)]
    for name, field in model.model_fields.items():
        for arg in [field.annotation, *typing.get_args(field.annotation)]:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                key = f"{prefix}.{name}" if prefix else name
                if typing.get_origin(field.annotation) is tuple:
                    key += "[]"
                out += _sections(arg, key)
                break
    return out


def _table(model: type[BaseModel]) -> str:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        limits = _constraints(field)
        desc = "; ".join(t for t in (field.description, limits) if t)
        rows.append(
            f"| `{name}` | {_cell(_type(field.annotation))} | {_cell(_default(field))} | {_cell(desc)} |"
        )
    return "\n".join(rows)


def _first_paragraph(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").strip().split("\n\n")[0].split())


def _backends() -> list[str]:
    """One table per fitness backend: the options its model declares, in the same ``fitness:`` section."""
    from evomerge.fitness import BACKENDS

    parts = []
    for name, backend in BACKENDS.items():
        intro = _first_paragraph(backend.model)
        intro += f" Selected by `{backend.selected_by}` ({backend.what}); options model `{backend.model.__name__}`."
        parts.append(f"### `fitness`: the {name} backend\n\n{intro.strip()}\n\n{_table(backend.model)}")
    return parts


def config_reference() -> str:
    from evomerge.config import FitnessConfig, RunConfig

    parts = []
    for key, model in _sections(RunConfig, ""):
        title = f"`{key}`" if key else "Top level (`RunConfig`)"
        intro = _first_paragraph(model) if model is not RunConfig else ""
        parts.append(f"## {title}\n\n" + (f"{intro}\n\n" if intro else "") + _table(model))
        if model is FitnessConfig:
            parts += _backends()
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, config_reference())
    return markdown
