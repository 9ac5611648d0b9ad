"""OWL: outlier ratios against brute-force counts and a whole-model hooked forward; layer sparsities' guarantees."""

import random

import pytest
import torch
from torch import nn

from llm_sparsify.errors import AllocationError
from llm_sparsify.prune.owl import outlier_ratio, owl_sparsities
from llm_sparsify.score_passes import layer_outlier_ratios
from llm_sparsify.targets import layer_linears
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_outlier_ratio(scores, m):
    pooled = torch.cat([s.double().reshape(-1) for s in scores])
    return (pooled > m * pooled.mean()).sum().item() / pooled.numel()


def heavy_tailed(shape, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g).abs() ** 3  # many scores above 5x the mean


@pytest.mark.parametrize("m", [2.0, 5.0, 7.0])
def test_outlier_ratio_counts_like_brute_force(m):
    scores = [heavy_tailed((48, 64), 1.0, 0), heavy_tailed((64, 48), 3.0, 1), heavy_tailed((16, 64), 0.2, 2)]
    ratio = outlier_ratio(scores, m)
    assert ratio == brute_outlier_ratio(scores, m)
    assert 0 < ratio < 1


def test_outlier_ratio_mean_is_pooled_not_per_matrix():
    a = -torch.rand(128, 128, generator=torch.Generator().manual_seed(0)).log()  # exponential: e⁻⁵ of it above 5x
    # with a mean per matrix, a and 10·a would count as many outliers as a alone (the count is scale-free); pooled,
    # the threshold is 27.5 (none of a, e^-2.75 of 10·a)
    assert outlier_ratio([a]) == pytest.approx(0.0067, abs=0.003)
    assert outlier_ratio([a, 10 * a]) == brute_outlier_ratio([a, 10 * a], 5.0)
    assert outlier_ratio([a, 10 * a]) == pytest.approx(0.032, abs=0.005)


def reference_owl(ratios, target, lam):
    """The paper's code: densities scaled into [0, 2λ] by outlier ratio, shifted to mean 1 − target."""
    low, high = min(ratios), max(ratios)
    density = [(r - low) / (high - low) * 2 * lam for r in ratios]
    mean = sum(density) / len(density)
    return [1 - (d - mean + 1 - target) for d in density]


@pytest.mark.parametrize("target,lam,seed", [(0.5, 0.08, 0), (0.7, 0.08, 1), (0.6, 0.2, 2), (0.3, 0.01, 3)])
def test_owl_sparsities_mean_spread_and_order(target, lam, seed):
    rng = random.Random(seed)
    ratios = [rng.random() * 0.05 for _ in range(30)]
    sparsities = owl_sparsities(ratios, target, lam)
    assert sparsities == pytest.approx(reference_owl(ratios, target, lam), abs=1e-12)
    assert sum(sparsities) / len(sparsities) == pytest.approx(target, abs=1e-12)
    assert max(sparsities) - min(sparsities) == pytest.approx(2 * lam, abs=1e-12)
    assert all(target - 2 * lam - 1e-12 <= s <= target + 2 * lam + 1e-12 for s in sparsities)
    assert sparsities[ratios.index(max(ratios))] == min(sparsities)  # most outliers: pruned least
    assert sparsities[ratios.index(min(ratios))] == max(sparsities)
    by_ratio = [s for _, s in sorted(zip(ratios, sparsities, strict=True))]
    assert all(a > b for a, b in zip(by_ratio, by_ratio[1:], strict=False))  # distinct ratios: strictly falling


def test_owl_sparsities_equal_ratios_are_uniform():
    assert owl_sparsities([0.01] * 7, 0.6) == [0.6] * 7
    assert owl_sparsities([0.0, 0.02], 0.5, lam=0.0) == [0.5, 0.5]


