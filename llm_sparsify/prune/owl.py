"""OWL, Outlier Weighed Layerwise sparsity (Yin et al., 2024): prune layers with more outliers less.

For decoder layer ℓ, with Wanda scores A_ij = |W_ij| · ‖X_j‖₂ of all its Linear weights, the layer outlier
distribution is

    D_ℓ = #{A_ij > M · Ā_ℓ} / #{A_ij}

where Ā_ℓ is the mean score of the layer: one mean over the scores of all its matrices pooled, as the paper's
reference code computes it (it concatenates the layer's score matrices before taking the mean), not a mean per
matrix. The layer sparsities S_ℓ are then linear in D_ℓ, spread over [S − λ, S + λ] (most outliers: S − λ)
and shifted so that their mean is the target S. The paper uses M = 5 and λ = 0.08; the scores come from the
dense model, every layer fed the dense model's own activations. OWL sets only how much each layer loses; which
weights go is the pruning method's choice (Wanda, SparseGPT, magnitude), unstructured only.
"""

from __future__ import annotations

import logging
import math

from torch import Tensor

from llm_sparsify.errors import AllocationError

log = logging.getLogger(__name__)

M = 5.0  # a score is an outlier above M × the mean (the paper's)
LAMBDA = 0.08  # λ: layer sparsities spread over [S − λ, S + λ] (the paper's)


def outlier_ratio(scores: list[Tensor], m: float = M) -> float:
    """Share (0 to 1, not percent) of the scores above m × their mean, the mean pooled over all the given matrices."""
    if not scores:
        raise ValueError("outlier_ratio needs at least one score matrix")
    total = sum(s.double().sum() for s in scores)
    count = sum(s.numel() for s in scores)
    threshold = m * (total / count).item()
    return sum(int((s > threshold).sum()) for s in scores) / count


def owl_sparsities(ratios: list[float], target: float, lam: float = LAMBDA) -> list[float]:
    """Per-layer sparsity from layer outlier ratios: mean exactly `target`, layers with more outliers pruned less.

    S_ℓ = S + λ − 2λ (D_ℓ − min D) / (max D − min D), then all shifted by one constant so that their mean is S. So
    max S_ℓ − min S_ℓ = 2λ (unless all ratios are equal: then every layer gets S), every S_ℓ lies in
    [S − 2λ, S + 2λ], and S_ℓ falls as D_ℓ grows. The mean is over layers, each weighted alike: it is the sparsity
    of the whole model when every layer has the same number of target weights (as in Llama or Mistral).
    """
    if not 0 <= target < 1:
        raise AllocationError(f"OWL target sparsity must lie in [0, 1), got {target}")
    if lam < 0:
        raise AllocationError(f"OWL lambda must be >= 0, got {lam}")
    if not ratios or not all(math.isfinite(r) for r in ratios):
        raise AllocationError(f"OWL needs a finite outlier ratio for every layer, got {ratios}")
    low, high = min(ratios), max(ratios)
    if high == low:
        return [target] * len(ratios)
    spread = [target + lam - 2 * lam * (r - low) / (high - low) for r in ratios]
    shift = target - sum(spread) / len(spread)
    sparsities = [s + shift for s in spread]
    if min(sparsities) < 0 or max(sparsities) >= 1:
        raise AllocationError(f"OWL with target {target} and lambda {lam} gives layer sparsities from "
                          f"{min(sparsities):.3f} to {max(sparsities):.3f}, outside [0, 1); use a smaller lambda")
    return sparsities
