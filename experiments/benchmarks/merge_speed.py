"""Merge speed: evomerge's Merger vs mergekit's merge_state_dicts vs a fused task-arithmetic loop, and
the subspace methods vs FusionBench.

Reproduce (a few minutes; needs mergekit and fusion-bench: pip install -e '.[parity]'):

    python experiments/benchmarks/merge_speed.py --threads 2

``--isa avx2`` measures what an AVX2-only CPU does on a CPU with AVX-512: torch's eager kernels are
dispatched at AVX2 (``ATEN_CPU_CAPABILITY=avx2``, set by re-running the script) and Inductor's C++ kernels
are compiled with 256-bit vectors (``torch._inductor.config.cpp.simdlen = 256``), so no AVX-512
instruction runs (a 64-bit integer multiply, for one, is emulated as on AVX2). The table's header names
the CPU, its widest vector instruction set and the one used.

``--experts 3`` merges three experts (per-model parameters written for two repeat their last value;
nuslerp and slerp, which take two inputs at most, are left out).

``--quick`` runs the same steps on a tiny shape (hidden 64, 2 layers, vocab 512), once each: a check
that the script works, not a measurement.

Inputs: a base and two experts of SmolLM2-135M's shape (LlamaConfig hidden 576, intermediate 1536,
30 layers, 9 heads, 3 kv heads, vocab 49152, tied embeddings), random init, float32. Each method merges
the same inputs with the same parameters in one process: evomerge's ``Merger.merge`` into a
preallocated model (after the one-time setup, timed separately), mergekit's ``merge_state_dicts``,
and, as the memory-bandwidth reference, a plain loop ``out = base + w1*d1 + w2*d2`` over preallocated
tensors. Random methods run from the same torch seed in both, so their results are compared too.

The subspace methods (``SUBSPACE``: evomerge's own, no mergekit counterpart) keep genome-independent
SVD factors per tensor. For each, from an empty cache: the one-time preparation (``prepare`` plus the
first merge, less one cached merge), then the per-merge time with the cache (best of ``--repeat``), its
ratio to the fused task-arithmetic floor, and where FusionBench has the method (tsv, iso_c, iso_cts,
magmax) the time of one call of its function for the same merge (it caches nothing, so every call is a
first one), the speedup over it and the largest difference of the weights. The issue's target: a cached
tsv/iso_c merge within 10x of the floor, and at least 10x faster than FusionBench's per-call merge.

A second process (``--mode rss``) runs evomerge alone, reading the models lazily from safetensors
files, and reports its peak RSS against the model size (budget: K + 3 model sizes for K experts); it
merges mergekit's methods only, and with keyed masks dare_* only (the subspace caches and della's
cached ranks are extra, counted by the memory plan per method).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

METHODS: dict[str, dict] = {
    "linear": {"weight": [0.6, 0.4]},
    "task_arithmetic": {"weight": [0.6, 0.4]},
    "ties": {"weight": [0.6, 0.4], "density": [0.5, 0.7]},
    "dare_ties": {"weight": [0.6, 0.4], "density": [0.5, 0.7]},
    "dare_linear": {"weight": [0.6, 0.4], "density": [0.5, 0.7]},
    "breadcrumbs": {"weight": [0.6, 0.4], "density": [0.8, 0.9], "gamma": 0.01},
    "breadcrumbs_ties": {"weight": [0.6, 0.4], "density": [0.8, 0.9], "gamma": 0.01},
    "della": {"weight": [0.6, 0.4], "density": [0.5, 0.6], "epsilon": 0.1},
    "della_linear": {"weight": [0.6, 0.4], "density": [0.5, 0.6], "epsilon": 0.1},
    "sce": {"select_topk": 0.3},
    "model_stock": {},
    "nuslerp": {"weight": [0.6, 0.4]},
    "slerp": {"t": 0.4},
}
SUBSPACE: dict[str, dict] = {
    "tsv": {"lambda": 0.8},
    "iso_c": {"lambda": 1.2},
    "iso_cts": {"common_space_fraction": 0.8, "lambda": 1.0},
    "star": {"weight": [0.6, 0.4], "eta": 0.4},
    "cart": {"weight": [0.6, 0.4], "rank_fraction": 0.1},
    "magmax": {"lambda": 0.8},
    "lines": {"weight": [0.6, 0.4], "shallow": 0.5, "deep": 1.0},
}
# What a search varies: merges that alternate these values with SUBSPACE's move a rank every time, so
# the cached truncated matrices are rebuilt (K products) at each merge; timed as "<method> (rank moved)".
RANK_MOVED: dict[str, dict] = {"star": {"eta": 0.45}, "cart": {"rank_fraction": 0.12}}
METHODS.update(SUBSPACE)
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
EXPERTS = ["a", "b"]  # --experts 3 adds "c"
TWO_ONLY = {"nuslerp", "slerp"}  # methods of at most two inputs: not run with --experts 3


def per_k(params: dict) -> dict:
    """A method's parameters for len(EXPERTS) experts: per-model lists (written for two) repeat their
    last value for a third."""
    k = len(EXPERTS)
    return {n: (v + [v[-1]] * k)[:k] if isinstance(v, list) else v for n, v in params.items()}


_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
# SmolLM2-135M's shape, and a tiny one of the same family for --quick: _KEYS, then vocab and context
SHAPES = {"smollm2": (576, 1536, 30, 9, 3, 49152, 2048), "tiny": (64, 128, 2, 4, 2, 512, 64)}


def smollm2_config(quick: bool = False):
    """SmolLM2-135M's shape (tied embeddings), or (``quick``) the tiny one, for a functional check."""
    from transformers import LlamaConfig

    *sizes, vocab, context = SHAPES["tiny" if quick else "smollm2"]
    dims = dict(zip(_KEYS, sizes, strict=True))
    return LlamaConfig(**dims, vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=context)


