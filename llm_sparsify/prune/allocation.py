"""Per-layer sparsity from measured sensitivity: prune each layer at several sparsities, measure the damage, and
spend the sparsity budget where it costs least.

Score pass (score_passes.layer_sensitivities, over the dense model, like OWL's): for layer ℓ and each level s_k,
the layer's target weights are replaced by their Wanda mask at s_k (a copy: the model is left dense), the layer is run
on its dense inputs x, and the damage its output f̂(x) does to the next hidden state f(x) is measured.
The currencies (all from the same forwards):

    token    mean over tokens t of ‖f̂_t − f_t‖² / ‖f_t‖²   (what the next layer's RMSNorm sees: each token
             divided by its own norm, so a few massive-activation tokens do not dominate)
    sum      Σ_t ‖f̂_t − f_t‖² / Σ_t ‖f_t‖²
    update   Σ_t ‖f̂_t − f_t‖² / Σ_t ‖f_t − x_t‖²          (relative to the layer's own contribution)

On SmolLM2-135M, Wanda 70%, held-out C4 perplexity (eval/allocation_gain.py): token 386, sum 528, update 1459
(uniform 1161, OWL 773), so token is the recipe's default; `sum` is ruled by the massive-activation tokens (after
layer 11 it sees almost no damage anywhere) and `update` by layers that add little to the stream.

Decide (`allocate_sparsities`, pure): with e_ℓ(s) the measured curve of layer ℓ made convex (its lower convex
hull, linear between levels), minimise Σ_ℓ e_ℓ(s_ℓ) subject to Σ_ℓ w_ℓ s_ℓ = S Σ_ℓ w_ℓ (w_ℓ: the layer's target
weights) and s_ℓ in [first level, last level]. For convex piecewise-linear curves this is a fractional knapsack:
every layer starts at the first level, and hull segments are taken whole in order of rising cost per pruned weight
Δe / (w_ℓ Δs) until the budget is met; the last one is taken in part, so the mean is exactly the target.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from llm_sparsify.errors import AllocationError

log = logging.getLogger(__name__)

CURRENCIES = ("token", "sum", "update")


def sensitivity_levels(target: float, spread: float, count: int) -> list[float]:
    """`count` equally spaced sparsities from target − spread to target + spread (clipped to [0, 0.99])."""
    if count < 2:
        raise AllocationError(f"sensitivity allocation needs at least 2 levels, got {count}")
    low, high = max(0.0, target - spread), min(0.99, target + spread)
    if not low < high or not low <= target <= high:
        raise AllocationError(f"sensitivity spread {spread} around {target} leaves no room to vary the sparsity")
    return [low + (high - low) * k / (count - 1) for k in range(count)]


def lower_hull(levels: Sequence[float], errors: Sequence[float]) -> list[int]:
    """Indices of the vertices of the lower convex hull of the points (levels[k], errors[k]), left to right."""
    hull: list[int] = []
    for k in range(len(levels)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the line from a to k
            cross = ((levels[b] - levels[a]) * (errors[k] - errors[a])
                     - (errors[b] - errors[a]) * (levels[k] - levels[a]))
            if cross > 0:
                break
            hull.pop()
        hull.append(k)
    return hull


def hull_value(levels: Sequence[float], errors: Sequence[float], s: float) -> float:
    """The convexified curve (linear between hull vertices) at sparsity s, within [levels[0], levels[-1]]."""
    hull = lower_hull(levels, errors)
    for a, b in zip(hull, hull[1:], strict=False):
        if levels[a] <= s <= levels[b]:
            t = (s - levels[a]) / (levels[b] - levels[a])
            return errors[a] + t * (errors[b] - errors[a])
    if s == levels[hull[0]]:
        return errors[hull[0]]
    raise ValueError(f"sparsity {s} lies outside the levels [{levels[0]}, {levels[-1]}]")


def allocate_sparsities(
    errors: Tensor,
    levels: Sequence[float],
    target: float,
    weights_per_layer: Sequence[int] | None = None,
) -> list[float]:
    """Per-layer sparsities minimising the summed (convexified, interpolated) damage, weighted mean exactly `target`.

    `errors` [layers, levels]: each layer's measured damage at each level (rising levels). `weights_per_layer`:
    the target weights of each layer (default: all alike, a plain mean). Every sparsity lies within
    [levels[0], levels[-1]]; the sum Σ w_ℓ s_ℓ equals target · Σ w_ℓ up to float rounding of one term.
    """
    errors = torch.as_tensor(errors, dtype=torch.float64)
    levels = [float(s) for s in levels]
    n = errors.shape[0]
    if errors.dim() != 2 or errors.shape[1] != len(levels) or len(levels) < 2:
        raise ValueError(f"errors must be [layers, {len(levels)} levels] with two levels or more, got "
                         f"{tuple(errors.shape)}")
    if any(b <= a for a, b in zip(levels, levels[1:], strict=False)):
        raise ValueError(f"levels must rise strictly, got {levels}")
    if not torch.isfinite(errors).all():
        raise ValueError("every error must be finite")
    weights = [1] * n if weights_per_layer is None else [int(w) for w in weights_per_layer]
    if len(weights) != n or min(weights) <= 0:
        raise ValueError(f"weights_per_layer needs a positive count for each of the {n} layers, got {weights}")
    if not levels[0] <= target <= levels[-1]:
        raise AllocationError(f"target sparsity {target} lies outside the measured levels [{levels[0]:g}, "
                          f"{levels[-1]:g}]")
    total = sum(weights)
    sparsity = [levels[0]] * n
    need = target * total - levels[0] * total  # weights still to prune, beyond every layer at the first level
    segments = []  # (cost per pruned weight, layer, from level, to level)
    for layer in range(n):
        e = errors[layer].tolist()
        hull = lower_hull(levels, e)
        for a, b in zip(hull, hull[1:], strict=False):
            segments.append(((e[b] - e[a]) / ((levels[b] - levels[a]) * weights[layer]), layer, levels[a], levels[b]))
    segments.sort(key=lambda seg: (seg[0], seg[1]))  # a layer's own segments come in order: its hull is convex
    last = 0
    for _, layer, a, b in segments:
        if need <= 0:
            break
        take = min(b - a, need / weights[layer])
        sparsity[layer] = a + take
        need -= take * weights[layer]
        last = layer
    # the mean is exact: the last layer moved absorbs the rounding of the others
    others = sum(w * s for i, (w, s) in enumerate(zip(weights, sparsity, strict=True)) if i != last)
    sparsity[last] = min(max((target * total - others) / weights[last], levels[0]), levels[-1])
    return sparsity


def target_weights_per_layer(targets: list[dict[str, nn.Linear]]) -> list[int]:
    """How many target weights each decoder layer holds (the weights of the parameter-weighted mean)."""
    return [sum(module.weight.numel() for module in layer.values()) for layer in targets]


def sensitivity_sparsities(errors: Tensor, levels: Sequence[float], target: float,
                           targets: list[dict[str, nn.Linear]]) -> list[float]:
    """allocate_sparsities over the layers that have targets (weighted by their target weights); the others get
    `target`, which prunes nothing there."""
    counts = target_weights_per_layer(targets)
    kept = [i for i, count in enumerate(counts) if count]
    chosen = allocate_sparsities(errors[kept], levels, target, [counts[i] for i in kept])
    sparsities = [target] * len(targets)
    for i, s in zip(kept, chosen, strict=True):
        sparsities[i] = s
    return sparsities
