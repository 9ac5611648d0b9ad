"""ADMM with a gradual mask (Boža, 2024): choose the mask and the kept weights together, for
min ‖X(Ŵ − W)ᵀ‖² with Ŵ in the pattern, on the layer's H = XᵀX.

Each input is first scaled to unit energy (W̃ = W·D, H̃ = D⁻¹HD⁻¹ + δI, D = diag √H_jj), so |W̃| is Wanda's score.
ADMM splits the problem into a least-squares step pulled towards the sparse copy Z,
    Ŵ = (W̃H̃ + ρ(Z − U)) (H̃ + ρI)⁻¹          (one [rows, in] × [in, in] product: the inverse is formed once)
a projection onto the pattern, Z = P(Ŵ + U), keeping the largest |Ŵ + U| of each row (or N:M group), and the dual
step U += Ŵ − Z. The mask is chosen anew at each of the first `gradual` iterations with a sparsity that rises as
s_t = s(1 − (1 − t/T)³), so weights leave while the others still move to make up for them; then it is frozen.
The result is Z: exactly in the pattern. Rows are independent problems, solved a block of rows at a time (the
scratch of a 7B down_proj stays small). Unlike SparseGPT's one left-to-right sweep, a removal is never final
until the schedule ends, and every kept weight makes up for every removed one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llm_sparsify.prune.masks import Pattern, nm_mask, unstructured_mask
from llm_sparsify.prune.refit import row_blocks

ITERATIONS = 20  # ADMM iterations in all (each one [rows, in] × [in, in] product)
GRADUAL = 15  # of which the first ones choose the mask, at a rising sparsity
RHO = 1.0  # ρ: the penalty tying Ŵ to its sparse copy Z (inputs at unit energy, so H̃'s diagonal is 1 + δ)
DAMPENING = 0.1  # δ added to H̃'s unit diagonal


def pattern_sparsity(pattern: Pattern) -> float:
    """The share of the weights `pattern` removes."""
    return (pattern[1] - pattern[0]) / pattern[1] if isinstance(pattern, tuple) else float(pattern)


def gradual_mask(scores: Tensor, pattern: Pattern, sparsity: float) -> Tensor:
    """The `sparsity` lowest `scores` of each row removed (True); for N:M only weights outside each group's n best go,
    so that the mask at the pattern's own sparsity is the N:M mask."""
    if isinstance(pattern, tuple):
        scores = scores.masked_fill(~nm_mask(scores, *pattern), float("inf"))
    return unstructured_mask(scores, sparsity, per_row=True)


def prune_admm(
    weight: Tensor, hessian: Tensor, pattern: Pattern, iterations: int = ITERATIONS, gradual: int = GRADUAL,
    rho: float = RHO, dampening: float = DAMPENING,
) -> Tensor:
    """`weight` [out, in] pruned to `pattern` by ADMM with a gradual mask (see above); float32 inside."""
    if iterations < 1:
        raise ValueError(f"ADMM needs at least one iteration, got {iterations}")
    H = hessian.float().to(weight.device)
    d = H.diagonal().clamp_min(0).sqrt() + 1e-8
    A = H / d[:, None] / d[None, :]  # H̃ + ρI, a new tensor: the caller's Hessian is left as it was
    A.diagonal().add_(dampening + rho)
    L = torch.linalg.cholesky(A)
    del A  # so that at most three [in, in] matrices live at once (a 7B down_proj's are 0.45 GiB each)
    inverse = torch.cholesky_inverse(L)
    del L
    target = pattern_sparsity(pattern)
    T = max(1, min(gradual, iterations))  # the last choice is at the target sparsity
    schedule = [target * (1 - (1 - (t + 1) / T) ** 3) for t in range(T)]
    solve = {"dampening": dampening, "pattern": pattern, "schedule": schedule, "iterations": iterations, "rho": rho}
    return torch.cat([_admm_rows(weight[rows].float(), H, d, inverse, **solve) / d
                      for rows in row_blocks(*weight.shape)]).to(weight.dtype)


def _admm_rows(weight: Tensor, H: Tensor, d: Tensor, inverse: Tensor, *, dampening: float, pattern: Pattern,
               schedule: list[float], iterations: int, rho: float) -> Tensor:
    """ADMM on a block of rows (independent problems): the sparse Z (in the scaled space) at the end."""
    W = weight * d  # W̃
    B = (weight @ H) / d + dampening * W  # W̃H̃ = W H D⁻¹ + δW̃, without forming H̃
    U = torch.zeros_like(W)
    for t in range(iterations):
        V = W + U
        if t < len(schedule):  # float masks: products are faster than bool indexing on CPU
            removed = gradual_mask(V.abs(), pattern, schedule[t]).float()
            sign = 1 - 2 * removed
        # Z = V kept, 0 removed; U + Ŵ − Z = V removed, 0 kept; so Z − U = ±V
        U = V * removed
        W = (B + rho * (V * sign)) @ inverse
    return (W + U) * (1 - removed)
