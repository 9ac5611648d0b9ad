"""Benchmark `llm-sparsify prune` at real 7B-70B (and Mixtral-8x7B) shapes on a random-weight sharded checkpoint.

    python eval/benchmark_7b.py --layers 2                         # llama-2-7b shapes, 2 decoder layers, wanda-50
    python eval/benchmark_7b.py --preset mistral-7b --layers 2 --recipes wanda-50,sparsegpt-50
    python eval/benchmark_7b.py --preset mixtral-8x7b --layers 4 --recipes wanda-50,sparsegpt-50 --prune-dtype bfloat16
    python eval/benchmark_7b.py --generate-only                    # just build the full 32-layer llama-2-7b
    python eval/benchmark_7b.py --device cuda --recipes wanda-50,sparsegpt-50 --nsamples 128 --seqlen 2048
    python eval/benchmark_7b.py --tiny --load-check                # hidden small preset for development
    python eval/benchmark_7b.py --preset tiny-moe --load-check     # hidden small Mixtral-layout preset

Steps:
1. Build a checkpoint with the exact parameter shapes of the preset (random normal(0, 0.02) weights,
   norm weights one) one decoder layer at a time, never the whole model in memory: one safetensors shard
   per decoder layer plus one for embeddings/final norm/lm_head, `model.safetensors.index.json` and
   `config.json`. Tensor names and shapes are those save_pretrained writes (llm_sparsify.checkpoint_layout on a
   meta-device model): for Mixtral each layer's experts as block_sparse_moe.experts.<e>.w1/w2/w3 plus the router
   block_sparse_moe.gate, as real Mixtral checkpoints hold them, not transformers 5's fused in-memory parameters.
   It goes to a temporary directory renamed into place when complete, and is reused when the same
   preset/layers/dtype/seed is already there (marker file `bench_model.json`). Random calibration
   token ids [nsamples, seqlen] are saved as a .pt LongTensor beside it. No tokenizer is written: a random
   model has none, and `llm-sparsify prune` needs none with .pt calibration.
2. Run `llm-sparsify prune MODEL --recipe R --calibration ids.pt --output OUT --overwrite --device DEV` as a
   subprocess per recipe (`python -m llm_sparsify.cli` with this checkout first on PYTHONPATH, so the code
   measured is the code here): wall time and the child's own peak RSS (os.wait4), seconds per layer, peak
   device memory (`peak_device_gib`, if the record has it) and the share of zeros over all decoder-layer weights
   (`decoder_sparsity`, router and any untargeted weight included) from OUT/llm_sparsify.json.
3. Verify OUT tensor by tensor with safetensors.safe_open (never the whole model): targeted decoder-layer
   Linear weights (MoE experts' w1/w2/w3 included) meet the recipe's sparsity (per row for Wanda), kept weights
   are unchanged for methods without weight updates, every other tensor (router, norms, embeddings) equals the
   input, the record's decoder sparsity equals the one counted on OUT, and the weight map covers every tensor
   of the model built from OUT's config on the meta device. `--load-check` also loads OUT with
   from_pretrained and runs one short forward pass (needs RAM for the whole model).
4. Print a table and one JSON line per recipe.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig

from llm_sparsify.checkpoint_layout import checkpoint_layout

PRESETS = {
    "llama-2-7b": (LlamaConfig, dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)),
    # mistralai/Mistral-7B-v0.1's config.json: rope_theta 10000 and sliding_window 4096 (v0.2+ has 1e6 and null).
    "mistral-7b": (MistralConfig, dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, rope_theta=10000.0, sliding_window=4096,
        max_position_embeddings=32768, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)),
    "llama-3-8b": (LlamaConfig, dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
        rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)),
    "llama-2-70b": (LlamaConfig, dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)),
    # mistralai/Mixtral-8x7B-v0.1's config.json: 8 experts of Mistral-7B's MLP shape, top-2 routing.
    "mixtral-8x7b": (MixtralConfig, dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
        sliding_window=None, max_position_embeddings=32768, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)),
    # Hidden development presets: not real shapes, never for reported figures.
    "tiny": (LlamaConfig, dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=1000, rope_theta=10000.0, max_position_embeddings=2048,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)),
    "tiny-moe": (MixtralConfig, dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=1000, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6,
        sliding_window=None, max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)),
}
HIDDEN_PRESETS = {"tiny", "tiny-moe"}
PUBLIC_PRESETS = [name for name in PRESETS if name not in HIDDEN_PRESETS]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ATTENTION_TENSORS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
NORM_TENSORS = ["input_layernorm", "post_attention_layernorm"]
LAYER_TENSORS = [*ATTENTION_TENSORS, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", *NORM_TENSORS]  # dense layer
ROUTER = "block_sparse_moe.gate"  # Mixtral's router on disk: a [experts, hidden] weight, never pruned
EXPERT_TENSORS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # on disk -> llm_sparsify's module name
EXPERT_ON_DISK = re.compile(r"(?P<layer>.*\.layers\.\d+)\.block_sparse_moe\.experts\.(?P<e>\d+)\.(?P<w>w[123])")
TARGET_MODULE = re.compile(r".*\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)")
STEM_TENSORS = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
REPO = Path(__file__).resolve().parents[1]
MARKER, INDEX, RECORD = "bench_model.json", "model.safetensors.index.json", "llm_sparsify.json"
NO_UPDATE_METHODS = {"wanda", "magnitude"}  # methods that only zero weights, never change the kept ones


# ---------------------------------------------------------------- 1. the random checkpoint

def build_config(preset: str, layers: int | None, dtype: str):
    config_class, kwargs = PRESETS[preset]
    kwargs = dict(kwargs, tie_word_embeddings=False, initializer_range=0.02, hidden_act="silu")
    if layers:
        kwargs["num_hidden_layers"] = layers
    config = config_class(**kwargs)
    config.dtype = dtype  # saved as "dtype" in config.json, what from_pretrained(dtype="auto") reads
    return config


def layer_parts(config) -> set[str]:
    """The tensors one decoder layer holds on disk (without `.weight`), as this script expects them: a dense layer,
    or a Mixtral layer with its router and num_local_experts experts of w1 (gate), w3 (up) and w2 (down)."""
    experts = getattr(config, "num_local_experts", None)
    if not experts:
        return set(LAYER_TENSORS)
    return {*ATTENTION_TENSORS, *NORM_TENSORS, ROUTER} | {
        f"block_sparse_moe.experts.{e}.{w}" for e in range(experts) for w in EXPERT_TENSORS}


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the model the config describes as a checkpoint holds it on disk: the
    meta-device model's state dict under the names and shapes save_pretrained writes (checkpoint_layout; for
    Mixtral the fused in-memory experts split into block_sparse_moe.experts.<e>.w1/w2/w3, for Llama the same names).

    Checked against the names this script expects (the same set in every decoder layer), so a transformers change
    fails here, not later.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in checkpoint_layout(model, model.state_dict()).items()}
    prefix = "model.layers."
    layers: dict[int, set[str]] = {}
    for name in shapes:
        if name.startswith(prefix):
            index, part = name.removeprefix(prefix).split(".", 1)
            layers.setdefault(int(index), set()).add(part)
    stem = {name for name in shapes if not name.startswith(prefix)}
    expected = {f"{part}.weight" for part in layer_parts(config)}
    problems = []
    if stem != set(STEM_TENSORS):
        problems.append(f"non-layer tensors {sorted(stem)} != {STEM_TENSORS}")
    if sorted(layers) != list(range(config.num_hidden_layers)):
        problems.append(f"layer indices {sorted(layers)[:5]}... for {config.num_hidden_layers} layers")
    if layers.get(0) != expected:
        got = layers.get(0, set())
        problems.append(f"layer 0: extra {sorted(got - expected)[:5]}, missing {sorted(expected - got)[:5]}")
    if any(parts != layers.get(0) for parts in layers.values()):
        problems.append("decoder layers hold different tensor names")
    if problems:
        raise SystemExit(f"{type(model).__name__} checkpoint tensors differ from the expected names: "
                         + "; ".join(problems))
    return shapes


def shard_plan(names: list[str] | set[str], num_layers: int) -> list[list[str]]:
    """Tensor names per shard: embeddings/final norm/lm_head first, then one shard per decoder layer holding all of
    that layer's tensors (derived from the names, so a MoE layer's experts and router go with it)."""
    plan: list[list[str]] = [list(STEM_TENSORS)] + [[] for _ in range(num_layers)]
    for name in sorted(names):
        if name.startswith("model.layers."):
            plan[1 + int(name.split(".")[2])].append(name)
    assert sum(map(len, plan)) == len(set(names)), "a tensor outside the stem and the decoder layers"
    return plan


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Norm weights (the only 1-D parameters here) are ones; matrices are normal(0, 0.02)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=generator)


def write_checkpoint(directory: Path, config, dtype: torch.dtype, seed: int) -> int:
    """Write config, shards and index into `directory`, one shard in memory at a time; return total bytes."""
    shapes = parameter_shapes(config)
    plan = shard_plan(shapes, config.num_hidden_layers)
    weight_map, total = {}, 0
    for index, names in enumerate(plan):
        generator = torch.Generator().manual_seed(seed * 100_003 + index)  # layer i's weights never depend on N
        tensors = {name: random_tensor(shapes[name], dtype, generator) for name in names}
        filename = f"model-{index + 1:05d}-of-{len(plan):05d}.safetensors"
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, filename))
        del tensors
        print(f"  shard {index + 1}/{len(plan)} written", end="\r", flush=True)
    print()
    index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index_json, indent=2) + "\n")
    config.save_pretrained(directory)
    return total


def ensure_model(workdir: Path, preset: str, layers: int | None, dtype: str, seed: int) -> tuple[Path, dict]:
    """The random checkpoint for these settings: reused if complete, else generated atomically."""
    config = build_config(preset, layers, dtype)
    key = {"preset": preset, "layers": config.num_hidden_layers, "dtype": dtype, "seed": seed}
    name = f"{preset}-L{config.num_hidden_layers}-{dtype}-s{seed}"
    path = workdir / name
    marker = path / MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
        if {k: info.get(k) for k in key} == key:
            print(f"reusing {path} (generated in {info['generate_s']} s, {info['bytes'] / 2**30:.2f} GiB)")
            return path, dict(info, reused=True)
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=workdir))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is an ordinary directory
    print(f"generating {name} in {tmp}")
    start = time.perf_counter()
    try:
        total = write_checkpoint(tmp, config, DTYPES[dtype], seed)
        info = dict(key, bytes=total, generate_s=round(time.perf_counter() - start, 1))
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    print(f"generated {path}: {total / 2**30:.2f} GiB in {info['generate_s']} s")
    return path, dict(info, reused=False)


def ensure_calibration(workdir: Path, vocab: int, nsamples: int, seqlen: int, seed: int) -> Path:
    """Seeded uniform random token ids [nsamples, seqlen] saved as a LongTensor (.pt)."""
    path = workdir / f"calibration-v{vocab}-{nsamples}x{seqlen}-s{seed}.pt"
    if not path.exists():
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (nsamples, seqlen), generator=generator, dtype=torch.long)
        tmp = path.with_suffix(".partial")
        torch.save(ids, tmp)
        tmp.rename(path)
    return path


# ---------------------------------------------------------------- 2. the prune run

def prune_command(model_dir: Path, recipe: str, calibration: Path, output: Path, device: str,
                  prune_dtype: str | None) -> list[str]:
    """`llm-sparsify prune ...`, run as `python -m llm_sparsify.cli` from this checkout (see child_env)."""
    cmd = [sys.executable, "-m", "llm_sparsify.cli", "prune", str(model_dir), "--recipe", recipe,
           "--calibration", str(calibration), "--output", str(output), "--overwrite", "--device", device]
    return cmd + (["--dtype", prune_dtype] if prune_dtype else [])


def child_env() -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH, so the code measured is the code here
    (not whatever an installed `llm-sparsify` script points at)."""
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


