"""Side by side: llm_sparsify vs llm-compressor (vllm-project/llm-compressor) on the built-in SmolLM2-135M.

Both tools prune a freshly loaded float32 copy of the model on the CPU from the SAME calibration token
ids (llm_sparsify.data.calibration_ids), with the same method settings; only the pruning call is timed.
Both pruned models are then scored by the same function (llm_sparsify.perplexity, WikiText-2 test).

llm-compressor pins transformers<=5.17 and torch<=2.14, so it lives in its own venv (outside the repo):

    python -m venv /work/venvs/llmc
    /work/venvs/llmc/bin/pip install torch==2.13.0          # first: the CPU wheel, not GBs of CUDA
    /work/venvs/llmc/bin/pip install llmcompressor==0.14.0.1
    /work/venvs/llmc/bin/pip install -e .                   # llm_sparsify, from the repo root

    /work/venvs/llmc/bin/python eval/compare_llmcompressor.py                  # wanda-50, sparsegpt-50
    /work/venvs/llmc/bin/python eval/compare_llmcompressor.py --two-four       # also the 2:4 recipes
    /work/venvs/llmc/bin/python eval/compare_llmcompressor.py --nsamples 8 --seqlen 128 --max-windows 8

Prints a table (times, ratio llm-compressor / llm_sparsify, perplexities, measured sparsity) and one
JSON line. Settings that cannot be made identical are listed in MISMATCHES (printed with the table).
llm-compressor's own log is set to ERROR; LLM_COMPRESSOR_LOG_LEVEL=INFO shows it (per-module times).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import torch

# llm-compressor logs every module it prunes (INFO, to stdout); keep stdout for the table and JSON.
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")

try:
    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
except ImportError as error:
    sys.exit(f"llmcompressor is not importable ({error}); set up its venv as this script's docstring says.")

from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import default_data_collator

import llm_sparsify
from llm_sparsify import compress, load_model, load_recipe, perplexity
from llm_sparsify.data import calibration_ids, evaluation_ids
from llm_sparsify.targets import layer_linears

METHODS = ["wanda-50", "sparsegpt-50"]
TWO_FOUR = ["wanda-2of4", "sparsegpt-2of4"]

# Differences that remain with the settings below; printed under the table.
MISMATCHES = [
    "sparsegpt unstructured: llm-compressor masks `score <= sorted[k]` per 128-column block, which removes "
    "k+1 (or more on ties) weights per block (its sparsity is a hair above 50%); llm_sparsify removes exactly k.",
    "sparsegpt: llm-compressor falls back to H^-1 = I if the Cholesky fails; llm_sparsify raises the "
    "dampening tenfold (up to 5 times) instead (neither triggers on this model).",
    "statistics: llm-compressor keeps each Linear's own float32 running mean, rescaled every batch "
    "(H *= n/(n+b)); llm_sparsify one float64 sum per distinct input (q/k/v share one, gate/up share one), "
    "scaled once. Equal up to float rounding, which flips a few near-tied choices that compound over layers "
    "(one check, Wanda 50%, 4x128: masks identical in layers 0-1, 0.1-0.7% of entries differ in layers 15-29).",
    "module order: llm-compressor calibrates every Linear of a layer on the unpruned layer's activations "
    "(two forwards per layer), as llm_sparsify does with `inputs: dense`; llm_sparsify's default "
    "`inputs: pruned` calibrates each group of modules on what the already pruned ones before it produce "
    "(one forward per layer). Both are in the table.",
    "calibration forward: llm-compressor forces eager attention while calibrating (its traced graph bakes in "
    "an explicit causal-mask add); llm_sparsify runs the model's own attention (sdpa). Same maths, different "
    "kernel: a speed difference at long seqlen and float noise. Its attention_mask of ones is harmless: "
    "dropping it gave the very same masks.",
]


def llmc_modifier(recipe: llm_sparsify.recipe.Recipe):
    """The llm-compressor modifier equivalent to one of our recipes."""
    if isinstance(recipe.pattern, tuple):  # ours (2, 4) = keep 2 of 4; theirs "2:4" = the same N:M
        sparsity, mask_structure = recipe.sparsity, f"{recipe.pattern[0]}:{recipe.pattern[1]}"
    else:  # ours 0.5 = theirs sparsity 0.5 with mask_structure "0:0" (unstructured)
        sparsity, mask_structure = recipe.pattern, "0:0"
    common = {
        "sparsity": sparsity,
        "mask_structure": mask_structure,
        # `targets` selects the containers whose Linear children are pruned: the decoder layers, so
        # q,k,v,o,gate,up,down and not lm_head (tied to the embeddings in SmolLM2) = our default targets.
        "targets": [r"re:model\.layers\.\d+$"],
        "ignore": [],
    }
    if recipe.method == "wanda":
        return WandaPruningModifier(**common)
    if recipe.method == "sparsegpt":
        return SparseGPTModifier(
            **common,
            block_size=recipe.options["blocksize"],  # ours `blocksize: 128`
            dampening_frac=recipe.options["dampening"],  # ours `dampening: 0.01` (λ = frac · mean diag H)
        )
    raise SystemExit(f"{recipe.name}: llm-compressor has no equivalent of method {recipe.method!r} here")


def calibration_loader(ids: torch.Tensor, batch_size: int) -> DataLoader:
    """Our exact token ids as a pre-tokenized Dataset, batched in order.

    oneshot() accepts a tokenized `datasets.Dataset` (it skips tokenization when `input_ids` exists) but
    then samples it with its LengthAwareSampler, an unstable argsort by length that permutes equal-length
    samples. A DataLoader is used as given, so we wrap the Dataset in one: all samples, in order, no shuffle.
    """
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    dataset.set_format("torch")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=default_data_collator)


def prune_llmcompressor(model, tokenizer, recipe, ids: torch.Tensor, batch_size: int) -> None:
    oneshot(
        model=model,
        processor=tokenizer,  # given, so oneshot does not load it inside the timed call
        recipe=llmc_modifier(recipe),
        dataset=calibration_loader(ids, batch_size),
        batch_size=batch_size,  # only used when oneshot builds the loader itself; the loader sets it here
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
        pipeline="sequential",  # what "independent" (the default) picks for these modifiers anyway
        sequential_offload_device="cpu",  # activations between layers stay on the CPU, as ours do
    )


def prune_ours(model, tokenizer, recipe, ids: torch.Tensor, batch_size: int) -> None:
    compress(model, recipe, ids, device="cpu", batch_size=batch_size)


def target_sparsity(model) -> float:
    """Share of zeros over all Linears of the decoder layers (q, k, v, o, gate, up, down)."""
    zeros = total = 0
    for linears in layer_linears(model):
        for module in linears.values():
            zeros += (module.weight == 0).sum().item()
            total += module.weight.numel()
    return zeros / total


def untouched(model, dense: dict[str, torch.Tensor]) -> bool:
    """Whether the embeddings, lm_head and every non-Linear weight (norms) equal the dense model's."""
    linear = {f"{name}.weight" for linears in layer_linears(model) for name in linears}
    state = model.state_dict()
    return all(torch.equal(state[k], v) for k, v in dense.items() if k not in linear)


