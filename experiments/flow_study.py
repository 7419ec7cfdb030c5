"""Data-flow study (issue 19, part 5): on the tiny zoo, for the demo's budget and seeds, the best merge
found by searching the parameter space alone (per-layer-group task arithmetic, the demo's space), the
data flow alone (layer stacking over the base and the experts) and both in one genome (PS + DFS, as in
Sakana's paper); the test-split mean accuracy of each run's best model and its depth.

    python experiments/flow_study.py [--seeds 3] [--spaces ps,dfs,ps_dfs] [--out runs/flow_study]
        [--quick] [--report]

The harness is the method study's (``experiments/method_study.py``): each run is
``experiments/demo.yaml`` (GA, pop 16 x 8 generations, mean accuracy on the whole search split) with
its ``search_space:`` replaced by one of ``SPACES``, kept in ``--out/<space>-<seed>`` and resumed or
reused when the script runs again. The tiny zoo's models have 4 decoder layers; the data flow offers
2 x 4 slots (at most 8 layers) with a scale gene per slot in [0.5, 1.5].
"""

from __future__ import annotations

from typing import Any

from method_study import main

from evomerge.searchspace import flow_sources, load_space_config

EXPERTS = ["addition", "script", "reversal"]  # the demo's

SPACES: dict[str, dict[str, Any]] = {
    # the demo's own space: per-group task-arithmetic weights (2 layer groups + other)
    "ps": {"name": "per_layer"},
    # layer stacking alone: each of 2 x 4 slots takes the base's, an expert's or no layer
    "dfs": {"name": "data_flow"},
    # both: the slots offer the candidate's own merge's layers and the experts'
    "ps_dfs": {"name": "per_layer_flow"},
}


def describe(space: dict[str, Any], done: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = load_space_config(space)
    flow = cfg.data_flow
    words = ["per-group weights"] if cfg.parameter_space else []
    if flow is not None:
        words.append(f"data flow ({flow.repeats} x 4 slots of {', '.join(flow_sources(cfg, EXPERTS))})")
    return {
        "searches": " + ".join(words),
        "best depth per seed": " ".join(str(s.get("best_depth", 4)) for s in done),
    }


if __name__ == "__main__":
    main(SPACES, "flow_study", describe)
