"""The public entry points: prune a loaded model in memory, or a checkpoint from disk to disk."""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from llm_sparsify import __version__, distributed
from llm_sparsify.architecture import parameter_count
from llm_sparsify.checkpoint import resolve_checkpoint, skeleton
from llm_sparsify.data import calibration_ids, check_count, is_token_ids, warn_long_windows
from llm_sparsify.errors import UserError
from llm_sparsify.events import Event, emit
from llm_sparsify.export.hf import read_record, save_checkpoint
from llm_sparsify.export.hub import PushError, finished_files
from llm_sparsify.files import check_apart, check_output, check_writable
from llm_sparsify.finish import Steps, check_steps, run_steps
from llm_sparsify.models import (
    DEFAULT_MODEL,
    ModelError,
    decoder_layers,
    default_calibration_size,
    default_device,
    default_dtype,
    load_model,
)
from llm_sparsify.pipeline import check_structure, layer_sparsities, restructure, run_recipe
from llm_sparsify.recipe import Recipe, RecipeError, load_recipe
from llm_sparsify.stream import PartialOutput, StreamedLayers, fingerprint
from llm_sparsify.structure.experts import experts_unfused, unfuse_experts
from llm_sparsify.targets import count_zeros, untargeted_weights
from llm_sparsify.transform_pass import prune_layers
from llm_sparsify.walk import BATCH_SIZE, LayerReport

log = logging.getLogger(__name__)


class DeviceError(UserError, ValueError):
    """A device string torch does not know, or a device this machine (or this torch build) does not have."""


