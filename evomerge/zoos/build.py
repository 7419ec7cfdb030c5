"""What the zoos' builds share: the recipe hash that names a zoo's folder, the manifest written into it,
a zoo's folder layout, and the plumbing of training (threads, learning-rate schedule, progress).

A zoo is ``<cache>/<kind>-<hash12>/`` with ``base/`` and ``experts/<name>/`` (HF folders with tokenizer)
and ``zoo.json`` (the recipe, every model's accuracy on every skill, timings).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from evomerge.cache import build_once, default_cache_dir
from evomerge.errors import EvomergeError

MANIFEST = "zoo.json"


def recipe_hash(recipe: dict) -> str:
    """12 hex digits identifying ``recipe``."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def zoo_folder(kind: str, recipe: dict, cache_dir: Path | None) -> Path:
    """``<cache_dir>/<kind>-<hash12>/``, built or not (``cache_dir`` None: the user cache)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{kind}-{recipe_hash(recipe)}"


def build_zoo_folder(
    folder: Path,
    build: Callable[[Path], dict],
    force: bool = False,
    complete: Callable[[Path], bool] = Path.is_dir,
) -> Path:
    """``folder``, made once by ``build(tmp)`` (which returns the manifest) with :func:`build_once`."""

    def make(tmp: Path) -> None:
        manifest = build(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    return build_once(folder, make, force, complete=complete)


def load_manifest(zoo_dir: Path) -> dict:
    """The ``zoo.json`` manifest of a built zoo."""
    return json.loads((Path(zoo_dir) / MANIFEST).read_text())


def zoo_model(root: Path, prefix: str, name: str) -> Path:
    """The folder of model ``name`` (``base`` or an expert) of the zoo built in ``root``."""
    path = root / "base" if name == "base" else root / "experts" / name
    if not path.is_dir():
        available = ["base"] + sorted(p.name for p in (root / "experts").iterdir())
        raise EvomergeError(f"unknown {prefix} model {name!r}; available: {', '.join(available)}")
    return path


# --- training -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the duration."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``steps``."""

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def train(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    opt: torch.optim.Optimizer,
    steps: int,
    warmup: int,
    on_step: Callable[[float], None] | None = None,
) -> None:
    """``steps`` steps of ``opt`` on (input_ids, labels) ``batches`` under :func:`warmup_cosine`, with the
    gradient norm of the optimised parameters clipped to 1; ``on_step(loss)`` after each."""
    params = [p for group in opt.param_groups for p in group["params"]]
    sched = warmup_cosine(opt, steps, warmup)
    model.train()
    for _ in range(steps):
        ids, labels = next(batches)
        # Right padding needs no attention mask: causal attention never lets a real token see a later pad.
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(loss.item())


@contextlib.contextmanager
def training_progress(enabled: bool | str | None, total: int) -> Iterator:
    """Yields ``update(description, loss)``: a rich progress bar when ``enabled`` (or "bar"), a line per
    5% of the steps with "lines" (output that is not a terminal), nothing otherwise."""
    if not enabled:
        yield lambda desc, loss: None
        return
    if enabled == "lines":
        start, done, step = time.monotonic(), 0, max(1, total // 20)

        def line(desc: str, loss: float) -> None:
            nonlocal done
            done += 1
            if done % step == 0 or done == total:
                print(
                    f"zoo {desc}: step {done}/{total}, loss {loss:.3f} ({time.monotonic() - start:.0f} s)",
                    flush=True,
                )

        yield line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("[bold]zoo[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("", total=total, loss=float("nan"))

        def update(desc: str, loss: float) -> None:
            bar.update(task, advance=1, description=desc, loss=loss)

        yield update
