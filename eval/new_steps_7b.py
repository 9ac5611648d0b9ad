"""Seconds per decoder layer of issue 15's new steps at a 7B model's shapes: one random-weight decoder layer.

    python eval/new_steps_7b.py                                   # llama-2-7b shapes, 8 x 128 tokens, this CPU
    python eval/new_steps_7b.py --device cuda --nsamples 128 --seqlen 2048 --permute

The layer (and a one-layer model around it, for the embeddings) is built from benchmark_7b.py's preset with random
weights; random token ids go through the embeddings to the layer, as the engine captures them. Each step is timed
on its own, as prune_layers runs it: the Hessians (one forward with hooks, what SparseGPT needs anyway), SparseGPT's
2:4 sweeps (the reference), ADMM with a gradual mask at 50% (best-50's and best-70's masks; prune/admm.py), the lstsq
refit after the sweeps (--no-lstsq skips it: some 500 s on a 2-core CPU), the dense targets (one forward),
block-wise reconstruction (8 Adam steps of 2 samples, the recipes' default), the sensitivity pass's measurements (one
Wanda mask and forward per level) and, with --permute, the input-permutation search of down_proj and o_proj.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llm_sparsify.architecture import decoder_layers
from llm_sparsify.prune import input_permutation
from llm_sparsify.prune.admm import prune_admm
from llm_sparsify.prune.allocation import sensitivity_levels
from llm_sparsify.prune.refit import update_kept
from llm_sparsify.prune.sparsegpt import sparsegpt_sweep
from llm_sparsify.prune.wanda import prune_wanda
from llm_sparsify.recipe import Reconstruction, Sensitivity
from llm_sparsify.reconstruct import reconstruct_layer
from llm_sparsify.walk import capture_layer_inputs, collect_statistics, forward_layer

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_7b import build_config  # noqa: E402

INPUTS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]  # modules that read one input


def timed(times: dict[str, float], name: str, work):
    start = time.perf_counter()
    result = work()
    times[name] = time.perf_counter() - start
    print(f"{name}: {times[name]:.1f} s", flush=True)
    return result


@torch.no_grad()  # as the engine runs; reconstruct_layer turns gradients on for itself
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-2-7b")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--permute", action="store_true", help="also time the permutation search (slow on a CPU)")
    parser.add_argument("--no-lstsq", action="store_true", help="leave out the lstsq refit (the slowest step)")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    config = build_config(args.preset, 1, "float32")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    ids = torch.randint(0, config.vocab_size, (args.nsamples, args.seqlen))
    hidden, kwargs = capture_layer_inputs(model, ids, device, batch_size=2)
    layer = decoder_layers(model)[0].to(device)
    modules = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    times: dict[str, float] = {}

    stats = timed(times, "Hessians (forward with hooks)",
                  lambda: collect_statistics(layer, modules, hidden, kwargs, True, device))
    dense = {name: m.weight.detach().clone() for name, m in modules.items()}

    def sweeps() -> dict[str, torch.Tensor]:
        pruned = {}
        for names in INPUTS:
            out, _ = sparsegpt_sweep([dense[n] for n in names], stats[names[0]].hessian(), (2, 4))
            pruned.update(zip(names, out, strict=True))
        return pruned

    pruned = timed(times, "SparseGPT 2:4 sweeps", sweeps)
    timed(times, "ADMM 50% (20 iterations)",
          lambda: [prune_admm(dense[n], stats[names[0]].hessian(), 0.5) for names in INPUTS for n in names])

    def refit() -> None:
        for names in INPUTS:
            out = update_kept("lstsq", [dense[n] for n in names], [pruned[n] for n in names],
                              stats[names[0]].hessian())
            for n, w in zip(names, out, strict=True):
                modules[n].weight.data.copy_(w)

    if not args.no_lstsq:
        timed(times, "lstsq refit", refit)
    for name, module in modules.items():  # the dense layer, for its targets
        module.weight.data.copy_(dense[name])
    targets = timed(times, "dense targets (forward)",
                    lambda: [forward_layer(layer, h, kw, device) for h, kw in zip(hidden, kwargs, strict=True)])
    for name, module in modules.items():
        module.weight.data.copy_(pruned[name])
    fit = Reconstruction()
    timed(times, f"reconstruction ({fit.steps} steps of {fit.batch_size})",
          lambda: reconstruct_layer(layer, list(modules.values()), hidden, kwargs, targets, device, fit.steps, fit.lr,
                                    fit.batch_size))

    def sensitivity() -> None:
        for level in sensitivity_levels(0.5, Sensitivity.spread, Sensitivity.levels):
            for name, module in modules.items():
                module.weight.data = prune_wanda(dense[name], stats[name].column_norms(), level)
            [forward_layer(layer, h, kw, device) for h, kw in zip(hidden, kwargs, strict=True)]

    timed(times, f"sensitivity ({Sensitivity.levels} levels: mask + forward)", sensitivity)
    if args.permute:
        timed(times, "permutation search (down_proj, o_proj)", lambda: [
            input_permutation("sparsegpt", [dense["mlp.down_proj"]], stats["mlp.down_proj"], (2, 4)),
            input_permutation("sparsegpt", [dense["self_attn.o_proj"]], stats["self_attn.o_proj"], (2, 4),
                              heads=(config.num_attention_heads, config.num_key_value_heads,
                                     config.hidden_size // config.num_attention_heads))])

    print(f"\n{args.preset} shapes, one decoder layer, {args.nsamples} x {args.seqlen} tokens, {device}, "
          f"{torch.get_num_threads()} threads\n")
    print("| step | seconds per layer |\n|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
