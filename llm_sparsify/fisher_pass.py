"""The diagonal empirical Fisher of the decoder's Linear weights: a whole-model gradient pass, run outside the
layer walk because the loss needs the full network.

    F_ij = Σ_s (∂L_s/∂W_ij)²,

L_s the causal LM loss of sample s alone: the mean cross-entropy of its tokens, each predicted from the ones
before it. The gradients must be per sample: squaring the gradient of a batch's loss gives (Σ_s g_s)², cross
terms included, not Σ_s g_s². prune/fisher.py turns F into OBD saliencies and masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from llm_sparsify.architecture import decoder_layers, home_device
from llm_sparsify.events import Event, progress
from llm_sparsify.prune.fisher import obd_scores
from llm_sparsify.targets import layer_linears, layers_prefix
from llm_sparsify.walk import check_calibration


def sample_losses(logits: Tensor, ids: Tensor) -> Tensor:
    """Causal LM loss of each sample [batch]: mean cross-entropy of tokens 1..T-1 given those before them."""
    logits = logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return nll.reshape(ids.shape[0], -1).mean(1)


def per_sample_gradient(x: Tensor, delta: Tensor, samples: int) -> Tensor:
    """∂L_s/∂W = Σ_t δ_t x_tᵀ for each sample s [samples, out, in], from a Linear's inputs x and output gradients δ."""
    x = x.float().reshape(samples, -1, x.shape[-1])
    delta = delta.float().reshape(samples, -1, delta.shape[-1])
    return torch.bmm(delta.transpose(1, 2), x)


def fisher_diagonal(
    model: PreTrainedModel,
    calibration: Tensor,
    modules: dict[str, nn.Linear] | None = None,
    device: str | torch.device = "cpu",
    chunk: int | None = None,
    *,
    on_event: Event | None = None,
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher F = Σ_s (∂L_s/∂W)² of each Linear weight (float32, host memory), for OBD saliency.

    `modules` defaults to every Linear inside the decoder layers (never lm_head or the embeddings). `chunk` samples
    (default 1) share one forward and backward: each sample's weight gradient is still formed on its own, as
    Σ_t δ_t x_tᵀ from the Linear's inputs x and the gradients δ of its outputs, since samples do not interact in
    the forward. Only the target weights require gradients meanwhile (the flags are restored afterwards), and their
    .grad is never filled. The model runs in eval mode (no dropout).

    The whole model goes to `device` for the backward. When it does not fit, the layer-wise alternative is the
    Fisher of a per-layer reconstruction loss ‖WX − ŴX‖² on the walk's captured inputs (one layer on the device);
    that is not implemented here.
    """
    chunk = chunk or 1
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    check_calibration(model, calibration, "OBD")
    if modules is None:
        modules = {name: m for layer in layer_linears(model) for name, m in layer.items()}
    if not modules:
        raise ValueError("fisher_diagonal needs at least one Linear module")
    device = torch.device(device)
    home, training = home_device(model), model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in modules}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            calls[name].append((args[0].detach(), output))

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in modules.items()]
    fisher = {name: torch.zeros_like(m.weight, dtype=torch.float32, device=device) for name, m in modules.items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in modules.values():
            m.weight.requires_grad_(True)
        model.to(device).eval()
        with torch.enable_grad():
            for batch in progress(calibration.split(chunk), on_event, "Fisher (whole model)", "chunk"):
                batch = batch.to(device)
                loss = sample_losses(model(batch, use_cache=False).logits, batch).sum()
                outputs = [out for name in modules for _, out in calls[name]]
                grads = torch.autograd.grad(loss, outputs, allow_unused=True)
                start = 0
                for name in modules:  # a module called more than once: its gradients add up before squaring
                    deltas, start = grads[start : start + len(calls[name])], start + len(calls[name])
                    gradients = [per_sample_gradient(x, delta, len(batch))
                                 for (x, _), delta in zip(calls[name], deltas, strict=True) if delta is not None]
                    if gradients:
                        fisher[name] += sum(gradients).square().sum(0)
                    calls[name].clear()
                del loss, outputs, grads
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.to(home).train(training)
    return {name: f.cpu() for name, f in fisher.items()}


def obd_importance(model: PreTrainedModel, calibration: Tensor, names: tuple[str, ...],
                   device: str | torch.device = "cpu", *, on_event: Event | None = None) -> list[dict[str, Tensor]]:
    """Per decoder layer, (½·F·w²)^½ of the named Linears (names within the layer), F their diagonal Fisher on
    `calibration`: the per-weight importance of width pruning's score "obd"."""
    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    modules = {f"{prefix}.{i}.{name}": layer.get_submodule(name) for i, layer in enumerate(layers) for name in names}
    fisher = fisher_diagonal(model, calibration, modules, device, on_event=on_event)
    return [{name: obd_scores(layer.get_submodule(name).weight, fisher[f"{prefix}.{i}.{name}"]).sqrt().cpu()
             for name in names} for i, layer in enumerate(layers)]
