"""What pruning gains at the edge, in llama.cpp: size, prefill and decode speed, and perplexity of GGUF exports.

    python eval/deployment.py                                   # SmolLM2: dense F16/Q8_0/Q4_0, structure recipes Q4_0
    python eval/deployment.py --recipes depth-cosine-4 --threads 2 --rounds 5

Each recipe prunes the built-in default from the same calibration (the CLI's defaults) and is exported as Q4_0;
the dense model is exported as F16, Q8_0 and Q4_0. All files are loaded in llama.cpp at once and timed in
interleaved rounds (export/speed.py: 128 prompt tokens in one batch, then 64 decoded one at a time; medians), so
every row saw the same machine. Perplexity: WikiText-2 test, windows of 512 tokens, computed by llama.cpp itself on
the file (its logits, not transformers'). Prints a markdown table and one JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from llm_sparsify import load_model
from llm_sparsify.checkpoint import resolve_checkpoint
from llm_sparsify.data import evaluation_ids
from llm_sparsify.export.gguf import export_gguf
from llm_sparsify.export.speed import measure_speed


def gguf_perplexity(path: Path, ids: torch.Tensor, seqlen: int, windows: int, threads: int) -> float:
    """exp(mean NLL) of the first `windows` windows of `ids`, from llama.cpp's own logits."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=seqlen, n_batch=seqlen, logits_all=True, n_threads=threads,
                          verbose=False)
    nll, count = 0.0, 0
    try:
        for w in range(windows):
            window = ids[0, w * seqlen : (w + 1) * seqlen].tolist()
            llm.reset()
            llm.eval(window)
            logits = torch.from_numpy(np.array(llm.scores[: seqlen - 1])).double()
            nll -= logits.log_softmax(-1).gather(1, torch.tensor(window[1:])[:, None]).sum().item()
            count += seqlen - 1
    finally:
        llm.close()
    return math.exp(nll / count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="depth-cosine-4,width-mlp-30", help="comma-separated recipes (Q4_0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 512 for perplexity")
    args = parser.parse_args()

    from llm_sparsify.cli import main as cli

    base = resolve_checkpoint(None)
    _, tokenizer = load_model(None)
    ids = evaluation_ids("wikitext2", tokenizer)
    with tempfile.TemporaryDirectory(prefix="llm_sparsify_deploy_") as tmp:
        files = {f"dense {q}": export_gguf(base, Path(tmp) / f"dense-{q}.gguf", qtype=q)
                 for q in ("F16", "Q8_0", "Q4_0")}
        for recipe in filter(None, args.recipes.split(",")):
            out = Path(tmp) / recipe
            if cli(["prune", "--recipe", recipe, "--output", str(out), "-q"]) != 0:
                return 1
            files[f"{recipe} Q4_0"] = export_gguf(out, Path(tmp) / f"{recipe}-Q4_0.gguf", qtype="Q4_0")
        speed = measure_speed(files, threads=args.threads, rounds=args.rounds)
        rows = {label: {**speed[label], "perplexity": gguf_perplexity(path, ids, 512, args.windows, args.threads)}
                for label, path in files.items()}
    reference = rows["dense Q4_0"]
    print(f"| model | MiB | prefill tok/s | decode tok/s | decode vs dense Q4_0 | WikiText-2 ppl "
          f"({args.windows} × 512) |")
    print("|---|---|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['bytes'] / 2**20:.1f} | {row['prefill_tokens_per_s']:.0f} | "
              f"{row['decode_tokens_per_s']:.1f} | "
              f"{row['decode_tokens_per_s'] / reference['decode_tokens_per_s']:.2f}× | {row['perplexity']:.2f} |")
    for label, row in rows.items():
        print(json.dumps({"model": label, **row, "threads": args.threads, "rounds": args.rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
