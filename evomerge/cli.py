"""The command line: ``evomerge run``, ``evomerge zoo build``, ``evomerge front``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from evomerge.errors import EvomergeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Evolutionary model merging.")
zoo_app = typer.Typer(no_args_is_help=True, help="The tiny model zoo used by the demo and the tests.")
app.add_typer(zoo_app, name="zoo")
console = Console()


def fail(message: str) -> None:
    Console(stderr=True).print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(
    config: Path = typer.Argument(..., help="run config YAML"),
    out: Path | None = typer.Option(None, "--out", help="run folder (default: runs/<config name>)"),
    workers: int | None = typer.Option(None, "--workers", help="number of Ray workers"),
    ray_address: str | None = typer.Option(None, "--ray-address", help="join this Ray cluster"),
) -> None:
    """Run an evolutionary merge search."""
    from evomerge.config import load_config
    from evomerge.search import Search

    try:
        cfg = load_config(
            config, out=str(out) if out else None, workers=workers, **{"ray.address": ray_address}
        )
        run_dir = Search(cfg, console=console).run()
    except EvomergeError as e:
        fail(str(e))
    console.print(f"run folder: {run_dir}")


@app.command()
def front(run_dir: Path = typer.Argument(..., help="run folder")) -> None:
    """Print the Pareto front of a finished run."""
    from evomerge.report import front_table, print_frame, print_summary

    if not (run_dir / "front.csv").is_file():
        fail(f"{str(run_dir)!r} has no front.csv (not a finished run folder)")
    print_frame(console, front_table(run_dir).set_index("candidate"), "Pareto front")
    summary = run_dir / "summary.json"
    if summary.is_file():
        print_summary(console, json.loads(summary.read_text()))


@zoo_app.command("build")
def zoo_build(
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="default: $XDG_CACHE_HOME/evomerge"),
    force: bool = typer.Option(False, "--force", help="rebuild even when cached"),
) -> None:
    """Build (or find in the cache) the tiny model zoo and print its folder."""
    from evomerge import zoo

    path = zoo.build_zoo(cache_dir, force=force, progress=sys.stderr.isatty())
    console.print(str(path))


if __name__ == "__main__":
    app()
