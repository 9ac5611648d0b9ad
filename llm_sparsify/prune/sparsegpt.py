"""SparseGPT (Frantar & Alistarh, 2023): prune with second-order (OBS) updates of the remaining weights.

With H = 2XXᵀ/n the layer-wise Hessian of ‖WX − ŴX‖², columns are swept left to right in blocks.
Removing w_q (or keeping it) costs w_q² / [H⁻¹]_qq; the error it leaves is spread over the columns not yet
visited through the row q of the upper Cholesky factor of H⁻¹, so only one factorization is needed.
The mask is chosen adaptively inside each block (unstructured) or every M columns (N:M).

Given a quantization grid, the same sweep rounds each column as it passes it and spreads the rounding error by
the same update: GPTQ (Frantar et al., 2023), jointly with the mask choice (the SparseGPT paper's §"Joint
sparsification & quantization") or on the kept weights of a fixed mask (after Wanda or magnitude).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from llm_sparsify.prune.masks import Pattern, nm_mask, unstructured_mask
from llm_sparsify.quantize.grid import Grid, QuantScheme, dequantize, fit_grid, fit_scale, quantize
from llm_sparsify.stats import BLOCKSIZE, DAMPENING

log = logging.getLogger(__name__)


def inverse_hessian_factor(hessian: Tensor, dampening: float) -> Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = dampening · mean(diag H), so that H⁻¹ = UᵀU.

    With J the order reversal and JHJ = LLᵀ, U = J L⁻¹ J: one factorization and one triangular inverse, where
    inverting H and factorizing the inverse takes two factorizations. If H is not positive definite at that λ
    (e.g. too few tokens), λ is raised tenfold until it is.
    """
    mean_diag = hessian.diagonal().mean()
    for attempt in range(6):
        damped = hessian.flip(0, 1)  # JHJ, a copy
        damped.diagonal().add_((dampening * 10**attempt) * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        del damped  # at 14336 inputs (an MoE expert's down_proj) each of these matrices is 0.8 GiB
        if info == 0:
            if attempt:
                log.warning("Hessian not positive definite; dampening raised to %g", dampening * 10**attempt)
            eye = torch.eye(len(factor), dtype=factor.dtype, device=factor.device)
            inverse = torch.linalg.solve_triangular(factor, eye, upper=False, out=eye)  # L⁻¹, in place of I
            del factor
            return inverse.flip(0, 1)
    raise ValueError("the Hessian stays singular after dampening; use more calibration tokens")


def prune_sparsegpt(
    weight: Tensor, hessian: Tensor, pattern: Pattern, blocksize: int = BLOCKSIZE, dampening: float = DAMPENING
) -> Tensor:
    """The pruned and OBS-updated weight (same shape and dtype), computed in float32 on weight.device."""
    return sparsegpt_sweep([weight], hessian, pattern, blocksize=blocksize, dampening=dampening)[0][0]


def prune_sparsegpt_together(
    weights: list[Tensor], hessian: Tensor, pattern: Pattern, blocksize: int = BLOCKSIZE, dampening: float = DAMPENING
) -> list[Tensor]:
    """SparseGPT on weights that read the same input (q/k/v, gate/up): see sparsegpt_sweep."""
    return sparsegpt_sweep(weights, hessian, pattern, blocksize=blocksize, dampening=dampening)[0]


def sparsegpt_sweep(
    weights: list[Tensor], hessian: Tensor, pattern: Pattern | None = None, mask: list[Tensor] | None = None,
    scheme: QuantScheme | None = None, blocksize: int = BLOCKSIZE, dampening: float = DAMPENING, actorder: bool = False,
) -> tuple[list[Tensor], list[Grid] | None]:
    """The OBS sweep of SparseGPT and GPTQ: each column is pruned (mask chosen by `pattern` as the sweep goes, or a
    fixed `mask`, True = removed) and rounded to `scheme`'s grid, its error spread over the columns not yet visited.
    Returns the weights (removed ones exactly 0, the rest on the grid before the cast to their dtype) and grids.

    Weights that read the same input (q/k/v, gate/up) share one factorization of H and one sweep over their stacked
    rows: rows are independent given H⁻¹, and each weight chooses its unstructured mask among its own rows.

    `actorder` (GPTQ's activation order) visits the columns by decreasing [H]_qq, so the inputs that matter most
    are rounded first, while the most columns are left to absorb their error. Its grids are static: each group's
    (of consecutive original columns) is fitted on the weights before the sweep, so one group's scale never
    depends on the visiting order. N:M groups need their columns in order, so it takes unstructured patterns only.
    """
    if pattern is not None and mask is not None:
        raise ValueError("give a pattern (the sweep chooses the mask) or a fixed mask, not both")
    rows = [w.shape[0] for w in weights]
    W = torch.cat([w.detach().float() for w in weights])
    columns = W.shape[1]
    M = torch.cat(mask).to(W.device) if mask is not None else torch.zeros_like(W, dtype=torch.bool)
    nm = pattern if isinstance(pattern, tuple) else None
    # Updates inside a block are applied lazily too, every `step` columns (a multiple of M, so an N:M group
    # always sees up-to-date weights): the same arithmetic as column by column, in fewer passes. A grid group
    # starts a block or a step, so every weight it covers is up to date then.
    step = 32 if nm is None else nm[1] * max(1, 32 // nm[1])
    width = scheme.group_width(columns) if scheme is not None else columns
    if actorder and nm:
        raise ValueError("actorder visits columns out of order; N:M sparsity needs them in order")
    if width < blocksize and not actorder:
        step = math.gcd(step, width)
    if not actorder and (width < columns and blocksize % width and width % blocksize or nm and step % nm[1]):
        raise ValueError(f"group size {width} must divide blocksize {blocksize} or be a multiple of it (and of M)")
    H = hessian.detach().float().to(W.device)
    dead = H.diagonal() == 0  # inputs that were always zero: prune them, keep H invertible
    if dead.any():
        H = H.clone()  # the caller's stays as it was
        H[dead, dead] = 1
    W[:, dead] = 0
    static = fit_grid(W.masked_fill(M, 0), scheme) if actorder and scheme is not None else None
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if actorder else None
    if order is not None:
        W, M, H = W[:, order], M[:, order], H[order][:, order]
        if static is not None:  # scale and zero point of every (visited) column, [rows, columns] each
            static_columns = [values[:, order].contiguous() for values in static.expand(columns)]
    Hinv = inverse_hessian_factor(H, dampening)
    del H
    grid: list[tuple[Tensor, Tensor]] = []  # (scale, zero point) of each group of columns, [rows] each

    # The sweep works on the transpose, so that a column of W is a contiguous row.
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, mask1 = W[:, i1:i2].T.contiguous(), M[:, i1:i2].T.contiguous()  # [block columns, rows]
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        d_inv = 1 / d  # once per block, not per column
        Err1 = torch.zeros_like(W1)
        if pattern is not None and nm is None:  # saliency w²/[H⁻¹]²_qq, lowest share of each weight's block part
            saliency = (W1**2 / d[:, None] ** 2).T
            mask1 = torch.cat([unstructured_mask(part, pattern, per_row=False) for part in saliency.split(rows)]).T

        if scheme is None:  # (w − q)/[H⁻¹]_qq is w·m/[H⁻¹]_qq, m = 1 where removed: formed once per block
            removed_over_d = mask1 * d_inv[:, None]

        for j1 in range(0, i2 - i1, step):  # column by column, in sub-blocks of `step` columns
            j2 = min(j1 + step, i2 - i1)
            for i in range(j1, j2):
                if nm is not None and i % nm[1] == 0:
                    g = slice(i, i + nm[1])
                    mask1[g] = nm_mask((W1[g] ** 2 / d[g, None] ** 2).T, *nm).T
                    if scheme is None:
                        removed_over_d[g] = mask1[g] * d_inv[g, None]
                if scheme is None:  # pruning only: the same numbers as below in two operations, not five
                    torch.mul(W1[i], removed_over_d[i], out=Err1[i])
                    W1[i + 1 : j2].addr_(Hinv1[i, i + 1 : j2], Err1[i], alpha=-1)
                    continue
                if static is not None:
                    column_grid = (static_columns[0][:, i1 + i], static_columns[1][:, i1 + i])
                elif scheme is not None and (i1 + i) % width == 0:  # fit per row on the group's current weights,
                    end = i1 + i + width  # past the block too, those known to be removed set to 0
                    current = torch.cat([W1[i : i + width].masked_fill(mask1[i : i + width], 0).T,
                                         W[:, i2:end].masked_fill(M[:, i2:end], 0)], dim=1)
                    grid.append(fit_scale(current, scheme))
                    column_grid = grid[-1]
                q = W1[i].masked_fill(mask1[i], 0)
                if scheme is not None:
                    q = dequantize(quantize(q, *column_grid, scheme), *column_grid)
                torch.mul(W1[i] - q, d_inv[i], out=Err1[i])  # (w − q) / [H⁻¹]_qq
                W1[i:j2].addr_(Hinv1[i, i:j2], Err1[i], alpha=-1)
                W1[i] = q
            W1[j2:].addmm_(Hinv1[j1:j2, j2:].T, Err1[j1:j2], alpha=-1)  # the rest of the block, at once

        if scheme is None:
            W1.masked_fill_(mask1, 0)
        W[:, i1:i2] = W1.T
        W[:, i2:].addmm_(Err1.T, Hinv[i1:i2, i2:], alpha=-1)  # lazy batch update of the columns after this block

    if order is not None:
        W = W[:, torch.argsort(order)]
    out = [part.to(w.dtype) for part, w in zip(W.split(rows), weights, strict=True)]
    if scheme is None:
        return out, None
    if static is not None:
        return out, [Grid(scheme, s, z) for s, z in zip(static.scale.split(rows), static.zero_point.split(rows),
                                                              strict=True)]
    scale, zero = (torch.stack(values, dim=1).split(rows) for values in zip(*grid, strict=True))
    return out, [Grid(scheme, s, z) for s, z in zip(scale, zero, strict=True)]
