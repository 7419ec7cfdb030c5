"""The one sink between the workers and the store: every evaluation a run asks for goes through
``Evaluations.evaluate``, which answers it from the store where it can (the store is a memo keyed by
recipe, split and item subset), reserves candidate ids in the order the run asks, dispatches the rest to
the workers, stores each result as it finishes, and stops the run when its first evaluations all fail
alike (the setup's fault, not the candidates')."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from evomerge.errors import EvomergeError
from evomerge.jobs import EvalResult, Job
from evomerge.runfolder import RunFolder
from evomerge.store import Candidate, Status, Store, StoreFullError

if TYPE_CHECKING:
    from evomerge.adaptive import AdaptiveScore

# A run stops when its first evaluations (this many, or the whole first batch if smaller) all failed
# with the same error and none succeeded: the cause is the setup, not the candidates.
STOP_AFTER = 8


class SystematicFailure(EvomergeError):
    """Every evaluation so far failed with the same error; the run stopped and can be resumed."""


Score = Callable[[Job, EvalResult], dict[str, float]]
# Progress display: (description, total) -> a context yielding the function that advances it by one.
Progress = Callable[[str, int], AbstractContextManager[Callable[[], None]]]


@contextlib.contextmanager
def no_progress(description: str, total: int) -> Iterator[Callable[[], None]]:
    """No progress display."""
    yield lambda: None


class Evaluations:
    """Evaluations of one run: ``store`` (its records), ``pool`` (the workers), ``score`` (a finished
    job's objective values), ``progress`` (how progress shows, e.g. :func:`evomerge.report.progress` on a
    console; none by default)."""

    def __init__(
        self, folder: RunFolder, store: Store, pool: Any, score: Score, progress: Progress = no_progress
    ):
        self.folder, self.store, self.pool, self.score, self.progress = folder, store, pool, score, progress
        self._failures: list[Candidate] = []
        self._succeeded = any(c.status == Status.OK for c in store.candidates())
        # A run that stopped on a failure shared by its first evaluations retries them once resumed.
        self._retry_failed = folder.meta(store).stopped_on is not None
        self._stop_after = STOP_AFTER

    def evaluate(self, jobs: list[Job], describe: str) -> dict[Any, Candidate]:
        """Evaluate jobs in parallel, each distinct recipe once per split and item subset (also across
        generations), storing each result as it finishes. Returns job tag -> candidate."""
        out: dict[Any, Candidate] = {}
        todo: dict[str, list[Job]] = {}
        retried: dict[str, Candidate] = {}
        for job in jobs:
            hit = self.store.find(job.key, job.split, job.subset)
            if hit is not None and hit.status == Status.FAILED and self._retry_failed:
                retried[job.key], hit = hit, None
            if hit is not None:
                out[job.tag] = hit
            else:
                todo.setdefault(job.key, []).append(job)
        ids = {key: self._reserve(same[0], retried.get(key)) for key, same in todo.items()}
        if not self._succeeded:
            self._stop_after = min(STOP_AFTER, max(len(todo), 1))
        with self.progress(describe, len(todo)) as advance:
            for job, result in self.pool.run([same[0] for same in todo.values()]):
                c = self._record(job, result, ids[job.key])
                if result.fatal:
                    raise EvomergeError(result.error)
                for twin in todo[job.key]:
                    out[twin.tag] = c
                advance()
        return out

    def _reserve(self, job: Job, failed: Candidate | None) -> int:
        """The candidate id of an evaluation about to be dispatched: its reservation from before a stop,
        the failed row being retried, or a new reservation (in the order the run asks, not the order
        workers finish, so a resumed run gives every evaluation the id it had)."""
        if failed is not None:
            return failed.id
        found = self.store.reserved(job.key, job.split, job.subset)
        if found is not None:
            return found
        return self._write(self.store.add, self._candidate(job, EvalResult(Status.PENDING)))

    def _candidate(
        self, job: Job, result: EvalResult, objectives: dict[str, float] | None = None
    ) -> Candidate:
        o = job.origin
        return Candidate(
            recipe=job.recipe.to_dict(),
            recipe_key=job.key,
            split=job.split,
            subset=job.subset,
            status=result.status,
            kind=o.kind,
            generation=o.generation,
            label=o.label,
            genome=o.genome,
            objectives=objectives,
            metrics=result.values,
            responses=result.responses,
            n_items=result.n_items,
            n_tokens=result.n_tokens,
            wall_s=result.wall_s,
            worker=result.worker,
            error=result.error,
            trace=result.trace,
            stopped=_stopped(result.adaptive),
            outputs=result.outputs or None,
        )

    def _record(self, job: Job, result: EvalResult, cid: int) -> Candidate:
        # a missing objective stops the run before anything is stored
        objectives = self.score(job, result) if result.ok else None
        c = self._candidate(job, result, objectives)
        c.id = cid
        self._write(self.store.finish, c)
        self._watch_failures(c)
        return c

    def write_meta(self, **fields: Any) -> None:
        """Set meta fields of the run (see ``RunMeta``), with the store's fault handling."""
        try:
            self.folder.meta(self.store).update(**fields)
        except StoreFullError:
            raise EvomergeError(self.disk_full_message()) from None

    def _write(self, write: Callable[[Candidate], Any], c: Candidate) -> Any:
        """A store write; a full disk or a vanished run folder stops the run in one line."""
        try:
            out = write(c)
        except StoreFullError:
            raise EvomergeError(self.disk_full_message()) from None
        if not self.folder.store_path.exists():
            raise EvomergeError(
                f"run folder {str(self.folder.path)!r} vanished during the run (its store.sqlite is gone); "
                "what the run stored there is lost: start the run again"
            )
        return out

    def disk_full_message(self) -> str:
        free = shutil.disk_usage(self.folder.path).free
        return (
            f"the disk holding run folder {str(self.folder.path)!r} is full ({free / 2**20:.0f} MiB free); "
            f"nothing was half-stored: free some space and continue with `evomerge resume {self.folder.path}`"
        )

    def _watch_failures(self, c: Candidate) -> None:
        """Stop the run when its first evaluations all failed with the same error."""
        if c.status == Status.OK:
            self._succeeded = True
            return
        if self._succeeded:
            return
        self._failures.append(c)
        firsts = {first_line(f.error) for f in self._failures}
        if len(self._failures) >= self._stop_after and len(firsts) == 1:
            first = min(self._failures, key=lambda f: f.id)
            self.write_meta(stopped_on={"error": first_line(first.error), "candidate": first.id})
            run = self.folder.path
            raise SystematicFailure(
                f"every evaluation so far failed with the same error ({len(self._failures)} of "
                f"{len(self._failures)}): {first_line(first.error)} (candidate {first.id}; whole trace: "
                f"`evomerge show {run} --candidate {first.id}`); fix the cause and continue with "
                f"`evomerge resume {run}`"
            )


def first_line(error: str | None) -> str:
    lines = (error or "").strip().splitlines()
    return lines[0] if lines else "(no error message)"


def _stopped(adaptive: dict[str, AdaptiveScore] | None) -> str | None:
    """Why a candidate's adaptive tests stopped: raced if any was, else their reasons."""
    if not adaptive:
        return None
    reasons = sorted({s.stopped for s in adaptive.values()})
    return "raced" if "raced" in reasons else ",".join(reasons)
