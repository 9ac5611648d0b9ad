"""A recipe's stages over a layer source (a model in memory, or a checkpoint streamed from disk):
experts -> depth -> width -> pruning (+ quantization) -> recovery.

    remove the least salient MoE experts                 structure/experts.py, scored by score_passes.py
    remove the least important decoder blocks            structure/depth.py, scored by score_passes.py
    remove the weakest MLP channels or KV groups         structure/width.py, scored by score_passes.py
    prune (and quantize) layer by layer                  transform_pass.py, with sparsities (prune/owl.py,
                                                         prune/allocation.py) or the Fisher diagonal (prune/fisher.py)
    fine-tune with the masks frozen, or prune gradually  recover.py

Each structure stage is score passes (read only) -> a pure decision -> the change, made through the source
(LayerSource.remove_experts / remove_blocks / remove_units): on the model in memory, or on the skeleton and on the
tensors of each layer as the transform pass reads them. So expert removal, depth, width, OWL and sensitivity
allocation stream from disk (api.prune_checkpoint) as plain pruning does. OBD (gradients through the whole network)
and recovery fine-tuning are whole-model stages: they need the model in host memory (Recipe.whole_model_stages).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_sparsify.architecture import parameter_count
from llm_sparsify.data import DataError, calibration_ids
from llm_sparsify.events import Event
from llm_sparsify.fisher_pass import fisher_diagonal, obd_importance
from llm_sparsify.models import decoder_layers
from llm_sparsify.prune.allocation import sensitivity_levels, sensitivity_sparsities
from llm_sparsify.prune.owl import owl_sparsities
from llm_sparsify.recipe import Budget, Depth, ExpertRemoval, Recipe, RecipeError, Width
from llm_sparsify.recover import finetune, gradual_prune, teacher_logits
from llm_sparsify.score_passes import (
    block_importance,
    expert_saliencies,
    layer_outlier_ratios,
    layer_sensitivities,
    unit_scores,
)
from llm_sparsify.structure.budget import BudgetError, FileCost, plan_budget, smallest, width_levels
from llm_sparsify.structure.depth import (
    DepthError,
    baseline_importance,
    blocks_for_budget,
    check_interval,
    choose_blocks,
    fuse_importance,
)
from llm_sparsify.structure.experts import experts_to_keep, moe_blocks
from llm_sparsify.structure.resize import UNITS, WidthError
from llm_sparsify.structure.width import (
    SCORES,
    UNIT_WORDS,
    best_units,
    channel_scores,
    check_amount,
    choose_units,
    group_scores,
    units_per_layer,
)
from llm_sparsify.targets import target_modules, warn_untargeted
from llm_sparsify.transform_pass import prune_layers
from llm_sparsify.walk import BATCH_SIZE, LayerReport, LayerSource, ResidentLayers

log = logging.getLogger(__name__)


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


def remove_weak_experts(model: PreTrainedModel, layers: LayerSource, removal: ExpertRemoval, calibration: Tensor,
                        device: str, batch_size: int, on_event: Event | None = None) -> dict[str, Any]:
    """Score every expert by REAP's saliency and keep the most salient, the same number in every MoE layer."""
    keep = experts_kept(model, removal)
    saliency = expert_saliencies(model, calibration, device, batch_size, layers=layers, on_event=on_event)
    kept = [experts_to_keep(s, keep) for s in saliency]
    layers.remove_experts(kept)
    log.info("experts: kept %d per layer: %s", keep, kept)
    return {"kept": kept, "saliency": [[round(v, 6) for v in s.tolist()] for s in saliency]}