# Runs the command in a grandchild and prints its peak RSS. Linux counts in a process's peak the peak of the process it
# was forked from: a child forked straight from this script (which maps whole checkpoints while verifying) would report
# this script's peak. This launcher is small when it forks, so the peak it reports is the command's own.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(f"peak RSS KiB {usage.ru_maxrss}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(cmd: list[str], log_path: Path) -> tuple[int, float, float]:
    """Run `cmd` with output to `log_path`; return (exit code, wall seconds, the command's own peak RSS in GiB)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], stdout=log, stderr=subprocess.STDOUT,
                              env=child_env()).returncode
        wall = time.perf_counter() - start
    peak = re.findall(r"peak RSS KiB (\d+)", log_path.read_text())
    return code, wall, int(peak[-1]) / 2**20 if peak else float("nan")


# ---------------------------------------------------------------- 3. verification, tensor by tensor

def shard_map(directory: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index if the checkpoint is sharded, else from model.safetensors."""
    index = directory / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single)


def module_name(name: str) -> str:
    """The module a tensor on disk belongs to, as llm_sparsify names it (what recipe globs match): a Mixtral
    expert's block_sparse_moe.experts.<e>.w1/w3/w2 is model.layers.<i>.mlp.experts.<e>.gate_proj/up_proj/down_proj;
    any other name loses `.weight`."""
    module = name.removesuffix(".weight")
    expert = EXPERT_ON_DISK.fullmatch(module)
    if expert:
        return f"{expert['layer']}.mlp.experts.{expert['e']}.{EXPERT_TENSORS[expert['w']]}"
    return module


