"""The budget planner's measurements (structure/budget.py), a whole-model stage: the calibration loss of the full
model with one unit changed at a time, and the file's cost model from the model's shapes.

Every measurement is a forward of the whole model (the loss is taken at its output), so this stage needs the model in
memory; the channel scores that order each layer's MLP come from the streamed score pass of width pruning.
"""

from __future__ import annotations

import logging

import gguf
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from llm_sparsify.architecture import home_device
from llm_sparsify.events import Event, progress
from llm_sparsify.export.gguf import tensor_bytes, tensor_type
from llm_sparsify.models import decoder_layers
from llm_sparsify.structure.budget import FileCost, LayerCost
from llm_sparsify.structure.depth import Bypass
from llm_sparsify.structure.resize import ATTENTION, MLP, head_layout, linear, unit_slices
from llm_sparsify.structure.width import best_units

log = logging.getLogger(__name__)

# Decode time in llama.cpp beyond the decoder's weight bytes read per token, in decoder bytes' worth of time, per
# qtype: (per decoder layer, per token, the output layer's bytes' weight). Fitted by `eval/decode_cost.py --rounds 10`
# to SmolLM2-135M GGUFs of 30, 22 and 14 layers, three MLP widths and (Q4_0) both output types, 2 threads of this
# project's 2-core CPU, llama-cpp-python 0.3.36; largest error of the fits 4.5% (Q4_0, fitted without a time per token:
# it came out negative) and 0.8% (Q8_0); two runs put Q4_0's output weight at 1.38 and 1.78 (with a time per token),
# so take it as rough. A prediction to plan by: `export --speed` measures.
# Types not fitted count bytes alone.
DECODE_OVERHEAD = {"Q4_0": (2.157e6, 0.0, 1.35), "Q8_0": (1.638e6, 1.363e7, 1.0)}
# A byte of a decoder part written at the upgrade type, in the file's decoder bytes' worth of time: for Q8_0 parts in
# a Q4_0 file, the weight fitted above for the Q8_0 output layer in a Q4_0 file (not fitted for decoder parts).
UPGRADE_WEIGHT = {("Q4_0", "Q8_0"): 1.35}


