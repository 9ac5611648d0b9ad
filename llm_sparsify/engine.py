"""The layer-wise sequential engine: one decoder layer on the device at a time.

    capture the inputs of decoder layer 0 (hidden states + every keyword the model passes it)
    for each decoder layer:
        onload it
        inputs: pruned (default) -- one forward of all samples, each group of modules (q/k/v, o,
            gate/up, down) pruned as soon as every sample has reached its input (interleaved.py);
            its outputs are the next layer's inputs
        inputs: dense (the reference code's order) -- run all samples through it while hooks
            accumulate input statistics, prune every target Linear, then run all samples through
            the pruned layer for the next layer's inputs
        reconstruction (if the recipe has it): fit the kept weights so that the layer reproduces the dense
            outputs, computed before pruning on the samples the fit reads (reconstruct.py); then run it again
            for the next layer's inputs
        save it (streaming: write its shard); offload it

Where a layer comes from and goes to is the job of a layer source: `ResidentLayers` for a model in
memory, `llm_sparsify.stream.StreamedLayers` for a checkpoint read and written shard by shard.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils.logging import tqdm

from llm_sparsify import distributed
from llm_sparsify.architecture import decoder_layers, home_device
from llm_sparsify.data import DataError
from llm_sparsify.host_memory import release_host_memory
from llm_sparsify.interleaved import module_groups, prune_during_forward
from llm_sparsify.prune import input_permutation, method_statistic, prune_weights, quantize_weights
from llm_sparsify.prune.magnitude import global_magnitude_threshold, prune_below
from llm_sparsify.quantize.grid import Grid
from llm_sparsify.recipe import Recipe, RecipeError, Reconstruction
from llm_sparsify.reconstruct import reconstruct_layer, relative_error
from llm_sparsify.stats import InputStatistics
from llm_sparsify.structure.depth import remove_blocks
from llm_sparsify.structure.experts import Experts, moe_modules
from llm_sparsify.structure.permutation import attention_heads, fold_layer_permutations
from llm_sparsify.structure.resize import remove_units

log = logging.getLogger(__name__)

PRUNED_AT_ONCE = 1 << 27  # weights of one input pruned together (see whole_matrix_runs)


@dataclass
class LayerReport:
    """What happened to one decoder layer: share of zeros per pruned module, wall time, and per module the
    relative reconstruction error ‖(W−Ŵ)X‖²/‖WX‖² on its calibration inputs (see InputStatistics.relative_errors;
    absent without calibration data). `weights` counts every weight of two or more dimensions in the layer, targeted
    or not (e.g. fused MoE experts), and `zeros` the zeros among them, as saved. `reconstruction`: the layer's relative
    output error ‖f(x̂) − y‖²/‖y‖² before and after its kept weights were fitted (reconstruct.py), if they were."""

    index: int
    seconds: float
    sparsity: dict[str, float] = field(default_factory=dict)
    error: dict[str, float] = field(default_factory=dict)
    weights: int = 0
    zeros: int = 0
    reconstruction: list[float] = field(default_factory=list)  # the layer's relative output error before, after


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


class _Captured(Exception):
    """Raised by a hook once the inputs it waits for are recorded, so the rest of the forward never runs."""


Visitor = Callable[[int, nn.Module, list[Tensor], list[dict[str, Any]]], list[Tensor] | None]
"""What a score pass calls per decoder layer: (index, layer on the device, its inputs, their kwargs) -> the layer's
outputs if it computed them (else None: read_pass computes them where the next layer needs them)."""


class LayerSource(Protocol):
    """Where decoder layers come from and go to: ResidentLayers (in memory) or stream.StreamedLayers (disk). The
    structure stages change the model through its source: remove_blocks and remove_units act on the model in memory,
    or on the skeleton and on what each layer's tensors become as they are read."""

    def __len__(self) -> int: ...
    def stem(self, device: torch.device) -> contextlib.AbstractContextManager[None]: ...
    def target_weights(self, targets: list[dict[str, nn.Linear]]) -> Iterator[Tensor]: ...
    def load(self, index: int, device: torch.device, original: bool = False) -> nn.Module: ...
    def round_to_storage(self, layer: nn.Module, names: list[str] | None = None) -> None: ...
    def save(self, index: int, layer: nn.Module, report: LayerReport) -> None: ...
    def unload(self, index: int, layer: nn.Module) -> None: ...
    def remove_blocks(self, blocks: list[int]) -> None: ...
    def remove_units(self, unit: str, keep: list[Tensor]) -> None: ...


