"""Reading a safetensors checkpoint without loading the model: where it is, which shard holds each tensor, the named
tensors read into memory of their own, and the model's modules on the meta device (a skeleton). Used by the walk's
streamed layers and by the exports alike."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from llm_sparsify.models import DEFAULT_MODEL, ModelError, decoder_layers, default_model_path

INDEX = "model.safetensors.index.json"
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_checkpoint(name_or_path: str | None) -> Path:
    """A local checkpoint directory for a path, a Hub id (downloaded once) or None (the built-in default)."""
    if name_or_path in (None, "", DEFAULT_MODEL):
        return default_model_path()
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=_HUB_FILES))
    except Exception as error:  # offline, unknown repo, gated, a path that does not exist, ...
        raise ModelError(f"{name_or_path!r} is neither a checkpoint directory nor a reachable Hub model: "
                         f"{error}") from error


def weight_map(checkpoint: Path) -> dict[str, str]:
    """Tensor name -> shard file name of a safetensors checkpoint (sharded with an index, or one file), once every
    shard is known to be there, whole (its header covers the file) and to hold the tensors the index gives it."""
    if (checkpoint / INDEX).exists():
        try:
            files = json.loads((checkpoint / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise ModelError(f"{checkpoint / INDEX} is not a safetensors index ({error!r})") from None
    elif (checkpoint / "model.safetensors").exists():
        files = dict.fromkeys(_shard_keys(checkpoint / "model.safetensors"), "model.safetensors")
    else:
        raise ModelError(f"{checkpoint} has no safetensors weights (model.safetensors or {INDEX}); "
                         "convert it first, e.g. load and save_pretrained it with transformers")
    for shard in sorted(set(files.values())):
        if not (checkpoint / shard).is_file():
            raise ModelError(f"{checkpoint / shard} is missing: {INDEX} names it for "
                             f"{next(n for n, f in files.items() if f == shard)} (an incomplete download or copy?)")
        absent = set(n for n, f in files.items() if f == shard) - _shard_keys(checkpoint / shard)
        if absent:
            raise ModelError(f"{checkpoint / shard} lacks {len(absent)} tensors that {INDEX} places in it, "
                             f"e.g. {min(absent)}")
    return files


def _shard_keys(path: Path) -> set[str]:
    """The tensor names of a safetensors file, or a ModelError naming it when it is truncated or corrupt."""
    try:
        with safe_open(path, "pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError) as error:
        raise ModelError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def read_tensors(checkpoint: Path, files: dict[str, str], names: list[str]) -> dict[str, Tensor]:
    """The named tensors, read from their shards (each shard opened once, and closed after)."""
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for file, file_names in by_file.items():
        try:
            tensors.update(_read_shard(checkpoint / file, file_names))
        except (SafetensorError, OSError, ValueError, KeyError) as error:  # changed or removed since weight_map looked
            raise ModelError(f"could not read {checkpoint / file} (truncated, corrupt or removed?): {error}") from None
    return tensors


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _read_shard(path: Path, names: list[str]) -> dict[str, Tensor]:
    """Tensors of one safetensors file, each read into memory of its own. safetensors maps the whole file, and its
    pages stay resident while any tensor of the file lives: a layer whose weights are replaced one by one (pruned)
    would hold the old and the new. (Any dtype not listed above is left to safetensors.)"""
    tensors = {}
    with path.open("rb") as file:
        data, header_bytes = read_header(file)
        header = json.loads(header_bytes)
        for name in names:
            entry = header[name]
            if entry["dtype"] not in _DTYPES:
                with safe_open(path, "pt") as mapped:
                    tensors[name] = mapped.get_tensor(name).clone()
                continue
            tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
            buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            begin, end = entry["data_offsets"]
            if end - begin != len(buffer):
                raise ValueError(f"{name} has {end - begin} bytes for {len(buffer)}")
            file.seek(data + begin)
            done = 0
            while done < len(buffer):
                if not (got := file.readinto(buffer[done:])):
                    raise ValueError(f"the file ends inside {name}")
                done += got
            tensors[name] = tensor
    return tensors


def read_header(file) -> tuple[int, bytes]:
    """A safetensors file's JSON header (its first 8 bytes give the length) and where its tensor data starts;
    ValueError if the header runs past the end of the file."""
    length = int.from_bytes(file.read(8), "little")
    size = os.fstat(file.fileno()).st_size
    if size < 8 or 8 + length > size:
        raise ValueError(f"a header of {length} bytes in a file of {size}")
    return 8 + length, file.read(length)


def skeleton(checkpoint: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The model's modules with parameters on the meta device: shapes and names, no memory."""
    try:
        config = AutoConfig.from_pretrained(checkpoint)
        with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) computed for real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"could not load model {str(checkpoint)!r}: {error}") from error
    decoder_layers(model)
    model.eval()
    model.config.use_cache = False
    return model