def run(tool: str, prune, recipe, ids, test_ids, dense, args) -> dict:
    model, tokenizer = load_model(None, dtype=torch.float32, device="cpu")  # fresh copy, untimed
    load = os.getloadavg()[0]
    start = time.perf_counter()
    prune(model, tokenizer, recipe, ids, args.batch_size)
    seconds = time.perf_counter() - start
    sparsity = target_sparsity(model)
    if not 0.45 < sparsity < 0.55:
        raise SystemExit(f"{tool} {recipe.name}: decoder Linears are {sparsity:.1%} zeros, not ~50%; no-op?")
    if not untouched(model, dense):
        raise SystemExit(f"{tool} {recipe.name}: changed weights outside the decoder-layer Linears")
    ppl = perplexity(model, test_ids, seqlen=args.eval_seqlen, device="cpu", max_windows=args.max_windows or None)
    row = {"tool": tool, "recipe": recipe.name, "inputs": recipe.inputs, "seconds": round(seconds, 2),
           "sparsity": round(sparsity, 5), "perplexity": round(ppl, 3), "loadavg_1min_before": round(load, 2)}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated llm_sparsify recipe names")
    parser.add_argument("--two-four", action="store_true", help="also run " + " and ".join(TWO_FOUR))
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512, help="calibration sample length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="calibration samples per forward, both tools (llm-compressor's oneshot default: 1; "
                             "llm_sparsify's default: 8)")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=64, help="WikiText-2 windows (0: whole test set)")
    parser.add_argument("--dense", action="store_true", help="also score the unpruned model")
    parser.add_argument("--inputs", default="pruned,dense",
                        help="llm_sparsify's module orders to time (recipe key `inputs`), comma-separated")
    args = parser.parse_args()

    names = [n for n in args.methods.split(",") if n] + (TWO_FOUR if args.two_four else [])
    recipes = [load_recipe(name) for name in names]
    model, tokenizer = load_model(None, dtype=torch.float32, device="cpu")
    ids = calibration_ids("c4", tokenizer, args.nsamples, args.seqlen, args.seed)  # the one set both tools use
    test_ids = evaluation_ids("wikitext2", tokenizer)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = perplexity(model, test_ids, args.eval_seqlen, "cpu", args.max_windows or None) if args.dense else None
    del model

    results = []
    for recipe in recipes:
        theirs = run("llm-compressor", prune_llmcompressor, recipe, ids, test_ids, dense_state, args)
        for inputs in args.inputs.split(","):
            ours = run("llm_sparsify", prune_ours, replace(recipe, inputs=inputs), ids, test_ids, dense_state, args)
            results.append({"recipe": recipe.name, "inputs": inputs, "llm_sparsify": ours,
                            "llm_compressor": theirs, "ratio": round(theirs["seconds"] / ours["seconds"], 3)})

    windows = args.max_windows or "all"
    print(f"\nSmolLM2-135M-Instruct, CPU float32, {torch.get_num_threads()} threads; calibration c4 "
          f"{args.nsamples}x{args.seqlen} seed {args.seed}, batch size {args.batch_size} (same ids, same order); "
          f"WikiText-2 perplexity, seqlen {args.eval_seqlen}, {windows} windows"
          + (f"; dense {dense:.3f}" if dense is not None else "") + "\n")
    print("| recipe | inputs | llm_sparsify s | llm-compressor s | ratio | ppl llm_sparsify | ppl llm-compressor "
          "| zeros llm_sparsify | zeros llm-compressor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        a, b = r["llm_sparsify"], r["llm_compressor"]
        print(f"| {r['recipe']} | {r['inputs']} | {a['seconds']:.1f} | {b['seconds']:.1f} | {r['ratio']:.2f} | "
              f"{a['perplexity']:.3f} | {b['perplexity']:.3f} | {a['sparsity']:.4%} | {b['sparsity']:.4%} |")
    print("\nratio = llm-compressor seconds / llm_sparsify seconds (pruning call only, model load excluded)")
    print("Unmatched settings:\n" + "\n".join(f"  - {m}" for m in MISMATCHES) + "\n")
    versions = {"llmcompressor": llmcompressor.__version__, "llm_sparsify": llm_sparsify.__version__,
                "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    print(json.dumps({"args": vars(args), "dense_perplexity": dense, "versions": versions, "results": results}))


if __name__ == "__main__":
    main()
