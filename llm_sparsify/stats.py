"""Statistics of a Linear layer's inputs, accumulated over calibration tokens."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

# Calibration samples whose float32 sum is formed before it is added to the float64 total. Bigger
# products run faster (x xᵀ over 8 samples, not 1); distributed ranks take whole runs of these samples.
SAMPLES_PER_SUM = 8
BLOCKSIZE = 128  # columns per lazy batch of an OBS sweep over H (SparseGPT, GPTQ)
DAMPENING = 0.01  # λ of H + λI, as a share of mean diag(H) (SparseGPT, GPTQ, the OBS refits)
ELEMENTS_AT_ONCE = 1 << 24  # elements of a weight taken at once by relative_errors (64 MiB in float32)


class InputStatistics:
    """Running sum of x xᵀ (SparseGPT) or of x² only (Wanda) over every token x seen by one input.

    The batches of each run of SAMPLES_PER_SUM samples are summed in float32, and those sums are added
    to a float64 total. Float32 values are exact in float64, so the total hardly depends on the order
    the runs arrive in: processes that each sum a share of them (torch.distributed) agree with one
    process that sums them all. Modules that read the same input share one accumulator.
    """

    def __init__(self, features: int, hessian: bool, device: torch.device | str) -> None:
        shape = (features, features) if hessian else (features,)
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.partial: Tensor | None = None  # the current run's float32 sum, while samples arrive
        self.pending = 0  # samples in `partial`
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        """Add one batch of inputs [batch, seq, features] (any other shape counts as a whole run)."""
        samples = x.shape[0] if x.dim() == 3 else SAMPLES_PER_SUM
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        if self.sum.dim() == 2:
            if self.partial is None:  # zeros: the blocks below the diagonal are never written
                self.partial = torch.zeros_like(self.sum, dtype=torch.float32)
            add_gram(self.partial, x, beta=1 if self.pending else 0)
        else:
            if self.partial is None:
                self.partial = torch.empty_like(self.sum, dtype=torch.float32)
            self.partial.add_(x.square().sum(0)) if self.pending else torch.sum(x.square(), 0, out=self.partial)
        self.pending += samples
        if self.pending >= SAMPLES_PER_SUM:
            self.flush()

    def flush(self) -> None:
        """Add the float32 sum of the current run to the float64 total."""
        if self.pending and self.sum.dim() == 2:  # the blocks add_gram wrote; mirror_upper fills the rest
            for start, end in itertools.pairwise(gram_edges(self.sum.shape[0])):
                self.sum[start:end, start:] += self.partial[start:end, start:]
        elif self.pending:
            self.sum += self.partial
        self.pending = 0

    def _total(self) -> Tensor:
        """The float64 total, for reading: flushed, and the run's buffer freed until more samples arrive (a
        14336-wide input's is 0.8 GiB)."""
        self.flush()
        self.partial = None
        if self.sum.dim() == 2:
            mirror_upper(self.sum)
        return self.sum

    def hessian(self) -> Tensor:
        """H = 2XXᵀ/n, the Hessian of the layer-wise reconstruction error ‖WX − ŴX‖² (float32)."""
        if self.sum.dim() != 2:
            raise ValueError("these statistics hold column norms only, not the Hessian")
        total = self._total()  # scaled in float64, rounded once, with no float64 copy
        return torch.mul(total, 2 / max(self.tokens, 1), out=torch.empty_like(total, dtype=torch.float32))

    def column_norms(self) -> Tensor:
        """‖X_j‖₂ of every input feature j over all tokens."""
        total = self._total()
        squares = total.diagonal() if total.dim() == 2 else total
        return squares.sqrt().float()

    def relative_errors(self, before: list[Tensor], after: list[Tensor]) -> list[float]:
        """‖(W−Ŵ)X‖²/‖WX‖² over the tokens seen, for each weight read on this input (W before, Ŵ after).

        Exact, tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), where the Hessian was summed; from column norms only (Wanda), the diagonal
        approximation Σ ΔW²_ij‖X_j‖² / Σ W²_ij‖X_j‖², which leaves out the correlation between inputs. Computed in
        float32 a few thousand rows at a time (MoE layers share one input among dozens of expert matrices).
        """
        sums = self._total().float()
        errors = []
        for w, w_hat in zip(before, after, strict=True):
            error = total = 0.0
            rows = max(1, ELEMENTS_AT_ONCE // w.shape[1])
            for part, part_hat in zip(w.detach().split(rows), w_hat.detach().split(rows), strict=True):
                W = part.float().to(sums.device)
                error += _energy(W - part_hat.float().to(sums.device), sums)
                total += _energy(W, sums)
            errors.append(error / total if total > 0 else 0.0)
        return errors


def gram_edges(features: int) -> list[int]:
    """Where the column blocks of add_gram start (and the last ends): 4 blocks, 8 from 2048 inputs on, where
    the products stay large enough to run at full speed (measured on this project's 2-core CPU)."""
    blocks = max(1, min(features, 4 if features < 2048 else 8))
    return [features * i // blocks for i in range(blocks + 1)]


def add_gram(total: Tensor, x: Tensor, beta: float = 1) -> None:
    """total ← β·total + xᵀx on the blocks on and above the diagonal only: the Gram matrix is symmetric, so this
    does about 60% of the products' work. The blocks below stay as they were; mirror_upper fills them."""
    edges = gram_edges(x.shape[1])
    for start, end in itertools.pairwise(edges):
        total[start:end, start:].addmm_(x[:, start:end].T, x[:, start:], beta=beta)


def mirror_upper(total: Tensor) -> None:
    """Copy the upper triangle onto the lower one, in place, a block of add_gram's at a time, so that the result
    is exactly symmetric."""
    edges = gram_edges(total.shape[0])
    for start, end in itertools.pairwise(edges):
        total[end:, start:end] = total[start:end, end:].T
        block = total[start:end, start:end]
        block.copy_(block.triu() + block.triu(1).T)


def _energy(A: Tensor, sums: Tensor) -> float:
    """Σ over rows a of a S aᵀ (S = Σ x xᵀ), or of Σ_j a_j² S_j (S = Σ x², the diagonal)."""
    return float(((A @ sums) * A).sum() if sums.dim() == 2 else (A.square() @ sums).sum())
