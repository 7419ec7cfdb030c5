"""What every command of the command line shares: the console, one line and exit code 2 for a failure,
the workers option, and a stop by SIGINT or SIGTERM that ends in one line.

Started as the program (the ``evomerge`` script, ``python -m evomerge.cli``), this module is imported
first and catches a Ctrl-C from the very start: one line, never a KeyboardInterrupt traceback or click's
"Aborted!"."""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _nothing_stored(name: str) -> str:
    """The line for a command stopped before it stored anything: the same command, run again."""
    command = shlex.join(["evomerge", *sys.argv[1:]])
    return f"stopped by {name} before anything was stored; run `{command}` again"


def _stopped_early(signum: int, frame: object) -> None:
    """SIGINT or SIGTERM while the program starts, before a command reaches its work (see stoppable):
    one line and exit code 2 at once; the SystemExit passes through the import or click call under way.
    Written without rich or fail(), which may not be imported yet."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    sys.stderr.write(f"error: {_nothing_stored(signal.Signals(signum).name)}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def started_as_program() -> bool:
    """Whether this process is the command line (not a program that imports it)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return argv0.name == "evomerge" or argv0.resolve() == Path(__file__).with_name("cli.py").resolve()


if started_as_program():
    for _s in SIGNALS:
        signal.signal(_s, _stopped_early)

import click  # noqa: E402
from rich.console import Console  # noqa: E402


def make_console(terminal: bool) -> Console:
    """The console the commands print to. Off a terminal (a file, a pipe, CI, nohup) rich would wrap
    tables at 80 columns and text lines mid-phrase: tables get 200 columns, a text line stays one line,
    and nothing is coloured."""
    if terminal:
        return Console()
    return Console(width=200, soft_wrap=True, no_color=True, color_system=None)


console = make_console(sys.stdout.isatty())


def fail(message: str) -> None:
    """Print ``error: message`` as one line on stderr and exit with code 2."""
    Console(stderr=True).print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)


class _Workers(click.ParamType):
    name = "N|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        if value == "auto" or (isinstance(value, int) and value >= 1):
            return value
        if isinstance(value, str) and value.isdigit() and int(value) >= 1:
            return int(value)
        self.fail(f"{value!r} is not a number of workers (1 or more) or auto", param, ctx)


WORKERS = _Workers()
QUIET = (
    "print only the run folder at the end (and errors): no memory plan, progress, lines per generation "
    "or summary"
)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived during a run."""


@contextlib.contextmanager
def stoppable(run_dir: Path | None) -> Iterator[None]:
    """Turn SIGINT and SIGTERM into a clean stop: the run's context closes the store and stops the
    workers on the way out, then one line says how to continue (exit code 2)."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    except BaseException as e:
        # The handler's exception may surface wrapped: raised while Ray's compiled ray.wait runs, it
        # comes out as "SystemError: <cyfunction CoreWorker.wait> returned a result with an exception set"
        # with the Interrupted as its context.
        stop = _interruption(e)
        if stop is None:
            raise
        for s in SIGNALS:  # a second signal does not cut the line short
            signal.signal(s, signal.SIG_IGN)
        fail(_stopped(str(stop) or "SIGINT", run_dir))
    finally:
        # The program ends after its stoppable part, its result or its line out: a signal while Ray stops
        # changes nothing (left to Python, a late one would kill it by signal). Imported, the handlers
        # that were there come back.
        for s, h in old.items():
            signal.signal(s, signal.SIG_IGN if h is _stopped_early else h)


def _stopped(name: str, run_dir: Path | None) -> str:
    """The line for a run stopped by signal ``name``: how to continue it, or, where its store was not
    made yet (Ray starting, models loading), that nothing was stored and the command can run again."""
    from evomerge.runfolder import RunFolder

    if run_dir is not None and not RunFolder(run_dir).exists():
        return _nothing_stored(name)
    where = f"; continue with `evomerge resume {run_dir}`" if run_dir else ""
    return f"stopped by {name}: every finished evaluation is stored, the workers are stopped{where}"


def _interruption(e: BaseException | None) -> BaseException | None:
    """The Interrupted (or KeyboardInterrupt) that ``e`` is or that caused it, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (Interrupted, KeyboardInterrupt)):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
