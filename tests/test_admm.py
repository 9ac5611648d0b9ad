"""ADMM with a gradual mask (prune/admm.py): exact patterns, the least-squares optimum for its own mask, and a lower
layer error than Wanda's mask from the same score."""

import pytest
import torch

from llm_sparsify.prune import prune_weights, refit
from llm_sparsify.prune.admm import ITERATIONS, prune_admm
from llm_sparsify.prune.wanda import prune_wanda
from llm_sparsify.recipe import RecipeError, recipe_from_dict
from llm_sparsify.transform_pass import prune_model
from tests.conftest import tiny_model
from tests.test_methods import correlated_inputs, error
from tests.test_ria import statistics


@pytest.mark.parametrize("pattern", [0.5, 0.7, (2, 4)])
def test_admm_patterns_are_exact_and_beat_wanda(pattern):
    torch.manual_seed(0)
    weight, x = torch.randn(48, 64), correlated_inputs()
    stats = statistics(x)
    pruned = prune_admm(weight, stats.hessian(), pattern)
    removed = pruned == 0
    if isinstance(pattern, tuple):
        assert (removed.reshape(48, 16, 4).sum(2) == 2).all()
    else:
        assert (removed.sum(1) == int(64 * pattern)).all()
    # its first mask is Wanda's; moving the kept weights while the mask forms must do better
    assert error(weight, pruned, x) < 0.5 * error(weight, prune_wanda(weight, stats.column_norms(), pattern), x)


def test_admm_converges_to_the_least_squares_optimum_for_its_mask():
    """Once the mask is frozen ADMM solves a convex problem: min (ŵ − w)(H + δD²)(ŵ − w)ᵀ with ŵ = 0 off the mask,
    D² = diag H (δ on the unit diagonal of the scaled H). Its result must satisfy that problem's normal equations,
    solved here row by row with a dense solve."""
    torch.manual_seed(1)
    weight, x = torch.randn(6, 32), correlated_inputs(features=32)
    H = statistics(x).hessian().double()
    pruned = prune_admm(weight.double(), H, 0.5, iterations=2000, gradual=10, dampening=0.1)
    A = H + 0.1 * torch.diag(H.diagonal())
    W = weight.double()
    for i in range(6):
        keep = pruned[i] != 0
        best = torch.linalg.solve(A[keep][:, keep], (W[i] @ A)[keep])
        assert torch.allclose(pruned[i, keep], best, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pattern", [0.5, (2, 4)])
def test_admm_in_blocks_of_rows_as_all_at_once(monkeypatch, pattern):
    torch.manual_seed(3)
    weight, x = torch.randn(11, 64), correlated_inputs()
    x[:, 5] = 0  # a dead input: diag H = 0 there
    H = statistics(x).hessian()
    before = H.clone()
    whole = prune_admm(weight, H, pattern)
    assert torch.equal(H, before)  # the caller's Hessian is not changed
    assert whole.isfinite().all() and (whole[:, 5] == 0).all()  # a dead input's weights go first
    monkeypatch.setattr(refit, "CHUNK", 3 * 64)  # 11 rows of 64 in 4 blocks
    blocks = prune_admm(weight, H, pattern)
    assert torch.equal(whole == 0, blocks == 0) and torch.allclose(whole, blocks, atol=1e-5)


def test_admm_through_prune_weights_with_an_update():
    """method admm in the dispatcher, then `update: lstsq` for its mask: the mask is kept, the error does not grow."""
    torch.manual_seed(2)
    x = correlated_inputs()
    stats = statistics(x)
    weights = [torch.randn(16, 64), torch.randn(8, 64)]
    alone, _ = prune_weights("admm", weights, stats, (2, 4))
    refitted, _ = prune_weights("admm", weights, stats, (2, 4), update="lstsq")
    for weight, a, r in zip(weights, alone, refitted, strict=True):
        assert torch.equal(a == 0, r == 0)
        assert error(weight, r, x) <= error(weight, a, x) * 1.001


def test_admm_recipe_options_and_a_whole_model(calibration, one_thread):
    recipe = recipe_from_dict({"pruning": {"method": "admm", "sparsity": 0.5}})
    assert recipe.options == {"iterations": ITERATIONS, "update": "none"} and recipe.statistic == "hessian"
    assert recipe_from_dict(recipe.to_dict()).options == recipe.options
    for bad in (0, 2.5, True):
        with pytest.raises(RecipeError, match="pruning.iterations must be a positive integer"):
            recipe_from_dict({"pruning": {"method": "admm", "sparsity": 0.5, "iterations": bad}})
    with pytest.raises(RecipeError, match="unknown key.*permute"):
        recipe_from_dict({"pruning": {"method": "admm", "sparsity": "2:4", "permute": True}})

    errors = {}
    for method in ("wanda", "admm"):
        model = tiny_model()
        reports = prune_model(model, recipe_from_dict({"pruning": {"method": method, "sparsity": 0.5}}), calibration)
        errors[method] = sum(e for report in reports for e in report.error.values())
        for layer in model.model.layers:
            for weight in (layer.self_attn.q_proj.weight, layer.mlp.down_proj.weight):
                assert ((weight == 0).sum(1) == weight.shape[1] // 2).all()
    assert errors["admm"] < errors["wanda"]