class ResidentLayers:
    """The decoder layers of a model held in memory: each visits the device for its turn and returns."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.layers = decoder_layers(model)
        self.homes: dict[int, torch.device] = {}

    def __len__(self) -> int:
        return len(self.layers)

    @contextlib.contextmanager
    def stem(self, device: torch.device) -> Iterator[None]:
        """What runs before layer 0 (embeddings, rotary embeddings, ...), on `device` for the capture."""
        stem = [child for name, child in self.model.model.named_children() if name != "layers"]
        homes = [home_device(module) for module in stem]
        for module in stem:
            module.to(device)
        try:
            yield
        finally:
            for module, home in zip(stem, homes, strict=True):
                module.to(home)

    def target_weights(self, targets: list[dict[str, nn.Linear]]) -> Iterator[Tensor]:
        """Every target weight as it is before pruning (for global magnitude ranking)."""
        return (module.weight for modules in targets for module in modules.values())

    def load(self, index: int, device: torch.device, original: bool = False) -> nn.Module:
        """Layer `index` on `device` (in memory there is only the one copy: `original` changes nothing)."""
        layer = self.layers[index]
        self.homes[index] = home_device(layer)
        return layer.to(device)

    def round_to_storage(self, layer: nn.Module, names: list[str] | None = None) -> None:
        """Nothing to do: the layer is stored as it is computed."""

    def save(self, index: int, layer: nn.Module, report: LayerReport) -> None:
        """Nothing to do: the pruned layer is the model's own."""

    def unload(self, index: int, layer: nn.Module) -> None:
        layer.to(self.homes.pop(index))

    def remove_blocks(self, blocks: list[int]) -> None:
        """Delete decoder blocks from the model (structure/depth.remove_blocks)."""
        remove_blocks(self.model, blocks)
        self.layers = decoder_layers(self.model)

    def remove_units(self, unit: str, keep: list[Tensor]) -> None:
        """Cut MLP channels or KV groups out of every layer (structure/resize.remove_units)."""
        remove_units(self.model, unit, keep)


