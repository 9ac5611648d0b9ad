"""Better N:M and unstructured masks: RIA's score and weight updates for a fixed mask, against Wanda and SparseGPT.

    python eval/better_masks.py                          # SmolLM2-135M, C4 64x512 calibration, WikiText-2 test
    python eval/better_masks.py --evaluate heldout-c4 --max-windows 32 --methods ria,ria+lstsq --alpha 0.25

Every row prunes the same dense model from the same calibration tokens. `--evaluate heldout-c4` measures on the
bundled C4 documents that no calibration window came from: the data to choose hyperparameters on (RIA's alpha, the
update), so that the WikiText-2 test text is only read for the final table. Prints a markdown table (method,
pattern, perplexity, pruning seconds) and writes it as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import time
from array import array

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from llm_sparsify import compress, load_model, perplexity
from llm_sparsify.api import default_device
from llm_sparsify.data import calibration_ids, evaluation_ids, load_documents
from llm_sparsify.prune.ria import ALPHA

METHODS = ["wanda", "sparsegpt", "ria", "ria+obs", "ria+lstsq", "wanda+lstsq", "sparsegpt+lstsq"]
PATTERNS = ["2:4", "0.5"]


def pruning_section(method: str, pattern: str, alpha: float) -> dict:
    """The recipe's pruning section for a row such as "ria+lstsq" (a method, then its weight update if any)."""
    name, _, update = method.partition("+")
    section = {"method": name, "sparsity": pattern}
    if name == "ria":
        section["alpha"] = alpha
    return section | ({"update": update} if update else {})


def _token_bytes(ids: list[int] | Tensor) -> bytes:
    return array("q", ids.tolist() if isinstance(ids, Tensor) else ids).tobytes()


def _contains(haystack: bytes, needle: bytes) -> bool:
    """Whether `needle` occurs in `haystack` at a whole token (8 bytes each)."""
    start = haystack.find(needle)
    while start != -1 and start % 8:
        start = haystack.find(needle, start + 1)
    return start != -1


def heldout_ids(calibration: Tensor, tokenizer: PreTrainedTokenizerBase, source: str = "c4") -> Tensor:
    """The documents of `source` (its calibration split) that hold none of the calibration windows, as one token
    stream [1, N] joined the way evaluation_ids joins C4: text to choose hyperparameters on, not seen by pruning."""
    documents = [d for d in load_documents(source, "train") if d.strip()]
    windows = [_token_bytes(window) for window in calibration]
    unused = [text for text, ids in zip(documents, tokenizer(documents)["input_ids"], strict=True)
              if not any(_contains(_token_bytes(ids), window) for window in windows)]
    if len(unused) == len(documents):
        raise ValueError(f"no calibration window comes from {source}: cannot tell which documents it used")
    return tokenizer(" ".join(unused), return_tensors="pt").input_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint or Hub id (default: built-in SmolLM2-135M)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: METHOD[+UPDATE]")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated: N:M or fractions")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="RIA's power of the activation norm")
    parser.add_argument("--evaluate", default="wikitext2", choices=["wikitext2", "heldout-c4"])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512, help="calibration sample length")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=64, help="evaluation windows (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-dense", action="store_true", help="leave out the dense row")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, device=args.device)
    calibration = calibration_ids("c4", tokenizer, args.nsamples, args.seqlen, args.seed)
    test_ids = evaluation_ids("wikitext2", tokenizer) if args.evaluate == "wikitext2" else heldout_ids(
        calibration, tokenizer)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}

    def evaluate() -> float:
        return perplexity(model, test_ids, args.eval_seqlen, args.device, args.max_windows or None)

    rows = [] if args.no_dense else [{"method": "dense", "pattern": "-", "perplexity": evaluate(), "seconds": 0.0}]
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            model.load_state_dict(dense_state)
            start = time.perf_counter()
            compress(model, {"pruning": pruning_section(method, pattern, args.alpha)}, calibration,
                     device=args.device)
            seconds = time.perf_counter() - start
            rows.append({"method": method, "pattern": pattern, "perplexity": evaluate(), "seconds": seconds})
            print(json.dumps(rows[-1]), flush=True)

    windows = args.max_windows or "all"
    text = "WikiText-2 test" if args.evaluate == "wikitext2" else "held-out C4 (documents without calibration windows)"
    print(f"\n{text} perplexity (seqlen {args.eval_seqlen}, {windows} windows); calibration c4 "
          f"{args.nsamples}x{args.seqlen}, seed {args.seed}, RIA alpha {args.alpha:g}, device {args.device}, "
          f"{torch.get_num_threads()} threads\n")
    print("| method | sparsity | perplexity | pruning time (s) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['pattern']} | {row['perplexity']:.2f} | {row['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
