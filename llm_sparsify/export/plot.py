"""A PNG of per-layer sparsity and reconstruction error over layer index, drawn from a checkpoint's record."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from llm_sparsify.files import atomic_file


class PlotError(ValueError):
    """A record with nothing per layer to plot."""


def module_type(name: str) -> str:
    """A module's type from its full name: model.layers.3.self_attn.q_proj -> q_proj."""
    return name.rsplit(".", 1)[-1]


def per_type(layers: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """Module type -> one value per layer: the mean of `layer[key]` over the layer's modules of that type
    (NaN where the layer has none)."""
    kinds = list(dict.fromkeys(module_type(name) for layer in layers for name in layer.get(key) or {}))
    series: dict[str, list[float]] = {kind: [] for kind in kinds}
    for layer in layers:
        values = layer.get(key) or {}
        for kind in kinds:
            found = [value for name, value in values.items() if module_type(name) == kind]
            series[kind].append(sum(found) / len(found) if found else math.nan)
    return series


def plot_layers(record: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG of each layer's sparsity (mean over its pruned modules, and per module type) and, where the
    record has them, its relative reconstruction errors per module type on a log scale."""
    layers = sorted(record.get("layers") or [], key=lambda layer: layer["index"])
    if not any(layer.get("sparsity") for layer in layers):
        raise PlotError("the record has no per-layer sparsity to plot")
    index = [layer["index"] for layer in layers]
    sparsity = per_type(layers, "sparsity")
    mean = [sum(s.values()) / len(s) if (s := layer.get("sparsity")) else math.nan for layer in layers]
    errors = {kind: [value if value > 0 else math.nan for value in values]  # log scale: no zeros
              for kind, values in per_type(layers, "error").items() if any(value > 0 for value in values)}
    colors = {kind: f"C{i}" for i, kind in enumerate(dict.fromkeys([*sparsity, *errors]))}

    figure = Figure(figsize=(8, 6.5 if errors else 3.6), layout="constrained")
    FigureCanvasAgg(figure)  # draw with Agg: no display, no pyplot state
    axes = figure.subplots(2 if errors else 1, 1, sharex=True, squeeze=False)[:, 0]
    top = axes[0]
    for kind, values in sparsity.items():
        top.plot(index, values, marker=".", linewidth=1, color=colors[kind], label=kind)
    top.plot(index, mean, color="black", linewidth=2, label="mean")
    known = [value for values in [*sparsity.values(), mean] for value in values if not math.isnan(value)]
    top.set_ylim(max(0.0, min(known) - 0.05), min(1.0, max(known) + 0.05))
    top.set_ylabel("share of zeros")
    top.set_title(f"{record.get('recipe_name', 'pruning')}: per-layer sparsity"
                  + (" and reconstruction error" if errors else ""))
    top.legend(fontsize="small", ncol=4)
    if errors:
        bottom = axes[1]
        for kind, values in errors.items():
            bottom.plot(index, values, marker=".", linewidth=1, color=colors[kind], label=kind)
        bottom.set_yscale("log")
        bottom.set_ylabel("‖ΔW X‖² / ‖W X‖²")
        bottom.legend(fontsize="small", ncol=4)
    axes[-1].set_xlabel("decoder layer")
    path = Path(path)
    with atomic_file(path, overwrite=True) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path
