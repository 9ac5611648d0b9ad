"""The README's structure table: depth, width, OWL, OBD and recovery on the built-in model, against their baselines.

Every row is the real code path (`llm_sparsify.compress` with a recipe on the model in memory, calibrated on C4),
scored by WikiText-2 perplexity; physically smaller models also get their parameter count and CPU decode speed
(greedy generation, tokens per second, measured per shape in interleaved rounds after all rows). Also prints the
rank correlation between the depth score and the ground truth it stands for (perplexity with each block skipped).

    python eval/structure_table.py                       # every row (about 20 minutes on 2 idle cores)
    python eval/structure_table.py --rows dense,depth-4-cosine --max-windows 8   # quick
    python eval/structure_table.py --streamed --rows depth-4-cosine,width-mlp-20%,owl-wanda-70% --no-skip-check \
        --speed-rounds 0                                 # the same rows streamed from disk to disk

Finished rows are kept under --workdir and reused by a second run with the same settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from llm_sparsify import compress, load_model, perplexity, prune_checkpoint
from llm_sparsify.architecture import parameter_count
from llm_sparsify.data import calibration_ids, evaluation_ids
from llm_sparsify.recipe import load_recipe
from llm_sparsify.score_passes import block_importance
from llm_sparsify.structure.depth import rank_correlation, skip_block_perplexity
from llm_sparsify.structure.resize import load_width_pruned


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
for unit in ("mlp", "heads"):  # second-order saliency for whole units: Σ ½·F·w² over each channel / KV group
    ROWS[f"width-{unit}-20%-obd"] = {"width": {"unit": unit, "amount": 0.2, "score": "obd",
                                               "scope": "layer" if unit == "mlp" else "global"}}
for sparsity in (0.5, 0.7):
    ROWS[f"wanda-{sparsity:.0%}"] = wanda(sparsity)
    ROWS[f"owl-wanda-{sparsity:.0%}"] = wanda(sparsity, owl=True)
ROWS["magnitude-50%"] = wanda(0.5, method="magnitude")
ROWS["obd-50%"] = wanda(0.5, method="obd")
ROWS["wanda-70%-recover"] = "wanda-70-recover"


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds for greedy decoding of `new_tokens` tokens after `prompt` (KV cache on)."""
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    start = time.perf_counter()
    model.generate(prompt, **settings)
    return time.perf_counter() - start


def speed_shapes() -> dict[str, dict[str, Any]]:
    """The physically smaller rows' shapes, built without calibration: decode speed depends on shapes alone.

    Depth rows remove their count of blocks (which ones does not change the shape); MLP rows remove the same
    share of channels in every layer (scope layer, like the table's rows); head rows are the table's own
    weight-norm global choice.
    """
    shapes: dict[str, dict[str, Any]] = {"dense": {}}
    for blocks in (2, 4, 6):
        shapes[f"depth-{blocks}"] = {"depth": {"blocks": blocks, "score": "last"}}
    for amount in (0.2, 0.3):
        shapes[f"width-mlp-{amount:.0%}"] = {"width": {"unit": "mlp", "amount": amount, "score": "weight"}}
        shapes[f"width-heads-{amount:.0%}"] = ROWS[f"width-heads-{amount:.0%}"]
    return shapes


def decode_speeds(args: argparse.Namespace, new_tokens: int = 64) -> dict[str, float]:
    """Tokens per second of greedy decoding for each shape: `args.speed_rounds` rounds that visit every model in
    turn (so a passing load spreads over all of them), the median per model, after one warm-up each."""
    _, tokenizer = load_model(None, device="cpu")
    prompt = tokenizer("The history of the city begins", return_tensors="pt").input_ids
    models = {}
    for name, recipe in speed_shapes().items():
        model, _ = load_model(None, device="cpu")
        if recipe:
            compress(model, load_recipe(recipe), "c4", tokenizer=tokenizer, device="cpu", nsamples=2, seqlen=32)
        model.config.use_cache = True
        decode_seconds(model, prompt, new_tokens)  # warm-up
        models[name] = model
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.speed_rounds):
        for name, model in models.items():
            seconds[name].append(decode_seconds(model, prompt, new_tokens))
    return {name: round(new_tokens / statistics.median(s), 1) for name, s in seconds.items()}


def run_row(name: str, args: argparse.Namespace, eval_ids: torch.Tensor) -> dict[str, Any]:
    recipe = ROWS[name]
    start = time.perf_counter()
    if args.streamed and recipe is not None and load_recipe(recipe).streams:  # from disk to disk, then loaded
        output = args.workdir / f"{name}-streamed-output"
        prune_checkpoint(None, load_recipe(recipe), output, "c4", device="cpu", dtype=torch.float32,
                         nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, overwrite=True)
        model = load_width_pruned(output, dtype=torch.float32)
    else:
        model, tokenizer = load_model(None, device="cpu")
        if recipe is not None:
            compress(model, load_recipe(recipe), "c4", tokenizer=tokenizer, device="cpu", nsamples=args.nsamples,
                     seqlen=args.seqlen, seed=args.seed)
    seconds = time.perf_counter() - start
    model.config.use_cache = True
    result = {"perplexity": perplexity(model, eval_ids, seqlen=512, max_windows=args.max_windows),
              "parameters": parameter_count(model), "seconds": round(seconds, 1),
              "layers": model.config.num_hidden_layers, "loadavg": round(os.getloadavg()[0], 2)}
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
    parser.add_argument("--speed-rounds", type=int, default=5, help="decode-speed rounds over the smaller models "
                        "(default: 5; 0 leaves speed out)")
    parser.add_argument("--streamed", action="store_true", help="run the rows whose recipe streams through "
                        "prune_checkpoint from the checkpoint on disk (as `llm-sparsify prune` does) and load the "
                        "output back, instead of compress() on the model in memory")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llm_sparsify_structure"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings = {k: v for k, v in vars(args).items() if k in ("nsamples", "seqlen", "seed", "max_windows", "streamed")}
    args.workdir.mkdir(parents=True, exist_ok=True)
    _, tokenizer = load_model(None, device="cpu")
    eval_ids = evaluation_ids("wikitext2", tokenizer)

    results = {}
    for name in args.rows.split(","):
        if name not in ROWS:
            parser.error(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
        cache = args.workdir / f"{name}{'-streamed' if args.streamed else ''}.json"
        if cache.exists() and (saved := json.loads(cache.read_text()))["settings"] == settings:
            results[name] = saved["result"]
            continue
        results[name] = run_row(name, args, eval_ids)
        cache.write_text(json.dumps({"settings": settings, "result": results[name]}))
        logging.info("%s: %s", name, results[name])

    speeds = decode_speeds(args) if args.speed_rounds else {}
    print("| model | WikiText-2 ppl | parameters | layers | decode tokens/s |\n|---|---|---|---|---|")
    for name, r in results.items():
        shape = "-".join(part for part in name.split("-") if part not in ("cosine", "last", "random"))
        speed = speeds.get(shape, "–")
        print(f"| {name} | {r['perplexity']:.2f} | {r['parameters'] / 1e6:.1f} M | {r['layers']} | {speed} |")
    check = None
    if not args.no_skip_check:
        check = depth_score_check(args, eval_ids)
        print(f"\nSpearman ρ(cosine importance, perplexity with the block skipped) over "
              f"{len(check['importance'])} blocks: {check['spearman']:.3f} "
              f"({check['spearman_without_block_0']:.3f} without block 0)")
    print(json.dumps({"settings": settings, "results": results, "decode_tokens_per_second": speeds,
                      "depth_check": check}))


if __name__ == "__main__":
    main()
