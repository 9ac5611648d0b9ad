"""Pruning methods: plain functions (weight, statistics, pattern) -> pruned weight, one module each.

The engine only needs to know which statistic of a Linear's inputs a method reads.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from llm_sparsify.prune.magnitude import prune_magnitude
from llm_sparsify.prune.masks import Pattern
from llm_sparsify.prune.sparsegpt import prune_sparsegpt, prune_sparsegpt_together
from llm_sparsify.prune.wanda import prune_wanda
from llm_sparsify.stats import InputStatistics

# method -> the statistic of the Linear's input it needs (None: no calibration data)
STATISTIC: dict[str, str | None] = {"magnitude": None, "wanda": "column_norms", "sparsegpt": "hessian"}


def prune_weight(
    method: str, weight: Tensor, stats: InputStatistics | None, pattern: Pattern, **options: Any
) -> Tensor:
    """Apply `method` to one weight matrix [out_features, in_features]."""
    if method == "magnitude":
        return prune_magnitude(weight, pattern)
    if method == "wanda":
        return prune_wanda(weight, stats.column_norms(), pattern)
    if method == "sparsegpt":
        return prune_sparsegpt(weight, stats.hessian(), pattern, **options)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(STATISTIC)}")


def prune_weights(
    method: str, weights: list[Tensor], stats: InputStatistics | None, pattern: Pattern, **options: Any
) -> list[Tensor]:
    """Apply `method` to weights that read the same input (q/k/v; gate/up), sharing what can be shared:
    SparseGPT factorizes their Hessian once and sweeps their stacked rows together."""
    if method == "sparsegpt":
        return prune_sparsegpt_together(weights, stats.hessian(), pattern, **options)
    return [prune_weight(method, weight, stats, pattern, **options) for weight in weights]