def check_device(device: str | None) -> str:
    """`device` (default: cuda if available, else cpu) once it is known to exist here, or a DeviceError."""
    device = device or default_device()
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{device!r} is not a device; give one like cpu, cuda or cuda:1") from None
    if kind.type == "cpu":
        return device
    backend = getattr(torch, kind.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        built = kind.type != "cuda" or torch.backends.cuda.is_built()
        why = "no such device is available" if built else f"this torch {torch.__version__} is a CPU-only build"
        raise DeviceError(f"device {device!r}: {why}; use cpu, or a machine (or torch build) with {kind.type}")
    count = getattr(backend, "device_count", lambda: 1)()
    if kind.index is not None and kind.index >= count:
        raise DeviceError(f"device {device!r}: there are {count} {kind.type} devices, numbered from 0")
    return device


def compress(
    model: PreTrainedModel,
    recipe: str | Path | dict | Recipe,
    calibration: Tensor | str | Path | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    output: str | Path | None = None,
    overwrite: bool = False,
    steps: Steps | None = None,
    on_event: Event | None = None,
) -> PreTrainedModel:
    """Prune (and quantize, if the recipe says so) a loaded transformers model in place, layer by layer on
    `device`, and return it. Quantized modules hold ŵ and keep their grid as `module.quantization_grid`.

    `recipe` is a Recipe, a dict, a YAML path or a built-in name ("wanda-50"). `calibration` is a
    LongTensor of token ids [nsamples, seqlen], or a data source name/file (then `tokenizer` is
    used, or loaded from the model's path); it defaults to "c4" for methods that need data.
    With `output`, the pruned model is also saved there with its record, and the steps after saving run on it as
    prune_checkpoint runs them (model card, the recipe's `evaluate:` and `export:`, `steps`); a recipe with such
    sections and no `output` is refused before any work, never silently cut short. `on_event` is told of each layer
    as each walk finishes it, and of each step after saving (events.py).
    """
    recipe = load_recipe(recipe)
    steps = steps or Steps()
    device = check_device(device)
    check_count(batch_size, "batch_size")
    if output is None:
        asked = [name for name, present in (("evaluate", recipe.evaluate), ("export", recipe.export),
                                            ("ppl", steps.ppl), ("push", steps.push_to_hub)) if present]
        if asked:
            raise RecipeError(f"{', '.join(asked)} run on a saved output: give compress() an output directory")
    else:
        output = Path(output)
        check_output(output, overwrite)
        check_writable(output)
        check_steps(recipe, output, steps, device, overwrite=overwrite, rerun=False)
    record = _run_in_memory(model, recipe, calibration, tokenizer=tokenizer, device=device, nsamples=nsamples,
                            seqlen=seqlen, seed=seed, batch_size=batch_size, base_model=model.name_or_path,
                            on_event=on_event)
    if output is not None:
        save_checkpoint(model, tokenizer, output, record, overwrite=overwrite)
        emit(on_event, "saved", record)
        run_steps(output, recipe, model.name_or_path, steps, device, None, overwrite=overwrite, on_event=on_event)
    return model


def _run_in_memory(model: PreTrainedModel, recipe: Recipe, calibration: Tensor | str | Path | None, *,
                   tokenizer: PreTrainedTokenizerBase | None, device: str, nsamples: int | None, seqlen: int | None,
                   seed: int, batch_size: int, base_model: str | None,
                   on_event: Event | None = None) -> dict[str, Any]:
    """Every stage of `recipe` on a model in memory (pipeline.run_recipe), MoE experts pruned as Linears and fused
    back; returns the run's record (what compress and the whole-model path of prune_checkpoint save)."""
    ids, calibration_info = prepare_calibration(model, recipe, calibration, tokenizer, device, nsamples, seqlen, seed)
    training = prepare_training(model, recipe, calibration, tokenizer, device, seed)
    start = time.perf_counter()
    with experts_unfused(model):  # MoE experts are pruned as Linears, then fused back
        reports, stages = run_recipe(model, recipe, ids, training=training, tokenizer=tokenizer, device=device,
                                     batch_size=batch_size, on_event=on_event)
        record = run_record(base_model, recipe, calibration_info, device, model.dtype, start, reports, model)
    return record | {"processes": 1, "stages": stages}


def prepare_calibration(
    model: PreTrainedModel,
    recipe: Recipe,
    calibration: Tensor | str | Path | None,
    tokenizer: PreTrainedTokenizerBase | None,
    device: str,
    nsamples: int | None,
    seqlen: int | None,
    seed: int,
    *,
    for_statistics: bool = True,
) -> tuple[Tensor | None, dict[str, Any]]:
    """Calibration token ids for `recipe` (None if it needs no data) and a description of them; a warning where
    they are too few for the recipe's Hessian (`for_statistics`: False for fine-tuning windows), or where given token
    ids make `nsamples` and `seqlen` moot."""
    check_count(nsamples, "nsamples")
    check_count(seqlen, "seqlen")
    if not recipe.needs_calibration:
        return None, {}
    default_n, default_len = default_calibration_size(device)
    source = "c4" if calibration is None else calibration
    token_ids = is_token_ids(source)
    if not token_ids:
        try:
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model.name_or_path)
        except (OSError, ValueError) as error:
            raise ModelError(f"{model.name_or_path} has no usable tokenizer for text calibration; give token ids "
                             f"as a .pt LongTensor [nsamples, seqlen] instead ({error})") from error
    ids = calibration_ids(source, tokenizer, nsamples or default_n, seqlen or default_len, seed)
    warn_long_windows(ids.shape[1], model.config)
    moot = [f"{name} {asked}" for name, asked, size in (("nsamples", nsamples, ids.shape[0]),
                                                         ("seqlen", seqlen, ids.shape[1])) if asked not in (None, size)]
    if token_ids and moot:
        log.warning("the calibration token ids %s are %d x %d and are used as they are: %s %s not apply",
                    "tensor" if isinstance(source, Tensor) else source, *ids.shape, " and ".join(moot),
                    "does" if len(moot) == 1 else "do")
    widest = max(getattr(model.config, "intermediate_size", 0) or 0, model.config.hidden_size)
    if for_statistics and recipe.statistic == "hessian" and ids.numel() < 2 * widest:
        # measured on SmolLM2-135M (widest input 1,536), SparseGPT 50% + GPTQ int4 g128: with 1,024 tokens no better
        # than rounding to nearest; with 4,096 tokens 11-16% lower perplexity (104 vs 117, 111 vs 132)
        log.warning("%d calibration tokens for a Hessian of up to %d inputs: H = X·Xᵀ is then poorly conditioned and "
                    "SparseGPT/GPTQ lose their edge; give at least %d tokens (--nsamples × --seqlen)",
                    ids.numel(), widest, 2 * widest)
    name = "tensor" if isinstance(source, Tensor) else str(source)
    return ids, {"source": name, "nsamples": ids.shape[0], "seqlen": ids.shape[1], "seed": seed}


