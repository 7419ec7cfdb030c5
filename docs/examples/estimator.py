"""An IRT estimator: the subset mean shrunk toward 1/2 (Laplace's rule of succession)."""

import numpy as np

from evomerge.irt import IrtParams, estimator


@estimator("laplace")
def estimate_laplace(params: IrtParams, idx: np.ndarray, y: np.ndarray) -> float:
    """laplace: (sum_j y_j + 1) / (n + 2) over the n answered items."""
    y = np.asarray(y, dtype=float)
    return float((y.sum() + 1) / (len(y) + 2))
