"""Compact storage of pruned checkpoints for shipping: zeros cost (almost) nothing, and every tensor comes back
bit for bit.

Each 2-D tensor is stored in the smallest of three layouts:
  bitmask  a packed bitmask of the non-zero entries (1 bit per weight) and those entries' values;
  N:M      when every group of M consecutive inputs holds at most N non-zeros (2:4, 4:8): values [out, in·N/M]
           and, per group, which N of the M positions they sit at, as one number among C(M, N), packed several
           to a byte (2:4: six choices, three groups a byte, 2/3 bit per weight instead of the bitmask's 1);
  dense    as it is.
"Non-zero" means any bit set, so a −0.0 is kept as a value and comes back as −0.0. In a quantized checkpoint
(quantization.safetensors beside the weights) a module's values are its integer codes, 4 bits two to a byte or
8 bits, instead of floats, whenever dequantizing them gives back the stored weight exactly. Everything else
(1-D tensors, config, tokenizer, llm_sparsify.json, the grids) is kept as it is. The output holds compact.json
(the layout of every tensor and the shard it came from) and one compact-*.safetensors per input shard.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import PreTrainedModel

from llm_sparsify.checkpoint import read_tensors, skeleton, weight_map
from llm_sparsify.events import Event, progress
from llm_sparsify.export import ExportError
from llm_sparsify.files import atomic_directory, check_output, disk_size
from llm_sparsify.models import ModelError
from llm_sparsify.quantize.grid import GRIDS_FILE, Grid, dequantize, load_grids, quantize

log = logging.getLogger(__name__)

INDEX = "compact.json"
FORMAT = "llm_sparsify.compact"
GROUP_SIZES = (4, 8)  # the M of the N:M layouts tried
_PARTS = ("", "values", "mask", "choices")  # name suffixes of the stored tensors ("": the tensor itself)
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def save_compact(checkpoint: str | Path, output: str | Path, *, overwrite: bool = False,
                 on_event: Event | None = None) -> Path:
    """Write `checkpoint` (safetensors, pruned) in compact form to the directory `output` and return it."""
    checkpoint, output = Path(checkpoint), Path(output)
    if (checkpoint / INDEX).exists():
        raise ExportError(f"{checkpoint} is already compact")
    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint} is not a checkpoint directory (no config.json)")
    try:
        files = weight_map(checkpoint)
    except ModelError as error:
        raise ExportError(str(error)) from error
    check_output(output, overwrite, source=checkpoint)  # before the work, not after
    grids = load_grids(checkpoint / GRIDS_FILE) if (checkpoint / GRIDS_FILE).exists() else {}
    shards = sorted(set(files.values()))
    entries: dict[str, dict[str, Any]] = {}
    with atomic_directory(output, overwrite=overwrite) as tmp:
        for number, shard in enumerate(progress(shards, on_event, "compact", "shard")):
            file = f"compact-{number + 1:05d}-of-{len(shards):05d}.safetensors"
            stored = {}
            names = sorted(name for name, owner in files.items() if owner == shard)
            for name, tensor in read_tensors(checkpoint, files, names).items():
                entry, parts = encode(tensor, grids.get(name.removesuffix(".weight")))
                entries[name] = {"shard": shard, "file": file, **entry}
                stored.update({f"{name}.{part}" if part else name: t.contiguous() for part, t in parts.items()})
            save_file(stored, tmp / file, metadata={"format": "pt"})
        for item in checkpoint.iterdir():  # config, tokenizer, record, grids, the weight index, ...
            if item.is_file() and item.name not in shards:
                shutil.copy(item, tmp / item.name)
        (tmp / INDEX).write_text(json.dumps({"format": FORMAT, "version": 1, "tensors": entries}, indent=1) + "\n")
    dense, compact = disk_size(checkpoint), disk_size(output)
    log.info("%s: %.1f MB, %.1f%% of the %.1f MB checkpoint", output, compact / 1e6, 100 * compact / dense, dense / 1e6)
    return output


def load_compact(path: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """The model of a compact directory, every tensor exactly as in the checkpoint it was made from."""
    path = Path(path)
    state = compact_state_dict(path)
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    try:
        model = skeleton(path, dtype)
    except ModelError as error:
        raise ExportError(str(error)) from error
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if unexpected or missing:
        raise ExportError(f"{path} does not match its config: unexpected {unexpected[:3]}, missing {missing[:3]}")
    return model.to(device)


def decompress_compact(path: str | Path, output: str | Path, *, overwrite: bool = False,
                       on_event: Event | None = None) -> Path:
    """Write a compact directory back as the ordinary checkpoint it was made from (same shards, same tensors)."""
    path, output = Path(path), Path(output)
    entries = _read_index(path)
    check_output(output, overwrite, source=path)  # before the work, not after
    shards: dict[str, list[str]] = {}
    for name, entry in entries.items():
        shards.setdefault(entry["shard"], []).append(name)
    compact_files = {entry["file"] for entry in entries.values()} | {INDEX}
    with atomic_directory(output, overwrite=overwrite) as tmp:
        for shard, names in progress(sorted(shards.items()), on_event, "decompress", "shard"):
            save_file(_restore(path, entries, names), tmp / shard, metadata={"format": "pt"})
        for item in path.iterdir():
            if item.is_file() and item.name not in compact_files:
                shutil.copy(item, tmp / item.name)
    return output


def compact_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a compact directory, restored, by its checkpoint name."""
    path = Path(path)
    entries = _read_index(path)
    return _restore(path, entries, list(entries))


