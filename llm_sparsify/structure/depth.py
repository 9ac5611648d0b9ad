"""Depth pruning: remove whole decoder blocks whose output barely differs from their input.

ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect") scores
decoder block i by its Block Influence

    BI_i = 1 − E_{X,t} [ X_{i,t}ᵀ X_{i+1,t} / (‖X_{i,t}‖ ‖X_{i+1,t}‖) ]

where X_{i,t} is the hidden state (residual stream) of token t entering block i and X_{i+1,t} the one leaving it: a
block that leaves the direction of the residual stream unchanged does little, and is removed first. A span of n
consecutive blocks is scored the same way, between X_i and X_{i+n} (the angular distance of Gromov et al., 2024,
"The Unreasonable Ineffectiveness of the Deeper Layers", up to the arccos; SANA 1.5 prunes its diffusion blocks by
this same input/output similarity). The scores need one forward of calibration data, run one decoder layer at a time
(score_passes.block_importance). Removal is physical: the blocks leave model.model.layers, the remaining attention
modules are renumbered (their KV cache index) and the config says how many layers are left, so the result saves and
loads as a plain model.

`skip_block_perplexity` gives the ground truth the score approximates (perplexity with each span bypassed), and
`rank_correlation` says how well the two agree.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from llm_sparsify.architecture import parameter_count
from llm_sparsify.errors import UserError
from llm_sparsify.evaluate import perplexity
from llm_sparsify.events import Event, progress
from llm_sparsify.models import decoder_layers

log = logging.getLogger(__name__)

BASELINES = ("last", "random")  # scores that need no data, to compare the cosine score against

PER_LAYER_LISTS = ("layer_types", "no_rope_layers")  # config lists with one entry per decoder layer


class DepthError(UserError, ValueError):
    """A depth-pruning request that cannot be met (too many blocks, bad indices, unreachable budget)."""


def check_interval(interval: int, layers: int) -> None:
    if not 1 <= interval <= layers:
        raise DepthError(f"interval must lie in [1, {layers}] (the number of decoder layers); got {interval}")


def fuse_importance(per_source: dict[str, Tensor], weights: dict[str, float] | None = None) -> Tensor:
    """Fuse the scores of several calibration sources: each divided by its sum, then a weighted mean.

    Dividing by the sum turns each source's scores into shares of that source's total change, so a source whose
    text moves the residual stream more overall (code, say) does not outvote the others, and a block that one
    source relies on keeps a large share of that source's (weighted) vote instead of being lost in its scale.
    The result also sums to one. Weights default to equal and are normalised to sum to one.
    """
    if not per_source:
        raise DepthError("fuse_importance needs the scores of at least one calibration source")
    lengths = {name: scores.numel() for name, scores in per_source.items()}
    if len(set(lengths.values())) != 1:
        raise DepthError(f"every source must score the same spans; lengths differ: {lengths}")
    weights = weights or dict.fromkeys(per_source, 1.0)
    if set(weights) != set(per_source) or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise DepthError(f"weights must give a non-negative weight to each of {sorted(per_source)}, not all zero; "
                         f"got {weights}")
    total_weight = sum(weights.values())
    fused = torch.zeros(next(iter(lengths.values())))
    for name, scores in per_source.items():
        scores = scores.detach().double().flatten().cpu()
        if scores.sum() <= 0:
            raise DepthError(f"the scores of source {name!r} do not have a positive sum: cannot normalise them")
        fused += (weights[name] / total_weight) * (scores / scores.sum()).float()
    return fused


def choose_blocks(importance: Tensor, count: int, interval: int = 1) -> list[int]:
    """The blocks of the `count` non-overlapping spans of `interval` blocks with the least total importance.

    `importance[s]` scores the span starting at block s, so there are len(importance) + interval − 1 blocks.
    A dynamic programme picks the spans (best[j][k]: least total over blocks < j with k spans); with interval 1
    that is simply the `count` least important blocks. Returns sorted block indices, count·interval of them.
    """
    importance = importance.detach().double().flatten().cpu()
    layers = importance.numel() + interval - 1
    if interval < 1 or importance.numel() == 0:
        raise DepthError(f"choose_blocks needs interval >= 1 and at least one score; got interval {interval}")
    if count < 0 or count * interval >= layers:
        raise DepthError(f"cannot remove {count} span(s) of {interval} block(s) from {layers} blocks: the count "
                         f"must be >= 0 and leave at least one block")
    inf = float("inf")
    best = [[0.0] + [inf] * count for _ in range(layers + 1)]  # best[j][k]
    took = [[False] * (count + 1) for _ in range(layers + 1)]  # best[j][k] ends with the span [j−interval, j)
    for j in range(1, layers + 1):
        for k in range(1, count + 1):
            best[j][k] = best[j - 1][k]
            if j >= interval:
                candidate = best[j - interval][k - 1] + importance[j - interval].item()
                if candidate < best[j][k]:
                    best[j][k], took[j][k] = candidate, True
    blocks, j, k = [], layers, count
    while k > 0:
        if took[j][k]:
            blocks.extend(range(j - interval, j))
            j, k = j - interval, k - 1
        else:
            j -= 1
    return sorted(blocks)


def blocks_for_budget(model: PreTrainedModel, max_parameters: int, importance: Tensor, interval: int = 1) -> list[int]:
    """The fewest least-important spans whose removal brings the model to at most `max_parameters` parameters."""
    layers = decoder_layers(model)
    block_sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    total = parameter_count(model)  # a tied embedding once, on a meta skeleton too
    if importance.numel() != len(layers) - interval + 1:
        raise DepthError(f"{importance.numel()} scores do not fit {len(layers)} blocks in spans of {interval}")
    for count in range((len(layers) - 1) // interval + 1):
        blocks = choose_blocks(importance, count, interval)
        if total - sum(block_sizes[i] for i in blocks) <= max_parameters:
            return blocks
    raise DepthError(f"a budget of {max_parameters:,} parameters cannot be met by removing spans of {interval} "
                     f"block(s) from a model of {total:,}: at least one block must stay")


def remove_blocks(model: PreTrainedModel, indices: list[int]) -> PreTrainedModel:
    """Delete decoder blocks in place, renumber the KV cache index of the rest and fix the config; return the model."""
    layers = decoder_layers(model)
    removed = set(indices)
    if len(removed) != len(indices) or not all(0 <= i < len(layers) for i in removed):
        raise DepthError(f"block indices must be distinct and lie in [0, {len(layers)}); got {indices}")
    if len(removed) >= len(layers):
        raise DepthError(f"cannot remove all {len(layers)} decoder blocks")
    kept = [i for i in range(len(layers)) if i not in removed]
    for i in sorted(removed, reverse=True):
        del layers[i]
    for new, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = model.config
    for name in PER_LAYER_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == config.num_hidden_layers:
            setattr(config, name, [values[i] for i in kept])
    widths = getattr(config, "layer_widths", None)  # unequal widths from width pruning (structure/resize.py)
    if isinstance(widths, dict):
        config.layer_widths = {key: [values[i] for i in kept] for key, values in widths.items()}
    if isinstance(getattr(config, "max_window_layers", None), int):  # Qwen2/3: layers below it use full attention
        config.max_window_layers = sum(i < config.max_window_layers for i in kept)
    config.num_hidden_layers = len(kept)
    log.info("removed decoder blocks %s; %d remain", sorted(removed), len(kept))
    return model


class Bypass(nn.Module):
    """Stands in for a decoder layer: its output is its hidden-states input (what a decoder layer returns)."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states


