"""What the budget planner gains at the edge, in llama.cpp (issue 18): SmolLM2-135M planned for sizes and decode
speeds of its dense Q4_0 GGUF, each with and without distillation recovery.

    python eval/edge_table.py --data-dir ../shared/data              # the README table
    python eval/edge_table.py --budgets size=0.5 --recovery-steps 50 --tasks "" --rounds 3

One run: the dense model's units are measured once (budget_pass.py: the planner's loss per block, MLP width and
output type on 4 calibration windows of the CLI's C4 calibration), then each budget is planned from those
measurements and applied to a copy of the dense model (pipeline.apply_budget_plan, what the `budget:` stage runs),
saved and exported as Q4_0 GGUF; the distilled copy is fine-tuned further (recover.finetune toward the dense model's
top-64 logits on other C4 windows, full fine-tuning, masks none). All files are timed together in llama.cpp
(export/speed.py: interleaved rounds, medians); perplexity is llama.cpp's own on WikiText-2 (16 windows of 512,
eval/deployment.py); accuracy is lm-eval's on the Hugging Face checkpoint each GGUF was written from (before Q4_0
rounding). Prints a markdown table and one JSON line per row.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from deployment import gguf_perplexity  # noqa: E402

from llm_sparsify import load_model  # noqa: E402
from llm_sparsify.checkpoint import resolve_checkpoint  # noqa: E402
from llm_sparsify.data import calibration_ids, evaluation_ids  # noqa: E402
from llm_sparsify.export.gguf import export_gguf  # noqa: E402
from llm_sparsify.export.hf import save_checkpoint  # noqa: E402
from llm_sparsify.export.speed import measure_speed  # noqa: E402
from llm_sparsify.pipeline import apply_budget_plan, measure_budget_units  # noqa: E402
from llm_sparsify.recipe import Budget, Recovery  # noqa: E402
from llm_sparsify.recover import finetune, teacher_logits  # noqa: E402
from llm_sparsify.walk import ResidentLayers  # noqa: E402
from llm_sparsify.zero_shot import evaluate_tasks  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="size=0.7,size=0.5,decode_speedup=1.3,decode_speedup=1.6")
    parser.add_argument("--recovery-steps", type=int, default=200)
    parser.add_argument("--tasks", default="piqa,arc_easy,winogrande")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--data-dir", default=None, help="local task files (offline), as `llm-sparsify eval` takes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 512 for perplexity")
    parser.add_argument("--upgrade", default=None, help="budget.upgrade of every plan (e.g. Q8_0; default: none)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the files here (default: a temporary directory); its units*.pt, the measured "
                             "units, is reused by a later run")
    args = parser.parse_args()

    dense, tokenizer = load_model(None, dtype=torch.float32)
    calibration = calibration_ids("c4", tokenizer, 64, 512, 0)  # the CLI's default calibration on the CPU
    recovery = Recovery(loss="kl", steps=args.recovery_steps)
    training = calibration_ids("c4", tokenizer, recovery.nsamples, recovery.seqlen, 1)  # other windows (seed 1)
    with contextlib.ExitStack() as stack:
        folder = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llm_sparsify_edge_")))
        folder.mkdir(parents=True, exist_ok=True)
        return table(args, dense, tokenizer, calibration, training, recovery, folder)


def table(args, dense, tokenizer, calibration, training, recovery, folder: Path) -> int:
    cached = folder / (f"units-{args.upgrade}.pt" if args.upgrade else "units.pt")
    if cached.exists():
        units = torch.load(cached, weights_only=False)
        print(f"units read from {cached}", file=sys.stderr)
    else:
        start = time.perf_counter()
        units = measure_budget_units(dense, ResidentLayers(dense), Budget(size=0.99, upgrade=args.upgrade),
                                     calibration, "cpu", 8)
        print(f"units measured in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        torch.save(units, cached)
    teacher = teacher_logits(dense, training, recovery.top_k, recovery.batch_size)
    ids = evaluation_ids("wikitext2", tokenizer)
    tasks = [t for t in args.tasks.split(",") if t]

    files = {f"dense {q}": export_gguf(resolve_checkpoint(None), folder / f"dense-{q}.gguf", qtype=q, overwrite=True)
             for q in ("F16", "Q8_0", "Q4_0")}
    checkpoints = {label: resolve_checkpoint(None) for label in files}
    notes: dict[str, dict] = {label: {} for label in files}
    for spec in args.budgets.split(","):
        key, value = spec.split("=")
        budget = Budget(**{key: float(value)}, upgrade=args.upgrade)
        model = copy.deepcopy(dense)
        report = apply_budget_plan(ResidentLayers(model), budget, units)
        for distilled in (False, True):
            label = f"{spec}{' + distillation' if distilled else ''}"
            note = {"plan": {k: report[k] for k in ("removed", "kept", "small_output", "upgraded", "predicted")}}
            if distilled:
                begin = time.perf_counter()
                losses = finetune(model, training, recovery.steps, recovery.lr, recovery.batch_size, masks={},
                                  teacher=teacher)
                note["distillation"] = {"steps": recovery.steps, "tokens": recovery.steps * recovery.batch_size
                                        * recovery.seqlen, "seconds": round(time.perf_counter() - begin, 1),
                                        "kl_first": round(losses[0], 4),
                                        "kl_last": round(statistics.mean(losses[-10:]), 4)}
            path = folder / label.replace(" ", "_").replace("+", "")
            save_checkpoint(model, tokenizer, path, {"recipe_name": label, "stages": {"budget": report}},
                            overwrite=True)
            files[label] = export_gguf(path, folder / f"{path.name}.gguf", qtype="Q4_0", overwrite=True)
            checkpoints[label], notes[label] = path, note
    speed = measure_speed(files, threads=args.threads, rounds=args.rounds)
    rows = {}
    for label, path in files.items():
        rows[label] = {**speed[label], "perplexity": gguf_perplexity(path, ids, 512, args.windows, args.threads),
                       **notes[label]}
        print(json.dumps({"model": label, **rows[label]}), file=sys.stderr, flush=True)
    for label, row in rows.items() if tasks else ():
        model, _ = load_model(str(checkpoints[label]), dtype=torch.float32)
        accuracy = evaluate_tasks(model, tokenizer, tasks, limit=args.limit, data_dir=args.data_dir, device="cpu")
        row["tasks"] = {t: round(accuracy[t]["acc"], 4) for t in tasks}
        row["mean_accuracy"] = round(statistics.mean(row["tasks"].values()), 4)
        print(json.dumps({"model": label, "tasks": row["tasks"]}), file=sys.stderr, flush=True)

    reference = rows["dense Q4_0"]
    print(f"| model (Q4_0 unless named) | MiB | vs dense Q4_0 | decode tok/s | vs dense Q4_0 | prefill tok/s | "
          f"WikiText-2 ppl ({args.windows} × 512) | vs dense Q4_0 | mean acc ({', '.join(tasks)}) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['bytes'] / 2**20:.1f} | {row['bytes'] / reference['bytes']:.2f} | "
              f"{row['decode_tokens_per_s']:.1f} | "
              f"{row['decode_tokens_per_s'] / reference['decode_tokens_per_s']:.2f}× | "
              f"{row['prefill_tokens_per_s']:.0f} | {row['perplexity']:.2f} | "
              f"{row['perplexity'] / reference['perplexity']:.2f}× | {row.get('mean_accuracy', '–')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
