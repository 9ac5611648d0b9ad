"""A quantized llm_sparsify checkpoint as a compressed-tensors "pack-quantized" checkpoint (W4A16 / W8A16).

Each quantized Linear's integer codes are recovered from its dense weight ŵ and its grid,
q = round(ŵ / scale) + zero_point, checked to give ŵ back, and packed into int32 words by
compressed-tensors' own compressor; config.json gets the `quantization_config` that transformers and
vLLM read. Embeddings, lm_head and any Linear without a grid stay dense. The sparsity record stays in
llm_sparsify.json only: current vLLM rejects a compressed-tensors `sparsity_config` with targets.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import transformers
from compressed_tensors.compressors import ModelCompressor, PackedQuantizationCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from llm_sparsify.checkpoint import INDEX, skeleton, weight_map
from llm_sparsify.export import ExportError
from llm_sparsify.export.hf import RECORD, copy_side_files, read_record
from llm_sparsify.files import atomic_directory, check_output
from llm_sparsify.quantize.grid import GRIDS_FILE, Grid, QuantScheme, dequantize, load_grids, quantize

log = logging.getLogger(__name__)

FORMAT = CompressionFormat.pack_quantized.value


def quantized_grids(checkpoint: Path) -> dict[str, Grid]:
    """The grids of a quantized llm_sparsify checkpoint, checked against the scheme its record names."""
    record = read_record(checkpoint)
    if record is None:
        raise ExportError(f"{checkpoint} is not an llm_sparsify checkpoint (it has no {RECORD})")
    section = record.get("quantization")
    if not section:
        raise ExportError(f"{checkpoint} is not quantized, and compressed-tensors stores integer weights: add a "
                          "quantization section to the recipe (e.g. method: gptq, bits: 4, group_size: 128) and "
                          "run it again")
    if not (checkpoint / GRIDS_FILE).exists():
        raise ExportError(f"{checkpoint} has no {GRIDS_FILE} although its record says it is quantized")
    grids = load_grids(checkpoint / GRIDS_FILE)
    if not grids:
        raise ExportError(f"{checkpoint / GRIDS_FILE} holds no grids")
    scheme = next(iter(grids.values())).scheme
    named = QuantScheme(section.get("bits"), section.get("group_size"), section.get("symmetric"))
    if scheme != named:
        raise ExportError(f"{checkpoint}: {RECORD} names {named} but {GRIDS_FILE} holds {scheme}")
    return grids


def quantization_config(scheme: QuantScheme, ignore: list[str]) -> QuantizationConfig:
    """The compressed-tensors config of weight-only integer quantization of every Linear but `ignore`."""
    weights = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
                               strategy="group" if scheme.group_size else "channel", group_size=scheme.group_size)
    group = QuantizationScheme(targets=["Linear"], weights=weights, format=FORMAT)
    return QuantizationConfig(config_groups={"group_0": group}, ignore=ignore, format=FORMAT,
                              quantization_status=QuantizationStatus.COMPRESSED)


def pack_weight(name: str, weight: Tensor, grid: Grid, scheme: QuantizationScheme) -> dict[str, Tensor]:
    """compressed-tensors' tensors (weight_packed, weight_scale, ...) of Linear `name`, whose weight lies on `grid`."""
    rows, columns = weight.shape
    groups = weight.reshape(rows, grid.scale.shape[1], -1)  # [out, groups, group width]: scales broadcast
    scale, zero = grid.scale[:, :, None], grid.zero_point[:, :, None]
    codes = quantize(groups, scale, zero, grid.scheme)
    dequantized = dequantize(codes, scale, zero)
    if not torch.equal(dequantized.to(weight.dtype), groups):
        raise ExportError(f"{name}.weight does not lie on its grid in {GRIDS_FILE}; was it changed after quantization?")
    stored_scale = grid.scale.to(weight.dtype)  # compressed-tensors keeps scales in the model's dtype
    if not (torch.isfinite(stored_scale).all() and (stored_scale > 0).all()):
        raise ExportError(f"{name}: a scale of its grid is not a positive finite {weight.dtype}")
    # The compressor rounds what it is given by the stored scale: give it the codes' exact values under that scale.
    if stored_scale.dtype != torch.float32:
        dequantized = dequantize(codes, stored_scale.float()[:, :, None], zero)
    state = {"weight": dequantized.reshape(rows, columns), "weight_scale": stored_scale}
    if not grid.scheme.symmetric:
        state["weight_zero_point"] = grid.zero_point.to(torch.int8)
    return PackedQuantizationCompressor.compress(state, scheme)


