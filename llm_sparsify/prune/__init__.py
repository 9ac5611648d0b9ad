"""Pruning methods: plain functions (weight, statistics, pattern) -> pruned weight, one module each.

The engine only needs to know which statistic of a Linear's inputs a method reads. Quantization, if a
recipe asks for it, follows the pruning (RTN; GPTQ with the mask fixed) or, for SparseGPT with GPTQ,
happens in the same sweep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from llm_sparsify.prune.fisher import prune_obd
from llm_sparsify.prune.magnitude import prune_magnitude
from llm_sparsify.prune.masks import Pattern
from llm_sparsify.prune.refit import update_kept
from llm_sparsify.prune.ria import ALPHA, prune_ria
from llm_sparsify.prune.sparsegpt import prune_sparsegpt, sparsegpt_sweep
from llm_sparsify.prune.wanda import prune_wanda
from llm_sparsify.quantize.grid import Grid, rtn
from llm_sparsify.stats import InputStatistics

if TYPE_CHECKING:
    from llm_sparsify.recipe import Quantization

# method -> the statistic it needs: of the Linear's input, or the Fisher diagonal of its weight (None: no data)
STATISTIC: dict[str, str | None] = {"magnitude": None, "wanda": "column_norms", "sparsegpt": "hessian",
                                    "ria": "column_norms", "obd": "fisher"}


def method_statistic(method: str, options: dict[str, Any]) -> str | None:
    """The statistic `method` reads with these options: the Hessian when its mask is followed by a weight update."""
    return "hessian" if options.get("update", "none") != "none" else STATISTIC[method]


def prune_weight(
    method: str, weight: Tensor, stats: InputStatistics | None, pattern: Pattern, fisher: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """Apply `method` to one weight matrix [out_features, in_features] (OBD: given its Fisher diagonal)."""
    if method == "obd":
        return prune_obd(weight, fisher, pattern)
    if method == "magnitude":
        return prune_magnitude(weight, pattern)
    if method == "wanda":
        return prune_wanda(weight, stats.column_norms(), pattern)
    if method == "ria":
        return prune_ria(weight, stats.column_norms(), pattern, options.get("alpha", ALPHA))
    if method == "sparsegpt":
        return prune_sparsegpt(weight, stats.hessian(), pattern, **options)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(STATISTIC)}")


def prune_weights(
    method: str, weights: list[Tensor], stats: InputStatistics | None, pattern: Pattern,
    quantization: Quantization | None = None, fisher: list[Tensor] | None = None, **options: Any,
) -> tuple[list[Tensor], list[Grid] | None]:
    """Apply `method` (then `quantization`, if any) to weights that read the same input (q/k/v; gate/up); return
    them and their grids (None without quantization). SparseGPT factorizes their Hessian once and sweeps their
    stacked rows together, with GPTQ in that same sweep unless `update` follows: the kept weights updated for the
    mask (see prune/refit.py), before any quantization."""
    update = options.pop("update", "none")
    if method != "sparsegpt":
        pruned = [prune_weight(method, weight, stats, pattern, fisher[i] if fisher else None, **options)
                  for i, weight in enumerate(weights)]
    else:
        joint = quantization is not None and quantization.method == "gptq" and update == "none"
        pruned, grids = sparsegpt_sweep(weights, stats.hessian(), pattern, actorder=joint and quantization.actorder,
                                        scheme=quantization.scheme if joint else None, **options)
        if joint:
            return pruned, grids
    if update != "none":
        pruned = update_kept(update, weights, pruned, stats.hessian(), options.get("dampening", 0.01))
    return quantize_weights(pruned, stats, quantization)


def quantize_weights(
    pruned: list[Tensor], stats: InputStatistics | None, quantization: Quantization | None
) -> tuple[list[Tensor], list[Grid] | None]:
    """Pruned weights that read the same input, quantized with their zeros kept: GPTQ with the mask fixed (on the
    kept weights, their error spread over the columns not yet visited), or round to nearest."""
    if quantization is None:
        return pruned, None
    if quantization.method == "rtn":
        rounded, grids = zip(*(rtn(weight, quantization.scheme) for weight in pruned), strict=True)
        return list(rounded), list(grids)
    return sparsegpt_sweep(pruned, stats.hessian(), mask=[weight == 0 for weight in pruned],
                           scheme=quantization.scheme, blocksize=quantization.blocksize,
                           dampening=quantization.dampening, actorder=quantization.actorder)
