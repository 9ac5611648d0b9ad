"""Benchmark one pruning run: wall time (total and per layer) and peak memory (host RSS, device).

    python eval/benchmark_prune.py                                  # wanda-50 on SmolLM2-135M, CPU
    python eval/benchmark_prune.py --recipe sparsegpt-2of4 --nsamples 128 --seqlen 2048 --device cuda
    python eval/benchmark_prune.py --streamed                       # disk to disk, as `llm-sparsify prune`

Prints one line of JSON, so later speed work can compare against this baseline. In memory (the
default) times `compress` on a loaded model; --streamed times `prune_checkpoint`, which reads and
writes the checkpoint layer by layer (writing included).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch

from llm_sparsify import load_model, load_recipe, prune_checkpoint
from llm_sparsify.api import default_device
from llm_sparsify.data import calibration_ids
from llm_sparsify.transform_pass import prune_model


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint or Hub id (default: built-in SmolLM2-135M)")
    parser.add_argument("--recipe", default="wanda-50")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--streamed", action="store_true", help="time prune_checkpoint, disk to disk")
    args = parser.parse_args()

    start = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device)
    load_seconds = time.perf_counter() - start
    calibration = calibration_ids("c4", tokenizer, args.nsamples, args.seqlen)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if args.streamed:
        del model
        with tempfile.TemporaryDirectory() as tmp:
            record = prune_checkpoint(args.model, args.recipe, f"{tmp}/out", calibration, device=args.device,
                                      batch_size=args.batch_size)
        per_layer = [layer["seconds"] for layer in record["layers"]]
    else:
        reports = prune_model(model, load_recipe(args.recipe), calibration, args.device, args.batch_size)
        per_layer = [r.seconds for r in reports]
    seconds = time.perf_counter() - start
    print(json.dumps({
        "model": args.model or "SmolLM2-135M-Instruct",
        "recipe": args.recipe,
        "mode": "streamed" if args.streamed else "in memory",
        "calibration": f"{args.nsamples}x{args.seqlen}",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "load_s": round(load_seconds, 1),
        "prune_s": round(seconds, 1),
        "per_layer_s": {"mean": round(sum(per_layer) / len(per_layer), 2), "max": round(max(per_layer), 2)},
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "peak_device_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }))


if __name__ == "__main__":
    main()
