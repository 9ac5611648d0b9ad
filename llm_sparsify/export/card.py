"""The model card (README.md with Hub metadata) of a finished checkpoint, written from its llm_sparsify record."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml

from llm_sparsify.errors import UserError
from llm_sparsify.export.hf import require_record
from llm_sparsify.export.plot import PlotError, per_type, plot_layers
from llm_sparsify.files import atomic_file, disk_size
from llm_sparsify.zero_shot import markdown_table

log = logging.getLogger(__name__)

CARD = "README.md"
PLOT = "llm_sparsify_layers.png"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class CardError(UserError, ValueError):
    """A directory that has no llm_sparsify record to describe."""


def write_model_card(checkpoint: str | Path, *, command: str | None = None) -> Path:
    """Write README.md (and the per-layer plot it shows) into a checkpoint directory, from its record."""
    checkpoint = Path(checkpoint)
    record = require_record(checkpoint, CardError)
    try:
        plot_layers(record, checkpoint / PLOT)
        plot = PLOT
    except PlotError as error:
        log.info("no per-layer plot in the card: %s", error)
        plot = None
    text = model_card(record, stored_sizes(checkpoint), command=command, plot=plot)
    with atomic_file(checkpoint / CARD, overwrite=True) as tmp:
        tmp.write_text(text)
    return checkpoint / CARD


def stored_sizes(checkpoint: Path) -> dict[str, int]:
    """Bytes of the safetensors files, how many there are, and bytes of everything but the card and its plot."""
    weights = sorted(checkpoint.glob("*.safetensors"))
    card = sum(disk_size(f) for f in (checkpoint / CARD, checkpoint / PLOT) if f.exists())
    return {"weights": sum(map(disk_size, weights)), "weight_files": len(weights),
            "total": disk_size(checkpoint) - card}


def front_matter(record: dict[str, Any]) -> dict[str, Any]:
    """The card's metadata for the Hub: base model (when it is a Hub id), library, task and tags."""
    recipe, stages = record["recipe"], record.get("stages") or {}
    tags = ["llm-sparsify"]
    if pruning := recipe.get("pruning"):
        pattern = "semi-structured" if ":" in str(pruning["sparsity"]) else "unstructured"
        tags += ["sparse", "pruned", pruning["method"], f"{pattern}-sparsity"]
    tags += [f"{stage}-pruned" for stage in ("depth", "width") if stage in stages]
    if record.get("quantization"):
        tags += ["quantized", f"int{record['quantization']['bits']}"]
    meta: dict[str, Any] = {}
    base = str(record.get("base_model", ""))
    if _HUB_ID.fullmatch(base) and not Path(base).exists():  # a local path is no Hub metadata
        meta["base_model"] = base
    meta.update(library_name="transformers", pipeline_tag="text-generation", tags=tags)
    return meta


UNIT_NAMES = {"mlp": "MLP channels", "heads": "KV groups (with their query heads)"}


def removed_in_words(stages: dict[str, Any]) -> dict[str, str]:
    """What the experts, depth and width stages removed, in words: {"experts": "2 of 8 experts in every MoE layer",
    "depth": "decoder blocks 3, 7", "width": "25% of the MLP channels"} (only the stages that ran)."""
    words = {}
    if experts := stages.get("experts"):
        count = len(experts["saliency"][0])
        words["experts"] = f"{count - len(experts['kept'][0])} of {count} experts in every MoE layer"
    if depth := stages.get("depth"):
        blocks = ", ".join(map(str, depth["removed"]))
        words["depth"] = f"decoder blocks {blocks}" if blocks else "no decoder blocks"
    if width := stages.get("width"):
        words["width"] = f"{1 - sum(width['kept']) / sum(width['of']):.0%} of the {UNIT_NAMES[width['unit']]}"
    if budget := stages.get("budget"):
        kept = sum(k for k in budget["kept"] if k is not None)
        blocks = ", ".join(map(str, budget["removed"])) or "none"
        groups = _groups_cut(budget)
        words["budget"] = (f"decoder blocks {blocks} and {1 - kept / sum(budget['of']):.0%} of the MLP channels"
                           + (f", {groups[0]} of the {groups[1]} KV groups of the layers kept" if groups else "")
                           + (f", the output layer at {budget['qtype']}" if budget["small_output"] else "")
                           + _upgraded(budget))
    return words


def _upgraded(budget: dict[str, Any]) -> str:
    """Which parts a budget plan writes at its upgrade type, in words ("" if none)."""
    upgraded = budget.get("upgraded") or []
    counts = [(name, sum(up[k] for up in upgraded)) for k, name in enumerate(("attention", "MLP"))]
    parts = [f"the {name} of {n} layer{'s' * (n != 1)}" for name, n in counts if n]
    return f"; at {budget['upgrade']} rather than {budget['qtype']}: " + " and ".join(parts) if parts else ""


