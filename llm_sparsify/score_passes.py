"""Score passes: read-only walks of the decoder layers (walk.walk) that measure what a later decision needs.

    block importance      1 − cos(block input, block output) per span    -> structure/depth.choose_blocks
    width unit scores     ‖|W|·‖X‖‖ (or ‖|W|‖) per MLP channel / KV group -> structure/width.choose_units
    OWL outlier ratios    share of Wanda scores above M × their mean      -> prune/owl.owl_sparsities
    sensitivities         each layer's damage at several Wanda sparsities -> prune/allocation
    expert saliency       REAP's router-weighted output norm per expert   -> structure/experts.experts_to_keep

Each reads the layers from a LayerSource: a model in memory (the default) or a checkpoint streamed from disk, the
same numbers either way. Every pass propagates the dense activations, and under torchrun sums its statistics over
the ranks (each rank brings its share of the calibration samples).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from llm_sparsify import distributed
from llm_sparsify.events import Event
from llm_sparsify.prune.allocation import CURRENCIES
from llm_sparsify.prune.owl import M, outlier_ratio
from llm_sparsify.prune.wanda import prune_wanda, wanda_scores
from llm_sparsify.structure.depth import check_interval
from llm_sparsify.structure.experts import expert_saliency, moe_blocks
from llm_sparsify.structure.resize import UNITS
from llm_sparsify.structure.width import channel_scores, group_scores
from llm_sparsify.targets import layer_linears
from llm_sparsify.walk import BATCH_SIZE, LayerSource, ResidentLayers, collect_statistics, forward_layer, walk

log = logging.getLogger(__name__)


def _wanda_importance(layer: nn.Module, modules: dict[str, nn.Linear], hidden: list[Tensor], kwargs: list[dict],
                      device: torch.device, outputs: list[Tensor] | None = None) -> dict[str, Tensor]:
    """|W_ij|·‖X_j‖₂ of each given Linear of the layer, ‖X_j‖ over every rank's calibration tokens; the layer's
    outputs appended to `outputs`, if given (from the same forwards)."""
    stats = collect_statistics(layer, modules, hidden, kwargs, hessian=False, device=device, outputs=outputs)
    distributed.sum_statistics(stats.values())
    return {name: wanda_scores(module.weight, stats[name].column_norms()) for name, module in modules.items()}


@torch.no_grad()
def block_importance(model: PreTrainedModel, calibration: Tensor, interval: int = 1, device: str | torch.device = "cpu",
                     batch_size: int = BATCH_SIZE, *, layers: LayerSource | None = None,
                     on_event: Event | None = None) -> Tensor:
    """1 − mean cosine between the hidden states entering block i and leaving block i+interval−1, one per span start
    (structure/depth.py); cosines in float32 along the hidden dimension, the mean over every token of every rank."""
    layers = layers or ResidentLayers(model)
    check_interval(interval, len(layers))
    device = torch.device(device)
    states: deque[list[Tensor]] = deque(maxlen=interval + 1)  # states[0] enters the span that states[-1] leaves
    totals = torch.zeros(len(layers) - interval + 1, 2, dtype=torch.float64)  # Σ cos, tokens, per span start

    def visit(i: int, layer: nn.Module, hidden: list[Tensor], kwargs: list[dict]) -> list[Tensor]:
        if not states:
            states.append(hidden)
        states.append([forward_layer(layer, h, kw, device) for h, kw in zip(hidden, kwargs, strict=True)])
        if len(states) == interval + 1:
            for a, b in zip(states[0], states[-1], strict=True):
                cosines = F.cosine_similarity(a.float(), b.float(), dim=-1)
                totals[i + 1 - interval] += torch.tensor([cosines.double().sum().item(), cosines.numel()])
        return states[-1]

    walk(model, layers, calibration, visit, device=device, batch_size=batch_size, what="block importance",
         original=True, on_event=on_event)
    distributed.total(totals)
    importance = (1 - totals[:, 0] / totals[:, 1]).float()
    log.info("block importance (interval %d), by span start: %s", interval,
             " ".join(f"{i}:{s:.4f}" for i, s in enumerate(importance.tolist())))
    return importance


@torch.no_grad()
def unit_scores(model: PreTrainedModel, unit: str, score: str, calibration: Tensor | None,
                device: str | torch.device = "cpu", batch_size: int = BATCH_SIZE, *,
                layers: LayerSource | None = None, on_event: Event | None = None) -> list[Tensor]:
    """Per decoder layer, the score of each MLP channel ("mlp") or KV group ("heads") (structure/width.py): the L2
    norm over the unit's weights of |W| (score "weight": weights only, no data) or of |W|·‖X‖ ("activation", the
    dense model's inputs)."""
    layers = layers or ResidentLayers(model)
    device = torch.device(device)
    scorer = channel_scores if unit == "mlp" else group_scores
    scores: list[Tensor] = []

    def visit(i: int, layer: nn.Module, hidden: list[Tensor], kwargs: list[dict]) -> list[Tensor] | None:
        importance, outputs = None, []
        if score == "activation":
            importance = _wanda_importance(layer, {name: layer.get_submodule(name) for name in UNITS[unit]},
                                           hidden, kwargs, device, outputs)
        scores.append(scorer(layer, importance))
        return outputs or None

    walk(model, layers, calibration if score == "activation" else None, visit, device=device,
         batch_size=batch_size, what=f"{unit} unit scores", original=True, on_event=on_event)
    return scores