def prepare_training(
    model: PreTrainedModel,
    recipe: Recipe,
    calibration: Tensor | str | Path | None,
    tokenizer: PreTrainedTokenizerBase | None,
    device: str,
    seed: int,
) -> Tensor | None:
    """Fine-tuning windows for the recipe's recovery stage (None without one): other windows of the calibration
    source (seed + 1), or the calibration tensor itself when token ids were given."""
    if recipe.recovery is None:
        return None
    recovery = recipe.recovery
    return prepare_calibration(model, recipe, calibration, tokenizer, device, recovery.nsamples, recovery.seqlen,
                               seed + 1, for_statistics=False)[0]


def measured_sparsity(reports: list[LayerReport], model: PreTrainedModel) -> dict[str, Any]:
    """Share of zeros per pruned module, per module type (q_proj, ...) and over all pruned weights ("overall"); over
    all decoder-layer weights of two or more dimensions, targeted or not ("decoder"); and the decoder weights that no
    target covers, each with its share of the decoder-layer weights ("untargeted", see targets.untargeted_weights;
    empty without a pruning stage)."""
    modules = {name: share for report in reports for name, share in report.sparsity.items()}
    if reports:  # counted as each layer was saved: a streamed model is not in memory now
        weights, zeros = sum(r.weights for r in reports), sum(r.zeros for r in reports)
    else:  # no pruning stage (depth, width only): the model in memory as it is
        counts = [count_zeros(layer) for layer in decoder_layers(model)]
        weights, zeros = sum(w for w, _ in counts), sum(z for _, z in counts)
    sizes = {name: model.get_submodule(name).weight.numel() for name in modules}
    by_type: dict[str, list[str]] = {}
    for name in modules:
        by_type.setdefault(name.rsplit(".", 1)[-1], []).append(name)

    def weighted(names: list[str]) -> float:
        return sum(modules[n] * sizes[n] for n in names) / max(sum(sizes[n] for n in names), 1)

    return {
        "overall": weighted(list(modules)),
        "decoder": zeros / max(weights, 1),
        "untargeted": untargeted_weights(model, list(modules)) if modules else {},
        "by_type": {kind: weighted(names) for kind, names in by_type.items()},
        "modules": modules,
    }


@dataclass(frozen=True)
class Run:
    """One prune_checkpoint call's settings, as each step of the run reads them (see prune_checkpoint)."""

    model_name: str | None
    recipe: Recipe
    output: Path
    calibration: str | Path | Tensor | None
    device: str
    dtype: torch.dtype
    nsamples: int | None
    seqlen: int | None
    seed: int
    batch_size: int
    overwrite: bool
    on_event: Event | None


