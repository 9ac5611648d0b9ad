"""Pruning interleaved with a decoder layer's one forward (recipe `inputs: pruned`, the default).

Modules are pruned in the order the layer calls them, in groups that read the same input (q/k/v,
o, gate/up, down). A group is pruned as soon as every calibration batch has reached its input, so
later groups are calibrated on what the already pruned ones produce (GPTQ's "true sequential"
order), and the forward that gathers the statistics also yields the layer's pruned outputs, the
next layer's inputs. One forward per layer instead of two (statistics, then propagation).

Each batch's forward runs in a greenlet of its own (a coroutine with its own stack, in the same OS
thread) that pauses in a pre-hook at the first module of a group not yet pruned; the batches take
turns, so the arithmetic is that of running them one after another. What a paused forward holds (the
residual stream, the group's input) stays alive until its group is pruned. Greenlets, not threads:
torch's grad mode, OpenMP team and allocator caches are per OS thread, and thread switches made the
same forwards some 30% slower on CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from greenlet import greenlet
from torch import Tensor, nn

from llm_sparsify import distributed
from llm_sparsify.stats import InputStatistics


class _Stop(Exception):
    """Raised by the probe's hook once every module has been reached."""


class _PausableForward:
    """One batch's forward through the layer, run in steps: `resume()` runs it to its next pause or end."""

    def __init__(self, forward: Callable[[], Tensor]) -> None:
        self.coroutine = greenlet(forward)
        self.group: int | None = None  # the group whose input it is paused at
        self.input: Tensor | None = None
        self.output: Tensor | None = None

    @property
    def done(self) -> bool:
        return self.coroutine.dead

    def resume(self) -> None:
        paused = self.coroutine.switch()
        if self.coroutine.dead:
            self.output, self.group, self.input = paused, None, None
        else:
            self.group, self.input = paused


def _pause(group: int, x: Tensor) -> None:
    """Called inside a forward's greenlet by a pre-hook: hand (group, x) to the transform pass and wait for a turn."""
    greenlet.getcurrent().parent.switch((group, x))


@torch.no_grad()
def module_groups(layer: nn.Module, modules: dict[str, nn.Linear], hidden: Tensor, kwargs: dict[str, Any],
                  device: torch.device) -> list[list[str]]:
    """The modules grouped by the input tensor they read, in the order the layer calls them (one batch's
    forward, stopped once every module has been reached)."""
    inputs: list[tuple[Tensor, str]] = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if name not in (n for _, n in inputs):
                inputs.append((args[0], name))
            if len(inputs) == len(modules):
                raise _Stop

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        with contextlib.suppress(_Stop):
            layer(hidden.to(device), **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if len(inputs) != len(modules):
        missing = sorted(set(modules) - {n for _, n in inputs})
        raise RuntimeError(f"the layer's forward never calls {', '.join(missing)}; prune it with `inputs: dense`")
    groups: list[tuple[Tensor, list[str]]] = []
    for x, name in inputs:
        same = next((names for y, names in groups if y is x), None)
        if same is None:
            groups.append((x, [name]))
        else:
            same.append(name)
    return [names for _, names in groups]


@torch.no_grad()
def prune_during_forward(
    layer: nn.Module,
    modules: dict[str, nn.Linear],
    groups: list[list[str]],
    hidden: list[Tensor],
    kwargs: list[dict[str, Any]],
    device: torch.device,
    hessian: bool,
    prune_group: Callable[[int, list[str], InputStatistics], None],
    outputs: bool = True,
) -> list[Tensor] | None:
    """Run every batch through `layer` once, calling `prune_group(g, names, statistics)` for each group
    as soon as all batches have reached its input; return the pruned layer's outputs (None if not
    `outputs`: the last layer's are never used, so its forwards stop at the last group)."""
    group_of = {modules[name]: g for g, names in enumerate(groups) for name in names}
    pruned: set[int] = set()
    forwards: dict[greenlet, _PausableForward] = {}

    def pause(module: nn.Module, args: tuple) -> None:
        group = group_of[module]
        if greenlet.getcurrent() in forwards and group not in pruned:
            _pause(group, args[0])

    def run(h: Tensor, kw: dict[str, Any]) -> Callable[[], Tensor]:
        def forward() -> Tensor:
            out = layer(h.to(device), **kw)
            return (out[0] if isinstance(out, tuple) else out).to(h.device)

        return forward

    for h, kw in zip(hidden, kwargs, strict=True):
        forward = _PausableForward(run(h, kw))
        forwards[forward.coroutine] = forward
    handles = [module.register_forward_pre_hook(pause) for module in group_of]
    try:
        for g, names in enumerate(groups):
            stats = None
            for forward in forwards.values():
                while not forward.done and (forward.group is None or forward.group < g):
                    forward.resume()
                if forward.group == g:
                    x = forward.input
                    stats = stats or InputStatistics(x.shape[-1], hessian, x.device)
                    stats.add(x)
            if stats is None:
                raise RuntimeError(f"no calibration batch reached {names[0]}")
            distributed.sum_statistics([stats])
            prune_group(g, names, stats)
            pruned.add(g)
        if not outputs:
            return None
        for forward in forwards.values():
            while not forward.done:
                forward.resume()
        return [forward.output for forward in forwards.values()]
    finally:
        for handle in handles:
            handle.remove()
        forwards.clear()  # unfinished greenlets are unwound (GreenletExit) when collected
