import pytest
import torch

from llm_sparsify.prune.magnitude import global_magnitude_threshold, prune_below, prune_magnitude
from llm_sparsify.prune.masks import nm_mask, unstructured_mask
from llm_sparsify.prune.wanda import prune_wanda


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7, 0.95])
def test_unstructured_mask_exact_per_row(sparsity):
    scores = torch.randn(16, 40)
    mask = unstructured_mask(scores, sparsity)
    assert (mask.sum(1) == int(40 * sparsity)).all()
    # the removed entries are the lowest of their row
    assert (scores.masked_fill(~mask, -1e9).max(1).values <= scores.masked_fill(mask, 1e9).min(1).values).all()


def test_unstructured_mask_whole_matrix():
    scores = torch.randn(16, 40)
    mask = unstructured_mask(scores, 0.3, per_row=False)
    assert mask.sum() == int(640 * 0.3)
    assert scores[mask].max() <= scores[~mask].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_exact_groups(n, m):
    scores = torch.randn(8, 32)
    mask = nm_mask(scores, n, m)
    kept_per_group = (~mask).reshape(8, 32 // m, m).sum(2)
    assert (kept_per_group == n).all()
    groups = scores.reshape(8, -1, m)
    kept = (~mask).reshape(8, -1, m)
    assert (groups.masked_fill(kept, -1e9).max(2).values <= groups.masked_fill(~kept, 1e9).min(2).values).all()


def test_nm_mask_needs_divisible_columns():
    with pytest.raises(ValueError, match="multiple of M=4"):
        nm_mask(torch.randn(4, 10), 2, 4)


def brute_force_wanda(weight, x, sparsity):
    """The slow obvious reference: score every weight with Python loops, sort each row."""
    rows, cols = weight.shape
    norms = [sum(float(x[t, j]) ** 2 for t in range(x.shape[0])) ** 0.5 for j in range(cols)]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        scores = [(abs(float(weight[i, j])) * norms[j], j) for j in range(cols)]
        for _, j in sorted(scores)[: int(cols * sparsity)]:
            mask[i, j] = True
    return mask


def brute_force_wanda_nm(weight, x, n, m):
    rows, cols = weight.shape
    norms = x.norm(dim=0)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for g in range(0, cols, m):
            scores = sorted((abs(float(weight[i, j])) * float(norms[j]), j) for j in range(g, g + m))
            for _, j in scores[: m - n]:
                mask[i, j] = True
    return mask


def test_wanda_equals_brute_force_ranking():
    torch.manual_seed(0)
    weight, x = torch.randn(12, 24), torch.randn(50, 24) * torch.rand(24) * 3
    pruned = prune_wanda(weight, x.norm(dim=0), 0.5)
    assert torch.equal(pruned == 0, brute_force_wanda(weight, x, 0.5))
    assert torch.equal(pruned[pruned != 0], weight[pruned != 0])  # no weight update
    pruned = prune_wanda(weight, x.norm(dim=0), (2, 4))
    assert torch.equal(pruned == 0, brute_force_wanda_nm(weight, x, 2, 4))


def test_wanda_differs_from_magnitude_when_inputs_are_uneven():
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    norms = torch.ones(16)
    norms[:4] = 1e4  # inputs 0-3 carry large activations: Wanda keeps their weights
    pruned = prune_wanda(weight, norms, 0.5)
    assert (pruned[:, :4] != 0).all()
    assert not torch.equal(pruned == 0, prune_magnitude(weight, 0.5) == 0)


def test_magnitude_local_and_global():
    torch.manual_seed(0)
    small, large = torch.randn(32, 32) * 0.1, torch.randn(32, 32)
    assert (prune_magnitude(large, 0.5) == 0).sum() == 512
    threshold = global_magnitude_threshold(lambda: [small, large], 0.5)
    zeros_small = (prune_below(small, threshold) == 0).sum().item()
    zeros_large = (prune_below(large, threshold) == 0).sum().item()
    assert zeros_small + zeros_large == 1024  # exactly half of all weights (no ties in random floats)
    assert zeros_small > 3 * zeros_large  # global ranking takes more from the small-weight layer


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.99])
def test_global_threshold_is_the_kth_smallest_magnitude(sparsity):
    """Against the obvious reference: sort every |W| together and take the k-th."""
    torch.manual_seed(1)
    weights = [torch.randn(40, 24) * scale for scale in (0.01, 1.0, 30.0)] + [torch.zeros(8, 8)]
    weights.append(torch.randn(16, 16).to(torch.bfloat16))
    everything = torch.cat([w.abs().float().flatten() for w in weights]).sort().values
    k = int(everything.numel() * sparsity)
    expected = everything[k - 1].item() if k else 0.0
    assert global_magnitude_threshold(lambda: iter(weights), sparsity) == expected


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_unstructured_mask_equals_a_stable_sort_with_ties(per_row, sparsity):
    """Many equal scores: the lowest k go, equal ones in order of position, exactly as a stable sort."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (12, 40), generator=g).float()  # heavy ties
    flat = scores if per_row else scores.reshape(1, -1)
    k = int(flat.shape[1] * sparsity)
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected.scatter_(1, torch.sort(flat, dim=1, stable=True).indices[:, :k], True)
    assert torch.equal(unstructured_mask(scores, sparsity, per_row), expected.reshape(scores.shape))
