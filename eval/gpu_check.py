"""The GPU check: one command, under 8 minutes on an H100/H200, that prints a markdown table for README.md.

    python eval/gpu_check.py --out gpu_check.md      # on a CUDA machine
    python eval/gpu_check.py --dry-run               # on the CPU, tiny shapes, seconds (CI runs this)

Sections (each one timed; one that fails or runs out of --budget-s is listed under "Not run", with the reason):
1. correctness: a random-weight model with SmolLM2-135M's shapes, pruned in memory with Wanda 50%, SparseGPT 2:4 and
   joint SparseGPT 50% + GPTQ int4 g128 on the GPU in bf16 and in fp32, against the same machine's CPU fp32 run: share
   of equal mask bits, relative difference of every decoder layer's output (the worst layer) and of the loss on
   held-out tokens, both pruned models evaluated the same way (fp32, on the GPU). The same for a small random Mixtral
   (8 experts, top-2; masks over every decoder weight, the experts' fused ones included), Wanda 50% and SparseGPT 2:4.
2. speed and memory: the 7B-shaped random checkpoint of benchmark_7b.py (4 of its 32 layers) pruned from disk to disk
   by `llm-sparsify prune` at the papers' 128 x 2048 calibration: seconds per layer, peak GPU memory, peak host RSS,
   and the time for all 32 layers extrapolated from the mean per layer.
3. 2:4 inference: a Llama-7B-shaped MLP and attention projection, 2:4-pruned, through PyTorch's semi-structured
   sparse tensors against dense bf16, at batch 1 and 16 (and torchao's int4 + 2:4 path, if torchao is installed).

On the device machine (no network; it lacks greenlet, which the engine needs; gguf, lm_eval, datasets and
compressed-tensors are not needed here), from the repository root here:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl greenlet==3.2.4

then the device tool's `run` with carry [".whl"], timeout_s 540 and the command
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
    PYTHONUNBUFFERED=1 python3 eval/gpu_check.py --out $OUT/gpu_check.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the code checked is this checkout's, installed or not

import benchmark_7b as bench  # noqa: E402  (beside this file)

from llm_sparsify import compress  # noqa: E402
from llm_sparsify.architecture import decoder_layers  # noqa: E402
from llm_sparsify.prune.masks import nm_mask  # noqa: E402
from llm_sparsify.targets import layer_weights  # noqa: E402

# HuggingFaceTB/SmolLM2-135M-Instruct's config.json
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True)
RECIPES = {"wanda-50": "Wanda 50%", "sparsegpt-2of4": "SparseGPT 2:4", "sparsegpt-50-w4g128": "SparseGPT 50% + GPTQ w4"}
# A small Mixtral: every layer's MLP 8 experts, top-2 routing (the dry run shrinks it to TINY's sizes)
MOE = dict(SMOLLM2, num_hidden_layers=4, intermediate_size=768, num_local_experts=8, num_experts_per_tok=2)
MOE_RECIPES = ["wanda-50", "sparsegpt-2of4"]
SPEED_RECIPES = ["wanda-50", "sparsegpt-50"]


class Report:
    """The markdown report, rewritten to `path` after every section so a run cut short still leaves its figures."""

    def __init__(self, path: Path | None, title: str) -> None:
        self.path, self.parts, self.not_run = path, [title], []

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.write()

    def skip(self, what: str, why: str) -> None:
        self.not_run.append(f"- {what}: {why}")
        self.write()

    def text(self) -> str:
        return "\n\n".join(self.parts + ["**Not run**\n\n" + ("\n".join(self.not_run) or "- nothing")]) + "\n"

    def write(self) -> None:
        if self.path is not None:
            self.path.write_text(self.text())


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


# ---------------------------------------------------------------- 1. correctness against the CPU

def random_model(shapes: dict, seed: int) -> LlamaForCausalLM | MixtralForCausalLM:
    torch.manual_seed(seed)
    if "num_local_experts" in shapes:
        return MixtralForCausalLM(MixtralConfig(**shapes, initializer_range=0.02)).eval()
    return LlamaForCausalLM(LlamaConfig(**shapes, initializer_range=0.02)).eval()


def masks(model: LlamaForCausalLM) -> list[torch.Tensor]:
    """The zeros of every decoder weight of two or more dimensions (Linear or fused experts)."""
    return [w.detach().cpu() == 0 for layer in decoder_layers(model) for w in layer_weights(layer).values()]


@torch.no_grad()
def outputs(model: LlamaForCausalLM, ids: torch.Tensor, device: str) -> tuple[list[torch.Tensor], float]:
    """Every decoder layer's output and the loss on `ids`, in fp32 on `device` (the model is moved there)."""
    model.to(device, torch.float32)
    result = model(ids.to(device), labels=ids.to(device), output_hidden_states=True)
    hidden = [h.float().cpu() for h in result.hidden_states[1:]]
    model.to("cpu")
    return hidden, float(result.loss)


