"""Fold an input permutation into a layer exactly: reorder the rows of the Linears that produce a consumer's inputs
and the consumer's columns alike, so the layer computes the same function and the consumer's N:M groups, chosen over
the permuted inputs (prune/permute.py), lie in storage order.

    down_proj   producers gate_proj and up_proj: the MLP's intermediate channel k is act(gate_k(x)) · up_k(x), so
                reordering their rows reorders the channels, and down_proj's columns follow.
    o_proj      producer v_proj: attention mixes whole value vectors, so reordering the dims within a KV head's
                rows of v_proj reorders those dims in the output of every query head that reads that KV head;
                o_proj's columns of those query heads follow (one permutation per KV head, `heads` given).

q/k (RoPE pairs dims, and q·k must stay aligned) and anything reading the residual stream cannot be reordered so.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llm_sparsify.prune.permute import kv_permutation


def fold_input_permutation(
    producers: list[nn.Linear], consumer: nn.Linear, perm: Tensor, heads: tuple[int, int, int] | None = None
) -> None:
    """Reorder in place `consumer`'s weight columns by `perm` (new column k = old column perm[k]) and the rows (and
    biases) of `producers` that make those inputs: by `perm` itself, or with `heads` = (num_heads, num_kv_heads,
    head_dim) by the KV-head-wise permutation it implies for v_proj (`perm` must then be tied, see
    prune/permute.py). A producer's per-row quantization grid is reordered with its rows; a consumer grid with
    groups along the inputs cannot follow its columns, so that is a ValueError."""
    perm = perm.long()
    if sorted(perm.tolist()) != list(range(consumer.in_features)):
        raise ValueError(f"not a permutation of {consumer.in_features} inputs")
    rows = perm if heads is None else kv_permutation(perm, heads)
    grid = getattr(consumer, "quantization_grid", None)
    if grid is not None and grid.scale.shape[1] > 1:
        raise ValueError("the consumer's quantization groups run along its inputs: a permutation would break them")
    for producer in producers:
        if producer.out_features != len(rows):
            raise ValueError(f"a producer with {producer.out_features} outputs cannot make {len(rows)} inputs")
    with torch.no_grad():
        consumer.weight.copy_(consumer.weight[:, perm.to(consumer.weight.device)])
        for producer in producers:
            index = rows.to(producer.weight.device)
            producer.weight.copy_(producer.weight[index])
            if producer.bias is not None:
                producer.bias.copy_(producer.bias[index])
            if (grid := getattr(producer, "quantization_grid", None)) is not None:
                grid.scale = grid.scale[rows.to(grid.scale.device)]
                grid.zero_point = grid.zero_point[rows.to(grid.zero_point.device)]


def fold_layer_permutations(
    layer: nn.Module, down: Tensor | None = None, attention: Tensor | None = None,
    heads: tuple[int, int, int] | None = None,
) -> None:
    """Fold a Llama-style decoder layer's input permutations: `down` of mlp.down_proj (into gate/up_proj's rows),
    `attention` of self_attn.o_proj (into v_proj's rows; `heads` = (num_heads, num_kv_heads, head_dim))."""
    if down is not None:
        mlp = layer.mlp
        fold_input_permutation([mlp.gate_proj, mlp.up_proj], mlp.down_proj, down)
    if attention is not None:
        if heads is None:
            raise ValueError("o_proj's permutation is tied to the heads: give (num_heads, num_kv_heads, head_dim)")
        attn = layer.self_attn
        fold_input_permutation([attn.v_proj], attn.o_proj, attention, heads)


def attention_heads(config) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of a Hugging Face decoder config."""
    num_heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return num_heads, kv, head_dim
