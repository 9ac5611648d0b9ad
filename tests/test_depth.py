"""Depth pruning: block importance against the full model's hidden states, removal that saves, reloads and generates,
and the helpers (span choice, budget, fusion, rank correlation) against brute force."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from llm_sparsify.evaluate import perplexity
from llm_sparsify.pipeline import remove_depth
from llm_sparsify.recipe import Depth
from llm_sparsify.score_passes import block_importance
from llm_sparsify.structure.depth import (
    DepthError,
    baseline_importance,
    blocks_for_budget,
    choose_blocks,
    fuse_importance,
    rank_correlation,
    remove_blocks,
    skip_block_perplexity,
)
from llm_sparsify.structure.resize import load_width_pruned, remove_mlp_channels
from llm_sparsify.walk import ResidentLayers
from tests.conftest import TINY, tiny_model

KINDS = ["llama", "mistral", "qwen2", "qwen3"]


def silence_block(model, index: int) -> None:
    """Zero what block `index` adds to the residual stream, so its output is its input."""
    layer = model.model.layers[index]
    layer.self_attn.o_proj.weight.data.zero_()
    layer.mlp.down_proj.weight.data.zero_()


def reference_importance(model, calibration, interval: int) -> torch.Tensor:
    """1 − mean cosine from the full model's hidden states, one sample and one token at a time."""
    layers = len(model.model.layers)
    per_span = [[] for _ in range(layers - interval + 1)]
    pre_norm = []
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: pre_norm.append(args[0]))
    for sample in calibration:
        with torch.no_grad():
            states = model(sample[None], output_hidden_states=True).hidden_states
        states = list(states[:layers]) + [pre_norm.pop()]  # HF's last entry has the final norm applied
        for s in range(layers - interval + 1):
            for a, b in zip(states[s][0], states[s + interval][0], strict=True):
                per_span[s].append(float(a.double() @ b.double() / (a.double().norm() * b.double().norm())))
    handle.remove()
    return torch.tensor([1 - sum(c) / len(c) for c in per_span], dtype=torch.float64)


@pytest.mark.parametrize("interval", [1, 2])
def test_importance_matches_hidden_states(model, calibration, interval):
    model.model.norm.weight.data.uniform_(0.2, 3.0)  # the normed last state would give other cosines
    got = block_importance(model, calibration, interval, batch_size=4)
    assert got.shape == (len(model.model.layers) - interval + 1,)
    torch.testing.assert_close(got.double(), reference_importance(model, calibration, interval), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_silent_block_is_chosen_and_removal_keeps_logits(kind, calibration, tmp_path):
    model = tiny_model(kind)
    silence_block(model, 1)
    importance = block_importance(model, calibration)
    assert importance[1].abs() < 1e-5 and importance[1] < importance[[0, 2]].min()
    assert choose_blocks(importance, 1) == [1]
    x = calibration[:2]
    with torch.no_grad():
        before = model(x).logits
    remove_blocks(model, [1])
    assert len(model.model.layers) == model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2 and len(reloaded.model.layers) == 2
    if getattr(reloaded.config, "layer_types", None) is not None:
        assert len(reloaded.config.layer_types) == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, before)


def sliding_qwen2():
    """Three blocks: full, sliding, sliding attention (window 4), so which types stay matters on 32 tokens."""
    torch.manual_seed(0)
    config = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    return Qwen2ForCausalLM(config).eval()


def test_layer_types_follow_the_kept_blocks(calibration, tmp_path):
    model = sliding_qwen2()
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    silence_block(model, 0)
    x = calibration[:2]
    with torch.no_grad():
        before = model(x).logits
    remove_blocks(model, [0])
    assert model.config.layer_types == ["sliding_attention", "sliding_attention"]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == ["sliding_attention", "sliding_attention"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, before)


