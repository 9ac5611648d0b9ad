"""Input-channel permutations for N:M masks (Pool & Yu, 2021, "Channel Permutations for N:M Sparsity").

An N:M mask keeps the n best of every m CONSECUTIVE inputs of a row, so which inputs share a group decides what can
be kept. Reordering the input channels first lets better groups form: we look for a column permutation p that raises
the score the mask of scores[:, p] keeps (the sum over rows of the n largest in each group of m),

    kept(S, p) = Σ_r Σ_groups top-n { S[r, p[k]] : k in the group },

by channel swaps: exchange two columns of different groups when that raises the kept total (steepest ascent, many
swaps on disjoint pairs of groups at once). The gain of a swap is exact and cheap to keep up to date: with column c
taken out of its group G (whose other m − 1 columns keep T_{G∖c} in row r, their n-th best being v_{G∖c}), putting
column x there keeps T_{G∖c} + relu(S_x − v_{G∖c}) in each row, so with K_G what G keeps now

    gain(a, b) = D[a] + D[b] + R[b, a] + R[a, b],    D[c] = Σ_r (T_{G∖c} − K_G),    R[x, c] = Σ_r relu(S_x − v_{G∖c}),

and a swap only changes the D and R columns of the two groups it touches. R is [cols, cols] and each swap costs
2m·cols·rows to update, so the search runs on windows of `window` columns (unions of groups, drawn at random with
a fixed seed), over a few passes with fresh windows so that every column can meet every other.

The permutation is folded away exactly when the inputs it reorders are produced by rows of other weights (the MLP's
intermediate channels: gate/up rows and down_proj columns; a KV head's value dims: v_proj rows and the o_proj columns
of every query head that reads that KV head), see structure/permutation.py; attention heads tie the permutation
(`tied_permutation`).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)

WINDOW = 128  # columns searched together
PASSES = 2  # sets of windows


def kept_score(scores: Tensor, n: int, m: int) -> float:
    """Σ over rows and groups of m consecutive columns of the n largest scores: what an N:M mask keeps (float64)."""
    rows, cols = scores.shape
    return scores.double().reshape(rows, cols // m, m).topk(n, dim=2).values.sum().item()


def nm_permutation(
    scores: Tensor, n: int, m: int, window: int = WINDOW, passes: int = PASSES, seed: int = 0, rounds: int = 200
) -> Tensor:
    """A column permutation p [cols] (long) such that the N:M mask of scores[:, p] keeps at least as much score as
    that of `scores` (the identity if it would not keep more), by channel swaps within windows of `window` columns
    (see the module docstring); `passes` sets of windows, each a seeded random partition of the groups.

    One thread of a busy CPU: about 2.5 s for [576, 1536] (SmolLM2's down_proj), 0.1-0.2 s for [1728, 64] (a KV
    head's o_proj columns), about 6 min for [4096, 11008] (a 7B's down_proj; the time grows as rows · cols · window)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M sparsity needs the input dimension ({cols}) to be a multiple of M={m}")
    S = scores.detach().float()
    groups, per_window = cols // m, max(2, window // m)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.arange(cols, device=S.device).reshape(groups, m)  # the columns of each group
    for p in range(passes if groups > per_window else 1):
        order = torch.randperm(groups, generator=generator) if p else torch.arange(groups)
        for chosen in order.to(S.device).split(per_window):
            part = perm[chosen].reshape(-1)
            perm[chosen] = part[_swap_search(S[:, part], n, m, rounds)].reshape(-1, m)
    perm = perm.reshape(-1)
    before, after = kept_score(S, n, m), kept_score(S[:, perm], n, m)
    if not after > before:  # never worse than the identity
        return torch.arange(cols, device=scores.device)
    log.debug("N:M permutation of %d columns: kept score %.6g -> %.6g", cols, before, after)
    return perm.to(scores.device)


