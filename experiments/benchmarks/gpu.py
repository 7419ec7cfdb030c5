"""GPU benchmark: the merge engine on one GPU against the CPU, the memory-bandwidth floor and the plan.

Reproduce (one GPU, no network, a few minutes on an H200):

    python experiments/benchmarks/gpu.py

The same code on a CPU, with shapes shrunk (a couple of minutes):

    python experiments/benchmarks/gpu.py --device cpu --small

Models are random-init transformers models built from configs on the device in bfloat16: a Llama of
~0.8B parameters (hidden 2048, 16 layers, intermediate 5632, 32 heads, 4 kv heads, vocab 32000) and a
Mistral-7B shape (hidden 4096, 32 layers, intermediate 14336, 32 heads, 8 kv heads, vocab 32000).
Experts are the base plus small noise (std 0.002), generated tensor by tensor on the device when the
Merger reads them, so no expert is ever held whole. Merges use the search's settings: keyed random
masks (the fused dare kernels), the bfloat16 compute dtype the workers use on GPUs, written in place
into the model. Printed:

- seconds per merge (median of a few after a warm-up) of linear, task_arithmetic, ties, dare_ties,
  dare_linear, breadcrumbs_ties, della, della_linear, sce and magmax (the fused kernels: keyed dare
  with its kept-l1 tables, della with its cached ranks, the magnitude bands of ties and breadcrumbs,
  sce's energies and merge, magmax) with K = 2 and 3 experts, resident and streamed, and the memory-bandwidth floor: a task-arithmetic
  pass that reads the base and the K task vectors once and writes the output once (``torch.addmm``
  per tensor into a preallocated output); GB/s counts those (K + 2) model sizes per merge;
- the same merges on the CPU (float32 on both devices, K = 3) and the largest difference between the
  GPU's and the CPU's weights per method;
- peak device memory (``torch.cuda.max_memory_allocated`` from just before the Merger is built, the
  model being the output) during setup (Merger + prepare) and during merges, against the memory
  plan's prediction (``evomerge.plan.worker_memory``) and what ``Merger.memory()`` reports;
- the forward throughput of the merged ~0.8B model on a fixed batch (the fitness's cost per item);
- the 7B shape with K = 3, resident (where it fits) and streamed from pinned host memory.

Imports torch, transformers, numpy and evomerge.merge / evomerge.plan only (no pydantic, yaml, ray,
pymoo or lm-eval). ``--json PATH`` also writes every number.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from evomerge.merge import Merger
from evomerge.merge.kernels import limit_heap_fragmentation
from evomerge.plan import merge_work, worker_memory

GIB = 2**30
METHODS: dict[str, dict[str, Any]] = {  # per-model values for 3 experts, cut to K
    "linear": {"weight": [0.5, 0.3, 0.2]},
    "task_arithmetic": {"weight": [0.5, 0.3, 0.2]},
    "ties": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.6, 0.4]},
    "dare_ties": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.6, 0.4]},
    "dare_linear": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.6, 0.4]},
    "breadcrumbs_ties": {"weight": [0.5, 0.3, 0.2], "density": [0.8, 0.9, 0.7], "gamma": [0.01, 0.01, 0.01]},
    "della": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.6, 0.4], "epsilon": [0.1, 0.1, 0.1]},
    "della_linear": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.6, 0.4], "epsilon": [0.1, 0.1, 0.1]},
    "sce": {"select_topk": 0.3},
    "magmax": {"lambda": 0.8},
}
FLOOR_WEIGHTS = [0.5, 0.3, 0.2]
NOISE = 0.002
SEED = 0
START = time.perf_counter()
DEADLINE = [float("inf")]  # perf_counter time past which no further merge is timed (--budget)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {msg}", file=sys.stderr, flush=True)


# --- models ---------------------------------------------------------------------------------------------


def configs(small: bool) -> dict[str, Any]:
    from transformers import LlamaConfig, MistralConfig

    if small:
        one = {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 704, "vocab_size": 4000}
        seven = {"hidden_size": 512, "num_hidden_layers": 4, "intermediate_size": 1792, "vocab_size": 4000}
        heads = {"num_attention_heads": 8, "num_key_value_heads": 2}
        seven_heads = heads
    else:
        one = {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 5632, "vocab_size": 32000}
        seven = {
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "intermediate_size": 14336,
            "vocab_size": 32000,
        }
        heads = {"num_attention_heads": 32, "num_key_value_heads": 4}
        seven_heads = {"num_attention_heads": 32, "num_key_value_heads": 8}
    common = {"max_position_embeddings": 4096, "tie_word_embeddings": False}
    return {
        "llama-1b": LlamaConfig(**one, **heads, **common),
        "mistral-7b": MistralConfig(**seven, **seven_heads, **common),
    }


def build_model(cfg: Any, device: torch.device) -> torch.nn.Module:
    """A random-init model made in bfloat16 directly on ``device``."""
    from transformers import AutoModelForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(SEED)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(torch.bfloat16).eval()


class Perturbed(Mapping[str, torch.Tensor]):
    """An expert: each tensor of ``base`` plus Gaussian noise, made on the tensor's device when read
    (the same values at every read: the noise is seeded by expert and tensor name)."""

    def __init__(self, base: Mapping[str, torch.Tensor], index: int) -> None:
        self.base = base
        self.index = index

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.base[name]
        if not t.is_floating_point():
            return t
        g = torch.Generator(device=t.device).manual_seed(1000 * self.index + zlib.crc32(name.encode()))
        noise = torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32)
        return noise.mul_(NOISE).add_(t).to(t.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def experts(base: Mapping[str, torch.Tensor], k: int) -> dict[str, Perturbed]:
    return {f"e{i}": Perturbed(base, i + 1) for i in range(k)}


def sizes(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[int, int, int]:
    """(floating elements counting tied tensors once, model bytes, largest tensor bytes) in ``dtype``."""
    seen, elements, largest = set(), 0, 0
    for t in sd.values():
        if not t.is_floating_point() or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        elements += t.numel()
        largest = max(largest, t.numel())
    b = torch.empty((), dtype=dtype).element_size()
    return elements, elements * b, largest * b


# --- measuring ------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median wall time of ``reps`` runs after one warm-up run (compiles, first-use statistics)."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def floor_pass(merger: Merger, out: Mapping[str, torch.Tensor]) -> Callable[[], None]:
    """out = base + sum_i w_i delta_i per tensor in one pass (addmm of a 1 x K by K x n product onto
    the base row): the least memory traffic a merge can have, (K + 2) model sizes."""
    k = len(merger.experts)
    w = {}
    pairs = []
    for name, d in merger.deltas.items():
        dev = d.device
        if dev not in w:
            w[dev] = torch.tensor(FLOOR_WEIGHTS[:k], dtype=merger.dtype, device=dev).view(1, k)
        pairs.append((merger.base[name].view(1, -1), w[dev], d.view(k, -1), out[name].view(1, -1)))

    def run() -> None:
        with torch.no_grad():
            for b, wk, d, o in pairs:
                torch.addmm(b, wk, d, out=o)

    return run


def params(method: str, k: int) -> dict[str, Any]:
    return {n: v[:k] if isinstance(v, list) else v for n, v in METHODS[method].items()}


# --- one placement --------------------------------------------------------------------------------------


def planned(placement: str, model_bytes: int, largest: int, k: int, dtype: torch.dtype, where: torch.device):
    """The memory plan of a worker's merges (no fitness activations): the weights where the placement
    puts them, the ties sketches' one-time sort or a merge's scratch on the device."""
    n = largest // torch.empty((), dtype=dtype).element_size()
    scratch, transient = merge_work(n, k, where.type == "cuda", sketches=True)
    return worker_memory(
        placement,
        model_bytes=model_bytes,
        largest_bytes=largest,
        experts=k,
        scratch_bytes=scratch,
        transient_bytes=transient,
    )


def run_placement(
    name: str,
    model: torch.nn.Module,
    device: torch.device,
    k: int,
    *,
    dtype: torch.dtype,
    streamed: bool = False,
    merge_device: torch.device | None = None,
    reps: int = 3,
    collect: Callable[[str, Mapping[str, torch.Tensor]], None] | None = None,
    floor: bool = True,
) -> dict[str, Any]:
    """Build a Merger over ``model``'s weights and K perturbed experts, prepare it, time every method
    into the model (or, for another dtype or device, a preallocated output) and measure memory.
    ``collect(method, weights)`` sees each method's last merge."""
    where = merge_device or device
    sd = model.state_dict()
    elements, model_bytes, largest = sizes(sd, dtype)
    placement = "streamed" if streamed else "device"
    plan = planned(placement, model_bytes, largest, k, dtype, where)
    row: dict[str, Any] = {
        "name": name,
        "k": k,
        "device": str(where),
        "dtype": str(dtype).removeprefix("torch."),
        "placement": placement,
        "elements": elements,
        "model_bytes": model_bytes,
        "largest_bytes": largest,
        "plan_device": plan.device,
        "plan_host": plan.host,
        "seconds": {},
    }
    log(f"{name}: K={k} {row['dtype']} {placement} on {where}: building the Merger")
    before = reset_peak(where)
    start = time.perf_counter()
    merger = Merger(
        sd,
        experts(sd, k),
        dtype,
        seed=SEED,
        random="keyed",
        device=merge_device,
        streamed=streamed,
    )
    sync(where)
    row["construct_s"] = time.perf_counter() - start
    start = time.perf_counter()
    merger.prepare(list(METHODS))
    sync(where)
    row["prepare_s"] = time.perf_counter() - start
    row["before_bytes"] = before
    row["setup_peak"] = peak(where)
    direct = merge_device is None and dtype == model.dtype
    out = sd if direct else {n: torch.empty_like(t) for n, t in merger.base.items()}
    row["out_bytes"] = sizes(out, out[next(iter(merger.deltas))].dtype)[1]
    reset_peak(where)
    for method in METHODS:
        if time.perf_counter() > DEADLINE[0]:
            log(f"{name}: K={k} {placement}: {method} skipped (past the budget)")
            continue
        log(f"{name}: K={k} {placement}: {method}")
        run = merger.merge
        row["seconds"][method] = timed(
            lambda m=method, run=run, o=out: run(m, params(m, k), out=o), where, reps
        )
        del run
        if collect is not None:
            collect(method, out)
    row["merge_peak"] = peak(where)
    mem = merger.memory()
    row["merger_device"], row["merger_host"], row["merger_parts"] = mem.device, mem.host, mem.parts
    if floor and not streamed:
        row["seconds"]["floor"] = timed(floor_pass(merger, out), where, reps)
    del merger, out
    free_memory(where)
    return row


