"""Weight updates for a fixed mask: once a method (Wanda, RIA, magnitude, SparseGPT) chose which weights go, move the
kept ones so the layer's outputs on the calibration tokens change as little as possible, from H = 2XXᵀ/n.

    obs     the SparseGPT/GPTQ sweep with the mask fixed: each column's removed weights are compensated by the
            columns to its right (OBS, one Cholesky factor of H⁻¹); greedy, so columns on the left are never revisited
            (SparseGPT's own result for its mask).
    lstsq   the least-squares optimum itself, row by row: min over ŵ with ŵ_removed = 0 of
            (w − ŵ)(H + λI)(w − ŵ)ᵀ, i.e. (H + λI)_KK ŵ_K = [w(H + λI)]_K on the kept inputs K, solved for a block of
            rows at once by conjugate gradients (one [rows, in] × [in, in] product per step, Jacobi preconditioned).
            The same problem ADMM solves (Boža, 2024), without its penalty schedule; λ = dampening · mean(diag H)
            keeps ŵ near w along directions the calibration tokens barely see.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from llm_sparsify.prune.sparsegpt import sparsegpt_sweep
from llm_sparsify.stats import DAMPENING

log = logging.getLogger(__name__)

UPDATES = ("none", "obs", "lstsq")
UPDATE_STEPS = 200  # lstsq: conjugate-gradient steps at most (recipe key update_steps)
CHUNK = 1 << 23  # lstsq: values in a block of rows solved together (32 MiB for each float32 vector of CG)


def refit_obs(weights: list[Tensor], hessian: Tensor, masks: list[Tensor],
              dampening: float = DAMPENING) -> list[Tensor]:
    """The dense `weights` with `masks` (True = removed) applied and the kept weights updated by the OBS sweep."""
    return sparsegpt_sweep(weights, hessian, mask=masks, dampening=dampening)[0]


def refit_lstsq(
    weights: list[Tensor], hessian: Tensor, masks: list[Tensor], dampening: float = DAMPENING,
    steps: int = UPDATE_STEPS, tolerance: float = 1e-3, start: list[Tensor] | None = None,
) -> list[Tensor]:
    """The dense `weights` with `masks` applied and the kept weights set to the least-squares optimum (see above).

    Conjugate gradients from `start` (e.g. SparseGPT's updated weights; default: the masked weight) until each row's
    residual is below `tolerance` times its right-hand side, or `steps` products. Rows are independent problems:
    they are solved a block of about CHUNK values at a time, so the solver's vectors stay small whatever the matrix.
    """
    H = hessian.detach().float().to(weights[0].device)  # not copied: λI is added in each product instead
    damping = dampening * H.diagonal().mean().item()
    if not bool(H.diagonal().min() + damping > 0):
        raise ValueError("the Hessian needs positive dampening (inputs that were always zero leave it singular)")
    starts = weights if start is None else start
    return [torch.cat([_solve_rows(w[rows].float(), s[rows].float(), ~m[rows], H, damping, steps, tolerance)
                       .to(w.dtype) for rows in row_blocks(*w.shape)])
            for w, s, m in zip(weights, starts, masks, strict=True)]


def row_blocks(rows: int, columns: int) -> list[slice]:
    """Blocks of rows of about CHUNK values each: row-wise solvers work one at a time to keep their scratch small."""
    step = max(1, CHUNK // columns)
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def _solve_rows(W: Tensor, x: Tensor, keep: Tensor, H: Tensor, damping: float, steps: int,
                tolerance: float) -> Tensor:
    """min over x of (W − x)(H + λI)(W − x)ᵀ with x = 0 off `keep`, each row its own system
    (H + λI)_KK x_K = (W(H + λI))_K, by Jacobi-preconditioned conjugate gradients from `x` (masked here)."""
    keep = keep.to(W.device)
    inverse_diagonal = 1 / (H.diagonal() + damping)
    b = (torch.addmm(W, W, H, beta=damping)) * keep
    x = x * keep
    r = b - torch.addmm(x, x, H, beta=damping) * keep
    z = r * inverse_diagonal
    p = z.clone()
    rz = (r * z).sum(1)
    goal = tolerance * b.norm(dim=1)
    for _ in range(steps):
        if bool((r.norm(dim=1) <= goal).all()):
            break
        Ap = torch.addmm(p, p, H, beta=damping) * keep
        alpha = rz / (p * Ap).sum(1).clamp_min(1e-30)
        x.addcmul_(alpha[:, None], p)
        r.addcmul_(alpha[:, None], Ap, value=-1)
        z = r * inverse_diagonal
        rz, previous = (r * z).sum(1), rz
        p = z + (rz / previous.clamp_min(1e-30))[:, None] * p
    else:
        worst = (r.norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).max().item()
        log.debug("least-squares refit stopped after %d steps at a relative residual of %.2g", steps, worst)
    return x


def update_kept(
    update: str, weights: list[Tensor], pruned: list[Tensor], hessian: Tensor, dampening: float = DAMPENING,
    steps: int = UPDATE_STEPS,
) -> list[Tensor]:
    """`pruned` (the dense `weights` with some entries zeroed) with its kept weights updated by `update`."""
    if update == "none":
        return pruned
    masks = [weight == 0 for weight in pruned]
    if update == "obs":
        return refit_obs(weights, hessian, masks, dampening)
    if update == "lstsq":
        return refit_lstsq(weights, hessian, masks, dampening, steps, start=pruned)
    raise ValueError(f"unknown weight update {update!r}; choose one of {', '.join(UPDATES)}")
