"""Held-out C4 perplexity of whole recipes on SmolLM2: the calibration-side screening that chose the best-* settings.

    python eval/screen_recipes.py sparsegpt-2of4 best-2of4 my-variant.yaml

Every recipe (a built-in name or a YAML path) prunes the same dense model from the same calibration (64 × 512 C4,
seed 0); perplexity is measured on 32 windows of 512 of bundled C4 documents that no calibration window came from
(better_masks.heldout_ids), never on the WikiText-2 test text the README's tables report. Prints one JSON line per
recipe with the pruning's wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llm_sparsify import compress, load_model, perplexity
from llm_sparsify.data import calibration_ids

sys.path.insert(0, str(Path(__file__).parent))
from better_masks import heldout_ids  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", help="built-in recipe names or YAML paths")
    parser.add_argument("--windows", type=int, default=32, help="held-out C4 windows of 512 tokens")
    args = parser.parse_args()

    model, tokenizer = load_model(None)
    calibration = calibration_ids("c4", tokenizer, 64, 512, 0)
    heldout = heldout_ids(calibration, tokenizer)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    for recipe in args.recipes:
        model.load_state_dict(dense)
        start = time.perf_counter()
        compress(model, recipe, calibration)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, heldout, 512, "cpu", args.windows)
        print(json.dumps({"recipe": recipe, "heldout_c4_ppl": round(ppl, 2), "seconds": round(seconds, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
