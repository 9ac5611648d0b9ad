"""Statistics of a Linear layer's inputs, accumulated over calibration tokens."""

from __future__ import annotations

import torch
from torch import Tensor


class InputStatistics:
    """Running sum of x xᵀ (SparseGPT) or of x² only (Wanda) over every token x seen by one input.

    Each batch's sum is computed in float32 and added to a float64 total. Float32 values are exact
    in float64, so the total hardly depends on the order batches arrive in: processes that each sum
    a share of the batches (torch.distributed) agree with one process that sums them all.
    Modules that read the same input share one accumulator.
    """

    def __init__(self, features: int, hessian: bool, device: torch.device | str) -> None:
        shape = (features, features) if hessian else (features,)
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sum += x.T @ x if self.sum.dim() == 2 else x.square().sum(0)

    def hessian(self) -> Tensor:
        """H = 2XXᵀ/n, the Hessian of the layer-wise reconstruction error ‖WX − ŴX‖²."""
        if self.sum.dim() != 2:
            raise ValueError("these statistics hold column norms only, not the Hessian")
        return (self.sum * (2 / max(self.tokens, 1))).float()

    def column_norms(self) -> Tensor:
        """‖X_j‖₂ of every input feature j over all tokens."""
        squares = self.sum.diagonal() if self.sum.dim() == 2 else self.sum
        return squares.sqrt().float()
