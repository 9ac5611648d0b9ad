"""The layer walk: one decoder layer on the device at a time, the calibration activations streamed through.

    capture the inputs of decoder layer 0 (hidden states + every keyword the model passes it)
    for each decoder layer:
        onload it (LayerSource: from the model in memory, or its tensors from the checkpoint on disk)
        visit it: a score pass measures (score_passes.py), the transform pass prunes and saves (transform_pass.py)
        propagate: its outputs become the next layer's inputs
        tell the caller ("layer" event, events.py); offload it

Where a layer comes from and goes to is the job of a layer source: `ResidentLayers` for a model in memory,
`llm_sparsify.stream.StreamedLayers` for a checkpoint read and written shard by shard. The walk owns the activation
memory policy (activation_store) and the statistics a visit gathers from a layer's inputs (collect_statistics).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from llm_sparsify.architecture import decoder_layers, home_device
from llm_sparsify.data import DataError
from llm_sparsify.events import Event, emit
from llm_sparsify.host_memory import release_if_grown, reuse_freed_buffers
from llm_sparsify.stats import InputStatistics
from llm_sparsify.structure.depth import remove_blocks
from llm_sparsify.structure.experts import remove_experts
from llm_sparsify.structure.resize import remove_units

log = logging.getLogger(__name__)

BATCH_SIZE = 8  # calibration samples per layer forward, unless told


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


class Captured(Exception):
    """Raised by a hook once the inputs it waits for are recorded, so the rest of the forward never runs."""


Visitor = Callable[[int, nn.Module, list[Tensor], list[dict[str, Any]]], list[Tensor] | None]
"""What a walk calls per decoder layer: (index, layer on the device, its inputs, their kwargs) -> the layer's outputs
if it computed them (else None: the walk computes them where the next layer needs them)."""


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
    def remove_experts(self, keep: list[list[int]]) -> None: ...


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

    def remove_experts(self, keep: list[list[int]]) -> None:
        """Keep only experts `keep[b]` of MoE block b (structure/experts.remove_experts)."""
        remove_experts(self.model, keep)


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
        raise Captured

    handle = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        for batch in calibration.split(batch_size):
            with contextlib.suppress(Captured):
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


def layer_output(output: Tensor | tuple) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def forward_layer(layer: nn.Module, hidden: Tensor, kwargs: dict, device: torch.device) -> Tensor:
    return layer_output(layer(hidden.to(device), **kwargs)).to(hidden.device)


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
                raise Captured

        return accumulate

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        for h, kw in zip(hidden, kwargs, strict=True):
            with contextlib.suppress(Captured):
                output = layer(h.to(device or h.device), **kw)
                if outputs is not None:
                    outputs.append(layer_output(output).to(h.device))
            seen.clear()
            called.clear()
    finally:
        for handle in handles:
            handle.remove()
    return {name: stats[shares.get(name, name)] for name in modules}


def check_calibration(model: PreTrainedModel, calibration: Tensor | None, method: str) -> None:
    if calibration is None or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise DataError(f"{method} needs calibration token ids as a LongTensor [nsamples, seqlen]")
    vocab = model.get_input_embeddings().num_embeddings
    if calibration.min() < 0 or calibration.max() >= vocab:
        raise DataError(f"calibration token ids must lie in [0, {vocab}) for this model's vocabulary")


@torch.no_grad()
def walk(
    model: PreTrainedModel, layers: LayerSource, calibration: Tensor | None, visit: Visitor, *, device: torch.device,
    batch_size: int, what: str, original: bool = False, done: int = 0, interleaved: bool = False,
    on_event: Event | None = None,
) -> None:
    """The layer walk: capture layer 0's inputs (with `calibration`), then per decoder layer onload, visit, propagate,
    offload; every pass of a run, score or transform, is one walk with its own `visit`.

    Each visit sees its layer on `device` and the layer's inputs; the layer's outputs (the visit's, if it returns
    them, else one forward here) feed the next layer. Without `calibration`, visits see the weights only (hidden and
    kwargs empty). Layers are loaded as the source holds them now (a transform pass's finished layers from its
    partial output), or as the source was (`original`: what a score pass reads). `done` layers were written by an
    earlier run: without activations to rebuild they are not even loaded. `interleaved`: the visits prune during
    their forward (the activation memory policy keeps room for it). `what` names the pass in errors and in its
    events (events.py): ("walk", ...) as it begins, ("layer", ...) after each layer's outputs are computed and before
    it is offloaded.
    """
    device = torch.device(device)
    hidden: list[Tensor] = []
    kwargs: list[dict[str, Any]] = []
    reuse_freed_buffers()  # within a layer; given back once the free heap grows (release_if_grown)
    first_free = None  # free heap bytes after the first layer
    if calibration is not None:
        check_calibration(model, calibration, what)
        store = activation_store(model, calibration, device, interleaved)
        with layers.stem(device):
            hidden, kwargs = capture_layer_inputs(model, calibration, device, batch_size, store)
    emit(on_event, "walk", {"pass": what, "layers": len(layers), "done": 0 if hidden else done})
    for i in range(len(layers)):
        if i < done and not hidden:
            continue
        start = time.perf_counter()
        layer = layers.load(i, device, original=original)
        try:
            outputs = visit(i, layer, hidden, kwargs)
            if hidden and i + 1 < len(layers):
                hidden = outputs or [forward_layer(layer, h, kw, device) for h, kw in zip(hidden, kwargs, strict=True)]
            emit(on_event, "layer", {"pass": what, "index": i, "layers": len(layers),
                                     "seconds": round(time.perf_counter() - start, 3)})
        finally:
            layers.unload(i, layer)
        first_free = release_if_grown(first_free)  # else the allocator's free lists fragment and RSS creeps up
