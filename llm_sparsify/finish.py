"""After the walk, on a saved output: evaluation (--ppl and the recipe's `evaluate:`), the model card, the recipe's
exports and the Hub push. Each step is checked before any pruning (check_steps) and done once: run again, the same
command skips an evaluation with the same settings already in the record and an export already there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm_sparsify.data import check_evaluation_source, evaluation_ids
from llm_sparsify.errors import UserError
from llm_sparsify.evaluate import perplexity
from llm_sparsify.events import Event, emit
from llm_sparsify.export.card import write_model_card
from llm_sparsify.export.hf import read_record, update_record
from llm_sparsify.export.hub import check_token, push_to_hub
from llm_sparsify.files import check_output, check_writable, disk_size
from llm_sparsify.models import DEFAULT_MODEL, default_calibration_size, load_model
from llm_sparsify.recipe import Evaluation, Recipe
from llm_sparsify.zero_shot import check_tasks, evaluate_tasks

log = logging.getLogger(__name__)


class StepError(UserError):
    """A step after saving (evaluation, model card, export, push) failed; the saved output itself is complete."""


@dataclass(frozen=True)
class Steps:
    """What a run does after saving besides the recipe's `evaluate:` and `export:` sections: WikiText-2 perplexity of
    the base and the pruned model (`ppl`, over the first `ppl_windows` windows, None: all), a Hub push, and the
    command line the model card quotes."""

    ppl: bool = False
    ppl_windows: int | None = 64
    push_to_hub: str | None = None
    token: str | None = None
    private: bool = False
    revision: str | None = None
    command_line: str | None = None


def export_path(output: Path, format: str, qtype: str) -> Path:
    """Where an export of `output` goes by default: OUTPUT-FORMAT (OUTPUT-QTYPE.gguf) beside it."""
    suffix = f"{qtype}.gguf" if format == "gguf" else format
    return output.with_name(f"{output.name}-{suffix}")


def check_steps(recipe: Recipe, output: Path, steps: Steps, device: str, *, overwrite: bool, rerun: bool) -> None:
    """What the steps after saving need, checked before the pruning: the evaluation's texts and tasks, free export
    outputs (on a rerun, existing ones count as done) and a working bitsandbytes, a Hub token that may write."""
    if evaluation := recipe.evaluate:
        for dataset in evaluation.perplexity:
            check_evaluation_source(dataset)
        if evaluation.tasks:
            check_tasks(list(evaluation.tasks))
    for name in recipe.export.formats if recipe.export else ():
        path = export_path(output, name, recipe.export.qtype)
        if not (rerun and path.exists()):
            check_output(path, overwrite)
            check_writable(path)
        if name.startswith("bnb-"):
            from llm_sparsify.export.bitsandbytes import check_backend

            check_backend(name.removeprefix("bnb-"), device)
    if recipe.export and recipe.export.speed:
        from llm_sparsify.export.speed import require_llama_cpp

        require_llama_cpp()
    if steps.push_to_hub:
        check_token(steps.token, steps.push_to_hub)


def run_steps(output: Path, recipe: Recipe, base_model: str | None, steps: Steps, device: str,
              dtype: torch.dtype | None, *, overwrite: bool, on_event: Event | None = None) -> dict[str, Any]:
    """The model card, --ppl and the recipe's `evaluate:` section (into the record, and the card again), the
    recipe's exports and the push, each told to `on_event` as it finishes. Returns what was done: {"perplexity":
    the --ppl figures, "evaluation": the section's, "exports": [...], "deployment": export.speed's, "pushed": url},
    each only where done now."""
    write_model_card(output, command=steps.command_line)  # the output is complete with its card from here on
    done: dict[str, Any] = {}

    def finished(kind: str, value: Any) -> None:
        if kind == "export":
            done.setdefault("exports", []).append(value)
        else:
            done[kind] = value
        emit(on_event, kind, value)

    evaluation = recipe.evaluate
    settings = {"ppl_windows": steps.ppl_windows if steps.ppl else False,
                "dtype": str(dtype).removeprefix("torch.") if dtype else None, "device": device}
    if (steps.ppl or evaluation) and (read_record(output).get("evaluation") or {}).get("settings") == settings:
        log.info("%s already holds this command's evaluation", output)
    elif steps.ppl or evaluation:
        ppl, models = {}, {}
        for label, name in (("base", base_model), ("pruned", str(output))):  # each model loaded once, for both
            model, tokenizer = load_model(name, dtype=dtype, device=device)
            if steps.ppl:
                ppl[label] = {"model": name or DEFAULT_MODEL, **perplexity_of(
                    model, tokenizer, "wikitext2", None, steps.ppl_windows, device, on_event=on_event)}
            if evaluation:
                models[label] = evaluate_loaded(model, tokenizer, evaluation, device, on_event=on_event)
            del model
        if steps.ppl:
            finished("perplexity", ppl)
            add_evaluation(output, {label: {"wikitext2": {"perplexity": result["perplexity"]}}
                                    for label, result in ppl.items()},
                           f"WikiText-2 test perplexity over {ppl['base']['windows']} windows of "
                           f"{ppl['base']['seqlen']} tokens", None if evaluation else settings)
        if evaluation:
            add_evaluation(output, models, protocol(evaluation, device), settings)
            finished("evaluation", models)
        write_model_card(output, command=steps.command_line)
    for name in recipe.export.formats if recipe.export else ():
        path = export_path(output, name, recipe.export.qtype)
        if path.exists() and not overwrite:  # a rerun's: the first run refused an existing one before work
            log.info("%s is already there", path)
            continue
        finished("export", export_checkpoint(output, name, recipe.export.qtype, path, overwrite, device,
                                             on_event=on_event))
    if recipe.export and recipe.export.speed:
        gguf = {"format": "gguf", "path": str(export_path(output, "gguf", recipe.export.qtype))}
        finished("deployment", deployment_speed(output, gguf, recipe.export.qtype))
    if steps.push_to_hub:
        finished("pushed", push_to_hub(output, steps.push_to_hub, token=steps.token, private=steps.private,
                                       revision=steps.revision))
    return done


def perplexity_of(model, tokenizer, dataset: str, seqlen: int | None, max_windows: int | None,
                  device: str, *, on_event: Event | None = None) -> dict[str, Any]:
    """Perplexity of a loaded model on an evaluation text, with the windows it was taken over."""
    seqlen = seqlen or default_calibration_size(device)[1]
    ids = evaluation_ids(dataset, tokenizer)
    value = perplexity(model, ids, seqlen=seqlen, device=device, max_windows=max_windows, on_event=on_event)
    windows = min(ids.numel() // seqlen, max_windows or ids.numel())
    return {"dataset": dataset, "seqlen": seqlen, "windows": windows, "perplexity": value}


def evaluate_model(model_name: str | None, dataset: str | None, tasks: list[str], *, seqlen: int | None,
                   max_windows: int | None, limit: int | None, data_dir: Path | None, batch_size: int,
                   dtype: torch.dtype | None, device: str, on_event: Event | None = None) -> dict[str, Any]:
    """What `llm-sparsify eval` reports of one model: perplexity_of on `dataset` (None: none) and, under "tasks",
    {task: {metric: value}} of lm-eval's zero-shot `tasks`."""
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    record: dict[str, Any] = {"model": model_name or DEFAULT_MODEL}
    if dataset is not None:
        record.update(perplexity_of(model, tokenizer, dataset, seqlen, max_windows, device, on_event=on_event))
    if tasks:
        record["tasks"] = evaluate_tasks(model, tokenizer, tasks, limit=limit, data_dir=data_dir,
                                         batch_size=batch_size, device=device)
    return record


