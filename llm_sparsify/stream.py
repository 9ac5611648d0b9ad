"""Streaming a sharded safetensors checkpoint through the layer walk, one decoder layer in memory at a time.

The model is a skeleton with its parameters on the meta device. Each layer's tensors are read from
the input shards when its turn comes, pruned on the device, written to an output shard of its own,
and dropped. The output grows in `.<name>.partial/` beside the final directory, with a progress file
naming the finished layers, so a killed run started again with the same command continues from the
last finished layer; the directory is renamed to its final name only when complete.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from llm_sparsify.checkpoint import INDEX, read_header, read_tensors, weight_map
from llm_sparsify.checkpoint_layout import as_renaming, checkpoint_layout, model_layout
from llm_sparsify.files import MARKER, PROGRESS, RECORD, OutputExistsError, _remove, replace_directory, written_by_us
from llm_sparsify.models import ModelError, decoder_layers
from llm_sparsify.quantize.grid import GRIDS_FILE, Grid, load_grids, save_grids
from llm_sparsify.structure.depth import remove_blocks
from llm_sparsify.structure.experts import (
    fused_tensors,
    keep_expert_tensors,
    moe_blocks,
    remove_experts,
    unfused_tensors,
)
from llm_sparsify.structure.resize import cut_tensors, remove_units
from llm_sparsify.walk import LayerReport

log = logging.getLogger(__name__)

_NOT_COPIED = {"README.md", ".gitattributes", RECORD, MARKER}  # besides weights and their indexes
_SAMPLE_BYTES = 4096  # read from each end of every tensor for the fingerprint of a checkpoint's content
_LABELS = {"model": "model content", "calibration_sha256": "calibration tokens", "batch_size": "batch size"}
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def _shapes(tensors: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def _place(module: nn.Module, tensors: dict[str, Tensor], device: torch.device, dtype: torch.dtype) -> None:
    """Put checkpoint tensors into a meta module's parameters (floating ones cast to `dtype`)."""
    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner)
        tensor = tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype)
        if leaf in sub._parameters:
            sub._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            sub._buffers[leaf] = tensor
    for sub in module.modules():  # buffers not stored in the checkpoint (e.g. rotary frequencies)
        for key, buffer in sub._buffers.items():
            if buffer is not None and not buffer.is_meta:
                sub._buffers[key] = buffer.to(device)


def _drop(module: nn.Module, names: list[str]) -> None:
    """Return the named parameters to the meta device, freeing their memory."""
    for name in names:
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner)
        target = sub._parameters if leaf in sub._parameters else sub._buffers
        target[leaf] = torch.empty_like(target[leaf], device="meta")