def is_target(name: str, recipe: dict) -> bool:
    """Whether the recipe pruned this tensor: a decoder-layer Linear weight (attention and MLP projections, or each
    MoE expert's gate/up/down projection; never the router or norms) whose module matches targets, not ignore."""
    if not name.endswith(".weight"):
        return False
    module = module_name(name)
    if not TARGET_MODULE.fullmatch(module):
        return False

    def matches(globs: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(module, glob) for glob in globs)

    return matches(recipe.get("targets") or ["*"]) and not matches(recipe.get("ignore") or [])


def meets_pattern(weight: torch.Tensor, recipe: dict) -> bool:
    """Zeros as the recipe promises: N:M per group, per row for Wanda, else per matrix (rounding allowed)."""
    zeros = weight == 0
    sparsity = recipe["sparsity"]
    if isinstance(sparsity, str) and ":" in sparsity:
        n, m = (int(x) for x in sparsity.split(":"))
        return bool((zeros.reshape(weight.shape[0], -1, m).sum(-1) >= m - n).all())
    fraction = float(str(sparsity).rstrip("%")) / (100 if str(sparsity).endswith("%") else 1)
    rows, cols = weight.shape
    if recipe["method"] == "wanda":
        return bool((zeros.sum(1) >= int(cols * fraction)).all())
    return int(zeros.sum()) >= int(weight.numel() * fraction) - max(rows, cols)  # rounding per row or block


