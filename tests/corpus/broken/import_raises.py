"""A case file whose import raises: data precomputed at import time with mismatched shapes.

W1 is the seed's 6×5 and X holds 4 samples of 5 features as rows (4×5), so W1 @ X fails:
the product needs X as columns (5×4), or X @ W1.T. The harness reports one error naming this
file, and the other files still run. No EXPECTED can be read from a file that does not import.
"""
from __future__ import annotations

import torch
from torch import Tensor

from backprop_check import case

W1 = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
X = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
H0 = W1 @ X  # raises: (6×5) @ (4×5)


@case(params={"W1": W1}, data={"X": X})
def broken_import(W1: Tensor, X: Tensor) -> Tensor:
    return (W1 @ X.T).sum()
