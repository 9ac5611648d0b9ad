"""Saving a pruned model as a Hugging Face checkpoint, atomically, with a record of what was done."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_sparsify.files import RECORD, atomic_directory, atomic_file
from llm_sparsify.quantize.grid import GRIDS_FILE, save_grids


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    output: str | Path,
    record: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write safetensors weights, config, tokenizer and `llm_sparsify.json` (recipe, measured sparsity).

    Modules that carry a `quantization_grid` (a quantized recipe) also give quantization.safetensors and the
    record's "quantization" key (the method named by the record's recipe). Everything goes to a temporary
    directory that is renamed to `output` only once complete, so an interrupted run never leaves something
    that looks like a finished checkpoint.
    """
    output = Path(output)
    grids = {name: module.quantization_grid for name, module in model.named_modules()
             if getattr(module, "quantization_grid", None) is not None}
    grids |= {f"{name}.{expert}": grid for name, module in model.named_modules()  # fused MoE experts' grids
              for expert, grid in vars(module).get("expert_grids", {}).items()}
    if grids:
        scheme = next(iter(grids.values())).scheme
        method = record.get("recipe", {}).get("quantization", {}).get("method")
        record = {**record, "quantization": {"method": method, "bits": scheme.bits, "group_size": scheme.group_size,
                                             "symmetric": scheme.symmetric}}
    with atomic_directory(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if grids:
            save_grids(grids, tmp / GRIDS_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return output


def read_record(checkpoint: str | Path) -> dict[str, Any] | None:
    """The llm_sparsify record of a checkpoint directory, or None if it has none."""
    path = Path(checkpoint) / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def update_record(checkpoint: str | Path, key: str, value: Any) -> None:
    """Set `key` of a finished output's record to `value`, the file replaced atomically."""
    record = read_record(checkpoint)
    record[key] = value
    with atomic_file(Path(checkpoint) / RECORD, overwrite=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def require_record(checkpoint: str | Path, error: type[ValueError]) -> dict[str, Any]:
    """The record of a finished llm_sparsify output, or `error` saying it has none or a malformed one."""
    try:
        record = read_record(checkpoint)
    except ValueError as reason:  # malformed JSON
        raise error(f"{Path(checkpoint) / RECORD} is not valid JSON: {reason}") from reason
    if record is None:
        raise error(f"{checkpoint} has no {RECORD}: not a finished llm_sparsify output")
    return record


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def copy_side_files(source: str | Path, destination: str | Path) -> None:
    """Copy a checkpoint's files other than weights (config, tokenizer, record, ...) that `destination` lacks."""
    source, destination = Path(source), Path(destination)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_FILES) and not (destination / item.name).exists():
            shutil.copy(item, destination / item.name)
