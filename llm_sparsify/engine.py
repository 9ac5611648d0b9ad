"""The layer-wise sequential engine: one decoder layer on the device at a time.

    capture the inputs of decoder layer 0 (hidden states + every keyword the model passes it)
    for each decoder layer:
        onload it; run all samples through it while hooks accumulate input statistics
        prune each target Linear from its statistics
        run all samples through the pruned layer: these are the next layer's inputs
        offload it
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from llm_sparsify.data import DataError
from llm_sparsify.models import decoder_layers, home_device
from llm_sparsify.prune import STATISTIC, prune_weight
from llm_sparsify.prune.magnitude import global_magnitude_threshold, prune_below
from llm_sparsify.recipe import Recipe, RecipeError
from llm_sparsify.stats import InputStatistics

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    """What happened to one decoder layer: share of zeros per pruned module, and wall time."""

    index: int
    seconds: float
    sparsity: dict[str, float] = field(default_factory=dict)


def layer_linears(model: PreTrainedModel) -> list[dict[str, nn.Linear]]:
    """For each decoder layer, its Linear modules by full name (e.g. model.layers.3.mlp.up_proj)."""
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return [
        {f"{prefix}.{i}.{name}": m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        for i, layer in enumerate(layers)
    ]


def target_modules(model: PreTrainedModel, recipe: Recipe) -> list[dict[str, nn.Linear]]:
    """For each decoder layer, the Linear modules that the recipe's globs select.

    Every glob must match something, so a typo fails before any work instead of pruning nothing.
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
    if isinstance(recipe.pattern, tuple):
        m = recipe.pattern[1]
        for name, module in ((n, mod) for layer in selected for n, mod in layer.items()):
            if module.in_features % m:
                raise RecipeError(f"{recipe.pattern_text} needs in_features divisible by {m}; {name} has "
                                  f"{module.in_features} (leave it out with `ignore`)")
    return selected


class _Captured(Exception):
    """Raised by the hook on layer 0 once its inputs are recorded, so the rest of the model never runs."""


@torch.no_grad()
def capture_layer_inputs(
    model: PreTrainedModel, calibration: Tensor, device: torch.device, batch_size: int
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Hidden states and keyword arguments that decoder layer 0 receives, one entry per batch.

    Whatever keywords this transformers version passes (attention mask, position ids, rotary
    embeddings, cache position, ...) are kept as they are, not from a fixed list.
    """
    layers = decoder_layers(model)
    hidden, kwargs = [], []

    def record(module: nn.Module, args: tuple, kw: dict[str, Any]) -> None:
        kw = dict(kw)
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append(kw)
        raise _Captured

    stem = [child for name, child in model.model.named_children() if name != "layers"]
    homes = [home_device(module) for module in stem]
    for module in stem:  # embeddings, rotary embeddings, ...: what runs before layer 0
        module.to(device)
    handle = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        for batch in calibration.split(batch_size):
            with contextlib.suppress(_Captured):
                model(batch.to(device), use_cache=False)
    finally:
        handle.remove()
        for module, home in zip(stem, homes, strict=True):
            module.to(home)
    return hidden, kwargs


def _layer_output(output: Tensor | tuple) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def collect_statistics(
    layer: nn.Module, modules: dict[str, nn.Linear], hidden: list[Tensor], kwargs: list[dict], hessian: bool
) -> dict[str, InputStatistics]:
    """Run every batch through `layer`, accumulating input statistics of the given Linear modules.

    Modules called on the very same input tensor (q/k/v; gate/up) share one accumulator, so the
    work and memory are spent once per distinct input.
    """
    stats: dict[str, InputStatistics] = {}
    shares: dict[str, str] = {}  # module -> module whose statistics it shares
    seen: dict[int, tuple[Tensor, str]] = {}  # inputs already accumulated in the current forward

    def hook(name: str):
        def accumulate(module: nn.Module, args: tuple) -> None:
            x = args[0]
            first = seen.get(id(x))
            if first is not None and first[0] is x:
                shares[name] = first[1]
                return
            seen[id(x)] = (x, name)
            if name not in stats:
                stats[name] = InputStatistics(x.shape[-1], hessian, x.device)
            stats[name].add(x)

        return accumulate

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        for h, kw in zip(hidden, kwargs, strict=True):
            layer(h, **kw)
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    return {name: stats[shares.get(name, name)] for name in modules}


def zero_share(weight: Tensor) -> float:
    return (weight == 0).sum().item() / weight.numel()


@torch.no_grad()
def prune_model(
    model: PreTrainedModel,
    recipe: Recipe,
    calibration: Tensor | None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
) -> list[LayerReport]:
    """Prune `model` in place, layer by layer on `device`; each layer returns to where it was.

    `calibration` holds token ids [nsamples, seqlen]; magnitude pruning needs none.
    """
    device = torch.device(device)
    layers = decoder_layers(model)
    targets = target_modules(model, recipe)
    statistic = STATISTIC[recipe.method]
    if statistic is not None:
        if calibration is None or calibration.dim() != 2 or calibration.dtype != torch.long:
            raise DataError(f"{recipe.method} needs calibration token ids as a LongTensor [nsamples, seqlen]")
        vocab = model.get_input_embeddings().num_embeddings
        if calibration.min() < 0 or calibration.max() >= vocab:
            raise DataError(f"calibration token ids must lie in [0, {vocab}) for this model's vocabulary")
        hidden, kwargs = capture_layer_inputs(model, calibration, device, batch_size)

    threshold = None
    if recipe.method == "magnitude" and recipe.options.get("scope") == "global":
        weights = [m.weight for modules in targets for m in modules.values()]
        threshold = global_magnitude_threshold(weights, recipe.pattern)

    reports = []
    for i, (layer, modules) in enumerate(
        zip(tqdm(layers, desc=f"{recipe.method} {recipe.pattern_text}", unit="layer"), targets, strict=True)
    ):
        start = time.perf_counter()
        home = home_device(layer)
        layer.to(device)
        stats = {}
        if modules and statistic is not None:
            stats = collect_statistics(layer, modules, hidden, kwargs, hessian=statistic == "hessian")
        for name, module in modules.items():
            if threshold is not None:
                module.weight.data = prune_below(module.weight.data, threshold)
            else:
                module.weight.data = prune_weight(
                    recipe.method, module.weight.data, stats.get(name), recipe.pattern, **recipe.options
                )
        del stats
        if statistic is not None and i + 1 < len(layers):  # the pruned layer's outputs feed the next layer
            hidden = [_layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
        layer.to(home)
        sparsity = {name: zero_share(module.weight) for name, module in modules.items()}
        reports.append(LayerReport(i, time.perf_counter() - start, sparsity))
    return reports
