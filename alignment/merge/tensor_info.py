"""What a merge knows of a tensor before reading it, shared by the HF and Orbax sources (`checkpoint_io`,
`orbax_io`), so neither imports the other."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]  # project layout; stacked tensors lead with [num_layers]
    dtype: np.dtype
    stacked: bool  # a 'layers/*' tensor, merged one layer slice at a time
