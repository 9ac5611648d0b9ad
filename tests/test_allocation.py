"""Sensitivity allocation: exact means, brute-force optimality, the score pass against a hooked whole-model
forward, and the recipe end to end."""

import copy
import itertools
import random

import pytest
import torch
from torch import nn

from llm_sparsify.errors import AllocationError
from llm_sparsify.pipeline import run_recipe
from llm_sparsify.prune.allocation import (
    allocate_sparsities,
    hull_value,
    lower_hull,
    sensitivity_levels,
)
from llm_sparsify.prune.wanda import prune_wanda
from llm_sparsify.recipe import RecipeError, Sensitivity, load_recipe
from llm_sparsify.score_passes import layer_sensitivities
from llm_sparsify.targets import layer_linears
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LEVELS = [0.4, 0.5, 0.6, 0.7, 0.8]


def random_curves(layers, levels, seed, convex=True):
    """Rising damage curves: convex (rising increments) or with any increments."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.rand(layers, len(levels) - 1, generator=g, dtype=torch.float64)
    if convex:
        steps = steps.sort(dim=1).values
    start = torch.rand(layers, 1, generator=g, dtype=torch.float64)
    return torch.cat([start, start + steps.cumsum(1)], dim=1)


def cost(errors, levels, sparsities):
    return sum(hull_value(levels, errors[i].tolist(), s) for i, s in enumerate(sparsities))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("convex", [True, False])
def test_mean_is_exact_plain_and_weighted(seed, convex):
    rng = random.Random(seed)
    errors = random_curves(12, LEVELS, seed, convex)
    target = rng.uniform(0.41, 0.79)
    plain = allocate_sparsities(errors, LEVELS, target)
    assert sum(plain) / len(plain) == pytest.approx(target, abs=1e-12)
    weights = [rng.randint(1, 10**6) for _ in range(12)]
    weighted = allocate_sparsities(errors, LEVELS, target, weights)
    assert sum(w * s for w, s in zip(weights, weighted, strict=True)) / sum(weights) == pytest.approx(target, abs=1e-12)
    assert all(LEVELS[0] <= s <= LEVELS[-1] for s in plain + weighted)


def test_target_at_the_ends_of_the_levels():
    errors = random_curves(4, LEVELS, 0)
    assert allocate_sparsities(errors, LEVELS, 0.4) == pytest.approx([0.4] * 4, abs=1e-12)
    assert allocate_sparsities(errors, LEVELS, 0.8) == pytest.approx([0.8] * 4, abs=1e-12)
    with pytest.raises(AllocationError, match="outside"):
        allocate_sparsities(errors, LEVELS, 0.85)


def test_more_sensitive_layer_gets_lower_sparsity():
    base = random_curves(1, LEVELS, 3)[0]
    for factor in (1.5, 3.0, 10.0):
        errors = torch.stack([base, factor * base, base + 0.5 * (base - base[0])])
        low, high, middle = allocate_sparsities(errors, LEVELS, 0.6)
        assert high < low  # uniformly higher (same shape, scaled) damage: pruned less
        assert high <= middle <= low
    equal = allocate_sparsities(torch.stack([base, base]), LEVELS, 0.6)
    assert equal[0] + equal[1] == pytest.approx(1.2, abs=1e-12)


def test_a_layer_weighted_more_costs_more_per_level():
    """A big layer moving by Δs moves w·Δs weights: with equal curves, the small layer gives way."""
    errors = torch.stack([torch.tensor(LEVELS) ** 2] * 2).double()
    small, big = allocate_sparsities(errors, LEVELS, 0.6, [1, 9])
    assert (small + 9 * big) / 10 == pytest.approx(0.6, abs=1e-12)
    brute = min((cost(errors, LEVELS, [a, (6 - a) / 9]), a) for a in [0.4 + 0.001 * k for k in range(401)]
                if 0.4 <= (6 - a) / 9 <= 0.8)
    assert cost(errors, LEVELS, [small, big]) <= brute[0] + 1e-12


@pytest.mark.parametrize("seed", range(8))
def test_equals_brute_force_on_the_level_grid(seed):
    """Convex curves, equal weights, a target on the grid: the optimum lies on grid points (the budget is a sum of
    unit steps), so the greedy cost equals the best of every level combination with the exact mean."""
    layers = 4
    errors = random_curves(layers, LEVELS, seed, convex=True)
    target_index = random.Random(seed).choice([1, 2, 3])
    target = LEVELS[target_index]
    best = min(sum(errors[i, k].item() for i, k in enumerate(combo))
               for combo in itertools.product(range(len(LEVELS)), repeat=layers)
               if sum(combo) == target_index * layers)
    chosen = allocate_sparsities(errors, LEVELS, target)
    assert cost(errors, LEVELS, chosen) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_not_worse_than_a_fine_grid_search_with_weights(seed):
    """Any curves (made convex), unequal weights: no point of a fine grid meeting the budget costs less."""
    rng = random.Random(seed)
    errors = random_curves(3, LEVELS, seed, convex=False)
    weights = [rng.randint(1, 5) for _ in range(3)]
    target = rng.uniform(0.45, 0.75)
    chosen = allocate_sparsities(errors, LEVELS, target, weights)
    grid = [0.4 + 0.005 * k for k in range(81)]
    found = []
    for a, b in itertools.product(grid, grid):
        c = (target * sum(weights) - weights[0] * a - weights[1] * b) / weights[2]
        if LEVELS[0] <= c <= LEVELS[-1]:
            found.append(cost(errors, LEVELS, [a, b, c]))
    assert cost(errors, LEVELS, chosen) <= min(found) + 1e-12
    assert cost(errors, LEVELS, chosen) == pytest.approx(min(found), abs=0.05)  # the grid is coarse


def test_lower_hull_against_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        levels = sorted(rng.sample(range(100), 7))
        errors = [rng.random() for _ in levels]
        hull = lower_hull(levels, errors)
        for k in range(len(levels)):  # every point on or above the hull, hull vertices on it
            assert hull_value(levels, errors, levels[k]) <= errors[k] + 1e-12
        assert all(hull_value(levels, errors, levels[k]) == pytest.approx(errors[k]) for k in hull)
        slopes = [(errors[b] - errors[a]) / (levels[b] - levels[a]) for a, b in zip(hull, hull[1:], strict=False)]
        assert all(x < y for x, y in zip(slopes, slopes[1:], strict=False))


def test_sensitivity_levels():
    assert sensitivity_levels(0.7, 0.2, 5) == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert sensitivity_levels(0.9, 0.2, 3) == pytest.approx([0.7, 0.845, 0.99])
    with pytest.raises(AllocationError, match="2 levels"):
        sensitivity_levels(0.5, 0.1, 1)


def reference_damage(model, calibration, index, level):
    """Layer `index` of a copy Wanda-pruned from hooked dense inputs; ‖f̂−f‖²/‖f‖² of its output from the
    whole-model hidden states, summed and per token."""
    norms = {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            norms[name] = norms.get(name, 0) + x.square().sum(0)
        return record

    layer = model.model.layers[index]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        dense = model(calibration, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    pruned = copy.deepcopy(model)
    for n, m in pruned.model.layers[index].named_modules():
        if isinstance(m, nn.Linear):
            m.weight.data = prune_wanda(m.weight.data, norms[n].sqrt().float(), level)
    with torch.no_grad():
        out = pruned(calibration, output_hidden_states=True).hidden_states[index + 1].double()
    f = dense[index + 1].double()
    diff = (out - f).square().sum(-1)
    return (diff.sum() / f.square().sum()).item(), (diff / f.square().sum(-1)).mean().item()


def test_score_pass_matches_a_hooked_whole_model_forward(calibration):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    levels = [0.2, 0.5, 0.8]
    tables = layer_sensitivities(model, calibration, levels, batch_size=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left dense
    for currency in ("token", "sum", "update"):
        t = tables[currency]
        assert t.shape == (3, 3) and torch.isfinite(t).all() and (t > 0).all()
        assert (t[:, 1:] > t[:, :-1]).all()  # rising with sparsity
    for index in (0, 1):  # the last layer's hidden state has the final norm applied
        total, token = reference_damage(model, calibration, index, 0.5)
        assert tables["sum"][index, 1].item() == pytest.approx(total, rel=1e-4)
        assert tables["token"][index, 1].item() == pytest.approx(token, rel=1e-4)


def test_score_pass_layer_without_targets_is_nan(calibration):
    model = tiny_model("llama")
    targets = [dict(layer) for layer in layer_linears(model)]
    targets[1] = {}
    tables = layer_sensitivities(model, calibration, [0.3, 0.6], targets)
    assert torch.isnan(tables["token"][1]).all() and torch.isfinite(tables["token"][[0, 2]]).all()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_recipe_end_to_end_mean_is_the_target(method, calibration):
    model = tiny_model("llama")
    recipe = load_recipe({"pruning": {"method": method, "sparsity": 0.6, "allocation": "sensitivity",
                                      "sensitivity_levels": 3, "sensitivity_spread": 0.15}})
    reports, stages = run_recipe(model, recipe, calibration)
    info = stages["pruning"]["sensitivity"]
    assert info["levels"] == pytest.approx([0.45, 0.6, 0.75])
    sparsities = info["sparsities"]
    assert len(sparsities) == 3 and len(set(sparsities)) > 1
    weights = [sum(m.weight.numel() for m in layer.values()) for layer in layer_linears(model)]
    assert sum(w * s for w, s in zip(weights, sparsities, strict=True)) / sum(weights) == pytest.approx(0.6, abs=1e-12)
    for report, s in zip(reports, sparsities, strict=True):  # each layer pruned to its own sparsity
        assert all(abs(share - s) < 0.02 for share in report.sparsity.values())


def test_recipe_parsing_and_round_trip():
    recipe = load_recipe({"pruning": {"method": "sparsegpt", "sparsity": 0.7, "allocation": "sensitivity"}})
    assert recipe.sensitivity == Sensitivity() and recipe.owl is None
    assert recipe.needs_calibration and recipe.streams
    again = load_recipe(recipe.to_dict())
    assert again.sensitivity == recipe.sensitivity
    custom = load_recipe({"pruning": {"method": "wanda", "sparsity": 0.6, "allocation": "sensitivity",
                                      "sensitivity_levels": 7, "sensitivity_error": "sum"}})
    assert custom.sensitivity == Sensitivity(levels=7, error="sum")


@pytest.mark.parametrize("section,message", [
    ({"sparsity": "2:4", "allocation": "sensitivity"}, "not N:M"),
    ({"sparsity": "2:4", "allocation": "owl"}, "not N:M"),
    ({"sparsity": 0.6, "allocation": "sensitivity", "sensitivity_levels": 1}, "2 or more"),
    ({"sparsity": 0.6, "allocation": "sensitivity", "sensitivity_error": "kl"}, "token"),
    ({"sparsity": 0.6, "allocation": "sensitivity", "sensitivity_spread": 0}, "positive"),
    ({"sparsity": 0.6, "sensitivity_levels": 3}, "need `allocation: sensitivity`"),
    ({"sparsity": 0.6, "allocation": "greedy"}, "uniform, owl, sensitivity"),
])
def test_recipe_errors(section, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe({"pruning": {"method": "wanda", **section}})


def test_pipeline_rejects_n_m_with_a_per_layer_allocation(calibration):
    from dataclasses import replace
    recipe = load_recipe({"pruning": {"method": "wanda", "sparsity": 0.5, "allocation": "sensitivity"}})
    with pytest.raises(RecipeError, match="not 2:4"):
        run_recipe(tiny_model("llama"), replace(recipe, pattern=(2, 4)), calibration)
