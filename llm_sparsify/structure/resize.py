"""Cut MLP channels and KV groups out of decoder layers (physically smaller weights), record the widths in the
config, and load a checkpoint whose layers differ in width. The surgery only: which units go is width.py's call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from llm_sparsify.architecture import ModelError, decoder_layers
from llm_sparsify.errors import UserError


class WidthError(UserError, ValueError):
    """A width-pruning request that cannot be carried out (bad amount, scope, unit, keep masks, ...)."""


def linear(layer: nn.Module, name: str) -> nn.Linear:
    """The Linear `name` of a decoder layer, or a ModelError that says the layer is not Llama-style."""
    try:
        module = layer.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise ModelError(f"width pruning needs a Llama-style decoder layer with {name} as nn.Linear "
                         f"({type(layer).__name__} has none)")
    return module


def head_layout(layer: nn.Module) -> tuple[int, int, int]:
    """(head_dim, query heads per KV group, KV groups) of a decoder layer's attention."""
    attention = layer.self_attn
    head_dim = attention.head_dim
    groups = linear(layer, "self_attn.k_proj").out_features // head_dim
    return head_dim, attention.num_key_value_groups, groups


MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
UNITS = {"mlp": MLP, "heads": ATTENTION}  # the Linears a unit spans, by unit kind


def unit_squares(layer: nn.Module, unit: str, values: dict[str, Tensor] | None = None) -> Tensor:
    """Per unit of one decoder layer, the sum of squares of its weights, or of `values` given per weight (e.g. an
    importance of the weights' shapes, keyed mlp.gate_proj, ...): [channels] for "mlp", [KV groups] for "heads".
    The one definition of a unit (width.py's docstring): a channel is row c of gate/up_proj and column c of
    down_proj; a KV group is its k/v rows, the q rows of the query heads that read it and their o_proj columns, as
    this layer holds them (head_layout: after global head pruning layers differ). Differentiable in the weights."""
    w = [linear(layer, name).weight if values is None else values[name] for name in UNITS[unit]]
    if unit == "mlp":
        gate, up, down = w
        return gate.square().sum(1) + up.square().sum(1) + down.square().sum(0).to(gate.device)
    head_dim, _, groups = head_layout(layer)
    q, k, v, o = w
    queries = q.square().sum(1) + o.square().sum(0).to(q.device)  # per query row / o column, r·d of them per group
    keys = k.square().sum(1) + v.square().sum(1).to(k.device)
    return queries.reshape(groups, -1).sum(1) + keys.reshape(groups, head_dim).sum(1).to(q.device)


