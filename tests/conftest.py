"""Tiny random Llama and Mistral models built from a config: architecture variety in milliseconds; a tiny Llama
saved with the real tokenizer for the command-line tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import llm_sparsify.models

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_model(kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=16))
    elif kind == "qwen2":  # biases on q/k/v
        model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    else:  # qwen3: RMSNorm on queries and keys
        model = Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16))
    return model.eval()


@pytest.fixture(params=["llama", "mistral", "qwen2", "qwen3"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is far faster than two contending on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def calibration():
    return torch.randint(0, TINY["vocab_size"], (6, 32), generator=torch.Generator().manual_seed(1))


def save_tiny_llama(path, hidden: int, layers: int):
    """A random Llama (4 heads, 2 KV groups, MLP twice as wide) saved with save_pretrained, with the real default
    tokenizer beside it."""
    tokenizer = AutoTokenizer.from_pretrained(llm_sparsify.models.default_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    assert len(tokenizer) <= config.vocab_size
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# CLI fixtures: a tiny Llama saved with the real tokenizer, and calibration ids, in the requesting module's `workdir`
@pytest.fixture(scope="module")
def model_dir(workdir):
    return save_tiny_llama(workdir / "tiny-llama", hidden=32, layers=2)


@pytest.fixture(scope="module")
def calib(workdir):
    path = workdir / "calib.pt"
    torch.save(torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(0)), path)
    return path
