"""The item-bank commands: ``evomerge calibrate`` and ``evomerge bank show|refit|link|import``."""

from __future__ import annotations

from pathlib import Path

import click

from evomerge.cli_common import WORKERS, console, fail, stoppable
from evomerge.errors import EvomergeError


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "bank_file",
    type=click.Path(path_type=Path),
    help="the bank file to write or extend (default: the config's estimation.bank, else the cached bank)",
)
@click.option("--workers", type=WORKERS, help="number of Ray workers, or auto")
@click.option("--ray-address", help="join this Ray cluster")
def calibrate(
    config: Path, bank_file: Path | None, workers: int | str | None, ray_address: str | None
) -> None:
    """Calibrate the config's items once, into an item bank that its runs then reuse: the base, the
    experts and random merges evaluated on the search split (sized as a run would), IRT fitted."""
    import shutil
    import tempfile

    from evomerge.config import load_config
    from evomerge.report import print_lines
    from evomerge.search import Search

    try:
        cfg = load_config(config, workers=workers, **{"ray.address": ray_address})
        if not cfg.fitness.tasks:
            raise EvomergeError(
                "calibrate needs lm-eval tasks (fitness.tasks): a Python fitness reports no per-item answers"
            )
        if bank_file is not None or cfg.estimation.bank == "none":
            target = bank_file or "auto"
            cfg = cfg.model_copy(update={"estimation": cfg.estimation.model_copy(update={"bank": target})})
        if isinstance(cfg.estimation.bank, Path) and cfg.estimation.bank.exists():
            from evomerge.bank import ItemBank

            ItemBank.load(cfg.estimation.bank)  # a damaged file is refused before anything runs
        scratch = Path(tempfile.mkdtemp(prefix="evomerge-calibrate-"))
        with stoppable(scratch / "run"):
            try:
                bank = Search(cfg, out=scratch / "run", console=console).calibrate()
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    except EvomergeError as e:
        fail(str(e))
    print_lines(console, bank.summary_lines())


@click.group()
def bank() -> None:
    """Item banks: IRT item parameters and the responses they were fitted on, reused across runs."""


@bank.command("show")
@click.argument("path", required=False, type=click.Path(path_type=Path))
def bank_show(path: Path | None) -> None:
    """What a bank holds (its tasks, models, fits), or, without PATH, the banks in the cache."""
    from evomerge.bank import ItemBank, bank_dir
    from evomerge.report import print_lines

    try:
        if path is not None:
            print_lines(console, ItemBank.load(path).summary_lines())
            return
        found = sorted(bank_dir().glob("*.npz"))
        for f in found:
            b = ItemBank.load(f)
            fits = (
                ", ".join(
                    f"{k} ({'imported' if v.n_subjects is None else f'{v.n_subjects} models'})"
                    for k, v in b.fits.items()
                )
                or "no fit"
            )
            console.print(
                f"{f}  {b.split}: {', '.join(b.tasks)}; {len(b.subjects)} models; {fits}", markup=False
            )
        if not found:
            console.print(f"no banks in {bank_dir()}", markup=False)
    except EvomergeError as e:
        fail(str(e))


@bank.command("refit")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--seed", type=int, help="the fit's seed (default: each fit's own)")
def bank_refit(path: Path, seed: int | None) -> None:
    """Fit a bank's item parameters again on every model now in it (runs add their whole-split
    evaluations); written in place only when the fit succeeds."""
    from evomerge.bank import ItemBank
    from evomerge.report import print_lines

    try:
        b = ItemBank.load(path)
        if not b.refit(seed):
            raise EvomergeError(
                f"item bank {str(path)!r} has no fit of its own to redo (imported fits were made elsewhere); "
                f"`evomerge calibrate CONFIG --out {path}` fits one"
            )
        b.save(path)
    except EvomergeError as e:
        fail(str(e))
    print_lines(console, b.summary_lines())


@bank.command("link")
@click.argument("path", type=click.Path(path_type=Path))
def bank_link(path: Path) -> None:
    """Extend a bank's fits to its other items that enough of its models answered (runs add whole-split
    answers): their parameters are fitted with the fitted items' fixed, on the same scale."""
    from evomerge.bank import ItemBank
    from evomerge.report import print_lines

    try:
        b = ItemBank.load(path)
        linked = {scope: b.link(scope) for scope in list(b.fits)}
        if any(linked.values()):
            b.save(path)
    except EvomergeError as e:
        fail(str(e))
    console.print(
        ", ".join(f"{scope}: {n} items linked" for scope, n in linked.items()) or "no fit", markup=False
    )
    print_lines(console, b.summary_lines())


@bank.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["tinybenchmarks", "atlas"]), required=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    required=True,
    help="a run config whose fitness names the task (its include folders and search split)",
)
@click.option("--task", help="the lm-eval task the file's items are (default: the config's only task)")
@click.option("--benchmark", help="tinyBenchmarks: the benchmark in the file (lb, mmlu, ...)")
@click.option("--scenario", help="tinyBenchmarks: the scenario whose items are this task's")
@click.option("--fitted-on", type=click.IntRange(min=1), help="how many models the source fitted on")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="the bank file to write (an existing one gains this task's items)",
)
def bank_import(
    file: Path,
    fmt: str,
    config_path: Path,
    task: str | None,
    benchmark: str | None,
    scenario: str | None,
    fitted_on: int | None,
    out: Path,
) -> None:
    """Import a public item bank (tinyBenchmarks' or ATLAS') for one task: its item ids become the task's
    lm-eval documents; a bank whose items the task does not have is refused."""
    from evomerge.bank import ItemBank
    from evomerge.bankimport import import_bank
    from evomerge.config import load_config
    from evomerge.fitness import fitness_spec, make_fitness
    from evomerge.report import print_lines

    try:
        cfg = load_config(config_path)
        tasks = list(getattr(cfg.fitness, "tasks", ()) or ())
        if task is None:
            if len(tasks) != 1:
                raise EvomergeError(f"the config has tasks {tasks}: name the one the file is for with --task")
            task = tasks[0]
        into = ItemBank.load(out) if out.exists() else None  # a damaged file is refused, left as it is
        spec = {**fitness_spec(cfg.fitness), "tasks": [task]}
        split = cfg.fitness.search_split
        n = make_fitness(**spec).n_items(split)[task]
        bank = import_bank(
            file, fmt, task, n, split, benchmark=benchmark, scenario=scenario, fitted_on=fitted_on, into=into
        )
        bank.save(out)
    except EvomergeError as e:
        fail(str(e))
    print_lines(console, bank.summary_lines())
