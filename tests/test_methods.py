"""SparseGPT against the other methods on the layer-wise reconstruction problem ‖WX − ŴX‖."""

import pytest
import torch

from llm_sparsify.prune.magnitude import prune_magnitude
from llm_sparsify.prune.sparsegpt import inverse_hessian_factor, prune_sparsegpt, prune_sparsegpt_together
from llm_sparsify.prune.wanda import prune_wanda
from llm_sparsify.stats import InputStatistics


def correlated_inputs(tokens=2048, features=64, seed=0):
    """Inputs with strongly correlated features, as activations in LLMs are: X = Z·A, Z low-dimensional."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, 16, generator=g)
    mix = torch.randn(16, features, generator=g)
    return z @ mix + 0.1 * torch.randn(tokens, features, generator=g)


def error(weight, pruned, x):
    return ((x @ weight.T - x @ pruned.T).norm() / (x @ weight.T).norm()).item()


@pytest.mark.parametrize("pattern,margin", [(0.5, 0.7), ((2, 4), 0.7), (0.7, 0.98)])
def test_sparsegpt_beats_magnitude_and_wanda_on_correlated_inputs(pattern, margin):
    torch.manual_seed(0)
    weight, x = torch.randn(48, 64), correlated_inputs()
    stats = InputStatistics(64, hessian=True, device="cpu")
    stats.add(x)
    sparsegpt = prune_sparsegpt(weight, stats.hessian(), pattern, blocksize=32)
    wanda = prune_wanda(weight, stats.column_norms(), pattern)
    magnitude = prune_magnitude(weight, pattern)
    assert error(weight, sparsegpt, x) < margin * error(weight, wanda, x)
    assert error(weight, sparsegpt, x) < margin * error(weight, magnitude, x)


def test_sparsegpt_patterns_are_exact():
    torch.manual_seed(0)
    weight, x = torch.randn(32, 64), correlated_inputs()
    hessian = 2 * x.T @ x / x.shape[0]
    pruned = prune_sparsegpt(weight, hessian, (2, 4), blocksize=16)
    assert ((pruned != 0).reshape(32, 16, 4).sum(2) == 2).all()
    pruned = prune_sparsegpt(weight, hessian, 0.5, blocksize=16)
    # the adaptive mask is exact per block of columns (all rows together), so exact overall
    assert (pruned == 0).sum() == 32 * 64 // 2
    assert pruned.dtype == weight.dtype and pruned.shape == weight.shape


def test_sparsegpt_at_zero_sparsity_changes_nothing():
    weight, x = torch.randn(16, 32), correlated_inputs(features=32)
    hessian = 2 * x.T @ x / x.shape[0]
    assert torch.allclose(prune_sparsegpt(weight, hessian, 0.0), weight, atol=1e-5)


def test_sparsegpt_handles_dead_inputs_and_low_precision():
    x = correlated_inputs(features=32)
    x[:, 5] = 0  # a feature that is never active
    hessian = 2 * x.T @ x / x.shape[0]
    weight = torch.randn(16, 32, dtype=torch.bfloat16)
    pruned = prune_sparsegpt(weight, hessian, 0.5)
    assert pruned.dtype == torch.bfloat16 and torch.isfinite(pruned.float()).all()
    assert (pruned[:, 5] == 0).all()


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    x = correlated_inputs(features=48).double()
    hessian = 2 * x.T @ x / len(x)
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(48, dtype=torch.float64)
    textbook = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)  # inverse, then its factor
    factor = inverse_hessian_factor(hessian, 0.01)
    assert torch.equal(factor, factor.triu()) and (factor.diagonal() > 0).all()
    assert torch.allclose(factor, textbook, rtol=1e-9, atol=1e-12)


def test_sparsegpt_survives_a_singular_hessian():
    x = torch.randn(4, 32)  # 4 tokens: rank-4 Hessian, singular without dampening
    pruned = prune_sparsegpt(torch.randn(8, 32), 2 * x.T @ x / 4, 0.5)
    assert torch.isfinite(pruned).all() and (pruned == 0).sum() >= 8 * 16


def test_statistics_hessian_and_column_norms_agree():
    x = torch.randn(3, 10, 8)
    full, norms_only = InputStatistics(8, True, "cpu"), InputStatistics(8, False, "cpu")
    for chunk in x:
        full.add(chunk)
        norms_only.add(chunk)
    flat = x.reshape(-1, 8)
    assert torch.allclose(full.hessian(), 2 * flat.T @ flat / 30, atol=1e-5)
    assert torch.allclose(full.column_norms(), flat.norm(dim=0), atol=1e-5)
    assert torch.allclose(norms_only.column_norms(), flat.norm(dim=0), atol=1e-5)
    with pytest.raises(ValueError, match="column norms only"):
        norms_only.hessian()


@pytest.mark.parametrize("features", [1, 7, 130, 2050])  # fewer inputs than blocks, 4 blocks, 8 blocks
def test_hessian_from_the_upper_blocks_equals_the_full_product(features):
    """add_gram forms only the blocks on and above the diagonal; read, the Hessian is the whole 2XᵀX/n, exactly
    symmetric, and stays right when samples arrive after a read (the lower blocks are filled again)."""
    torch.manual_seed(0)
    x = torch.randn(12, 20, features)
    stats = InputStatistics(features, True, "cpu")
    for i, sample in enumerate(x):
        stats.add(sample[None])
        if i in (4, 9):  # reads midway: the lower blocks are filled, then more samples are added on top
            stats.hessian()
    flat = x.reshape(-1, features).double()
    H, reference = stats.hessian(), 2 * flat.T @ flat / flat.shape[0]
    assert torch.equal(H, H.T)
    assert torch.allclose(H.double(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("pattern", [0.5, (2, 4)])
def test_sparsegpt_on_stacked_weights_equals_one_by_one(pattern):
    """q/k/v share one Hessian: one factorization and one sweep over their stacked rows changes nothing,
    each weight still choosing its unstructured mask among its own rows."""
    torch.manual_seed(0)
    x = correlated_inputs()
    stats = InputStatistics(64, hessian=True, device="cpu")
    stats.add(x)
    weights = [torch.randn(48, 64), torch.randn(16, 64) * 5, torch.randn(16, 64) * 0.1]  # unequal scales
    together = prune_sparsegpt_together(weights, stats.hessian(), pattern, blocksize=32)
    for weight, pruned in zip(weights, together, strict=True):
        alone = prune_sparsegpt(weight, stats.hessian(), pattern, blocksize=32)
        assert torch.equal(pruned == 0, alone == 0)
        assert torch.allclose(pruned, alone, rtol=1e-5, atol=1e-6)
        assert (pruned == 0).float().mean() == 0.5  # each weight keeps its own share, whatever its scale


def sparsegpt_reference(weight, hessian, pattern, blocksize, dampening=0.01):
    """The OBS sweep as the paper states it: one column at a time, every later column updated at once."""
    from llm_sparsify.prune.masks import nm_mask, unstructured_mask
    from llm_sparsify.prune.sparsegpt import inverse_hessian_factor

    W = weight.clone().double()
    U = inverse_hessian_factor(hessian, dampening).double()
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i in range(W.shape[1]):
        if isinstance(pattern, tuple) and i % pattern[1] == 0:
            m = pattern[1]
            mask[:, i : i + m] = nm_mask(W[:, i : i + m] ** 2 / U.diagonal()[i : i + m] ** 2, *pattern)
        elif not isinstance(pattern, tuple) and i % blocksize == 0:
            block = slice(i, i + blocksize)
            mask[:, block] = unstructured_mask(W[:, block] ** 2 / U.diagonal()[block] ** 2, pattern, per_row=False)
        err = W[:, i] * mask[:, i] / U[i, i]
        W[:, i:] -= torch.outer(err, U[i, i:])
    return W.masked_fill(mask, 0).float()


@pytest.mark.parametrize("pattern", [0.5, (2, 4), (1, 8)])
def test_sparsegpt_blocked_sweep_equals_the_column_by_column_reference(pattern):
    torch.manual_seed(0)
    weight, x = torch.randn(40, 96), correlated_inputs(features=96)
    stats = InputStatistics(96, hessian=True, device="cpu")
    stats.add(x)
    ours = prune_sparsegpt(weight, stats.hessian(), pattern, blocksize=64)
    reference = sparsegpt_reference(weight, stats.hessian(), pattern, blocksize=64)
    assert torch.equal(ours == 0, reference == 0)
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4)