def verify_output(output: Path, model_dir: Path, recipe: dict) -> dict:
    """Check OUT against the input tensor by tensor; return the checks and the measured sparsity."""
    checks: dict[str, bool] = {}
    source, result = shard_map(model_dir), shard_map(output)
    out_config, in_config = AutoConfig.from_pretrained(output), AutoConfig.from_pretrained(model_dir)
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"]
    keys += [key for key in ("num_local_experts", "num_experts_per_tok") if hasattr(in_config, key)]
    checks["config_matches"] = out_config.model_type == in_config.model_type and all(
        getattr(out_config, key, None) == getattr(in_config, key) for key in keys)
    checks["weight_map_covers_model"] = set(parameter_shapes(out_config)) == set(result) == set(source)
    zeros, total, dtypes = 0, 0, set()
    decoder_zeros = decoder_total = 0  # over every decoder-layer weight of two or more dimensions (router too)
    pattern_ok = kept_ok = untouched_ok = shapes_ok = True
    keep_check = recipe["method"] in NO_UPDATE_METHODS and recipe.get("update", "none") == "none" and not (
        recipe.get("permute") or recipe.get("reconstruction"))  # those move kept weights (or reorder them)
    with contextlib.ExitStack() as stack:  # safetensors files are memory-mapped: open all, read one tensor at a time
        files = {path: stack.enter_context(safe_open(str(path), "pt"))
                 for path in set(source.values()) | set(result.values())}
        for name in sorted(set(result) & set(source)):
            out = files[result[name]].get_tensor(name)
            ref = files[source[name]].get_tensor(name).to(out.dtype)  # widening (bf16 -> fp32) is exact
            dtypes.add(str(out.dtype).removeprefix("torch."))
            if name.startswith("model.layers.") and out.dim() >= 2:
                decoder_zeros += int((out == 0).sum())
                decoder_total += out.numel()
            if out.shape != ref.shape:
                shapes_ok = False
            elif is_target(name, recipe):
                zeros += int((out == 0).sum())
                total += out.numel()
                pattern_ok &= meets_pattern(out, recipe)
                if keep_check:
                    kept_ok &= torch.equal(torch.where(out == 0, 0, ref), out)
            else:
                untouched_ok &= torch.equal(out, ref)
    checks.update(shapes_match=shapes_ok, sparsity_pattern=pattern_ok and total > 0, untouched_identical=untouched_ok)
    if keep_check:
        checks["kept_weights_unchanged"] = kept_ok
    return {"checks": checks, "sparsity": zeros / total if total else None, "output_dtype": ",".join(sorted(dtypes)),
            "decoder_sparsity": decoder_zeros / decoder_total if decoder_total else None}


