"""Text sources -> token ids: calibration samples [nsamples, seqlen] and evaluation streams [1, N].

A source is one of
  - "c4": the first 1,000 documents of C4 en shard 0 (the shard the papers calibrate on), bundled;
    "allenai/c4": all of that shard from the Hugging Face Hub;
  - "wikitext2": WikiText-2 raw; its test split is bundled (evaluation); calibration on its train
    split needs the Hugging Face Hub;
  - a local file: .txt (one text), .jsonl / .jsonl.gz / .json (a "text" field per record), or .pt
    (a saved LongTensor of token ids [nsamples, seqlen], used as it is);
  - any other name: a Hugging Face dataset with a "text" column, loaded when the Hub is reachable.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from llm_sparsify.errors import UserError

log = logging.getLogger(__name__)

_C4 = "c4-en-train.00000-of-01024.first1000.jsonl.gz"
_WIKITEXT2_TEST = "wikitext-2-raw-v1.test.raw.gz"
_FILE_SUFFIXES = {".txt", ".jsonl", ".json", ".gz", ".pt", ".raw", ".md"}


class DataError(UserError, ValueError):
    """A data source that cannot be read or is too small for the request."""


def check_count(value: int | None, name: str) -> None:
    """Refuse a count below 1 (samples, tokens, windows, batches); None means the default and passes."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DataError(f"{name} must be a positive integer, got {value!r}")