def evaluate_loaded(model, tokenizer, evaluation: Evaluation, device: str, *,
                    on_event: Event | None = None) -> dict[str, dict[str, float]]:
    """What a recipe's `evaluate:` section asks of a loaded model: {dataset or task: {metric: value}}."""
    result = {dataset: {"perplexity": perplexity_of(model, tokenizer, dataset, None, evaluation.max_windows,
                                                    device, on_event=on_event)["perplexity"]}
              for dataset in evaluation.perplexity}
    if evaluation.tasks:
        result |= evaluate_tasks(model, tokenizer, list(evaluation.tasks), limit=evaluation.limit, device=device)
    return result


def protocol(evaluation: Evaluation, device: str) -> str:
    """The settings behind an `evaluate:` section's figures, in words, for the model card."""
    windows = f"the first {evaluation.max_windows}" if evaluation.max_windows else "all"
    words = []
    if evaluation.perplexity:
        words.append(f"perplexity over {windows} windows of {default_calibration_size(device)[1]} tokens")
    if evaluation.tasks:
        words.append("lm-eval zero-shot" + (f" on the first {evaluation.limit} items per task" if evaluation.limit
                                            else ""))
    return "; ".join(words)


def add_evaluation(output: Path, models: dict, protocol: str, settings: dict | None = None) -> None:
    """Keep evaluation results (and how they were taken) in the output's record, where the model card finds them;
    `settings` (the command's, given once its evaluation is complete) let a rerun of the command skip it."""
    update_record(output, "evaluation",
                  {"models": models, "protocol": protocol} | ({"settings": settings} if settings else {}))