def ordered_subset(out: torch.Tensor, ref: torch.Tensor, dim: int) -> bool:
    """Whether the rows (dim 0) or columns (dim 1) of `out` are rows/columns of `ref`, in order (width pruning
    keeps units in their order), matched by their bytes."""
    def rows(t: torch.Tensor) -> list[bytes]:
        t = (t.t() if dim == 1 else t).contiguous()
        return [row.tobytes() for row in t.view(torch.uint8).reshape(t.shape[0], -1).numpy()]

    place = {row: i for i, row in enumerate(rows(ref))}
    index = [place.get(row, -1) for row in rows(out)]
    return min(index) >= 0 and index == sorted(set(index))


def verify_structure(output: Path, model_dir: Path, record: dict) -> dict:
    """Check an experts/depth/width/OWL output against the input tensor by tensor: the layers the record keeps,
    renumbered, and in each the experts it keeps, renumbered (the router's rows exactly theirs); the planned shapes (a
    meta model built from OUT's config, the weight map covering it); per kept layer, tensors equal to the input's (cut
    to the kept units, in order, where no pruning follows); the per-layer sparsity the record planned over the
    targets; everything outside the decoder layers identical."""
    stages, pruning = record["stages"], record["recipe"].get("pruning")
    in_config, out_config = AutoConfig.from_pretrained(model_dir), AutoConfig.from_pretrained(output)
    removed = set(stages.get("depth", {}).get("removed", []))
    kept_layers = [i for i in range(in_config.num_hidden_layers) if i not in removed]
    allocation = (stages.get("pruning") or {}).get("owl", {}).get("sparsities")
    source, result = shard_map(model_dir), shard_map(output)
    planned = parameter_shapes(out_config)
    checks = {"layers_as_planned": out_config.num_hidden_layers == len(kept_layers),
              "weight_map_covers_model": set(planned) == set(result)}
    experts = stages.get("experts", {}).get("kept")  # per MoE layer of the input, the experts it keeps
    if experts:
        checks["experts_as_planned"] = out_config.num_local_experts == len(experts[0])
    if "width" in stages:
        unit = stages["width"]["unit"]
        field = "intermediate_size" if unit == "mlp" else "num_key_value_heads"
        checks["width_as_planned"] = [getattr(out_config, field)] * len(kept_layers) == stages["width"]["kept"]
    shapes_ok = copies_ok = untouched_ok = sparsity_ok = True
    decoder_zeros = decoder_total = 0
    masks_only = bool(pruning) and pruning["method"] in ("magnitude", "wanda", "ria") and pruning.get(
        "update", "none") == "none" and not record["recipe"].get("reconstruction")  # no weight changes but zeros
    with contextlib.ExitStack() as stack:
        files = {path: stack.enter_context(safe_open(str(path), "pt"))
                 for path in set(source.values()) | set(result.values())}
        for name in sorted(result):
            out = files[result[name]].get_tensor(name)
            shapes_ok &= tuple(out.shape) == planned.get(name)
            if not name.startswith("model.layers."):
                untouched_ok &= torch.equal(out, files[source[name]].get_tensor(name))
                continue
            index, part = name.removeprefix("model.layers.").split(".", 1)
            layer = kept_layers[int(index)]
            if experts and part.startswith("block_sparse_moe.experts."):  # expert k here is kept[k] of the input
                number, rest = part.removeprefix("block_sparse_moe.experts.").split(".", 1)
                part = f"block_sparse_moe.experts.{experts[layer][int(number)]}.{rest}"
            origin = f"model.layers.{layer}.{part}"
            ref = files[source[origin]].get_tensor(origin)
            if experts and part == f"{ROUTER}.weight":
                ref = ref[experts[layer]]  # the kept experts' rows
            if out.dim() >= 2:
                decoder_zeros += int((out == 0).sum())
                decoder_total += out.numel()
            if pruning and is_target(name, pruning):
                target = allocation[int(index)] if allocation else float(pruning["sparsity"])
                sparsity_ok &= abs(int((out == 0).sum()) / out.numel() - target) < 0.02
                if masks_only and out.shape == ref.shape:  # the weights it kept are the input's (right expert)
                    kept = out != 0
                    copies_ok &= torch.equal(out[kept], ref[kept])
            elif out.shape == ref.shape:
                copies_ok &= torch.equal(out, ref)
            else:
                copies_ok &= ordered_subset(out, ref, 0 if out.shape[1] == ref.shape[1] else 1)
    checks.update(shapes_as_planned=shapes_ok, kept_tensors_copied=copies_ok, untouched_identical=untouched_ok)
    if pruning:
        checks["layer_sparsity_as_planned"] = sparsity_ok
    return {"checks": checks, "sparsity": record["sparsity"]["overall"] if pruning else None,
            "output_dtype": "", "decoder_sparsity": decoder_zeros / decoder_total if decoder_total else None}


