"""Block-wise reconstruction: after a decoder layer is pruned, fit its kept weights so that the pruned layer
reproduces the dense outputs on the calibration samples (masks frozen, grids respected).

    min over the kept weights Ŵ of  Σ_samples ‖f(x̂; Ŵ ⊙ M) − y‖² / ‖y‖²

x̂ are the layer's inputs in the pruned stream (what the pruned layers before it produce), M the masks (removed
weights stay exactly zero), y the targets: the dense model's own outputs of this layer (`targets: dense`, which
also corrects the error the pruned layers before it let into x̂) or the dense layer's outputs on x̂ (`pruned`, a
local fit). Per-module least squares (prune/refit.py) fits each Linear to its own inputs; this fits the whole
layer through its attention and gated MLP, so each module's error is weighed by what it does to the layer's output.

Adam on float32 copies of the kept weights alone (the removed ones have no gradient, so their states would only
hold zeros; at 50% sparsity this halves the fit's memory: 16 bytes for each kept weight, its value, gradient and
two moments), `batch_size` calibration samples per step, each step on samples the
steps before it have not seen until all have been (under torchrun each rank its own samples, the gradients
averaged). The transform pass passes only the leading input batches that steps × batch_size samples fill, so the dense
stream and the targets are computed and held for those alone. A quantized weight is rounded to its fixed grid in
the forward (straight-through gradient) and stored rounded. The layer's other parameters (norms, biases) stay as
they are. Whether the fit is kept is the caller's call, from the outputs it computes anyway (transform_pass.py keeps it
only if the layer's output error on the fitted samples went down).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from llm_sparsify import distributed
from llm_sparsify.quantize.grid import Grid, round_to_grid


def relative_error(outputs: list[Tensor], targets: list[Tensor]) -> float:
    """‖f − y‖² / ‖y‖² over all samples (and all ranks): how far a layer's outputs are from their targets."""
    sums = torch.zeros(2, dtype=torch.float64)
    for out, y in zip(outputs, targets, strict=True):
        y = y.to(out.device).float()
        sums[0] += (out.float() - y).pow(2).sum().item()
        sums[1] += y.pow(2).sum().item()
    distributed.average([sums])
    return (sums[0] / sums[1]).item()


def _rows(value: Any, rows: slice, batch: int) -> Any:
    """`value` (a keyword the layer receives) cut to the samples `rows` where it holds one entry per sample."""
    if isinstance(value, Tensor) and value.dim() and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, tuple):
        return tuple(_rows(v, rows, batch) for v in value)
    return value


def sample_batches(inputs: list[Tensor], batch_size: int) -> list[tuple[int, slice]]:
    """(input batch, rows) of every group of `batch_size` samples, taken from each input batch in turn."""
    chunks = [[(b, slice(r, r + batch_size)) for r in range(0, len(x), batch_size)] for b, x in enumerate(inputs)]
    return [chunk[i] for i in range(max(map(len, chunks))) for chunk in chunks if i < len(chunk)]


def _weight(latent: Tensor, kept: Tensor, grid: Grid | None, dtype: torch.dtype) -> Tensor:
    """The weight the layer computes with: the kept values `latent` in their places, zeros elsewhere, on its grid
    (straight-through), in `dtype`."""
    w = torch.zeros(kept.shape, dtype=latent.dtype, device=latent.device).masked_scatter(kept, latent)
    if grid is not None:
        w = w + (round_to_grid(w.detach(), grid) - w).detach()
    return w.to(dtype)


def reconstruct_layer(
    layer: nn.Module, modules: list[nn.Linear], inputs: list[Tensor], kwargs: list[dict], targets: list[Tensor],
    device: torch.device, steps: int, lr: float, batch_size: int,
) -> list[float]:
    """Fit the kept weights of `modules` (pruned Linears of `layer`) so that `layer` maps `inputs` to `targets`,
    by `steps` Adam steps on `batch_size` samples each, each module's learning rate `lr` times the RMS of its kept
    weights; in place. Returns each step's loss.

    Memory beyond the masks and Adam's kept-weight tensors stays about one module's weight: while the fit runs, a
    module's weight exists only during its own forward (made from the latent weight as it starts, dropped as it
    ends), and what a forward saves of it for the backward is made again when the backward needs it."""
    dtype = modules[0].weight.dtype
    kept = [module.weight != 0 for module in modules]
    grids = [getattr(module, "quantization_grid", None) for module in modules]
    grids = [None if g is None else Grid(g.scheme, g.scale.to(device), g.zero_point.to(device)) for g in grids]
    latent = [module.weight.detach()[k].float().requires_grad_() for module, k in zip(modules, kept, strict=True)]
    # Adam moves every weight by about lr per step whatever its size: scaled by each module's RMS, one lr suits
    # SmolLM2's weights (dense RMS 0.16-0.23) and the 7B benchmark's (0.02) alike
    optimizer = torch.optim.Adam([{"params": [w], "lr": lr * w.detach().pow(2).mean().sqrt().item()} for w in latent])
    made: dict[int, tuple[int, tuple[int, ...]]] = {}  # data_ptr of a weight made for a forward -> (module, stride)

    def make(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            module.weight = _weight(latent[i], kept[i], grids[i], dtype)  # a plain tensor, through to the latent
            made[module.weight.data_ptr()] = i, module.weight.stride()
        return hook

    def drop(module: nn.Module, args: tuple, output: Any) -> None:
        made.pop(module.weight.data_ptr())  # its memory may now hold another tensor
        del module.weight

    def pack(tensor: Tensor) -> Any:
        if tensor.data_ptr() not in made:
            return tensor
        i, stride = made[tensor.data_ptr()]
        return i, tensor.stride() != stride  # the weight, or its transpose (a view a matmul saves)

    def unpack(packed: Any) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        i, transposed = packed
        w = _weight(latent[i].detach(), kept[i], grids[i], dtype)
        return w.t() if transposed else w

    params = [module.weight for module in modules]
    for module, param in zip(modules, params, strict=True):
        param.data = param.data.new_empty(0)  # its values are in `latent` and `kept` now
        del module.weight  # the Parameter leaves the module until the fit is done
    handles = [h for i, module in enumerate(modules)
               for h in (module.register_forward_pre_hook(make(i)), module.register_forward_hook(drop))]
    batches, losses = sample_batches(inputs, batch_size), []
    try:
        with torch.enable_grad():
            for step in range(steps):
                b, rows = batches[step % len(batches)]
                kw = {key: _rows(value, rows, len(inputs[b])) for key, value in kwargs[b].items()}
                with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                    out = layer(inputs[b][rows].to(device), **kw)
                made.clear()
                y = targets[b][rows].to(device).float()
                loss = ((out[0] if isinstance(out, tuple) else out).float() - y).pow(2).sum() / y.pow(2).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.average(w.grad for w in latent)  # every rank takes the same step
                optimizer.step()
                losses.append(loss.item())
    finally:
        for handle in handles:
            handle.remove()
        del optimizer
        with torch.no_grad():
            for module, param, w, k, g in zip(modules, params, latent, kept, grids, strict=True):
                module.__dict__.pop("weight", None)
                param.data = _weight(w, k, g, dtype)
                module.weight = param
    return losses
