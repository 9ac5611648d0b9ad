"""Mixture-of-experts layers: each expert's projections as Linear targets, and whole experts removed.

transformers 5 keeps a MoE layer's experts fused in two 3-D parameters (Mixtral, Qwen2/3-MoE, OLMoE, ...):

    experts.gate_up_proj [E, 2·I, H]   rows [:I] are expert e's gate_proj, rows [I:] its up_proj
    experts.down_proj    [E, H, I]

`unfuse_experts` swaps such a module for `Experts`, a ModuleList of per-expert MLPs whose gate_proj, up_proj and
down_proj are plain nn.Linear (named model.layers.3.mlp.experts.5.up_proj), so every pruning method, statistic,
glob and report works on an expert as on any Linear; its forward equals the fused one. `fuse_experts` puts the
weights back. Each expert's Linears see exactly the tokens the router sends to it (their statistics come from
those tokens), unless it is told to calibrate on all tokens: then it runs on every token while the layer's output
still takes only the router's top-k.

Expert removal (REAP, Lasby et al. 2025): an expert's saliency is the mean over the tokens routed to it of its
router weight times the norm of its output, S_j = mean_{x routed to j} g_j(x)·‖f_j(x)‖₂; the least salient go, the
router loses their rows, and the config its count.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import Tensor, nn

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # the config's expert count, by family


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 fused-experts module of the layout above (no biases, not transposed, gate before up)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and hasattr(module, "act_fn")):
        return False
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) or gate_up.dim() != 3:
        return False
    if _required_inputs(module.act_fn) != 1:  # e.g. an act(gate, up) of its own: another computation
        return False
    experts, rows, hidden = gate_up.shape
    return down.shape == (experts, hidden, rows // 2) and rows % 2 == 0


def _required_inputs(function) -> int | None:
    """How many positional arguments without defaults `function` (a module: its forward) takes; None if unknown."""
    try:
        parameters = inspect.signature(function.forward if isinstance(function, nn.Module) else function).parameters
    except (TypeError, ValueError):
        return None
    return sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in parameters.values())


class ExpertMLP(nn.Module):
    """One expert: down_proj(act(gate_proj(x)) · up_proj(x)); gate and up read the same x (one statistic)."""

    def __init__(self, gate: Tensor, up: Tensor, down: Tensor, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (_linear(w) for w in (gate, up, down))
        self.act_fn = act_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear(weight: Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
    return linear


class Experts(nn.ModuleList):
    """The unfused experts of one MoE layer, called like the fused module: (hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]. Every expert is called on every forward (with no rows if no token chose it),
    so the order of calls is the same for every batch. Experts in `all_tokens` run on every token (the statistics
    their Linears gather come from all tokens); their output still counts only where the router chose them."""

    def __init__(self, fused: nn.Module) -> None:
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        rows = gate_up.shape[1] // 2
        super().__init__(ExpertMLP(gate_up[e, :rows].clone(), gate_up[e, rows:].clone(), down[e].clone(),
                                   fused.act_fn) for e in range(gate_up.shape[0]))
        self.all_tokens: set[int] = set()
        vars(self)["fused"] = fused  # the module it replaces (not a child): fuse_experts puts it back
        for name in ("gate_up_proj", "down_proj"):  # its own copies are no longer needed
            setattr(fused, name, nn.Parameter(getattr(fused, name).detach().to("meta"), requires_grad=False))

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            y = expert(hidden_states)[token] if e in self.all_tokens else expert(hidden_states[token])
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def moe_modules(root: nn.Module, unfused: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every fused-experts module under `root` (or, with `unfused`, every Experts module)."""
    for name, module in root.named_modules():
        if (isinstance(module, Experts) if unfused else is_fused_experts(module)):
            yield name, module


def unfuse_experts(root: nn.Module) -> int:
    """Replace every fused-experts module under `root` (a model or one layer) by Experts; return how many."""
    found = list(moe_modules(root))
    for name, module in found:
        root.set_submodule(name, Experts(module))
    return len(found)


@contextlib.contextmanager
def experts_unfused(model: nn.Module) -> Iterator[None]:
    """The model's fused experts as Linears inside the block, fused back after it (even on an error)."""
    unfuse_experts(model)
    try:
        yield
    finally:
        fuse_experts(model)


def fuse_experts(root: nn.Module) -> int:
    """Put every Experts module under `root` back into its fused module, with the experts' current weights; their
    quantization grids, if any, go to the fused module's `expert_grids` (by "<e>.<projection>")."""
    found = list(moe_modules(root, unfused=True))
    for name, experts in found:
        fused = vars(experts)["fused"]
        grids = {f"{e}.{projection}": vars(getattr(expert, projection))["quantization_grid"]
                 for e, expert in enumerate(experts) for projection in EXPERT_PROJECTIONS
                 if "quantization_grid" in vars(getattr(expert, projection))}
        if grids:
            vars(fused)["expert_grids"] = grids
        gate_up = torch.stack([torch.cat([e.gate_proj.weight.detach(), e.up_proj.weight.detach()]) for e in experts])
        fused.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        fused.down_proj = nn.Parameter(torch.stack([e.down_proj.weight.detach() for e in experts]),
                                       requires_grad=False)
        if hasattr(fused, "num_experts"):
            fused.num_experts = len(experts)
        root.set_submodule(name, fused)
    return len(found)