def remove_depth(model: PreTrainedModel, layers: LayerSource, depth: Depth, calibration: Tensor | None,
                 tokenizer: PreTrainedTokenizerBase | None, device: str, batch_size: int,
                 on_event: Event | None = None) -> dict[str, Any]:
    """Score the decoder blocks (per calibration source, fused) and remove the least important ones; `iterative`
    removes one span at a time and scores the smaller model again (each removal changes what later blocks see)."""
    count = len(layers)
    if depth.iterative:
        alive, removed = list(range(count)), []  # original index of each block still in the model
        for _ in range(depth.blocks):
            blocks = choose_blocks(block_importance(model, calibration, depth.interval, device, batch_size,
                                                    layers=layers, on_event=on_event), 1, depth.interval)
            layers.remove_blocks(blocks)
            removed += [alive[i] for i in blocks]
            alive = [index for i, index in enumerate(alive) if i not in blocks]
        log.info("depth: removed blocks %s of %d, one span at a time", sorted(removed), count)
        return {"removed": sorted(removed), "iterative": True}
    if depth.score == "cosine":
        if len(depth.sources) == 1:  # the run's own calibration data
            samples = {next(iter(depth.sources)): calibration}
        else:
            if tokenizer is None:
                raise DataError("depth.sources names text sources: a tokenizer is needed to read them")
            n, seqlen = calibration.shape
            samples = {source: calibration_ids(source, tokenizer, n, seqlen, depth.seed) for source in depth.sources}
        importance = fuse_importance({source: block_importance(model, ids, depth.interval, device, batch_size,
                                                               layers=layers, on_event=on_event)
                                      for source, ids in samples.items()},
                                     depth.sources)
    else:
        importance = baseline_importance(depth.score, count - depth.interval + 1, depth.seed)
    if depth.blocks is not None:
        removed = choose_blocks(importance, depth.blocks, depth.interval)
    else:
        removed = blocks_for_budget(model, depth.max_parameters, importance, depth.interval)
    layers.remove_blocks(removed)
    log.info("depth: removed blocks %s of %d", removed, count)
    return {"removed": removed, "importance": [round(v, 6) for v in importance.tolist()]}


def prune_width(
    model: PreTrainedModel,
    unit: str,
    amount: float,
    score: str = Width.score,
    scope: str = Width.scope,
    calibration: Tensor | None = None,
    device: str = "cpu",
    batch_size: int = BATCH_SIZE,
    importance: list[dict[str, Tensor]] | None = None,
    *,
    multiple: int = Width.multiple,
    layers: LayerSource | None = None,
    on_event: Event | None = None,
) -> dict[str, Any]:
    """Score, choose and physically remove `amount` of the MLP channels ("mlp") or KV groups ("heads") of every
    decoder layer that `layers` (default: the model in memory) holds; in place. `importance`, when given (per layer,
    e.g. Fisher saliency), is used in place of `score`. Returns a report: units kept per layer out of how many, and
    the parameter count before and after."""
    layers = layers or ResidentLayers(model)
    if unit not in UNITS:
        raise WidthError(f"unit must be one of {tuple(UNITS)}, not {unit!r}")
    if score not in SCORES:
        raise WidthError(f"score must be one of {SCORES}, not {score!r}")
    if importance is not None and len(importance) != len(layers):
        raise WidthError(f"importance has {len(importance)} entries, the model {len(layers)} decoder layers")
    if importance is None and score != "weight" and calibration is None:
        raise WidthError(f"score {score!r} needs calibration token ids (e.g. calibration_ids('c4', ...))")
    check_amount(units_per_layer(model, unit), amount, scope, UNIT_WORDS[unit])  # before any work
    given = "importance" if importance is not None else score
    if importance is None and score == "obd":  # gradients through the whole model in memory
        importance = obd_importance(model, calibration, UNITS[unit], device, on_event=on_event)
    if importance is not None:
        scorer = channel_scores if unit == "mlp" else group_scores
        scores = [scorer(layer, imp) for layer, imp in zip(decoder_layers(model), importance, strict=True)]
    else:
        scores = unit_scores(model, unit, score, calibration, device, batch_size, layers=layers, on_event=on_event)
    keep = choose_units(scores, amount, scope, multiple)
    before = parameter_count(model)
    layers.remove_units(unit, keep)
    report = {"unit": unit, "amount": amount, "score": given,
              "scope": scope, "kept": [int(k.sum()) for k in keep], "of": [k.numel() for k in keep],
              "parameters_before": before, "parameters_after": parameter_count(model)}
    log.info("width pruning: %s %s of %d, %d -> %d parameters", unit, sum(report["kept"]), sum(report["of"]),
             before, report["parameters_after"])
    return report


@dataclass
class BudgetUnits:
    """What the budget planner measured of a model (measure_budget_units): its file's cost model, each layer's MLP
    channel scores and widths, the dense calibration loss and each unit's loss increase; where KV groups are planned,
    each layer's group scores, the group counts tried and their loss increases; where parts may be upgraded, each
    layer's (attention, MLP) loss increase at the file's type."""

    cost: FileCost
    scores: list[Tensor]
    widths: list[list[int]]
    base: float
    blocks: list[float]
    narrowed: list[list[float]]
    output: float | None
    group_scores: list[Tensor] | None = None
    group_counts: list[list[int]] | None = None
    grouped: list[list[float]] | None = None
    parts: list[tuple[float, float]] | None = None