def _groups_cut(budget: dict[str, Any]) -> tuple[int, int] | None:
    """(KV groups removed, of how many) in the blocks a budget plan kept, or None if it cut none (or planned none)."""
    kept = [(g, n) for g, n in zip(budget.get("groups") or [], budget.get("of_groups") or [], strict=True)
            if g is not None]
    removed = sum(n - g for g, n in kept)
    return (removed, sum(n for _, n in kept)) if removed else None


def what_was_done(record: dict[str, Any]) -> list[str]:
    """Each stage the recipe ran, in words, in the order it ran."""
    recipe, stages = record["recipe"], record.get("stages") or {}
    done = []
    removed = removed_in_words(stages)
    if "experts" in removed:
        done.append(f"removed {removed['experts']} (REAP saliency: router weight × expert output norm)")
    if "depth" in removed:
        done.append(f"removed {removed['depth']} of the base model ({recipe['depth']['score']} score)")
    if "width" in removed:
        width = stages["width"]
        done.append(f"removed {removed['width']} ({width['score']} score, {width['scope']})")
    if budget := stages.get("budget"):
        target = recipe["budget"]
        goal = (f"{target['size']:.0%} of the dense {budget['qtype']} GGUF's bytes" if target.get("size")
                else f"{target['decode_speedup']}× the dense {budget['qtype']} GGUF's decode speed")
        done.append(f"budget plan for {goal}: removed {removed.get('budget', 'nothing')}")
    if pruning := recipe.get("pruning"):
        done.append(f"one-shot {pruning['method']} pruning to sparsity {pruning['sparsity']}")
    if record.get("quantization"):
        done.append(f"int{record['quantization']['bits']} {record['quantization']['method']} quantization")
    if recovery := recipe.get("recovery"):
        done.append(f"recovery fine-tuning ({recovery.get('steps', '?')} steps"
                    + (", LoRA" if recovery.get("lora") else "") + ")")
    return done