def unfused_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict in the fused layout (….experts.gate_up_proj / .down_proj) in the unfused one
    (….experts.<e>.gate_proj.weight, ...); other tensors unchanged."""
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith("experts") and leaf == "gate_up_proj" and tensor.dim() == 3:
            gate, up = tensor.chunk(2, dim=1)
            for e in range(len(tensor)):
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate[e], up[e]
        elif prefix.endswith("experts") and leaf == "down_proj" and tensor.dim() == 3:
            out |= {f"{prefix}.{e}.down_proj.weight": tensor[e] for e in range(len(tensor))}
        else:
            out[name] = tensor
    return out


def fused_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of unfused_tensors: every ….experts.<e>.<projection>.weight stacked back into the fused pair."""
    out: dict[str, Tensor] = {}
    experts: dict[str, dict[int, dict[str, Tensor]]] = {}  # "….experts" -> e -> projection -> weight
    for name, tensor in tensors.items():
        parts = name.split(".")
        if len(parts) >= 4 and parts[-1] == "weight" and parts[-2] in EXPERT_PROJECTIONS and parts[-3].isdigit() \
                and parts[-4] == "experts":
            experts.setdefault(".".join(parts[:-3]), {}).setdefault(int(parts[-3]), {})[parts[-2]] = tensor
        else:
            out[name] = tensor
    for prefix, by_expert in experts.items():
        order = [by_expert[e] for e in sorted(by_expert)]
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([p["gate_proj"], p["up_proj"]]) for p in order])
        out[f"{prefix}.down_proj"] = torch.stack([p["down_proj"] for p in order])
    return out


def expert_saliency(experts: Experts, hidden: Tensor, top_k_index: Tensor,
                    top_k_weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per expert, the sum over the tokens routed to it of g_j(x)·‖f_j(x)‖₂ (REAP), and how many tokens that was."""
    sums, counts = torch.zeros(len(experts), dtype=torch.float64), torch.zeros(len(experts), dtype=torch.long)
    for e, expert in enumerate(experts):
        token, slot = torch.where(top_k_index == e)
        if len(token):
            norms = expert(hidden[token]).float().norm(dim=-1)
            sums[e] = (top_k_weights[token, slot].float() * norms).sum().item()
            counts[e] = len(token)
    return sums, counts


def experts_to_keep(saliency: Tensor, keep: int) -> list[int]:
    """The `keep` most salient experts of one layer, in their original order (ties: the lower index stays)."""
    order = sorted(range(len(saliency)), key=lambda e: (-float(saliency[e]), e))
    return sorted(order[:keep])


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE blocks (a module whose `experts` child is unfused, beside a `gate` router), in order."""
    return [m for m in model.modules() if isinstance(getattr(m, "experts", None), Experts) and hasattr(m, "gate")]


def remove_experts(model: nn.Module, keep: list[list[int]]) -> None:
    """Keep only experts `keep[b]` in MoE block b (the same count in every block, so plain transformers loads the
    result; experts unfused): the experts' modules and the router's rows go, the modules' and the config's expert
    counts follow. The router still ranks the kept experts by the same logits, so top-k stays valid."""
    counts = {len(k) for k in keep}
    if len(counts) != 1:
        raise ValueError(f"every MoE layer must keep the same number of experts, got {sorted(counts)}")
    blocks = moe_blocks(model)
    if len(blocks) != len(keep):
        raise ValueError(f"{len(keep)} lists of experts to keep for {len(blocks)} MoE layers")
    count = counts.pop()
    for block, kept in zip(blocks, keep, strict=True):
        experts, router = block.experts, block.gate
        modules = [experts[e] for e in kept]
        while len(experts):
            del experts[len(experts) - 1]
        experts.extend(modules)
        experts.all_tokens = set()
        for name in ("weight", "bias"):
            if isinstance(weight := getattr(router, name, None), nn.Parameter):
                setattr(router, name, nn.Parameter(weight.detach()[torch.tensor(kept, device=weight.device)].clone(),
                                                   requires_grad=weight.requires_grad))
        for module in (block, router):
            if hasattr(module, "num_experts"):
                module.num_experts = count
    for key in _COUNT_KEYS:
        if getattr(model.config, key, None) is not None:
            setattr(model.config, key, count)


def keep_expert_tensors(tensors: dict[str, Tensor], block: str, kept: list[int]) -> dict[str, Tensor]:
    """The same cut as remove_experts, on one layer's tensors read from a checkpoint (names within the layer, experts
    unfused): of MoE block `block` (e.g. "mlp"), only experts `kept`, renumbered in order, and their router rows."""
    experts, router = f"{block}.experts.", (f"{block}.gate.weight", f"{block}.gate.bias")
    number = {e: k for k, e in enumerate(kept)}
    cut = {}
    for name, tensor in tensors.items():
        if name.startswith(experts):
            e, rest = name.removeprefix(experts).split(".", 1)
            if int(e) in number:
                cut[f"{experts}{number[int(e)]}.{rest}"] = tensor
        elif name in router:
            cut[name] = tensor[torch.tensor(kept)]
        else:
            cut[name] = tensor
    return cut


def expert_count(model: nn.Module) -> int | None:
    """The experts per MoE layer, from the config (None: not a MoE model)."""
    return next((getattr(model.config, k) for k in _COUNT_KEYS if getattr(model.config, k, None)), None)
