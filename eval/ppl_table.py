"""Perplexity table: dense vs each recipe, at the same calibration tokens, on one model.

    python eval/ppl_table.py                      # SmolLM2-135M, C4 64x512 calibration, WikiText-2 test
    python eval/ppl_table.py --model meta-llama/Llama-2-7b-hf --nsamples 128 --seqlen 2048 --device cuda

Prints a markdown table (method, pattern, perplexity, pruning seconds) and writes it as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llm_sparsify import compress, load_model, load_recipe, perplexity
from llm_sparsify.api import default_device
from llm_sparsify.data import calibration_ids, evaluation_ids

RECIPES = ["magnitude-50", "wanda-50", "sparsegpt-50", "magnitude-2of4", "wanda-2of4", "sparsegpt-2of4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint or Hub id (default: built-in SmolLM2-135M)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names or files")
    parser.add_argument("--calibration", default="c4")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512, help="calibration sample length")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=128, help="evaluation windows (0: whole test set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--save-calibration", default=None, help="also save the calibration ids (.pt)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, device=args.device)
    calibration = calibration_ids(args.calibration, tokenizer, args.nsamples, args.seqlen, args.seed)
    if args.save_calibration:
        torch.save(calibration, args.save_calibration)
    test_ids = evaluation_ids("wikitext2", tokenizer)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}

    def evaluate() -> float:
        return perplexity(model, test_ids, args.eval_seqlen, args.device, args.max_windows or None)

    rows = [{"method": "dense", "pattern": "-", "perplexity": evaluate(), "seconds": 0.0}]
    for name in args.recipes.split(","):
        model.load_state_dict(dense_state)
        recipe = load_recipe(name)
        start = time.perf_counter()
        compress(model, recipe, calibration, device=args.device)
        seconds = time.perf_counter() - start
        rows.append({"method": recipe.method, "pattern": recipe.pattern_text, "perplexity": evaluate(),
                     "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)

    windows = args.max_windows or "all"
    print(f"\nWikiText-2 test perplexity (seqlen {args.eval_seqlen}, {windows} windows); calibration "
          f"{args.calibration} {args.nsamples}x{args.seqlen}, seed {args.seed}, device {args.device}\n")
    print("| method | sparsity | perplexity | pruning time (s) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['pattern']} | {row['perplexity']:.2f} | {row['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