def warn_long_windows(seqlen: int, config) -> None:
    """Say so when windows are longer than the model's context (config.max_position_embeddings): the positions
    beyond it are ones the model was never trained on."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        log.warning("windows of %d tokens are longer than the model's context of %d tokens (max_position_embeddings): "
                    "its outputs past position %d are out of distribution; a seqlen of at most %d avoids that",
                    seqlen, limit, limit, limit)


def is_token_ids(source: object) -> bool:
    """Whether a calibration source is token ids (a tensor, or a .pt file of one) rather than text; a DataError for
    anything that is neither a tensor nor a source name or path (e.g. a Python list)."""
    if not isinstance(source, str | Path | Tensor):
        raise DataError(f"calibration must be token ids as a LongTensor [nsamples, seqlen], a data source name or a "
                        f"file path, not a {type(source).__name__}")
    return isinstance(source, Tensor) or str(source).endswith(".pt")


def _bundled(name: str) -> Path:
    return Path(str(resources.files("llm_sparsify") / "corpora" / name))


def _read_jsonl(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    try:
        if path.name.endswith(".json") and text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON lines: {error}") from None
    try:
        return [r["text"] for r in records]
    except (KeyError, TypeError):
        raise DataError(f"{path}: every record needs a \"text\" field") from None


def wikitext2_rows(gz_path: Path) -> list[str]:
    """Rows as the Hugging Face dataset has them: each line with its newline, blank lines as ""."""
    with gzip.open(gz_path, "rt", encoding="utf-8", newline="\n") as f:
        return [line if line.strip() else "" for line in f]


def _hub_texts(name: str, split: str, config: str | None = None, **kwargs) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split, **kwargs)
    except Exception as error:  # offline, unknown name, ...: datasets raises many kinds
        raise DataError(
            f"could not load dataset {name!r} ({split}) from the Hugging Face Hub: {error}. "
            "Offline, use 'c4', 'wikitext2' (evaluation) or a local .txt/.jsonl/.pt file."
        ) from None
    if "text" not in dataset.column_names:
        raise DataError(f"dataset {name!r} has no 'text' column (columns: {dataset.column_names})")
    return list(dataset["text"])


def load_documents(source: str | Path, split: str = "train") -> list[str]:
    """The documents of `source` for `split` ("train" for calibration, "test" for evaluation)."""
    path = Path(source)
    if path.is_file():
        try:
            if path.name.endswith((".jsonl", ".jsonl.gz", ".json")):
                return _read_jsonl(path)
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        except (gzip.BadGzipFile, EOFError) as error:
            raise DataError(f"{path}: not a complete gzip file ({error})") from None
    if str(source) == "c4":
        if split == "train":
            return _read_jsonl(_bundled(_C4))
        files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        return _hub_texts("allenai/c4", "validation[:1100]", data_files=files)
    if str(source) == "allenai/c4":  # the papers' full shard 0 (356k documents), not all of C4
        if split == "train":
            return _hub_texts("allenai/c4", "train", data_files={"train": "en/c4-train.00000-of-01024.json.gz"})
        return load_documents("c4", split)
    if str(source) == "wikitext2":
        if split == "test":
            return wikitext2_rows(_bundled(_WIKITEXT2_TEST))
        return _hub_texts("Salesforce/wikitext", split, "wikitext-2-raw-v1")
    if path.suffix in _FILE_SUFFIXES or path.parent.exists() and path.parent != Path("."):
        raise DataError(f"{source}: no such file")
    return _hub_texts(str(source), split)


def _load_tensor(path: Path) -> Tensor:
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Exception as error:  # torch.load raises pickle, zip and runtime errors alike
        raise DataError(f"{path}: not a saved tensor of token ids ({error})") from None


def calibration_ids(
    source: str | Path | Tensor, tokenizer: PreTrainedTokenizerBase, nsamples: int, seqlen: int, seed: int = 0
) -> Tensor:
    """Random windows of `seqlen` tokens, as the Wanda/SparseGPT references sample them.

    Each sample picks a random document longer than `seqlen` and a random window inside it; if no
    document is that long, windows are cut from all documents joined by blank lines.
    """
    if is_token_ids(source):
        ids = source if isinstance(source, Tensor) else _load_tensor(Path(source))
        what = "the calibration tensor" if isinstance(source, Tensor) else str(source)
        if not isinstance(ids, Tensor):
            raise DataError(f"{what} holds a {type(ids).__name__}, not a LongTensor of token ids [nsamples, seqlen]")
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise DataError(f"{what}: calibration ids must be a LongTensor [nsamples, seqlen], not "
                            f"{str(ids.dtype).removeprefix('torch.')} of shape {list(ids.shape)}")
        if ids.numel() == 0:
            raise DataError(f"{what} is empty (shape {list(ids.shape)}): no calibration tokens")
        return ids
    if nsamples < 1 or seqlen < 2:
        raise DataError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    documents = [d for d in load_documents(source, "train") if d.strip()]
    if not documents:
        raise DataError(f"{source} holds no text")
    encoded = tokenizer(documents)["input_ids"]
    long_enough = [ids for ids in encoded if len(ids) > seqlen]
    rng = random.Random(seed)
    if long_enough:
        picks = [long_enough[rng.randint(0, len(long_enough) - 1)] for _ in range(nsamples)]
    else:
        stream = tokenizer("\n\n".join(documents))["input_ids"]
        if len(stream) <= seqlen:
            raise DataError(f"{source} has {len(stream)} tokens, fewer than one window of {seqlen}")
        picks = [stream] * nsamples
    samples = []
    for ids in picks:
        start = rng.randint(0, len(ids) - seqlen - 1)
        samples.append(ids[start : start + seqlen])
    return torch.tensor(samples, dtype=torch.long)


def check_evaluation_source(source: str | Path) -> None:
    """Read the test text of `source` now (bundled, a file, or the Hub), so that a bad name fails before any work."""
    if not any(document.strip() for document in load_documents(source, "test")):
        raise DataError(f"{source} holds no text")


def evaluation_ids(source: str | Path, tokenizer: PreTrainedTokenizerBase) -> Tensor:
    """The test text as one token stream [1, N]: documents joined with blank lines, as the references do."""
    documents = load_documents(source, "test")
    separator = " " if str(source) == "c4" else "\n\n"
    return tokenizer(separator.join(documents), return_tensors="pt").input_ids
