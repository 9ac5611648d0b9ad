"""The transform pass: the walk (walk.py) that writes. Per decoder layer:

    inputs: pruned (default) -- one forward of all samples, each group of modules (q/k/v, o, gate/up, down) pruned
        as soon as every sample has reached its input (interleaved.py); its outputs are the next layer's inputs
    inputs: dense (the reference code's order) -- run all samples through it while hooks accumulate input
        statistics, prune every target Linear, then run all samples through the pruned layer for the next layer
    reconstruction (if the recipe has it): fit the kept weights so that the layer reproduces the dense outputs,
        computed before pruning on the samples the fit reads (reconstruct.py); then run it again for the next layer
    save it (streaming: write its shard)

The methods themselves are functions on tensors (prune/, quantize/); this module hands them each layer's targets
and statistics and puts their results back.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from llm_sparsify import distributed
from llm_sparsify.events import Event, emit
from llm_sparsify.interleaved import module_groups, prune_during_forward
from llm_sparsify.prune import input_permutation, method_statistic, prune_weights, quantize_weights
from llm_sparsify.prune.magnitude import global_magnitude_threshold, prune_below
from llm_sparsify.quantize.grid import Grid
from llm_sparsify.recipe import Recipe, Reconstruction
from llm_sparsify.reconstruct import reconstruct_layer, relative_error
from llm_sparsify.stats import InputStatistics
from llm_sparsify.structure.experts import Experts, moe_modules
from llm_sparsify.structure.permutation import attention_heads, fold_layer_permutations
from llm_sparsify.targets import count_zeros, target_modules
from llm_sparsify.walk import (
    BATCH_SIZE,
    Captured,
    LayerReport,
    LayerSource,
    ResidentLayers,
    check_calibration,
    collect_statistics,
    forward_layer,
    walk,
)

log = logging.getLogger(__name__)

PRUNED_AT_ONCE = 1 << 27  # weights of one input pruned together (see whole_matrix_runs)


def zero_share(weight: Tensor) -> float:
    return (weight == 0).sum().item() / weight.numel()


@torch.no_grad()
def prune_layers(
    model: PreTrainedModel,
    layers: LayerSource,
    recipe: Recipe,
    calibration: Tensor | None,
    device: str | torch.device = "cpu",
    batch_size: int = BATCH_SIZE,
    finished: list[LayerReport] | None = None,
    sparsities: list[float] | None = None,
    fisher: dict[str, Tensor] | None = None,
    *,
    on_event: Event | None = None,
) -> list[LayerReport]:
    """The transform pass: a walk (walk.py) that prunes (and quantizes, reconstructs) each decoder layer that
    `layers` hands out, on `device`, saves it and feeds its pruned outputs to the next.

    `finished` holds the reports of layers already pruned by an earlier, interrupted run: those are only run forward
    (from their saved, pruned weights) to rebuild the next layer's inputs. `sparsities` gives each layer its own
    (e.g. OWL's), instead of the recipe's. `fisher` holds the diagonal Fisher of each target weight, for OBD
    (prune/fisher.py). Under torch.distributed each rank brings its share of `calibration` (see distributed.py).
    """
    device = torch.device(device)
    # a recipe without a pruning section (depth, width only) writes each layer as the structure stages left it
    targets = target_modules(model, recipe) if recipe.method else [{} for _ in range(len(layers))]
    statistic = None if recipe.statistic == "fisher" else recipe.statistic  # OBD: gradients, taken before
    if recipe.needs_fisher and fisher is None:
        raise ValueError("OBD needs the Fisher diagonal of every target weight (prune/fisher.fisher_diagonal)")
    fit = recipe.reconstruction
    streams = statistic is not None or fit is not None  # calibration activations go through the layers
    if streams:
        needs = method_statistic(recipe.method, recipe.options) or fit  # else only GPTQ needs the data
        check_calibration(model, calibration, recipe.method if needs else "gptq")
    threshold = None
    if recipe.options.get("scope") == "global":  # magnitude ranked across the model
        threshold = global_magnitude_threshold(lambda: layers.target_weights(targets), recipe.pattern)
    reports = list(finished or [])
    groups: dict[tuple[str, ...], list[list[str]]] = {}  # module grouping, per layer structure
    permute = bool(recipe.options.get("permute"))
    dense: list[Tensor] | None = None  # reconstruction toward the dense model: its stream over the fitted batches

    def visit(i: int, layer: nn.Module, hidden: list[Tensor], kwargs: list[dict]) -> list[Tensor] | None:
        nonlocal dense
        n = fitted_batches(hidden, fit) if fit is not None else 0  # the leading input batches a fit reads
        if fit is not None and fit.targets == "dense" and dense is None:
            dense = hidden[:n]
        last = i + 1 == len(layers)
        if i < len(reports):  # finished by an earlier run: the walk only propagates through it
            if dense is not None and not last:  # the dense stream, through the dense layer
                original = layers.load(i, device, original=True)  # a streamed layer is one module: the pruned
                dense = [forward_layer(original, h, kw, device) for h, kw in zip(dense, kwargs[:n], strict=True)]
                layers.load(i, device)  # weights are loaded again for the walk's forward
            return None
        outputs = teacher = None
        recipe_i = recipe if sparsities is None else replace(recipe, pattern=sparsities[i])
        if fit is not None:  # the dense layer's outputs, before any pruning
            teacher = [forward_layer(layer, h, kw, device) for h, kw in zip(dense or hidden[:n], kwargs[:n],
                                                                             strict=True)]
        permutable = permutable_inputs(model, layer, targets[i]) if permute else None
        if statistic is not None:
            calibrate_experts(i, layer, targets[i], hidden, kwargs, recipe.expert_tokens, device)
        if targets[i] and statistic is not None and recipe.inputs == "pruned":
            report, outputs = prune_interleaved(i, layer, targets[i], hidden, kwargs, recipe_i, layers, device,
                                                not last or fit is not None, groups, threshold, fisher, permutable)
        else:
            stats = {}
            if targets[i] and statistic is not None:
                stats = collect_statistics(layer, targets[i], hidden, kwargs, statistic == "hessian", device)
                distributed.sum_statistics(stats.values())
            report = prune_modules(i, targets[i], stats, recipe_i, threshold, fisher=fisher, permutable=permutable)
            del stats
        for _, experts in moe_modules(layer, unfused=True):
            experts.all_tokens = set()  # from here on, every expert runs on its routed tokens only
        if fit is not None and targets[i]:
            report.reconstruction, outputs = fit_layer(layer, list(targets[i].values()), hidden, kwargs, teacher,
                                                       outputs, fit, layers, device)
        if permutable:
            fold_permutations(model, layer)
        layers.save(i, layer, report)
        report.weights, report.zeros = count_zeros(layer)  # as saved (streaming: in the checkpoint's dtypes)
        reports.append(report)
        if dense is not None:
            dense = teacher
        return outputs

    resumed = len(reports)

    def timed(kind: str, value: Any) -> None:
        """A layer pruned now takes its time from the walk's event, which comes before the source records it."""
        if kind == "layer" and value["index"] >= resumed:
            reports[value["index"]].seconds = value["seconds"]
        emit(on_event, kind, value)

    quantized = f" + {recipe.quantization.method}" if recipe.quantization else ""
    what = f"{recipe.method} {recipe.pattern_text}{quantized}" if recipe.method else "writing layers"
    walk(model, layers, calibration if streams else None, visit, device=device, batch_size=batch_size, what=what,
         done=resumed, interleaved=recipe.inputs == "pruned", on_event=timed)
    return reports


def calibrate_experts(index: int, layer: nn.Module, modules: dict[str, nn.Linear], hidden: list[Tensor],
                      kwargs: list[dict], mode: str, device: torch.device) -> None:
    """Choose, in each MoE block of the layer (structure/experts.Experts), the experts whose target projections
    gather their statistics from every token: all of them (`mode` all), or (routed) those the router sends fewer
    tokens than the widest input among their targets, which would leave too few samples (a warning names them).
    The counts come from one forward of the layer up to its experts, before any pruning."""
    blocks = [experts for _, experts in moe_modules(layer, unfused=True)]
    targeted = set(modules.values())
    widths = [[max((m.in_features for m in expert.modules() if m in targeted), default=0) for expert in block]
              for block in blocks]
    if mode == "all":
        for block in blocks:
            block.all_tokens = set(range(len(block)))
        return
    if not any(w for widths_of in widths for w in widths_of):
        return
    counts = distributed.total(routed_tokens(layer, blocks, hidden, kwargs, device))
    for b, block in enumerate(blocks):
        starved = {e: int(counts[b, e]) for e, width in enumerate(widths[b]) if width and counts[b, e] < width}
        block.all_tokens = set(starved)
        if starved:
            log.warning("layer %d: the router sent experts %s fewer calibration tokens (%s) than their input width "
                        "(%d); they are calibrated on all tokens (more calibration data avoids this)", index,
                        ", ".join(map(str, starved)), ", ".join(map(str, starved.values())), max(widths[b]))


@torch.no_grad()
def routed_tokens(layer: nn.Module, blocks: list[Experts], hidden: list[Tensor], kwargs: list[dict],
                  device: torch.device) -> Tensor:
    """[blocks, experts]: for each MoE block of the layer (in `blocks` order), how many calibration tokens the router
    sends each expert. Each forward stops at the last block's input."""
    counts = torch.zeros(len(blocks), max(len(block) for block in blocks), dtype=torch.long, device=device)

    def count(b: int):
        def hook(module: nn.Module, args: tuple) -> None:
            counts[b, :len(module)] += torch.bincount(args[1].flatten(), minlength=len(module))
            if b == len(blocks) - 1:
                raise Captured
        return hook

    handles = [block.register_forward_pre_hook(count(b)) for b, block in enumerate(blocks)]
    try:
        for h, kw in zip(hidden, kwargs, strict=True):
            with contextlib.suppress(Captured):
                layer(h.to(device), **kw)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def permutable_inputs(model: PreTrainedModel, layer: nn.Module,
                      modules: dict[str, nn.Linear]) -> dict[str, tuple[int, int, int] | None]:
    """The target modules whose inputs a permutation can reorder exactly (structure/permutation.py): mlp.down_proj
    (None: free, folded into gate/up_proj) and self_attn.o_proj (its heads, folded into v_proj)."""
    mlp, attention = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
    found: dict[str, tuple[int, int, int] | None] = {}
    for name, module in modules.items():
        if module is getattr(mlp, "down_proj", None) and hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
            found[name] = None
        elif module is getattr(attention, "o_proj", None) and hasattr(attention, "v_proj"):
            found[name] = attention_heads(model.config)
    return found


def fold_permutations(model: PreTrainedModel, layer: nn.Module) -> None:
    """Put the input permutations the pruning chose (module.input_permutation) into the layer's weights: the saved
    layer computes the same function, its N:M groups in storage order."""
    def chosen(owner: str, name: str) -> Tensor | None:
        module = getattr(getattr(layer, owner, None), name, None)
        return None if module is None else vars(module).pop("input_permutation", None)

    down, attention = chosen("mlp", "down_proj"), chosen("self_attn", "o_proj")
    fold_layer_permutations(layer, down, attention, attention_heads(model.config) if attention is not None else None)


def fitted_batches(hidden: list[Tensor], fit: Reconstruction) -> int:
    """How many leading input batches hold the steps × batch_size samples a reconstruction reads (all if fewer):
    only these need the dense stream and the targets."""
    need, have = fit.steps * fit.batch_size, 0
    for b, h in enumerate(hidden):
        have += len(h)
        if have >= need:
            return b + 1
    return len(hidden)


def fit_layer(
    layer: nn.Module, modules: list[nn.Linear], hidden: list[Tensor], kwargs: list[dict], teacher: list[Tensor],
    outputs: list[Tensor] | None, fit: Reconstruction, layers: LayerSource, device: torch.device,
) -> tuple[list[float], list[Tensor] | None]:
    """Reconstruct a pruned layer (reconstruct.py) on the leading input batches that `teacher` covers, and keep the
    fit only if it brings the layer's outputs there closer to `teacher`. Returns [error before, error after] and
    the layer's outputs on every input as kept (None: not computed). `outputs`: the pruned layer's, if the
    pruning's forward made them."""
    n = len(teacher)
    pruned = outputs[:n] if outputs else [forward_layer(layer, h, kw, device) for h, kw in zip(hidden[:n], kwargs[:n],
                                                                                          strict=True)]
    backup = [(module.weight != 0, module.weight[module.weight != 0]) for module in modules]  # the pruned weights
    reconstruct_layer(layer, modules, hidden[:n], kwargs[:n], teacher, device, fit.steps, fit.lr, fit.batch_size)
    layers.round_to_storage(layer)
    fitted = [forward_layer(layer, h, kw, device) for h, kw in zip(hidden, kwargs, strict=True)]
    before, after = relative_error(pruned, teacher), relative_error(fitted[:n], teacher)
    if after < before:
        return [before, after], fitted
    log.info("reconstruction did not lower the layer's output error (%.4g -> %.4g): kept as pruned", before, after)
    for module, (kept, values) in zip(modules, backup, strict=True):
        module.weight.data = torch.zeros_like(module.weight).masked_scatter(kept, values)
    return [before, before], outputs


def prune_interleaved(
    index: int, layer: nn.Module, modules: dict[str, nn.Linear], hidden: list[Tensor], kwargs: list[dict],
    recipe: Recipe, layers: LayerSource, device: torch.device, outputs: bool,
    groups: dict[tuple[str, ...], list[list[str]]], threshold: float | None = None,
    fisher: dict[str, Tensor] | None = None, permutable: dict[str, tuple[int, int, int] | None] | None = None,
) -> tuple[LayerReport, list[Tensor] | None]:
    """Prune one layer's modules group by group during its one forward (see interleaved.py); return the
    report and the pruned layer's outputs. `groups` caches the grouping found for each layer structure."""
    relative = {module: name for name, module in layer.named_modules()}
    full = {relative[module]: name for name, module in modules.items()}
    key = tuple(full)
    if key not in groups:
        found = module_groups(layer, modules, hidden[0], kwargs[0], device)
        groups[key] = [[relative[modules[name]] for name in names] for names in found]
    report = LayerReport(index, 0.0)

    def prune_group(g: int, names: list[str], stats: InputStatistics) -> None:
        done = prune_modules(index, {name: modules[name] for name in names}, dict.fromkeys(names, stats), recipe,
                             threshold, first_group=g, fisher=fisher, permutable=permutable)
        report.sparsity.update(done.sparsity)
        report.error.update(done.error)
        # later modules must see the values that are saved
        layers.round_to_storage(layer, [f"{relative[modules[name]]}.weight" for name in names])

    named_groups = [[full[name] for name in names] for names in groups[key]]
    out = prune_during_forward(layer, modules, named_groups, hidden, kwargs, device,
                               recipe.statistic == "hessian", prune_group, outputs)
    report.sparsity = {name: report.sparsity[name] for name in modules}
    report.error = {name: report.error[name] for name in modules if name in report.error}
    return report, out


def prune_modules(
    index: int, modules: dict[str, nn.Linear], stats: dict[str, InputStatistics], recipe: Recipe,
    threshold: float | None = None, first_group: int = 0, fisher: dict[str, Tensor] | None = None,
    permutable: dict[str, tuple[int, int, int] | None] | None = None,
) -> LayerReport:
    """Prune (and quantize) one layer's target modules in place, modules that share an input together; each
    quantized module keeps its grid as `module.quantization_grid`. A module named in `permutable` (recipe option
    `permute`: down_proj, or o_proj with its heads) gets its N:M groups over a permutation of its inputs, kept as
    `module.input_permutation` until fold_permutations puts it into the layer's weights.

    Under torch.distributed each rank prunes its share of these groups (numbered from `first_group`),
    then all swap results (every rank finds the same permutations, from the same statistics).
    """
    groups: dict[int | str, list[str]] = {}  # modules reading the same input (same statistics object)
    for name in modules:
        groups.setdefault(id(stats[name]) if name in stats else name, []).append(name)
    groups_list = [run for names in groups.values() for run in whole_matrix_runs(names, modules)]
    errors: dict[str, float] = {}
    for g, names in enumerate(groups_list, start=first_group):
        weights, group_stats = [modules[name].weight.data for name in names], stats.get(names[0])
        permutation = None
        if permutable and len(names) == 1 and names[0] in permutable:
            permutation = input_permutation(recipe.method, weights, group_stats, recipe.pattern,
                                            permutable[names[0]], **recipe.options)
            modules[names[0]].input_permutation = permutation
        if not distributed.is_mine(g):
            continue
        if threshold is not None:
            pruned, grids = quantize_weights([prune_below(w, threshold) for w in weights], group_stats,
                                             recipe.quantization)
        else:
            pruned, grids = prune_weights(recipe.method, weights, group_stats, recipe.pattern, recipe.quantization,
                                          fisher=[fisher[name] for name in names] if fisher else None,
                                          permutation=permutation, **recipe.options)
        for name, weight, grid in zip(names, pruned, grids or [None] * len(names), strict=True):
            modules[name].weight.data = weight
            set_grid(modules[name], grid)
        if group_stats is not None:
            errors.update(zip(names, group_stats.relative_errors(weights, pruned), strict=True))
    scheme = recipe.quantization.scheme if recipe.quantization else None
    distributed.share_pruned_weights([[modules[name] for name in names] for names in groups_list], first_group,
                                     scheme)
    errors = distributed.merge(errors)
    for module in modules.values():  # grids are kept in host memory, with the model's files
        if (grid := getattr(module, "quantization_grid", None)) is not None:
            set_grid(module, Grid(grid.scheme, grid.scale.cpu(), grid.zero_point.cpu()))
    return LayerReport(index, 0.0, {name: zero_share(module.weight) for name, module in modules.items()},
                       {name: errors[name] for name in modules if name in errors})


def whole_matrix_runs(names: list[str], modules: dict[str, nn.Linear]) -> list[list[str]]:
    """Modules that read one input, in runs of whole matrices of at most PRUNED_AT_ONCE weights together (at least
    one): pruned run by run, each run's old weights are freed before the next is pruned. The experts of an MoE layer
    calibrated on all tokens read one input, and would otherwise all be held twice (and SparseGPT's stacked rows in
    float32 besides). A run shares everything a group shares (q/k/v, gate/up stay one run up to 8B shapes)."""
    runs: list[list[str]] = [[]]
    size = 0
    for name in names:
        if runs[-1] and size + modules[name].weight.numel() > PRUNED_AT_ONCE:
            runs.append([])
            size = 0
        runs[-1].append(name)
        size += modules[name].weight.numel()
    return runs


def set_grid(module: nn.Module, grid: Grid | None) -> None:
    """Attach a module's quantization grid (or remove a stale one from an earlier run)."""
    if grid is None:
        vars(module).pop("quantization_grid", None)
    else:
        module.quantization_grid = grid


def prune_model(
    model: PreTrainedModel,
    recipe: Recipe,
    calibration: Tensor | None,
    device: str | torch.device = "cpu",
    batch_size: int = BATCH_SIZE,
    sparsities: list[float] | None = None,
    fisher: dict[str, Tensor] | None = None,
    *,
    on_event: Event | None = None,
) -> list[LayerReport]:
    """Prune a model held in memory, in place, layer by layer on `device`; each layer returns to where it was.

    `calibration` holds token ids [nsamples, seqlen]; magnitude pruning needs none. `sparsities` and `fisher`:
    see prune_layers.
    """
    return prune_layers(model, ResidentLayers(model), recipe, calibration, device, batch_size,
                        sparsities=sparsities, fisher=fisher, on_event=on_event)
