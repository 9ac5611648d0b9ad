"""RIA (Zhang et al., 2024, "Plug-and-Play"): relative importance times activations, a mask score for any pattern.

    S_ij = (|W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|) · ‖X_j‖₂^a

A weight counts relative to the other weights of its output row and of its input column, so the inputs whose
column of weights is large overall (and the outputs whose row is) do not take every kept place; ‖X_j‖₂ is the L2
norm of input feature j over the calibration tokens, damped by the power a (0.5 in the paper; Wanda is a = 1 with
|W_ij| alone). N:M masks keep the best n of every m inputs of a row; unstructured masks compare each row's weights
(`per_row`) or, as the paper does, the whole matrix's. No weight update (see prune/refit.py for one).
"""

from __future__ import annotations

from torch import Tensor

from llm_sparsify.prune.masks import Pattern, select_mask

ALPHA = 0.5  # the power a of ‖X_j‖₂


def ria_scores(weight: Tensor, column_norms: Tensor, alpha: float = ALPHA) -> Tensor:
    """S = (|W| / row sums of |W| + |W| / column sums of |W|) · ‖X‖₂^alpha, float32; zero sums add 0."""
    magnitude = weight.float().abs()
    rows = magnitude.sum(1, keepdim=True).clamp_min(1e-30)  # a zero sum only divides zeros
    columns = magnitude.sum(0, keepdim=True).clamp_min(1e-30)
    relative = magnitude / rows + magnitude / columns
    return relative * column_norms.float().to(weight.device).reshape(1, -1).pow(alpha)


def prune_ria(
    weight: Tensor, column_norms: Tensor, pattern: Pattern, alpha: float = ALPHA, per_row: bool = False
) -> Tensor:
    """Weight with the lowest-scoring entries of the matrix (or of each row, or of each N:M group) set to zero."""
    mask = select_mask(ria_scores(weight, column_norms, alpha), pattern, per_row=per_row)
    return weight.masked_fill(mask, 0)
