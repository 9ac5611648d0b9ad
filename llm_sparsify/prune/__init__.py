"""Pruning methods: plain functions (weight, statistics, pattern) -> pruned weight, one module each.

The engine only needs to know which statistic of a Linear's inputs a method reads.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from llm_sparsify.prune.magnitude import prune_magnitude
from llm_sparsify.prune.masks import Pattern
from llm_sparsify.prune.sparsegpt import prune_sparsegpt
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