def compare(pruned: LlamaForCausalLM, reference: dict, ids: torch.Tensor, device: str) -> dict:
    """Mask agreement, worst relative layer-output difference and relative loss difference against the reference."""
    same = sum(int((a == b).sum()) for a, b in zip(masks(pruned), reference["masks"], strict=True))
    total = sum(m.numel() for m in reference["masks"])
    hidden, loss = outputs(pruned, ids, device)
    layer_diff = max(float((h - r).norm() / r.norm()) for h, r in zip(hidden, reference["hidden"], strict=True))
    return {"equal_mask_bits": same / total, "layer_output_rel_diff": layer_diff,
            "loss": loss, "loss_rel_diff": abs(loss - reference["loss"]) / reference["loss"]}


def correctness(args: argparse.Namespace, report: Report) -> None:
    moe = dict(TINY, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2) if args.dry_run else MOE
    nsamples, seqlen = (8, 32) if args.dry_run else (32, 256)
    name = "tiny Llama" if args.dry_run else "random SmolLM2-135M shapes (30 layers)"
    moe_name = "tiny Mixtral" if args.dry_run else "random Mixtral, SmolLM2's widths, 4 layers of 8 experts"
    eval_device = args.device if torch.device(args.device).type == "cuda" else "cpu"
    for shapes, recipes, title in [(TINY if args.dry_run else SMOLLM2, list(RECIPES), name),
                                   (moe, MOE_RECIPES, moe_name)]:
        dense = random_model(shapes, args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        calibration = torch.randint(0, shapes["vocab_size"], (nsamples, seqlen), generator=generator)
        held_out = torch.randint(0, shapes["vocab_size"], (4, seqlen), generator=generator)
        rows = []
        for recipe in recipes:
            start = time.perf_counter()
            reference_model = compress(copy.deepcopy(dense), recipe, calibration, device="cpu")
            cpu_s = time.perf_counter() - start
            hidden, loss = outputs(reference_model, held_out, eval_device)
            reference = {"masks": masks(reference_model), "hidden": hidden, "loss": loss}
            del reference_model
            for dtype in (torch.bfloat16, torch.float32):
                start = time.perf_counter()
                pruned = compress(copy.deepcopy(dense).to(dtype), recipe, calibration, device=args.device)
                seconds = time.perf_counter() - start
                result = compare(pruned, reference, held_out, eval_device)
                rows.append([RECIPES[recipe], str(dtype).removeprefix("torch."), f"{result['equal_mask_bits']:.4%}",
                             f"{result['layer_output_rel_diff']:.2e}", f"{reference['loss']:.4f}",
                             f"{result['loss']:.4f}", f"{result['loss_rel_diff']:.2e}", f"{seconds:.1f} / {cpu_s:.1f}"])
                print(json.dumps({"section": "correctness", "model": title, "recipe": recipe, "dtype": str(dtype),
                                  **result}), flush=True)
        report.add(f"**Correctness on {args.device} against the CPU in fp32** ({title}; calibration {nsamples} x "
                   f"{seqlen} random tokens, held-out 4 x {seqlen}; outputs of both evaluated in fp32 on {eval_device})"
                   "\n\n" + table(["method", "dtype", "equal mask bits", "worst layer output rel. diff", "CPU loss",
                                    "loss", "loss rel. diff", f"s ({args.device} / cpu)"], rows))


# ---------------------------------------------------------------- 2. speed and memory, disk to disk

def speed(args: argparse.Namespace, report: Report) -> None:
    preset, layers = ("tiny", 2) if args.dry_run else ("llama-2-7b", args.layers)
    nsamples, seqlen = (4, 64) if args.dry_run else (128, 2048)
    workdir = args.workdir / "bench"
    model_dir, info = bench.ensure_model(workdir, preset, layers, "bfloat16", args.seed)
    calibration = bench.ensure_calibration(workdir, bench.PRESETS[preset][1]["vocab_size"], nsamples, seqlen,
                                           args.seed)
    options = argparse.Namespace(workdir=workdir, device=args.device, prune_dtype=None, nsamples=nsamples,
                                 seqlen=seqlen, load_check=False)
    full = bench.PRESETS[preset][1]["num_hidden_layers"]
    rows = []
    for recipe in SPEED_RECIPES:
        row = bench.benchmark_recipe(options, recipe, model_dir, info, calibration)
        print(json.dumps({"section": "speed", **row}), flush=True)
        if row["exit_code"] != 0:
            report.skip(f"speed, {recipe}", f"llm-sparsify exited with {row['exit_code']}: {row.get('error')}")
            continue
        per_layer = row["per_layer_s"]
        extrapolated = row["prune_s"] + (full - layers) * per_layer["mean"]
        rows.append([recipe, f"{per_layer['mean']} / {per_layer['max']}", row["peak_device_gib"] or "—",
                     row["peak_rss_gib"], row["wall_s"], f"{extrapolated / 60:.1f} min", row["sparsity"],
                     "pass" if row["checks_passed"] else "FAIL"])
    report.add(f"**Speed and memory, disk to disk** ({preset} shapes, {layers} of {full} layers, bf16 checkpoint, "
               f"calibration {nsamples} x {seqlen}, `llm-sparsify prune --device {args.device}`)\n\n"
               + table(["recipe", "s per layer (mean / max)", "peak GPU GiB", "peak RSS GiB", "wall s",
                        f"all {full} layers (extrapolated)", "sparsity", "checks"], rows))


# ---------------------------------------------------------------- 3. 2:4 inference through PyTorch's kernels

def timed(call: Callable[[], torch.Tensor], device: str, repeats: int) -> float:
    """Median milliseconds per call, after warm-up calls."""
    for _ in range(max(3, repeats // 5)):
        call()
    cuda = torch.device(device).type == "cuda"
    times = []
    for _ in range(repeats):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4 pruning of a weight (the pattern the sparse kernels need)."""
    return weight.masked_fill(nm_mask(weight.abs().float(), 2, 4), 0)


def semi_structured(args: argparse.Namespace, report: Report) -> None:
    hidden, inner = (64, 128) if args.dry_run else (4096, 11008)  # Llama-2-7B
    device, dtype = args.device, torch.float32 if args.dry_run else torch.bfloat16
    repeats = 20 if args.dry_run else 100
    generator = torch.Generator().manual_seed(args.seed)

    def weight(rows: int, cols: int) -> torch.Tensor:
        return two_four(torch.randn(rows, cols, generator=generator) * 0.02).to(device, dtype)

    gate, up, down, proj = weight(inner, hidden), weight(inner, hidden), weight(hidden, inner), weight(hidden, hidden)

    def mlp(g, u, d):  # weights, or modules (torchao's)
        project = (lambda x, w: w(x)) if isinstance(g, torch.nn.Module) else F.linear
        return lambda x: project(F.silu(project(x, g)) * project(x, u), d)

    dense = {"MLP": mlp(gate, up, down), "attention projection": lambda x: F.linear(x, proj)}
    sparse, why = None, None
    if torch.device(device).type != "cuda":
        why = "semi-structured sparse kernels need a CUDA GPU"
    else:
        try:
            from torch.sparse import to_sparse_semi_structured

            g, u, d, p = (to_sparse_semi_structured(w) for w in (gate, up, down, proj))
            sparse = {"MLP": mlp(g, u, d), "attention projection": lambda x: F.linear(x, p)}
        except Exception as error:  # an older GPU, a build without cuSPARSELt/CUTLASS kernels, ...
            why = f"to_sparse_semi_structured failed: {type(error).__name__}: {error}"
    if why:
        report.skip("2:4 semi-structured kernels", why)
    rows, dense_times = [], {}
    with torch.no_grad():
        for batch in (1, 16):
            x = torch.randn(batch, hidden, generator=generator).to(device, dtype)
            for name, call in dense.items():
                dense_ms = dense_times[name, batch] = timed(lambda call=call, x=x: call(x), device, repeats)
                sparse_ms, error = None, None
                if sparse is not None:
                    try:
                        out, ref = sparse[name](x), call(x)
                        error = float((out.float() - ref.float()).norm() / ref.float().norm())
                        sparse_ms = timed(lambda name=name, x=x: sparse[name](x), device, repeats)
                    except Exception as failure:
                        report.skip(f"2:4 {name} at batch {batch}", f"{type(failure).__name__}: {failure}")
                rows.append([name, batch, f"{dense_ms:.4f}", "—" if sparse_ms is None else f"{sparse_ms:.4f}",
                             "—" if sparse_ms is None else f"{dense_ms / sparse_ms:.2f}x",
                             "—" if error is None else f"{error:.1e}"])
        row = torchao_int4_two_four(args, report, mlp, [gate, up, down], x, dense_times["MLP", 16], repeats)
        rows += [row] if row else []
    shapes = "tiny shapes" if args.dry_run else "Llama-2-7B shapes"
    report.add(f"**2:4 inference** ({shapes}: MLP {hidden}→{inner}→{hidden}, projection {hidden}x{hidden}; "
               f"{str(dtype).removeprefix('torch.')}, median of {repeats} calls)\n\n"
               + table(["block", "batch", "dense ms", "2:4 ms", "speed-up", "rel. diff of output"], rows))


def torchao_int4_two_four(args: argparse.Namespace, report: Report, mlp: Callable, weights: list[torch.Tensor],
                          x: torch.Tensor, dense_ms: float, repeats: int) -> list | None:
    """torchao's int4 weights with 2:4 sparsity (Marlin kernels) on the same MLP at batch 16, where torchao imports."""
    try:
        from torchao.dtypes import MarlinSparseLayout
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except ImportError as error:
        report.skip("torchao int4 + 2:4", f"torchao is not importable here ({error})")
        return None
    if torch.device(args.device).type != "cuda":
        report.skip("torchao int4 + 2:4", "Marlin kernels need a CUDA GPU")
        return None
    try:
        linears = [torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=torch.float16)
                   for w in weights]
        for linear, w in zip(linears, weights, strict=True):
            linear.weight.data.copy_(w)
            quantize_(linear, Int4WeightOnlyConfig(layout=MarlinSparseLayout()))
        call = mlp(*linears)
        x = x.half()
        sparse_ms = timed(lambda: call(x), args.device, repeats)
    except Exception as error:  # the API moves between torchao releases
        report.skip("torchao int4 + 2:4", f"{type(error).__name__}: {error}")
        return None
    return ["MLP, torchao int4 + 2:4 (fp16 in)", x.shape[0], f"{dense_ms:.4f}", f"{sparse_ms:.4f}",
            f"{dense_ms / sparse_ms:.2f}x", "—"]


# ---------------------------------------------------------------- the run

def machine(device: str) -> str:
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor() or "CPU"
    return (f"{name}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, seconds (what CI runs)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --dry-run")
    parser.add_argument("--layers", type=int, default=4, help="7B layers for the speed section (default: 4)")
    parser.add_argument("--sections", default="correctness,speed,semi_structured",
                        help="comma-separated sections to run (default: all)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no section after this many seconds (default: 450)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="models and outputs (default: a temporary dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = {"correctness": correctness, "speed": speed, "semi_structured": semi_structured}
    unknown = set(args.sections.split(",")) - set(sections)
    if unknown:
        print(f"gpu_check: unknown sections {sorted(unknown)}; choose from {sorted(sections)}", file=sys.stderr)
        return 2
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --dry-run on the CPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report = Report(args.out, f"GPU check, {datetime.date.today().isoformat()}, {machine(args.device)}"
                    + (" — DRY RUN, tiny shapes: not figures to report" if args.dry_run else ""))
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        args.workdir = args.workdir or Path(tmp)
        for name, section in sections.items():
            if name not in args.sections.split(","):
                continue
            elapsed = time.perf_counter() - start
            if elapsed > args.budget_s:
                report.skip(name, f"time budget: {elapsed:.0f} s spent of --budget-s {args.budget_s:.0f}")
                continue
            section_start = time.perf_counter()
            try:
                section(args, report)
            except Exception as error:
                traceback.print_exc()
                report.skip(name, f"{type(error).__name__}: {error}")
            print(f"{name}: {time.perf_counter() - section_start:.1f} s", flush=True)
    report.add(f"Total {math.ceil(time.perf_counter() - start)} s. Command: `python eval/gpu_check.py"
               + (" --dry-run" if args.dry_run else "") + "`")
    print(report.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