def load_check(output: Path, calibration: Path) -> bool:
    """Really load OUT with from_pretrained in its saved dtype and run a short forward pass."""
    model = AutoModelForCausalLM.from_pretrained(output, dtype="auto")
    ids = torch.load(calibration, weights_only=True)[:1, :16]
    with torch.no_grad():
        logits = model(ids).logits
    ok = bool(torch.isfinite(logits).all())
    del model
    return ok


# ---------------------------------------------------------------- 4. one benchmark run per recipe

def benchmark_recipe(args: argparse.Namespace, recipe: str, model_dir: Path, model_info: dict,
                     calibration: Path) -> dict:
    output = args.workdir / "outputs" / f"{model_dir.name}-{Path(recipe).stem}"
    cmd = prune_command(model_dir, recipe, calibration, output, args.device, args.prune_dtype)
    log_path = args.workdir / "logs" / f"{model_dir.name}-{Path(recipe).stem}.log"
    print(f"running: {' '.join(cmd)}  (log: {log_path})")
    code, wall, rss = run_child(cmd, log_path)
    row = {
        "preset": model_info["preset"], "layers": model_info["layers"], "dtype": model_info["dtype"],
        "recipe": recipe, "device": args.device, "calibration": f"{args.nsamples}x{args.seqlen}",
        "exit_code": code, "wall_s": round(wall, 1), "peak_rss_gib": round(rss, 2),
    }
    if code != 0:
        lines = log_path.read_text().strip().splitlines()
        print(f"llm-sparsify exited with {code}; last lines of {log_path}:\n  " + "\n  ".join(lines[-5:]))
        error = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else None)
        return dict(row, checks_passed=False, error=error)
    record = json.loads((output / RECORD).read_text())
    seconds = [layer["seconds"] for layer in record.get("layers", [])]
    stages = record.get("stages", {})
    if "experts" in stages or "depth" in stages or "width" in stages or (stages.get("pruning") or {}).get("owl"):
        verified = verify_structure(output, model_dir, record)
    else:
        verified = verify_output(output, model_dir, record["recipe"]["pruning"] | {
            "reconstruction": record["recipe"].get("reconstruction")})
    decoder = record["sparsity"].get("decoder")
    verified["checks"]["decoder_sparsity_matches_record"] = (
        decoder is not None and verified["decoder_sparsity"] is not None
        and abs(decoder - verified["decoder_sparsity"]) < 1e-6)
    if args.load_check:
        verified["checks"]["load_and_forward"] = load_check(output, calibration)
    return dict(
        row,
        prune_s=record.get("seconds"),
        per_layer_s={"mean": round(sum(seconds) / len(seconds), 2), "max": round(max(seconds), 2)} if seconds else None,
        peak_device_gib=record.get("peak_device_gib"),
        record_sparsity=round(record["sparsity"]["overall"], 4),
        sparsity=round(verified["sparsity"], 4) if verified["sparsity"] is not None else None,
        decoder_sparsity=round(decoder, 4) if decoder is not None else None,
        untargeted={name: round(share, 4) for name, share in record["sparsity"].get("untargeted", {}).items()},
        prune_dtype=record.get("dtype"), output_dtype=verified["output_dtype"],
        output_gib=round(sum(f.stat().st_size for f in output.glob("*.safetensors")) / 2**30, 2),
        checks=verified["checks"], checks_passed=all(verified["checks"].values()),
    )