def prune_checkpoint(
    model_name: str | None,
    recipe: str | Path | Recipe,
    output: str | Path,
    calibration: str | Path | Tensor | None = None,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    overwrite: bool = False,
    steps: Steps | None = None,
    on_event: Event | None = None,
) -> dict[str, Any]:
    """Prune a safetensors checkpoint from disk to disk, one decoder layer in memory at a time, then run the recipe's
    steps after saving: the model card, its `evaluate:` and `export:` sections, and `steps` (--ppl, a Hub push).

    Every finished layer is written to `output`'s partial directory as it goes: killed and started
    again with the same arguments, the run continues after the last finished layer. `dtype` is the
    compute dtype; the output keeps the checkpoint's own. A quantized recipe adds quantization.safetensors (the
    grids, see quantize/grid.py). Under torchrun the work is shared by the ranks (see llm_sparsify.distributed).
    Every step's needs are checked before the pruning. An output that a finished run of the same settings wrote is
    not pruned again: only the steps after saving not done yet are done. `on_event` is told ("saved", record)
    once the pruned output is complete, of each step after it as it finishes, and of each layer as each walk finishes
    it (events.py). Returns the record
    saved as llm_sparsify.json, with what the steps did under "steps" (not saved).
    """
    recipe = load_recipe(recipe)
    steps = steps or Steps()
    check_count(batch_size, "batch_size")
    device = distributed.init_from_environment(check_device(device))
    run = Run(model_name, recipe, Path(output), calibration, device, dtype or default_dtype(device), nsamples, seqlen,
              seed, batch_size, overwrite, on_event)
    record = finished_record(run)
    check_steps(recipe, run.output, steps, device, overwrite=overwrite, rerun=record is not None)  # before the work
    if record is not None:
        log.info("%s already holds this command's pruned model (same model, recipe, calibration and dtype): doing "
                 "only the steps after pruning that are not done yet", run.output)
    else:
        local = Path(model_name) if model_name and Path(model_name).is_dir() else None
        check_output(run.output, overwrite, source=local)  # before the work, not after
        check_writable(run.output)
        checkpoint = resolve_checkpoint(model_name)
        check_apart(run.output, checkpoint)  # a Hub model's or the default model's folder, known only now
        record = _prune_streamed(run, checkpoint) if recipe.streams else _prune_in_memory(run, checkpoint)
    if distributed.rank_and_size()[0] != 0:  # under torchrun, rank 0 writes and finishes
        return record
    emit(on_event, "saved", record)
    done = run_steps(run.output, recipe, model_name, steps, device, dtype, overwrite=overwrite, on_event=on_event)
    return record | {"steps": done}


def finished_record(run: Run) -> dict[str, Any] | None:
    """The record of `run.output` if it is a finished output of this run's pruning (same model, recipe, calibration
    and dtype), so that running again does only the steps after it; None otherwise, or with `overwrite` (which
    starts over), or with calibration given as a tensor (its content is not recorded)."""
    output, recipe = run.output, run.recipe
    if run.overwrite or not output.is_dir() or isinstance(run.calibration, Tensor):
        return None
    try:
        finished_files(output)
    except PushError:  # not a finished output: the pruning says what is wrong
        return None
    calibration = {}
    if recipe.needs_calibration:
        source = "c4" if run.calibration is None else run.calibration
        if is_token_ids(source):
            shape = tuple(calibration_ids(source, None, 1, 2).shape)  # token ids are used as they are
        else:
            default_n, default_len = default_calibration_size(run.device)
            shape = (run.nsamples or default_n, run.seqlen or default_len)
        calibration = {"source": str(source), "nsamples": shape[0], "seqlen": shape[1], "seed": run.seed}
    this_run = {"base_model": run.model_name or DEFAULT_MODEL, "recipe": recipe.to_dict(), "calibration": calibration,
                "dtype": str(run.dtype).removeprefix("torch.")}
    record = read_record(output)
    same = all(record.get(key) == value for key, value in json.loads(json.dumps(this_run)).items())
    return record if same else None


