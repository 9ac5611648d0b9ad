"""Plan which decoder blocks, MLP channels and KV groups go to meet a size or decode-speed budget at the edge
(issue 18).

Each unit's cost is measured once on calibration data, alone on the dense model: the loss with block i bypassed,
with layer i's MLP narrowed to each width level (its lowest-scoring channels first), with its attention cut to each
count of KV groups (where planned), with its attention or its MLP rounded to the file's type (where an upgrade type
is planned: the part may be written at it instead, its rounding counted as lossless), and with the output layer
rounded to the file's type. The planner treats those increases as additive and picks, for every layer, one MLP width,
KV group count and type per part, or its removal (and the output layer's type), so that the total is least within
the budget: a multiple-choice knapsack, solved exactly over a fine grid of the budget.

Size and time come from a linear model of the GGUF file (FileCost): tensor bytes at the file's types, and decode
time as the weight bytes read per token plus a cost per layer and per token (llama.cpp on a CPU is bound by both:
eval/decode_cost.py fits them).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from llm_sparsify.errors import UserError

BLOCK = 32  # values per Q8_0 / Q4_0 block: planned MLP widths stay multiples of it, so every row quantizes
RESOLUTION = 8192  # steps the budget is cut into by plan_budget's dynamic programme


class BudgetError(UserError, ValueError):
    """A budget that no plan of blocks and MLP widths meets."""


@dataclass(frozen=True)
class LayerCost:
    """One decoder layer's share of the file: bytes outside its MLP (attention with all its KV groups, norms), bytes
    per MLP channel, and bytes per KV group (its q/k/v rows and o_proj columns); what a channel and a group cost with
    their part (MLP, attention) written at the upgrade type instead (None: no upgrade planned)."""

    fixed: float
    per_channel: float
    channels: int
    per_group: float = 0.0
    groups: int = 0
    per_channel_up: float | None = None
    per_group_up: float | None = None

    def upgraded(self, kept: int, groups: int, up: tuple[bool, bool]) -> tuple[float, float]:
        """Bytes of the parts written at the upgrade type, its attention (up[0]) and MLP (up[1]) at `kept` channels
        and `groups` KV groups: (at the file's type, at the upgrade type)."""
        attention, mlp = up
        low = (self.per_group * groups if attention else 0.0) + (self.per_channel * kept if mlp else 0.0)
        high = (self.per_group_up * groups if attention else 0.0) + (self.per_channel_up * kept if mlp else 0.0)
        return low, high


@dataclass(frozen=True)
class FileCost:
    """The GGUF file's bytes and its decode time per token, as a linear model of what a plan keeps.

    time = decoder bytes read per token + output_weight × the output layer's bytes + layer_time × layers kept
           + token_time, all in decoder bytes' worth of time (an untied token embedding is only looked up, not read);
    a byte of a part at the upgrade type (a plan's choice) counts up_weight times.
    """

    layers: list[LayerCost]
    other_bytes: float  # embeddings, output layer, final norm: never planned
    other_read: float  # the part of other_bytes read for every token (the output layer)
    layer_time: float = 0
    token_time: float = 0
    output_weight: float = 1
    output_saving: float = 0  # bytes saved by writing the output layer at the file's type rather than its own
    up_weight: float = 1

    def size(self, kept: list[int | None], small_output: bool = False, groups: list[int | None] | None = None,
             up: list[tuple[bool, bool] | None] | None = None) -> float:
        """Tensor bytes when layer i keeps kept[i] MLP channels (None: the block is removed) and groups[i] KV groups
        (default: all), its attention and MLP at the upgrade type where up[i] says so (default: neither), with the
        output layer at the file's type (small_output) or at its own."""
        low, high = self.upgraded(kept, groups, up)
        return self.other_bytes + self.decoder(kept, groups) - low + high - self.output_saving * small_output

    def decoder(self, kept: list[int | None], groups: list[int | None] | None = None) -> float:
        """Bytes of the decoder layers kept, all at the file's type."""
        groups = groups or [c.groups for c in self.layers]
        return sum(c.fixed + c.per_channel * k + c.per_group * (g - c.groups)
                   for c, k, g in zip(self.layers, kept, groups, strict=True) if k is not None)

    def upgraded(self, kept: list[int | None], groups: list[int | None] | None = None,
                 up: list[tuple[bool, bool] | None] | None = None) -> tuple[float, float]:
        """Bytes of the parts planned at the upgrade type: (at the file's type, at the upgrade type)."""
        groups = groups or [c.groups for c in self.layers]
        parts = [c.upgraded(k, g, u) for c, k, g, u in zip(self.layers, kept, groups, up or [None] * len(kept),
                                                              strict=True) if k is not None and u]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def time(self, kept: list[int | None], small_output: bool = False, groups: list[int | None] | None = None,
             up: list[tuple[bool, bool] | None] | None = None) -> float:
        """Decode time per token, in decoder bytes' worth."""
        layers = sum(k is not None for k in kept)
        output = self.other_read - self.output_saving * small_output
        low, high = self.upgraded(kept, groups, up)
        return (self.decoder(kept, groups) - low + self.up_weight * high + self.output_weight * output
                + self.layer_time * layers + self.token_time)


def width_levels(channels: int, levels: int, most: float) -> list[int]:
    """MLP widths a layer may keep: `channels`, then `levels` steps down to at most `most` of them removed, each a
    multiple of BLOCK when `channels` is (distinct, decreasing, at least one BLOCK)."""
    step = BLOCK if channels % BLOCK == 0 and channels > BLOCK else 1
    widths = [channels]
    for k in range(1, levels + 1):
        kept = max(step, round(channels * (1 - most * k / levels) / step) * step)
        if kept < widths[-1]:
            widths.append(kept)
    return widths


@dataclass
class Plan:
    """kept[i]: MLP channels layer i keeps (None: the block goes); whether the output layer takes the file's type;
    the loss increase predicted for it all; groups[i]: KV groups layer i keeps (None: the block goes); up[i]: whether
    its attention and MLP are written at the upgrade type (None: the block goes)."""

    kept: list[int | None]
    small_output: bool
    predicted_loss: float
    groups: list[int | None]
    up: list[tuple[bool, bool] | None]

    @property
    def removed_blocks(self) -> list[int]:
        return [i for i, k in enumerate(self.kept) if k is None]


def smallest(widths: list[list[int]]) -> list[int | None]:
    """The least a plan can keep: the first block at its narrowest width, every other block removed."""
    return [w[-1] if i == 0 else None for i, w in enumerate(widths)]


def plan_budget(block_losses: list[float], width_losses: list[list[float]], widths: list[list[int]],
                cost: FileCost, measure: str, limit: float, output_loss: float | None = None,
                resolution: int = RESOLUTION, *, group_losses: list[list[float]] | None = None,
                group_counts: list[list[int]] | None = None,
                part_losses: list[tuple[float, float]] | None = None) -> Plan:
    """The plan of least predicted loss whose `measure` ("size" or "time", FileCost's) is at most `limit`.

    block_losses[i]: loss increase with block i bypassed; width_losses[i][k]: with layer i at widths[i][k]
    (width_losses[i][0] = 0, the dense width); group_losses[i][k]: with layer i's attention cut to group_counts[i][k]
    KV groups (default: all kept, no loss); part_losses[i]: with layer i's attention, MLP at the file's type rather
    than the upgrade type (default: no upgrade); output_loss: with the output layer at the file's type (None: not an
    option). Each layer takes one of its widths, group counts and types per part (losses added) or goes, the output
    layer one of its types: a multiple-choice knapsack, solved exactly by dynamic programming over the budget cut into
    `resolution` steps, each option's cost rounded up to a whole step (so the plan meets the budget; it may leave up
    to one step per layer unused); at least one block stays. Raises BudgetError if no such plan meets the budget.
    """
    group_counts = group_counts or [[c.groups] for c in cost.layers]
    group_losses = group_losses or [[0.0] * len(counts) for counts in group_counts]
    ups = list(itertools.product((False, True), repeat=2)) if part_losses else [(False, False)]
    part_losses = part_losses or [(0.0, 0.0)] * len(widths)
    of = cost.size if measure == "size" else cost.time
    empty: list[int | None] = [None] * len(widths)
    floor = of(empty, output_loss is not None)  # what no plan goes below: no layers, the smaller output layer
    capacity = limit - floor
    if capacity <= 0:
        raise BudgetError(f"no plan of blocks and MLP widths brings the {measure} under {limit:.4g}")
    step = capacity / resolution

    def steps(value: float) -> int:
        return math.ceil(value / step - 1e-9)

    def alone(i: int, width: int, count: int, up: tuple[bool, bool]) -> float:
        """What layer i costs at `width` MLP channels, `count` KV groups and its parts' types `up`."""
        kept, counts, types = empty.copy(), [c.groups for c in cost.layers], [None] * len(widths)
        kept[i], counts[i], types[i] = width, count, up
        return of(kept, groups=counts, up=types) - of(empty)

    def type_loss(i: int, up: tuple[bool, bool]) -> float:
        return sum(loss for loss, upgraded in zip(part_losses[i], up, strict=True) if not upgraded)

    choices = []  # per layer, then the output layer: [(loss, cost in steps, choice)]
    for i, (row, losses) in enumerate(zip(widths, width_losses, strict=True)):
        options = [(loss + group_loss + type_loss(i, up), steps(alone(i, w, g, up)), (w, g, up))
                   for w, loss in zip(row, losses, strict=True)
                   for g, group_loss in zip(group_counts[i], group_losses[i], strict=True) for up in ups]
        choices.append([*options, (block_losses[i], 0, None)])
    own = of(empty) - floor
    choices.append([(0.0, steps(own), False)] + ([(output_loss, 0, True)] if output_loss is not None else []))

    # best[s][c]: the least loss of the choices so far at cost c steps, s = whether a block is kept among them
    best = np.full((2, resolution + 1), np.inf)
    best[0, 0] = 0.0
    picks = []  # per group: for each (s, c), the option taken and the state before it
    for g, options in enumerate(choices):
        new = np.full_like(best, np.inf)
        option_of, state_of = np.full(best.shape, -1), np.zeros(best.shape, dtype=np.int8)
        for o, (loss, c, choice) in enumerate(options):
            if c > resolution:
                continue
            keeps = g < len(widths) and choice is not None
            for before in (0, 1):
                after = 1 if keeps else before
                candidate = np.full(resolution + 1, np.inf)
                candidate[c:] = best[before, : resolution + 1 - c] + loss
                better = candidate < new[after]
                new[after][better], option_of[after][better], state_of[after][better] = candidate[better], o, before
        best = new
        picks.append((option_of, state_of))
    if not np.isfinite(best[1]).any():
        raise BudgetError(f"no plan of blocks and MLP widths brings the {measure} under {limit:.4g}")
    c, state = int(np.argmin(best[1])), 1
    loss = float(best[1, c])
    chosen = []
    for options, (option_of, state_of) in zip(reversed(choices), reversed(picks), strict=True):
        option = options[option_of[state, c]]
        chosen.append(option[2])
        c, state = c - option[1], int(state_of[state, c])
    *layers, small_output = reversed(chosen)
    return Plan([None if c is None else c[0] for c in layers], small_output, loss,
                [None if c is None else c[1] for c in layers], [None if c is None else c[2] for c in layers])

