"""A pruned checkpoint quantized by bitsandbytes as transformers loads it (NF4, FP4 or LLM.int8), saved as it saves it.

bitsandbytes quantizes every Linear of the decoder layers itself; lm_head and tied embeddings stay dense.
NF4 and FP4 map each block of 64 weights to a 16-value codebook scaled by the block's absmax, LLM.int8
rounds each row to int8 by its absmax. All three contain 0, so pruned weights stay exactly 0.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from llm_sparsify.export import ExportError
from llm_sparsify.export.hf import copy_side_files, read_record
from llm_sparsify.files import atomic_directory, check_output
from llm_sparsify.models import default_device

log = logging.getLogger(__name__)

MODES = ("nf4", "fp4", "int8")


def bitsandbytes_config(mode: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """transformers' config for `mode`: 4-bit NF4 / FP4 computing in `compute_dtype`, or LLM.int8."""
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=compute_dtype)


def _probe(mode: str, device: torch.device) -> None:
    """Quantize a small Linear with `mode` on `device` and run it forward, as the exported model will."""
    import bitsandbytes as bnb

    weight = torch.linspace(-1, 1, 64 * 64).reshape(64, 64)
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        inputs = torch.ones(1, 64, dtype=torch.float16, device=device)
    else:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type=mode)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=mode)
        inputs = torch.ones(1, 64, device=device)
    with torch.no_grad():
        layer.to(device)(inputs)


def check_backend(mode: str, device: str) -> None:
    """Raise ExportError unless the installed bitsandbytes can quantize and run `mode` on `device`."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ExportError(f"the bitsandbytes {mode} export needs bitsandbytes, which is not installed ({error}): "
                          "pip install 'llm_sparsify[bnb]', or export to compressed-tensors instead") from error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _probe(mode, torch.device(device))
    except Exception as error:  # a backend without the kernel: NotImplementedError, RuntimeError, ...
        raise ExportError(f"bitsandbytes {bnb.__version__} cannot run {mode} on {device} ({type(error).__name__}: "
                          f"{error}); export on a CUDA GPU, or to another format (compressed-tensors, GGUF)") from error


def export_bitsandbytes(checkpoint: str | Path, output: str | Path, *, mode: str = "nf4", device: str | None = None,
                        overwrite: bool = False) -> Path:
    """Load the (pruned) `checkpoint` through transformers' BitsAndBytesConfig on `device` and save it to `output`.

    `mode` is nf4, fp4 (4-bit) or int8 (LLM.int8). The tokenizer files and llm_sparsify.json are copied.
    """
    checkpoint, output = Path(checkpoint), Path(output)
    if mode not in MODES:
        raise ExportError(f"unknown bitsandbytes mode {mode!r}; choose one of {', '.join(MODES)}")
    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint} is not a Hugging Face checkpoint (it has no config.json)")
    record = read_record(checkpoint) or {}  # a dense checkpoint (no record) exports too: the baseline to compare
    if record.get("quantization"):
        log.warning("%s is already quantized (%s); bitsandbytes quantizes its dequantized weights again with its "
                    "own codebook. compressed-tensors keeps the checkpoint's own grid.", checkpoint,
                    record["quantization"])
    check_output(output, overwrite, source=checkpoint)  # before the work, not after
    device = device or default_device()
    check_backend(mode, device)
    dtype = AutoConfig.from_pretrained(checkpoint).dtype or torch.float32
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, device_map={"": device},
                                                 quantization_config=bitsandbytes_config(mode, dtype))
    with atomic_directory(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        copy_side_files(checkpoint, tmp)
    log.info("%s -> %s: bitsandbytes %s on %s in %.1f s", checkpoint, output, mode, device,
             time.perf_counter() - start)
    return output
