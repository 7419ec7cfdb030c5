"""plugin_mean: an estimator registered from outside evomerge."""

from __future__ import annotations

import numpy as np

from evomerge.irt import IrtParams, estimator


@estimator("plugin_mean")
def plugin_mean(params: IrtParams, idx: np.ndarray, y: np.ndarray) -> float:
    """plugin_mean: (1/n) sum_j y_j over the subset."""
    return float(np.mean(y))