def compare(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> tuple[float, int, int]:
    """(max |a - b|, elements that differ, elements) over the floating tensors."""
    worst, differ, total = 0.0, 0, 0
    for name, t in a.items():
        if not t.is_floating_point():
            continue
        u = b[name].to(t.device)
        diff = (t.float() - u.float()).abs()
        worst = max(worst, float(diff.max()))
        differ += int((diff > 0).sum())
        total += t.numel()
    return worst, differ, total


def throughput(model: torch.nn.Module, device: torch.device, batch: int, tokens: int, reps: int) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0)).to(device)

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    seconds = timed(forward, device, reps)
    return {"batch": batch, "tokens": tokens, "seconds": seconds, "tokens_per_s": batch * tokens / seconds}


# --- report ---------------------------------------------------------------------------------------------


def gib(n: float | None) -> str:
    """Bytes as GiB (MiB below one GiB)."""
    if n is None:
        return "n/a"
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.1f} MiB"


def secs(row: dict, key: str) -> str:
    s = row["seconds"].get(key)
    if s is None:
        return "n/a"
    rate = (row["k"] + 2) * row["model_bytes"] / s / 1e9
    return f"{s:.3f} ({rate:.0f} GB/s)" if s < 10 else f"{s:.1f} ({rate:.1f} GB/s)"