class PartialOutput:
    """An output directory under construction: one shard per finished layer (and one file of its quantization
    grids, if any, merged into quantization.safetensors at the end) and a progress file, written from the start.

    The progress file holds the run's fingerprint, the finished layers and the size of every file written. A run
    continues a partial output only if the fingerprints match and every file written is still there, whole (its
    size, a readable safetensors header); otherwise it stops with one line that says why, or starts over with
    `overwrite`. Only a directory that llm_sparsify wrote is ever removed."""

    def __init__(self, output: Path, fingerprint: dict[str, Any], shard_count: int, overwrite: bool,
                 finished: list[LayerReport] | None = None) -> None:
        """Open (or continue) the partial output. Under torch.distributed, ranks other than 0 only read
        it: they pass the `finished` layers that rank 0 found."""
        self.output = output
        self.path = output.with_name(f".{output.name}.partial")
        self.fingerprint = fingerprint
        self.shard_count = shard_count
        self.finished: list[LayerReport] = []
        self.files: dict[str, int] = {}  # file name -> bytes, of every file written so far
        if finished is not None:
            self.finished = list(finished)
            return
        if (self.path / PROGRESS).exists():
            self._continue_or_start_over(overwrite)
        elif self.path.exists():  # killed before its progress file was written, or while finishing
            if not written_by_us(self.path):
                raise OutputExistsError(f"{self.path}, where this run keeps its unfinished output, holds files "
                                        "llm-sparsify did not write; remove it yourself or choose another output")
            _remove(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._save_progress()

    def _continue_or_start_over(self, overwrite: bool) -> None:
        """Take the finished layers of the partial output if it is this run's and whole; else remove it (with
        `overwrite`) or refuse, naming the settings that differ or the damage."""
        try:
            saved = json.loads((self.path / PROGRESS).read_text())
            fingerprint, layers, files = saved["fingerprint"], saved["layers"], saved.get("files", {})
        except (ValueError, KeyError, TypeError) as error:
            fingerprint, problem = None, f"its {PROGRESS} is unreadable ({error})"
        else:
            problem = self._damage(files) if fingerprint == self.fingerprint else None
        if fingerprint == self.fingerprint and problem is None:
            self.finished, self.files = [LayerReport(**r) for r in layers], files
            log.info("resuming %s after %d finished layers", self.output, len(self.finished))
        elif overwrite:
            _remove(self.path)
        elif problem is not None:
            raise OutputExistsError(f"{self.path} holds an unfinished run that is damaged: {problem}; pass "
                                    "--overwrite to start over")
        else:
            changed = sorted(_LABELS.get(k, k) for k in self.fingerprint
                             if not isinstance(fingerprint, dict) or fingerprint.get(k) != self.fingerprint[k])
            raise OutputExistsError(
                f"{self.path} holds an unfinished run with other settings ({', '.join(changed)}); run "
                "its command again to finish it, or pass --overwrite to start over")

    def _damage(self, files: dict[str, int]) -> str | None:
        """What is wrong with the files a progress file lists (missing, another size, not safetensors), or None."""
        for name, size in files.items():
            path = self.path / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, not the {size} written"
            try:
                with safe_open(path, "pt"):
                    pass
            except SafetensorError as error:
                return f"{name} is not a readable safetensors file ({error})"
        return None

    def _save_progress(self) -> None:
        state = {"fingerprint": self.fingerprint, "layers": [vars(r) for r in self.finished], "files": self.files}
        tmp = self.path / f"{PROGRESS}.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path / PROGRESS)

    def shard_name(self, number: int) -> str:
        return f"model-{number + 1:05d}-of-{self.shard_count:05d}.safetensors"

    def write_shard(self, number: int, tensors: dict[str, Tensor]) -> None:
        """Write a shard under a temporary name and rename it, so no half-written shard ever exists."""
        tmp = self.path / f"{self.shard_name(number)}.tmp"
        save_file({name: t.contiguous() for name, t in tensors.items()}, tmp, metadata={"format": "pt"})
        self.files[self.shard_name(number)] = tmp.stat().st_size
        os.replace(tmp, self.path / self.shard_name(number))

    def write_grids(self, number: int, grids: dict[str, Grid]) -> None:
        """The quantization grids of one layer, beside its shard (merged into one file by `finish`)."""
        tmp = self.path / f"grids-{number + 1:05d}.safetensors.tmp"
        save_grids(grids, tmp)
        self.files[tmp.with_suffix("").name] = tmp.stat().st_size
        os.replace(tmp, tmp.with_suffix(""))

    def layer_done(self, report: LayerReport) -> None:
        self.finished.append(report)
        self._save_progress()

    def finish(self, files: dict[str, str], source: Path, record: dict[str, Any],
               config: PretrainedConfig | None = None) -> Path:
        """Index, config (`config`, else the source's), tokenizer and record; then rename into place."""
        total = sum((self.path / f).stat().st_size for f in set(files.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(files.items()))}
        (self.path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if parts := sorted(self.path.glob("grids-*.safetensors")):  # one file of grids, all layers'
            save_grids({name: grid for part in parts for name, grid in load_grids(part).items()},
                       self.path / GRIDS_FILE)
            for part in parts:
                part.unlink()
        for item in source.iterdir():  # config, generation config, tokenizer, chat template, ...
            if item.is_file() and item.name not in _NOT_COPIED and not item.name.endswith(_WEIGHTS):
                shutil.copy(item, self.path / item.name)
        if config is not None:  # the structure stages changed it
            config.to_json_file(self.path / "config.json")
        (self.path / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (self.path / PROGRESS).unlink()
        replace_directory(self.path, self.output)
        return self.output


class StreamedLayers:
    """Decoder layers read from a checkpoint's shards when their turn comes; pruned ones written out.

    Layers already finished by an interrupted run are read back from the partial output, so the
    activations rebuilt from them are those of the uninterrupted run. The checkpoint's names and shapes may
    differ from the modules' (Mixtral's per-expert w1/w2/w3 on disk, fused experts in transformers, unfused
    Linears here, structure/experts.py): tensors are converted on the way in and back on the way out, by
    transformers' own mapping (checkpoint_layout.py), so the output keeps the layout transformers saves.
    """

    def __init__(self, model: PreTrainedModel, checkpoint: Path, dtype: torch.dtype) -> None:
        self.model, self.checkpoint, self.dtype = model, checkpoint, dtype
        self.output: PartialOutput | None = None  # where pruned layers go (set once the shard count is known)
        self.write = True  # False on ranks other than 0, which read the output but never write it
        self.files = weight_map(checkpoint)
        layers = decoder_layers(model)
        self.prefix = next(name for name, module in model.named_modules() if module is layers)
        self._index_layers()
        # where each layer's tensors are read: its checkpoint layer (names and renamings as the checkpoint has them),
        # and the cuts the structure stages made, in order, each a function of the layer's tensors: the experts kept
        # (structure/experts.keep_expert_tensors), the rows and columns of its Linears kept (resize.cut_tensors)
        self.sources = list(range(len(layers)))
        self.source_names, self.source_renamings = list(self.stored_names), list(self.renamings)
        self.cuts: list[list[Callable[[dict[str, Tensor]], dict[str, Tensor]]]] = [[] for _ in layers]
        self.restructured = False  # the skeleton's structure differs from the checkpoint's (its config too)
        missing = [name for names in self.stored_names for name in names if name not in self.files]
        tied = getattr(model, "all_tied_weights_keys", None) or {}  # e.g. lm_head.weight: the embeddings'
        missing += [name for name, _ in model.named_parameters()  # embeddings, norm, lm_head
                    if not name.startswith(f"{self.prefix}.") and name not in self.files and name not in tied]
        if missing:
            raise ModelError(f"{checkpoint} lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")
        self.others = sorted(n for n in self.files if not n.startswith(f"{self.prefix}."))  # embeddings, ...
        self.stored: dict[str, torch.dtype] = {}
        self.pending: LayerReport | None = None  # saved, not yet recorded in the progress file

    def _index_layers(self) -> None:
        """Names (within the layer and on disk) and the renaming between them of every decoder layer of the skeleton
        as it is now: what the output's shards are written under."""
        self.layers = decoder_layers(self.model)
        self.names = [list(layer.state_dict()) for layer in self.layers]  # per layer, e.g. "mlp.up_proj.weight"
        self.renamings: list[dict[str, str] | None] = []  # per layer: name in the layer -> full name on disk
        self.stored_names = []
        for i, layer in enumerate(self.layers):
            self.renamings.append(None)
            stored = self._to_checkpoint(i, layer.state_dict())  # meta tensors: names and shapes only
            self.stored_names.append(list(stored))
            self.renamings[i] = as_renaming(lambda t, i=i: self._to_modules(i, t), _shapes(stored),
                                            _shapes(layer.state_dict()))

    def remove_blocks(self, blocks: list[int]) -> None:
        """Delete decoder blocks from the skeleton (structure/depth.remove_blocks, config included); the layers after
        them are read from their own checkpoint layers and written under their new indices."""
        self._check_renamed()
        remove_blocks(self.model, blocks)
        self.sources = [s for i, s in enumerate(self.sources) if i not in blocks]
        self.cuts = [c for i, c in enumerate(self.cuts) if i not in blocks]
        self._restructured()

    def remove_units(self, unit: str, keep: list[Tensor]) -> None:
        """Cut MLP channels or KV groups out of the skeleton's layers (structure/resize.remove_units, config included)
        and out of each layer's tensors as they are read."""
        self._check_renamed()
        for cuts, slices in zip(self.cuts, remove_units(self.model, unit, keep), strict=True):
            if slices:
                cuts.append(functools.partial(cut_tensors, slices=slices))
        self._restructured()

    def remove_experts(self, keep: list[list[int]]) -> None:
        """Keep only experts `keep[b]` of MoE block b in the skeleton (structure/experts.remove_experts, config
        included) and in each layer's tensors as they are read."""
        self._check_renamed()
        blocks = {id(block): b for b, block in enumerate(moe_blocks(self.model))}
        for layer, cuts in zip(self.layers, self.cuts, strict=True):
            for name, module in layer.named_modules():
                if id(module) in blocks:
                    cuts.append(functools.partial(keep_expert_tensors, block=name, kept=keep[blocks[id(module)]]))
        remove_experts(self.model, keep)
        self._restructured()

    def _check_renamed(self) -> None:
        if any(renaming is None for renaming in self.source_renamings):
            raise ModelError("expert removal, depth and width pruning stream only checkpoints whose layers' tensors "
                             "are stored as the model holds them (renamed at most); this one converts them on loading")

    def _restructured(self) -> None:
        self.restructured = True
        self._index_layers()

    def _to_checkpoint(self, index: int, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Layer `index`'s tensors (names within the layer) under the checkpoint's full names and shapes."""
        if (renaming := self.renamings[index]) is not None:  # the common case: names change, tensors do not
            return {renaming[name]: t for name, t in tensors.items()}
        full = {f"{self.prefix}.{index}.{name}": t for name, t in tensors.items()}
        return checkpoint_layout(self.model, fused_tensors(full))

    def _to_modules(self, index: int, tensors: dict[str, Tensor],
                    renaming: dict[str, str] | None = None) -> dict[str, Tensor]:
        """The inverse of _to_checkpoint: names within the layer, as its modules hold them (`renaming`: the one to
        undo, default the output layer `index`'s)."""
        renaming = renaming if renaming is not None else self.renamings[index]
        if renaming is not None:
            return {name: tensors[source] for name, source in renaming.items()}
        full = unfused_tensors(model_layout(self.model, tensors))
        return {name.removeprefix(f"{self.prefix}.{index}."): t for name, t in full.items()}

    def __len__(self) -> int:
        return len(self.layers)

    def _read(self, index: int, original: bool = False) -> dict[str, Tensor]:
        """Layer `index`'s tensors (names within the layer): from the partial output if an earlier run finished it
        (unless `original`), else from its checkpoint layer, cut as the structure stages cut the skeleton."""
        if not original and self.output is not None and index < len(self.output.finished):
            full = self.stored_names[index]
            files = dict.fromkeys(full, self.output.shard_name(index))
            return self._to_modules(index, read_tensors(self.output.path, files, full))
        source = self.sources[index]
        stored = read_tensors(self.checkpoint, self.files, self.source_names[source])
        tensors = self._to_modules(source, stored, self.source_renamings[source])
        for cut in self.cuts[index]:
            tensors = cut(tensors)
        return tensors

    @contextlib.contextmanager
    def stem(self, device: torch.device) -> Iterator[None]:
        """Embeddings (and whatever else runs before layer 0) on `device` for the capture, then dropped."""
        base, _, layers = self.prefix.rpartition(".")  # "model", "layers"
        owner = self.model.get_submodule(base)
        names = [n for n, _ in owner.named_parameters() if not n.startswith(f"{layers}.")]
        tensors = read_tensors(self.checkpoint, self.files, [f"{base}.{n}" for n in names])
        _place(owner, {n.removeprefix(f"{base}."): t for n, t in tensors.items()}, device, self.dtype)
        del tensors
        try:
            yield
        finally:
            _drop(owner, names)

    def target_weights(self, targets: list[dict[str, nn.Linear]]) -> Iterator[Tensor]:
        """Every target weight as stored in the checkpoint, one layer at a time."""
        for index, modules in enumerate(targets):
            if modules:
                tensors = self._read(index, original=True)
                yield from (tensors[f"{name.removeprefix(f'{self.prefix}.{index}.')}.weight"] for name in modules)

    def load(self, index: int, device: torch.device, original: bool = False) -> nn.Module:
        """Layer `index` on `device`: from the partial output if an earlier run finished it, unless `original`."""
        tensors = self._read(index, original)
        self.stored = {name: t.dtype for name, t in tensors.items()}
        layer = self.layers[index]
        _place(layer, tensors, device, self.dtype)
        return layer

    def round_to_storage(self, layer: nn.Module, names: list[str] | None = None) -> None:
        """Round the layer's tensors (those `names` only, if given) to the checkpoint's own dtypes, kept in
        the compute dtype, so the activations it passes on are the ones a resumed run rebuilds from the shard."""
        for name, tensor in layer.state_dict().items():
            if (names is None or name in names) and self.stored[name] != tensor.dtype:
                tensor.copy_(tensor.to(self.stored[name]))

    def save(self, index: int, layer: nn.Module, report: LayerReport) -> None:
        """Write the pruned layer in the checkpoint's own dtypes (and keep exactly those values), and its grids.
        (A quantized weight stored in bfloat16 is its grid value rounded to bfloat16; rounding w/scale still
        gives its integer back, even at 8 bits.)"""
        self.round_to_storage(layer)
        tensors = self._to_checkpoint(index, {name: tensor.to("cpu", self.stored[name])
                                              for name, tensor in layer.state_dict().items()})
        grids = {f"{self.prefix}.{index}.{name}": module.quantization_grid for name, module in layer.named_modules()
                 if getattr(module, "quantization_grid", None) is not None}
        if self.output is not None and self.write:
            self.output.write_shard(index, tensors)
            if grids:
                self.output.write_grids(index, grids)
            self.pending = report

    def unload(self, index: int, layer: nn.Module) -> None:
        """Free the layer; a layer pruned in this run is recorded as finished now that its time is known
        (killed before this, the layer is simply done again)."""
        _drop(layer, self.names[index])
        for module in layer.modules():
            vars(module).pop("quantization_grid", None)
        if self.pending is not None:
            self.output.layer_done(self.pending)
            self.pending = None

    def copy_other_tensors(self) -> dict[str, str]:
        """Copy every tensor outside the decoder layers (embeddings, norm, lm_head) to a shard of its own;
        return the complete weight map of the output."""
        files = {name: self.output.shard_name(i) for i, names in enumerate(self.stored_names) for name in names}
        for number, name in enumerate(self.others, start=len(self.layers)):
            self.output.write_shard(number, read_tensors(self.checkpoint, self.files, [name]))
            files[name] = self.output.shard_name(number)
        return files


def fingerprint(checkpoint: Path, recipe: dict, calibration: Tensor | None, dtype: torch.dtype,
                batch_size: int) -> dict[str, Any]:
    """What must match for a partial output to be continued: same model content, recipe, tokens and numerics."""
    digest = None
    if calibration is not None:
        digest = hashlib.sha256(calibration.contiguous().numpy().tobytes()).hexdigest()
    return {"model": model_content(checkpoint), "recipe": recipe, "calibration_sha256": digest,
            "dtype": str(dtype).removeprefix("torch."), "batch_size": batch_size}


def model_content(checkpoint: Path) -> dict[str, Any]:
    """A cheap fingerprint of a checkpoint's content: the sha256 of config.json and, per safetensors shard, its
    size and a sha256 of its header (names, dtypes, shapes, offsets) and of the first and last 4 KiB of every
    tensor. That reads a few MiB even of a 70B model, and tells apart another model's shards, same shapes or not
    (a fine-tune, a merge, a pruned copy change every tensor they touch at both ends); a change confined to the
    middle of a tensor goes unseen. The path, modification times and a Hub commit are left out: a model copied
    or moved continues, and so does a Hub model whose new commit changed only its card."""
    config = checkpoint / "config.json"
    content = {"config.json": hashlib.sha256(config.read_bytes()).hexdigest() if config.exists() else None}
    for shard in sorted(set(weight_map(checkpoint).values())):
        content[shard] = _shard_content(checkpoint / shard)
    return content


def _shard_content(path: Path) -> dict[str, Any]:
    """Size and sampled sha256 of one safetensors file (see model_content), or a ModelError if it is damaged."""
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        try:
            data, header_bytes = read_header(file)
            header = json.loads(header_bytes)
            digest = hashlib.sha256(header_bytes)
            for name, entry in sorted(header.items()):
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                for offset in sorted({begin, max(begin, end - _SAMPLE_BYTES)}):
                    file.seek(data + offset)
                    digest.update(file.read(min(_SAMPLE_BYTES, end - offset)))
        except (ValueError, KeyError, TypeError) as error:
            raise ModelError(f"{path} is not a readable safetensors file: {error}") from error
    return {"bytes": size, "sha256": digest.hexdigest()}