def export_checkpoint(source: Path, format: str, qtype: str, output: Path | None, overwrite: bool,
                      device: str | None, *, on_event: Event | None = None) -> dict[str, Any]:
    """Write `source` as `format` to `output` (default: SOURCE-FORMAT beside it); return where, and the sizes."""
    from llm_sparsify.export.bitsandbytes import export_bitsandbytes
    from llm_sparsify.export.compact import save_compact
    from llm_sparsify.export.compressed_tensors import export_compressed_tensors
    from llm_sparsify.export.gguf import export_gguf

    output = output or export_path(source, format, qtype)
    if format == "gguf":
        export_gguf(source, output, qtype=qtype, overwrite=overwrite, on_event=on_event)
    elif format == "compressed-tensors":
        export_compressed_tensors(source, output, overwrite=overwrite)
    elif format == "compact":
        save_compact(source, output, overwrite=overwrite, on_event=on_event)
    else:
        export_bitsandbytes(source, output, mode=format.removeprefix("bnb-"), device=device, overwrite=overwrite)
    return {"source": str(source), "format": format, "path": str(output), "bytes": disk_size(output),
            "source_bytes": disk_size(source)}


def check_speed(format: str, source: Path) -> None:
    """Refuse --speed before any work where it cannot be measured: not GGUF, no llama.cpp, no record of the base."""
    from llm_sparsify.export.speed import require_llama_cpp

    if format != "gguf":
        raise UserError(f"speed is measured for GGUF exports (in llama.cpp) so far, not {format}")
    require_llama_cpp()
    if not read_record(source):
        raise UserError(f"{source} has no llm_sparsify record naming its dense base model to compare with")


def deployment_speed(source: Path, export: dict[str, Any], qtype: str, *, threads: int | None = None,
                     rounds: int | None = None) -> dict[str, Any]:
    """Bytes and tokens per second of a GGUF `export` of `source` (export_checkpoint's result) against the dense base
    model exported the same way (into a temporary directory), both in llama.cpp (export/speed.py); kept in the
    record of `source`, where the model card shows it."""
    import tempfile

    from llm_sparsify.checkpoint import resolve_checkpoint
    from llm_sparsify.export.gguf import export_gguf
    from llm_sparsify.export.speed import ROUNDS, measure_speed

    check_speed(export["format"], source)
    base = resolve_checkpoint(read_record(source).get("base_model"))
    with tempfile.TemporaryDirectory(prefix="llm_sparsify_dense_") as tmp:
        dense = export_gguf(base, Path(tmp) / "dense.gguf", qtype=qtype)
        speed = measure_speed({"dense": dense, "pruned": Path(export["path"])}, threads=threads,
                              rounds=rounds or ROUNDS)
    report = {"format": f"gguf {qtype}", "runtime": "llama.cpp", "threads": threads or torch.get_num_threads(),
              **speed}
    update_record(source, "deployment", {**(read_record(source).get("deployment") or {}), report["format"]: report})
    write_model_card(source)
    return report
