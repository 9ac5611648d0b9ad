"""Magnitude pruning: remove the weights of smallest |W|. Needs no calibration data.

`local` ranks within each weight matrix (as the Wanda paper's magnitude baseline); `global` ranks all
target matrices of the model together, so layers with small weights lose more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from llm_sparsify.prune.masks import Pattern, select_mask


def prune_magnitude(weight: Tensor, pattern: Pattern) -> Tensor:
    """Weight with the lowest-|W| entries of the matrix (or of each N:M group) set to zero."""
    mask = select_mask(weight.abs(), pattern, per_row=False)
    return weight.masked_fill(mask, 0)


def global_magnitude_threshold(weights: Callable[[], Iterable[Tensor]], sparsity: float) -> float:
    """The k-th smallest |W| over all weights that `weights()` yields, k = `sparsity` share of them.

    Exact, in two passes over the weights and the memory of one matrix (so a 70B model can be read
    from disk layer by layer): a histogram of the top 16 bits of |W| as float32 (exponent and 7
    mantissa bits, which order non-negative floats like their values) finds the bucket holding the
    k-th value; the second pass gathers that bucket's values and ranks them.
    """
    histogram, total = torch.zeros(1 << 16, dtype=torch.long), 0
    for weight in weights():
        histogram += torch.bincount(_top_bits(weight), minlength=1 << 16).cpu()
        total += weight.numel()
    k = int(total * sparsity)
    if k == 0:
        return 0.0
    cumulative = histogram.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, k))  # first bucket whose cumulative count reaches k
    below = int(cumulative[bucket - 1]) if bucket else 0
    in_bucket = [_magnitudes(w)[_top_bits(w) == bucket].cpu() for w in weights()]
    return torch.cat(in_bucket).kthvalue(k - below).values.item()


def _magnitudes(weight: Tensor) -> Tensor:
    return weight.detach().abs().float().reshape(-1)


def _top_bits(weight: Tensor) -> Tensor:
    return _magnitudes(weight).view(torch.int32) >> 16


def prune_below(weight: Tensor, threshold: float) -> Tensor:
    """Weight with every entry of |W| <= threshold set to zero (global magnitude pruning)."""
    return weight.masked_fill(weight.abs() <= threshold, 0)
