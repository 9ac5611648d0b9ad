"""What the project needs to know of a model's layout: where its decoder layers are, and where it lives."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from llm_sparsify.errors import UserError

SUPPORTED = "Llama, Mistral, Qwen2, Qwen3 and other causal LMs whose decoder layers sit at model.model.layers"


class ModelError(UserError, ValueError):
    """A model that cannot be loaded or does not have a supported layout."""


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder layers of a Llama/Mistral-layout model, or a clear error for any other layout."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        arch = type(model).__name__
        raise ModelError(f"{arch} is not supported: llm_sparsify prunes {SUPPORTED}.")
    return layers


def home_device(module: nn.Module) -> torch.device:
    """Where a module's tensors live now, so it can be put back there after its turn on the device."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def parameter_count(model: nn.Module) -> int:
    """Parameters of the model, a tied embedding counted once (also on a meta skeleton, whose lm_head is not tied)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return sum(p.numel() for name, p in model.named_parameters() if name not in tied)
