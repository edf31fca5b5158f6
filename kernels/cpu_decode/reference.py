"""The oracle for `api.matmul`: float64 numpy of the bfloat16 values."""
from __future__ import annotations

import numpy as np


def matmul(x, w) -> np.ndarray:
    """x [M, K] @ w [K, N], both taken at their (bfloat16) values, in float64."""
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)