def file_cost(model: PreTrainedModel, qtype: str, small_output: bool = False, upgrade: str | None = None) -> FileCost:
    """The GGUF file of `model` at `qtype` as a cost model: each layer's bytes outside its MLP, per MLP channel and
    per KV group (export/gguf.py's types), the rest of the file, what writing the output layer at `qtype` saves, and
    the decode overheads of DECODE_OVERHEAD. `small_output`: the model's output layer is already planned at `qtype`;
    `upgrade`: a type a layer's attention or MLP may be written at instead (per channel and group bytes at it too)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))

    def size(name: str, shape: list[int], small: bool = small_output, kind: str = qtype) -> int:
        return tensor_bytes(shape, tensor_type(name, shape, kind, tied, small))

    layers = []
    for layer in decoder_layers(model):
        mlp = [list(linear(layer, name).weight.shape) for name in MLP]
        attention = [list(linear(layer, name).weight.shape) for name in ATTENTION]
        channels, groups = mlp[0][0], head_layout(layer)[2]
        in_mlp = sum(size("blk", shape) for shape in mlp)
        whole = sum(size("blk", list(p.shape)) for p in layer.parameters())
        up = {} if upgrade is None else {
            "per_channel_up": sum(size("blk", shape, kind=upgrade) for shape in mlp) / channels,
            "per_group_up": sum(size("blk", shape, kind=upgrade) for shape in attention) / groups}
        layers.append(LayerCost(whole - in_mlp, in_mlp / channels, channels,
                                sum(size("blk", shape) for shape in attention) / groups, groups, **up))
    hidden = model.config.hidden_size
    output_name, output = (("token_embd.weight", model.get_input_embeddings()) if tied
                           else ("output.weight", model.get_output_embeddings()))
    shape = list(output.weight.shape)
    read = size(output_name, shape)
    other = read + size("output_norm.weight", [hidden])
    if not tied:
        other += size("token_embd.weight", list(model.get_input_embeddings().weight.shape))
    layer_time, token_time, output_weight = DECODE_OVERHEAD.get(qtype, (0, 0, 1))
    return FileCost(layers, other, read, layer_time, token_time, output_weight,
                    output_saving=read - size(output_name, shape, True),
                    up_weight=UPGRADE_WEIGHT.get((qtype, upgrade), 1.0))


class _LayerInputs:
    """Every decoder layer's input on each calibration window, from one dense forward, so that a change to layer i
    is measured by running layers i.. only: the layers before it are bypassed and layer i is handed their output."""

    def __init__(self, model: PreTrainedModel, windows: Tensor, device: str | torch.device) -> None:
        self.model, self.windows, self.device = model, windows, device
        self.inputs: list[list[Tensor]] = [[] for _ in decoder_layers(model)]
        hooks = [layer.register_forward_pre_hook(self._record(i), with_kwargs=True)
                 for i, layer in enumerate(decoder_layers(model))]
        try:
            self.base = self.loss(0)
        finally:
            for hook in hooks:
                hook.remove()

    def _record(self, i: int):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.inputs[i].append((args[0] if args else kwargs["hidden_states"]).detach().cpu())
        return record

    def loss(self, start: int) -> float:
        """Mean next-token loss over the windows, the model run from decoder layer `start` on."""
        layers = decoder_layers(self.model)
        skipped = list(layers[:start])
        window = iter(range(len(self.windows)))

        def feed(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = self.inputs[start][next(window)].to(self.device)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        hook = layers[start].register_forward_pre_hook(feed, with_kwargs=True) if start else None
        for i in range(start):
            layers[i] = Bypass()
        total = 0.0
        try:
            for ids in self.windows:
                ids = ids[None].to(self.device)
                logits = self.model(ids, use_cache=False).logits[:, :-1].float()
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
        finally:
            for i, layer in enumerate(skipped):
                layers[i] = layer
            if hook is not None:
                hook.remove()
        return total / len(self.windows)


READERS = {"mlp": "mlp.down_proj", "heads": "self_attn.o_proj"}  # the Linear that reads a unit's output


def _rounded(weight: Tensor, kind: gguf.GGMLQuantizationType) -> Tensor:
    """`weight` [out, in] as a GGUF tensor of `kind` stores it (quantized along its rows, read back)."""
    data = gguf.quants.quantize(weight.detach().float().cpu().numpy(), kind)
    return torch.from_numpy(gguf.quants.dequantize(data, kind)).to(weight.dtype)


def _loss_rounded(run: _LayerInputs, start: int, weights: list[tuple[Tensor, gguf.GGMLQuantizationType]]) -> float:
    """The loss from layer `start` on with each weight rounded to its GGUF type, then restored."""
    saved = [w.detach().clone() for w, _ in weights]
    try:
        for w, kind in weights:
            w.copy_(_rounded(w, kind).to(w.device))
        return run.loss(start)
    finally:
        for (w, _), s in zip(weights, saved, strict=True):
            w.copy_(s)


@torch.no_grad()
def unit_losses(model: PreTrainedModel, calibration: Tensor, scores: list[Tensor], widths: list[list[int]],
                device: str | torch.device = "cpu", output_qtype: str | None = None, *,
                group_scores: list[Tensor] | None = None, group_counts: list[list[int]] | None = None,
                part_qtype: str | None = None, on_event: Event | None = None) -> dict:
    """Loss increases on the windows `calibration` [n, seqlen], one unit changed at a time in the dense model:
    block i bypassed; layer i's MLP cut to each of widths[i][1:] (its best-scoring channels by scores[i] kept, the
    others' down_proj columns zeroed, which is what removing them computes); with group scores, its attention cut to
    each of group_counts[i][1:] KV groups the same way (the o_proj columns of the removed groups' query heads zeroed);
    with `part_qtype`, its attention's and its MLP's weights rounded to that GGUF type; with `output_qtype`, the output
    layer (tied: the embedding, which is that layer too) rounded to it as the GGUF file would store it. Each is
    measured from the layer it changes on (the dense inputs of every layer kept from one forward). Returns {"base":
    dense loss, "blocks", "narrowed" (narrowed[i][0] = 0), "output" (None without output_qtype), "grouped" (None
    without group scores), "parts" ([(attention, MLP)] per layer; None without part_qtype)}."""
    home = home_device(model)
    model.to(device)
    try:
        run = _LayerInputs(model, calibration, device)
        layers = decoder_layers(model)

        def cut(i: int, unit: str, unit_scores: Tensor, counts: list[int]) -> list[float]:
            """Layer i's loss increase with only its counts[k] best units of `unit` kept, for each k (0 for k = 0)."""
            reader = linear(layers[i], READERS[unit]).weight
            row = [0.0]
            for kept in counts[1:]:
                removed = unit_slices(layers[i], unit, ~best_units(unit_scores, kept))[READERS[unit]][1]
                removed = removed.to(reader.device)
                saved = reader[:, removed].clone()
                reader[:, removed] = 0
                try:
                    row.append(run.loss(i) - run.base)
                finally:
                    reader[:, removed] = saved
            return row

        def part(i: int, names: tuple[str, ...]) -> float:
            """Layer i's loss increase with the Linears `names` rounded as a file of part_qtype writes them."""
            weights = [linear(layers[i], name).weight for name in names]
            return _loss_rounded(run, i, [(w, tensor_type("blk", list(w.shape), part_qtype, False)) for w in weights]) \
                - run.base

        result = {"blocks": [], "narrowed": [], "grouped": [] if group_scores is not None else None,
                  "parts": [] if part_qtype is not None else None, "output": None}
        for i in progress(range(len(layers)), on_event, "budget: unit losses", "layer"):
            layer = layers[i]
            layers[i] = Bypass()
            try:
                result["blocks"].append(run.loss(i) - run.base)
            finally:
                layers[i] = layer
            result["narrowed"].append(cut(i, "mlp", scores[i], widths[i]))
            if group_scores is not None:
                result["grouped"].append(cut(i, "heads", group_scores[i], group_counts[i]))
            if part_qtype is not None:
                result["parts"].append((part(i, ATTENTION), part(i, MLP)))
        if output_qtype is not None:
            weight = model.get_output_embeddings().weight
            result["output"] = _loss_rounded(run, 0, [(weight, gguf.GGMLQuantizationType[output_qtype])]) - run.base
    finally:
        model.to(home)
    log.info("budget: calibration loss %.4f; block losses %s", run.base, [round(b, 3) for b in result["blocks"]])
    return {"base": run.base, **result}