def pack_shard(path: Path, grids: dict[str, Grid], scheme: QuantizationScheme) -> dict[str, Tensor]:
    """The tensors of one safetensors shard, with the weights that have a grid packed and the rest as they are."""
    tensors = {}
    with safe_open(path, "pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safetensors file is no dict)
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and name in grids:
                packed = pack_weight(name, f.get_tensor(key), grids[name], scheme)
                tensors.update({f"{name}.{part}": tensor for part, tensor in packed.items()})
            else:
                tensors[key] = f.get_tensor(key)
    return tensors


def _check(grids: dict[str, Grid], linears: dict[str, nn.Linear], files: dict[str, str], checkpoint: Path) -> None:
    """Every grid belongs to a stored Linear weight whose columns its groups divide."""
    for name, grid in grids.items():
        if name not in linears or f"{name}.weight" not in files:
            raise ExportError(f"{checkpoint / GRIDS_FILE} has a grid for {name}, which is no Linear of the checkpoint")
        rows, columns = linears[name].weight.shape
        width = grid.scheme.group_width(columns)
        if columns % width:
            raise ExportError(f"{name} has {columns} inputs, which groups of {width} do not divide; "
                              "compressed-tensors (and vLLM) need equal groups: quantize with another group_size")
        if tuple(grid.scale.shape) != (rows, columns // width):
            raise ExportError(f"{name}: grid scales of shape {tuple(grid.scale.shape)} for a weight of {rows} x "
                              f"{columns} in groups of {width}")


def export_compressed_tensors(checkpoint: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """Write the quantized llm_sparsify `checkpoint` as a compressed-tensors pack-quantized checkpoint at `output`.

    One output shard per input shard, read one at a time; tokenizer files and llm_sparsify.json are copied.
    """
    checkpoint, output = Path(checkpoint), Path(output)
    grids = quantized_grids(checkpoint)
    scheme = next(iter(grids.values())).scheme
    files = weight_map(checkpoint)
    linears = {name: m for name, m in skeleton(checkpoint, torch.float32).named_modules() if isinstance(m, nn.Linear)}
    _check(grids, linears, files, checkpoint)
    config = quantization_config(scheme, ignore=sorted(set(linears) - set(grids)))
    check_output(output, overwrite, source=checkpoint)  # before the work, not after
    start = time.perf_counter()
    with atomic_directory(output, overwrite=overwrite) as tmp:
        stored: dict[str, str] = {}
        total = 0
        for shard in sorted(set(files.values())):
            tensors = pack_shard(checkpoint / shard, grids, config.config_groups["group_0"])
            save_file({k: t.contiguous() for k, t in tensors.items()}, tmp / shard, metadata={"format": "pt"})
            stored.update(dict.fromkeys(tensors, shard))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        if (checkpoint / INDEX).exists():
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(stored.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        copy_side_files(checkpoint, tmp)
        ModelCompressor(quantization_config=config).update_config(str(tmp))
    if not scheme.symmetric:
        log.warning("asymmetric grids: transformers %s loads this checkpoint with quantization_config="
                    "CompressedTensorsConfig(dequantize=True); its default (compressed) loading rejects the packed "
                    "zero points", transformers.__version__)
    log.info("%s -> %s: compressed-tensors %s, W%dA16 %s, %d Linear modules packed in %.1f s", checkpoint, output,
             FORMAT, scheme.bits, f"g{scheme.group_size}" if scheme.group_size else "per channel", len(grids),
             time.perf_counter() - start)
    return output
