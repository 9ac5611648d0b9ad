"""Optimal Brain Damage (LeCun et al., 1990) with the diagonal empirical Fisher as the Hessian.

OBD removes the weights of least saliency s_q = ½ h_qq w_q², the loss increase a second-order Taylor expansion
predicts for setting w_q to 0 when the loss sits at a minimum (gradient 0) and the Hessian H is taken as diagonal.
Here h_qq is the diagonal empirical Fisher over calibration samples s,

    F_ij = Σ_s (∂L_s/∂W_ij)²,

L_s the causal LM loss of sample s alone: the mean cross-entropy of its tokens, each predicted from the ones
before it. The gradients must be per sample: squaring the gradient of a batch's loss gives (Σ_s g_s)², cross
terms included, not Σ_s g_s². The paper ranks all weights together; `prune_obd` ranks within each output row by
default, as the other methods here do. No weight update. F comes from fisher_pass.py.
"""

from __future__ import annotations

from torch import Tensor

from llm_sparsify.prune.masks import Pattern, select_mask


def obd_scores(weight: Tensor, fisher: Tensor) -> Tensor:
    """OBD saliency ½·F·w² of every weight (float32): the predicted loss increase of removing it."""
    if fisher.shape != weight.shape:
        raise ValueError(f"Fisher {tuple(fisher.shape)} and weight {tuple(weight.shape)} differ in shape")
    return 0.5 * fisher.float().to(weight.device) * weight.float().square()


def prune_obd(weight: Tensor, fisher: Tensor, pattern: Pattern, per_row: bool = True) -> Tensor:
    """Weight with its lowest OBD saliencies set to zero: per output row (default) or over the whole matrix."""
    mask = select_mask(obd_scores(weight, fisher), pattern, per_row)
    return weight.masked_fill(mask, 0)