def group_counts(cost: FileCost, budget: Budget) -> list[list[int]]:
    """The KV group counts each layer may keep: all, then down to at most `max_kv` of them removed (all only, when
    max_kv is 0)."""
    return [width_levels(c.groups, budget.levels, budget.max_kv) if budget.max_kv else [c.groups] for c in cost.layers]


def budget_limit(cost: FileCost, widths: list[list[int]], budget: Budget) -> tuple[str, float]:
    """The budget as (measure, limit) of `cost`, refused if no plan could meet it."""
    dense = [w[0] for w in widths]
    measure = "size" if budget.size is not None else "time"
    of = cost.size if measure == "size" else cost.time
    limit = of(dense) * budget.size if budget.size is not None else of(dense) / budget.decode_speedup
    least = of(smallest(widths), True, [counts[-1] for counts in group_counts(cost, budget)])
    if least > limit:
        raise BudgetError(f"budget {measure} {limit / of(dense):.3f} of dense is below what one block at its narrowest "
                          f"width costs ({least / of(dense):.3f}); raise the budget")
    return measure, limit


def measure_budget_units(model: PreTrainedModel, layers: LayerSource, budget: Budget, calibration: Tensor,
                         device: str, batch_size: int, on_event: Event | None = None) -> BudgetUnits:
    """Score every MLP channel (and KV group, where planned: streamed score passes), then measure what each block,
    MLP width, KV group count and the output layer's type cost in calibration loss (budget_pass.py, on the whole
    model). A budget no plan meets is refused first."""
    from llm_sparsify.budget_pass import file_cost, unit_losses  # gguf: not on every machine

    cost = file_cost(model, budget.qtype, upgrade=budget.upgrade)
    widths = [width_levels(c.channels, budget.levels, budget.max_mlp) for c in cost.layers]
    budget_limit(cost, widths, budget)  # before any measurement
    counts = group_counts(cost, budget) if budget.max_kv else None
    scores = unit_scores(model, "mlp", "activation", calibration, device, batch_size, layers=layers, on_event=on_event)
    groups = unit_scores(model, "heads", "activation", calibration, device, batch_size, layers=layers,
                         on_event=on_event) if counts else None
    losses = unit_losses(
        model, calibration[: budget.samples], scores, widths, device, budget.qtype if cost.output_saving > 0 else None,
        group_scores=groups, group_counts=counts, part_qtype=budget.qtype if budget.upgrade else None,
        on_event=on_event)
    return BudgetUnits(cost, scores, widths, losses["base"], losses["blocks"], losses["narrowed"], losses["output"],
                       groups, counts, losses["grouped"], losses["parts"])


def apply_budget_plan(layers: LayerSource, budget: Budget, units: BudgetUnits) -> dict[str, Any]:
    """Plan the cheapest removal that meets `budget` (structure/budget.py) and apply it through `layers`: channels and
    KV groups first, then blocks. The output layer's type and the parts planned at the upgrade type (per layer kept,
    [attention, MLP]) are recorded for the GGUF export (export/gguf.planned_types).
    Returns the plan with its predictions and the measurements it came from."""
    measure, limit = budget_limit(units.cost, units.widths, budget)
    cost, dense = units.cost, [w[0] for w in units.widths]
    plan = plan_budget(units.blocks, units.narrowed, units.widths, cost, measure, limit, units.output,
                       group_losses=units.grouped, group_counts=units.group_counts, part_losses=units.parts)
    for unit, scores, counts in (("mlp", units.scores, plan.kept), ("heads", units.group_scores, plan.groups)):
        if scores is not None:
            layers.remove_units(unit, [torch.ones(s.numel(), dtype=torch.bool) if kept is None else best_units(s, kept)
                                       for s, kept in zip(scores, counts, strict=True)])
    layers.remove_blocks(plan.removed_blocks)
    chosen = (plan.kept, plan.small_output, plan.groups, plan.up)
    report = {"measure": measure, "qtype": budget.qtype, "removed": plan.removed_blocks, "kept": plan.kept,
              "of": dense, "groups": plan.groups, "of_groups": [c.groups for c in cost.layers],
              "small_output": plan.small_output, "upgrade": budget.upgrade,
              "upgraded": [list(up) for up in plan.up if up is not None] if budget.upgrade else None, "predicted": {
                  "size": round(cost.size(*chosen) / cost.size(dense), 4),
                  "decode_speedup": round(cost.time(dense) / cost.time(*chosen), 4),
                  "tensor_bytes": int(cost.size(*chosen)),
                  "calibration_loss": round(units.base + plan.predicted_loss, 4),
                  "calibration_perplexity": round(math.exp(units.base + plan.predicted_loss), 3)},
              "dense": {"tensor_bytes": int(cost.size(dense)), "calibration_loss": round(units.base, 4)},
              "block_losses": [round(b, 5) for b in units.blocks],
              "width_losses": [[round(v, 5) for v in row] for row in units.narrowed],
              "group_losses": units.grouped and [[round(v, 5) for v in row] for row in units.grouped],
              "part_losses": units.parts and [[round(v, 5) for v in row] for row in units.parts],
              "output_loss": None if units.output is None else round(units.output, 5)}
    log.info("budget: removed blocks %s, MLP widths %s, KV groups %s, parts at %s %s, output layer at %s; predicted "
             "size %.3f, decode speed-up %.3f, calibration perplexity %.3f", plan.removed_blocks,
             [k for k in plan.kept if k is not None], [g for g in plan.groups if g is not None], budget.upgrade,
             report["upgraded"], budget.qtype if plan.small_output else "its own type", report["predicted"]["size"],
             report["predicted"]["decode_speedup"], report["predicted"]["calibration_perplexity"])
    return report


