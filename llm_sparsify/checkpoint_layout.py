"""Tensor names on disk <-> the model's own, by transformers' own conversion mapping.

A checkpoint can keep other names and shapes than the modules that load it: Mixtral's files hold
block_sparse_moe.experts.<e>.w1/w2/w3, which transformers 5 renames and fuses into mlp.experts.gate_up_proj and
mlp.experts.down_proj when it loads, and splits back when it saves. Reading a checkpoint layer by layer must do the
same: these functions apply transformers' mapping (conversion_mapping.py, the one from_pretrained and
save_pretrained use) to any subset of tensors that holds whole groups (e.g. one decoder layer's).
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    PrefixChange,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)


def _transforms(model: PreTrainedModel) -> list:
    """The model's conversions as save_pretrained reverts them for a model built from a config (no prefix changes)."""
    return [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]


def converts(model: PreTrainedModel) -> bool:
    """Whether the model's checkpoints keep other names than its modules."""
    return bool(_transforms(model))


def model_layout(model: PreTrainedModel, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint tensors (full names, as on disk) under the names and shapes of the model's parameters."""
    transforms = _transforms(model)
    if not transforms:
        return dict(tensors)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    out: dict[str, Tensor] = {}
    pending: dict[str, WeightConverter] = {}  # target name -> the converter collecting its sources
    for name in sorted(tensors, key=dot_natural_key):
        target, pattern = rename_source_key(name, renamings, converters)
        if pattern is None:
            out[target] = tensors[name]
        else:
            pending.setdefault(target, deepcopy(by_pattern[pattern])).add_tensor(target, name, pattern, tensors[name])
    for target, converter in pending.items():
        for converted, value in converter.convert(target, model=model, config=model.config).items():
            out[converted] = value[0] if isinstance(value, list) else value
    return out


def checkpoint_layout(model: PreTrainedModel, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's tensors (full names) under the names and shapes save_pretrained writes."""
    return revert_weight_conversion(model, dict(tensors)) if converts(model) else dict(tensors)


def as_renaming(convert: Callable[[dict[str, Tensor]], dict[str, Tensor]], shapes: dict[str, tuple[int, ...]],
                converted_shapes: dict[str, tuple[int, ...]]) -> dict[str, str] | None:
    """{converted name: source name} if `convert` only renames whole tensors of these shapes (Mixtral's experts:
    w1 of expert e on disk is gate_proj of expert e in memory), found by converting one-element stand-ins that
    carry their source's number; None if it also splits, joins or reshapes. A renaming needs no copies: a
    layer's tensors go from the file to the modules as they are."""
    names = list(shapes)
    stand_ins = {name: torch.full((1,) * len(shapes[name]), float(i)) for i, name in enumerate(names)}
    try:
        converted = convert(stand_ins)
    except (RuntimeError, ValueError, IndexError):
        return None
    if converted.keys() != converted_shapes.keys() or any(t.numel() != 1 for t in converted.values()):
        return None
    sources = {name: names[int(t.item())] for name, t in converted.items()}
    if sorted(sources.values()) != sorted(names) or any(
            tuple(converted_shapes[name]) != tuple(shapes[source]) for name, source in sources.items()):
        return None
    return sources
