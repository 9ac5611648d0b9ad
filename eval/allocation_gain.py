"""Per-layer sparsity allocation: uniform, OWL and measured sensitivity (prune/allocation.py), on held-out C4.

    OMP_NUM_THREADS=1 python eval/allocation_gain.py --methods wanda --targets 0.7 \
        --allocations uniform,owl,sensitivity:token:0.2,sensitivity:sum:0.2,sensitivity:update:0.2

Every row prunes the same dense model from the same calibration tokens (C4) and is measured on the bundled C4
documents that hold no calibration window (better_masks.heldout_ids): the data to choose the allocation's settings
on. An allocation "sensitivity:CURRENCY:SPREAD[:STRIDE]" reuses one score pass per target (levels every 0.05 from
target − 0.2 to target + 0.2, the spread picks those within target ± SPREAD, the stride every STRIDE-th of them
counted from the target). Prints a markdown table; --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from llm_sparsify import compress, load_model, perplexity
from llm_sparsify.api import default_device
from llm_sparsify.data import calibration_ids
from llm_sparsify.prune.allocation import sensitivity_sparsities
from llm_sparsify.recipe import load_recipe
from llm_sparsify.score_passes import layer_sensitivities
from llm_sparsify.targets import target_modules
from llm_sparsify.transform_pass import prune_model

sys.path.insert(0, str(Path(__file__).parent))
from better_masks import heldout_ids  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--targets", default="0.7,0.6")
    parser.add_argument("--allocations", default="uniform,owl,sensitivity:token:0.2")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--score-samples", type=int, default=16, help="calibration windows of the score pass")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--json", default=None)
    parser.add_argument("--tables", default=None, help="cache of the score pass: PREFIX_<target>.pt, read or written")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, device=args.device)
    calibration = calibration_ids("c4", tokenizer, args.nsamples, args.seqlen, args.seed)
    test_ids = heldout_ids(calibration, tokenizer)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for target in [float(t) for t in args.targets.split(",")]:
        tables, levels = None, [round(target - 0.2 + 0.05 * k, 4) for k in range(9)]
        for method in args.methods.split(","):
            recipe = load_recipe({"pruning": {"method": method, "sparsity": target}})
            for allocation in args.allocations.split(","):
                model.load_state_dict(dense_state)
                start, sparsities = time.perf_counter(), None
                if allocation == "owl":
                    compress(model, {"pruning": {"method": method, "sparsity": target, "allocation": "owl"}},
                             calibration, device=args.device)
                else:
                    if allocation.startswith("sensitivity"):
                        _, currency, spread, *stride = allocation.split(":")  # stride: every k-th level
                        cache = Path(f"{args.tables}_{target:g}.pt") if args.tables else None
                        if tables is None and cache is not None and cache.exists():
                            tables = torch.load(cache)
                            levels = tables.pop("levels", levels)  # a cache may hold other levels
                        if tables is None:
                            score_start = time.perf_counter()
                            tables = layer_sensitivities(model, calibration[:args.score_samples], levels,
                                                         target_modules(model, recipe), args.device)
                            score_seconds = time.perf_counter() - score_start
                            print(json.dumps({"target": target, "levels": levels, "score_seconds": score_seconds,
                                              **{c: t.tolist() for c, t in tables.items()}}), flush=True)
                            if cache is not None:
                                torch.save({"levels": levels, **tables}, f"{cache}.part")
                                Path(f"{cache}.part").rename(cache)
                        keep = [k for k, s in enumerate(levels) if abs(s - target) <= float(spread) + 1e-9
                                and round((s - target) / 0.05) % int(stride[0] if stride else 1) == 0]
                        sparsities = sensitivity_sparsities(tables[currency][:, keep], [levels[k] for k in keep],
                                                            target, target_modules(model, recipe))
                        start = time.perf_counter()
                    prune_model(model, recipe, calibration, args.device, sparsities=sparsities)
                seconds = time.perf_counter() - start
                ppl = perplexity(model, test_ids, args.eval_seqlen, args.device, args.max_windows or None)
                rows.append({"method": method, "target": target, "allocation": allocation, "perplexity": ppl,
                             "seconds": seconds, "sparsities": sparsities})
                print(json.dumps(rows[-1]), flush=True)

    print(f"\nheld-out C4 perplexity (seqlen {args.eval_seqlen}, {args.max_windows} windows); calibration c4 "
          f"{args.nsamples}x{args.seqlen}, score pass on {args.score_samples} windows, seed {args.seed}, "
          f"{torch.get_num_threads()} threads\n")
    print("| method | sparsity | allocation | perplexity | pruning s |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['target']:g} | {row['allocation']} | {row['perplexity']:.2f} | "
              f"{row['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
