"""RIA's score and the weight updates for a fixed mask (prune/ria.py, prune/refit.py), and their recipe options."""

from __future__ import annotations

import pytest
import torch

from llm_sparsify.prune import prune_weights, refit
from llm_sparsify.prune.refit import refit_lstsq, refit_obs, update_kept
from llm_sparsify.prune.ria import prune_ria, ria_scores
from llm_sparsify.prune.wanda import prune_wanda
from llm_sparsify.quantize.grid import QuantScheme
from llm_sparsify.recipe import Quantization, RecipeError, load_recipe, recipe_from_dict
from llm_sparsify.stats import InputStatistics
from llm_sparsify.transform_pass import prune_model
from tests.conftest import tiny_model
from tests.test_methods import correlated_inputs
from tests.test_quantize import assert_on_grid


def statistics(x):
    stats = InputStatistics(x.shape[1], hessian=True, device="cpu")
    stats.add(x)
    return stats


def output_error(weight, pruned, x):
    """‖(W − Ŵ)X‖² over the tokens x [tokens, in]."""
    return (x @ (weight - pruned).T).square().sum().item()


# --- the score and its masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 1.0, 0.0])
def test_ria_score_matches_a_loop_over_the_definition(alpha):
    weight, norms = torch.randn(5, 8), torch.rand(8) + 0.1
    scores = ria_scores(weight, norms, alpha)
    for i in range(5):
        for j in range(8):
            row = sum(abs(weight[i, k].item()) for k in range(8))
            column = sum(abs(weight[k, j].item()) for k in range(5))
            expected = (abs(weight[i, j].item()) / row + abs(weight[i, j].item()) / column) * norms[j].item() ** alpha
            assert scores[i, j].item() == pytest.approx(expected, rel=1e-5)


def test_ria_score_differs_from_wanda_where_a_column_is_large_overall():
    weight = torch.ones(4, 4)
    weight[:, 0] = 10  # one input whose every weight is large: Wanda keeps it in every row, RIA weighs it down
    weight[0, 1] = 5  # row 0: 5/17 + 5/8 against 10/17 + 10/40 for the large column
    norms = torch.ones(4)
    assert (prune_wanda(weight, norms, (1, 4))[:, 0] != 0).all()
    ria = prune_ria(weight, norms, (1, 4))
    assert ria[0, 1] != 0 and ria[0, 0] == 0


def test_ria_score_of_a_zero_row_and_column_is_finite():
    weight = torch.randn(4, 6)
    weight[1], weight[:, 2] = 0, 0
    scores = ria_scores(weight, torch.rand(6))
    assert torch.isfinite(scores).all() and (scores[1] == 0).all() and (scores[:, 2] == 0).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_ria_nm_mask_keeps_the_best_n_of_every_group(n, m):
    weight, norms = torch.randn(8, 32), torch.rand(32)
    pruned = prune_ria(weight, norms, (n, m))
    kept = (pruned != 0).reshape(8, -1, m)
    assert (kept.sum(2) == n).all()
    groups = ria_scores(weight, norms).reshape(8, -1, m)
    assert (groups.masked_fill(kept, -1e9).max(2).values <= groups.masked_fill(~kept, 1e9).min(2).values).all()
    assert torch.equal(pruned[pruned != 0], weight[pruned != 0])  # no update: kept weights as they were


@pytest.mark.parametrize("per_row", [False, True])
def test_ria_unstructured_mask_removes_the_lowest_scores(per_row):
    weight, norms = torch.randn(16, 40), torch.rand(40)
    pruned, scores = prune_ria(weight, norms, 0.5, per_row=per_row), ria_scores(weight, norms)
    removed = pruned == 0
    if per_row:
        assert (removed.sum(1) == 20).all()
        highest_removed = scores.masked_fill(~removed, -1e9).max(1).values
        assert (highest_removed <= scores.masked_fill(removed, 1e9).min(1).values).all()
    else:
        assert removed.sum() == 16 * 40 // 2 and scores[removed].max() <= scores[~removed].min()


# --- weight updates for a fixed mask ----------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [(2, 4), 0.5])
def test_updates_keep_the_mask_and_lower_the_output_error(pattern):
    torch.manual_seed(0)
    weight, x = torch.randn(48, 64), correlated_inputs()
    stats = statistics(x)
    masked = prune_ria(weight, stats.column_norms(), pattern)
    mask = masked == 0
    obs = refit_obs([weight], stats.hessian(), [mask])[0]
    lstsq = refit_lstsq([weight], stats.hessian(), [mask])[0]
    for updated in (obs, lstsq):
        assert torch.equal(updated == 0, mask)  # removed weights exactly zero, kept ones nonzero
    # on inputs this correlated, updating the kept weights removes most of the error the mask leaves
    assert output_error(weight, obs, x) < 0.7 * output_error(weight, masked, x)
    # the least-squares optimum is at least as good as the greedy sweep
    assert output_error(weight, lstsq, x) <= output_error(weight, obs, x) * 1.001


