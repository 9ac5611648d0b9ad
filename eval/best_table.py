"""Issue 15's table: the shipped best-* recipes against SparseGPT and Wanda at 50%, 2:4 and 70% (OWL), on SmolLM2.

    python eval/best_table.py --data-dir ../shared/data                       # every row, appended to --json
    python eval/best_table.py --rows dense,sparsegpt-50,best-50 --limit 50     # a quick look

Every row prunes the same dense model in memory from the same calibration tokens (64 × 512 C4, seed 0), then
measures WikiText-2 test perplexity (64 windows of 512 tokens) and lm-eval zero-shot accuracy (piqa, arc_easy,
winogrande, hellaswag; the first --limit items of each) and the pruning's wall time. Rows already in --json are
kept (a second run only adds what is missing), so the table can be built in pieces. Prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from llm_sparsify import compress, load_model, perplexity
from llm_sparsify.data import calibration_ids, evaluation_ids
from llm_sparsify.zero_shot import evaluate_tasks

OWL = {"allocation": "owl"}
ROWS: dict[str, str | dict | None] = {  # row -> a built-in recipe's name, a recipe, or None (dense)
    "dense": None,
    "sparsegpt-50": "sparsegpt-50",
    "wanda-50": "wanda-50",
    "best-50": "best-50",
    "sparsegpt-2of4": "sparsegpt-2of4",
    "wanda-2of4": "wanda-2of4",
    "best-2of4": "best-2of4",
    "owl-sparsegpt-70": {"pruning": {"method": "sparsegpt", "sparsity": 0.7, **OWL}},
    "owl-wanda-70": "owl-wanda-70",
    "best-70": "best-70",
}
TASKS = {"piqa": "acc_norm", "arc_easy": "acc_norm", "winogrande": "acc", "hellaswag": "acc_norm"}


def measure(name: str, model, tokenizer, calibration, test_ids, args) -> dict:
    start = time.perf_counter()
    if ROWS[name] is not None:
        compress(model, ROWS[name], calibration, device=args.device)
    seconds = time.perf_counter() - start
    ppl = perplexity(model, test_ids, 512, args.device, 64)
    tasks = evaluate_tasks(model, tokenizer, list(TASKS), limit=args.limit, data_dir=args.data_dir,
                           device=args.device) if args.limit else {}
    accuracy = {task: tasks[task][metric] for task, metric in TASKS.items() if task in tasks}
    return {"row": name, "perplexity": ppl, "seconds": seconds, "accuracy": accuracy,
            "mean_accuracy": statistics.mean(accuracy.values()) if accuracy else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--limit", type=int, default=500, help="items per task (0: no tasks)")
    parser.add_argument("--data-dir", default=None, help="the task files (default: as llm-sparsify finds them)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="/tmp/llm_sparsify_best_table.json")
    args = parser.parse_args()

    path = Path(args.json)
    done = {row["row"]: row for row in json.loads(path.read_text())} if path.exists() else {}
    model, tokenizer = load_model(None, device=args.device)
    calibration = calibration_ids("c4", tokenizer, 64, 512, 0)
    test_ids = evaluation_ids("wikitext2", tokenizer)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    for name in args.rows.split(","):
        if name not in done:
            model.load_state_dict(dense)
            done[name] = measure(name, model, tokenizer, calibration, test_ids, args)
            path.write_text(json.dumps(list(done.values()), indent=1))
            print(json.dumps(done[name]), flush=True)

    print(f"\nWikiText-2 test perplexity (64 windows of 512); lm-eval 0-shot, first {args.limit} items; calibration "
          f"c4 64x512 seed 0; {args.device}, {torch.get_num_threads()} threads\n")
    print("| row | WikiText-2 ppl | " + " | ".join(TASKS) + " | mean acc | pruning time (s) |")
    print("|---|---|" + "---|" * len(TASKS) + "---|---|")
    for name in ROWS:
        if (row := done.get(name)) is not None:
            cells = [f"{row['accuracy'][t]:.3f}" if t in row["accuracy"] else "–" for t in TASKS]
            mean = f"{row['mean_accuracy']:.3f}" if row["mean_accuracy"] is not None else "–"
            print(f"| {name} | {row['perplexity']:.2f} | " + " | ".join(cells) + f" | {mean} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
