"""Pruning methods: plain functions (weight, statistics, pattern) -> pruned weight, one module each.

The transform pass only needs to know which statistic of a Linear's inputs a method reads. Quantization, if a
recipe asks for it, follows the pruning (RTN; GPTQ with the mask fixed) or, for SparseGPT with GPTQ,
happens in the same sweep. An N:M mask may be formed over a permutation of the inputs (input_permutation, then
prune_weights(permutation=...); the caller folds it into the weights that produce those inputs, see prune/permute.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llm_sparsify.prune.admm import prune_admm
from llm_sparsify.prune.fisher import prune_obd
from llm_sparsify.prune.magnitude import prune_magnitude
from llm_sparsify.prune.masks import Pattern
from llm_sparsify.prune.permute import nm_permutation, tied_permutation
from llm_sparsify.prune.refit import UPDATE_STEPS, update_kept
from llm_sparsify.prune.ria import ALPHA, prune_ria, ria_scores
from llm_sparsify.prune.sparsegpt import prune_sparsegpt, sparsegpt_sweep
from llm_sparsify.prune.wanda import prune_wanda, wanda_scores
from llm_sparsify.quantize.grid import Grid, Quantization, rtn
from llm_sparsify.stats import DAMPENING, InputStatistics

# method -> the statistic it needs: of the Linear's input, or the Fisher diagonal of its weight (None: no data)
STATISTIC: dict[str, str | None] = {"magnitude": None, "wanda": "column_norms", "sparsegpt": "hessian",
                                    "ria": "column_norms", "admm": "hessian", "obd": "fisher"}


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
    if method == "admm":
        return prune_admm(weight, stats.hessian(), pattern, **options)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(STATISTIC)}")


def prune_weights(
    method: str, weights: list[Tensor], stats: InputStatistics | None, pattern: Pattern,
    quantization: Quantization | None = None, fisher: list[Tensor] | None = None, permutation: Tensor | None = None,
    **options: Any,
) -> tuple[list[Tensor], list[Grid] | None]:
    """Apply `method` (then `quantization`, if any) to weights that read the same input (q/k/v; gate/up); return
    them and their grids (None without quantization). SparseGPT factorizes their Hessian once and sweeps their
    stacked rows together, with GPTQ in that same sweep unless `update` follows: the kept weights updated for the
    mask (see prune/refit.py), before any quantization.

    With a `permutation` p of the inputs (from input_permutation), everything (mask, SparseGPT's or the OBS sweep)
    runs on W[:, p] with the statistics reordered alike, and the result is put back in the original column order:
    its N:M groups lie along p, and the layer computes what the pruned W[:, p] would on reordered inputs. The
    recipe's `permute` option is the caller's switch (which modules get a permutation) and is ignored here."""
    options.pop("permute", None)
    if permutation is not None:
        return _prune_permuted(method, weights, stats, pattern, quantization, fisher, permutation, options)
    update, update_steps = options.pop("update", "none"), options.pop("update_steps", UPDATE_STEPS)
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
        pruned = update_kept(update, weights, pruned, stats.hessian(), options.get("dampening", DAMPENING),
                             update_steps)
    return quantize_weights(pruned, stats, quantization)


def input_permutation(
    method: str, weights: list[Tensor], stats: InputStatistics | None, pattern: Pattern,
    heads: tuple[int, int, int] | None = None, **options: Any,
) -> Tensor:
    """A permutation of the inputs of `weights` (one input, stacked rows) that raises what the N:M mask of `method`
    keeps (prune/permute.py): free over all inputs (down_proj), or with `heads` = (num_heads, num_kv_heads,
    head_dim) only within heads, tied across the query heads of a KV head (o_proj). Chosen on the method's mask
    score: Wanda's |W|·‖X‖ (also for SparseGPT, whose w²/[H⁻¹]²_qq changes along its sweep) or RIA's."""
    if not isinstance(pattern, tuple):
        raise ValueError("an input permutation helps N:M masks only; unstructured masks have no groups")
    if method not in ("wanda", "ria", "sparsegpt"):
        raise ValueError(f"input permutations are chosen on wanda's, ria's or sparsegpt's score, not {method!r}")
    norms = stats.column_norms()
    if method == "ria":
        scores = torch.cat([ria_scores(w, norms, options.get("alpha", ALPHA)) for w in weights])
    else:
        scores = torch.cat([wanda_scores(w, norms) for w in weights])
    return nm_permutation(scores, *pattern) if heads is None else tied_permutation(scores, *pattern, heads)


class PermutedStatistics:
    """The statistics of `stats`'s input with its features reordered by `perm`: those of W[:, perm]'s input."""

    def __init__(self, stats: InputStatistics, perm: Tensor) -> None:
        self.stats, self.perm = stats, perm

    def column_norms(self) -> Tensor:
        norms = self.stats.column_norms()
        return norms[self.perm.to(norms.device)]

    def hessian(self) -> Tensor:
        H = self.stats.hessian()
        perm = self.perm.to(H.device)
        return H.index_select(0, perm).index_select(1, perm)


def _prune_permuted(
    method: str, weights: list[Tensor], stats: InputStatistics | None, pattern: Pattern,
    quantization: Quantization | None, fisher: list[Tensor] | None, permutation: Tensor, options: dict[str, Any],
) -> tuple[list[Tensor], None]:
    """prune_weights on the inputs reordered by `permutation`, the result in the original order (see there)."""
    if quantization is not None:
        raise ValueError("an input permutation moves columns across quantization groups; quantize without one")
    if not isinstance(pattern, tuple):
        raise ValueError("an input permutation helps N:M masks only; unstructured masks have no groups")
    perm = permutation.to(weights[0].device)
    pruned, _ = prune_weights(
        method, [w[:, perm] for w in weights], None if stats is None else PermutedStatistics(stats, permutation),
        pattern, None, None if fisher is None else [f[:, perm.to(f.device)] for f in fisher], **options)
    inverse = torch.argsort(perm)
    return [w[:, inverse] for w in pruned], None


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