def report(rows: list[dict], diffs: dict, fwd: dict | None, notes: list[str], env: dict) -> str:
    lines = [
        f"Command: `{env['command']}`",
        "",
        f"{env['device_name']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"Python {env['python']}, {env['threads']} CPU threads",
        "",
        "Seconds per merge, median after a warm-up (GB/s: (K + 2) model sizes moved per merge); floor: one "
        "addmm pass per tensor (task arithmetic without any method overhead).",
        "",
        "| model | K | device | dtype | placement | " + " | ".join(METHODS) + " | floor |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in METHODS) + " | --- |",
    ]
    for r in rows:
        cells = [secs(r, m) for m in (*METHODS, "floor")]
        lines.append(
            f"| {r['name']} | {r['k']} | {r['device']} | {r['dtype']} | {r['placement']} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "Memory. Measured: torch.cuda.max_memory_allocated, counted from just before the Merger is "
        "built (the model, the merge's output, already allocated: 'before'), during setup (Merger + "
        "prepare) and during the merges. Plan: evomerge.plan.worker_memory(placement, model_bytes, "
        "largest_bytes, experts) for the compute dtype, no activations. Merger: Merger.memory() after "
        "the merges (device / host); output: the weights merged into (the model, or a preallocated copy).",
        "",
        "| model | params | K | device | dtype | placement | setup s (build + prepare) | before | peak setup "
        "| peak merges | plan device | plan host | Merger device | Merger host | output |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        n = r["elements"]
        count = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"
        lines.append(
            f"| {r['name']} | {count} | {r['k']} | {r['device']} | {r['dtype']} | {r['placement']} | "
            f"{r['construct_s']:.1f} + {r['prepare_s']:.1f} | {gib(r['before_bytes'] or None)} | "
            f"{gib(r['setup_peak'])} | {gib(r['merge_peak'])} | {gib(r['plan_device'])} | {gib(r['plan_host'])} | "
            f"{gib(r['merger_device'])} | {gib(r['merger_host'])} | {gib(r['out_bytes'])} |"
        )
    if diffs:
        lines += [
            "",
            "The same merges on the merge device and on the CPU (float32 on both): largest |difference| of "
            "the weights and the share of elements that differ.",
            "",
            "| method | max abs difference | elements differing |",
            "| --- | --- | --- |",
        ]
        for method, (worst, differ, total) in diffs.items():
            lines.append(f"| {method} | {worst:.3g} | {differ} of {total} ({differ / max(total, 1):.2e}) |")
    if fwd:
        lines += [
            "",
            f"Forward pass of the merged {fwd['model']} ({fwd['dtype']}, batch {fwd['batch']} x {fwd['tokens']} "
            f"tokens, use_cache=False): {fwd['seconds']:.3f} s per batch, {fwd['tokens_per_s']:.0f} tokens/s.",
        ]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines)


