"""Fit the budget planner's decode-time model (budget_pass.DECODE_OVERHEAD) to llama.cpp on this machine.

    python eval/decode_cost.py                      # Q4_0 and Q8_0, 2 threads, 5 interleaved rounds

The built-in default cut to several depths and MLP widths (blocks dropped from the end, channels kept by weight norm:
the speed does not depend on which), with the output layer at its own type and at the file's, is exported to GGUF
and timed in llama.cpp (export/speed.py: 64 tokens decoded one at a time, medians over rounds). Decode time per token
is fitted as t = β·(decoder bytes) + β_o·(output layer bytes) + α·layers + γ by least squares (β_o only where the
output layer's type varies: Q4_0); the planner needs α/β, γ/β and β_o/β (in decoder bytes' worth of time), printed as
the DECODE_OVERHEAD entry with each fit's largest relative error. Where γ comes out negative, the fit is made
without it (a negative cost per token would make a smaller model's predicted time absurd).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from llm_sparsify import load_model
from llm_sparsify.budget_pass import file_cost
from llm_sparsify.export.gguf import export_gguf
from llm_sparsify.export.hf import save_checkpoint
from llm_sparsify.export.speed import measure_speed
from llm_sparsify.structure.depth import remove_blocks
from llm_sparsify.structure.resize import remove_mlp_channels

SHAPES = [(0, 1.0), (8, 1.0), (16, 1.0), (0, 0.5), (8, 0.5), (0, 0.25)]  # (blocks dropped, share of channels kept)


def variant(dropped: int, share: float, qtype: str, small_output: bool,
            folder: Path) -> tuple[Path, list[float]]:
    """A GGUF of the cut model, and its decoder bytes, output layer bytes and layer count (the cost model's)."""
    model, tokenizer = load_model(None, dtype=torch.float32)
    layers = model.config.num_hidden_layers
    if dropped:
        remove_blocks(model, list(range(layers - dropped, layers)))
    if share < 1:
        keep = []
        for layer in model.model.layers:
            norms = layer.mlp.down_proj.weight.norm(dim=0)
            kept = int(norms.numel() * share) // 32 * 32
            mask = torch.zeros(norms.numel(), dtype=torch.bool)
            mask[norms.argsort(descending=True)[:kept]] = True
            keep.append(mask)
        remove_mlp_channels(model, keep)
    name = f"{qtype}-d{dropped}-w{share}-{'small' if small_output else 'own'}"
    stages = {"budget": {"qtype": qtype, "small_output": small_output}}
    save_checkpoint(model, tokenizer, folder / name, {"recipe_name": name, "stages": stages})
    cost = file_cost(model, qtype, small_output)
    kept = [c.channels for c in cost.layers]
    path = export_gguf(folder / name, folder / f"{name}.gguf", qtype=qtype)
    return path, [cost.decoder(kept), cost.other_read, len(kept)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qtypes", default="Q4_0,Q8_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llm_sparsify_decode_cost_") as tmp:
        for qtype in args.qtypes.split(","):
            rows = {}
            for dropped, share in SHAPES:
                for small in (False, True) if qtype == "Q4_0" and dropped == 0 and share == 1 else (False,):
                    path, features = variant(dropped, share, qtype, small, Path(tmp))
                    rows[path.name] = (path, features)
            speed = measure_speed({name: path for name, (path, _) in rows.items()}, threads=args.threads,
                                  rounds=args.rounds)
            seconds = torch.tensor([1 / speed[name]["decode_tokens_per_s"] for name in rows], dtype=torch.float64)
            features = torch.tensor([[*f, 1.0] for _, f in rows.values()], dtype=torch.float64)
            varies = features[:, 1].unique().numel() > 1
            columns = [0, 1, 2, 3] if varies else [0, 2, 3]  # one output layer for all: part of the constant
            solution = torch.linalg.lstsq(features[:, columns], seconds[:, None]).solution[:, 0]
            if solution[-1] < 0:  # a negative time per token fits the range measured but not a smaller model: none
                columns = columns[:-1]
                solution = torch.linalg.lstsq(features[:, columns], seconds[:, None]).solution[:, 0]
            fit = dict(zip(columns, solution.tolist(), strict=True))
            beta, beta_output, alpha, gamma = (fit.get(k, 0.0) for k in range(4))
            fitted = features[:, columns] @ solution
            print(f"{qtype}: | file | decoder MiB | output MiB | layers | decode tok/s | fitted tok/s |")
            for (name, (_, f)), value in zip(rows.items(), fitted.tolist(), strict=True):
                print(f"| {name} | {f[0] / 2**20:.1f} | {f[1] / 2**20:.1f} | {f[2]} | "
                      f"{speed[name]['decode_tokens_per_s']:.1f} | {1 / value:.1f} |")
            error = ((fitted - seconds).abs() / seconds).max().item()
            output = beta_output / beta if varies else 1.0
            if not varies:  # the output layer's bytes, at the decoder's rate, out of the constant
                gamma -= beta * next(iter(rows.values()))[1][1]
            print(f'"{qtype}": ({alpha / beta:.4g}, {gamma / beta:.4g}, {output:.3g}),  # largest error {error:.1%}; '
                  f"{1 / beta / 2**30:.2f} GiB/s, {alpha * 1e3:.3f} ms per layer, {gamma * 1e3:.3f} ms per token")


if __name__ == "__main__":
    main()
