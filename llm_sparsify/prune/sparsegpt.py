"""SparseGPT (Frantar & Alistarh, 2023): prune with second-order (OBS) updates of the remaining weights.

With H = 2XXᵀ/n the layer-wise Hessian of ‖WX − ŴX‖², columns are swept left to right in blocks.
Removing w_q (or keeping it) costs w_q² / [H⁻¹]_qq; the error it leaves is spread over the columns not yet
visited through the row q of the upper Cholesky factor of H⁻¹, so only one factorization is needed.
The mask is chosen adaptively inside each block (unstructured) or every M columns (N:M).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from llm_sparsify.prune.masks import Pattern, nm_mask, unstructured_mask

log = logging.getLogger(__name__)


def inverse_hessian_factor(hessian: Tensor, dampening: float) -> Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = dampening · mean(diag H), so that H⁻¹ = UᵀU.

    If H is not positive definite at that λ (e.g. too few tokens), λ is raised tenfold until it is.
    """
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    mean_diag = hessian.diagonal().mean()
    for attempt in range(6):
        damped = hessian + (dampening * 10**attempt) * mean_diag * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            if attempt:
                log.warning("Hessian not positive definite; dampening raised to %g", dampening * 10**attempt)
            return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    raise ValueError("the Hessian stays singular after dampening; use more calibration tokens")


def prune_sparsegpt(
    weight: Tensor, hessian: Tensor, pattern: Pattern, blocksize: int = 128, dampening: float = 0.01
) -> Tensor:
    """The pruned and OBS-updated weight (same shape and dtype), computed in float32 on weight.device."""
    return prune_sparsegpt_together([weight], hessian, pattern, blocksize, dampening)[0]


def prune_sparsegpt_together(
    weights: list[Tensor], hessian: Tensor, pattern: Pattern, blocksize: int = 128, dampening: float = 0.01
) -> list[Tensor]:
    """SparseGPT on weights that read the same input (q/k/v, gate/up): one factorization of H and one
    sweep over their stacked rows. Rows are independent given H⁻¹, and each weight still chooses its
    unstructured mask among its own rows, so the result equals pruning them one by one."""
    rows = [w.shape[0] for w in weights]
    # Updates inside a block are applied lazily too, every `step` columns (a multiple of M, so an N:M
    # group always sees up-to-date weights): the same arithmetic as column by column, in fewer passes.
    step = 32 if not isinstance(pattern, tuple) else pattern[1] * max(1, 32 // pattern[1])
    W = torch.cat([w.detach().float() for w in weights])
    H = hessian.detach().float().to(W.device).clone()
    columns = W.shape[1]

    dead = H.diagonal() == 0  # inputs that were always zero: prune them, keep H invertible
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = inverse_hessian_factor(H, dampening)

    # The sweep works on the transpose, so that a column of W is a contiguous row.
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].T.contiguous()  # [block columns, rows]
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        Err1 = torch.zeros_like(W1)
        if isinstance(pattern, tuple):
            n, m = pattern
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:  # saliency w²/[H⁻¹]²_qq, lowest `sparsity` share of each weight's part of the block
            saliency = (W1**2 / d[:, None] ** 2).T
            mask1 = torch.cat([unstructured_mask(part, pattern, per_row=False) for part in saliency.split(rows)]).T
        scale = mask1 / d[:, None]  # 1/[H⁻¹]_qq where pruned, 0 where kept

        for j1 in range(0, i2 - i1, step):  # column by column, in sub-blocks of `step` columns
            j2 = min(j1 + step, i2 - i1)
            for i in range(j1, j2):
                if isinstance(pattern, tuple) and i % m == 0:
                    mask1[i : i + m] = nm_mask((W1[i : i + m] ** 2 / d[i : i + m, None] ** 2).T, n, m).T
                    scale[i : i + m] = mask1[i : i + m] / d[i : i + m, None]
                err = torch.mul(W1[i], scale[i], out=Err1[i])  # (w − q) / [H⁻¹]_qq
                W1[i:j2].addr_(Hinv1[i, i:j2], err, alpha=-1)
            W1[j2:].addmm_(Hinv1[j1:j2, j2:].T, Err1[j1:j2], alpha=-1)  # the rest of the block, at once

        W[:, i1:i2] = W1.masked_fill(mask1, 0).T
        W[:, i2:].addmm_(Err1.T, Hinv[i1:i2, i2:], alpha=-1)  # lazy batch update of the columns after this block

    return [part.to(w.dtype) for part, w in zip(W.split(rows), weights, strict=True)]