@torch.no_grad()
def capture_layer_inputs(
    model: PreTrainedModel,
    calibration: Tensor,
    device: torch.device,
    batch_size: int,
    store: torch.device | None = None,
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Hidden states and keyword arguments that decoder layer 0 receives, one entry per batch.

    Whatever keywords this transformers version passes (attention mask, position ids, rotary
    embeddings, cache position, ...) are kept as they are, not from a fixed list. Hidden states
    are kept on `store` (default: `device`). What runs before layer 0 must already be on `device`.
    """
    layers = decoder_layers(model)
    hidden, kwargs = [], []

    def record(module: nn.Module, args: tuple, kw: dict[str, Any]) -> None:
        kw = dict(kw)
        hidden.append((args[0] if args else kw.pop("hidden_states")).to(store or device))
        kwargs.append(kw)
        raise _Captured

    handle = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        for batch in calibration.split(batch_size):
            with contextlib.suppress(_Captured):
                model(batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return hidden, kwargs


def activation_store(model: PreTrainedModel, calibration: Tensor, device: torch.device,
                     interleaved: bool = False) -> torch.device:
    """Keep the calibration activations on the device when they fit, else in host memory.

    Inputs and outputs of a layer are alive together, so twice the hidden states must fit in half of
    the device's free memory (the rest is for the layer and its statistics). With `interleaved`
    (inputs: pruned) every sample's paused forward also holds about 2·hidden + intermediate values
    per token on the device, which cannot be moved off it: if that does not fit, say so before any work.
    """
    if device.type != "cuda":
        return device
    config = model.config
    dtype_bytes = torch.finfo(model.dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    if interleaved:
        width = 2 * config.hidden_size + getattr(config, "intermediate_size", 4 * config.hidden_size)
        paused = calibration.numel() * width * dtype_bytes
        if paused > 0.6 * free:
            raise DataError(f"`inputs: pruned` keeps every calibration sample's paused forward on {device}: about "
                            f"{paused / 2**30:.1f} GiB of {free / 2**30:.1f} GiB free; use fewer samples "
                            f"(--nsamples) or `inputs: dense` in the recipe")
        free -= paused
    needed = 2 * calibration.numel() * config.hidden_size * dtype_bytes
    if needed <= free // 2:
        return device
    log.info("calibration activations (%.1f GiB) kept in host memory", needed / 2**30)
    return torch.device("cpu")


def _layer_output(output: Tensor | tuple) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _forward(layer: nn.Module, hidden: Tensor, kwargs: dict, device: torch.device) -> Tensor:
    return _layer_output(layer(hidden.to(device), **kwargs)).to(hidden.device)


@torch.no_grad()
def collect_statistics(
    layer: nn.Module,
    modules: dict[str, nn.Linear],
    hidden: list[Tensor],
    kwargs: list[dict],
    hessian: bool,
    device: torch.device | None = None,
    outputs: list[Tensor] | None = None,
) -> dict[str, InputStatistics]:
    """Run every batch through `layer`, accumulating input statistics of the given Linear modules.

    Modules called on the very same input tensor (q/k/v; gate/up) share one accumulator, so the
    work and memory are spent once per distinct input. Each forward stops as soon as every module
    has seen its input: the last module's own product and whatever follows it are never computed. Given an
    `outputs` list, the forwards run to the end instead and append the layer's output per batch (a score pass
    then needs no second forward to propagate).
    """
    stats: dict[str, InputStatistics] = {}
    shares: dict[str, str] = {}  # module -> module whose statistics it shares
    seen: dict[int, tuple[Tensor, str]] = {}  # inputs already accumulated in the current forward
    called: set[str] = set()  # modules reached in the current forward

    def hook(name: str):
        def accumulate(module: nn.Module, args: tuple) -> None:
            x = args[0]
            called.add(name)
            first = seen.get(id(x))
            if first is not None and first[0] is x:
                shares[name] = first[1]
            else:
                seen[id(x)] = (x, name)
                if name not in stats:
                    stats[name] = InputStatistics(x.shape[-1], hessian, x.device)
                stats[name].add(x)
            if len(called) == len(modules) and outputs is None:  # the rest of the layer is not needed
                raise _Captured

        return accumulate

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        for h, kw in zip(hidden, kwargs, strict=True):
            with contextlib.suppress(_Captured):
                output = layer(h.to(device or h.device), **kw)
                if outputs is not None:
                    outputs.append(_layer_output(output).to(h.device))
            seen.clear()
            called.clear()
    finally:
        for handle in handles:
            handle.remove()
    return {name: stats[shares.get(name, name)] for name in modules}


@torch.no_grad()
def read_pass(
    model: PreTrainedModel, layers: LayerSource, calibration: Tensor | None, visit: Visitor, *, device: torch.device,
    batch_size: int, what: str,
) -> None:
    """A score pass: every decoder layer onloaded as the source holds it (never from a partial output), `visit`ed,
    and offloaded; nothing is written. With `calibration`, layer 0's inputs are captured first and the dense
    activations stream through the layers: each visit sees its layer's inputs, and the layer's outputs (the visit's,
    if it returns them) feed the next. Without, visits see the weights only (hidden and kwargs empty). `what` names
    the pass in errors and on its progress bar."""
    device = torch.device(device)
    hidden: list[Tensor] = []
    kwargs: list[dict[str, Any]] = []
    if calibration is not None:
        check_calibration(model, calibration, what)
        store = activation_store(model, calibration, device)
        with layers.stem(device):
            hidden, kwargs = capture_layer_inputs(model, calibration, device, batch_size, store)
    rank, _ = distributed.rank_and_size()
    for i in tqdm(range(len(layers)), desc=what, unit="layer", disable=rank != 0):
        layer = layers.load(i, device, original=True)
        try:
            outputs = visit(i, layer, hidden, kwargs)
            if hidden and i + 1 < len(layers):
                hidden = outputs or [_forward(layer, h, kw, device) for h, kw in zip(hidden, kwargs, strict=True)]
        finally:
            layers.unload(i, layer)
        release_host_memory()


def zero_share(weight: Tensor) -> float:
    return (weight == 0).sum().item() / weight.numel()


def check_calibration(model: PreTrainedModel, calibration: Tensor | None, method: str) -> None:
    if calibration is None or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise DataError(f"{method} needs calibration token ids as a LongTensor [nsamples, seqlen]")
    vocab = model.get_input_embeddings().num_embeddings
    if calibration.min() < 0 or calibration.max() >= vocab:
        raise DataError(f"calibration token ids must lie in [0, {vocab}) for this model's vocabulary")


@torch.no_grad()
def prune_layers(
    model: PreTrainedModel,
    layers: LayerSource,
    recipe: Recipe,
    calibration: Tensor | None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    finished: list[LayerReport] | None = None,
    sparsities: list[float] | None = None,
    fisher: dict[str, Tensor] | None = None,
) -> list[LayerReport]:
    """Prune the decoder layers that `layers` hands out, one at a time on `device`.

    `finished` holds the reports of layers already pruned by an earlier, interrupted run: those are
    only run forward (from their saved, pruned weights) to rebuild the next layer's inputs.
    `sparsities` gives each layer its own (e.g. OWL's), instead of the recipe's. `fisher` holds the diagonal
    Fisher of each target weight, for OBD (prune/fisher.py).
    Under torch.distributed each rank brings its share of `calibration` (see llm_sparsify.distributed).
    """
    device = torch.device(device)
    # a recipe without a pruning section (depth, width only) writes each layer as the structure stages left it
    targets = target_modules(model, recipe) if recipe.method else [{} for _ in range(len(layers))]
    statistic = None if recipe.statistic == "fisher" else recipe.statistic  # OBD: gradients, taken before
    if recipe.needs_fisher and fisher is None:
        raise ValueError("OBD needs the Fisher diagonal of every target weight (prune/fisher.fisher_diagonal)")
    fit = recipe.reconstruction
    walks = statistic is not None or fit is not None  # calibration activations go through the layers
    reports = list(finished or [])
    if walks:
        needs = method_statistic(recipe.method, recipe.options) or fit  # else only GPTQ needs the data
        check_calibration(model, calibration, recipe.method if needs else "gptq")
        store = activation_store(model, calibration, device, recipe.inputs == "pruned")
        with layers.stem(device):
            hidden, kwargs = capture_layer_inputs(model, calibration, device, batch_size, store)
    fit_batches = fitted_batches(hidden, fit) if fit is not None else 0  # the leading input batches a fit reads
    dense_hidden = hidden[:fit_batches] if fit is not None and fit.targets == "dense" else None  # the dense stream

    threshold = None
    if recipe.options.get("scope") == "global":  # magnitude ranked across the model
        threshold = global_magnitude_threshold(lambda: layers.target_weights(targets), recipe.pattern)

    rank, _ = distributed.rank_and_size()
    quantized = f" + {recipe.quantization.method}" if recipe.quantization else ""
    desc = f"{recipe.method} {recipe.pattern_text}{quantized}" if recipe.method else "writing layers"
    progress = tqdm(total=len(layers), desc=desc, unit="layer",
                    initial=len(reports), disable=rank != 0)
    groups: dict[tuple[str, ...], list[list[str]]] = {}  # module grouping, per layer structure
    permute = bool(recipe.options.get("permute"))
    for i in range(len(layers)):
        resumed = i < len(reports)
        if resumed and not walks:
            continue  # magnitude: no activations to rebuild
        start = time.perf_counter()
        last = i + 1 == len(layers)
        if dense_hidden is not None and resumed and not last:  # the dense stream, through the dense layer
            layer = layers.load(i, device, original=True)
            dense_hidden = [_forward(layer, h, kw, device) for h, kw in zip(dense_hidden, kwargs[:fit_batches],
                                                                               strict=True)]
        layer = layers.load(i, device)
        outputs = teacher = None
        recipe_i = recipe if sparsities is None else replace(recipe, pattern=sparsities[i])
        if not resumed:
            if fit is not None:  # the dense layer's outputs, before any pruning
                teacher = [_forward(layer, h, kw, device) for h, kw in zip(dense_hidden or hidden[:fit_batches],
                                                                           kwargs[:fit_batches], strict=True)]
            permutable = permutable_inputs(model, layer, targets[i]) if permute else None
            if statistic is not None:
                calibrate_experts(i, layer, targets[i], hidden, kwargs, recipe.expert_tokens, device)
            if targets[i] and statistic is not None and recipe.inputs == "pruned":
                report, outputs = prune_interleaved(i, layer, targets[i], hidden, kwargs, recipe_i, layers,
                                                    device, not last or fit is not None, groups, threshold, fisher,
                                                    permutable)
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
        if walks and not last:  # the pruned layer's outputs feed the next layer
            hidden = outputs or [_forward(layer, h, kw, device) for h, kw in zip(hidden, kwargs, strict=True)]
            if dense_hidden is not None and not resumed:
                dense_hidden = teacher
        if not resumed:
            report.seconds = round(time.perf_counter() - start, 3)
            reports.append(report)
            progress.update()
        layers.unload(i, layer)
        release_host_memory()  # else the allocator keeps each layer's freed buffers and RSS creeps up
    progress.close()
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
                raise _Captured
        return hook

    handles = [block.register_forward_pre_hook(count(b)) for b, block in enumerate(blocks)]
    try:
        for h, kw in zip(hidden, kwargs, strict=True):
            with contextlib.suppress(_Captured):
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
    pruned = outputs[:n] if outputs else [_forward(layer, h, kw, device) for h, kw in zip(hidden[:n], kwargs[:n],
                                                                                          strict=True)]
    weights = [module.weight.detach().clone() for module in modules]
    reconstruct_layer(layer, modules, hidden[:n], kwargs[:n], teacher, device, fit.steps, fit.lr, fit.batch_size)
    layers.round_to_storage(layer)
    fitted = [_forward(layer, h, kw, device) for h, kw in zip(hidden, kwargs, strict=True)]
    before, after = relative_error(pruned, teacher), relative_error(fitted[:n], teacher)
    if after < before:
        return [before, after], fitted
    log.info("reconstruction did not lower the layer's output error (%.4g -> %.4g): kept as pruned", before, after)
    for module, weight in zip(modules, weights, strict=True):
        module.weight.data.copy_(weight)
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
    batch_size: int = 8,
    sparsities: list[float] | None = None,
    fisher: dict[str, Tensor] | None = None,
) -> list[LayerReport]:
    """Prune a model held in memory, in place, layer by layer on `device`; each layer returns to where it was.

    `calibration` holds token ids [nsamples, seqlen]; magnitude pruning needs none. `sparsities` and `fisher`:
    see prune_layers.
    """
    return prune_layers(model, ResidentLayers(model), recipe, calibration, device, batch_size,
                        sparsities=sparsities, fisher=fisher)