@torch.no_grad()
def skip_block_perplexity(
    model: PreTrainedModel,
    ids: Tensor,
    seqlen: int,
    max_windows: int | None,
    interval: int = 1,
    device: str | torch.device = "cpu",
    *,
    on_event: Event | None = None,
) -> Tensor:
    """Perplexity of the stream `ids` [1, N] with each span of `interval` blocks bypassed, one per span start.

    The ground truth that block_importance approximates; each span is swapped for an identity and put back.
    """
    layers = decoder_layers(model)
    check_interval(interval, len(layers))
    values = []
    for start in progress(range(len(layers) - interval + 1), on_event, "skip-block perplexity", "span"):
        span = range(start, start + interval)
        originals = [layers[i] for i in span]
        try:
            for i in span:
                layers[i] = Bypass()
            values.append(perplexity(model, ids, seqlen, device, max_windows))
        finally:
            for i, layer in zip(span, originals, strict=True):
                layers[i] = layer
    return torch.tensor(values)


def _ranks(x: Tensor) -> Tensor:
    """Ranks from 0, ties given the mean of the ranks they span."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    return (counts.cumsum(0) - (counts + 1) / 2).double()[inverse]


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (ties averaged); how well one ordering predicts another."""
    a, b = a.detach().flatten().cpu(), b.detach().flatten().cpu()
    if a.numel() != b.numel() or a.numel() < 2:
        raise DepthError(f"rank_correlation needs two vectors of the same length >= 2; got {a.numel()}, {b.numel()}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def baseline_importance(kind: str, n: int, seed: int = 0) -> Tensor:
    """Scores for the baselines of choose_blocks: "last" (later spans matter less) or "random" (seeded)."""
    if kind == "last":
        return torch.arange(n, 0, -1, dtype=torch.float32)
    if kind == "random":
        return torch.rand(n, generator=torch.Generator().manual_seed(seed))
    raise DepthError(f"unknown baseline {kind!r}: choose 'last' or 'random'")
