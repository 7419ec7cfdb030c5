"""Streamed vs resident placement on the CPU: what copying each tensor's task vectors costs a merge.

Reproduce (about a minute):

    python experiments/benchmarks/streamed.py

Inputs: a random-init model of SmolLM2-135M's shape (LlamaConfig hidden 576, intermediate 1536, 30
layers, 9 heads, 3 kv heads, vocab 49152, tied embeddings) and K = 3 experts, each the base plus
Gaussian noise (std 0.002), float32. Two Mergers over the same inputs, as a search worker makes them
(keyed random masks, so dare_ties runs the fused kernels): one resident (task vectors held where they
merge), one streamed (task vectors in host memory, each tensor's K copied into a reusable buffer just
before its method runs; on a CPU a plain copy, on a GPU a pinned-memory transfer beside the merge).
Both are prepared and warmed up; then each method is merged into one preallocated model for a number
of rounds, the placements alternating round by round (which goes first, too), and the median of the
rounds is reported with the streamed/resident ratio. The weights of the two placements are checked
identical. On a CPU the streamed copy is pure overhead (the task vectors are read twice, once from the
store and once from the buffer): the ratio bounds what the placement costs where it does not help.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from evomerge.merge import Merger
from evomerge.merge.kernels import limit_heap_fragmentation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import smollm2_config  # noqa: E402 - the shape the merge benchmarks share

METHODS = {
    "linear": {"weight": [0.5, 0.3, 0.2]},
    "task_arithmetic": {"weight": [0.5, 0.3, 0.2]},
    "ties": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.6, 0.4]},
    "dare_ties": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.6, 0.4]},
}
EXPERTS = 3


def smollm2_state_dict() -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return {k: v.detach() for k, v in LlamaForCausalLM(smollm2_config()).state_dict().items()}


def perturbed(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The base plus noise, with the base's tied tensors tied again."""
    g = torch.Generator().manual_seed(seed)
    made: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in base.items():
        key = t.data_ptr()
        if key not in made:
            made[key] = t + 0.002 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
        out[name] = made[key]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="timed merges per method and placement")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    limit_heap_fragmentation()  # as a worker does
    base = smollm2_state_dict()
    experts = {f"e{i}": perturbed(base, i + 1) for i in range(EXPERTS)}
    mergers, setup = {}, {}
    for placement in ("resident", "streamed"):
        start = time.perf_counter()
        m = Merger(base, experts, seed=0, random="keyed", streamed=placement == "streamed")
        m.prepare(list(METHODS))
        setup[placement] = time.perf_counter() - start
        mergers[placement] = m
    del experts
    out = {n: torch.empty_like(t) for n, t in base.items()}
    out["lm_head.weight"] = out["model.embed_tokens.weight"]
    times: dict[tuple[str, str], list[float]] = {}
    for method, p in METHODS.items():  # warm-up (the fused kernels compile) and the identity check
        merged = {
            pl: {n: t.clone() for n, t in m.merge(method, p, out=out).items()} for pl, m in mergers.items()
        }
        same = all(torch.equal(merged["resident"][n], merged["streamed"][n]) for n in merged["resident"])
        if not same:
            print(f"{method}: the placements' weights differ", file=sys.stderr)
            return 1
    for method, p in METHODS.items():
        for r in range(args.rounds):
            order = ("resident", "streamed") if r % 2 == 0 else ("streamed", "resident")
            for placement in order:
                start = time.perf_counter()
                mergers[placement].merge(method, p, out=out)
                times.setdefault((method, placement), []).append(time.perf_counter() - start)
    given = sys.argv[1:] if argv is None else argv
    mem = {pl: m.memory() for pl, m in mergers.items()}
    n = sum(t.numel() for name, t in base.items() if t.is_floating_point() and name != "lm_head.weight")
    print(f"Command: `{' '.join(['python experiments/benchmarks/streamed.py', *given])}`")
    print()
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}; SmolLM2-135M shape ({n / 1e6:.0f}M float32 weights), K = {EXPERTS}, "
        f"median of {args.rounds} rounds alternating the placements; weights identical in both placements"
    )
    print()
    print("| method | resident s | streamed s | streamed / resident |")
    print("| --- | --- | --- | --- |")
    for method in METHODS:
        a = statistics.median(times[method, "resident"])
        b = statistics.median(times[method, "streamed"])
        print(f"| {method} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")
    print()
    print(
        "| placement | setup s (Merger + prepare) | held (Merger.memory(), MiB): base / task vectors / staging / statistics / scratch |"
    )
    print("| --- | --- | --- |")
    for pl, m in mem.items():
        parts = " / ".join(
            f"{m.parts[k] / 2**20:.0f}" for k in ("base", "task_vectors", "staging", "statistics", "scratch")
        )
        print(f"| {pl} | {setup[pl]:.1f} | {parts} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
