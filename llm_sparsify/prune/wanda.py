"""Wanda (Sun et al., 2023): prune by weight magnitude times input activation norm.

Score S_ij = |W_ij| · ‖X_j‖₂, where ‖X_j‖₂ is the L2 norm of input feature j over all calibration
tokens. Weights are compared within each output row (the paper's comparison group); for N:M, within
each group of M consecutive inputs of a row. No weight update.
"""

from __future__ import annotations

from torch import Tensor

from llm_sparsify.prune.masks import Pattern, select_mask


def wanda_scores(weight: Tensor, column_norms: Tensor) -> Tensor:
    """S = |W| · ‖X‖₂, broadcast over rows; float32."""
    return weight.float().abs() * column_norms.float().to(weight.device).reshape(1, -1)


def prune_wanda(weight: Tensor, column_norms: Tensor, pattern: Pattern) -> Tensor:
    """Weight with the lowest-scoring entries of each row (or N:M group) set to zero."""
    mask = select_mask(wanda_scores(weight, column_norms), pattern, per_row=True)
    return weight.masked_fill(mask, 0)
