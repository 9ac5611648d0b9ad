"""Integer grids for weights: per output channel or per group of `group_size` inputs, symmetric or not.

One convention throughout (the one compressed-tensors stores), with signed integers q ∈ [−2^(b−1), 2^(b−1)−1]:

    q = clamp(round(w / scale) + zero_point, qmin, qmax)        ŵ = (q − zero_point) · scale

Symmetric grids have zero_point = 0 and scale = max|w| / ((2^b − 1) / 2). Asymmetric grids span
[min(w, 0), max(w, 0)], so 0 always lies on the grid: a pruned weight (w = 0) quantizes to exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from llm_sparsify.stats import BLOCKSIZE, DAMPENING

GRIDS_FILE = "quantization.safetensors"  # beside the dense weights of a quantized checkpoint


@dataclass(frozen=True)
class QuantScheme:
    """How weights are quantized: `bits` (4 or 8), `group_size` inputs per scale (None: per channel)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def group_width(self, columns: int) -> int:
        return self.group_size or columns


@dataclass(frozen=True)
class Quantization:
    """How the pruned weights are quantized: `gptq` (with error feedback; needs the Hessian) or `rtn`."""

    method: str
    scheme: QuantScheme
    blocksize: int = BLOCKSIZE  # gptq
    dampening: float = DAMPENING  # gptq
    actorder: bool = True  # gptq: columns by decreasing H_qq, static groups (off for N:M in the same sweep)

    def to_dict(self) -> dict[str, Any]:
        section = {"method": self.method, "bits": self.scheme.bits, "group_size": self.scheme.group_size,
                   "symmetric": self.scheme.symmetric}
        gptq = {"dampening": self.dampening, "blocksize": self.blocksize, "actorder": self.actorder}
        return section | (gptq if self.method == "gptq" else {})

    def record(self) -> dict[str, Any]:
        """What a checkpoint's llm_sparsify.json says about its grids."""
        return {key: value for key, value in self.to_dict().items() if key not in ("dampening", "blocksize",
                                                                                  "actorder")}


@dataclass
class Grid:
    """The scales and zero points of one weight [out, in]: each [out, in / group_width] (float32, int32)."""

    scheme: QuantScheme
    scale: Tensor
    zero_point: Tensor

    def expand(self, columns: int) -> tuple[Tensor, Tensor]:
        """scale and zero_point repeated to [out, columns], one value per weight."""
        width = self.scheme.group_width(columns)
        return (self.scale.repeat_interleave(width, dim=1)[:, :columns],
                self.zero_point.repeat_interleave(width, dim=1)[:, :columns])


def fit_scale(weight: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    """Scale and zero point [rows] that cover each row of `weight` [rows, cols] (float32)."""
    w = weight.float()
    if scheme.symmetric:
        scale = w.abs().amax(dim=1) / ((2**scheme.bits - 1) / 2)
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        low, high = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        scale = (high - low) / (2**scheme.bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale gives q = 0
    if not scheme.symmetric:
        zero = (scheme.qmin - torch.round(low / scale)).to(torch.int32)
    return scale, zero


def quantize(weight: Tensor, scale: Tensor, zero_point: Tensor, scheme: QuantScheme) -> Tensor:
    """Integers q (int32) for `weight`, with scale and zero_point broadcastable to it."""
    q = torch.round(weight.float() / scale) + zero_point
    return q.clamp_(scheme.qmin, scheme.qmax).to(torch.int32)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """ŵ = (q − zero_point) · scale, in float32."""
    return (q - zero_point).float() * scale


def fit_grid(weight: Tensor, scheme: QuantScheme) -> Grid:
    """The grid of `weight` [out, in] from each group's own range (what round-to-nearest uses)."""
    columns = weight.shape[1]
    width = scheme.group_width(columns)
    scales, zeros = zip(*(fit_scale(part, scheme) for part in weight.split(width, dim=1)), strict=True)
    return Grid(scheme, torch.stack(scales, dim=1), torch.stack(zeros, dim=1))


def round_to_grid(weight: Tensor, grid: Grid) -> Tensor:
    """ŵ: `weight` rounded to the nearest point of `grid`, in weight's dtype."""
    scale, zero = grid.expand(weight.shape[1])
    return dequantize(quantize(weight, scale, zero, grid.scheme), scale, zero).to(weight.dtype)


def rtn(weight: Tensor, scheme: QuantScheme) -> tuple[Tensor, Grid]:
    """Round-to-nearest: ŵ and its grid. Zeros stay exactly zero."""
    grid = fit_grid(weight, scheme)
    return round_to_grid(weight, grid), grid


def save_grids(grids: dict[str, Grid], path: str | Path) -> None:
    """Write `{module}.weight_scale` / `{module}.weight_zero_point` tensors and the scheme as metadata."""
    schemes = {g.scheme for g in grids.values()}
    if len(schemes) > 1:
        raise ValueError(f"one quantization scheme per checkpoint, got {schemes}")
    scheme = next(iter(schemes), QuantScheme())
    tensors = {}
    for name, grid in grids.items():
        tensors[f"{name}.weight_scale"] = grid.scale.float().contiguous()
        tensors[f"{name}.weight_zero_point"] = grid.zero_point.to(torch.int32).contiguous()
    metadata = {"bits": str(scheme.bits), "group_size": str(scheme.group_size or 0),
                "symmetric": str(scheme.symmetric).lower()}
    save_file(tensors, str(path), metadata=metadata)


def load_grids(path: str | Path) -> dict[str, Grid]:
    """The grids written by save_grids, by module name."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    scheme = QuantScheme(int(meta["bits"]), int(meta["group_size"]) or None, meta["symmetric"] == "true")
    tensors = load_file(str(path))
    names = [key.removesuffix(".weight_scale") for key in tensors if key.endswith(".weight_scale")]
    return {n: Grid(scheme, tensors[f"{n}.weight_scale"], tensors[f"{n}.weight_zero_point"]) for n in names}