def structure_section(record: dict[str, Any]) -> str:
    """Parameters before and after, the depth scores (removed blocks in bold) and the width kept per layer."""
    stages = record["stages"]
    before, after = stages["parameters_before"], stages["parameters_after"]
    parts = [f"Parameters: {before:,} → {after:,} ({after / before - 1:+.1%})."]
    if (depth := stages.get("depth")) and depth.get("importance"):
        removed = set(depth["removed"])
        scores = ", ".join(f"**{i}: {v:.4f}**" if i in removed else f"{i}: {v:.4f}"
                           for i, v in enumerate(depth["importance"]))
        score = record["recipe"]["depth"]["score"]
        meaning = (", 1 − cos(block input, block output) averaged over calibration tokens" if score == "cosine"
                   else f" by the {score} baseline (not measured from data)")
        parts.append(f"Block importance{meaning} (removed in bold): {scores}.")
    if width := stages.get("width"):
        kept = ", ".join(f"{k}/{n}" for k, n in zip(width["kept"], width["of"], strict=True))
        parts.append(f"{UNIT_NAMES[width['unit']]} kept per layer: {kept}.")
    if budget := stages.get("budget"):
        kept = ", ".join("removed" if k is None else f"{k}/{n}" for k, n in zip(budget["kept"], budget["of"],
                                                                                  strict=True))
        if _groups_cut(budget):
            kept += "; KV groups kept per layer: " + ", ".join(
                "removed" if g is None else f"{g}/{n}" for g, n in zip(budget["groups"], budget["of_groups"],
                                                                       strict=True))
        predicted = budget["predicted"]
        parts.append(f"Budget plan ({budget['qtype']} GGUF), MLP channels kept per layer: {kept}. Predicted: "
                     f"{predicted['size']:.1%} of the dense file's tensor bytes, {predicted['decode_speedup']:.2f}× "
                     f"its decode speed in llama.cpp (a fitted model; `export --speed` measures), calibration "
                     f"perplexity {predicted['calibration_perplexity']:.2f} (dense "
                     f"{math.exp(budget['dense']['calibration_loss']):.2f}).")
    return "\n\n".join(parts)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_number(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def evaluation_table(evaluation: dict[str, Any]) -> str:
    """The record's evaluation, one row per task and metric, one column per model (dense, pruned, ...); a bare
    number (e.g. "wikitext2_ppl": 29.9) is a task with one metric, "value"."""
    results = {model: {task: metrics if isinstance(metrics, dict) else {"value": metrics}
                       for task, metrics in tasks.items()}
               for model, tasks in evaluation["models"].items()}
    return markdown_table(results, list(results))


def sparsity_table(record: dict[str, Any]) -> str:
    """Share of zeros per module type, and the mean relative reconstruction error where the record has it."""
    by_type = record["sparsity"]["by_type"]
    errors = per_type(record.get("layers") or [], "error")
    header = ["module type", "share of zeros"] + (["mean relative error ‖ΔW X‖²/‖W X‖²"] if errors else [])
    rows = []
    for kind, share in by_type.items():
        known = [e for e in errors.get(kind, []) if not math.isnan(e)]
        rows.append([kind, f"{share:.2%}"] + ([f"{sum(known) / len(known):.3g}" if known else "–"] if errors else []))
    return _table(header, rows)


def sparsity_summary(sparsity: dict[str, Any]) -> str:
    """The share of zeros over the targeted weights and, where the record has it, over all decoder-layer weights."""
    text = f"{sparsity['overall']:.2%} of the targeted weights are zero"
    return text + (f" ({sparsity['decoder']:.2%} of all decoder-layer weights)" if "decoder" in sparsity else "")


def untargeted_table(untargeted: dict[str, float]) -> str:
    """The decoder-layer weights that no target covers (left as they were), with their share of those weights."""
    return ("No target covers these decoder-layer weights; they are left as they were:\n\n"
            + _table(["weight", "share of the decoder-layer weights"],
                     [[f"`{name}`", f"{share:.2%}"] for name, share in untargeted.items()]))


def deployment_table(deployment: dict[str, Any]) -> str:
    """Each measured export beside the dense model in the same format: size, prefill and decode speed."""
    rows = []
    for form, report in deployment.items():
        for label in ("dense", "pruned"):
            m, dense = report[label], report["dense"]
            rows.append([f"{form} ({report['runtime']}, {report['threads']} threads)", label, _size(m["bytes"]),
                         f"{m['prefill_tokens_per_s']:.1f}", f"{m['decode_tokens_per_s']:.1f}",
                         f"{m['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f}×"])
    return _table(["format", "model", "size", "prefill tokens/s", "decode tokens/s", "decode vs dense"], rows)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def model_card(record: dict[str, Any], size: dict[str, int], *, command: str | None = None,
               plot: str | None = None) -> str:
    """The card's Markdown: front matter, then what was done, measured and stored."""
    pruning = record["recipe"].get("pruning")
    stages = record.get("stages") or {}
    base = record.get("base_model", "unknown")
    calibration = record.get("calibration") or {}
    command = command or record.get("command")
    zeros = "Pruned weights are exact zeros in ordinary safetensors files: " if pruning else ""
    parts = [
        "---\n" + yaml.safe_dump(front_matter(record), sort_keys=False) + "---",
        f"# {Path(str(base)).name} compressed with {record.get('recipe_name', 'llm_sparsify')}",
        f"Made from `{base}` by llm_sparsify {record.get('llm_sparsify_version', '')}: "
        + "; ".join(what_was_done(record)) + f". {zeros}the checkpoint loads with `transformers` as it is.",
        f"## Base model\n\n`{base}`",
        "## Recipe\n\n```yaml\n" + yaml.safe_dump(record["recipe"], sort_keys=False) + "```",
    ]
    if calibration:
        parts.append("## Calibration\n\n" + _table(
            ["source", "samples", "tokens per sample", "seed"],
            [[calibration.get(k, "–") for k in ("source", "nsamples", "seqlen", "seed")]]))
    else:
        parts.append("## Calibration\n\nNone: the method needs no data.")
    if "parameters_before" in stages:
        parts.append("## Structure\n\n" + structure_section(record))
    if pruning:
        sparsity = record["sparsity"]
        untargeted = f"\n\n{untargeted_table(sparsity['untargeted'])}" if sparsity.get("untargeted") else ""
        parts.append(f"## Sparsity\n\n{sparsity_summary(sparsity)}.\n\n{sparsity_table(record)}{untargeted}")
    if quantization := record.get("quantization"):
        parts.append("## Quantization\n\n" + _table(
            ["method", "bits", "group size", "symmetric"],
            [[quantization.get(k, "–") for k in ("method", "bits", "group_size", "symmetric")]]))
    if (evaluation := record.get("evaluation")) and evaluation.get("models"):
        protocol = f"{evaluation['protocol']}.\n\n" if evaluation.get("protocol") else ""
        parts.append("## Evaluation\n\n" + protocol + evaluation_table(evaluation))
    if deployment := record.get("deployment"):
        parts.append("## Deployment\n\n" + deployment_table(deployment))
    files = f"{size['weight_files']} safetensors file" + ("s" if size["weight_files"] != 1 else "")
    parts.append(f"## Size on disk\n\n{_size(size['weights'])} of weights in {files}, {_size(size['total'])} in all.")
    if plot:
        parts.append(f"## Per layer\n\n![Per-layer sparsity, reconstruction error and block importance]({plot})")
    made = (f"Made on {record.get('device', '?')} in {record.get('dtype', '?')} in "
            f"{record.get('seconds', '?')} s.")
    if command:
        made = f"```bash\n{command}\n```\n\n{made}"
    parts.append(f"## How it was made\n\n{made}")
    return "\n\n".join(parts) + "\n"
