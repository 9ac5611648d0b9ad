"""Which weights of the decoder a recipe prunes (its `targets` and `ignore` globs), and what is left untouched."""

from __future__ import annotations

import fnmatch
import logging

from torch import Tensor, nn
from transformers import PreTrainedModel

from llm_sparsify.architecture import decoder_layers
from llm_sparsify.recipe import Recipe, RecipeError

log = logging.getLogger(__name__)


def layers_prefix(model: PreTrainedModel) -> str:
    """The full name of the decoder layers' list, e.g. model.layers."""
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def layer_linears(model: PreTrainedModel) -> list[dict[str, nn.Linear]]:
    """For each decoder layer, its Linear modules by full name (e.g. model.layers.3.mlp.up_proj)."""
    layers, prefix = decoder_layers(model), layers_prefix(model)
    return [
        {f"{prefix}.{i}.{name}": m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        for i, layer in enumerate(layers)
    ]


def target_modules(model: PreTrainedModel, recipe: Recipe) -> list[dict[str, nn.Linear]]:
    """For each decoder layer, the Linear modules that the recipe's globs select.

    Every glob must match something, and something must be left once `ignore` is taken away, so a typo (or
    `ignore: ["*"]`) fails before any work instead of pruning nothing.
    """
    per_layer = layer_linears(model)
    names = [name for linears in per_layer for name in linears]
    for key, globs in (("targets", recipe.targets), ("ignore", recipe.ignore)):
        for glob in globs:
            if not any(fnmatch.fnmatchcase(name, glob) for name in names):
                raise RecipeError(f"{key} glob {glob!r} matches no Linear in the decoder layers (e.g. {names[0]})")
    selected = [
        {
            name: module
            for name, module in linears.items()
            if any(fnmatch.fnmatchcase(name, g) for g in recipe.targets)
            and not any(fnmatch.fnmatchcase(name, g) for g in recipe.ignore)
        }
        for linears in per_layer
    ]
    if not any(selected):
        raise RecipeError(f"targets {list(recipe.targets)} minus ignore {list(recipe.ignore)} leave no Linear to "
                          "prune; nothing would be pruned")
    if isinstance(recipe.pattern, tuple):
        m = recipe.pattern[1]
        for name, module in ((n, mod) for layer in selected for n, mod in layer.items()):
            if module.in_features % m:
                raise RecipeError(f"{recipe.pattern_text} needs in_features divisible by {m}; {name} has "
                                  f"{module.in_features} (leave it out with `ignore`)")
    return selected


def layer_weights(layer: nn.Module) -> dict[str, Tensor]:
    """A decoder layer's weights of two or more dimensions by name, Linear or not (e.g. mlp.experts.gate_up_proj,
    the fused experts of a transformers 5 MoE layer); no norms or biases."""
    return {name: p for name, p in layer.named_parameters() if p.dim() >= 2}


def count_zeros(layer: nn.Module) -> tuple[int, int]:
    """(weights, zeros) over the layer's weights of two or more dimensions."""
    weights = layer_weights(layer).values()
    return sum(w.numel() for w in weights), sum(int((w == 0).sum()) for w in weights)


def untargeted_weights(model: PreTrainedModel, targets: list[str]) -> dict[str, float]:
    """The decoder weights (two or more dimensions) that no target module covers, each with its share of all
    decoder-layer weights. Shapes only: works on a meta skeleton. A weight left out in every decoder layer is named
    once, with `*` for the layer index (model.layers.*.mlp.experts.gate_up_proj); any other by its full name."""
    prefix, covered, layers = layers_prefix(model), {f"{name}.weight" for name in targets}, decoder_layers(model)
    missed: dict[str, dict[str, int]] = {}  # name in the layer -> {full name: elements} of the uncovered ones
    total = 0
    for i, layer in enumerate(layers):
        for name, weight in layer_weights(layer).items():
            total += weight.numel()
            if f"{prefix}.{i}.{name}" not in covered:
                missed.setdefault(name, {})[f"{prefix}.{i}.{name}"] = weight.numel()
    shares: dict[str, float] = {}
    for name, full in missed.items():
        if len(full) == len(layers):
            shares[f"{prefix}.*.{name}"] = sum(full.values()) / total
        else:
            shares |= {full_name: n / total for full_name, n in full.items()}
    return shares


def warn_untargeted(model: PreTrainedModel, recipe: Recipe) -> None:
    """Warn, before any work, when the recipe's targets leave more than half of the decoder-layer weights untouched
    (only Linear modules are pruned: e.g. an MoE model's fused experts are not), naming what they miss."""
    targets = [name for layer in target_modules(model, recipe) for name in layer]
    missed = untargeted_weights(model, targets)
    if sum(missed.values()) > 0.5:
        names = ", ".join(f"{name} ({share:.1%})" for name, share in missed.items())
        log.warning("the recipe's targets cover only %.1f%% of the decoder-layer weights; these are not pruned "
                    "(share of the decoder-layer weights): %s", 100 * (1 - sum(missed.values())), names)