def test_lstsq_update_is_the_least_squares_optimum_row_by_row():
    torch.manual_seed(1)
    weight, x = torch.randn(6, 32), correlated_inputs(features=32)
    hessian = statistics(x).hessian()
    mask = torch.rand(6, 32) < 0.5  # a different number removed in each row
    updated = refit_lstsq([weight], hessian, [mask], dampening=1e-6, tolerance=1e-7, steps=1000)[0].double()
    X, W = x.double(), weight.double()
    for i in range(6):
        keep = ~mask[i]
        # min over ŵ_K of ‖X ŵ_Kᵀ − X wᵀ‖: ordinary least squares on the kept inputs' columns
        best = torch.linalg.lstsq(X[:, keep], X @ W[i]).solution
        assert torch.allclose(updated[i, keep], best, rtol=1e-3, atol=1e-3)
        assert (updated[i, ~keep] == 0).all()


def test_updates_of_weights_that_share_an_input_are_each_their_own():
    torch.manual_seed(2)
    x = correlated_inputs()
    stats = statistics(x)
    weights = [torch.randn(16, 64), torch.randn(8, 64)]
    pruned, grids = prune_weights("wanda", weights, stats, (2, 4), update="lstsq")
    assert grids is None
    for updated, weight in zip(pruned, weights, strict=True):
        masked = prune_wanda(weight, stats.column_norms(), (2, 4))
        assert updated.shape == weight.shape and torch.equal(updated == 0, masked == 0)
        assert output_error(weight, updated, x) < 0.7 * output_error(weight, masked, x)
    # stacked rows are solved as they would be alone (to a tight tolerance, as rows stop together, not in step)
    masks = [p == 0 for p in pruned]
    together = refit_lstsq(weights, stats.hessian(), masks, tolerance=1e-6, steps=2000)
    for weight, mask, joint in zip(weights, masks, together, strict=True):
        alone = refit_lstsq([weight], stats.hessian(), [mask], tolerance=1e-6, steps=2000)[0]
        assert torch.allclose(joint, alone, atol=1e-4)


def test_lstsq_solves_rows_in_chunks_as_it_would_all_at_once(monkeypatch):
    torch.manual_seed(5)
    x = correlated_inputs()
    hessian = statistics(x).hessian()
    weights = [torch.randn(11, 64), torch.randn(5, 64)]
    masks = [torch.rand_like(w) < 0.5 for w in weights]
    whole = refit_lstsq(weights, hessian, masks, tolerance=1e-6, steps=2000)
    monkeypatch.setattr(refit, "CHUNK", 3 * 64)  # 11 rows of 64 in 4 blocks, 5 in 2
    chunked = refit_lstsq(weights, hessian, masks, tolerance=1e-6, steps=2000)
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a == 0, b == 0) and (a - b).abs().max() < 1e-3 * a.abs().max()


def test_update_steps_caps_the_conjugate_gradients():
    torch.manual_seed(6)
    weight, x = torch.randn(48, 64), correlated_inputs()
    stats = statistics(x)
    masked = prune_ria(weight, stats.column_norms(), 0.5)
    errors = [output_error(weight, prune_weights("ria", [weight], stats, 0.5, update="lstsq", update_steps=steps)[0][0],
                           x) for steps in (1, 4, 200)]
    assert output_error(weight, masked, x) > errors[0] > errors[1] > errors[2]
    recipe = recipe_from_dict({"pruning": {"method": "sparsegpt", "sparsity": 0.5, "update": "lstsq",
                                           "update_steps": 16}})
    assert recipe.options["update_steps"] == 16


def test_lstsq_after_sparsegpt_keeps_its_mask_and_lowers_its_error():
    torch.manual_seed(3)
    weight, x = torch.randn(48, 64), correlated_inputs()
    stats = statistics(x)
    options = {"blocksize": 32, "dampening": 0.01}
    (sparsegpt,), _ = prune_weights("sparsegpt", [weight], stats, (2, 4), **options)
    (updated,), _ = prune_weights("sparsegpt", [weight], stats, (2, 4), update="lstsq", **options)
    assert torch.equal(updated == 0, sparsegpt == 0)
    assert output_error(weight, updated, x) < 0.9 * output_error(weight, sparsegpt, x)


