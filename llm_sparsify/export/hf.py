"""Saving a pruned model as a Hugging Face checkpoint, atomically, with a record of what was done."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_sparsify.files import atomic_directory

RECORD = "llm_sparsify.json"


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    output: str | Path,
    record: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write safetensors weights, config, tokenizer and `llm_sparsify.json` (recipe, measured sparsity).

    Everything goes to a temporary directory that is renamed to `output` only once complete, so an
    interrupted run never leaves something that looks like a finished checkpoint.
    """
    output = Path(output)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return output


def read_record(checkpoint: str | Path) -> dict[str, Any] | None:
    """The llm_sparsify record of a checkpoint directory, or None if it has none."""
    path = Path(checkpoint) / RECORD
    return json.loads(path.read_text()) if path.exists() else None
