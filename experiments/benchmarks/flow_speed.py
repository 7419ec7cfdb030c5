"""Data-flow models: what a candidate of the data-flow space costs to build and run, against an ordinary
model of the same layers.

    python experiments/benchmarks/flow_speed.py [--threads 2] [--quick]

Inputs: SmolLM2-135M's shape (merge_speed.py's config: hidden 576, 30 layers, vocab 49152, tied
embeddings), random init, float32; a worker's own model (the merge) and one held expert's layers
(``evomerge.flow.hold_layers`` from a Merger of base + expert). The flow (``flow_steps``): 55 steps over
the two (the merge's 30 layers with a detour through the expert's layer 3, the expert's second half,
the merge's last third again), its transitions scaled, as the data-flow genes decode them.
Timed in one process, best of ``--repeat``:

- ``flow_model``: the candidate's model from references to the held layers (what a worker does per
  candidate), and the bytes of new parameters it allocates (none: every parameter is a source's);
- ``standalone``: the same model as an ordinary checkpoint-ready model, each layer copied (what
  ``export --format hf``, ``Run.load_model`` and ``best_model/`` write);
- a forward pass (batch 4 x 128 tokens) of each, and their largest logit difference.

``--quick`` runs the same steps on a tiny shape: a check that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import smollm2_config, timed  # noqa: E402

from evomerge.flow import flow_model, hold_layers, standalone  # noqa: E402
from evomerge.merge import Merger  # noqa: E402
from evomerge.recipe import FlowStep  # noqa: E402


def flow_steps(layers: int) -> list[FlowStep]:
    """1.5 passes: the merge's layers, then the expert's second half with scaled transitions, then the
    merge's last third again."""
    steps = [FlowStep("merge", i) for i in range(layers)]
    half, third = layers // 2, layers - max(1, layers // 3)
    steps += [FlowStep("a", half, 0.8)] + [FlowStep("a", i) for i in range(half + 1, layers)]
    steps += [FlowStep("merge", third, 1.2)] + [FlowStep("merge", i) for i in range(third + 1, layers)]
    if layers > 5:  # a detour through the expert's layer 3 early on
        steps[3], steps[4] = FlowStep("a", 3, 0.9), FlowStep("merge", 4, 1.1)
    return steps


def new_bytes(model: torch.nn.Module, known: set[int]) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.data_ptr() not in known)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = smollm2_config(args.quick)
    model = LlamaForCausalLM(config).eval()
    expert = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    expert["lm_head.weight"] = expert["model.embed_tokens.weight"]  # tied, as the base
    merger = Merger(model.state_dict(), {"a": expert})
    sources = {"merge": model.get_decoder().layers, **hold_layers(model, merger, ["a"], ["a"])}
    steps = flow_steps(config.num_hidden_layers)
    known = {p.data_ptr() for p in model.parameters()} | {p.data_ptr() for p in sources["a"].parameters()}

    build = timed(lambda: flow_model(model, sources, steps), args.repeat * 4)
    flow = flow_model(model, sources, steps)
    copy_s = timed(lambda: standalone(model, sources, steps), args.repeat)
    plain = standalone(model, sources, steps).eval()
    tokens = torch.randint(0, config.vocab_size, (4, 128 if not args.quick else 16))
    with torch.no_grad():
        flow_fwd = timed(lambda: flow(tokens), args.repeat)
        plain_fwd = timed(lambda: plain(tokens), args.repeat)
        diff = float((flow(tokens).logits - plain(tokens).logits).abs().max())
    size = sum(p.numel() * p.element_size() for p in plain.parameters())
    rows = [
        {
            "what": "flow_model (references)",
            "build s": build,
            "new parameter bytes": new_bytes(flow, known),
            "forward s": flow_fwd,
        },
        {
            "what": "standalone (copies)",
            "build s": copy_s,
            "new parameter bytes": new_bytes(plain, known),
            "forward s": plain_fwd,
        },
    ]
    shape = "tiny (--quick: not a measurement)" if args.quick else "SmolLM2-135M's"
    print(f"Command: `python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d')})\n")
    print(
        f"{shape} shape, float32, {args.threads} threads; a flow of {len(steps)} layers over the merge and "
        f"one held expert ({sum(s.scale != 1 for s in steps)} scaled transitions); forward: batch "
        f"{tokens.shape[0]} x {tokens.shape[1]} tokens; best of {args.repeat} ({args.repeat * 4} for the "
        f"build). The ordinary model of these layers has {size / 2**20:.0f} MiB of parameters; the largest "
        f"logit difference between the two is {diff:.2e}.\n"
    )
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