def _take(linear: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    """A new Linear holding the rows (dim 0, with their biases) or the columns (dim 1) `index` of `linear`."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, index.to(bias.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return new


def _check_keep(keep: list[Tensor], sizes: list[int], what: str) -> list[Tensor]:
    if len(keep) != len(sizes):
        raise WidthError(f"keep has {len(keep)} masks, the model {len(sizes)} decoder layers")
    masks = []
    for i, (mask, size) in enumerate(zip(keep, sizes, strict=True)):
        mask = torch.as_tensor(mask).cpu()
        if mask.dtype != torch.bool or mask.shape != (size,):
            raise WidthError(f"keep mask of layer {i} must be a bool tensor of {size} {what}, "
                             f"not {mask.dtype} {tuple(mask.shape)}")
        if not mask.any():
            raise WidthError(f"keep mask of layer {i} removes every {what[:-1]}; a layer needs at least one")
        masks.append(mask)
    return masks


def unit_slices(layer: nn.Module, unit: str, keep: Tensor) -> dict[str, tuple[int, Tensor]]:
    """Which rows (dim 0) or columns (dim 1) of each Linear of a `unit` ("mlp", "heads") this layer keeps, for the
    bool mask `keep` of its units: the one place where a unit's rows and columns are spelled out for surgery."""
    index = keep.nonzero().squeeze(1)
    if unit == "mlp":
        return {"mlp.gate_proj": (0, index), "mlp.up_proj": (0, index), "mlp.down_proj": (1, index)}
    head_dim, per_group, _ = head_layout(layer)
    kv = (index[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    width = per_group * head_dim
    queries = (index[:, None] * width + torch.arange(width)).reshape(-1)
    q, k, v, o = ATTENTION
    return {q: (0, queries), k: (0, kv), v: (0, kv), o: (1, queries)}


def cut_tensors(tensors: dict[str, Tensor], slices: dict[str, tuple[int, Tensor]]) -> dict[str, Tensor]:
    """A layer's tensors (names within the layer) with only the rows or columns `slices` keeps (unit_slices): the
    same cut as cut_layer, on tensors read from a checkpoint rather than on modules."""
    cut = dict(tensors)
    for name, (dim, index) in slices.items():
        cut[f"{name}.weight"] = tensors[f"{name}.weight"].index_select(dim, index)
        if dim == 0 and f"{name}.bias" in tensors:
            cut[f"{name}.bias"] = tensors[f"{name}.bias"].index_select(0, index)
    return cut


@torch.no_grad()
def cut_layer(layer: nn.Module, unit: str, keep: Tensor) -> None:
    """Physically drop one decoder layer's units whose `keep` entry is False (smaller Linears); in place."""
    if keep.all():
        return
    for name, (dim, index) in unit_slices(layer, unit, keep).items():
        owner, _, leaf = name.rpartition(".")
        setattr(layer.get_submodule(owner), leaf, _take(linear(layer, name), index, dim))
    kept = int(keep.sum())
    if unit == "mlp" and hasattr(layer.mlp, "intermediate_size"):
        layer.mlp.intermediate_size = kept
    if unit == "heads":
        heads = kept * layer.self_attn.num_key_value_groups
        for attribute, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kept)):
            if hasattr(layer.self_attn, attribute):  # older transformers versions keep these on the module
                setattr(layer.self_attn, attribute, value)


def units_of(layer: nn.Module, unit: str) -> int:
    """How many MLP channels ("mlp") or KV groups ("heads") a decoder layer has."""
    return linear(layer, "mlp.gate_proj").out_features if unit == "mlp" else head_layout(layer)[2]


def remove_units(model: PreTrainedModel, unit: str, keep: list[Tensor]) -> list[dict[str, tuple[int, Tensor]]]:
    """Physically drop every decoder layer's units ("mlp" channels, "heads": KV groups with their query heads and
    o_proj columns) whose keep entry is False, and record the widths in the config; in place. Works on a meta
    skeleton too. Returns each layer's unit_slices (empty where the layer keeps everything)."""
    if unit not in UNITS:
        raise WidthError(f"unit must be one of {tuple(UNITS)}, not {unit!r}")
    layers = decoder_layers(model)
    what = "channels" if unit == "mlp" else "groups"
    masks = _check_keep(keep, [units_of(layer, unit) for layer in layers], what)
    slices = [{} if mask.all() else unit_slices(layer, unit, mask) for layer, mask in zip(layers, masks, strict=True)]
    for layer, mask in zip(layers, masks, strict=True):
        cut_layer(layer, unit, mask)
    record_widths(model)
    return slices


def remove_mlp_channels(model: PreTrainedModel, keep: list[Tensor]) -> PreTrainedModel:
    """Physically drop the MLP channels whose keep entry is False (smaller gate/up/down weights); in place."""
    remove_units(model, "mlp", keep)
    return model


def remove_kv_groups(model: PreTrainedModel, keep: list[Tensor]) -> PreTrainedModel:
    """Physically drop the KV groups whose keep entry is False, with their query heads and o_proj columns; in place."""
    remove_units(model, "heads", keep)
    return model


def layer_widths(model: PreTrainedModel) -> dict[str, list[int]]:
    """Per decoder layer, its MLP intermediate size and number of KV heads, read off the weights."""
    layers = decoder_layers(model)
    return {"intermediate_size": [units_of(layer, "mlp") for layer in layers],
            "num_key_value_heads": [units_of(layer, "heads") for layer in layers]}


def record_widths(model: PreTrainedModel) -> None:
    """Write the model's widths into its config: the plain fields where all layers agree, else config.layer_widths.

    With unequal widths the plain fields hold the largest layer's (the model is built at that size, then each
    layer is cut to its recorded width by load_width_pruned).
    """
    config = model.config
    widths = layer_widths(model)
    head_dim, per_group, _ = head_layout(decoder_layers(model)[0])
    config.head_dim = head_dim  # hidden_size / num_attention_heads no longer gives it
    config.intermediate_size = max(widths["intermediate_size"])
    config.num_key_value_heads = max(widths["num_key_value_heads"])
    config.num_attention_heads = config.num_key_value_heads * per_group
    if all(len(set(sizes)) == 1 for sizes in widths.values()):
        if hasattr(config, "layer_widths"):
            del config.layer_widths
    else:
        config.layer_widths = widths


def _state_dict_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path} holds no .safetensors weights; load_width_pruned reads save_pretrained output")
    return files


def load_width_pruned(path: str | Path, **from_config_kwargs: Any) -> PreTrainedModel:
    """Load a width-pruned checkpoint, also one whose layers differ in width (which transformers cannot load).

    Plain AutoModelForCausalLM.from_pretrained builds every Llama layer at the config's one intermediate_size and
    head count, so a checkpoint with config.layer_widths (scope "global") fails there with size mismatches. Here the
    model is built from its config (`from_config_kwargs`, e.g. dtype, go to AutoModelForCausalLM.from_config), each
    layer cut to its recorded width, and the saved weights loaded strictly. Uniform checkpoints load the same way.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a saved model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, **from_config_kwargs)
    widths = getattr(config, "layer_widths", None)
    if widths is not None:
        remove_mlp_channels(model, [torch.arange(max(widths["intermediate_size"])) < n
                                    for n in widths["intermediate_size"]])
        remove_kv_groups(model, [torch.arange(max(widths["num_key_value_heads"])) < n
                                 for n in widths["num_key_value_heads"]])
    state: dict[str, Tensor] = {}
    for file in _state_dict_files(path):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases: dict[int, set[str]] = {}  # tied parameters: one saved name stands for all
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), set()).add(name)
    by_name = {name: names for names in aliases.values() for name in names}
    missing = [name for name in missing if not (by_name.get(name, set()) & state.keys())]
    if missing or unexpected:
        raise ModelError(f"{path}: weights do not match the recorded widths (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()