def _prune_streamed(run: Run, checkpoint: Path) -> dict[str, Any]:
    """The streamed path: a meta skeleton, each layer read, visited and written in turn (stream.py)."""
    recipe, device, batch_size = run.recipe, run.device, run.batch_size
    model = skeleton(checkpoint, run.dtype)
    unfuse_experts(model)  # MoE experts as Linears; written back in the checkpoint's layout
    layers = StreamedLayers(model, checkpoint, run.dtype)
    check_structure(model, recipe)
    ids, calibration_info = prepare_calibration(model, recipe, run.calibration, None, device, run.nsamples,
                                                run.seqlen, run.seed)
    rank, world_size = distributed.rank_and_size()
    key = fingerprint(checkpoint, recipe.to_dict(), ids, run.dtype, batch_size)
    shards = len(layers) + len(layers.others)
    partial, finished = None, None
    if rank == 0:  # a partial output of other settings is refused here, before any work
        partial = PartialOutput(run.output, key, shards, run.overwrite)
        finished = partial.finished
    finished = list(distributed.same_on_all_ranks(finished))  # a copy: the partial output appends to its own
    if rank != 0:
        partial = PartialOutput(run.output, key, shards, run.overwrite, finished=finished)
        layers.write = False

    start = time.perf_counter()
    own_ids = distributed.samples_of_this_rank(ids, batch_size) if ids is not None else None
    tokenizer = None
    if recipe.depth is not None and len(recipe.depth.sources) > 1:  # depth scored on text sources of its own
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    stages = restructure(model, layers, recipe, own_ids, tokenizer=tokenizer, device=device, batch_size=batch_size,
                         on_event=run.on_event)
    sparsities, allocation = layer_sparsities(model, layers, recipe, own_ids, device, batch_size, run.on_event)
    partial.shard_count = len(layers) + len(layers.others)
    layers.output = partial  # from here on, layers an earlier run finished are read back from it
    reports = prune_layers(model, layers, recipe, own_ids, device, batch_size, finished, sparsities=sparsities,
                           on_event=run.on_event)
    record = run_record(run.model_name, recipe, calibration_info, device, run.dtype, start, reports, model)
    record |= {"processes": world_size, "resumed_after_layers": len(finished)}
    if recipe.method is not None:
        stages["pruning"] = allocation
    record["stages"] = stages | {"parameters_after": parameter_count(model)}
    if rank == 0:
        layers.output.finish(layers.copy_other_tensors(), checkpoint, record,
                             config=saved_config(model, checkpoint) if layers.restructured else None)
    distributed.barrier()
    return record


def saved_config(model: PreTrainedModel, checkpoint: Path) -> PretrainedConfig:
    """The model's config as the output saves it: the structure as the model has it now, the dtype and use_cache
    as the checkpoint has them (loading set the compute dtype and turned the cache off)."""
    config = copy.deepcopy(model.config)
    source = AutoConfig.from_pretrained(checkpoint)
    config.dtype, config.use_cache = source.dtype, getattr(source, "use_cache", True)
    return config


def run_record(model_name: str | None, recipe: Recipe, calibration_info: dict[str, Any], device: str,
               dtype: torch.dtype, start: float, reports: list[LayerReport], model: PreTrainedModel) -> dict[str, Any]:
    """What a run did, saved as the output's llm_sparsify.json: recipe, data, measured sparsity per layer, versions."""
    record = {
        "llm_sparsify_version": __version__,
        "base_model": model_name or DEFAULT_MODEL,
        "recipe_name": recipe.name,
        "recipe": recipe.to_dict(),
        "calibration": calibration_info,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - start, 2),
        "sparsity": measured_sparsity(reports, model),
        "layers": [asdict(r) for r in reports],
        **({"quantization": recipe.quantization.record()} if recipe.quantization else {}),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    if torch.cuda.is_available() and torch.device(device).type == "cuda":
        record["peak_device_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return record


def _prune_in_memory(run: Run, checkpoint: Path) -> dict[str, Any]:
    """The whole-model path (expert removal, OBD, recovery: Recipe.whole_model_stages): load, run, save atomically.

    Nothing is resumable here: an interrupted run leaves no output, and the same command starts it again."""
    recipe, device, dtype = run.recipe, run.device, run.dtype
    if distributed.rank_and_size()[1] > 1:
        raise RecipeError(f"the whole-model stages ({', '.join(recipe.whole_model_stages)}) run in one process; start "
                          "it without torchrun")
    weights = parameter_count(skeleton(checkpoint, dtype)) * dtype.itemsize
    log.warning("%s need%s the whole model in host memory: about %.1f GiB of weights in %s, more while it runs "
                "(every other stage streams one layer at a time)", ", ".join(recipe.whole_model_stages),
                "s" if len(recipe.whole_model_stages) == 1 else "", weights / 2**30, str(dtype).removeprefix("torch."))
    model, tokenizer = load_model(str(checkpoint), dtype=dtype, device=device)
    record = _run_in_memory(model, recipe, run.calibration, tokenizer=tokenizer, device=device, nsamples=run.nsamples,
                            seqlen=run.seqlen, seed=run.seed, batch_size=run.batch_size, base_model=run.model_name,
                            on_event=run.on_event)
    model.config = saved_config(model, checkpoint)
    save_checkpoint(model.to(model.config.dtype or dtype), tokenizer, run.output, record, overwrite=run.overwrite)
    return record