def _group_terms(S: Tensor, members: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """D [groups·m] (see the module docstring) and R[:, members] [cols, groups·m] for the groups `members` [groups, m].

    In a row, removing a kept column lets the (n+1)-th best in (T falls by s_c − s_(n+1), and s_(n+1) is the n-th best
    left); removing another leaves T and the n-th best s_(n) as they were. So R[x, c] = Σ_r relu(S_x − s_(n)) +
    Σ_r kept[r, c] · clamp(S_x − s_(n+1), 0, s_(n) − s_(n+1)): two passes over S per group and a product, not m."""
    rows, groups, m = S.shape[0], *members.shape
    values = S[:, members.reshape(-1)].reshape(rows, groups, m)
    ordered = values.topk(n + 1, dim=2).values
    kept = torch.zeros_like(values).scatter_(2, values.topk(n, dim=2).indices, 1.0)
    nth, next_ = ordered[:, :, n - 1], ordered[:, :, n]  # [rows, groups]
    D = (kept * (next_[:, :, None] - values)).sum(0).reshape(-1)
    R = S.new_empty(S.shape[1], groups, m)
    for g in range(groups):
        above = (S - nth[:, g : g + 1]).clamp_min_(0).sum(0)
        between = torch.minimum((S - next_[:, g : g + 1]).clamp_min_(0), (nth[:, g] - next_[:, g])[:, None])
        R[:, g] = torch.addmm(above[:, None], between.T, kept[:, g])
    return D, R.reshape(S.shape[1], groups * m)


def _swap_search(S: Tensor, n: int, m: int, rounds: int) -> Tensor:
    """Steepest-ascent channel swaps on S [rows, cols]: a permutation of its columns (see the module docstring).

    Each round takes, column by column in order of their best gain, the best swap of each column whose two groups
    no swap of this round touched yet (swaps on disjoint pairs of groups add up exactly)."""
    rows, cols = S.shape
    groups = cols // m
    if groups < 2:
        return torch.arange(cols, device=S.device)
    perm = torch.arange(cols, device=S.device)  # position -> column of S
    D, R = _group_terms(S, perm.reshape(groups, m), n)  # D by position, R [column x, position c]
    group_of = torch.arange(cols, device=S.device) // m  # of each position
    same = group_of[:, None] == group_of[None, :]
    tolerance = 1e-6 * kept_score(S, n, m) / groups
    for _ in range(rounds):
        Rp = R[perm]  # [position of x, position c]
        gain = (D[:, None] + D[None, :] + Rp + Rp.T).masked_fill_(same, -torch.inf)
        best, partner = gain.max(dim=1)
        touched: set[int] = set()
        swaps = []
        for i in torch.argsort(best, descending=True, stable=True).tolist():
            if best[i] <= tolerance:
                break
            j = int(partner[i])
            gi, gj = i // m, j // m
            if gi in touched or gj in touched:
                continue
            touched.update((gi, gj))
            swaps.append((i, j))
        if not swaps:
            break
        i, j = (torch.tensor(side, device=S.device) for side in zip(*swaps, strict=True))
        perm[i], perm[j] = perm[j].clone(), perm[i].clone()
        changed = torch.tensor(sorted(touched), device=S.device)
        positions = (changed[:, None] * m + torch.arange(m, device=S.device)).reshape(-1)
        D[positions], R[:, positions] = _group_terms(S, perm[positions].reshape(-1, m), n)
    return perm


def tied_permutation(scores: Tensor, n: int, m: int, heads: tuple[int, int, int]) -> Tensor:
    """A column permutation [num_heads·head_dim] of attention outputs (o_proj's inputs) that moves columns only within
    a head, the same way in every query head of one KV head, so it folds into v_proj's rows.

    `heads` = (num_heads, num_kv_heads, head_dim); query head h reads KV head h // (num_heads // num_kv_heads).
    Each KV head's permutation is searched on the stacked scores of its query heads [rows·heads_per_kv, head_dim]."""
    num_heads, num_kv_heads, head_dim = heads
    rows, cols = scores.shape
    if cols != num_heads * head_dim or num_heads % num_kv_heads or head_dim % m:
        raise ValueError(f"scores with {cols} columns do not fit {num_heads} heads of {head_dim} (KV heads "
                         f"{num_kv_heads}, M={m})")
    per_kv = num_heads // num_kv_heads
    blocks = scores.reshape(rows, num_kv_heads, per_kv, head_dim)  # [rows, kv, query heads of kv, head_dim]
    within = [nm_permutation(blocks[:, g].permute(1, 0, 2).reshape(per_kv * rows, head_dim), n, m)
              for g in range(num_kv_heads)]
    return expand_kv_permutation(torch.stack(within), num_heads)


def expand_kv_permutation(within: Tensor, num_heads: int) -> Tensor:
    """The o_proj column permutation [num_heads·head_dim] from each KV head's permutation of its dims [kv, head_dim]."""
    num_kv_heads, head_dim = within.shape
    per_kv = num_heads // num_kv_heads
    heads = torch.arange(num_heads, device=within.device)
    return (heads[:, None] * head_dim + within[heads // per_kv]).reshape(-1)


def kv_permutation(perm: Tensor, heads: tuple[int, int, int]) -> Tensor:
    """The v_proj row permutation [num_kv_heads·head_dim] that an o_proj column permutation tied by
    `tied_permutation` implies; a ValueError if `perm` moves columns across heads or differs within a KV group."""
    num_heads, num_kv_heads, head_dim = heads
    per_heads = perm.reshape(num_heads, head_dim) - torch.arange(num_heads, device=perm.device)[:, None] * head_dim
    within = per_heads[::num_heads // num_kv_heads]
    if not torch.equal(expand_kv_permutation(within, num_heads), perm):
        raise ValueError("the permutation must move columns within heads, the same way for a KV head's query heads")
    kv = torch.arange(num_kv_heads, device=perm.device)
    return (kv[:, None] * head_dim + within).reshape(-1)