def plan_for_budget(model: PreTrainedModel, layers: LayerSource, budget: Budget, calibration: Tensor, device: str,
                    batch_size: int, on_event: Event | None = None) -> dict[str, Any]:
    """The budget stage: measure_budget_units, then apply_budget_plan."""
    units = measure_budget_units(model, layers, budget, calibration, device, batch_size, on_event)
    return apply_budget_plan(layers, budget, units)


def layer_sparsities(model: PreTrainedModel, layers: LayerSource, recipe: Recipe, calibration: Tensor | None,
                     device: str, batch_size: int,
                     on_event: Event | None = None) -> tuple[list[float] | None, dict[str, Any]]:
    """Each decoder layer's sparsity, if the recipe allocates it: OWL's (outlier ratios) or measured sensitivity's
    (damage at several sparsities, prune/allocation.py), each from a score pass over `layers`; else None."""
    if recipe.owl is None and recipe.sensitivity is None:
        return None, {}
    if not isinstance(recipe.pattern, float):
        raise RecipeError(f"allocation: {'owl' if recipe.owl else 'sensitivity'} varies the sparsity per layer, so it "
                          f"takes a fraction, not {recipe.pattern_text}")
    targets = target_modules(model, recipe)
    start = time.perf_counter()
    if recipe.owl is not None:
        ratios = layer_outlier_ratios(model, calibration, recipe.owl.threshold, targets, device, batch_size,
                                      layers=layers, on_event=on_event)
        sparsities = owl_sparsities(ratios, recipe.pattern, recipe.owl.lam)
        kind, found = "owl", {"outlier_ratios": ratios, "sparsities": sparsities}
    else:
        options = recipe.sensitivity
        levels = sensitivity_levels(recipe.pattern, options.spread, options.levels)
        tables = layer_sensitivities(model, calibration[:options.samples], levels, targets, device, batch_size,
                                     layers=layers, on_event=on_event)
        sparsities = sensitivity_sparsities(tables[options.error], levels, recipe.pattern, targets)
        kind, found = "sensitivity", {"levels": levels, "errors": tables[options.error].tolist(),
                                      "sparsities": sparsities}
    return sparsities, {kind: found | {"seconds": round(time.perf_counter() - start, 2)}}


def check_structure(model: PreTrainedModel, recipe: Recipe) -> None:
    """Refuse, before any work, a width amount that removes no unit, or an impossible expert count, and warn about
    targets that leave most of the decoder untouched."""
    if recipe.method is not None:
        warn_untargeted(model, recipe)
    if recipe.width is not None:  # an amount that removes nothing fails here, not after the depth stage
        check_amount(units_per_layer(model, recipe.width.unit), recipe.width.amount, recipe.width.scope,
                     UNIT_WORDS[recipe.width.unit])
    if recipe.experts is not None:
        experts_kept(model, recipe.experts)
    depth, layers = recipe.depth, len(decoder_layers(model))
    if depth is not None and depth.blocks is not None:
        check_interval(depth.interval, layers)
        if depth.blocks * depth.interval >= layers:
            raise DepthError(f"cannot remove {depth.blocks} span(s) of {depth.interval} block(s) from {layers} "
                             "blocks: at least one must stay")


