"""A PNG of per-layer sparsity, reconstruction error and block importance, drawn from a checkpoint's record."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

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
    """Write a PNG of what the record has per layer: each layer's sparsity (mean over its pruned modules, and per
    module type), its relative reconstruction errors per module type on a log scale, and the depth stage's block
    importance (removed blocks in red), one panel each."""
    layers = sorted(record.get("layers") or [], key=lambda layer: layer["index"])
    depth = (record.get("stages") or {}).get("depth") or {}
    has_sparsity = any(layer.get("sparsity") for layer in layers)
    errors = {kind: [value if value > 0 else math.nan for value in values]  # log scale: no zeros
              for kind, values in per_type(layers, "error").items() if any(value > 0 for value in values)}
    panels = [name for name, present in (("sparsity", has_sparsity), ("error", bool(errors)),
                                         ("depth", bool(depth.get("importance")))) if present]
    if not panels:
        raise PlotError("the record has nothing per layer to plot")
    index = [layer["index"] for layer in layers]
    sparsity = per_type(layers, "sparsity")
    colors = {kind: f"C{i}" for i, kind in enumerate(dict.fromkeys([*sparsity, *errors]))}

    figure = Figure(figsize=(8, 0.6 + 3.0 * len(panels)), layout="constrained")
    FigureCanvasAgg(figure)  # draw with Agg: no display, no pyplot state
    axes = dict(zip(panels, figure.subplots(len(panels), 1, squeeze=False)[:, 0], strict=True))
    figure.suptitle(f"{record.get('recipe_name', 'llm_sparsify')}: per layer")
    if has_sparsity:
        top = axes["sparsity"]
        mean = [sum(s.values()) / len(s) if (s := layer.get("sparsity")) else math.nan for layer in layers]
        for kind, values in sparsity.items():
            top.plot(index, values, marker=".", linewidth=1, color=colors[kind], label=kind)
        top.plot(index, mean, color="black", linewidth=2, label="mean")
        known = [value for values in [*sparsity.values(), mean] for value in values if not math.isnan(value)]
        top.set_ylim(max(0.0, min(known) - 0.05), min(1.0, max(known) + 0.05))
        top.set_ylabel("share of zeros")
        top.set_xlabel("decoder layer")
        top.legend(fontsize="small", ncol=4)
    if errors:
        bottom = axes["error"]
        for kind, values in errors.items():
            bottom.plot(index, values, marker=".", linewidth=1, color=colors[kind], label=kind)
        bottom.set_yscale("log")
        bottom.set_ylabel("‖ΔW X‖² / ‖W X‖²")
        bottom.set_xlabel("decoder layer")
        bottom.legend(fontsize="small", ncol=4)
    if "depth" in axes:
        importance, removed = depth["importance"], set(depth["removed"])
        axes["depth"].bar(range(len(importance)), importance,
                          color=["C3" if i in removed else "C7" for i in range(len(importance))])
        axes["depth"].set_yscale("log")
        score = record["recipe"]["depth"]["score"]
        axes["depth"].set_ylabel("importance (1 − cos)" if score == "cosine" else f"importance ({score})")
        axes["depth"].set_xlabel("block of the base model (red: removed)")
    for axis in axes.values():
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = Path(path)
    with atomic_file(path, overwrite=True) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path