def build_models(folder: Path, quick: bool = False) -> None:
    """Random-init base and experts, saved one at a time as safetensors (tied lm_head dropped)."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    cfg = smollm2_config(quick)
    for seed, name in enumerate(["base", *EXPERTS]):
        torch.manual_seed(seed)
        sd = LlamaForCausalLM(cfg).state_dict()
        sd = {k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"}
        save_file(sd, str(folder / f"{name}.safetensors"))
        del sd


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A safetensors file read one tensor at a time (the Merger only ever holds one expert tensor)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = str(path)
        with safe_open(self.path, "pt") as f:
            self.keys_ = list(f.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.path, "pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def model_bytes(sd: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def timed(fn, repeat: int, first: float | None = None, once_over: float = 5.0) -> float:
    """Best of ``repeat`` wall times (the least disturbed by other processes); a first run that took
    over ``once_over`` seconds is not repeated."""
    times = [first] if first is not None else []
    if first is not None and first > once_over:
        return first
    for _ in range(repeat - len(times)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_rss(folder: Path, methods: list[str], tuned: bool = True) -> dict:
    """evomerge alone, as a search worker: lazy inputs, setup, then every method into one preallocated
    output, the random ones also with keyed masks (the fused kernels)."""
    from evomerge.merge import Merger
    from evomerge.merge.kernels import limit_heap_fragmentation

    if tuned:
        limit_heap_fragmentation()

    start_rss = peak_rss()
    base = LazyStateDict(folder / "base.safetensors")
    size = sum(base[k].numel() * 4 for k in base)
    start = time.perf_counter()
    merger = Merger(base, {e: LazyStateDict(folder / f"{e}.safetensors") for e in EXPERTS})
    # slerp needs one expert (the same kernel as linear); the subspace caches are outside the budget
    methods = [m for m in methods if m != "slerp" and m not in SUBSPACE]
    merger.prepare(methods)
    setup = time.perf_counter() - start
    out = {k: torch.empty_like(t) for k, t in merger.base.items()}
    for m in methods:
        merger.merge(m, per_k(METHODS[m]), out=out)
    merger.random = "keyed"  # as the search's workers merge: the fused dare kernels' memory counts too
    for m in methods:  # della's keyed ranks are a cache the plan counts per method, as the subspace ones
        if m in RANDOM and not m.startswith("della"):
            merger.merge(m, per_k(METHODS[m]), out=out)
    rss = peak_rss()
    return {
        "model_bytes": size,
        "peak_rss": rss,
        "import_rss": start_rss,
        "merger_bytes": merger.nbytes(),
        "setup_s": setup,
        "k": len(EXPERTS),
    }


def fused_baseline(base, deltas, out, w) -> None:
    for name, b in base.items():
        torch.add(b, deltas[0][name], alpha=w[0], out=out[name])
        for d, wi in zip(deltas[1:], w[1:], strict=True):
            out[name].add_(d[name], alpha=wi)


def run_speed(folder: Path, methods: list[str], mergekit: bool, repeat: int) -> dict:
    from safetensors.torch import load_file

    from evomerge.merge import Merger

    sds = {name: load_file(str(folder / f"{name}.safetensors")) for name in ["base", *EXPERTS]}
    base = sds["base"]
    rows: dict[str, dict] = {}
    subspace = [m for m in methods if m in SUBSPACE]
    methods = [m for m in methods if m not in SUBSPACE]
    start = time.perf_counter()
    merger = Merger(base, {e: sds[e] for e in EXPERTS}, seed=0)
    construct = time.perf_counter() - start
    start = time.perf_counter()
    merger.prepare(methods)
    prepare = time.perf_counter() - start
    slerp_merger = Merger(base, {"a": sds["a"]}, seed=0) if "slerp" in methods else None
    keyed = Merger.__new__(Merger)  # the same inputs and caches, drawing from keyed streams
    keyed.__dict__.update(merger.__dict__)
    keyed.random = "keyed"
    out = {k: torch.empty_like(t) for k, t in base.items()}

    deltas = [{k: sds[e][k] - base[k] for k in base} for e in EXPERTS]

    def fused_run(deltas=deltas):
        fused_baseline(base, deltas, out, per_k({"weight": [0.6, 0.4]})["weight"])

    fused_run()  # first touch of the output pages
    fused = timed(fused_run, repeat)
    del deltas, fused_run

    if mergekit:
        from mergekit.merge_methods.api import merge_state_dicts as mk_merge
    for m in methods:
        params = per_k(METHODS[m])
        mer = slerp_merger if m == "slerp" else merger
        experts = mer.experts
        merger_out = out

        def ours(mer=mer, params=params, merger_out=merger_out, m=m):
            return mer.merge(m, params, out=merger_out)

        ours()  # first use of a tensor's statistics not built by prepare
        start = time.perf_counter()
        ours()
        ev = timed(ours, repeat, time.perf_counter() - start)
        row = {"evomerge_s": ev}
        if mergekit:
            mk_params = {
                k: (dict(zip(experts, v, strict=True)) if isinstance(v, list) else v)
                for k, v in params.items()
            }
            models = {"base": base, **{e: sds[e] for e in experts}}
            if m == "linear":
                models = {e: sds[e] for e in experts}

            def mergekit_merge(models=models, m=m, mk_params=mk_params):
                torch.manual_seed(0)
                return mk_merge(models, m, base=None if m == "linear" else "base", parameters=mk_params)

            start = time.perf_counter()
            theirs = mergekit_merge()
            # best of ``repeat`` as ours, for merges under 10 s (the ones a speedup is claimed against)
            row["mergekit_s"] = timed(mergekit_merge, repeat, time.perf_counter() - start, once_over=10.0)
            ref = ours()
            row["max_abs_diff"] = max(float((ref[k] - t).abs().max()) for k, t in theirs.items())
            row["n_diff"] = sum(int(((ref[k] - t).abs() > 1e-6).sum()) for k, t in theirs.items())
            del theirs
        rows[m] = row
        print(json.dumps({m: row}), file=sys.stderr, flush=True)
        if m in RANDOM:

            def ours_keyed(params=params, m=m):
                return keyed.merge(m, params, out=out)

            ours_keyed()  # compiles the fused kernels (once per process)
            start = time.perf_counter()
            ours_keyed()
            rows[f"{m} (keyed)"] = {"evomerge_s": timed(ours_keyed, repeat, time.perf_counter() - start)}
            if mergekit:
                rows[f"{m} (keyed)"]["mergekit_s"] = row["mergekit_s"]
    return {
        "rows": rows,
        "subspace": run_subspace(merger, sds, subspace, out, repeat),
        "repeat": repeat,
        "fused_s": fused,
        "construct_s": construct,
        "prepare_s": prepare,
        "model_bytes": model_bytes(base),
    }


def fusion_bench_merges() -> dict[str, Callable[..., dict[str, torch.Tensor]]]:
    """FusionBench's functions for the same merges as ``SUBSPACE`` (tsv, iso_c, iso_cts, magmax), each
    ``fn(base, experts, deltas, params) -> merged weights``; {} where fusion-bench is not importable."""
    try:
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
        from fusion_bench.method.magmax.magmax import magmax_merge
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
            compute_and_sum_svd_mem_reduction,
        )
    except ImportError:
        return {}

    def added(base, merged, lam):
        return {k: base[k] + lam * merged[k] for k in base}

    class Flat(torch.nn.Module):  # magmax_merge takes modules: the same tensors, not copied
        def __init__(self, sd: Mapping[str, torch.Tensor]) -> None:
            super().__init__()
            for i, t in enumerate(sd.values()):
                self.register_parameter(f"p{i}", torch.nn.Parameter(t, requires_grad=False))

    def magmax(base, experts, deltas, p):
        merged = magmax_merge(Flat(base), [Flat(e) for e in experts], p["lambda"], inplace=False)
        return dict(zip(base, merged.state_dict().values(), strict=True))

    return {
        "tsv": lambda base, experts, deltas, p: added(
            base, compute_and_sum_svd_mem_reduction(deltas, accelerator="cpu"), p["lambda"]
        ),
        "iso_c": lambda base, experts, deltas, p: added(base, iso_c(deltas, accelerator="cpu"), p["lambda"]),
        "iso_cts": lambda base, experts, deltas, p: added(
            base, iso_cts(deltas, p["common_space_fraction"], accelerator="cpu"), p["lambda"]
        ),
        "magmax": magmax,
    }


def run_subspace(merger, sds: dict, methods: list[str], out: dict, repeat: int) -> dict[str, dict]:
    """Each subspace method from an empty cache (one method's factors held at a time): prep_s, the
    one-time preparation (prepare + first merge - one cached merge); evomerge_s, a cached merge (best
    of ``repeat``); and where FusionBench has it, fusion_bench_s (one call) and the largest difference."""
    base = sds["base"]
    experts = [sds[e] for e in EXPERTS]
    fusion = fusion_bench_merges()
    deltas = [{k: e[k] - base[k] for k in base} for e in experts] if fusion else []
    rows: dict[str, dict] = {}
    for m in methods:
        params = per_k(SUBSPACE[m])
        for cache in merger.cache.values():  # the mergekit methods' sketches included: they are done
            cache.clear()

        def ours(params=params, m=m):
            return merger.merge(m, params, out=out)

        start = time.perf_counter()
        merger.prepare([m])
        ours()
        first = time.perf_counter() - start
        row = {"evomerge_s": timed(ours, repeat)}
        row["prep_s"] = max(0.0, first - row["evomerge_s"])
        if m in fusion:
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per tensor
                    start = time.perf_counter()
                    theirs = fusion[m](base, experts, deltas, params)
                    row["fusion_bench_s"] = time.perf_counter() - start
            except Exception as e:  # FusionBench's own failure is a result too
                row["fusion_bench_error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            else:
                ref = ours()
                row["max_abs_diff"] = max(float((ref[k] - t).abs().max()) for k, t in theirs.items())
                del theirs
        rows[m] = row
        print(json.dumps({m: row}), file=sys.stderr, flush=True)
        if m in RANK_MOVED:
            settings = [params, {**params, **RANK_MOVED[m]}]

            def moved(settings=settings, m=m):
                settings.reverse()
                return merger.merge(m, settings[0], out=out)

            rows[f"{m} (rank moved)"] = {"evomerge_s": timed(moved, repeat)}
    for cache in merger.cache.values():
        cache.clear()
    return rows


def table(speed: dict, rss: dict | None, threads: int, quick: bool = False, isa: str = "native") -> str:
    from evomerge.machine import cpu_description

    fused = speed["fused_s"]
    shape = "a tiny shape (--quick: a functional check, not a measurement)" if quick else "SmolLM2-135M shape"
    flags = (" --quick" if quick else "") + (f" --isa {isa}" if isa != "native" else "")
    flags += f" --experts {len(EXPERTS)}" if len(EXPERTS) != 2 else ""
    used = "its own" if isa == "native" else f"{isa.upper()} forced (eager dispatch and Inductor's vectors)"
    lines = [
        f"Reproduce: `python experiments/benchmarks/merge_speed.py --threads {threads}{flags}`",
        "",
        f"{cpu_description()}, vector instructions: {used}.",
        f"torch {torch.__version__}, {threads} thread(s), {os.cpu_count()} CPU(s); base + {len(EXPERTS)} experts, "
        f"{shape}, float32 ({speed['model_bytes'] / 2**20:.1f} MiB per model).",
        f"evomerge one-time setup: Merger() {speed['construct_s']:.2f} s + prepare() {speed['prepare_s']:.2f} s; "
        f"fused task-arithmetic baseline {fused:.3f} s.",
        "",
        f"Times are the best of {speed['repeat']} run(s): one run where evomerge took over 5 s, "
        "or mergekit over 10 s.",
        "",
        "| method | mergekit s | evomerge s | speedup | evomerge / fused | max abs diff | elements > 1e-6 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, r in speed["rows"].items():
        mk = r.get("mergekit_s")
        mk_s = f"{mk:.2f}" if mk is not None else "-"
        speedup = f"{mk / r['evomerge_s']:.0f}x" if mk is not None else "-"
        diff = (
            f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ("other stream" if "keyed" in m else "-")
        )
        n_diff = str(r["n_diff"]) if "n_diff" in r else "-"
        lines.append(
            f"| {m} | {mk_s} | {r['evomerge_s']:.3f} | {speedup} | {r['evomerge_s'] / fused:.2f} | {diff} "
            f"| {n_diff} |"
        )
    if speed["subspace"]:
        lines += [
            "",
            "Subspace methods: one-time preparation from an empty cache, then a cached merge (best of "
            f"{speed['repeat']}); FusionBench's function once per merge (it keeps nothing between calls). Target: a cached "
            "tsv/iso_c merge within 10x of the fused floor and at least 10x faster than FusionBench.",
            "",
            "| method | prep s | per-merge s | per-merge / fused | FusionBench per-call s | speedup | max abs diff |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for m, r in speed["subspace"].items():
            fb = r.get("fusion_bench_s")
            fb_s, speedup = (f"{fb:.2f}", f"{fb / r['evomerge_s']:.0f}x") if fb is not None else ("-", "-")
            if "fusion_bench_error" in r:
                fb_s = f"failed ({r['fusion_bench_error']})"
            diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
            prep = f"{r['prep_s']:.2f}" if "prep_s" in r else "-"
            lines.append(
                f"| {m} | {prep} | {r['evomerge_s']:.3f} | {r['evomerge_s'] / fused:.1f} | {fb_s} "
                f"| {speedup} | {diff} |"
            )
    if rss is not None:
        size = rss["model_bytes"]
        lines += [
            "",
            f"evomerge-only process (K={rss['k']}, lazy safetensors inputs, every method into one preallocated "
            f"model): peak RSS {rss['peak_rss'] / 2**20:.0f} MiB = {rss['peak_rss'] / size:.2f} x model size "
            f"(budget K + 3 = {rss['k'] + 3}); after imports {rss['import_rss'] / 2**20:.0f} MiB; Merger holds "
            f"{rss['merger_bytes'] / 2**20:.0f} MiB = {rss['merger_bytes'] / size:.2f} x; setup {rss['setup_s']:.1f} s.",
            "As a search worker, the process first calls evomerge.merge.kernels.limit_heap_fragmentation(); "
            f"without it peak RSS is {rss['untuned_peak_rss'] / 2**20:.0f} MiB = "
            f"{rss['untuned_peak_rss'] / size:.2f} x model size.",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-mergekit", action="store_true", help="time evomerge and the fused loop only")
    ap.add_argument("--no-rss", action="store_true", help="skip the evomerge-only memory run")
    ap.add_argument("--dir", type=Path, help="reuse (or create) the model files here (one shape per folder)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a tiny shape, each merge once: a functional check, not a measurement",
    )
    ap.add_argument(
        "--isa",
        choices=["native", "avx2"],
        default="native",
        help="avx2: run as an AVX2-only CPU would (eager dispatch and compiled kernels without AVX-512)",
    )
    ap.add_argument(
        "--experts", type=int, choices=[2, 3], default=2, help="K: experts merged (3 skips nuslerp and slerp)"
    )
    ap.add_argument("--mode", choices=["all", "rss"], default="all", help=argparse.SUPPRESS)
    ap.add_argument("--untuned", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.repeat = 1
    if args.isa != "native":
        # torch reads ATEN_CPU_CAPABILITY when it loads: run again with it set
        if os.environ.get("ATEN_CPU_CAPABILITY") != args.isa:
            os.execve(
                sys.executable, [sys.executable, *sys.argv], {**os.environ, "ATEN_CPU_CAPABILITY": args.isa}
            )
        import torch._inductor.config as inductor

        inductor.cpp.simdlen = 256
    torch.set_num_threads(args.threads)
    EXPERTS[:] = ["a", "b", "c"][: args.experts]
    if args.experts > 2:
        args.methods = [m for m in args.methods if m not in TWO_ONLY]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if args.mode == "rss":
            print(json.dumps(run_rss(folder, args.methods, tuned=not args.untuned)))
            return
        if not all((folder / f"{n}.safetensors").exists() for n in ["base", *EXPERTS]):
            build_models(folder, args.quick)
        rss = None
        if not args.no_rss:
            cmd = [
                sys.executable,
                __file__,
                "--mode",
                "rss",
                "--dir",
                str(folder),
                "--threads",
                str(args.threads),
                "--experts",
                str(args.experts),
            ]
            cmd += ["--methods", *args.methods]
            rss = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            rss["untuned_peak_rss"] = json.loads(
                subprocess.run([*cmd, "--untuned"], check=True, capture_output=True, text=True).stdout
            )["peak_rss"]
        speed = run_speed(folder, args.methods, not args.no_mergekit, args.repeat)
        print(table(speed, rss, args.threads, args.quick, args.isa))


if __name__ == "__main__":
    main()
