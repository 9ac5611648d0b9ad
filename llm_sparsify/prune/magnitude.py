"""Magnitude pruning: remove the weights of smallest |W|. Needs no calibration data.

`local` ranks within each weight matrix (as the Wanda paper's magnitude baseline); `global` ranks all
target matrices of the model together, so layers with small weights lose more.
"""

from __future__ import annotations

from torch import Tensor

from llm_sparsify.prune.masks import Pattern, select_mask


def prune_magnitude(weight: Tensor, pattern: Pattern) -> Tensor:
    """Weight with the lowest-|W| entries of the matrix (or of each N:M group) set to zero."""
    mask = select_mask(weight.abs(), pattern, per_row=False)
    return weight.masked_fill(mask, 0)


def global_magnitude_threshold(weights: list[Tensor], sparsity: float, iterations: int = 64) -> float:
    """The |W| at or below which a `sparsity` share of all the given weights lies.

    Bisection on the count of weights below a candidate threshold: one pass over each matrix per
    step and no concatenated copy, so memory stays at one matrix even for a 70B model.
    """
    total = sum(w.numel() for w in weights)
    target = int(total * sparsity)
    low, high = 0.0, max(w.detach().abs().max().item() for w in weights)
    for _ in range(iterations):
        middle = (low + high) / 2
        below = sum(int((w.detach().abs() <= middle).sum()) for w in weights)
        if below >= target:
            high = middle
        else:
            low = middle
    return high


def prune_below(weight: Tensor, threshold: float) -> Tensor:
    """Weight with every entry of |W| <= threshold set to zero (global magnitude pruning)."""
    return weight.masked_fill(weight.abs() <= threshold, 0)
