"""The score pass of expert removal: each MoE expert's REAP saliency (structure/experts.expert_saliency) over the
calibration tokens, one decoder layer on the device at a time, the dense activations propagated."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils.logging import tqdm

from llm_sparsify.engine import ResidentLayers, _forward, activation_store, capture_layer_inputs, check_calibration
from llm_sparsify.structure.experts import expert_saliency, moe_blocks


@torch.no_grad()
def expert_saliencies(model: PreTrainedModel, calibration: Tensor, device: str | torch.device = "cpu",
                      batch_size: int = 8) -> list[Tensor]:
    """Per MoE block (in model order), each expert's mean over the tokens routed to it of g_j(x)·‖f_j(x)‖₂; an expert
    no token chose scores 0. The model's experts must be unfused (structure/experts.py)."""
    device = torch.device(device)
    check_calibration(model, calibration, "expert removal")
    blocks = {id(block.experts): b for b, block in enumerate(moe_blocks(model))}
    sums = [torch.zeros(len(block.experts), dtype=torch.float64) for block in moe_blocks(model)]
    counts = [torch.zeros(len(block.experts), dtype=torch.long) for block in moe_blocks(model)]

    def record(module: nn.Module, args: tuple) -> None:
        total, tokens = expert_saliency(module, *args)
        sums[blocks[id(module)]] += total
        counts[blocks[id(module)]] += tokens

    source = ResidentLayers(model)
    store = activation_store(model, calibration, device)
    with source.stem(device):
        hidden, kwargs = capture_layer_inputs(model, calibration, device, batch_size, store)
    handles = [block.experts.register_forward_pre_hook(record) for block in moe_blocks(model)]
    try:
        for i in tqdm(range(len(source)), desc="expert saliency", unit="layer"):
            layer = source.load(i, device)
            hidden = [_forward(layer, h, kw, device) for h, kw in zip(hidden, kwargs, strict=True)]
            source.unload(i, layer)
    finally:
        for handle in handles:
            handle.remove()
    return [(s / c.clamp(min=1)).float() for s, c in zip(sums, counts, strict=True)]