@pytest.mark.parametrize("ratios,target,lam,message", [
    ([0.1, 0.1, 0.1, 0.0], 0.95, 0.08, "smaller lambda"),  # the fewest-outlier layer would exceed 1
    ([0.1, 0.0], 0.05, 0.08, "smaller lambda"),  # the most-outlier layer would go below 0
    ([0.1, 0.0], 1.0, 0.08, r"\[0, 1\)"),
    ([0.1, float("nan")], 0.5, 0.08, "finite"),
    ([], 0.5, 0.08, "finite"),
    ([0.1, 0.0], 0.5, -0.1, "lambda"),
])
def test_owl_sparsities_errors(ratios, target, lam, message):
    with pytest.raises(AllocationError, match=message):
        owl_sparsities(ratios, target, lam)


def reference_ratios(model, calibration, m, targets):
    """Every Linear's input column norms from hooks during one forward of the whole model, then brute force."""
    squares = {}

    def hook(name):
        def add(module, args):
            x = args[0].double().reshape(-1, args[0].shape[-1])
            squares[name] = squares.get(name, 0) + x.square().sum(0)
        return add

    modules = {name: mod for layer in targets for name, mod in layer.items()}
    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in modules.items()]
    with torch.no_grad():
        model(calibration, use_cache=False)
    for handle in handles:
        handle.remove()
    return [brute_outlier_ratio([mod.weight.abs().double() * squares[name].sqrt() for name, mod in layer.items()], m)
            for layer in targets]


@pytest.mark.parametrize("m", [3.0, 5.0])
def test_layer_outlier_ratios_match_whole_model_forward(model, calibration, m):
    targets = layer_linears(model)
    ratios = layer_outlier_ratios(model, calibration, m, batch_size=4)  # 6 samples: batches of 4 and 2
    assert ratios == pytest.approx(reference_ratios(model, calibration, m, targets), abs=1e-12)
    assert any(r > 0 for r in ratios)
    assert len(set(ratios)) > 1


def test_layer_outlier_ratios_of_chosen_targets(calibration):
    model = tiny_model("llama")
    targets = [{n: mod for n, mod in layer.items() if "mlp" in n} for layer in layer_linears(model)]
    targets[1] = {}
    before = [p.clone() for p in model.parameters()]
    ratios = layer_outlier_ratios(model, calibration, 3.0, targets=targets)
    expected = reference_ratios(model, calibration, 3.0, [targets[0], targets[2]])
    assert [ratios[0], ratios[2]] == pytest.approx(expected, abs=1e-12)
    assert ratios[1] != ratios[1]  # NaN: nothing scored in that layer
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # the model is untouched


def test_layer_outlier_ratios_rejects_bad_inputs(calibration):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="LongTensor"):
        layer_outlier_ratios(model, calibration.float())
    with pytest.raises(ValueError, match="layers"):
        layer_outlier_ratios(model, calibration, targets=[{"x": nn.Linear(2, 2)}])


@torch.no_grad()
@pytest.mark.slow
def test_owl_beats_uniform_wanda_on_smollm2():
    """SmolLM2-135M, Wanda at 70% through the API, the README table's calibration (32 x 256 C4 tokens), 8 windows."""
    from llm_sparsify import compress
    from llm_sparsify.data import calibration_ids, evaluation_ids
    from llm_sparsify.evaluate import perplexity
    from llm_sparsify.models import load_model

    ppl = {}
    for label, recipe in (("uniform", {"pruning": {"method": "wanda", "sparsity": 0.7}}), ("owl", "owl-wanda-70")):
        model, tokenizer = load_model(None)
        calibration, ids = calibration_ids("c4", tokenizer, 32, 256), evaluation_ids("wikitext2", tokenizer)
        if label == "owl":
            ratios = layer_outlier_ratios(model, calibration)
            assert len(ratios) == 30 and all(0 < r < 0.1 for r in ratios) and len(set(ratios)) > 10
        compress(model, recipe, calibration, device="cpu")
        ppl[label] = perplexity(model, ids, seqlen=512, max_windows=8)
    assert ppl["owl"] < ppl["uniform"], ppl
