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
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils.logging import tqdm

from llm_sparsify.engine import ResidentLayers, capture_layer_inputs, check_calibration, collect_statistics
from llm_sparsify.fisher_pass import fisher_diagonal
from llm_sparsify.models import decoder_layers
from llm_sparsify.prune.fisher import obd_scores
from llm_sparsify.structure.resize import (
    ATTENTION,
    MLP,
    UNITS,
    WidthError,
    head_layout,
    linear,
    remove_kv_groups,
    remove_mlp_channels,
    unit_squares,
    width_parameters,
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


def _layer_output(output: Tensor | tuple) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def _activation_importance_layers(model: PreTrainedModel, calibration: Tensor, device: str | torch.device,
                                  batch_size: int, names: tuple[str, ...] | None = None):
    """Yield per decoder layer the Wanda importance |W|·‖X‖ of its Linears (relative names), dense inputs."""
    check_calibration(model, calibration, "activation-aware width scores")
    device = torch.device(device)
    layers = ResidentLayers(model)
    with layers.stem(device):
        hidden, kwargs = capture_layer_inputs(model, calibration, device, batch_size)
    for i in tqdm(range(len(layers)), desc="activation norms", unit="layer"):
        layer = layers.load(i, device)
        try:
            modules = {n: m for n, m in layer.named_modules()
                       if isinstance(m, nn.Linear) and (names is None or n in names)}
            stats = collect_statistics(layer, modules, hidden, kwargs, hessian=False, device=device)
            yield {name: (module.weight.detach().float().abs() * stats[name].column_norms().reshape(1, -1)).cpu()
                   for name, module in modules.items()}
            del stats
            if i + 1 < len(layers):  # the dense layer's outputs feed the next layer
                hidden = [_layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
        finally:
            layers.unload(i, layer)


def activation_importance(model: PreTrainedModel, calibration: Tensor, device: str | torch.device = "cpu",
                          batch_size: int = 8) -> list[dict[str, Tensor]]:
    """Per decoder layer, Wanda importance |W_ij|·‖X_j‖₂ of every Linear (by relative name), from dense inputs."""
    return list(_activation_importance_layers(model, calibration, device, batch_size))


def obd_importance(model: PreTrainedModel, calibration: Tensor, names: tuple[str, ...],
                   device: str | torch.device = "cpu") -> list[dict[str, Tensor]]:
    """Per decoder layer, (½·F·w²)^½ of the named Linears (relative names), F their diagonal Fisher on `calibration`."""
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    modules = {f"{prefix}.{i}.{name}": linear(layer, name) for i, layer in enumerate(layers) for name in names}
    fisher = fisher_diagonal(model, calibration, modules, device)
    return [{name: obd_scores(linear(layer, name).weight, fisher[f"{prefix}.{i}.{name}"]).sqrt().cpu()
             for name in names} for i, layer in enumerate(layers)]


def _check_amount_scope(amount: float, scope: str) -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < 1:
        raise WidthError(f"amount must be a fraction in (0, 1) of the units to remove, not {amount!r}")
    if scope not in SCOPES:
        raise WidthError(f"scope must be one of {SCOPES}, not {scope!r}")


def units_per_layer(model: PreTrainedModel, unit: str) -> list[int]:
    """How many MLP channels ("mlp") or KV groups ("heads") each decoder layer has."""
    if unit not in UNITS:
        raise WidthError(f"unit must be one of {tuple(UNITS)}, not {unit!r}")
    return [linear(layer, "mlp.gate_proj").out_features if unit == "mlp" else head_layout(layer)[2]
            for layer in decoder_layers(model)]


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


def choose_units(scores: list[Tensor], amount: float, scope: str = "layer") -> list[Tensor]:
    """Per layer, the bool mask of units to keep after removing the `amount` share with the lowest scores.

    Scope "layer" removes round(amount·n) units from every layer of n. Scope "global" ranks all units of the
    model together, after dividing each layer's scores by that layer's mean score: raw scores differ in scale
    from layer to layer (weight and activation norms grow along the residual stream), so an unnormalised ranking
    would empty the layers with small numbers rather than drop the units that matter least within their layer.
    Every layer keeps at least its best unit.
    """
    check_amount([s.numel() for s in scores], amount, scope)
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


def prune_width(
    model: PreTrainedModel,
    unit: str,
    amount: float,
    score: str = "weight",
    scope: str = "layer",
    calibration: Tensor | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    importance: list[dict[str, Tensor]] | None = None,
) -> dict[str, Any]:
    """Score, choose and physically remove `amount` of the MLP channels ("mlp") or KV groups ("heads"); in place.

    `importance`, when given (per layer, e.g. Fisher saliency), is used in place of `score`. Returns a report:
    units kept per layer out of how many, and the parameter count before and after.
    """
    if unit not in UNITS:
        raise WidthError(f"unit must be one of {tuple(UNITS)}, not {unit!r}")
    if score not in SCORES:
        raise WidthError(f"score must be one of {SCORES}, not {score!r}")
    layers = decoder_layers(model)
    if importance is not None and len(importance) != len(layers):
        raise WidthError(f"importance has {len(importance)} entries, the model {len(layers)} decoder layers")
    if importance is None and score != "weight" and calibration is None:
        raise WidthError(f"score {score!r} needs calibration token ids (e.g. calibration_ids('c4', ...))")
    check_amount(units_per_layer(model, unit), amount, scope, UNIT_WORDS[unit])  # before any work
    scorer = channel_scores if unit == "mlp" else group_scores
    if importance is not None:
        per_layer = importance
    elif score == "activation":
        per_layer = _activation_importance_layers(model, calibration, device, batch_size, UNITS[unit])
    elif score == "obd":
        per_layer = obd_importance(model, calibration, UNITS[unit], device)
    else:
        per_layer = [None] * len(layers)
    scores = [scorer(layer, imp) for layer, imp in zip(layers, per_layer, strict=True)]
    keep = choose_units(scores, amount, scope)
    before = width_parameters(model)
    (remove_mlp_channels if unit == "mlp" else remove_kv_groups)(model, keep)
    report = {"unit": unit, "amount": amount, "score": "importance" if importance is not None else score,
              "scope": scope, "kept": [int(k.sum()) for k in keep], "of": [k.numel() for k in keep],
              "parameters_before": before, "parameters_after": width_parameters(model)}
    log.info("width pruning: %s %s of %d, %d -> %d parameters", unit, sum(report["kept"]), sum(report["of"]),
             before, report["parameters_after"])
    return report