# --- the run --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--small", action="store_true", help="shrunk shapes (for a CPU run)")
    ap.add_argument("--skip-7b", action="store_true", help="skip the 7B shape")
    ap.add_argument("--skip-cpu", action="store_true", help="skip the CPU merges and the comparison")
    ap.add_argument("--reps", type=int, default=3, help="timed merges per method after the warm-up")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--budget", type=float, default=450, help="seconds: later sections are skipped past it")
    ap.add_argument("--json", type=Path, help="also write every number here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --small", file=sys.stderr)
        return 2
    DEADLINE[0] = START + args.budget
    limit_heap_fragmentation()  # as a worker does
    import transformers

    given = sys.argv[1:] if argv is None else argv
    env = {
        "command": " ".join(["python experiments/benchmarks/gpu.py", *given]),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "CPU",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    cfgs = configs(args.small)
    rows: list[dict] = []
    diffs: dict[str, tuple[float, int, int]] = {}
    notes: list[str] = []
    fwd: dict | None = None
    bf16 = torch.bfloat16

    def guarded(label: str, fn: Callable[[], Any], need: float = 0.0) -> Any:
        """Run one section; record its failure (out of memory, say) or skip it past the budget."""
        left = args.budget - (time.perf_counter() - START)
        if left < need:
            notes.append(f"{label}: skipped ({left:.0f} s of the {args.budget:.0f} s budget left)")
            log(notes[-1])
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a benchmark reports what failed and goes on
            notes.append(f"{label}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            log(notes[-1])
            free_memory(device)
            return None

    # 1. the ~1B model on the device: K = 2 and 3, resident and streamed, then its forward throughput
    log("building llama-1b")
    model = build_model(cfgs["llama-1b"], device)
    for k in (2, 3):
        row = guarded(
            f"llama-1b K={k}",
            lambda k=k: run_placement("llama-1b", model, device, k, dtype=bf16, reps=args.reps),
        )
        if row:
            rows.append(row)
    row = guarded(
        "llama-1b K=3 streamed",
        lambda: run_placement("llama-1b", model, device, 3, dtype=bf16, streamed=True, reps=args.reps),
    )
    if row:
        rows.append(row)

    def forward() -> dict:
        batch, tokens = (4, 128) if args.small else (args.batch, args.tokens)
        out = throughput(model, device, batch, tokens, reps=3)
        return {"model": "llama-1b", "dtype": "bfloat16", **out}

    fwd = guarded("forward throughput", forward)

    del model
    free_memory(device)

    # 2. the 7B shape, K = 3: resident where it fits, and streamed from pinned host memory
    if not args.skip_7b:
        model = guarded(
            "building mistral-7b",
            lambda: build_model(cfgs["mistral-7b"], device),
            need=60 if not args.small else 0,
        )
        if model is not None:
            sd = model.state_dict()
            _, m_bytes, l_bytes = sizes(sd, bf16)
            for streamed in (False, True):
                placement = "streamed" if streamed else "device"
                need = planned(placement, m_bytes, l_bytes, 3, bf16, device).device
                if device.type == "cuda":
                    free = torch.cuda.mem_get_info(device)[0] + m_bytes  # the model is counted in need
                    if need > free:
                        notes.append(
                            f"mistral-7b K=3 {placement}: the plan needs {gib(need)} GiB, "
                            f"{gib(free)} GiB free: tried anyway"
                        )
                row = guarded(
                    f"mistral-7b K=3 {placement}",
                    lambda s=streamed: run_placement(
                        "mistral-7b", model, device, 3, dtype=bf16, streamed=s, reps=max(1, args.reps - 1)
                    ),
                    need=45 if not args.small else 0,
                )
                if row:
                    rows.append(row)
            del sd, model
            free_memory(device)

    # 3. float32 merges on the device and on the CPU: the same weights within float32 rounding
    def against_cpu() -> None:
        on_device: dict[str, dict[str, torch.Tensor]] = {}

        def keep(method: str, weights: Mapping[str, torch.Tensor]) -> None:
            on_device[method] = {n: t.to("cpu", copy=True) for n, t in weights.items()}

        def check(method: str, weights: Mapping[str, torch.Tensor]) -> None:
            diffs[method] = compare(on_device.pop(method), weights)

        rows.append(
            run_placement("llama-1b", model, device, 3, dtype=torch.float32, reps=args.reps, collect=keep)
        )
        cpu = torch.device("cpu")
        rows.append(
            run_placement(
                "llama-1b",
                model,
                device,
                3,
                dtype=torch.float32,
                merge_device=cpu,
                reps=1,
                collect=check,
                floor=False,
            )
        )

    if not args.skip_cpu:
        model = guarded("rebuilding llama-1b", lambda: build_model(cfgs["llama-1b"], device))
        if model is not None:
            guarded("float32 device vs CPU", against_cpu, need=120 if not args.small else 0)
            del model
            free_memory(device)

    text = report(rows, diffs, fwd, notes, env)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"env": env, "rows": rows, "diffs": diffs, "forward": fwd, "notes": notes},
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