def print_table(rows: list[dict]) -> None:
    header = ["preset", "L", "dtype", "recipe", "calib", "wall s", "prune s", "layer s mean/max", "RSS GiB",
              "dev GiB", "sparsity", "decoder", "checks"]
    lines = [header]
    for r in rows:
        per_layer = r.get("per_layer_s") or {}
        lines.append([r["preset"], str(r["layers"]), r["dtype"], r["recipe"], r["calibration"], str(r["wall_s"]),
                      str(r.get("prune_s")), f"{per_layer.get('mean')} / {per_layer.get('max')}",
                      str(r["peak_rss_gib"]), str(r.get("peak_device_gib")), str(r.get("sparsity")),
                      str(r.get("decoder_sparsity")),
                      "pass" if r["checks_passed"] else "FAIL"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="llama-2-7b", metavar="PRESET",
                        help=f"architecture shapes: {', '.join(PUBLIC_PRESETS)} (default: llama-2-7b)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                        help="checkpoint dtype (default: bfloat16)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and calibration ids (default: 0)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llm_sparsify_bench"),
                        help="models, calibration, outputs and logs (default: /tmp/llm_sparsify_bench)")
    parser.add_argument("--recipes", default="wanda-50", help="comma-separated recipes (default: wanda-50)")
    parser.add_argument("--nsamples", type=int, default=8, help="calibration samples (default: 8)")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sample (default: 128)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="--device for llm-sparsify (default: cuda if available, else cpu)")
    parser.add_argument("--prune-dtype", choices=list(DTYPES), default=None,
                        help="--dtype for llm-sparsify (default: not passed, i.e. its own default)")
    parser.add_argument("--generate-only", action="store_true", help="build the checkpoint and calibration, stop")
    parser.add_argument("--load-check", action="store_true",
                        help="also load each output with from_pretrained and run a forward pass (needs RAM)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir, info = ensure_model(args.workdir, args.preset, args.layers, args.dtype, args.seed)
    vocab = PRESETS[args.preset][1]["vocab_size"]
    calibration = ensure_calibration(args.workdir, vocab, args.nsamples, args.seqlen, args.seed)
    print(json.dumps({"model_dir": str(model_dir), "calibration": str(calibration),
                      "generate_s": None if info["reused"] else info["generate_s"],
                      "model_gib": round(info["bytes"] / 2**30, 2),
                      "disk_gib": round(sum(f.stat().st_size for f in model_dir.iterdir()) / 2**30, 2)}))
    if args.generate_only:
        return 0
    rows = [benchmark_recipe(args, recipe.strip(), model_dir, info, calibration)
            for recipe in args.recipes.split(",") if recipe.strip()]
    print_table(rows)
    for row in rows:
        print(json.dumps(row))
    return 0 if all(row["checks_passed"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