# --- one tensor ---------------------------------------------------------------------------------------------------


def encode(tensor: Tensor, grid: Grid | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The smallest lossless layout of `tensor`: its index entry, and the tensors to store by name suffix
    ("" is the tensor's own name). With a `grid`, values are integer codes if they restore it exactly."""
    entry: dict[str, Any] = {"layout": "dense", "shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
    if tensor.ndim != 2 or not tensor.is_floating_point():
        return entry, {"": tensor}
    codes = _exact_codes(tensor, grid) if grid is not None else None
    value_bits = tensor.element_size() * 8 if codes is None else _container_bits(grid.scheme.bits)
    keep = nonzero_bits(tensor)
    rows, cols = tensor.shape
    sizes = {("dense", 0, 0): math.ceil(tensor.numel() * value_bits / 8),
             ("bitmask", 0, 0): math.ceil(tensor.numel() / 8) + math.ceil(int(keep.count_nonzero()) * value_bits / 8)}
    for m in GROUP_SIZES:
        if cols % m == 0:
            n = int(keep.view(torch.uint8).reshape(rows, cols // m, m).sum(-1, dtype=torch.uint8).max())
            if 0 < n < m:
                groups = rows * cols // m
                sizes[("nm", n, m)] = (math.ceil(groups / _groups_per_byte(math.comb(m, n)))
                                       + math.ceil(groups * n * value_bits / 8))
    layout, n, m = min(sizes, key=sizes.get)  # ties go to the earlier layout: dense first
    entry["layout"] = layout
    if codes is not None:
        entry["codes"] = grid.scheme.bits
    source = tensor if codes is None else codes - grid.scheme.qmin  # codes as unsigned offsets
    parts: dict[str, Tensor] = {}
    if layout == "dense":
        values = source.flatten()
    elif layout == "bitmask":
        parts["mask"] = pack_bits(keep.flatten())
        values = source.masked_select(keep)
    else:
        entry.update(n=n, m=m)
        bits = keep.view(torch.uint8).reshape(rows, cols // m, m) << torch.arange(m, dtype=torch.uint8)
        choices = _covering_choice(n, m)[bits.sum(-1, dtype=torch.uint8).long()]  # m <= 8: a pattern fits a byte
        parts["choices"] = pack_choices(choices, math.comb(m, n))
        values = source.masked_select(_choice_masks(n, m)[choices].reshape(rows, cols))
    if codes is None and layout == "dense":
        return entry, {"": tensor}
    parts["values"] = values if codes is None else pack_codes(values, grid.scheme.bits)
    return entry, parts


def decode(entry: dict[str, Any], parts: dict[str, Tensor], grid: Grid | None = None) -> Tensor:
    """The tensor that `encode` stored as `entry` and `parts`."""
    if entry["layout"] == "dense" and "codes" not in entry:
        return parts[""]
    shape, dtype = entry["shape"], getattr(torch, entry["dtype"])
    rows, cols = shape
    keep = None  # where the stored values go (None: everywhere)
    if entry["layout"] == "bitmask":
        keep = unpack_bits(parts["mask"], rows * cols).reshape(shape)
    elif entry["layout"] == "nm":
        n, m = entry["n"], entry["m"]
        choices = unpack_choices(parts["choices"], math.comb(m, n), rows * cols // m)
        keep = _choice_masks(n, m)[choices].reshape(shape)
    count = rows * cols if keep is None else int(keep.count_nonzero())
    if "codes" in entry:
        if grid is None:
            raise ExportError("a tensor stored as integer codes needs its grid (quantization.safetensors)")
        scale, zero = grid.expand(cols)
        values = unpack_codes(parts["values"], entry["codes"], count).to(torch.int32) + grid.scheme.qmin
        full = zero.to(torch.int32).clone()  # a code equal to the zero point dequantizes to 0
    else:
        values, full = parts["values"], torch.zeros(shape, dtype=dtype)
    full = values.reshape(shape) if keep is None else full.masked_scatter_(keep, values)
    return dequantize(full, scale, zero).to(dtype) if "codes" in entry else full


def nonzero_bits(tensor: Tensor) -> Tensor:
    """True where any bit of an entry is set: 0.0 is a zero, −0.0 is not (it must come back as −0.0)."""
    return _bits(tensor) != 0


def _bits(tensor: Tensor) -> Tensor:
    """The tensor's bits, as integers of the same width."""
    return tensor.view(_SAME_WIDTH_INT[tensor.element_size()])


def pack_bits(flags: Tensor) -> Tensor:
    """A 1-D bool tensor as bytes, eight flags a byte, the first in the lowest bit."""
    padded = torch.zeros(math.ceil(flags.numel() / 8) * 8, dtype=torch.uint8)
    padded[: flags.numel()] = flags
    return (padded.reshape(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    """The first `count` flags of `pack_bits`'s bytes."""
    return ((packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).bool().flatten()[:count]


def pack_choices(choices: Tensor, options: int) -> Tensor:
    """Numbers in [0, options) as bytes, as many to a byte as fit (mixed radix: the first is the lowest digit)."""
    per_byte = _groups_per_byte(options)
    padded = torch.zeros(math.ceil(choices.numel() / per_byte) * per_byte, dtype=torch.int64)
    padded[: choices.numel()] = choices.flatten()
    digits = options ** torch.arange(per_byte, dtype=torch.int64)
    return (padded.reshape(-1, per_byte) * digits).sum(1).to(torch.uint8)


def unpack_choices(packed: Tensor, options: int, count: int) -> Tensor:
    """The first `count` numbers of `pack_choices`'s bytes."""
    powers = options ** torch.arange(_groups_per_byte(options), dtype=torch.int64)
    digits = torch.arange(256)[:, None] // powers % options  # every byte's numbers, looked up rather than divided
    return digits[packed.long()].flatten()[:count]


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Unsigned integer codes as bytes: two to a byte for up to 4 bits (the first in the low nibble), else one."""
    codes = codes.flatten().to(torch.uint8)
    if _container_bits(bits) == 8:
        return codes
    padded = torch.zeros(codes.numel() + codes.numel() % 2, dtype=torch.uint8)
    padded[: codes.numel()] = codes
    return padded[0::2] | (padded[1::2] << 4)


def unpack_codes(packed: Tensor, bits: int, count: int) -> Tensor:
    """The first `count` codes of `pack_codes`'s bytes."""
    if _container_bits(bits) == 8:
        return packed[:count]
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten()[:count]


# --- helpers ------------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _container_bits(bits: int) -> int:
    if bits > 8:
        raise ExportError(f"{bits}-bit codes do not fit the compact format (at most 8 bits)")
    return 4 if bits <= 4 else 8


def _groups_per_byte(options: int) -> int:
    """How many numbers in [0, options) one byte holds (options >= 2)."""
    count = 1
    while options ** (count + 1) <= 256:
        count += 1
    return count


def _choice_masks(n: int, m: int) -> Tensor:
    """Every choice of n positions among m (itertools' order) as a row of m flags: [C(m, n), m]."""
    return torch.tensor([[j in choice for j in range(m)] for choice in itertools.combinations(range(m), n)])


def _covering_choice(n: int, m: int) -> Tensor:
    """For each pattern of set bits in a group of m (an integer below 2^m) with at most n of them, the index in
    `_choice_masks(n, m)` of the choice that holds those positions and the earliest others; -1 for the rest."""
    choices = list(itertools.combinations(range(m), n))
    table = torch.full((2**m,), -1, dtype=torch.int64)
    for pattern in range(2**m):
        kept = [j for j in range(m) if pattern >> j & 1]
        if len(kept) <= n:
            filler = [j for j in range(m) if j not in kept][: n - len(kept)]
            table[pattern] = choices.index(tuple(sorted(kept + filler)))
    return table


def _exact_codes(weight: Tensor, grid: Grid) -> Tensor | None:
    """The integer codes of a weight that holds dequantized values, if dequantizing them restores it bit for bit."""
    scale, zero = grid.expand(weight.shape[1])
    if scale.shape != weight.shape:
        return None
    codes = quantize(weight, scale, zero, grid.scheme)
    restored = dequantize(codes, scale, zero).to(weight.dtype)
    return codes if torch.equal(_bits(restored), _bits(weight)) else None


def _read_index(path: Path) -> dict[str, dict[str, Any]]:
    index_path = path / INDEX
    if not index_path.is_file():
        raise ExportError(f"{path} is not a compact checkpoint (no {INDEX})")
    index = json.loads(index_path.read_text())
    if index.get("format") != FORMAT:
        raise ExportError(f"{index_path} is not an llm_sparsify compact index")
    return index["tensors"]


def _restore(path: Path, entries: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Tensor]:
    """The named tensors of a compact directory, decoded."""
    needs_grids = any("codes" in entries[name] for name in names)
    grids = load_grids(path / GRIDS_FILE) if needs_grids else {}
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(entries[name]["file"], []).append(name)
    tensors = {}
    for file, file_names in by_file.items():
        with safe_open(path / file, "pt") as f:
            keys = set(f.keys())
            for name in file_names:
                stored = {part: f"{name}.{part}" if part else name for part in _PARTS}
                parts = {part: f.get_tensor(key) for part, key in stored.items() if key in keys}
                tensors[name] = decode(entries[name], parts, grids.get(name.removesuffix(".weight")))
    return tensors