@torch.no_grad()
def activation_importance(model: PreTrainedModel, calibration: Tensor, device: str | torch.device = "cpu",
                          batch_size: int = BATCH_SIZE, *, on_event: Event | None = None) -> list[dict[str, Tensor]]:
    """Per decoder layer of a model in memory, the Wanda importance |W_ij|·‖X_j‖₂ of every Linear (by name within the
    layer), from the dense model's inputs. Every layer's importances at once: for small models and tests."""
    found: list[dict[str, Tensor]] = []

    def visit(i: int, layer: nn.Module, hidden: list[Tensor], kwargs: list[dict]) -> None:
        modules = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        found.append({name: s.cpu() for name, s in _wanda_importance(layer, modules, hidden, kwargs,
                                                                     torch.device(device)).items()})

    walk(model, ResidentLayers(model), calibration, visit, device=torch.device(device), batch_size=batch_size,
         what="activation-aware width scores", original=True, on_event=on_event)
    return found


@torch.no_grad()
def layer_outlier_ratios(model: PreTrainedModel, calibration: Tensor, m: float = M,
                         targets: list[dict[str, nn.Linear]] | None = None, device: str | torch.device = "cpu",
                         batch_size: int = BATCH_SIZE, *, layers: LayerSource | None = None,
                         on_event: Event | None = None) -> list[float]:
    """OWL's outlier ratio D_ℓ of every decoder layer's Wanda scores over its `targets` (default: every Linear), the
    dense model's activations streamed through (prune/owl.py). A layer with no target gets NaN."""
    layers = layers or ResidentLayers(model)
    targets = layer_linears(model) if targets is None else targets
    if len(targets) != len(layers):
        raise ValueError(f"targets lists {len(targets)} layers, the model has {len(layers)}")
    ratios: list[float] = []

    def visit(i: int, layer: nn.Module, hidden: list[Tensor], kwargs: list[dict]) -> list[Tensor] | None:
        if not targets[i]:
            ratios.append(math.nan)
            return None
        outputs: list[Tensor] = []
        scores = _wanda_importance(layer, targets[i], hidden, kwargs, torch.device(device), outputs)
        ratios.append(outlier_ratio(list(scores.values()), m))
        return outputs

    walk(model, layers, calibration, visit, device=torch.device(device), batch_size=batch_size,
         what="OWL outlier ratios", original=True, on_event=on_event)
    log.info("OWL outlier ratios (M=%g): %s", m, ", ".join(f"{r:.4f}" for r in ratios))
    return ratios


