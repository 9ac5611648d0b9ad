"""The README's structure table: depth, width, OWL, OBD and recovery on the built-in model, against their baselines.

Every row is the real code path (`llm_sparsify.compress` with a recipe on the model in memory, calibrated on C4),
scored by WikiText-2 perplexity; physically smaller models also get their parameter count and CPU decode speed
(greedy generation, tokens per second). Also prints the rank correlation between the depth score and the
ground truth it stands for (perplexity with each block skipped).

    python eval/structure_table.py                       # every row (about 20 minutes on 2 idle cores)
    python eval/structure_table.py --rows dense,depth-4-cosine --max-windows 8   # quick

Finished rows are kept under --workdir and reused by a second run with the same settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from llm_sparsify import compress, load_model, perplexity
from llm_sparsify.data import calibration_ids, evaluation_ids
from llm_sparsify.pipeline import parameter_count
from llm_sparsify.recipe import load_recipe
from llm_sparsify.structure.depth import block_importance, rank_correlation, skip_block_perplexity


def wanda(sparsity: float, owl: bool = False, method: str = "wanda") -> dict[str, Any]:
    section = {"method": method, "sparsity": sparsity}
    return {"pruning": section | ({"allocation": "owl", "owl_threshold": 5, "owl_lambda": 0.08} if owl else {})}


ROWS: dict[str, dict[str, Any] | str | None] = {"dense": None}
for blocks in (2, 4, 6):
    for score in ("cosine", "last", "random"):
        ROWS[f"depth-{blocks}-{score}"] = {"depth": {"blocks": blocks, "score": score}}
for amount in (0.2, 0.3):
    ROWS[f"width-mlp-{amount:.0%}"] = {"width": {"unit": "mlp", "amount": amount, "score": "activation"}}
    ROWS[f"width-heads-{amount:.0%}"] = {"width": {"unit": "heads", "amount": amount, "score": "weight",
                                                   "scope": "global"}}
for sparsity in (0.5, 0.7):
    ROWS[f"wanda-{sparsity:.0%}"] = wanda(sparsity)
    ROWS[f"owl-wanda-{sparsity:.0%}"] = wanda(sparsity, owl=True)
ROWS["magnitude-50%"] = wanda(0.5, method="magnitude")
ROWS["obd-50%"] = wanda(0.5, method="obd")
ROWS["wanda-70%-recover"] = "wanda-70-recover"


@torch.no_grad()
def decode_speed(model, tokenizer, new_tokens: int = 64) -> float:
    """Greedy decoding speed, tokens per second, after one warm-up run."""
    prompt = tokenizer("The history of the city begins", return_tensors="pt").input_ids
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    model.generate(prompt, **settings)
    start = time.perf_counter()
    model.generate(prompt, **settings)
    return new_tokens / (time.perf_counter() - start)


def run_row(name: str, args: argparse.Namespace, eval_ids: torch.Tensor) -> dict[str, Any]:
    model, tokenizer = load_model(None, device="cpu")
    recipe = ROWS[name]
    start = time.perf_counter()
    if recipe is not None:
        compress(model, load_recipe(recipe), "c4", tokenizer=tokenizer, device="cpu", nsamples=args.nsamples,
                 seqlen=args.seqlen, seed=args.seed)
    seconds = time.perf_counter() - start
    model.config.use_cache = True
    result = {"perplexity": perplexity(model, eval_ids, seqlen=512, max_windows=args.max_windows),
              "parameters": parameter_count(model), "seconds": round(seconds, 1),
              "layers": model.config.num_hidden_layers, "loadavg": round(os.getloadavg()[0], 2)}
    if recipe is None or "depth" in recipe or "width" in recipe:
        result["tokens_per_second"] = round(decode_speed(model, tokenizer), 1)
    return result


def depth_score_check(args: argparse.Namespace, eval_ids: torch.Tensor) -> dict[str, Any]:
    """Spearman's ρ between the cosine importance of each block and the perplexity with that block skipped."""
    model, tokenizer = load_model(None, device="cpu")
    ids = calibration_ids("c4", tokenizer, args.nsamples, args.seqlen, args.seed)
    importance = block_importance(model, ids)
    skipped = skip_block_perplexity(model, eval_ids, 512, args.skip_windows)
    return {"importance": importance.tolist(), "skip_perplexity": skipped.tolist(),
            "spearman": rank_correlation(importance, skipped),
            "spearman_without_block_0": rank_correlation(importance[1:], skipped[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all): {', '.join(ROWS)}")
    parser.add_argument("--nsamples", type=int, default=32, help="C4 calibration windows (default: 32)")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window (default: 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-windows", type=int, default=32, help="WikiText-2 windows of 512 tokens (default: 32)")
    parser.add_argument("--skip-windows", type=int, default=8, help="windows per skipped block (default: 8)")
    parser.add_argument("--no-skip-check", action="store_true", help="leave out the skip-one-block correlation")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llm_sparsify_structure"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings = {k: v for k, v in vars(args).items() if k in ("nsamples", "seqlen", "seed", "max_windows")}
    args.workdir.mkdir(parents=True, exist_ok=True)
    _, tokenizer = load_model(None, device="cpu")
    eval_ids = evaluation_ids("wikitext2", tokenizer)

    results = {}
    for name in args.rows.split(","):
        if name not in ROWS:
            parser.error(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
        cache = args.workdir / f"{name}.json"
        if cache.exists() and (saved := json.loads(cache.read_text()))["settings"] == settings:
            results[name] = saved["result"]
            continue
        results[name] = run_row(name, args, eval_ids)
        cache.write_text(json.dumps({"settings": settings, "result": results[name]}))
        logging.info("%s: %s", name, results[name])

    print("| model | WikiText-2 ppl | parameters | layers | decode tokens/s |\n|---|---|---|---|---|")
    for name, r in results.items():
        speed = r.get("tokens_per_second", "–")
        print(f"| {name} | {r['perplexity']:.2f} | {r['parameters'] / 1e6:.1f} M | {r['layers']} | {speed} |")
    check = None
    if not args.no_skip_check:
        check = depth_score_check(args, eval_ids)
        print(f"\nSpearman ρ(cosine importance, perplexity with the block skipped) over "
              f"{len(check['importance'])} blocks: {check['spearman']:.3f} "
              f"({check['spearman_without_block_0']:.3f} without block 0)")
    print(json.dumps({"settings": settings, "results": results, "depth_check": check}))


if __name__ == "__main__":
    main()
