"""User-facing errors: one line that names the bad value and the allowed ones."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class EvomergeError(ValueError):
    """Bad input from the user (config, files, names). The CLI prints it on one line and exits 2."""


def unknown(kind: str, name: object, allowed: Iterable[str]) -> EvomergeError:
    """An error for a name that is not one of ``allowed``, with a "did you mean" hint."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(name), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return EvomergeError(f"unknown {kind} {name!r}{hint}; available: {', '.join(allowed)}")


def yaml_problem(err: Exception, text: str) -> str:
    """What a YAML parse error says, where it is (1-based line and column), on one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    position = getattr(err, "position", None)  # a ReaderError: a character the reader refuses
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}"
    elif isinstance(position, int):
        before = text[:position]
        where = f"line {before.count(chr(10)) + 1}, column {position - before.rfind(chr(10))}"
    else:
        where = None
    if problem is None:
        lines = str(err).splitlines()
        problem = lines[0] if lines else type(err).__name__
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None and mark is not None:
        problem += f" ({context} started at line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        problem += f" ({context})"
    return f"{where}: {problem}" if where else problem


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document in ``path`` (None when empty); a file that cannot be read or parsed raises an
    EvomergeError naming ``what`` and the file, with the line and column of a syntax error."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvomergeError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise EvomergeError(f"{what} {str(path)!r} cannot be read: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:  # well-formed, but a tag plain YAML has no value for
        raise EvomergeError(
            f"{what} {str(path)!r} holds YAML that evomerge cannot read: {yaml_problem(e, text)}"
        ) from None
    except yaml.YAMLError as e:
        raise EvomergeError(f"{what} {str(path)!r} is not valid YAML: {yaml_problem(e, text)}") from None
    except RecursionError:
        raise EvomergeError(f"{what} {str(path)!r} is nested too deeply to read") from None