def timed(stage: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """What `stage` returns, with the seconds it took."""
    start = time.perf_counter()
    return stage(*args, **kwargs) | {"seconds": round(time.perf_counter() - start, 2)}


def restructure(model: PreTrainedModel, layers: LayerSource, recipe: Recipe, calibration: Tensor | None, *,
                tokenizer: PreTrainedTokenizerBase | None, device: str, batch_size: int,
                on_event: Event | None = None) -> dict[str, Any]:
    """The structure stages of `recipe` (experts, depth, width), each scored on what the stage before left; the model
    and `layers` change in place. Returns what each did, and the parameter counts before and after."""
    stages: dict[str, Any] = {"parameters_before": parameter_count(model)}
    if recipe.experts is not None:
        stages["experts"] = timed(remove_weak_experts, model, layers, recipe.experts, calibration, device, batch_size,
                                    on_event)
    if recipe.depth is not None:
        stages["depth"] = timed(remove_depth, model, layers, recipe.depth, calibration, tokenizer, device, batch_size,
                                  on_event)
    if recipe.budget is not None:
        stages["budget"] = timed(plan_for_budget, model, layers, recipe.budget, calibration, device, batch_size,
                                 on_event)
    if recipe.width is not None:
        width: Width = recipe.width
        stages["width"] = timed(prune_width, model, width.unit, width.amount, width.score, width.scope, calibration,
                                device, batch_size, multiple=width.multiple, layers=layers, on_event=on_event)
    return stages


def prune_weights_of(model: PreTrainedModel, recipe: Recipe, calibration: Tensor | None, device: str,
                     batch_size: int, on_event: Event | None = None) -> tuple[list[LayerReport], dict[str, Any]]:
    """The pruning stage on a model in memory: per-layer sparsities (OWL's or measured sensitivity's) or OBD's Fisher
    first, if the recipe asks, then the transform pass."""
    layers = ResidentLayers(model)
    sparsities, info = layer_sparsities(model, layers, recipe, calibration, device, batch_size, on_event)
    fisher = None
    if recipe.needs_fisher:  # OBD: gradients through the whole model first
        modules = {name: module for layer in target_modules(model, recipe) for name, module in layer.items()}
        fisher = fisher_diagonal(model, calibration, modules, device, on_event=on_event)
    reports = prune_layers(model, layers, recipe, calibration, device, batch_size, sparsities=sparsities, fisher=fisher,
                           on_event=on_event)
    return reports, info


def run_recipe(
    model: PreTrainedModel,
    recipe: Recipe,
    calibration: Tensor | None,
    *,
    training: Tensor | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str = "cpu",
    batch_size: int = BATCH_SIZE,
    on_event: Event | None = None,
) -> tuple[list[LayerReport], dict[str, Any]]:
    """Run every stage of `recipe` on `model` in memory, in place; return the pruning's layer reports and what each
    stage did. `calibration` [nsamples, seqlen] feeds the scores and statistics; `training` the recovery fine-tuning.
    """
    check_structure(model, recipe)
    recovery = recipe.recovery
    teacher = None  # the dense model's logits, taken before anything is removed
    if recovery is not None and recovery.loss == "kl":
        teacher = teacher_logits(model, training, recovery.top_k, recovery.batch_size, device)
    stages = restructure(model, ResidentLayers(model), recipe, calibration, tokenizer=tokenizer, device=device,
                         batch_size=batch_size, on_event=on_event)
    reports: list[LayerReport] = []
    if recipe.method is not None and recovery is not None and recovery.schedule:
        def prune_to(pruned: PreTrainedModel, sparsity: float) -> None:
            reports[:], info = prune_weights_of(pruned, replace(recipe, pattern=sparsity), calibration, device,
                                                batch_size, on_event)
            stages.setdefault("pruning", []).append({"sparsity": sparsity, **info})

        stages["recovery"] = gradual_prune(
            model, training, [*recovery.schedule, recipe.pattern], prune_to, recovery.steps, rewind=recovery.rewind,
            lr=recovery.lr, batch_size=recovery.batch_size, lora=recovery.lora, group_lasso=recovery.group_lasso,
            lasso_unit=recovery.lasso_unit, device=device, on_event=on_event, teacher=teacher)
    else:
        if recipe.method is not None:
            reports, stages["pruning"] = prune_weights_of(model, recipe, calibration, device, batch_size, on_event)
        if recovery is not None:
            losses = finetune(model, training, recovery.steps, recovery.lr, recovery.batch_size, lora=recovery.lora,
                              group_lasso=recovery.group_lasso, lasso_unit=recovery.lasso_unit, device=device,
                              on_event=on_event, teacher=teacher)
            stages["recovery"] = {**asdict(recovery), "first_loss": losses[0], "last_loss": losses[-1]}
    stages["parameters_after"] = parameter_count(model)
    return reports, stages