def test_unequal_widths_follow_the_kept_blocks(calibration, tmp_path):
    """Width pruning first, then depth (the budget planner's order): the recorded per-layer widths lose the removed
    block's entry, so the saved model loads with its layers' real shapes and computes the same logits."""
    model = tiny_model("llama")
    keep = [torch.arange(128) < k for k in (96, 64, 32)]
    remove_mlp_channels(model, keep)
    silence_block(model, 1)
    with torch.no_grad():
        before = model(calibration[:2]).logits
    remove_blocks(model, [1])
    assert model.config.layer_widths["intermediate_size"] == [96, 32]
    model.save_pretrained(tmp_path)
    reloaded = load_width_pruned(tmp_path).eval()
    assert [layer.mlp.down_proj.in_features for layer in reloaded.model.layers] == [96, 32]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(calibration[:2]).logits, before)


@pytest.mark.parametrize("kind", [*KINDS, "sliding_qwen2"])
def test_generation_with_cache_after_removal(kind, tmp_path):
    model = sliding_qwen2() if kind == "sliding_qwen2" else tiny_model(kind)
    remove_blocks(model, [0])  # every remaining KV cache index shifts
    model.save_pretrained(tmp_path)
    prompt = torch.randint(0, TINY["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(3))
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    uncached = model.generate(prompt, use_cache=False, **kw)
    assert uncached.shape == (1, 16)
    for generator in (model, AutoModelForCausalLM.from_pretrained(tmp_path).eval()):  # in memory, reloaded
        assert torch.equal(generator.generate(prompt, use_cache=True, **kw), uncached)


def test_remove_blocks_rejects_bad_indices():
    model = tiny_model("llama")
    for bad in ([3], [-1], [0, 0], [0, 1, 2]):
        with pytest.raises(DepthError):
            remove_blocks(model, bad)
    assert len(model.model.layers) == 3


def test_skip_block_perplexity(calibration):
    model = tiny_model("llama")
    silence_block(model, 2)
    ids = torch.randint(0, TINY["vocab_size"], (1, 200), generator=torch.Generator().manual_seed(2))
    dense = perplexity(model, ids, 32, max_windows=4)
    skipped = skip_block_perplexity(model, ids, 32, 4)
    assert skipped.shape == (3,)
    assert math.isclose(skipped[2].item(), dense, rel_tol=1e-5)
    for start in range(3):  # slow reference: a copy without the block
        copied = copy.deepcopy(model)
        remove_blocks(copied, [start])
        assert math.isclose(skipped[start].item(), perplexity(copied, ids, 32, max_windows=4), rel_tol=1e-5)
    spans = skip_block_perplexity(model, ids, 32, 4, interval=2)
    copied = copy.deepcopy(model)
    remove_blocks(copied, [0, 1])
    assert spans.shape == (2,) and math.isclose(spans[0].item(), perplexity(copied, ids, 32, max_windows=4),
                                                rel_tol=1e-5)
    assert math.isclose(perplexity(model, ids, 32, max_windows=4), dense)  # every block is back


def test_rank_correlation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, generator=g), torch.randn(20, generator=g)
    d = (a.argsort().argsort() - b.argsort().argsort()).double()
    assert math.isclose(rank_correlation(a, b), 1 - 6 * (d**2).sum().item() / (20 * (20**2 - 1)), abs_tol=1e-9)
    assert math.isclose(rank_correlation(a, a.exp()), 1.0, abs_tol=1e-12)
    stats = pytest.importorskip("scipy.stats")
    tied_a, tied_b = torch.randint(0, 4, (30,), generator=g), torch.randint(0, 5, (30,), generator=g)
    expected = stats.spearmanr(tied_a.numpy(), tied_b.numpy()).statistic
    assert math.isclose(rank_correlation(tied_a.float(), tied_b.float()), expected, abs_tol=1e-9)


@pytest.mark.parametrize("interval", [1, 2, 3])
def test_choose_blocks_is_the_best_set_of_spans(interval):
    layers = 9
    for seed in range(5):
        importance = torch.rand(layers - interval + 1, generator=torch.Generator().manual_seed(seed))
        for count in range(0, (layers - 1) // interval + 1):
            got = choose_blocks(importance, count, interval)
            assert len(got) == count * interval == len(set(got))
            best = min(
                (sum(importance[s].item() for s in starts), starts)
                for starts in itertools.combinations(range(layers - interval + 1), count)
                if all(b - a >= interval for a, b in itertools.pairwise(starts))
            )
            chosen_starts = got[::interval]
            assert math.isclose(sum(importance[s].item() for s in chosen_starts), best[0], abs_tol=1e-12)


def test_choose_blocks_errors():
    importance = torch.rand(4)
    for count, interval in ((-1, 1), (4, 1), (2, 2), (5, 1)):
        with pytest.raises(DepthError):
            choose_blocks(importance[: 5 - interval], count, interval)
    assert choose_blocks(importance, 0) == []


def test_baselines():
    assert choose_blocks(baseline_importance("last", 10), 3) == [7, 8, 9]
    assert choose_blocks(baseline_importance("last", 9, seed=5), 2, interval=2) == [6, 7, 8, 9]
    assert torch.equal(baseline_importance("random", 8, seed=1), baseline_importance("random", 8, seed=1))
    assert not torch.equal(baseline_importance("random", 8, seed=1), baseline_importance("random", 8, seed=2))
    with pytest.raises(DepthError):
        baseline_importance("first", 8)


def test_fuse_importance():
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([40.0, 1.0, 1.0, 1.0])
    fused = fuse_importance({"a": a, "b": b}, {"a": 3.0, "b": 1.0})
    torch.testing.assert_close(fused, 0.75 * a / a.sum() + 0.25 * b / b.sum())
    torch.testing.assert_close(fuse_importance({"a": a, "b": 100 * b}, {"a": 3.0, "b": 1.0}), fused)  # scale-free
    torch.testing.assert_close(fuse_importance({"a": a, "b": b}), (a / a.sum() + b / b.sum()) / 2)
    for per_source, weights in (({}, None), ({"a": a, "b": b[:3]}, None), ({"a": a}, {"b": 1.0}),
                                ({"a": a}, {"a": -1.0}), ({"a": -a}, None)):
        with pytest.raises(DepthError):
            fuse_importance(per_source, weights)


def test_blocks_for_budget(calibration):
    model = tiny_model("llama")
    importance = torch.tensor([0.3, 0.1, 0.2])
    total = model.num_parameters()
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert blocks_for_budget(model, total, importance) == []
    assert blocks_for_budget(model, total - 1, importance) == [1]
    assert blocks_for_budget(model, total - block, importance) == [1]
    assert blocks_for_budget(model, total - block - 1, importance) == [1, 2]
    assert blocks_for_budget(model, total - 2, torch.tensor([0.3, 0.1]), interval=2) == [1, 2]
    remove_blocks(model, blocks_for_budget(model, total - block - 1, importance))
    assert model.num_parameters() <= total - block - 1
    with pytest.raises(DepthError):
        blocks_for_budget(model, 10, torch.tensor([0.1]))


def test_iterative_returns_original_indices(calibration):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 5})).eval()
    silence_block(model, 2)
    silence_block(model, 3)
    x = calibration[:2]
    with torch.no_grad():
        before = model(x).logits
    one_shot = copy.deepcopy(model)
    def prune_depth(model, count, iterative=False):
        return remove_depth(model, ResidentLayers(model), Depth(blocks=count, iterative=iterative), calibration, None,
                            "cpu", 8)["removed"]

    assert prune_depth(one_shot, 2) == [2, 3]
    assert prune_depth(model, 2, iterative=True) == [2, 3]
    assert len(model.model.layers) == model.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before)
    with pytest.raises(DepthError):
        prune_depth(model, 3)


@pytest.mark.slow
def test_smollm2_depth(one_thread):
    from llm_sparsify.data import calibration_ids, evaluation_ids
    from llm_sparsify.models import load_model

    model, tokenizer = load_model(None)
    calibration = calibration_ids("c4", tokenizer, 8, 256, 0)
    importance = block_importance(model, calibration)
    assert importance.shape == (30,) and torch.isfinite(importance).all()
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    total = model.num_parameters()
    remove_blocks(model, choose_blocks(importance, 2))
    assert model.num_parameters() == total - 2 * block and model.config.num_hidden_layers == 28
    ppl = perplexity(model, evaluation_ids("wikitext2", tokenizer), seqlen=512, max_windows=4)
    assert math.isfinite(ppl)
