"""Input-channel permutations for N:M masks (prune/permute.py), their use in prune_weights, and folding them into a
layer exactly (structure/permutation.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llm_sparsify.prune import input_permutation, prune_weights
from llm_sparsify.prune.permute import (
    _group_terms,
    kept_score,
    kv_permutation,
    nm_permutation,
    tied_permutation,
)
from llm_sparsify.prune.refit import refit_lstsq
from llm_sparsify.prune.ria import ria_scores
from llm_sparsify.prune.sparsegpt import sparsegpt_sweep
from llm_sparsify.prune.wanda import wanda_scores
from llm_sparsify.quantize.grid import Grid, QuantScheme
from llm_sparsify.recipe import Quantization, RecipeError, recipe_from_dict
from llm_sparsify.stats import InputStatistics
from llm_sparsify.structure.permutation import attention_heads, fold_input_permutation, fold_layer_permutations

pytestmark = pytest.mark.usefixtures("one_thread")


def heavy_scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Scores like Wanda's: |W| times a column scale with a few large columns."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).abs() * torch.rand(cols, generator=g) ** 3


def brute_best(scores: torch.Tensor, n: int, m: int) -> float:
    """The best kept score over every way to split 8 columns into two groups of 4."""
    cols = scores.shape[1]
    best = 0.0
    for first in itertools.combinations(range(cols), m):
        rest = [c for c in range(cols) if c not in first]
        best = max(best, kept_score(scores[:, list(first) + rest], n, m))
    return best


# --- the search ---------------------------------------------------------------------------------------------------

def test_swap_gains_are_exact():
    """D[a] + D[b] + R[b, a] + R[a, b] is what swapping columns a and b changes the kept score by (brute force)."""
    S = heavy_scores(7, 12, 0)
    for n, m in ((2, 4), (1, 4), (3, 4), (1, 3)):
        D, R = _group_terms(S, torch.arange(12).reshape(-1, m), n)
        before = kept_score(S, n, m)
        for a, b in itertools.combinations(range(12), 2):
            if a // m == b // m:
                continue
            p = torch.arange(12)
            p[a], p[b] = b, a
            gain = (D[a] + D[b] + R[b, a] + R[a, b]).item()
            assert gain == pytest.approx(kept_score(S[:, p], n, m) - before, abs=1e-4)


def test_search_ends_where_no_single_swap_helps():
    S = heavy_scores(9, 32, 1)
    p = nm_permutation(S, 2, 4)
    assert sorted(p.tolist()) == list(range(32))
    kept = kept_score(S[:, p], 2, 4)
    assert kept > kept_score(S, 2, 4)
    for a, b in itertools.combinations(range(32), 2):
        q = p.clone()
        q[a], q[b] = p[b], p[a]
        assert kept_score(S[:, q], 2, 4) <= kept + 1e-4


def test_search_never_lowers_and_mostly_finds_the_optimum_of_8_columns():
    hits, worst = 0, 1.0
    for seed in range(40):
        S = heavy_scores(6, 8, seed)
        p = nm_permutation(S, 2, 4)
        kept, identity, best = kept_score(S[:, p], 2, 4), kept_score(S, 2, 4), brute_best(S, 2, 4)
        assert kept >= identity
        hits += kept >= best - 1e-9
        worst = min(worst, kept / best)
    assert hits >= 30 and worst > 0.97  # single swaps: a local optimum, the global one in most cases


def test_identity_when_nothing_helps_and_deterministic():
    S = torch.ones(4, 16)
    assert torch.equal(nm_permutation(S, 2, 4), torch.arange(16))
    S = heavy_scores(40, 512, 2)
    first = nm_permutation(S, 2, 4, window=64)  # several windows and passes
    assert torch.equal(first, nm_permutation(S, 2, 4, window=64))
    assert kept_score(S[:, first], 2, 4) > kept_score(S, 2, 4)


def test_tied_permutation_moves_within_heads_alike_for_a_kv_group():
    heads = (4, 2, 16)
    S = heavy_scores(10, 64, 3)
    p = tied_permutation(S, 2, 4, heads)
    blocks = p.reshape(4, 16)
    for h in range(4):
        assert sorted(blocks[h].tolist()) == list(range(16 * h, 16 * h + 16))
    assert torch.equal(blocks[0], blocks[1] - 16) and torch.equal(blocks[2], blocks[3] - 16)
    assert kept_score(S[:, p], 2, 4) > kept_score(S, 2, 4)
    rows = kv_permutation(p, heads)
    assert torch.equal(rows, torch.cat([blocks[0], blocks[2] - 16]))
    untied = p.clone()
    untied[[0, 1]] = untied[[1, 0]]
    with pytest.raises(ValueError, match="within heads"):
        kv_permutation(untied, heads)


# --- prune_weights with a permutation -------------------------------------------------------------------------------

def statistics(features: int, hessian: bool, seed: int) -> InputStatistics:
    g = torch.Generator().manual_seed(seed)
    stats = InputStatistics(features, hessian, "cpu")
    stats.add(torch.randn(4, 32, features, generator=g) * torch.rand(features, generator=g) ** 2)
    return stats


@pytest.mark.parametrize("method", ["wanda", "ria"])
def test_permuted_mask_is_nm_along_the_permutation_and_keeps_more(method):
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(24, 64, generator=g)
    stats = statistics(64, False, 5)
    score = (wanda_scores if method == "wanda" else ria_scores)(weight, stats.column_norms())
    perm = input_permutation(method, [weight], stats, (2, 4))
    assert not torch.equal(perm, torch.arange(64))
    (plain,), _ = prune_weights(method, [weight], stats, (2, 4))
    (permuted,), grids = prune_weights(method, [weight], stats, (2, 4), permutation=perm, permute=True)
    assert grids is None
    zeros = (permuted[:, perm] == 0).reshape(24, 16, 4).sum(2)
    assert bool((zeros == 2).all())
    assert bool(((permuted == 0).reshape(24, 16, 4).sum(2) != 2).any())  # not 2:4 in the original order
    kept = lambda pruned: score[pruned != 0].sum().item()  # noqa: E731
    assert kept(permuted) > kept(plain)
    assert kept(permuted) == pytest.approx(kept_score(score[:, perm], 2, 4), rel=1e-5)


@pytest.mark.parametrize("update", ["none", "obs", "lstsq"])
def test_sparsegpt_and_updates_run_in_the_permuted_order(update):
    g = torch.Generator().manual_seed(6)
    weights = [torch.randn(16, 32, generator=g)]
    stats = statistics(32, True, 7)
    method = "wanda" if update == "obs" else "sparsegpt"
    perm = input_permutation(method, weights, stats, (2, 4))
    (got,), _ = prune_weights(method, weights, stats, (2, 4), permutation=perm, update=update)
    H = stats.hessian()[perm][:, perm]
    permuted = weights[0][:, perm]
    if method == "sparsegpt":
        (reference,), _ = sparsegpt_sweep([permuted], H, (2, 4))
    else:
        mask = wanda_scores(permuted, H.diagonal().sqrt()).reshape(16, 8, 4).argsort(2).argsort(2) < 2
        (reference,), _ = sparsegpt_sweep([permuted], H, mask=[mask.reshape(16, 32)])
    if update == "lstsq":
        reference = refit_lstsq([permuted], H, [reference == 0], start=[reference])[0]
    torch.testing.assert_close(got[:, perm], reference, rtol=1e-4, atol=1e-5)


def test_permutation_refuses_quantization_and_unstructured_patterns():
    weight, stats = torch.randn(8, 16), statistics(16, True, 8)
    rtn = Quantization("rtn", QuantScheme())
    with pytest.raises(ValueError, match="quantization"):
        prune_weights("wanda", [weight], stats, (2, 4), rtn, permutation=torch.arange(16))
    with pytest.raises(ValueError, match="N:M"):
        input_permutation("wanda", [weight], stats, 0.5)


def test_recipe_permute_option():
    recipe = recipe_from_dict({"pruning": {"method": "ria", "sparsity": "2:4", "permute": True}})
    assert recipe.options["permute"] is True
    assert recipe_from_dict({"pruning": {"method": "sparsegpt", "sparsity": "2:4"}}).options["permute"] is False
    with pytest.raises(RecipeError, match="N:M"):
        recipe_from_dict({"pruning": {"method": "wanda", "sparsity": 0.5, "permute": True}})
    with pytest.raises(RecipeError, match="quantization"):
        recipe_from_dict({"pruning": {"method": "wanda", "sparsity": "2:4", "permute": True},
                          "quantization": {"method": "rtn"}})
    with pytest.raises(RecipeError, match="true or false"):
        recipe_from_dict({"pruning": {"method": "wanda", "sparsity": "2:4", "permute": "yes"}})
    with pytest.raises(RecipeError, match="unknown key"):
        recipe_from_dict({"pruning": {"method": "magnitude", "sparsity": "2:4", "permute": True}})


# --- folding into a layer -------------------------------------------------------------------------------------------

def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_hidden_layers=1, vocab_size=50, attention_bias=True, mlp_bias=True)
    return LlamaForCausalLM(config).eval()


def test_a_folded_permutation_computes_the_same_function():
    model = tiny_llama()
    ids = torch.randint(0, 50, (2, 12))
    heads = attention_heads(model.config)
    assert heads == (4, 2, 16)
    with torch.no_grad():
        before = model(ids).logits
        down = torch.randperm(128)
        within = torch.stack([torch.randperm(16) for _ in range(2)])
        attention = torch.cat([h * 16 + within[h // 2] for h in range(4)])
        fold_layer_permutations(model.model.layers[0], down, attention, heads)
        after = model(ids).logits
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        fold_input_permutation([], model.model.layers[0].mlp.down_proj, down)  # the consumer alone: not exact
        assert not torch.allclose(model(ids).logits, before, atol=1e-3)


def test_pruned_with_permutations_then_folded_is_exact_nm_and_unchanged():
    model = tiny_llama()
    layer = model.model.layers[0]
    heads = attention_heads(model.config)
    ids = torch.randint(0, 50, (2, 12))
    perms = {}
    for name, module, constraint in (("down", layer.mlp.down_proj, None), ("o", layer.self_attn.o_proj, heads)):
        stats = statistics(module.in_features, False, 9)
        perms[name] = input_permutation("wanda", [module.weight.data], stats, (2, 4), constraint)
        assert not torch.equal(perms[name], torch.arange(module.in_features))
        (pruned,), _ = prune_weights("wanda", [module.weight.data], stats, (2, 4), permutation=perms[name])
        module.weight.data = pruned
    with torch.no_grad():
        before = model(ids).logits
        fold_layer_permutations(layer, perms["down"], perms["o"], heads)
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    for module in (layer.mlp.down_proj, layer.self_attn.o_proj):
        zeros = (module.weight == 0).reshape(64, -1, 4).sum(2)
        assert bool((zeros == 2).all())


def test_fold_moves_producer_grids_and_refuses_grouped_consumer_grids():
    producer, consumer = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
    perm = torch.randperm(16)
    scale = torch.arange(16.0)[:, None]
    producer.quantization_grid = Grid(QuantScheme(4, None), scale.clone(), torch.zeros(16, 1, dtype=torch.int32))
    fold_input_permutation([producer], consumer, perm)
    assert torch.equal(producer.quantization_grid.scale, scale[perm])
    consumer.quantization_grid = Grid(QuantScheme(4, 8), torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="quantization groups"):
        fold_input_permutation([producer], consumer, perm)
    with pytest.raises(ValueError, match="not a permutation"):
        fold_input_permutation([producer], torch.nn.Linear(16, 4), torch.zeros(16, dtype=torch.long))


# --- in the engine: chosen per layer, folded before the layer is saved ------------------------------------------

@pytest.mark.parametrize("pruning", [{"method": "ria", "sparsity": "2:4", "permute": True},
                                     {"method": "sparsegpt", "sparsity": "2:4", "permute": True, "update": "lstsq"},
                                     {"method": "wanda", "sparsity": "2:4", "permute": True, "inputs": "pruned"}])
def test_the_engine_folds_what_it_permuted(pruning, monkeypatch):
    """Folding changes the storage order, not the function: the same pruning with the fold skipped gives the same
    logits; folded, every down_proj and o_proj row is exact 2:4 in storage order, and some groups only exist in the
    permuted order."""
    from llm_sparsify import transform_pass as engine
    from tests.conftest import tiny_model

    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    folded, unfolded = tiny_model(), tiny_model()
    engine.prune_model(folded, recipe_from_dict({"pruning": pruning}), calibration, batch_size=2)
    monkeypatch.setattr(engine, "fold_permutations", lambda model, layer: None)
    engine.prune_model(unfolded, recipe_from_dict({"pruning": pruning}), calibration, batch_size=2)
    with torch.no_grad():
        assert torch.allclose(folded(calibration).logits, unfolded(calibration).logits, atol=1e-5)
    moved = False
    for a, b in zip(folded.model.layers, unfolded.model.layers, strict=True):
        for name in ("mlp.down_proj", "self_attn.o_proj"):
            removed = a.get_submodule(name).weight == 0
            assert (removed.reshape(removed.shape[0], -1, 4).sum(2) == 2).all(), name
            moved |= not torch.equal(a.get_submodule(name).weight, b.get_submodule(name).weight)
        assert not any(hasattr(m, "input_permutation") for m in a.modules())
    assert moved
