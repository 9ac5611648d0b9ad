"""Width pruning: remove whole MLP channels or attention KV groups, so the saved model is physically smaller.

A unit is either
  - an MLP intermediate channel c: row c of gate_proj and up_proj and column c of down_proj, or
  - an attention KV group g: KV head g of k_proj and v_proj (rows g·d … (g+1)·d, d = head_dim), the
    r = num_attention_heads / num_key_value_heads query heads that read it (rows g·r·d … (g+1)·r·d of q_proj,
    with their biases where the model has them) and the same columns of o_proj. Under grouped-query attention a
    query head cannot outlive its KV head, so whole groups go; per-head_dim norms (Qwen3 q_norm/k_norm) stay.

Score of a unit u (as in structured-pruning work such as LLM-Pruner, Ma et al. 2023, and FLAP, An et al. 2024):
S_u = ‖(I_ij)_{(i,j) ∈ u}‖₂, the L2 norm of the per-weight importance I of every weight that belongs to the unit,
across all its matrices. I = |W| (magnitude), or the activation-aware Wanda score (Sun et al., 2023)
I_ij = |W_ij|·‖X_j‖₂, with ‖X_j‖₂ the norm of input feature j of that Linear over the calibration tokens, or any
OBD's I_ij = (½·F_ij·W_ij²)^½ with F the diagonal Fisher (score "obd"), so that S_u² = Σ_u ½·F·w² is the
unit's second-order saliency, or any other per-weight importance passed as `importance`.

The units with the lowest scores are removed, the same share in every layer (scope "layer") or ranked across
the whole model (scope "global"). Removing a unit is exact on the remaining computation: the smaller model
computes what the full model computes with those units' output weights (down_proj / o_proj columns) zeroed.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from llm_sparsify.models import decoder_layers
from llm_sparsify.structure.resize import (
    ATTENTION,
    MLP,
    UNITS,
    WidthError,
    linear,
    unit_squares,
    units_of,
)

log = logging.getLogger(__name__)

UNIT_WORDS = {"mlp": "MLP channels", "heads": "KV groups"}
SCORES = ("weight", "activation", "obd")
SCOPES = ("layer", "global")


def _importance(layer: nn.Module, names: tuple[str, ...], importance: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """The per-weight importance of each named Linear: the given one, or |W| when none is given."""
    if importance is None:
        return {name: linear(layer, name).weight.detach().float().abs() for name in names}
    missing = [name for name in names if name not in importance]
    if missing:
        raise WidthError(f"importance has no entry for {missing} (keys: {sorted(importance)})")
    for name in names:
        shape = linear(layer, name).weight.shape
        if importance[name].shape != shape:
            raise WidthError(f"importance of {name} has shape {tuple(importance[name].shape)}, "
                             f"its weight {tuple(shape)}")
    return {name: importance[name].detach().float() for name in names}


def channel_scores(layer: nn.Module, importance: dict[str, Tensor] | None = None) -> Tensor:
    """Score of each MLP intermediate channel: L2 norm of its gate/up rows and down column of importance (|W|)."""
    return unit_squares(layer, "mlp", _importance(layer, MLP, importance)).sqrt().cpu()


def group_scores(layer: nn.Module, importance: dict[str, Tensor] | None = None) -> Tensor:
    """Score of each attention KV group: L2 norm of its k/v rows, its query heads' q rows and o columns."""
    return unit_squares(layer, "heads", _importance(layer, ATTENTION, importance)).sqrt().cpu()


def _check_amount_scope(amount: float, scope: str) -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < 1:
        raise WidthError(f"amount must be a fraction in (0, 1) of the units to remove, not {amount!r}")
    if scope not in SCOPES:
        raise WidthError(f"scope must be one of {SCOPES}, not {scope!r}")


def units_per_layer(model: PreTrainedModel, unit: str) -> list[int]:
    """How many MLP channels ("mlp") or KV groups ("heads") each decoder layer has."""
    if unit not in UNITS:
        raise WidthError(f"unit must be one of {tuple(UNITS)}, not {unit!r}")
    return [units_of(layer, unit) for layer in decoder_layers(model)]


def check_amount(sizes: list[int], amount: float, scope: str = "layer", unit: str = "units") -> None:
    """Refuse, before any scoring, an amount that removes no unit at all, or every unit of a layer; `sizes` are the
    units per layer (units_per_layer). round(amount·n) units go from a layer of n, or from all N of the model."""
    _check_amount_scope(amount, scope)
    if not sizes:
        raise WidthError("no layer scores to choose from")
    for i, n in enumerate(sizes if scope == "layer" else [sum(sizes)]):
        remove = int(amount * n + 0.5)
        where = f"layer {i}" if scope == "layer" else "the model"
        if remove == 0:
            raise WidthError(f"width amount {amount} removes none of the {n} {unit} of {where} (round({amount} × {n}) "
                             f"= 0), so nothing would be pruned; use an amount of at least {0.5 / n:.3g}")
        if scope == "layer" and remove >= n:
            raise WidthError(f"amount {amount} removes all {n} units of layer {i}; use a smaller amount")
        if scope == "global" and remove > n - len(sizes):
            raise WidthError(f"amount {amount} removes {remove} of {n} units, leaving fewer than one per layer")


def choose_units(scores: list[Tensor], amount: float, scope: str = "layer", multiple: int = 1) -> list[Tensor]:
    """Per layer, the bool mask of units to keep after removing the `amount` share with the lowest scores.

    Scope "layer" removes round(amount·n) units from every layer of n. Scope "global" ranks all units of the
    model together, after dividing each layer's scores by that layer's mean score: raw scores differ in scale
    from layer to layer (weight and activation norms grow along the residual stream), so an unnormalised ranking
    would empty the layers with small numbers rather than drop the units that matter least within their layer.
    Every layer keeps at least its best unit. With `multiple`, each layer's count kept is then rounded to the
    nearest multiple of it (at least one multiple, at most the layer's units), the best-scoring units kept: 32 MLP
    channels make whole Q8_0 / Q4_0 blocks in a GGUF file, whose rows are otherwise written in F16.
    """
    check_amount([s.numel() for s in scores], amount, scope)
    if multiple < 1:
        raise WidthError(f"multiple must be a positive count of units, not {multiple!r}")
    keep = _choose(scores, amount, scope)
    if multiple == 1:
        return keep
    return [best_units(s, min(s.numel(), max(multiple, round(int(mask.sum()) / multiple) * multiple)))
            for s, mask in zip(scores, keep, strict=True)]


def best_units(scores: Tensor, kept: int) -> Tensor:
    """The bool mask of the `kept` best-scoring units (ties: the earlier unit first)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.argsort(scores.float(), descending=True, stable=True)[:kept]] = True
    return mask


def _choose(scores: list[Tensor], amount: float, scope: str) -> list[Tensor]:
    """choose_units before rounding to a multiple."""
    if scope == "layer":
        keep = []
        for s in scores:
            remove = int(amount * s.numel() + 0.5)
            mask = torch.ones(s.numel(), dtype=torch.bool)
            mask[torch.argsort(s.float(), stable=True)[:remove]] = False
            keep.append(mask)
        return keep
    normalised = []
    for s in scores:
        s = s.float() / s.float().mean().clamp_min(torch.finfo(torch.float32).tiny)
        s[s.argmax()] = float("inf")  # every layer keeps its best unit
        normalised.append(s)
    flat = torch.cat(normalised)
    remove = int(amount * flat.numel() + 0.5)
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    mask[torch.argsort(flat, stable=True)[:remove]] = False
    return list(mask.split([s.numel() for s in scores]))
