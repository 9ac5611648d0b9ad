"""The README's compression table: dense vs pruned vs pruned + int4, quality and size on disk per format.

Every model is made the way a user makes it (`prune_checkpoint`, disk to disk, 64 x 512 C4 tokens on the
CPU), scored in memory (WikiText-2 perplexity and lm-eval zero-shot tasks from local files), then
exported to each format and measured on disk:

    python eval/compress_table.py --data-dir ../shared/data --limit 500
    python eval/compress_table.py --models dense,sparsegpt-50-w4g128 --tasks piqa --limit 50   # quick

Outputs go under --workdir (default /tmp/llm_sparsify_table); finished ones are reused on a second run.
Prints two markdown tables (quality; MiB on disk per format) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from llm_sparsify import load_model, perplexity, prune_checkpoint
from llm_sparsify.data import evaluation_ids
from llm_sparsify.export import ExportError
from llm_sparsify.export.bitsandbytes import export_bitsandbytes
from llm_sparsify.export.compact import save_compact
from llm_sparsify.export.compressed_tensors import export_compressed_tensors
from llm_sparsify.export.gguf import export_gguf
from llm_sparsify.export.hf import read_record
from llm_sparsify.files import disk_size
from llm_sparsify.models import default_model_path
from llm_sparsify.recipe import Recipe, load_recipe
from llm_sparsify.zero_shot import evaluate_tasks

MODELS = ["dense", "wanda-2of4", "sparsegpt-2of4", "sparsegpt-50", "sparsegpt-50-w4g128", "sparsegpt-50-rtn-w4g128",
          "sparsegpt-50-w4g64"]
GGUF_TYPES = ["F16", "Q8_0", "Q4_0"]


def recipe_for(name: str) -> str | Recipe:
    """A built-in recipe's name, or the table's one variant: w4g128 with groups of 64, which divide SmolLM2's 576
    inputs as compressed-tensors (and vLLM) require."""
    if name != "sparsegpt-50-w4g64":
        return name
    recipe = load_recipe("sparsegpt-50-w4g128")
    scheme = replace(recipe.quantization.scheme, group_size=64)
    return replace(recipe, name=name, quantization=replace(recipe.quantization, scheme=scheme))


def build(name: str, workdir: Path, nsamples: int, seqlen: int) -> Path:
    """The checkpoint for `name`: the built-in dense model, or its pruned copy (made once)."""
    if name == "dense":
        return default_model_path()
    output = workdir / name
    if read_record(output) is None:
        start = time.perf_counter()
        prune_checkpoint(None, recipe_for(name), output, "c4", device="cpu", nsamples=nsamples, seqlen=seqlen,
                         overwrite=True)
        logging.info("%s pruned in %.1f s", name, time.perf_counter() - start)
    return output


def score(checkpoint: Path, tasks: list[str], limit: int | None, data_dir: str, windows: int, cache: Path) -> dict:
    """WikiText-2 perplexity and zero-shot metrics, kept in `cache` for a second run with the same settings."""
    key = {"tasks": tasks, "limit": limit, "windows": windows}
    if cache.exists() and (saved := json.loads(cache.read_text()))["settings"] == key:
        return saved["result"]
    model, tokenizer = load_model(str(checkpoint), device="cpu")
    ids = evaluation_ids("wikitext2", tokenizer)
    result = {"wikitext2": {"perplexity": perplexity(model, ids, seqlen=512, max_windows=windows)}}
    if tasks:
        result.update(evaluate_tasks(model, tokenizer, tasks, limit=limit, data_dir=data_dir))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"settings": key, "result": result}))
    return result


def export_sizes(name: str, checkpoint: Path, workdir: Path) -> dict[str, int | str]:
    """Bytes on disk of the checkpoint and of each export format it supports (the refusal, where one refuses)."""
    exports = workdir / "exports" / name
    formats = {f"gguf {qtype}": (f"model-{qtype}.gguf", partial(export_gguf, qtype=qtype)) for qtype in GGUF_TYPES}
    formats["bnb nf4"] = ("bnb-nf4", partial(export_bitsandbytes, mode="nf4"))
    if name != "dense":
        formats["compact"] = ("compact", save_compact)
    if (checkpoint / "quantization.safetensors").exists():
        formats["compressed-tensors"] = ("compressed-tensors", export_compressed_tensors)
    sizes: dict[str, int | str] = {"hf safetensors": disk_size(checkpoint)}
    for label, (target, export) in formats.items():
        try:
            if not (exports / target).exists():
                export(checkpoint, exports / target)
            sizes[label] = disk_size(exports / target)
        except ExportError as error:
            logging.warning("%s: %s refused: %s", name, label, error)
            sizes[label] = f"refused: {error}"
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="dense and/or built-in recipe names")
    parser.add_argument("--tasks", default="piqa,arc_easy,boolq,winogrande,hellaswag,arc_challenge")
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    parser.add_argument("--data-dir", default="../shared/data", help="local task data (see eval/tasks)")
    parser.add_argument("--max-windows", type=int, default=64, help="WikiText-2 windows of 512 tokens")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llm_sparsify_table"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    names, tasks = args.models.split(","), [t for t in args.tasks.split(",") if t]
    results, sizes = {}, {}
    for name in names:
        checkpoint = build(name, args.workdir, args.nsamples, args.seqlen)
        start = time.perf_counter()
        results[name] = score(checkpoint, tasks, args.limit, args.data_dir, args.max_windows,
                              args.workdir / "scores" / f"{name}.json")
        logging.info("%s scored in %.1f s", name, time.perf_counter() - start)
        sizes[name] = export_sizes(name, checkpoint, args.workdir)

    metric = {task: "acc_norm" if task in ("hellaswag", "arc_challenge", "arc_easy", "piqa") else "acc"
              for task in tasks}
    header = ["model", "WikiText-2 ppl", *(f"{t} {metric[t]}" for t in tasks)]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in names:
        cells = [f"{results[name]['wikitext2']['perplexity']:.2f}"]
        cells += [f"{results[name][t][metric[t]]:.4f}" for t in tasks]
        print(f"| {name} | " + " | ".join(cells) + " |")

    formats = list(dict.fromkeys(f for name in names for f in sizes[name]))
    print("\n| model (MiB on disk) | " + " | ".join(formats) + " |\n|---|" + "---|" * len(formats))
    for name in names:
        cells = [f"{sizes[name][f] / 2**20:.1f}" if isinstance(sizes[name].get(f), int) else "–" for f in formats]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(json.dumps({"settings": vars(args) | {"workdir": str(args.workdir)}, "results": results, "sizes": sizes}))


if __name__ == "__main__":
    main()
