"""Which calibration order serves a method and pattern better: `inputs: pruned` (one forward, each module calibrated
on what the already pruned modules produce) or `inputs: dense` (the reference code's two forwards).

    python eval/calibration_order.py                               # Wanda 2:4, the four settings in README.md
    python eval/calibration_order.py --method sparsegpt --sparsity 0.5 --runs c4:64:0

Each run: SmolLM2-135M (the built-in default), calibration drawn from SOURCE (c4: the bundled sample;
wikitext2-train: the first 1 MB of WikiText-2 train in ../shared/data) as N windows of 512 at SEED, pruned in memory
with each order, scored on WikiText-2 test (64 windows of 512). Prints a markdown table. Seconds are rough when
anything else runs on the machine.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

from llm_sparsify import compress, load_model, perplexity
from llm_sparsify.data import calibration_ids, evaluation_ids
from llm_sparsify.recipe import load_recipe

WIKITEXT2_TRAIN = "wikitext-2-raw-v1/partial/wiki.train.nonempty_rows.first1MB.txt.gz"
DEFAULT_RUNS = "wikitext2-train:32:0,wikitext2-train:32:1,wikitext2-train:32:2,c4:64:0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated SOURCE:NSAMPLES:SEED")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--max-windows", type=int, default=64)
    args = parser.parse_args()

    model, tokenizer = load_model(None, device="cpu")
    test = evaluation_ids("wikitext2", tokenizer)
    dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "wikitext2-train.txt"  # a .txt is read as one text
        if "wikitext2-train" in args.runs:
            train.write_bytes(gzip.decompress((args.data_dir / WIKITEXT2_TRAIN).read_bytes()))
        for run in args.runs.split(","):
            source, nsamples, seed = run.split(":")
            ids = calibration_ids(str(train) if source == "wikitext2-train" else source, tokenizer, int(nsamples), 512,
                                  int(seed))
            row = [f"{source}, {nsamples} × 512, seed {seed}"]
            for inputs in ("pruned", "dense"):
                model.load_state_dict(dense)
                recipe = load_recipe({"pruning": {"method": args.method, "sparsity": args.sparsity, "inputs": inputs}})
                start = time.perf_counter()
                compress(model, recipe, ids, device="cpu")
                seconds = time.perf_counter() - start
                row.append(f"{perplexity(model, test, 512, 'cpu', args.max_windows):.2f} ({seconds:.0f} s)")
                print(row, flush=True)
            rows.append(row)
    print(f"\n{args.method} {args.sparsity}, WikiText-2 test perplexity over {args.max_windows} windows of 512\n")
    print("| calibration | `inputs: pruned` | `inputs: dense` |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