def test_lstsq_then_gptq_keeps_the_mask_and_puts_the_kept_weights_on_the_grid():
    torch.manual_seed(4)
    weight, x = torch.randn(32, 256), correlated_inputs(features=256)
    stats = statistics(x)
    quantization = Quantization("gptq", QuantScheme(4, 128, True), actorder=False)
    for method, options in (("sparsegpt", {"blocksize": 128, "dampening": 0.01}), ("ria", {"alpha": 0.5})):
        (updated,), _ = prune_weights(method, [weight], stats, (2, 4), update="lstsq", **options)
        (quantized,), (grid,) = prune_weights(method, [weight], stats, (2, 4), quantization, update="lstsq",
                                              **options)
        assert (quantized[updated == 0] == 0).all()  # removed stay removed (a kept one may round to 0)
        assert_on_grid(quantized, grid)
        (plain,), _ = prune_weights(method, [weight], stats, (2, 4), quantization, **options)
        assert output_error(weight, quantized, x) < output_error(weight, plain, x)  # the update still pays


def test_update_none_returns_the_masked_weights_and_an_unknown_update_is_refused():
    weight, hessian = torch.randn(4, 8), torch.eye(8)
    masked = weight.masked_fill(torch.rand(4, 8) < 0.5, 0)
    assert update_kept("none", [weight], [masked], hessian)[0] is masked
    with pytest.raises(ValueError, match="unknown weight update 'admm'"):
        update_kept("admm", [weight], [masked], hessian)


def test_update_in_a_whole_model_lowers_every_layer_error(calibration, one_thread):
    errors = {}
    for update in ("none", "obs", "lstsq"):
        model = tiny_model()
        recipe = recipe_from_dict({"pruning": {"method": "ria", "sparsity": "2:4", "update": update}})
        reports = prune_model(model, recipe, calibration)
        errors[update] = [e for report in reports for e in report.error.values()]
        weight = model.model.layers[1].mlp.down_proj.weight
        assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(2) == 2).all()
    # layer 0 reads the same inputs in the three runs: there the update can only help
    first = len(errors["none"]) // 3
    assert all(u < n for u, n in zip(errors["obs"][:first], errors["none"][:first], strict=True))
    assert sum(errors["lstsq"]) < sum(errors["obs"]) < sum(errors["none"])


# --- recipes ----------------------------------------------------------------------------------------------------


def test_ria_recipe_defaults_and_statistic():
    recipe = recipe_from_dict({"pruning": {"method": "ria", "sparsity": "2:4"}})
    assert recipe.options == {"alpha": 0.5, "update": "none", "permute": False} and recipe.statistic == "column_norms"
    assert recipe.needs_calibration
    updated = recipe_from_dict({"pruning": {"method": "ria", "sparsity": 0.5, "alpha": 0.25, "update": "lstsq"}})
    assert updated.options == {"alpha": 0.25, "update": "lstsq", "permute": False} and updated.statistic == "hessian"
    assert load_recipe(updated.to_dict()).options == updated.options


def test_an_update_makes_magnitude_need_calibration_inputs():
    plain = recipe_from_dict({"pruning": {"method": "magnitude", "sparsity": 0.5}})
    assert plain.statistic is None and not plain.needs_calibration
    updated = recipe_from_dict({"pruning": {"method": "magnitude", "sparsity": 0.5, "update": "obs",
                                            "inputs": "dense"}})
    assert updated.statistic == "hessian" and updated.needs_calibration and updated.inputs == "dense"
    assert recipe_from_dict({"pruning": {"method": "wanda", "sparsity": 0.5, "update": "obs"}}).statistic == "hessian"


@pytest.mark.parametrize("pruning,message", [
    ({"method": "ria", "sparsity": 0.5, "update": "admm"}, "pruning.update must be one of none, obs, lstsq"),
    ({"method": "wanda", "sparsity": 0.5, "update": True}, "pruning.update must be one of"),
    ({"method": "magnitude", "sparsity": 0.5, "scope": "global", "update": "obs"}, "global magnitude ranking"),
    ({"method": "ria", "sparsity": 0.5, "alpha": -1}, "pruning.alpha must be a number from 0 to 4"),
    ({"method": "ria", "sparsity": 0.5, "alpha": "half"}, "pruning.alpha must be a number"),
    ({"method": "sparsegpt", "sparsity": 0.5, "update": "obs"}, "sparsegpt's own sweep is the obs update"),
    ({"method": "obd", "sparsity": 0.5, "update": "lstsq"}, "unknown key.*update"),
    ({"method": "sparsegpt", "sparsity": 0.5, "update_steps": 8}, "update_steps caps .* update: lstsq"),
    ({"method": "wanda", "sparsity": 0.5, "update": "lstsq", "update_steps": 0}, "update_steps must be a positive"),
    ({"method": "obd", "sparsity": 0.5, "update_steps": 8}, "unknown key.*update_steps"),
    ({"method": "wanda", "sparsity": 0.5, "alpha": 0.5}, "unknown key.*alpha"),
    ({"method": "magnitude", "sparsity": 0.5, "inputs": "dense"}, "unknown key.*inputs"),
])
def test_bad_ria_and_update_options_are_recipe_errors(pruning, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"pruning": pruning})
