"""A recipe on a model in memory: experts -> depth -> width -> pruning (+ quantization) -> recovery.

    remove the least salient MoE experts                 structure/experts.py, scored by expert_pass.py
    remove the least important decoder blocks            structure/depth.py
    remove the weakest MLP channels or KV groups         structure/width.py
    prune (and quantize) layer by layer                  engine.py, with per-layer sparsities (prune/owl.py)
                                                         or the Fisher diagonal (prune/fisher.py) if asked
    fine-tune with the masks frozen, or prune gradually  recover.py

Stages that change the model's shape, need gradients (OBD, recovery) or a look at every layer before
pruning (OWL) need the whole model in host memory; each decoder layer still visits the device alone where the
stage allows. Plain pruning and quantization also stream from disk (api.prune_checkpoint).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from typing import Any

from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_sparsify.data import DataError, calibration_ids
from llm_sparsify.engine import LayerReport, prune_model, target_modules, warn_untargeted
from llm_sparsify.expert_pass import expert_saliencies
from llm_sparsify.fisher_pass import fisher_diagonal
from llm_sparsify.models import decoder_layers
from llm_sparsify.prune.allocation import layer_sensitivities, sensitivity_levels, sensitivity_sparsities
from llm_sparsify.prune.owl import layer_outlier_ratios, owl_sparsities
from llm_sparsify.recipe import Depth, ExpertRemoval, Recipe, RecipeError
from llm_sparsify.recover import finetune, gradual_prune
from llm_sparsify.structure.depth import (
    baseline_importance,
    block_importance,
    blocks_for_budget,
    choose_blocks,
    fuse_importance,
    prune_depth,
    remove_blocks,
)
from llm_sparsify.structure.experts import experts_to_keep, moe_blocks, remove_experts
from llm_sparsify.structure.width import UNIT_WORDS, check_amount, prune_width, units_per_layer

log = logging.getLogger(__name__)


def parameter_count(model: PreTrainedModel) -> int:
    """Parameters of the model, a tied embedding counted once."""
    return sum(p.numel() for p in model.parameters())


def experts_kept(model: PreTrainedModel, removal: ExpertRemoval) -> int:
    """How many experts each MoE layer keeps: all but `remove`, or the most that fit `max_parameters` (the whole
    model's parameters); a RecipeError before any work if that leaves fewer than the router's top-k, or none go."""
    blocks = moe_blocks(model)
    if not blocks:
        raise RecipeError("experts: the model has no mixture-of-experts layers (fused experts with a router)")
    count, top_k = len(blocks[0].experts), model.config.num_experts_per_tok
    if removal.remove is not None:
        keep = count - removal.remove
    else:
        per_expert = sum(sum(p.numel() for p in block.experts[0].parameters()) + block.gate.weight.shape[1]
                         for block in blocks)  # one expert in every MoE layer, and its router row
        keep = count - max(0, -(-(parameter_count(model) - removal.max_parameters) // per_expert))
    if keep < top_k or keep >= count:
        raise RecipeError(f"experts: keeping {keep} of {count} experts per layer is not possible; the router picks "
                          f"{top_k} per token, so keep between {top_k} and {count - 1}")
    return keep


def remove_weak_experts(model: PreTrainedModel, removal: ExpertRemoval, calibration: Tensor, device: str,
                        batch_size: int) -> dict[str, Any]:
    """Score every expert by REAP's saliency and keep the most salient, the same number in every MoE layer."""
    keep = experts_kept(model, removal)
    saliency = expert_saliencies(model, calibration, device, batch_size)
    kept = [experts_to_keep(s, keep) for s in saliency]
    remove_experts(model, kept)
    log.info("experts: kept %d per layer: %s", keep, kept)
    return {"kept": kept, "saliency": [[round(v, 6) for v in s.tolist()] for s in saliency]}


def remove_depth(model: PreTrainedModel, depth: Depth, calibration: Tensor | None,
                 tokenizer: PreTrainedTokenizerBase | None, device: str, batch_size: int) -> dict[str, Any]:
    """Score the decoder blocks (per calibration source, fused) and remove the least important ones."""
    layers = len(decoder_layers(model))
    if depth.iterative:
        removed = prune_depth(model, calibration, depth.blocks, depth.interval, iterative=True, device=device,
                              batch_size=batch_size)
        return {"removed": removed, "iterative": True}
    if depth.score == "cosine":
        if len(depth.sources) == 1:  # the run's own calibration data
            per_source = {next(iter(depth.sources)): block_importance(model, calibration, depth.interval, device,
                                                                      batch_size)}
        else:
            if tokenizer is None:
                raise DataError("depth.sources names text sources: a tokenizer is needed to read them")
            n, seqlen = calibration.shape
            per_source = {source: block_importance(model, calibration_ids(source, tokenizer, n, seqlen, depth.seed),
                                                   depth.interval, device, batch_size)
                          for source in depth.sources}
        importance = fuse_importance(per_source, depth.sources)
    else:
        importance = baseline_importance(depth.score, layers - depth.interval + 1, depth.seed)
    if depth.blocks is not None:
        removed = choose_blocks(importance, depth.blocks, depth.interval)
    else:
        removed = blocks_for_budget(model, depth.max_parameters, importance, depth.interval)
    remove_blocks(model, removed)
    log.info("depth: removed blocks %s of %d", removed, layers)
    return {"removed": removed, "importance": [round(v, 6) for v in importance.tolist()]}


def allocate_by_sensitivity(model: PreTrainedModel, recipe: Recipe, calibration: Tensor, device: str,
                            batch_size: int) -> tuple[list[float], dict[str, Any]]:
    """Per-layer sparsities from each layer's measured damage at several sparsities (prune/allocation.py)."""
    options = recipe.sensitivity
    if not isinstance(recipe.pattern, float):
        raise RecipeError(f"allocation: sensitivity varies the sparsity per layer, so it takes a fraction, not "
                          f"{recipe.pattern_text}")
    targets = target_modules(model, recipe)
    levels = sensitivity_levels(recipe.pattern, options.spread, options.levels)
    tables = layer_sensitivities(model, calibration[:options.samples], levels, targets, device, batch_size)
    sparsities = sensitivity_sparsities(tables[options.error], levels, recipe.pattern, targets)
    return sparsities, {"levels": levels, "errors": tables[options.error].tolist(), "sparsities": sparsities}


def prune_weights_of(model: PreTrainedModel, recipe: Recipe, calibration: Tensor | None, device: str,
                     batch_size: int) -> tuple[list[LayerReport], dict[str, Any]]:
    """The pruning stage: per-layer sparsities (OWL's or measured sensitivity's) or OBD's Fisher first, if the
    recipe asks, then the engine."""
    info: dict[str, Any] = {}
    sparsities = fisher = None
    if recipe.owl is not None:
        if not isinstance(recipe.pattern, float):
            raise RecipeError(f"allocation: owl varies the sparsity per layer, so it takes a fraction, not "
                              f"{recipe.pattern_text}")
        targets = target_modules(model, recipe)
        ratios = layer_outlier_ratios(model, calibration, recipe.owl.threshold, targets, device, batch_size)
        sparsities = owl_sparsities(ratios, recipe.pattern, recipe.owl.lam)
        info["owl"] = {"outlier_ratios": ratios, "sparsities": sparsities}
    if recipe.sensitivity is not None:
        sparsities, info["sensitivity"] = allocate_by_sensitivity(model, recipe, calibration, device, batch_size)
    if recipe.method == "obd":
        modules = {name: module for layer in target_modules(model, recipe) for name, module in layer.items()}
        fisher = fisher_diagonal(model, calibration, modules, device)
    reports = prune_model(model, recipe, calibration, device, batch_size, sparsities=sparsities, fisher=fisher)
    return reports, info


def run_recipe(
    model: PreTrainedModel,
    recipe: Recipe,
    calibration: Tensor | None,
    *,
    training: Tensor | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str = "cpu",
    batch_size: int = 8,
) -> tuple[list[LayerReport], dict[str, Any]]:
    """Run every stage of `recipe` on `model` in place; return the pruning's layer reports and what each stage did.

    `calibration` [nsamples, seqlen] feeds the scores and statistics; `training` the recovery fine-tuning.
    """
    if recipe.method is not None:
        warn_untargeted(model, recipe)
    if recipe.width is not None:  # an amount that removes nothing fails here, not after the depth stage
        check_amount(units_per_layer(model, recipe.width.unit), recipe.width.amount, recipe.width.scope,
                     UNIT_WORDS[recipe.width.unit])
    if recipe.experts is not None:
        experts_kept(model, recipe.experts)  # an impossible count fails here, before any work
    stages: dict[str, Any] = {"parameters_before": parameter_count(model)}
    if recipe.experts is not None:
        stages["experts"] = remove_weak_experts(model, recipe.experts, calibration, device, batch_size)
    if recipe.depth is not None:
        stages["depth"] = remove_depth(model, recipe.depth, calibration, tokenizer, device, batch_size)
    if recipe.width is not None:
        width = recipe.width
        stages["width"] = prune_width(model, width.unit, width.amount, width.score, width.scope, calibration,
                                      device, batch_size)
    reports: list[LayerReport] = []
    recovery = recipe.recovery
    if recipe.method is not None and recovery is not None and recovery.schedule:
        def prune_to(pruned: PreTrainedModel, sparsity: float) -> None:
            reports[:], info = prune_weights_of(pruned, replace(recipe, pattern=sparsity), calibration, device,
                                                batch_size)
            stages.setdefault("pruning", []).append({"sparsity": sparsity, **info})

        stages["recovery"] = gradual_prune(
            model, training, [*recovery.schedule, recipe.pattern], prune_to, recovery.steps, rewind=recovery.rewind,
            lr=recovery.lr, batch_size=recovery.batch_size, lora=recovery.lora, group_lasso=recovery.group_lasso,
            lasso_unit=recovery.lasso_unit, device=device)
    else:
        if recipe.method is not None:
            reports, stages["pruning"] = prune_weights_of(model, recipe, calibration, device, batch_size)
        if recovery is not None:
            losses = finetune(model, training, recovery.steps, recovery.lr, recovery.batch_size, lora=recovery.lora,
                              group_lasso=recovery.group_lasso, lasso_unit=recovery.lasso_unit, device=device)
            stages["recovery"] = {**asdict(recovery), "first_loss": losses[0], "last_loss": losses[-1]}
    stages["parameters_after"] = parameter_count(model)
    return reports, stages