def _damage(layer: nn.Module, hidden: list[Tensor], kwargs: list[dict], dense: list[Tensor],
            device: torch.device) -> Tensor:
    """[Σ‖f̂−f‖², Σ_t ‖f̂_t−f_t‖²/‖f_t‖²] of the layer as it is now, against the dense outputs `dense`."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for h, kw, f in zip(hidden, kwargs, dense, strict=True):
        f = f.to(device).double()
        diff = (forward_layer(layer, h, kw, device).to(device).double() - f).square().sum(-1)
        totals[0] += diff.sum()
        totals[1] += (diff / f.square().sum(-1).clamp_min(1e-30)).sum()
    return totals


@torch.no_grad()
def layer_sensitivities(model: PreTrainedModel, calibration: Tensor, levels: Sequence[float],
                        targets: list[dict[str, nn.Linear]] | None = None, device: str | torch.device = "cpu",
                        batch_size: int = BATCH_SIZE, *, layers: LayerSource | None = None,
                        on_event: Event | None = None) -> dict[str, Tensor]:
    """Every layer's damage at every level, in each currency (prune/allocation.py): {currency: [layers, levels]}.

    The weights are pruned by Wanda (statistics of the dense inputs) on a copy and put back, so the model ends as it
    began. A layer with no target gets NaN rows (leave it out before allocate_sparsities).
    """
    layers = layers or ResidentLayers(model)
    targets = layer_linears(model) if targets is None else targets
    device = torch.device(device)
    tables = {c: torch.full((len(layers), len(levels)), math.nan, dtype=torch.float64) for c in CURRENCIES}

    def visit(i: int, layer: nn.Module, hidden: list[Tensor], kwargs: list[dict]) -> list[Tensor] | None:
        if not targets[i]:
            return None
        dense: list[Tensor] = []  # the dense outputs, from the statistics' own forwards
        stats = collect_statistics(layer, targets[i], hidden, kwargs, hessian=False, device=device, outputs=dense)
        distributed.sum_statistics(stats.values())
        norms = torch.zeros(3, dtype=torch.float64, device=device)  # Σ‖f‖², Σ‖f − x‖², tokens
        for h, f in zip(hidden, dense, strict=True):
            norms += torch.stack([f.double().square().sum(), (f.double() - h.double()).square().sum(),
                                  torch.tensor(f[..., 0].numel(), dtype=torch.float64)]).to(device)
        originals = {name: module.weight.data for name, module in targets[i].items()}
        try:
            for k, level in enumerate(levels):
                for name, module in targets[i].items():
                    module.weight.data = prune_wanda(originals[name], stats[name].column_norms(), level)
                totals = torch.cat([_damage(layer, hidden, kwargs, dense, device), norms])
                distributed.average([totals])  # ratios of sums: a mean over ranks is as good as a sum
                diff, token, dense_sq, update_sq, tokens = totals.tolist()
                tables["sum"][i, k] = diff / dense_sq
                tables["token"][i, k] = token / tokens
                tables["update"][i, k] = diff / update_sq
        finally:
            for name, module in targets[i].items():
                module.weight.data = originals[name]
        return dense

    walk(model, layers, calibration, visit, device=device, batch_size=batch_size, what="sensitivities",
         original=True, on_event=on_event)
    log.info("sensitivities (token currency, levels %s): %s", [round(s, 4) for s in levels],
             tables["token"].tolist())
    return tables


@torch.no_grad()
def expert_saliencies(model: PreTrainedModel, calibration: Tensor, device: str | torch.device = "cpu",
                      batch_size: int = BATCH_SIZE, *, layers: LayerSource | None = None,
                      on_event: Event | None = None) -> list[Tensor]:
    """Per MoE block (in model order), each expert's mean over the tokens routed to it of g_j(x)·‖f_j(x)‖₂ (REAP); an
    expert no token chose scores 0. The model's experts must be unfused (structure/experts.py)."""
    layers = layers or ResidentLayers(model)
    blocks = {id(block.experts): b for b, block in enumerate(moe_blocks(model))}
    totals = [torch.zeros(2, len(block.experts), dtype=torch.float64) for block in moe_blocks(model)]

    def record(module: nn.Module, args: tuple) -> None:
        total, tokens = expert_saliency(module, *args)
        totals[blocks[id(module)]] += torch.stack([total, tokens.double()])

    def visit(i: int, layer: nn.Module, hidden: list[Tensor], kwargs: list[dict]) -> list[Tensor]:
        return [forward_layer(layer, h, kw, torch.device(device)) for h, kw in zip(hidden, kwargs, strict=True)]

    handles = [block.experts.register_forward_pre_hook(record) for block in moe_blocks(model)]
    try:
        walk(model, layers, calibration, visit, device=torch.device(device), batch_size=batch_size,
             what="expert saliency", original=True, on_event=on_event)
    finally:
        for handle in handles:
            handle.remove()
    for t in totals:
        distributed.total(t)
    return [(sums / tokens.clamp(min=1)).float() for sums, tokens in totals]
